"""Checks on the image tensors the torch models are given: size against the model's stride, finiteness.

Each model calls them at the start of its forward, so bad input fails there with a message naming the
model, the size and what it needs, instead of a shape mismatch deep inside a convolution or the
decoder, or a NaN score that anomalib's post-processor would label "normal" (``NaN > threshold`` is
``False``).

Both checks are skipped while the model is traced or exported (TorchScript, ONNX, ``torch.export`` /
dynamo): a data-dependent ``if`` cannot be part of the graph. The exported graph therefore propagates
a NaN input to a NaN score and map; check inputs before an exported model if they can hold NaN.
"""

from __future__ import annotations

import torch

__all__ = ["check_finite_images", "check_input_multiple", "is_exporting"]


def is_exporting() -> bool:
    """``True`` while the model is traced, scripted, ONNX-exported or compiled (no Python checks there)."""
    return bool(
        torch.jit.is_tracing()
        or torch.jit.is_scripting()
        or torch.onnx.is_in_onnx_export()
        or torch.compiler.is_compiling()
    )


def check_input_multiple(images: torch.Tensor, owner: str, multiple: int, why: str) -> None:
    """Raise ``ValueError`` unless both image sides are positive multiples of ``multiple``.

    Args:
        images: (..., H, W) image batch (only its shape is read; a ``meta`` tensor works).
        owner: model name for the message (``"URD"``).
        multiple: the model's total stride.
        why: what makes the stride (``"the ResNet teacher and the bottleneck downsample by 32"``).
    """
    height, width = (int(side) for side in images.shape[-2:])
    if height < multiple or width < multiple or height % multiple or width % multiple:
        msg = (
            f"{owner} needs image sides that are multiples of {multiple} ({why}), got {height}x{width}. "
            f"Resize to e.g. {max(multiple, round(height / multiple) * multiple)}x"
            f"{max(multiple, round(width / multiple) * multiple)} with "
            f"{owner}.configure_pre_processor(image_size=(h, w)) / `--model.pre_processor`."
        )
        raise ValueError(msg)


def check_finite_images(images: torch.Tensor, owner: str) -> None:
    """Raise ``ValueError`` if ``images`` holds NaN or infinite values (skipped while exporting).

    A NaN input gives a NaN score, which anomalib's post-processor turns into ``pred_label=False``
    (normal): a silent wrong answer, so it is refused here, naming the images that hold such values.
    """
    if is_exporting():
        return
    finite = torch.isfinite(images)
    if bool(finite.all()):
        return
    bad = (~finite).flatten(1).sum(dim=1) if images.dim() > 1 else (~finite).sum().reshape(1)
    items = [int(i) for i in torch.nonzero(bad).flatten()]
    msg = (
        f"{owner} input images hold {int(bad.sum())} NaN/infinite value(s) (batch item(s) {items[:8]} of "
        f"{images.shape[0] if images.dim() > 1 else 1}); a NaN score would be labelled normal. Check how the "
        "tensor was made (image reader, pre-processing, division by zero)."
    )
    raise ValueError(msg)
