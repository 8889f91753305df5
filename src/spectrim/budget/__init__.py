"""Budget allocation: per-group widths from a target."""

from spectrim.budget.allocate import (
    Allocation,
    CostModel,
    allocate,
    allocate_budget,
    dof_widths,
    uniform_widths,
    widths_for_error,
)

__all__ = [
    "Allocation",
    "CostModel",
    "allocate",
    "allocate_budget",
    "dof_widths",
    "uniform_widths",
    "widths_for_error",
]
