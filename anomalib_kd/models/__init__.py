"""anomalib-kd models."""

from .d24fad import D24FAD
from .dhkd import DHKD
from .pdd import PDD
from .urd import URD

__all__ = ["D24FAD", "DHKD", "PDD", "URD"]
