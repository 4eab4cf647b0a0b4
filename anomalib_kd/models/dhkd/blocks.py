"""DHKD building blocks: CCM, SCMM (structural decoder) and HSTM (logical decoder).

Spec references are to ``dhkd_urd_official_code.md`` part 1 (section 1.4). The official repository lacks the
module that defines the Mamba pieces; where the spec marks a detail as inferred, the docstring says so.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F  # noqa: N812

from anomalib_kd.components.ssm import VSSBlock

__all__ = ["CCM", "HSTM", "SCMM", "SCMMBlock"]


class CCM(nn.Module):
    """Convolutional channel mixer: 3x3 conv ``C -> growth*C``, GELU, 1x1 conv back to ``C``.

    No residual and no final activation (spec 1.4.2 / 1.4.3).
    """

    def __init__(self, channels: int = 384, growth: int = 2) -> None:
        super().__init__()
        hidden = channels * growth
        self.expand = nn.Conv2d(channels, hidden, kernel_size=3, padding=1)
        self.act = nn.GELU()
        self.project = nn.Conv2d(hidden, channels, kernel_size=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.project(self.act(self.expand(x)))


class SCMM(nn.Module):
    """Spatial Channel Mixer Modulation (code name ``SAFM``, ``n_levels=2``), spec 1.4.3.

    Half the channels get a depth-wise 3x3 conv at full resolution; the other half is adaptive-max-pooled
    to half resolution, depth-wise 3x3 convolved and nearest-upsampled back. The concatenation is fused by
    a 1x1 conv and a ReLU, and the result modulates the input multiplicatively: ``ReLU(fuse) * x``.
    """

    def __init__(self, channels: int = 384) -> None:
        super().__init__()
        if channels % 2:
            msg = f"SCMM needs an even channel count, got {channels}"
            raise ValueError(msg)
        half = channels // 2
        self.spatial = nn.Conv2d(half, half, kernel_size=3, padding=1, groups=half)
        self.context = nn.Conv2d(half, half, kernel_size=3, padding=1, groups=half)
        self.fuse = nn.Conv2d(channels, channels, kernel_size=1)
        self.act = nn.ReLU()

    def forward(self, x: Tensor) -> Tensor:
        height, width = x.shape[-2:]
        local, context = x.chunk(2, dim=1)
        local = self.spatial(local)
        context = F.adaptive_max_pool2d(context, (height // 2, width // 2))
        context = F.interpolate(self.context(context), size=(height, width), mode="nearest")
        return self.act(self.fuse(torch.cat([local, context], dim=1))) * x


class SCMMBlock(nn.Module):
    """SCMM with its residual (code ``AttBlock``): ``x + SCMM(x)``."""

    def __init__(self, channels: int = 384) -> None:
        super().__init__()
        self.scmm = SCMM(channels)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.scmm(x)


class HSTM(nn.Module):
    """Hybrid Self-Task Mamba module (code ``InceptionDWConv2d``), spec 1.4.4.

    Input ``(B, C, H, W)`` is split in halves. The first half goes channels-last through a per-pixel
    bias-free Linear ``C/2 -> C`` (the missing ``PatchExpand``; **inferred** as same-resolution, no
    LayerNorm), a Linear ``C -> C/2`` with bias (``concat_layers``) and MTMamba's ``STMBlock`` with
    ``mlp_ratio=0``, which is VMamba's VSS block ``z + SS2D(LayerNorm(z))``
    (:class:`~anomalib_kd.components.ssm.VSSBlock`). Its drop path is the identity: the official
    ``drop_path=16`` is an identity or a crash depending on the timm version (spec 1.1). The second half
    goes through a full 3x3 conv. The halves are concatenated and passed through a ReLU.
    """

    def __init__(
        self, channels: int = 128, d_state: int = 16, ssm_ratio: float = 2.0, chunk_size: int | None = None
    ) -> None:
        super().__init__()
        if channels % 2:
            msg = f"HSTM needs an even channel count, got {channels}"
            raise ValueError(msg)
        half = channels // 2
        self.expand = nn.Linear(half, channels, bias=False)
        self.concat = nn.Linear(channels, half)
        self.stm = VSSBlock(half, d_state=d_state, ssm_ratio=ssm_ratio, chunk_size=chunk_size)
        self.conv = nn.Conv2d(half, half, kernel_size=3, padding=1)
        self.act = nn.ReLU()

    def _load_from_state_dict(
        self, state_dict: dict[str, Any], prefix: str, *args: Any, **kwargs: Any
    ) -> None:
        # Checkpoints from before the shared VSSBlock name the block's SS2D ``stm.ss2d``; it is ``stm.op``.
        old = prefix + "stm.ss2d."
        for key in [k for k in state_dict if k.startswith(old)]:
            state_dict[prefix + "stm.op." + key[len(old) :]] = state_dict.pop(key)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def forward(self, x: Tensor) -> Tensor:
        mamba, conv = x.chunk(2, dim=1)
        mamba = self.stm(self.concat(self.expand(mamba.permute(0, 2, 3, 1))))
        return self.act(torch.cat([mamba.permute(0, 3, 1, 2), self.conv(conv)], dim=1))
