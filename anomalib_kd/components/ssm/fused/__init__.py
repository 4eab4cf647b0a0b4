"""Fused selective scan for CPU inference: an OpenVINO extension (and the same kernel for eager PyTorch).

The recurrence of :func:`~anomalib_kd.components.ssm.selective_scan` as one C++ operator
(``selective_scan_op.cpp``): vectorised over channels, parallel over batch x direction x channel blocks,
built on first use for this machine (:mod:`.build`; no compiler at install time). When it cannot be built
or loaded, everything here falls back to the pure-operation scan with one warning log line.

- :func:`use_fused_scan`: context in which CPU scans run the fused kernel (eager, no autograd) and traced
  scans export as one ``anomalib_kd::SelectiveScan`` node.
- :func:`export_openvino`: anomalib's ONNX export, then an OpenVINO IR; ``fused=True`` gives an IR with the
  fused op (it needs the extension to load: :func:`add_extension`, :func:`read_model`); the default is
  the portable IR (pure operations, any OpenVINO runtime, anomalib's ``OpenVINOInferencer``).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ..selective_scan import _FUSED_SCAN
from .build import extension_path, unavailable_reason
from .ops import fused_selective_scan, kernel_library, onnx_translation_table

logger = logging.getLogger(__name__)

__all__ = [
    "add_extension",
    "export_openvino",
    "extension_path",
    "fused_selective_scan",
    "kernel_library",
    "read_model",
    "unavailable_reason",
    "use_fused_scan",
]

FUSED_OP_TYPE = "SelectiveScan"
HOW_TO_LOAD = (
    "add the fused-scan extension to the ov.Core first: "
    "anomalib_kd.components.ssm.fused.add_extension(core), i.e. core.add_extension(<file printed by "
    "`python -c 'from anomalib_kd.components.ssm.fused import extension_path; print(extension_path())'`>)"
)


@contextlib.contextmanager
def use_fused_scan(enabled: bool = True) -> Iterator[bool]:
    """Run (and export) scans through the fused operator inside the ``with`` block.

    Yields whether the fused operator is really in use: ``False`` when ``enabled`` is false or the
    extension cannot be built/loaded (then logged once, and the pure-operation scan runs).
    """
    active = enabled and kernel_library() is not None
    token = _FUSED_SCAN.set(active)
    try:
        yield active
    finally:
        _FUSED_SCAN.reset(token)


def add_extension(core: Any) -> Path:
    """``core.add_extension(<fused-scan library>)``, building it on first use; returns the library's path.

    Raises:
        RuntimeError: the extension cannot be built or loaded on this machine (the reason is given).
    """
    path = extension_path()
    if path is None:
        msg = f"the fused selective-scan extension is unavailable here ({unavailable_reason()})"
        raise RuntimeError(msg)
    core.add_extension(str(path))
    return path


def is_fused_ir(xml: str | Path) -> bool:
    """Whether the IR ``xml`` holds the fused selective-scan op (and so needs the extension to be read)."""
    return f'type="{FUSED_OP_TYPE}"' in Path(xml).read_text(errors="ignore")


def read_model(xml: str | Path, core: Any = None) -> Any:
    """``core.read_model(xml)`` for portable and fused IRs alike (adds the extension when the IR needs it).

    A fused IR that cannot be read (extension unavailable) raises a ``RuntimeError`` saying what to add.
    """
    import openvino as ov

    core = core if core is not None else ov.Core()
    if is_fused_ir(xml):
        try:
            add_extension(core)
        except RuntimeError as exc:
            msg = (
                f"{xml} uses the fused selective scan (op anomalib_kd::{FUSED_OP_TYPE}): {HOW_TO_LOAD}. {exc}"
            )
            raise RuntimeError(msg) from exc
    return core.read_model(str(xml))


def _annotate_fused_nodes(model: Any, library: Path) -> int:
    """Name each fused node after the file that loads it, so that OpenVINO's own error for an IR read
    without the extension ("Cannot create SelectiveScan layer <name> ...") says which file to add; the
    path also goes to the model's ``rt_info``. Returns the number of fused nodes."""
    count = 0
    for node in model.get_ordered_ops():
        if node.get_type_name() == FUSED_OP_TYPE:
            node.set_friendly_name(
                f"selective_scan_{count} (needs core.add_extension('{library}'), "
                "see anomalib_kd.components.ssm.fused.add_extension)"
            )
            count += 1
    if count:
        model.set_rt_info(str(library), ["anomalib_kd", "fused_scan_extension"])
    return count


def export_openvino(
    model: Any,
    export_root: str | Path,
    input_size: tuple[int, int] | None = None,
    *,
    fused: bool = False,
    model_file_name: str = "model",
    onnx_kwargs: dict[str, Any] | None = None,
    compression_type: Any = None,
    datamodule: Any = None,
    metric: Any = None,
    task: Any = None,
    max_drop: float = 0.01,
) -> Path:
    """Export an anomalib module to an OpenVINO IR in ``export_root/weights/openvino``.

    ``fused=False`` is anomalib's ``to_openvino`` (portable). ``fused=True`` exports every selective scan
    as the fused op: anomalib's ``to_onnx`` with the custom-domain node, then ``ov.convert_model`` with the
    extension (its ONNX frontend conversion). If the extension is unavailable, the portable IR is written
    instead (one warning logged). Load a fused IR with :func:`read_model` or :func:`add_extension`.

    ``compression_type`` (anomalib's ``CompressionType``; with ``datamodule``, ``metric``, ``task``,
    ``max_drop`` as in ``to_openvino``) compresses either IR the way anomalib's exporter does: FP16 weights,
    or the model's own ``_compress_ov_model`` (NNCF, with the model's float scope,
    :class:`~anomalib_kd.components.export.OpenVINOQuantizationMixin`). NNCF compiles the graph for its
    statistics; the fused op carries its own implementation, so that works in NNCF's own ``ov.Core``.
    """
    import tempfile

    import openvino as ov
    from anomalib.deploy import CompressionType

    onnx_kwargs = dict(onnx_kwargs or {})
    library = extension_path() if fused else None
    if library is None:
        return model.to_openvino(
            export_root, model_file_name, input_size, compression_type=compression_type,
            datamodule=datamodule, metric=metric, task=task, max_drop=max_drop,
            onnx_kwargs=onnx_kwargs or None,
        )  # fmt: skip
    onnx_kwargs["custom_translation_table"] = {
        **onnx_translation_table(),
        **onnx_kwargs.get("custom_translation_table", {}),
    }
    out_dir = Path(export_root) / "weights" / "openvino"
    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp, use_fused_scan():
        onnx_path = model.to_onnx(tmp, model_file_name, input_size, **onnx_kwargs)
        ov_model = ov.convert_model(onnx_path, extension=str(library))
    fp16 = compression_type == CompressionType.FP16
    if compression_type is not None and not fp16:  # before the renaming: the float scope maps node names
        ov_model = model._compress_ov_model(ov_model, compression_type, datamodule, metric, task, max_drop)
    count = _annotate_fused_nodes(ov_model, library)
    logger.info("Fused OpenVINO IR: %d selective scans as %s", count, FUSED_OP_TYPE)
    xml = out_dir / f"{model_file_name}.xml"
    ov.save_model(ov_model, xml, compress_to_fp16=fp16)
    return xml
