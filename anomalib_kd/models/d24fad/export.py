"""Swappable-supports export of D24FAD: the K supports' student features are graph inputs.

The default ``anomalib export`` bakes the supports into the graph (single input). Here the graph has
four inputs: ``input`` (B, 3, H, W) raw images in [0, 1], as for the default export, and
``support_0..2``, the supports' student features (K, C_l, h_l, w_l) at the model's three levels, with K
free. The features come from a small ``.npz`` file (:func:`save_support_features`), computed once per
support set with the checkpoint's weights and loaded next to the IR at run time; swapping supports is
swapping that file. Scores equal those of a re-export with the new supports baked in.

The post-processing (normalisation and thresholds) is the one fitted during training, as in a
re-export; for a new product the raw scores may need new thresholds.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from anomalib.deploy import ExportType
from torch import nn

from .torch_model import N_LEVELS

if TYPE_CHECKING:
    from .lightning_model import D24FAD

SUPPORT_INPUTS = tuple(f"support_{level}" for level in range(N_LEVELS))
FILE_FORMAT = "d24fad-support-features/1"


class SupportFeatureInputs(nn.Module):
    """pre-processor -> D24FAD scoring against given support features -> post-processor."""

    def __init__(self, module: D24FAD) -> None:
        super().__init__()
        self.module = module

    def forward(
        self, image: torch.Tensor, support_0: torch.Tensor, support_1: torch.Tensor, support_2: torch.Tensor
    ) -> Any:  # anomalib InferenceBatch
        module = self.module
        image = module.pre_processor(image) if module.pre_processor else image
        prediction = module.model.predict(image, [support_0, support_1, support_2])
        return module.post_processor(prediction) if module.post_processor else prediction


def support_features(module: D24FAD) -> list[torch.Tensor]:
    """The module's current support features (eval-mode, matching its weights)."""
    if not module.model.has_supports:
        msg = "D24FAD has no supports: call set_supports(...) / give support_dir first."
        raise RuntimeError(msg)
    module.model.refresh_support_features()
    return [feature.detach().cpu() for feature in module.model.support_features]


def save_support_features(module: D24FAD, path: str | Path, sources: Sequence[str] = ()) -> Path:
    """Write the module's current support features to ``path`` (``.npz``, float32)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    features = support_features(module)
    np.savez(
        path,
        format=np.array(FILE_FORMAT),
        backbone=np.array(module.model.backbone),
        input_size=np.array(module.input_size or (0, 0)),
        sources=np.array([str(s) for s in sources]),
        **{name: f.numpy().astype(np.float32) for name, f in zip(SUPPORT_INPUTS, features, strict=True)},
    )
    return path


def load_support_features(path: str | Path) -> dict[str, np.ndarray]:
    """``{support_0: (K, C0, h0, w0), ...}`` from a file written by :func:`save_support_features`."""
    with np.load(Path(path), allow_pickle=False) as data:
        if "format" not in data or str(data["format"]) != FILE_FORMAT:
            msg = f"{path} is not a D24FAD support-feature file ({FILE_FORMAT})."
            raise ValueError(msg)
        features = {name: data[name].astype(np.float32) for name in SUPPORT_INPUTS}
    k_shots = {f.shape[0] for f in features.values()}
    if len(k_shots) != 1:
        msg = f"{path}: the three support levels disagree on K ({sorted(k_shots)})."
        raise ValueError(msg)
    return features


def export_swappable(
    module: D24FAD,
    export_root: str | Path,
    export_type: ExportType | str = ExportType.OPENVINO,
    input_size: tuple[int, int] | None = None,
    model_file_name: str = "model",
) -> Path:
    """Export ``module`` with support features as inputs (ONNX or OpenVINO IR, f32); returns the file.

    Also writes the module's current supports as ``supports.npz`` next to the model, so the export runs
    as it is; replace that file (``python -m anomalib_kd.tools.d24fad_supports features``) to swap.
    """
    from anomalib.models.components.base.export_mixin.mixin import create_export_root

    export_type = ExportType(export_type)
    if export_type not in (ExportType.ONNX, ExportType.OPENVINO):
        msg = f"Swappable-supports export is ONNX or OpenVINO, not {export_type.value}."
        raise ValueError(msg)
    features = support_features(module)
    module.eval()
    wrapper = SupportFeatureInputs(module).eval()
    height, width = input_size or (256, 256)
    image = torch.zeros(2, 3, height, width, device=module.device)
    # Example K = 2 (size 1 would be specialised by dynamo); the exported K is free.
    examples = tuple(torch.cat([f, f])[:2].to(module.device) if f.shape[0] < 2 else f[:2] for f in features)
    with torch.no_grad():
        output_names = [
            name for name, value in wrapper(image, *examples)._asdict().items() if value is not None
        ]
    batch, k_shot = torch.export.Dim("batch_size"), torch.export.Dim("k_shot")
    image_shape: dict[int, Any] = {0: batch}
    if input_size is None:
        image_shape.update({2: torch.export.Dim("height"), 3: torch.export.Dim("width")})
    dynamic_shapes = {"image": image_shape, **{name: {0: k_shot} for name in SUPPORT_INPUTS}}

    root = create_export_root(export_root, export_type)
    onnx_path = root / f"{model_file_name}.onnx"
    if export_type == ExportType.OPENVINO:
        import tempfile

        tmp = tempfile.TemporaryDirectory()
        onnx_path = Path(tmp.name) / f"{model_file_name}.onnx"
    torch.onnx.export(
        wrapper,
        (image, *examples),
        str(onnx_path),
        input_names=["input", *SUPPORT_INPUTS],
        output_names=output_names,
        dynamo=True,
        dynamic_shapes=dynamic_shapes,
        opset_version=18,
    )
    path = onnx_path
    if export_type == ExportType.OPENVINO:
        import openvino as ov

        path = root / f"{model_file_name}.xml"
        ov.save_model(ov.convert_model(onnx_path), path, compress_to_fp16=False)
        tmp.cleanup()
    save_support_features(module, root / "supports.npz")
    return path


def run_swappable(
    model_path: str | Path,
    supports: str | Path | dict[str, np.ndarray],
    images: np.ndarray,
    device: str = "CPU",
) -> dict[str, np.ndarray]:
    """Run a swappable export (``.xml`` / ``.onnx``) with OpenVINO, f32, on (B, 3, H, W) images in [0, 1]."""
    import openvino as ov

    features = supports if isinstance(supports, dict) else load_support_features(supports)
    compiled = ov.Core().compile_model(str(model_path), device, {"INFERENCE_PRECISION_HINT": "f32"})
    result = compiled({"input": images.astype(np.float32), **features})
    return {output.get_any_name(): result[output] for output in compiled.outputs}
