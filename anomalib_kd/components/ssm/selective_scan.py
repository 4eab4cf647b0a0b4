"""Selective scan (the Mamba S6 recurrence) in pure PyTorch, with an optional mamba-ssm CUDA backend.

The recurrence, per channel ``d`` and state index ``n`` (Gu & Dao 2023, eq. 2a/2b with ZOH on A and Euler
on B as in mamba-ssm)::

    h_t = exp(delta_t * A) * h_{t-1} + delta_t * B_t * u_t        (1)
    y_t = <C_t, h_t> + D * u_t                                     (2)

The pure path is a two-level chunked scan. The sequence (length ``L``, padded to ``nc * T``) is cut into
``nc`` chunks of ``T`` steps, and every loop below runs over *all chunks at once*:

1. local pass: run (1) for ``T`` steps with a zero initial state, giving each chunk's final local state,
   and the chunk decay ``exp(A * sum_t delta_t)`` (exponent <= 0);
2. carry pass: ``H_c = decay_c * H_{c-1} + local_c`` over the ``nc`` chunks (tiny tensors);
3. output pass: run (1) again for ``T`` steps from the carried states ``H_{c-1}`` and read out (2).

So there are ``2T + nc`` sequential steps instead of ``L`` (192 at ``L=4096``, ``T=64``), each step works
on a ``(batch, d, N, nc)`` tensor (``L/T`` times smaller than a ``(d, N, L)`` one), every exponent is
``delta * A <= 0`` (no ``exp(-S)``: stable in f32), and there is no ``Scan``/``Loop`` node in an exported
graph (OpenVINO 2026.4 mis-runs ONNX ``Scan``): the short loops unroll at export. The step decays
``exp(delta_t A)`` are computed once, in one wide op, and shared by passes 1 and 3 (half the exponentials;
the exported scan ran 2x faster in OpenVINO for one ``(d, N, L)``-sized buffer).
"""

from __future__ import annotations

import contextvars
import math

import torch
from torch import Tensor
from torch.nn import functional as F  # noqa: N812
from torch.utils.checkpoint import checkpoint

try:  # optional CUDA kernel (``pip install anomalib-kd[mamba-cuda-kernels]``)
    from mamba_ssm.ops.selective_scan_interface import selective_scan_fn as _mamba_selective_scan_fn
except ImportError:  # pragma: no cover - depends on the environment
    _mamba_selective_scan_fn = None

__all__ = ["auto_chunk_size", "mamba_ssm_available", "selective_scan", "selective_scan_torch"]

# Set by anomalib_kd.components.ssm.fused.use_fused_scan (only when the extension is built and loads):
# CPU scans outside autograd run the fused C++ kernel, and traced (exported) scans become one
# anomalib_kd::selective_scan node. Off by default: exports stay portable.
_FUSED_SCAN = contextvars.ContextVar("anomalib_kd_fused_scan", default=False)


def fused_scan_enabled() -> bool:
    """Whether the fused scan was switched on for this context (:func:`~.fused.use_fused_scan`)."""
    return _FUSED_SCAN.get()


def mamba_ssm_available() -> bool:
    """Whether mamba-ssm's fused ``selective_scan_fn`` could be imported."""
    return _mamba_selective_scan_fn is not None


def uses_fused_kernel(u: Tensor) -> bool:
    """Whether ``backend="auto"`` runs mamba-ssm's kernel for ``u``: importable, on CUDA, not tracing."""
    return _mamba_selective_scan_fn is not None and u.is_cuda and not _is_tracing()


def _is_tracing() -> bool:
    """True while torch.export / torch.compile / TorchScript / ONNX tracing is running."""
    return (
        torch.compiler.is_compiling()
        or torch.compiler.is_exporting()
        or torch.jit.is_tracing()
        or torch.jit.is_scripting()
        or torch.onnx.is_in_onnx_export()
    )


def _use_fused_op(*tensors: Tensor | None) -> bool:
    """``backend="auto"`` inside ``use_fused_scan``: CPU, and tracing or no gradient needed (the fused
    operator has no backward; training keeps the chunked scan)."""
    if not _FUSED_SCAN.get() or tensors[0].is_cuda:
        return False
    if _is_tracing():
        return True
    return not (torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors))


