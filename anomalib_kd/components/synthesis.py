"""Synthetic anomalies (Perlin masks + texture source) shared by the distillation models.

A thin layer over anomalib's :class:`PerlinAnomalyGenerator` that makes the texture source explicit:

* ``texture_dir`` given (e.g. DTD's ``images/`` folder): textures are images from that folder, as in
  DRAEM / URD.
* no ``texture_dir``: the **documented fallback** is anomalib's own Perlin-noise texture (the rotated
  Perlin field, intensity-shifted and colour-augmented), which needs no download. This is logged once.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from anomalib.data.utils.generators.perlin import PerlinAnomalyGenerator
from torch import nn

logger = logging.getLogger(__name__)


class AnomalySynthesizer(nn.Module):
    """Blend Perlin-shaped texture patches into clean images: x~ = x(1-M) + b T M + (1-b) x M.

    Args:
        texture_dir: folder searched recursively for texture images; ``None`` uses Perlin-noise textures.
        probability: chance that a given image is augmented (URD: 1.0, every sample).
        blend_factor: range of the texture opacity ``b`` (URD: 1 - beta with beta ~ U[0, 0.8)).
    """

    _fallback_logged = False

    def __init__(
        self,
        texture_dir: str | Path | None = None,
        probability: float = 1.0,
        blend_factor: tuple[float, float] = (0.2, 1.0),
    ) -> None:
        super().__init__()
        if texture_dir is not None:
            folder = Path(texture_dir).expanduser()
            if not folder.is_dir():
                msg = (
                    f"texture_dir {folder} is not a directory (give DTD's images/ folder or leave it unset)."
                )
                raise FileNotFoundError(msg)
        self.generator = PerlinAnomalyGenerator(
            anomaly_source_path=texture_dir,
            probability=probability,
            blend_factor=blend_factor,
        )
        if texture_dir is not None and not self.generator.anomaly_source_paths:
            msg = f"texture_dir {texture_dir} holds no images."
            raise FileNotFoundError(msg)
        self.texture_dir = texture_dir

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Return augmented images (B, C, H, W) in [0, 1] and their masks (B, 1, H, W) in {0, 1}."""
        if self.texture_dir is None and not AnomalySynthesizer._fallback_logged:
            AnomalySynthesizer._fallback_logged = True
            logger.info(
                "No texture_dir given: synthetic anomalies use Perlin-noise textures (no download). "
                "Pass texture_dir=<DTD images folder> for the paper's DTD textures.",
            )
        with torch.no_grad():
            augmented, masks = self.generator(images)
        return augmented.clamp(0, 1), masks
