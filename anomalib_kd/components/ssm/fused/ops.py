"""The fused scan as a PyTorch operator (``torch.ops.anomalib_kd.selective_scan``) and its ONNX translation.

- Eager (CPU, f32, no autograd): runs the C++ kernel of ``selective_scan_op.cpp`` through ``ctypes``; when
  the extension is unavailable, the chunked pure-PyTorch scan (same results).
- Export: ``torch.onnx.export(..., custom_translation_table=onnx_translation_table())`` writes one node
  ``anomalib_kd::SelectiveScan`` (attribute ``delta_softplus``), which the extension's ONNX frontend
  conversion turns into the OpenVINO op of the same name.

The operator always takes all seven tensors (``D`` and ``delta_bias`` zero when absent) in f32, with
``B``/``C`` as ``(batch, G, N, L)`` or ``(batch, N, L)``; :func:`fused_selective_scan` fills them in.

``cross_width = w > 0`` is VMamba's cross-scan (SS2D): the ``L`` positions are a row-major ``(L / w) x w``
image, the ``G`` groups (a multiple of 4) are the 4 scan directions in :func:`~..ss2d.cross_scan`'s order,
and step ``s`` of direction ``k`` reads and writes position :func:`cross_scan_positions` ``[k, s]``. Every
direction's ``y`` comes back in row-major order, so the graph needs none of cross-scan's flips and
transposes (they were a third of VMamba's exported time, measured).
"""

from __future__ import annotations

import ctypes
import threading

import torch
from torch import Tensor

from .build import extension_path

__all__ = ["cross_scan_positions", "fused_selective_scan", "kernel_library", "onnx_translation_table"]

ONNX_DOMAIN = "anomalib_kd"
ONNX_OP = "SelectiveScan"

_lib_lock = threading.Lock()
_lib: dict[str, object] = {}  # "path": the library path loaded below, "lib": its ctypes handle


def kernel_library() -> ctypes.CDLL | None:
    """The extension loaded with ``ctypes`` (``None`` when it cannot be built or loaded)."""
    path = extension_path()
    with _lib_lock:
        if path is None:
            return None
        if _lib.get("path") != path:
            lib = ctypes.CDLL(str(path))
            ptr, i64 = ctypes.c_void_p, ctypes.c_int64
            lib.akd_selective_scan_f32.argtypes = [ptr] * 8 + [i64] * 5 + [ctypes.c_int, i64]
            lib.akd_selective_scan_f32.restype = ctypes.c_int
            lib.akd_arith_floor.argtypes = [i64]
            lib.akd_arith_floor.restype = ctypes.c_float
            lib.akd_simd_width.restype = ctypes.c_int
            _lib["path"], _lib["lib"] = path, lib
        return _lib["lib"]  # type: ignore[return-value]


def cross_scan_positions(seq_len: int, width: int) -> Tensor:
    """``(4, L)`` int64: position (row-major, ``L = h x width``) of step ``s`` of each SS2D scan direction.

    Directions as :func:`~anomalib_kd.components.ssm.ss2d.cross_scan`: row-major, column-major, and both
    reversed. Raises ``ValueError`` when ``width`` does not divide ``seq_len``.
    """
    if width <= 0 or seq_len % width:
        msg = f"cross_width must be a positive divisor of the sequence length {seq_len}, got {width}"
        raise ValueError(msg)
    height = seq_len // width
    rows = torch.arange(seq_len)
    cols = torch.arange(seq_len).reshape(height, width).t().reshape(-1)
    return torch.stack([rows, cols, rows.flip(0), cols.flip(0)])


