"""Lanczos resize as a torchvision v2 transform, so D24FAD sees the inputs its official code fed.

The official code resizes with PIL's ``Image.LANCZOS`` (a = 3, the kernel widened by the
down-scaling factor, so it also low-passes) and feeds the result divided by 255, with no ImageNet
normalisation (spec part 2.4). torchvision resizes tensors only with nearest / bilinear / bicubic, so
this transform builds PIL's separable Lanczos weights as two small dense matrices from the input's
shape and multiplies: pure tensor operations, which trace into ONNX / OpenVINO graphs.

Differences to PIL on 8-bit images: PIL rounds to integers after each pass, this stays in float
(a few 1/255 apart at most; each pass is clipped to [0, 1] as PIL clips to [0, 255]).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torchvision import tv_tensors
from torchvision.transforms.v2 import InterpolationMode, Transform
from torchvision.transforms.v2 import functional as TF  # noqa: N812

LANCZOS_SUPPORT = 3.0  # PIL's lanczos filter support (a = 3)


def _sinc(x: torch.Tensor) -> torch.Tensor:
    """sin(pi x) / (pi x), 1 at 0 (written out: ``torch.sinc`` has no ONNX symbolic in every opset)."""
    safe = torch.where(x == 0, torch.ones_like(x), x)
    return torch.where(x == 0, torch.ones_like(x), torch.sin(math.pi * safe) / (math.pi * safe))


def lanczos_weights(
    in_size: int | torch.SymInt, out_size: int, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """(out_size, in_size) matrix of PIL's Lanczos-3 resampling along one axis, rows summing to 1.

    Output pixel i is centred at (i + 0.5) * scale in input coordinates (scale = in / out). Input pixel
    j gets lanczos((j + 0.5 - centre) / max(scale, 1)): the kernel is stretched when down-scaling.
    Tensor arithmetic only (no Python branch on ``in_size``), so a dynamic input size exports.
    """
    positions = torch.arange(in_size, dtype=dtype) + 0.5
    scale = (positions[-1] + 0.5) / out_size  # in_size / out_size as a tensor
    stretch = scale.clamp(min=1.0)
    centres = (torch.arange(out_size, dtype=dtype) + 0.5) * scale
    offsets = (positions.unsqueeze(0) - centres.unsqueeze(1)) / stretch
    weights = _sinc(offsets) * _sinc(offsets / LANCZOS_SUPPORT)
    weights = torch.where(offsets.abs() < LANCZOS_SUPPORT, weights, torch.zeros_like(weights))
    return weights / weights.sum(dim=1, keepdim=True)


def lanczos_resize(images: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """Resize (..., H, W) float images in [0, 1] to ``size`` (h, w) with PIL's Lanczos-3.

    As PIL: the horizontal pass first, each pass clipped to the value range (Lanczos overshoots).
    """
    height, width = images.shape[-2:]
    rows = lanczos_weights(height, int(size[0])).to(images.device, images.dtype)
    columns = lanczos_weights(width, int(size[1])).to(images.device, images.dtype)
    horizontal = (images @ columns.transpose(0, 1)).clamp(0.0, 1.0)
    return (rows @ horizontal).clamp(0.0, 1.0)


class LanczosResize(Transform):
    """Resize images with PIL's Lanczos-3 (masks: nearest). ``size``: (height, width) or one side.

    Args:
        size: output size; an int gives a square.
    """

    def __init__(self, size: int | Sequence[int]) -> None:
        super().__init__()
        self.size = [int(size), int(size)] if isinstance(size, int) else [int(s) for s in size]
        if len(self.size) != 2:
            msg = f"LanczosResize size must be an int or (height, width), got {size!r}."
            raise ValueError(msg)

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        del params
        if isinstance(inpt, tv_tensors.Mask):
            return TF.resize(inpt, self.size, interpolation=InterpolationMode.NEAREST)
        if isinstance(inpt, tv_tensors.TVTensor):
            return tv_tensors.wrap(lanczos_resize(inpt.as_subclass(torch.Tensor), self.size), like=inpt)
        if isinstance(inpt, torch.Tensor):  # plain tensors (the exported graph): no subclass round trip
            return lanczos_resize(inpt, self.size)
        return inpt


def register_for_checkpoints() -> None:
    """Let anomalib store and restore this transform in checkpoints (its allow-list of transforms).

    anomalib writes the pre-processor's transform as plain data only for allow-listed classes; without
    this a restored D24FAD would fall back to the default 128 px transform.
    """
    from anomalib.pre_processing.utils._transform_registry import TRANSFORM_REGISTRY

    TRANSFORM_REGISTRY.register(LanczosResize, f"{LanczosResize.__module__}.LanczosResize")
