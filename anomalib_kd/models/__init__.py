"""anomalib-kd models."""

from .d24fad import D24FAD
from .urd import URD

__all__ = ["D24FAD", "URD"]
