"""PDD losses: L_kr (student 1), L_prp (student 2), L_div (diversity between the students).

As the official code (spec part 1.4): MSE is the mean over all elements, cosines are *global* (one
vector C*H*W per sample, batch mean), each summed over the 3 levels [c, b, a] (finest first).

    L = lambda_kr * MSE(T, S1) + [alpha * MSE(S2, T) + beta * cos term] + lambda_div * L_div(S2, S1)

The cos term of L_prp is the paper's ``1 - cos(S2, T)`` by default; ``prp_cosine="official"`` uses the
official code's ``+cos(S2, T)`` (which pushes S2 away from the targets in angle).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from torch.nn import functional as F  # noqa: N812

Features = Sequence[torch.Tensor]
PRP_COSINE_MODES = ("paper", "official")


def flat_cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-sample cosine between whole flattened feature maps, shape (B,)."""
    return F.cosine_similarity(a.flatten(1), b.flatten(1), dim=1, eps=1e-8)


def mse_levels(a: Features, b: Features) -> torch.Tensor:
    """Sum over levels of the element-mean squared error."""
    return sum((F.mse_loss(x, y) for x, y in zip(a, b, strict=True)), start=torch.zeros(()).to(a[0]))


def diversity_loss(
    prior_student: Features,
    plain_student: Features,
    tau_low: float = 0.75,
    tau_high: float = 0.30,
    low_dim_layers: int = 1,
) -> torch.Tensor:
    """L_div: diverge on the shallow levels, agree on the deep ones.

    For the first ``low_dim_layers`` levels (the finest, 256@64 at 256 px): mean_b max(0, cos - tau_low);
    for the rest: mean_b max(0, tau_high - cos) (= -min(0, cos - tau_high), the paper's form).
    """
    loss = torch.zeros(()).to(prior_student[0])
    for level, (s2, s1) in enumerate(zip(prior_student, plain_student, strict=True)):
        cosine = flat_cosine(s2, s1)
        if level < low_dim_layers:
            loss = loss + torch.clamp(cosine - tau_low, min=0).mean()
        else:
            loss = loss + torch.clamp(tau_high - cosine, min=0).mean()
    return loss


class PDDLoss(nn.Module):
    """Total PDD loss (official weights: lambda_kr 0.02, alpha 0.02, beta 0.05, lambda_div 0.5).

    Args:
        lambda_kr: weight of L_kr = MSE(T, S1).
        alpha: MSE weight inside L_prp.
        beta: cosine weight inside L_prp.
        lambda_div: weight of L_div.
        tau_low, tau_high: diversity thresholds (official script 0.75 / 0.30; per-dataset tunable).
        prp_cosine: ``"paper"`` (beta * (1 - cos)) or ``"official"`` (beta * cos, the code's sign).
        low_dim_layers: how many of the finest levels use tau_low.
    """

    def __init__(
        self,
        lambda_kr: float = 0.02,
        alpha: float = 0.02,
        beta: float = 0.05,
        lambda_div: float = 0.5,
        tau_low: float = 0.75,
        tau_high: float = 0.30,
        prp_cosine: str = "paper",
        low_dim_layers: int = 1,
    ) -> None:
        super().__init__()
        if prp_cosine not in PRP_COSINE_MODES:
            msg = f"prp_cosine must be one of {PRP_COSINE_MODES}, got {prp_cosine!r}."
            raise ValueError(msg)
        self.lambda_kr = lambda_kr
        self.alpha = alpha
        self.beta = beta
        self.lambda_div = lambda_div
        self.tau_low = tau_low
        self.tau_high = tau_high
        self.prp_cosine = prp_cosine
        self.low_dim_layers = low_dim_layers

    def forward(
        self, targets: Features, prior_student: Features, plain_student: Features
    ) -> dict[str, torch.Tensor]:
        """Return ``loss`` and its parts ``kr``, ``prp``, ``div`` (weighted)."""
        kr = self.lambda_kr * mse_levels(targets, plain_student)
        cosines = sum(flat_cosine(s, t).mean() for s, t in zip(prior_student, targets, strict=True))
        cos_term = cosines if self.prp_cosine == "official" else len(targets) - cosines
        prp = self.alpha * mse_levels(prior_student, targets) + self.beta * cos_term
        div = self.lambda_div * diversity_loss(
            prior_student, plain_student, self.tau_low, self.tau_high, self.low_dim_layers
        )
        return {"loss": kr + prp + div, "kr": kr, "prp": prp, "div": div}
