"""Calibration statistics: streamed float64 Gram matrices at every consumer."""

from spectrim.calibration.collect import Collected, collect, collect_statistics, group_rows
from spectrim.calibration.gram import GramAccumulator, rows_from_activation

__all__ = [
    "Collected",
    "GramAccumulator",
    "collect",
    "collect_statistics",
    "group_rows",
    "rows_from_activation",
]
