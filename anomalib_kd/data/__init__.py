"""anomalib-kd datamodules."""

from .fewshot import FewShotTasks
from .textures import Textures

__all__ = ["FewShotTasks", "Textures"]
