"""Stages shared by :func:`spectrim.compress` and :func:`spectrim.analyze`.

``trace → collect → solve`` is the first half of both: :func:`trace_stage` runs the tracer
and the self-checks on one example batch, :func:`spectrim.calibration.collect` streams the
statistics, :func:`solve_stage` builds one solver per unit group.  ``compress`` goes on to
allocate, apply and report; ``analyze`` to diagnose.

Example::

    >>> import torch, torch.nn as nn
    >>> from spectrim.calibration import collect
    >>> from spectrim.methods import get_method
    >>> net = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 2)).eval()
    >>> batches = [torch.randn(64, 4)]
    >>> example, analysis, _ = trace_stage(net, batches, verify=False)
    >>> stats = collect(net, analysis, batches, analysis.prunable).stats
    >>> solvers = solve_stage(get_method("id"), analysis.prunable, stats, net)
    >>> [len(s.error_curve()) for s in solvers.values()]
    [17]
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from typing import Any

from torch import nn

from spectrim.calibration.batches import head_examples
from spectrim.calibration.checks import CalibrationInfo, trace_checked
from spectrim.calibration.gram import GramAccumulator
from spectrim.calibration.sketch import RowSketch
from spectrim.config import CompressConfig
from spectrim.context import RunContext
from spectrim.distributed import SOLO, Team
from spectrim.evaluation.flops import ModelCost, profile
from spectrim.graph.channels import Analysis, UnitGroup
from spectrim.graph.verify import check_runs
from spectrim.methods.base import GroupSolver, Method
from spectrim.report import CompressionReport

__all__ = ["begin_run", "end_run", "example_cost", "group_stats", "solve_stage", "trace_stage"]


def trace_stage(
    work: nn.Module,
    batches: Sequence[Any],
    *,
    verify: bool = True,
    seed: int = 0,
    team: Team = SOLO,
) -> tuple[Any, Analysis, list[str]]:
    """``(example, analysis, warnings)``: the trace and channel analysis of ``work`` on the
    first examples of the first batch, with the self-checks when ``verify`` (rank 0's
    batch on every rank of a ``team``: all trace the same graph and pin the same groups)."""
    example = team.broadcast(head_examples(batches[0]))
    analysis, warnings = trace_checked(work, example, verify=verify, seed=seed)
    return example, analysis, warnings


def group_stats(
    group: UnitGroup,
    stats: Mapping[tuple[int, str], GramAccumulator],
    *,
    nonempty: bool = False,
) -> dict[str, GramAccumulator]:
    """Consumer name → the group's accumulator there (only those that saw rows, with
    ``nonempty``)."""
    out = {}
    for slot in group.consumers:
        acc = stats.get((group.index, slot.module))
        if acc is not None and (not nonempty or acc.count > 0):
            out[slot.module] = acc
    return out


def solve_stage(
    method: Method,
    groups: Sequence[UnitGroup],
    stats: Mapping[tuple[int, str], GramAccumulator],
    model: nn.Module,
    *,
    nonempty: bool = False,
    sketches: Mapping[tuple[int, str], RowSketch] | None = None,
) -> dict[int, GroupSolver]:
    """One solver per group (groups without statistics skipped when ``nonempty``); a
    group with ``sketches`` (too wide for its Grams) gets the method's sketch solver."""
    out: dict[int, GroupSolver] = {}
    for g in groups:
        gsk = {
            s.module: sk for s in g.consumers if (sk := (sketches or {}).get((g.index, s.module)))
        }
        if gsk:
            out[g.index] = method.sketch_solver(g, gsk, model)
            continue
        gstats = group_stats(g, stats, nonempty=nonempty)
        if nonempty and not gstats:
            continue
        out[g.index] = method.solver(g, gstats, model)
    return out


def begin_run(
    work: nn.Module,
    cfg: CompressConfig,
    method: Method,
    info: CalibrationInfo,
    ctx: RunContext,
) -> tuple[Method, CompressionReport]:
    """The method for this run (its seed) and the report a run of one kind of plan
    (heads, the stream, experts) fills; ``work`` is put in eval mode."""
    method = method.for_run(ctx)
    work.eval()
    report = CompressionReport(
        method=method.name, target=str(cfg.parsed_target), config=cfg.to_dict()
    )
    report.warnings.extend(info.warnings)
    return method, report


def example_cost(work: nn.Module, batches: Sequence[Any], team: Team) -> tuple[Any, ModelCost]:
    """The first examples of the first batch (rank 0's, on every rank) and ``work``'s
    cost on them, before a run changes it; a model that fails on them by itself is named
    as such (``ValueError``), as the channel trace does."""
    example = team.broadcast(head_examples(batches[0]))
    try:
        return example, profile(work, example)
    except Exception:
        check_runs(work, example)
        raise


def end_run(
    report: CompressionReport,
    work: nn.Module,
    example: Any,
    cost0: ModelCost,
    info: CalibrationInfo,
    timings: dict[str, float],
    t0: float,
) -> None:
    """Costs before and after (the profiler on ``example``), rows, timings, seconds."""
    t = time.perf_counter()
    cost1 = profile(work, example)
    report.params_before, report.params_after = cost0.params, cost1.params
    report.macs_before, report.macs_after = cost0.macs, cost1.macs
    report.calibration_rows = info.examples
    timings["report"] = time.perf_counter() - t
    report.timings = timings
    report.seconds = time.perf_counter() - t0
