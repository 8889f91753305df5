"""The compression report: what was removed, what it cost, how well it reconstructs.

Example::

    >>> r = CompressionReport(method="id", target="macs=0.5")
    >>> r.to_dict()["method"]
    'id'
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from spectrim._files import atomic_write_text

__all__ = ["CompressionReport", "GroupReport"]


@dataclass
class GroupReport:
    """One unit group: widths and reconstruction errors."""

    name: str
    width_before: int
    width_after: int
    producers: list[str]
    consumers: list[str]
    predicted_error: float | None = None
    """relative error at ``width_after`` from the method's error curve (for least-squares
    fits such as ``id``, corrected for the optimism of fitting on the calibration rows:
    the expected error on new inputs)"""
    consumer_errors: dict[str, float] = field(default_factory=dict)
    pinned: str | None = None
    rows: int | None = None  # calibration rows of the least-fed consumer's statistics


@dataclass
class CompressionReport:
    """JSON-serialisable summary of one :func:`spectrim.compress` run."""

    method: str
    target: str
    config: dict[str, Any] = field(default_factory=dict)
    params_before: int = 0
    params_after: int = 0
    macs_before: int = 0
    macs_after: int = 0
    seconds: float = 0.0
    timings: dict[str, float] = field(default_factory=dict)
    calibration_rows: int = 0
    fitted_examples: int = 0
    groups: list[GroupReport] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    @property
    def widths(self) -> dict[str, list[int]]:
        """Per group: ``[before, after]``."""
        return {g.name: [g.width_before, g.width_after] for g in self.groups}

    @property
    def macs_ratio(self) -> float:
        return self.macs_after / self.macs_before if self.macs_before else 1.0

    @property
    def params_ratio(self) -> float:
        return self.params_after / self.params_before if self.params_before else 1.0

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["widths"] = self.widths
        d["macs_ratio"] = self.macs_ratio
        d["params_ratio"] = self.params_ratio
        return d

    def to_json(self, path: str | Path | None = None, indent: int = 2) -> str:
        text = json.dumps(self.to_dict(), indent=indent)
        if path is not None:
            atomic_write_text(path, text)
        return text

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> CompressionReport:
        d = {k: v for k, v in d.items() if k in cls.__dataclass_fields__}
        d["groups"] = [GroupReport(**g) for g in d.get("groups", [])]
        return cls(**d)

    def table(self) -> str:
        """A plain-text per-group table."""
        rows = [f"{'group':40s} {'width':>11s} {'pred.err':>9s}  note"]
        for g in self.groups:
            err = "" if g.predicted_error is None else f"{g.predicted_error:9.4f}"
            note = f"pinned: {g.pinned}" if g.pinned else ""
            rows.append(
                f"{g.name[:40]:40s} {g.width_before:5d}->{g.width_after:<5d} {err:>9s}  {note}"
            )
        rows.append(
            f"params {self.params_before:,} -> {self.params_after:,} ({self.params_ratio:.3f}), "
            f"MACs {self.macs_before:,} -> {self.macs_after:,} ({self.macs_ratio:.3f}), "
            f"{self.seconds:.2f} s"
        )
        return "\n".join(rows)
