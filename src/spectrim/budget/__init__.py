"""Budget allocation: per-group widths (and per-matrix densities) from a target."""

from spectrim.budget.allocate import (
    Allocation,
    CostModel,
    JointAllocation,
    allocate,
    allocate_budget,
    dof_widths,
    greedy_allocate,
    joint_cost,
    matrix_states,
    uniform_widths,
    widths_for_error,
)

__all__ = [
    "Allocation",
    "CostModel",
    "JointAllocation",
    "allocate",
    "allocate_budget",
    "dof_widths",
    "greedy_allocate",
    "joint_cost",
    "matrix_states",
    "uniform_widths",
    "widths_for_error",
]
