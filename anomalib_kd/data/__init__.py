"""anomalib-kd datamodules."""

from .fewshot import FewShotTasks
from .kdbench import KDBench
from .textures import Textures

__all__ = ["FewShotTasks", "KDBench", "Textures"]
