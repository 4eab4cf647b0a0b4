"""D24FAD loss: L = lambda * L_tsd + L_ssd (paper Eq. 6; lambda 0.1).

Two granularities of the cosine distance (spec part 2.3 / 2.8 item 2):

* ``"global"`` (official code): one cosine per sample over the flattened C*H*W feature,
  1 - cos, averaged over the batch, summed over the three levels.
* ``"pixel"`` (paper Eqs. 1 and 5): per-position cosine over channels, averaged over positions and
  batch, summed over levels.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from torch.nn import functional as F  # noqa: N812

LOSS_MODES = ("global", "pixel")


def distillation_distance(
    a: Sequence[torch.Tensor], b: Sequence[torch.Tensor], mode: str = "global"
) -> torch.Tensor:
    """sum_l mean[1 - cos(a_l, b_l)], cosine over flattened samples (global) or channels (pixel)."""
    loss = torch.zeros((), device=a[0].device)
    for x, y in zip(a, b, strict=True):
        if mode == "global":
            loss = loss + (1 - F.cosine_similarity(x.flatten(1), y.flatten(1), dim=1, eps=1e-8)).mean()
        else:
            loss = loss + (1 - F.cosine_similarity(x, y, dim=1, eps=1e-8)).mean()
    return loss


class D24FADLoss(nn.Module):
    """lambda * L_tsd(teacher, query student) + L_ssd(query student, weighted support student)."""

    def __init__(self, lambda_tsd: float = 0.1, mode: str = "global") -> None:
        super().__init__()
        if mode not in LOSS_MODES:
            msg = f"loss_mode must be one of {LOSS_MODES}, got {mode!r}."
            raise ValueError(msg)
        self.lambda_tsd = lambda_tsd
        self.mode = mode

    def forward(
        self,
        teacher: Sequence[torch.Tensor],
        student: Sequence[torch.Tensor],
        weighted_support: Sequence[torch.Tensor],
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Return (total, L_tsd, L_ssd)."""
        tsd = distillation_distance(teacher, student, self.mode)
        ssd = distillation_distance(student, weighted_support, self.mode)
        return self.lambda_tsd * tsd + ssd, tsd, ssd
