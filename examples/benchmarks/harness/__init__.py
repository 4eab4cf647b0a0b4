"""Benchmark harness: budgeted models and the kdbench datamodule, registered only by the benchmark runner.

Nothing here is registered into a user's anomalib: :func:`register_harness` is called by
``examples/benchmarks/run_benchmark.py`` (which ``suite.py`` runs for every job) just before anomalib's
benchmark starts.
"""

from __future__ import annotations

from . import models
from .models import *  # noqa: F403  (the budgeted models, HARNESS_CHANGES, TrainingBudget)
from .models import BUDGETED_MODELS

__all__ = [*models.__all__, "register_harness"]

HARNESS_DATAMODULES = {
    "KDBench": f"{__name__}.kdbench:KDBench",
    "KDBenchTasks": f"{__name__}.kdbench:KDBenchTasks",
}


def register_harness() -> list[str]:
    """Register this package's and the harness's classes into ``anomalib.models`` / ``anomalib.data``."""
    import anomalib.data
    import anomalib.models

    from anomalib_kd import register_into_anomalib
    from anomalib_kd._registration import register_classes

    register_into_anomalib()
    models = {cls.__name__: f"{cls.__module__}:{cls.__name__}" for cls in BUDGETED_MODELS}
    return register_classes(anomalib.models, models) + register_classes(anomalib.data, HARNESS_DATAMODULES)
