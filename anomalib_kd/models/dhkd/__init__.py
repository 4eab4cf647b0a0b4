"""DHKD: Dual-Heterogeneous Knowledge Distillation with Mamba (ESWA 2026)."""

from .lightning_model import DHKD
from .loss import DHKDLoss
from .torch_model import DHKDModel, DHKDStudent

__all__ = ["DHKD", "DHKDLoss", "DHKDModel", "DHKDStudent"]
