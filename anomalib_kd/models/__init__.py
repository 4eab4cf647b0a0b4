"""anomalib-kd models."""

from .urd import URD

__all__ = ["URD"]
