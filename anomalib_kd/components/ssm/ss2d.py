"""SS2D, VMamba's 2-D selective-scan module (v0 semantics), and its cross-scan / cross-merge helpers.

Liu et al., "VMamba: Visual State Space Model" (2024), SS2D: the feature map is unfolded into ``K = 4``
sequences (row-major, column-major and both reversed), each runs the selective scan of
:func:`~anomalib_kd.components.ssm.selective_scan.selective_scan` with its own projections, and the four
results are folded back and summed. Parameter names follow the official v0 checkpoint
(``in_proj``, ``conv2d``, ``x_proj_weight``, ``dt_projs_weight``, ``dt_projs_bias``, ``A_logs``, ``Ds``,
``out_norm``, ``out_proj``), so VMamba weights load after the key renames of
:func:`~anomalib_kd.components.ssm.vmamba.convert_vmamba_v0_state_dict`.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from .selective_scan import (
    _is_tracing,
    _use_fused_op,
    fused_scan_enabled,
    scan_chunk_steps,
    selective_scan,
    uses_fused_kernel,
)

__all__ = ["SS2D", "cross_merge", "cross_scan"]


def cross_scan(x: Tensor) -> Tensor:
    """Unfold ``(B, C, H, W)`` into the 4 VMamba scan orders, ``(B, 4, C, H*W)``.

    Order: row-major, column-major (H and W transposed), row-major reversed, column-major reversed.
    """
    batch, channels, height, width = x.shape
    rows = x.reshape(batch, channels, height * width)
    cols = x.transpose(2, 3).reshape(batch, channels, height * width)
    fwd = torch.stack([rows, cols], dim=1)
    return torch.cat([fwd, fwd.flip(-1)], dim=1)


def cross_merge(ys: Tensor, height: int, width: int) -> Tensor:
    """Fold the 4 scan outputs ``(B, 4, C, H*W)`` back to row-major order and sum them: ``(B, C, H*W)``.

    The adjoint of :func:`cross_scan`: reversed directions are flipped back, column-major ones transposed.
    """
    batch, _, channels, seq_len = ys.shape
    pair = ys[:, 0:2] + ys[:, 2:4].flip(-1)  # undo the reversal of directions 2 and 3
    cols = (
        pair[:, 1].reshape(batch, channels, width, height).transpose(2, 3).reshape(batch, channels, seq_len)
    )
    return pair[:, 0] + cols


class SS2D(nn.Module):
    """VMamba SS2D (``forward_type="v0"``), channels-last ``(B, H, W, d_model) -> (B, H, W, d_model)``.

    Data flow: ``in_proj`` to ``(x, z)``; ``x`` -> depthwise conv -> SiLU -> :func:`cross_scan`; per
    direction ``k``: ``x_proj`` to ``(dt, B, C)`` (ranks ``R, N, N``), ``delta = softplus(dt_proj(dt) +
    bias)``, selective scan with ``A = -exp(A_logs)`` and skip ``Ds``; :func:`cross_merge`; ``out_norm``
    LayerNorm; gate by ``SiLU(z)``; ``out_proj``; dropout.

    Args:
        d_model: input/output channels ``C``.
        d_state: state size ``N`` (16 in VMamba-v0 and DHKD).
        ssm_ratio: ``d_inner = ssm_ratio * d_model`` unless ``d_inner`` is given.
        dt_rank: rank ``R`` of the step-size projection; ``"auto"`` is ``ceil(d_model / 16)``.
        d_inner: inner width; overrides ``ssm_ratio``.
        d_conv: depthwise conv kernel size (padding keeps H, W).
        conv_bias: bias of the depthwise conv.
        bias: bias of ``in_proj`` / ``out_proj`` (False in v0).
        dropout: dropout after ``out_proj``.
        dt_min, dt_max, dt_init_floor, dt_scale: Mamba's step-size initialisation.
        chunk_size: passed to the pure-PyTorch scan (``None``: automatic).
    """

    k_group = 4

    def __init__(
        self,
        d_model: int = 96,
        d_state: int = 16,
        ssm_ratio: float = 2.0,
        dt_rank: int | str = "auto",
        d_inner: int | None = None,
        d_conv: int = 3,
        conv_bias: bool = True,
        bias: bool = False,
        dropout: float = 0.0,
        dt_min: float = 0.001,
        dt_max: float = 0.1,
        dt_init_floor: float = 1e-4,
        dt_scale: float = 1.0,
        chunk_size: int | None = None,
    ) -> None:
        super().__init__()
        self.d_model = d_model
        self.d_state = d_state
        self.d_inner = d_inner if d_inner is not None else int(ssm_ratio * d_model)
        self.dt_rank = math.ceil(d_model / 16) if dt_rank == "auto" else int(dt_rank)
        self.chunk_size = chunk_size
        k, di, r, n = self.k_group, self.d_inner, self.dt_rank, d_state

        self.in_proj = nn.Linear(d_model, 2 * di, bias=bias)
        self.act = nn.SiLU()
        self.conv2d = nn.Conv2d(di, di, d_conv, padding=(d_conv - 1) // 2, groups=di, bias=conv_bias)
        # Per-direction projections kept stacked as raw parameters, as in the v0 checkpoint.
        x_proj = torch.empty(k, r + 2 * n, di)
        for i in range(k):  # nn.Linear's default init, one direction at a time
            nn.init.kaiming_uniform_(x_proj[i], a=math.sqrt(5))
        self.x_proj_weight = nn.Parameter(x_proj)
        std = r**-0.5 * dt_scale  # Mamba: keeps the variance of dt_proj(dt) at init
        self.dt_projs_weight = nn.Parameter(torch.empty(k, di, r).uniform_(-std, std))
        # softplus(bias) ~ logUniform[dt_min, dt_max]; bias = dt + log(-expm1(-dt)) inverts softplus.
        dt = torch.exp(torch.rand(k, di) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min))
        dt = dt.clamp(min=dt_init_floor)
        self.dt_projs_bias = nn.Parameter(dt + torch.log(-torch.expm1(-dt)))
        # S4D-real init A_n = -(n + 1), stored as log so that A = -exp(A_logs) stays negative.
        self.A_logs = nn.Parameter(torch.log(torch.arange(1, n + 1, dtype=torch.float32)).repeat(k * di, 1))
        self.Ds = nn.Parameter(torch.ones(k * di))
        self.A_logs._no_weight_decay = True  # type: ignore[attr-defined]  # read by some optimiser builders
        self.Ds._no_weight_decay = True  # type: ignore[attr-defined]

        self.out_norm = nn.LayerNorm(di)
        self.out_proj = nn.Linear(di, d_model, bias=bias)
        self.dropout = nn.Dropout(dropout) if dropout > 0.0 else nn.Identity()

    def scan_parameters(self, x_dbl: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
        """The selective scan's ``delta, A, B, C, D, delta_bias`` from the stacked per-direction projections
        ``x_dbl`` ``(B, K, R + 2N, L)``: ``delta`` ``(B, K * d_inner, L)``, ``B``/``C`` ``(B, K, N, L)``.

        All in f32: v0 runs the scan in f32 (force_fp32), the recurrence is sensitive to low precision.
        """
        batch, _, _, seq_len = x_dbl.shape
        r, n = self.dt_rank, self.d_state
        dts, bs, cs = torch.split(x_dbl, [r, n, n], dim=2)
        dts = torch.einsum("bkrl,kdr->bkdl", dts, self.dt_projs_weight)
        return (
            dts.reshape(batch, self.k_group * self.d_inner, seq_len).float(),
            -torch.exp(self.A_logs.float()),
            bs.float(),
            cs.float(),
            self.Ds.float(),
            self.dt_projs_bias.reshape(-1).float(),
        )

    def forward_core(self, x: Tensor) -> Tensor:
        """Scan part: conv output ``(B, d_inner, H, W)`` -> merged ``(B, H, W, d_inner)`` before out_norm."""
        batch, di, height, width = x.shape
        seq_len = height * width
        xs = cross_scan(x)  # (B, K, d_inner, L)
        x_dbl = torch.einsum("bkdl,kcd->bkcl", xs, self.x_proj_weight)
        ys = selective_scan(
            xs.reshape(batch, self.k_group * di, seq_len).float(),
            *self.scan_parameters(x_dbl),
            delta_softplus=True,
            chunk_size=self.chunk_size,
        )
        y = cross_merge(ys.reshape(batch, self.k_group, di, seq_len), height, width)
        return y.transpose(1, 2).reshape(batch, height, width, di).to(x.dtype)

    def forward_core_cross(self, x: Tensor) -> Tensor:
        """:meth:`forward_core` through the fused operator's cross-scan mode (inside ``use_fused_scan``).

        The four directions are one operator call over the row-major map (``cross_width = W``): no
        :func:`cross_scan` flips/transposes, no :func:`cross_merge`; each direction's projections are
        pointwise in the position, so they run on the row-major map too. Same result as
        :meth:`forward_core`.
        """
        from .fused.ops import fused_selective_scan

        batch, di, height, width = x.shape
        seq_len = height * width
        flat = x.reshape(batch, di, seq_len)
        x_dbl = torch.einsum("bdl,kcd->bkcl", flat, self.x_proj_weight)
        ys = fused_selective_scan(
            flat.repeat(1, self.k_group, 1).float(),
            *self.scan_parameters(x_dbl),
            delta_softplus=True,
            cross_width=width,
        )
        y = ys.reshape(batch, self.k_group, di, seq_len).sum(dim=1)
        return y.transpose(1, 2).reshape(batch, height, width, di).to(x.dtype)

    def uses_row_chunks(self, x: Tensor) -> bool:
        """Whether :meth:`forward_core_rows` runs: square maps, inference or export, pure-PyTorch scan.

        Training keeps :meth:`forward_core` (its scan checkpoints segments to bound backward memory), and
        CUDA with mamba-ssm, or CPU inside ``use_fused_scan``, keeps the fused kernel.
        """
        height, width = x.shape[-2:]
        inference = not torch.is_grad_enabled() or _is_tracing()
        fused = uses_fused_kernel(x) or (fused_scan_enabled() and not x.is_cuda)
        return height == width and self.chunk_size is None and inference and not fused

    def forward_core_rows(self, x: Tensor) -> Tensor:
        """:meth:`forward_core` with each image row (column) as one chunk of the chunked scan, channels-last.

        On a square map, direction 0's sequence cut into chunks of ``T = W`` steps is the image itself:
        chunk ``c`` = row ``c``, step ``t`` = column ``t``; direction 1 likewise with columns, and the
        reversed directions flip both chunk and step axes. So the step-major layout the scan needs is a
        permutation of the channels-last map that keeps channels innermost (cheap), instead of the
        generic path's ``(B, d, L) -> (T, B, d, nc)`` transposes, which took about half of the exported
        scan's time. Same result as :meth:`forward_core`. ``x``: ``(B, H, W, d_inner)`` channels-last.
        """
        n, r = self.d_state, self.dt_rank
        rows = x.permute(2, 0, 1, 3)  # (T=W, B, nc=H, d): direction 0, step t = column t of row c
        cols = x.permute(1, 0, 2, 3)  # (T=H, B, nc=W, d): direction 1, step t = row t of column c
        fwd = torch.stack([rows, cols], dim=2)
        xs = torch.cat([fwd, fwd.flip(0, 3)], dim=2).float()  # (T, B, K, nc, d); reversed = both axes flipped
        x_dbl = torch.einsum("tbkcd,kjd->tbkcj", xs, self.x_proj_weight.float())
        dts, bs, cs = torch.split(x_dbl, [r, n, n], dim=-1)
        dts = torch.einsum("tbkcr,kdr->tbkcd", dts, self.dt_projs_weight.float())
        delta = torch.nn.functional.softplus(dts + self.dt_projs_bias.float()[:, None])  # bias (K, d)
        a_g = (
            -torch.exp(self.A_logs.float())
            .reshape(self.k_group, self.d_inner, n)
            .transpose(1, 2)
            .unsqueeze(1)
        )
        ys, _ = scan_chunk_steps(
            delta.unsqueeze(-2), (delta * xs).unsqueeze(-2), bs.unsqueeze(-1), cs.unsqueeze(-2), a_g
        )
        ys = ys.squeeze(-2) + xs * self.Ds.float().reshape(self.k_group, self.d_inner)[:, None]
        pair = ys[:, :, 0:2] + ys[:, :, 2:4].flip(0, 3)  # undo the reversal of directions 2 and 3
        y = pair[:, :, 0].permute(1, 2, 0, 3) + pair[:, :, 1].permute(1, 0, 2, 3)  # both to (B, H, W, d)
        return y.to(x.dtype)

    def forward(self, x: Tensor) -> Tensor:
        """``(B, H, W, d_model)`` -> ``(B, H, W, d_model)``."""
        x, z = self.in_proj(x).chunk(2, dim=-1)
        z = self.act(z)
        x = self.act(self.conv2d(x.permute(0, 3, 1, 2)))
        if _use_fused_op(x, self.x_proj_weight):
            y = self.forward_core_cross(x)
        elif self.uses_row_chunks(x):
            y = self.forward_core_rows(x.permute(0, 2, 3, 1))
        else:
            y = self.forward_core(x)
        y = self.out_norm(y) * z
        return self.dropout(self.out_proj(y))
