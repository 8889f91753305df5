"""Budget allocation: per-group widths from a target."""

from spectrim.budget.allocate import (
    CostModel,
    allocate,
    dof_widths,
    uniform_widths,
    widths_for_error,
)

__all__ = ["CostModel", "allocate", "dof_widths", "uniform_widths", "widths_for_error"]