def auto_chunk_size(seq_len: int) -> int:
    """Chunk length ``T``: the power of two nearest above ``sqrt(L)``, clamped to [4, 64].

    ``T ~ sqrt(L)`` balances the ``2T`` within-chunk steps against the ``L/T`` carry steps, which keeps
    the unrolled export graph small (about 900 scan nodes at ``L=4096``) and the eager run fast.
    """
    t = 1 << max(0, math.ceil(math.log2(math.sqrt(max(seq_len, 1)))))
    return min(64, max(4, t))


def selective_scan(
    u: Tensor,
    delta: Tensor,
    A: Tensor,  # noqa: N803 - the paper's and mamba-ssm's names
    B: Tensor,  # noqa: N803
    C: Tensor,  # noqa: N803
    D: Tensor | None = None,  # noqa: N803
    delta_bias: Tensor | None = None,
    delta_softplus: bool = False,
    *,
    chunk_size: int | None = None,
    backend: str = "auto",
) -> Tensor:
    """Selective scan with mamba-ssm's ``selective_scan_fn`` layout and results (eq. 1-2 above).

    Args:
        u: input, ``(batch, d, L)``.
        delta: step sizes before bias/softplus, ``(batch, d, L)``.
        A: real state matrix diagonal, ``(d, N)`` (VMamba/Mamba pass ``-exp(A_log)``).
        B: input projection, ``(batch, G, N, L)`` shared by groups of ``d // G`` channels,
            or ``(batch, N, L)``.
        C: output projection, same layout as ``B``.
        D: skip weight ``(d,)``, adds ``D * u``.
        delta_bias: ``(d,)``, added to ``delta`` before the softplus.
        delta_softplus: apply ``softplus`` to ``delta + delta_bias``.
        chunk_size: within-chunk length ``T`` of the pure path (default: :func:`auto_chunk_size`).
        backend: ``"auto"`` (mamba-ssm on CUDA when importable and not tracing; inside
            :func:`~anomalib_kd.components.ssm.fused.use_fused_scan`, the fused CPU operator when tracing
            or when no input needs a gradient), ``"torch"``, ``"mamba"`` or ``"fused"`` (the fused
            operator, built on first use; without the extension it falls back to the pure scan).

    Returns:
        ``y`` of shape ``(batch, d, L)`` in ``u``'s dtype (the pure path computes in f32 or f64).
    """
    if backend not in {"auto", "torch", "mamba", "fused"}:
        msg = f"backend must be 'auto', 'torch', 'mamba' or 'fused', got {backend!r}"
        raise ValueError(msg)
    if backend == "fused" or (backend == "auto" and _use_fused_op(u, delta, A, B, C, D, delta_bias)):
        from .fused.ops import fused_selective_scan

        return fused_selective_scan(u, delta, A, B, C, D, delta_bias, delta_softplus)
    use_mamba = backend == "mamba" or (backend == "auto" and uses_fused_kernel(u))
    if use_mamba:
        if _mamba_selective_scan_fn is None:
            msg = "backend='mamba' needs mamba-ssm (pip install anomalib-kd[mamba-cuda-kernels])"
            raise RuntimeError(msg)
        return _mamba_selective_scan_fn(
            u, delta, A, B, C, D, z=None, delta_bias=delta_bias, delta_softplus=delta_softplus
        )
    return selective_scan_torch(u, delta, A, B, C, D, delta_bias, delta_softplus, chunk_size=chunk_size)


