"""PDD: Manifold-Prior Diverse Distillation (CVPR 2026)."""

from .lightning_model import PDD
from .loss import PDDLoss, diversity_loss
from .torch_model import ChannelAdapter, ManifoldPriorAffine, PDDModel, PDDStudents

__all__ = [
    "PDD",
    "ChannelAdapter",
    "ManifoldPriorAffine",
    "PDDLoss",
    "PDDModel",
    "PDDStudents",
    "diversity_loss",
]
