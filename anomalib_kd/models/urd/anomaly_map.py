"""Reverse-distillation anomaly map: summed per-level cosine distance, smoothed (RD4AD / URD Sec. 3.4)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from anomalib.models.components import GaussianBlur2d
from torch import nn
from torch.nn import functional as F  # noqa: N812


def cosine_distance_map(student: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-pixel 1 - cos over channels, (B, C, h, w) x 2 -> (B, 1, h, w)."""
    return 1 - F.cosine_similarity(student, target, dim=1, eps=1e-8).unsqueeze(1)


class AnomalyMapGenerator(nn.Module):
    """A = G_sigma * sum_l Up(1 - cos(S_l, T_l)); image score = max(A).

    The output size is taken from the input image at run time (not fixed at construction), so a
    checkpoint restored with another pre-processor size still gives full-resolution maps.
    """

    def __init__(self, sigma: float = 4.0) -> None:
        super().__init__()
        kernel_size = 2 * int(4.0 * sigma + 0.5) + 1  # scipy's gaussian_filter default truncate=4
        self.blur = GaussianBlur2d(sigma=sigma, channels=1, kernel_size=kernel_size)

    def forward(
        self,
        student_features: Sequence[torch.Tensor],
        target_features: Sequence[torch.Tensor],
        image_size: Sequence[int] | torch.Size,
    ) -> torch.Tensor:
        """Return the (B, 1, H, W) anomaly map."""
        anomaly_map = sum(
            F.interpolate(
                cosine_distance_map(s, t), size=tuple(image_size), mode="bilinear", align_corners=True
            )
            for s, t in zip(student_features, target_features, strict=True)
        )
        return self.blur(anomaly_map)