def selective_scan_torch(
    u: Tensor,
    delta: Tensor,
    A: Tensor,  # noqa: N803
    B: Tensor,  # noqa: N803
    C: Tensor,  # noqa: N803
    D: Tensor | None = None,  # noqa: N803
    delta_bias: Tensor | None = None,
    delta_softplus: bool = False,
    *,
    chunk_size: int | None = None,
    recompute: bool | None = None,
    segment_len: int = 1024,
) -> Tensor:
    """Pure-PyTorch chunked selective scan (module docstring); arguments as in :func:`selective_scan`.

    ``recompute`` (default: on when autograd records and not tracing) runs the sequence in segments of
    ``segment_len`` steps, each checkpointed and started from the previous segment's final state: the
    forward keeps only inputs and ``(d, N)`` states, and the backward rebuilds one segment's graph at a
    time, so its memory is bounded by ``segment_len`` instead of ``L``.
    """
    if A.is_complex():
        msg = "complex A is not supported"
        raise NotImplementedError(msg)
    if u.dim() != 3 or delta.shape != u.shape:
        msg = f"u and delta must both be (batch, d, L); got {tuple(u.shape)} and {tuple(delta.shape)}"
        raise ValueError(msg)
    batch, d, seq_len = u.shape
    if A.dim() != 2 or A.shape[0] != d:
        msg = f"A must be (d={d}, N); got {tuple(A.shape)}"
        raise ValueError(msg)
    n_state = A.shape[1]
    if B.dim() == 3:  # (batch, N, L): one group
        B = B.unsqueeze(1)  # noqa: N806
    if C.dim() == 3:
        C = C.unsqueeze(1)  # noqa: N806
    groups = B.shape[1]
    if B.shape != (batch, groups, n_state, seq_len) or C.shape != B.shape or d % groups:
        msg = (
            f"B and C must be (batch, G, N, L) or (batch, N, L) with d % G == 0; got B {tuple(B.shape)}, "
            f"C {tuple(C.shape)} for u {tuple(u.shape)}, N={n_state}"
        )
        raise ValueError(msg)

    out_dtype = u.dtype
    # The recurrence runs in (at least) f32 like mamba-ssm's kernel; f64 inputs stay f64.
    work = torch.float64 if torch.float64 in (u.dtype, delta.dtype, A.dtype) else torch.float32
    u_w, delta = u.to(work), delta.to(work)
    if delta_bias is not None:
        delta = delta + delta_bias.to(work)[:, None]
    if delta_softplus:
        delta = F.softplus(delta)

    A, B, C = A.to(work), B.to(work), C.to(work)  # noqa: N806
    if recompute is None:
        recompute = torch.is_grad_enabled() and not _is_tracing()
    if recompute and any(t.requires_grad for t in (u_w, delta, A, B, C)):
        seg = max(1, segment_len)
        tsz = chunk_size if chunk_size is not None else auto_chunk_size(min(seq_len, seg))
        state = u_w.new_zeros(batch, d, n_state)
        parts = []
        for start in range(0, seq_len, seg):
            sl = slice(start, start + seg)
            y_s, state = checkpoint(
                _chunked_scan_core,
                u_w[..., sl],
                delta[..., sl],
                A,
                B[..., sl],
                C[..., sl],
                tsz,
                state,
                use_reentrant=False,
            )
            parts.append(y_s)
        y = torch.cat(parts, dim=-1) if len(parts) > 1 else parts[0]
    else:
        tsz = chunk_size if chunk_size is not None else auto_chunk_size(seq_len)
        y, _ = _chunked_scan_core(u_w, delta, A, B, C, tsz, None)
    if D is not None:
        y = y + u_w * D.to(work)[:, None]
    return y.to(out_dtype)


