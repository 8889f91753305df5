"""One budget over channel groups and weight matrices (private): ``method="id+obs"``.

Stages: trace and channel analysis → the weight method's error curve of every matrix on the
dense model (its input Grams, one pass) → the channel statistics and every group's error
curve → **one lazy greedy** (:func:`spectrim.budget.greedy_allocate`) that takes, step by
step, the channel-group width or matrix density whose next step costs the least predicted
error per unit of cost removed → the channel plans applied (with their corrections, in the
sequential pass) → the weight method on the pruned model at the densities the greedy chose
(its statistics re-collected on the pruned model, whose activations they must describe) →
one report.

What is approximate: a matrix's error curve is measured on the dense model; after its
channels are pruned the same density leaves a somewhat different error.  Errors of
different units are added (each is a squared relative output error of the layer it
touches), as the channel allocator adds the errors of its groups.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np
from torch import nn

from spectrim._prune import (
    ChannelRun,
    allocation_record,
    analyse_stage,
    apply_stage,
    collect_stage,
    cost_model_of,
    report_stage,
    solve_curves_stage,
)
from spectrim._sparsify import (
    CURVE_GRID,
    sparsifiable,
    sparsify_run,
    weight_curves,
    weight_nonzeros,
)
from spectrim.budget import JointAllocation, greedy_allocate
from spectrim.calibration.checks import CalibrationInfo
from spectrim.calibration.inputs import input_grams
from spectrim.config import CompressConfig, Target, UnreachableTargetError
from spectrim.context import RunContext
from spectrim.evaluation.flops import profile
from spectrim.graph.modules import weight_kind
from spectrim.methods import Method, WeightMethod
from spectrim.report import CompressionReport, merge_reports

__all__ = ["joint_budget", "joint_run"]


def joint_budget(target: Target) -> tuple[str, float]:
    """``(cost kind, kept fraction)`` of a joint target: ``sparsity=S`` keeps ``1 − S``
    of the weight matrices' non-zeros; ``macs=F`` / ``params=F`` keep ``F`` of the MACs
    (a sparse matrix's counted by its non-zeros) / of the non-zero parameters.

    Example::

        >>> joint_budget(Target.parse("sparsity=0.9"))
        ('nonzeros', 0.1)
    """
    if target.kind == "sparsity" and target.pattern is None:
        return "nonzeros", round(1.0 - float(target.value), 12)
    if target.kind in ("macs", "params"):
        return target.kind, float(target.value)
    raise ValueError(
        f"target {target}: a channel+weight method shares one budget of 'sparsity=S' "
        "(non-zero weights), 'macs=F' or 'params=F'; for a fixed split (or an n:m pattern) "
        "run the channel method and pass then={'method': ..., 'target': ...}"
    )


def _check_weight_method(algo: Method) -> WeightMethod:
    if not isinstance(algo, WeightMethod):
        raise TypeError(f"method '{algo.name}' is not a weight method")
    if algo.self_sized or algo.scope == "global":
        raise ValueError(
            f"method '{algo.name}'"
            + (" with scope='global'" if algo.scope == "global" else "")
            + ": the joint allocator chooses a density per matrix from the method's error "
            "curves, so it needs a per-layer method that takes a density (obs, wanda, "
            "magnitude, random, spectrum)"
        )
    return algo


def _unreachable(cfg: CompressConfig, alloc: JointAllocation, kind: str) -> str:
    what = {"nonzeros": "non-zero weights", "macs": "MACs", "params": "parameters"}[kind]
    done = {
        "stop": f"stopped at {alloc.reached:.3f} of the {what}, where no unit's predicted "
        f"relative error exceeds max_error={cfg.max_error:g}",
        "force": f"every unit at its smallest state: {alloc.reached:.3f} of the {what}",
        "raise": "nothing was compressed",
    }[cfg.on_unreachable]
    return (
        f"target {cfg.parsed_target} is unreachable: with every prunable group at its minimum "
        f"width and every matrix at the lowest density its error curve measures "
        f"({CURVE_GRID[-1]:g}), {alloc.floor:.3f} of the {what} remain; {done}"
    )


def sparse_macs(model: nn.Module, example: Any) -> float:
    """MACs of ``model`` on ``example`` with every weight matrix's MACs scaled by its
    share of non-zero weights (what a sparse kernel that skips zeros would execute)."""
    cost = profile(model, example)
    modules = dict(model.named_modules())
    total = float(cost.macs)
    for name, macs in cost.per_module.items():
        mod = modules.get(name)
        kind = weight_kind(mod) if mod is not None else None
        if kind is None or mod is None:
            continue
        w = kind.matrix(mod)
        if w.numel():
            total -= macs * (1.0 - float((w != 0).sum()) / w.numel())
    return total


def joint_run(
    work: nn.Module,
    batches: list[Any],
    info: CalibrationInfo,
    cfg: CompressConfig,
    channel: Method,
    weights: Method,
    ctx: RunContext,
    t0: float,
) -> tuple[nn.Module, CompressionReport]:
    """Compress ``work`` in place to ``cfg``'s target with ``channel`` and ``weights`` on
    one budget (see the module docstring); ``(work, report)``."""
    kind, fraction = joint_budget(cfg.parsed_target)
    walgo = _check_weight_method(weights)
    report = CompressionReport(method=cfg.method, target=str(cfg.parsed_target))
    report.config = cfg.to_dict()
    state = ChannelRun(work, batches, info, cfg, channel.for_run(ctx), ctx, report)
    work.eval()
    analyse_stage(state)
    assert state.analysis is not None and state.cost0 is not None

    t = time.perf_counter()
    units = sparsifiable(work, report)
    if not units:
        raise ValueError(
            f"method '{cfg.method}': the model has no weight matrix to sparsify (no nn.Linear, "
            "nn.Conv1d/2d/3d or other registered weight module with an unshared weight)"
        )
    names = [n for n, _, _ in units]
    by_name = {n: (m, k) for n, m, k in units}
    weights0 = {n: k.matrix(m).detach().double().cpu().numpy() for n, m, k in units}
    nonzeros0 = sum(int(np.count_nonzero(w)) for w in weights0.values())
    grams0 = input_grams(
        work,
        batches,
        names,
        sums=walgo.needs_mean,
        progress=ctx.wrap(len(batches), "weight statistics", unit="batch"),
    )
    ctx.team.reduce(grams0)  # several processes: the whole calibration set's Grams
    wcurves, _, _ = weight_curves(walgo, names, by_name, weights0, grams0, ctx)
    # matrices without a Gram (grouped convs) stay dense but still count in the budget
    del grams0
    report.timings["weight curves"] = time.perf_counter() - t

    collect_stage(state)
    solve_curves_stage(state)

    t = time.perf_counter()
    cost_model = cost_model_of(state)
    alloc = greedy_allocate(
        kind,
        fraction,
        cost_model,
        state.curves,
        wcurves,
        round_to=cfg.round_to,
        min_width=cfg.min_width,
        max_error=cfg.max_error if cfg.on_unreachable == "stop" else None,
    )
    alloc = ctx.team.broadcast(alloc)  # rank 0's widths and densities on every rank
    report.allocation = allocation_record(alloc, state.analysis)
    if not alloc.reachable:
        message = _unreachable(cfg, alloc, kind)
        if cfg.on_unreachable == "raise":
            raise UnreachableTargetError(message)
        report.warnings.append(message)
    state.widths = dict(alloc.widths)
    state.make_plans(alloc.widths)
    report.timings["allocation"] = time.perf_counter() - t
    apply_stage(state)
    report_stage(state)

    # the weight stage: the greedy's densities on the pruned matrices
    t = time.perf_counter()
    sizes = {n: k.matrix(m).numel() for n, m, k in sparsifiable(work, CompressionReport("", ""))}
    dens = {n: float(alloc.densities.get(n, 1.0)) for n in sizes}
    total = sum(sizes.values())
    overall = sum(dens[n] * sizes[n] for n in sizes) / total if total else 1.0
    cfg2 = CompressConfig.from_dict(
        {
            **cfg.to_dict(),
            "method": walgo.name,
            "target": f"sparsity={max(0.0, 1.0 - overall):.12g}",
            "options": {},
        }
    )
    work, r2 = sparsify_run(work, batches, info, cfg2, walgo, ctx, t, densities=dens)
    merged = merge_reports(report, r2, nonzeros_before=nonzeros0)
    # after the weight stage's exact removal of channels no consumer reads any more
    merged.nonzeros_after = weight_nonzeros(work)
    merged.warnings = [
        w.replace("the non-zero counts above are before", "the non-zero counts are after")
        for w in merged.warnings
    ]
    merged.method, merged.target = cfg.method, str(cfg.parsed_target)
    merged.config = {**cfg.to_dict(), "stages": [report.config, r2.config]}
    merged.config["joint"] = _joint_summary(alloc, state, merged, work, kind)
    merged.seconds = time.perf_counter() - t0
    return work, merged


def _joint_summary(
    alloc: JointAllocation, state: ChannelRun, report: CompressionReport, work: nn.Module, kind: str
) -> dict[str, Any]:
    """What the greedy chose and what the compressed model measures against the budget."""
    assert state.cost0 is not None
    if kind == "nonzeros":
        measured = report.nonzeros_after / report.nonzeros_before if report.nonzeros_before else 1
    elif kind == "macs":
        measured = sparse_macs(work, state.example) / state.cost0.macs if state.cost0.macs else 1
    else:
        nz = sum(int((p != 0).sum()) for p in work.parameters())
        measured = nz / state.cost0.params if state.cost0.params else 1.0
    assert state.analysis is not None
    return {
        "kind": kind,
        "target": alloc.target,
        "modelled": alloc.reached,
        "measured": float(measured),
        "groups_narrowed": sum(
            1 for g, k in alloc.widths.items() if k < state.analysis.groups[g].width
        ),
        "densities": {n: round(d, 6) for n, d in alloc.densities.items()},
    }
