"""anomalib-kd datamodules."""

from .textures import Textures

__all__ = ["Textures"]
