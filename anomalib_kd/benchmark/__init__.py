"""Benchmark suite support: budgeted models for the stock ``anomalib benchmark`` command."""

from .models import (
    BUDGETED_MODELS,
    BudgetedD24FAD,
    BudgetedDHKD,
    BudgetedEfficientAd,
    BudgetedPatchcore,
    BudgetedPDD,
    BudgetedReverseDistillation,
    BudgetedURD,
    TrainingBudget,
)

__all__ = [
    "BUDGETED_MODELS",
    "BudgetedD24FAD",
    "BudgetedDHKD",
    "BudgetedEfficientAd",
    "BudgetedPDD",
    "BudgetedPatchcore",
    "BudgetedReverseDistillation",
    "BudgetedURD",
    "TrainingBudget",
]
