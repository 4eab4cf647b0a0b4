"""D24FAD: Dual Distillation for Few-Shot Anomaly Detection (ICLR 2026)."""

from .lightning_model import D24FAD
from .loss import D24FADLoss
from .torch_model import D24FADModel, LearnToWeight

__all__ = ["D24FAD", "D24FADLoss", "D24FADModel", "LearnToWeight"]
