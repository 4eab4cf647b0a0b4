"""Input normalisation inside the networks (the pre-processor only resizes)."""

from __future__ import annotations

import torch
from torch import nn

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class ImageNetNormalize(nn.Module):
    """(x - mean) / std with ImageNet statistics for [0, 1] images.

    Done inside the model rather than in anomalib's pre-processor so that training-time augmentations
    (synthetic anomalies) work on [0, 1] images, and so that the exported graph carries it.
    """

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Normalise (B, 3, H, W) images in [0, 1]."""
        return (images - self.mean) / self.std
