"""Budget allocation: per-group widths from a target."""

from spectrim.budget.allocate import CostModel, allocate, uniform_widths, widths_for_error

__all__ = ["CostModel", "allocate", "uniform_widths", "widths_for_error"]