def _cross_scan_torch(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Tensor,  # noqa: N803
                      delta_bias: Tensor, delta_softplus: bool, cross_width: int) -> Tensor:  # fmt: skip
    """Cross-scan mode without the kernel: gather each direction's order, pure-PyTorch scan, scatter back."""
    from ..selective_scan import selective_scan_torch

    batch, d, seq_len = u.shape
    groups = B.shape[1] if B.dim() == 4 else 1
    if groups % 4:
        msg = f"cross_width needs B/C grouped by scan direction (groups a multiple of 4), got {groups} groups"
        raise ValueError(msg)
    order = cross_scan_positions(seq_len, cross_width).to(u.device)  # (4, L)
    per_group = order.repeat_interleave(groups // 4, dim=0)  # (G, L)
    per_channel = per_group.repeat_interleave(d // groups, dim=0).expand(batch, d, seq_len)
    per_state = per_group[None, :, None].expand(B.shape)
    y = selective_scan_torch(
        u.gather(2, per_channel), delta.gather(2, per_channel), A, B.gather(3, per_state),
        C.gather(3, per_state), D, delta_bias, delta_softplus, recompute=False,
    )  # fmt: skip
    return torch.empty_like(y).scatter_(2, per_channel, y)


def _run_kernel(lib: ctypes.CDLL, u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor,  # noqa: N803
                D: Tensor, delta_bias: Tensor, delta_softplus: bool, cross_width: int = 0) -> Tensor:  # noqa: N803  # fmt: skip
    u, delta, A, B, C, D, delta_bias = (  # noqa: N806
        t.detach().to(torch.float32).contiguous() for t in (u, delta, A, B, C, D, delta_bias)
    )
    batch, d, seq_len = u.shape
    groups = B.shape[1] if B.dim() == 4 else 1
    if cross_width:
        cross_scan_positions(seq_len, cross_width)  # the same ValueError as the fallback path
        if groups % 4:
            msg = f"cross_width needs B/C grouped by scan direction (groups a multiple of 4), got {groups}"
            raise ValueError(msg)
    y = torch.empty_like(u)
    width = lib.akd_selective_scan_f32(
        u.data_ptr(), delta.data_ptr(), A.data_ptr(), B.data_ptr(), C.data_ptr(), D.data_ptr(),
        delta_bias.data_ptr(), y.data_ptr(), batch, d, seq_len, A.shape[1], groups, int(delta_softplus),
        cross_width,
    )  # fmt: skip
    if width < 0:
        msg = f"the fused scan refused cross_width={cross_width} for L={seq_len}, {groups} groups"
        raise ValueError(msg)
    return y


@torch.library.custom_op("anomalib_kd::selective_scan", mutates_args=(), device_types="cpu")
def selective_scan_op(
    u: Tensor,
    delta: Tensor,
    A: Tensor,  # noqa: N803
    B: Tensor,  # noqa: N803
    C: Tensor,  # noqa: N803
    D: Tensor,  # noqa: N803
    delta_bias: Tensor,
    delta_softplus: bool,
    cross_width: int = 0,
) -> Tensor:
    """Eq. (1)-(2) of :mod:`~anomalib_kd.components.ssm.selective_scan`, f32, all inputs present.

    ``cross_width > 0``: VMamba's four scan directions over a row-major image of that width (module doc).
    """
    lib = kernel_library()
    if lib is None:
        if cross_width:
            return _cross_scan_torch(u, delta, A, B, C, D, delta_bias, delta_softplus, cross_width)
        from ..selective_scan import selective_scan_torch

        return selective_scan_torch(u, delta, A, B, C, D, delta_bias, delta_softplus, recompute=False)
    return _run_kernel(lib, u, delta, A, B, C, D, delta_bias, delta_softplus, cross_width)


@selective_scan_op.register_fake
def _selective_scan_fake(u, delta, A, B, C, D, delta_bias, delta_softplus, cross_width=0):  # noqa: N803
    return torch.empty_like(u, dtype=torch.float32)


def fused_selective_scan(
    u: Tensor,
    delta: Tensor,
    A: Tensor,  # noqa: N803
    B: Tensor,  # noqa: N803
    C: Tensor,  # noqa: N803
    D: Tensor | None = None,  # noqa: N803
    delta_bias: Tensor | None = None,
    delta_softplus: bool = False,
    cross_width: int = 0,
) -> Tensor:
    """:func:`~anomalib_kd.components.ssm.selective_scan` through the fused operator (no autograd).

    Missing ``D`` / ``delta_bias`` become zeros (their exact no-op), inputs are cast to f32 and the result
    back to ``u``'s dtype. ``cross_width > 0``: SS2D's four directions over a row-major image of that width
    (module doc), ``B``/``C`` grouped by direction.
    """
    d = u.shape[1]
    zeros = u.new_zeros(d, dtype=torch.float32)
    f32 = [t.to(torch.float32) for t in (u, delta, A, B, C)]
    y = torch.ops.anomalib_kd.selective_scan(
        *f32,
        zeros if D is None else D.to(torch.float32),
        zeros if delta_bias is None else delta_bias.to(torch.float32),
        bool(delta_softplus),
        int(cross_width),
    )
    return y.to(u.dtype)


def _register_onnx_schema() -> None:
    """Register ``anomalib_kd::SelectiveScan`` (version 1) with ``onnx.defs``, once per process."""
    import onnx
    from onnx.defs import OpSchema

    try:
        onnx.defs.get_schema(ONNX_OP, 1, ONNX_DOMAIN)
    except onnx.defs.SchemaError:
        pass
    else:
        return
    param = OpSchema.FormalParameter
    schema = OpSchema(
        ONNX_OP,
        ONNX_DOMAIN,
        1,
        doc="Selective scan (Mamba S6) of anomalib_kd.components.ssm.selective_scan; f32.",
        inputs=[param(name, "T") for name in ("u", "delta", "A", "B", "C", "D", "delta_bias")],
        outputs=[param("y", "T")],
        type_constraints=[("T", ["tensor(float)"], "f32 only")],
        attributes=[
            OpSchema.Attribute("delta_softplus", OpSchema.AttrType.INT, "softplus(delta + bias)"),
            OpSchema.Attribute("cross_width", OpSchema.AttrType.INT, "SS2D cross-scan image width (0: off)"),
        ],
    )
    onnx.defs.register_schema(schema)


def onnx_translation_table() -> dict:
    """``custom_translation_table`` for ``torch.onnx.export(dynamo=True)``: the op as one custom node."""
    from onnxscript import values

    _register_onnx_schema()  # the exporter's op builder looks ops up by schema
    scan = getattr(values.Opset(ONNX_DOMAIN, 1), ONNX_OP)

    def selective_scan_onnx(u, delta, A, B, C, D, delta_bias, delta_softplus: bool = False,  # noqa: N803
                            cross_width: int = 0):  # fmt: skip
        return scan(
            u, delta, A, B, C, D, delta_bias, delta_softplus=int(delta_softplus), cross_width=int(cross_width)
        )

    return {torch.ops.anomalib_kd.selective_scan.default: selective_scan_onnx}