def _chunked_scan_core(
    u: Tensor,
    delta: Tensor,
    A: Tensor,  # noqa: N803
    B: Tensor,  # noqa: N803
    C: Tensor,  # noqa: N803
    tsz: int,
    h0: Tensor | None,
) -> tuple[Tensor, Tensor]:
    """Eq. (1)-(2) without ``D``, from state ``h0`` ``(batch, d, N)`` (None: zeros); ``delta`` already final.

    Returns ``y`` ``(batch, d, L)`` and the final state ``(batch, d, N)``.
    """
    batch, d, seq_len = u.shape
    groups, n_state = B.shape[1], B.shape[2]
    dg = d // groups
    n_chunks = -(-seq_len // tsz)
    pad = n_chunks * tsz - seq_len
    x = delta * u  # the Euler input term delta_t * u_t of eq. (1)
    if pad:
        # delta = 0 and x = 0 make the padded steps identities (decay 1, no input): earlier outputs unchanged.
        delta = F.pad(delta, (0, pad))
        x = F.pad(x, (0, pad))
        B = F.pad(B, (0, pad))  # noqa: N806
        C = F.pad(C, (0, pad))  # noqa: N806

    # Step-major layouts so that each step reads one contiguous slab; the state is (b, G, nc, N, dg): the
    # channel axis innermost, so the decay/input updates are wide vector ops and the readout over N is a
    # small MatMul (a ReduceSum over a length-16 innermost axis was ~30 % of the exported scan's time).
    def per_channel(t: Tensor) -> Tensor:  # (b, d, nc*T) -> (T, b, G, nc, 1, dg)
        return t.reshape(batch, groups, dg, n_chunks, tsz).permute(4, 0, 1, 3, 2).unsqueeze(-2).contiguous()

    def per_group(t: Tensor) -> Tensor:  # (b, G, N, nc*T) -> (T, b, G, nc, N, 1)
        return (
            t.reshape(batch, groups, n_state, n_chunks, tsz).permute(4, 0, 1, 3, 2).unsqueeze(-1).contiguous()
        )

    delta_s, x_s, b_s = per_channel(delta), per_channel(x), per_group(B)
    c_s = per_group(C).transpose(-1, -2)  # (T, b, G, nc, 1, N): the readout row of each step
    a_g = A.reshape(groups, 1, dg, n_state).transpose(-1, -2)  # (G, 1, N, dg), broadcasts against the state
    if h0 is not None:  # (b, d, N) -> (1, b, G, 1, N, dg), the layout of one chunk's state
        h0 = h0.reshape(1, batch, groups, 1, dg, n_state).transpose(-1, -2)
    y, h = scan_chunk_steps(delta_s, x_s, b_s, c_s, a_g, h0)
    y = (
        y.squeeze(-2).permute(1, 2, 4, 3, 0).reshape(batch, d, n_chunks * tsz)
    )  # (T, b, G, nc, dg) -> (b, d, L)
    # Padded steps are identities, so the last chunk's state after T steps is the state at step L - 1.
    last = h[:, :, -1].transpose(-1, -2).reshape(batch, d, n_state)
    return (y[..., :seq_len] if pad else y), last


def scan_chunk_steps(
    delta: Tensor,
    x: Tensor,
    B: Tensor,  # noqa: N803
    C: Tensor,  # noqa: N803
    a_g: Tensor,
    h0: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """The three passes of the module docstring on inputs already cut into chunks, step-major.

    Args:
        delta: step sizes (final: bias and softplus applied), ``(T, b, G, nc, 1, dg)``: step ``t`` of
            chunk ``c`` is sequence position ``c * T + t``.
        x: the Euler input ``delta * u``, same layout.
        B: ``(T, b, G, nc, N, 1)``.
        C: ``(T, b, G, nc, 1, N)``.
        a_g: ``A`` as ``(G, 1, N, dg)``.
        h0: state before the first step, ``(1, b, G, 1, N, dg)`` (None: zeros).

    Returns:
        ``y`` without ``D``, ``(T, b, G, nc, 1, dg)``, and the states after each chunk's last step
        ``(b, G, nc, N, dg)``.
    """
    tsz, n_chunks = delta.shape[0], delta.shape[3]
    # All step decays exp(delta_t A) at once, shared by both passes: one wide Exp instead of two per step
    # (half the exponentials, and 2x faster in OpenVINO at L=4096), at the cost of one (d, N, L) tensor.
    decays = torch.exp(delta * a_g)
    # split(1) keeps the leading size-1 dim: one Split node per tensor in ONNX, no per-step Gather/Squeeze.
    das, xs, bs, cs = (t.split(1, dim=0) for t in (decays, x, B, C))

    # 1. local pass: final state of every chunk from a zero state (h_{-1} = 0 -> h_0 = x_0 B_0).
    h = xs[0] * bs[0]
    for t in range(1, tsz):
        # addcmul broadcasts the outer product B_t (N) x x_t (dg) without materialising it first.
        h = torch.addcmul(das[t] * h, xs[t], bs[t])
    decay = torch.exp(delta.sum(0, keepdim=True) * a_g)  # prod_t exp(delta_t A) = exp(A sum_t delta_t)

    # 2. carry pass over chunks: H_c = decay_c H_{c-1} + h_c; chunk c starts from H_{c-1} (H_{-1} = 0).
    if n_chunks > 1:
        local, dec = h.split(1, dim=3), decay.split(1, dim=3)
        carried = [torch.zeros_like(local[0]) if h0 is None else h0]
        for c in range(n_chunks - 1):
            carried.append(dec[c] * carried[-1] + local[c])
        h = torch.cat(carried, dim=3)
    else:
        h = torch.zeros_like(h) if h0 is None else h0.expand_as(h)

    # 3. output pass: eq. (1) from the carried state, then y_t = <C_t, h_t> (a (1, N) x (N, dg) MatMul).
    ys = []
    for t in range(tsz):
        h = torch.addcmul(das[t] * h, xs[t], bs[t])
        ys.append(torch.matmul(cs[t], h))
    return torch.cat(ys, dim=0), h[0]
