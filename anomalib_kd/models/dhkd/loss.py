"""DHKD losses (official ``Train.py``, spec 1.5): plain means over ``B*C*H*W``.

- ``L_L = mean((T^ - f_L)^2)`` (structural decoder vs teacher; the official hard-mining line is disabled),
- ``L_G = mean((T^ - f_G)^2)`` (logical decoder vs teacher),
- ``L_D = mean((f_G - f_S)^2)`` (logical decoder vs student encoder; neither side detached),
- ``L = alpha L_L + beta L_G + gamma L_D`` with ``alpha : beta : gamma = 1 : 1 : 2``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

__all__ = ["DHKDLoss"]


class DHKDLoss(nn.Module):
    """Weighted sum of L_L, L_G and L_D.

    Args:
        weights: ``(alpha, beta, gamma)`` for ``(L_L, L_G, L_D)``; paper and code use ``(1, 1, 2)``.
    """

    def __init__(self, weights: Sequence[float] = (1.0, 1.0, 2.0)) -> None:
        super().__init__()
        if len(weights) != 3:
            msg = f"DHKD needs three loss weights (L_L, L_G, L_D), got {list(weights)}"
            raise ValueError(msg)
        self.weights = tuple(float(w) for w in weights)

    def forward(self, teacher: Tensor, f_s: Tensor, f_g: Tensor, f_l: Tensor) -> dict[str, Tensor]:
        """Returns ``{"loss", "loss_local", "loss_global", "loss_distill"}``."""
        loss_local = torch.mean((teacher - f_l) ** 2)
        loss_global = torch.mean((teacher - f_g) ** 2)
        loss_distill = torch.mean((f_g - f_s) ** 2)
        alpha, beta, gamma = self.weights
        loss = alpha * loss_local + beta * loss_global + gamma * loss_distill
        return {
            "loss": loss,
            "loss_local": loss_local,
            "loss_global": loss_global,
            "loss_distill": loss_distill,
        }
