"""URD: Reverse Distillation with Expert (AAAI 2025)."""

from .lightning_model import URD
from .torch_model import GuidedInformationInjection, URDModel, URDStudent

__all__ = ["URD", "GuidedInformationInjection", "URDModel", "URDStudent"]
