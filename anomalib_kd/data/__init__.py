"""anomalib-kd datamodules and the image reader they share (16-bit images at full range)."""

from .fewshot import FewShotTasks
from .high_bit_depth import HighBitDepthFolder, HighBitDepthMVTecAD
from .image import ImageReadError, read_image
from .textures import Textures

__all__ = [
    "FewShotTasks",
    "HighBitDepthFolder",
    "HighBitDepthMVTecAD",
    "ImageReadError",
    "Textures",
    "read_image",
]
