"""anomalib-kd: knowledge-distillation anomaly detectors (DHKD, URD, PDD, D24FAD) for anomalib 2.x.

Classes are imported lazily (``anomalib_kd.URD`` imports the model on first access), so importing
the package, which the start-up hook does in every interpreter of the environment, stays cheap.
"""

from __future__ import annotations

from ._registration import autoload, register_into_anomalib

TYPE_CHECKING = False  # not `typing.TYPE_CHECKING`: the start-up hook imports this package

__version__ = "0.1.0"

_LAZY = {
    "URD": "anomalib_kd.models",
    "D24FAD": "anomalib_kd.models",
    "DHKD": "anomalib_kd.models",
    "PDD": "anomalib_kd.models",
    "Textures": "anomalib_kd.data",
    "FewShotTasks": "anomalib_kd.data",
    "HighBitDepthFolder": "anomalib_kd.data",
    "HighBitDepthMVTecAD": "anomalib_kd.data",
    "read_image": "anomalib_kd.data",
}

if TYPE_CHECKING:
    from .data import FewShotTasks, HighBitDepthFolder, HighBitDepthMVTecAD, Textures, read_image
    from .models import D24FAD, DHKD, PDD, URD

__all__ = [
    "D24FAD",
    "DHKD",
    "PDD",
    "URD",
    "FewShotTasks",
    "HighBitDepthFolder",
    "HighBitDepthMVTecAD",
    "Textures",
    "autoload",
    "read_image",
    "register_into_anomalib",
]


def __getattr__(name: str) -> object:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    msg = f"module 'anomalib_kd' has no attribute {name!r}"
    raise AttributeError(msg)


autoload()
