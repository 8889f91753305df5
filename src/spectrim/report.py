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

import numpy as np

from spectrim._files import atomic_write_text

__all__ = ["CompressionReport", "GroupReport", "MatrixReport", "merge_reports"]


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
    sketch_rows: int | None = None
    """rows of the randomized sketch the group was selected from (too wide for its exact
    Grams under ``stats_memory``); ``None``: exact Grams"""


@dataclass
class MatrixReport:
    """One sparsified weight matrix (``out × cols``; a conv read as ``C_out × C_in·kh·kw``).

    ``output_error`` is ``tr(ΔW G ΔWᵀ)/tr(W G Wᵀ)`` on the calibration inputs of the
    original model (a relative *squared* error); ``spectral_error`` / ``frobenius_error``
    are ``‖ΔW‖₂/‖W‖₂`` and ``‖ΔW‖_F/‖W‖_F``; ``top_sv_change`` is the largest relative
    change of the top-8 singular values; ``left_angle`` / ``right_angle`` the largest
    principal angle (degrees) between the top-8 singular subspaces before and after;
    ``lq_bound`` the number of weights the ℓq bound (q=0.5, η=0) says the matrix needs.
    """

    name: str
    kind: str
    shape: list[int]
    density: float
    spectral_error: float | None = None
    frobenius_error: float | None = None
    top_sv_change: float | None = None
    left_angle: float | None = None
    right_angle: float | None = None
    output_error: float | None = None
    lq_bound: int | None = None
    note: str | None = None


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
    blocks: int = 0
    """blocks the sequential corrections ran through one at a time (``blockwise``; 0: the
    whole model at once)"""
    sequential_fit: str = ""
    """the consumer fit the sequential pass used (``"auto"`` resolved; empty: no pass)"""
    groups: list[GroupReport] = field(default_factory=list)
    matrices: list[MatrixReport] = field(default_factory=list)
    nonzeros_before: int = 0
    """non-zero weights of the sparsified modules' weight matrices, before and after"""
    nonzeros_after: int = 0
    warnings: list[str] = field(default_factory=list)
    repair: dict[str, Any] | None = None
    """the distillation after compressing (``compress(..., repair=...)``): its
    :class:`~spectrim.repair.RepairReport` as a dict"""
    latency: dict[str, Any] | None = None
    """a ``latency=F`` target: ``target``, ``batch``, the ``measured`` ratio of the pruned
    shapes' time to the original's, ``seconds_original`` and every round of the loop"""
    readers: dict[str, Any] | None = None
    """``refit_readers=True``: ``refitted`` (per reader, the relative error of its output
    to the original's on the fitted rows, ``[before, after]`` its fit) and ``skipped`` (per
    reader left as it was, why)"""
    allocation: dict[str, Any] | None = None
    """a ``macs``/``params``/``latency`` (or joint) budget's allocation: ``kind``, the
    ``target`` asked for, the modelled fraction ``reached``, the ``floor`` with every
    prunable unit at its smallest, ``reachable`` and the units ``max_error`` ``held``
    (group or matrix names); ``None`` for the other targets"""
    search: dict[str, Any] | None = None
    """``search=N``: the groups searched (channel groups, attention layers' heads, the
    residual stream), each round's step and the candidates it kept, the output error on
    the held-out calibration examples before and after, and the factors found"""

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

    @property
    def sparsity(self) -> float:
        """Share of the targeted weights that are zero after compression."""
        if not self.matrices:
            return 0.0
        total = sum(int(np.prod(m.shape)) for m in self.matrices)
        return 1.0 - self.nonzeros_after / total if total else 0.0

    @property
    def nonzero_ratio(self) -> float:
        """Non-zero weights after over before (against the original model's matrices,
        also in a two-stage run, where :attr:`sparsity` counts the second stage's)."""
        return self.nonzeros_after / self.nonzeros_before if self.nonzeros_before else 1.0

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["sparsity"] = self.sparsity
        d["nonzero_ratio"] = self.nonzero_ratio
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
        d["matrices"] = [MatrixReport(**m) for m in d.get("matrices", [])]
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
        if self.matrices:
            rows.append(f"{'matrix':40s} {'density':>8s} {'out.err':>9s} {'‖ΔW‖₂':>8s}")
            for m in self.matrices:
                err = "" if m.output_error is None else f"{m.output_error:9.5f}"
                spec = "" if m.spectral_error is None else f"{m.spectral_error:8.4f}"
                rows.append(f"{m.name[:40]:40s} {m.density:8.3f} {err:>9s} {spec:>8s}")
            rows.append(
                f"weights {self.nonzeros_before:,} -> {self.nonzeros_after:,} non-zero "
                f"(sparsity {self.sparsity:.3f})"
            )
        if self.sequential_fit:  # how the corrections were fitted
            where = f"block by block ({self.blocks} blocks)" if self.blocks else "whole model"
            rows.append(
                f"corrections: the {self.sequential_fit} fit on {self.fitted_examples:,} "
                f"examples, {where}"
            )
        rows.append(
            f"params {self.params_before:,} -> {self.params_after:,} ({self.params_ratio:.3f}), "
            f"MACs {self.macs_before:,} -> {self.macs_after:,} ({self.macs_ratio:.3f}), "
            f"{self.seconds:.2f} s"
        )
        return "\n".join(rows)


def merge_reports(
    first: CompressionReport, second: CompressionReport, nonzeros_before: int | None = None
) -> CompressionReport:
    """One report for two stages run one after the other on the same model (channels,
    then weights): costs from the first's start to the second's end, both stages'
    timings (``1.…``, ``2.…``), groups and matrices.  ``nonzeros_before``: the original
    model's non-zero weights in the second stage's matrices (default: the second's own).

    Example::

        >>> a = CompressionReport("id", "macs=0.5", macs_before=100, macs_after=50)
        >>> b = CompressionReport("obs", "sparsity=0.5", macs_before=50, macs_after=50)
        >>> m = merge_reports(a, b)
        >>> m.method, m.target, m.macs_ratio
        ('id+obs', 'macs=0.5, then sparsity=0.5', 0.5)
    """
    return CompressionReport(
        method=f"{first.method}+{second.method}",
        target=f"{first.target}, then {second.target}",
        config={"stages": [first.config, second.config]},
        params_before=first.params_before,
        params_after=second.params_after,
        macs_before=first.macs_before,
        macs_after=second.macs_after,
        seconds=first.seconds + second.seconds,
        timings={
            **{f"1.{k}": v for k, v in first.timings.items()},
            **{f"2.{k}": v for k, v in second.timings.items()},
        },
        calibration_rows=first.calibration_rows,
        fitted_examples=first.fitted_examples,
        blocks=first.blocks,
        groups=first.groups or second.groups,
        matrices=second.matrices or first.matrices,
        nonzeros_before=second.nonzeros_before if nonzeros_before is None else nonzeros_before,
        nonzeros_after=second.nonzeros_after,
        warnings=first.warnings + [w for w in second.warnings if w not in first.warnings],
        allocation=first.allocation or second.allocation,
    )
