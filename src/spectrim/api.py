"""The one entry point: :func:`compress`.

Example::

    >>> import torch, torch.nn as nn, spectrim
    >>> net = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 3))
    >>> small, report = spectrim.compress(net, torch.randn(256, 8), target="width=0.5")
    >>> small[0].out_features, net[0].out_features
    (16, 32)
"""

from __future__ import annotations

import copy
import functools
import math
import re
import time
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import numpy as np
from torch import nn

from spectrim._sparsify import sparsify_run
from spectrim._threads import single_threaded_blas
from spectrim.budget import Allocation, CostModel, allocate, allocate_budget, dof_widths
from spectrim.calibration import Collected, collect
from spectrim.calibration.batches import as_batches, inputs_only
from spectrim.calibration.checks import (
    CalibrationInfo,
    check_calibration,
    rows_per_group,
)
from spectrim.calibration.sequential import sequential_correct
from spectrim.config import (
    RUN_FIELDS,
    WEIGHT_TARGETS,
    CompressConfig,
    Target,
    UnreachableTargetError,
)
from spectrim.context import RunContext
from spectrim.evaluation.flops import profile
from spectrim.graph import GroupPlan, ModuleSnapshot, UnitGroup, apply_plan
from spectrim.graph.layout import (
    memory_formats,
    restore_formats,
    suits_channels_last,
    to_channels_last,
)
from spectrim.graph.trace import batch_len
from spectrim.linalg import prediction_error_curve
from spectrim.methods import Method, WeightMethod, get_method, method_kinds
from spectrim.report import CompressionReport, GroupReport
from spectrim.stages import solve_stage, trace_stage

__all__ = ["compress", "inputs_only", "as_batches"]


@single_threaded_blas()
def compress(
    model: nn.Module,
    calibration: Any,
    method: str | None = None,
    target: str | Target | None = None,
    *,
    config: CompressConfig | None = None,
    inplace: bool = False,
    progress: bool | Callable[[Iterable[Any]], Iterable[Any]] = False,
    then: CompressConfig | Mapping[str, Any] | None = None,
    **options: Any,
) -> tuple[nn.Module, CompressionReport]:
    """Compress ``model`` with ``method`` to ``target``; return ``(new_model, report)``.

    Args:
        model: a trained model.  Not modified unless ``inplace=True``.
        calibration: unlabelled inputs (see :func:`as_batches`); a few hundred examples
            are enough for most CNNs.
        method: registered method name (default ``"id"``); overrides ``config.method``.
        target: ``"macs=F"``, ``"params=F"``, ``"width=F"`` or ``"error=E"`` (channel
            methods), ``"sparsity=S"``, ``"sparsity=n:m"`` or ``"auto"`` (weight methods:
            ``obs``, ``wanda``, ``lq``, ...), or a :class:`~spectrim.config.Target`;
            overrides ``config.target``.
        config: a full :class:`~spectrim.config.CompressConfig`.
        inplace: prune ``model`` itself instead of a deep copy.  If the run fails midway,
            the model is put back as it was (from references to its tensors, no copy).
        progress: show a progress bar over calibration batches (or pass a wrapper).
        then: a second stage run on the result, in the same call and one report, e.g.
            ``then={"method": "obs", "target": "sparsity=0.5"}`` after ``"id"`` to
            ``macs=0.5``: channels first, then 50% of the remaining weights (a
            :class:`~spectrim.config.CompressConfig` or its dict; its statistics are
            collected on the already-pruned model, whose activations they must describe).
        **options: extra :class:`~spectrim.config.CompressConfig` fields
            (``round_to``, ``min_width``, ``verify``, ``seed``, ``sequential``,
            ``on_unreachable``, ``max_error``) or method options (e.g. ``ridge`` for
            ``id``), checked against the method's option types.

    Raises:
        CalibrationError: NaN/inf in the calibration data (named by batch and example) or
            in the model's activations, or all examples identical.
        UnreachableTargetError: the target cannot be reached and
            ``on_unreachable="raise"``.
    """
    t0 = time.perf_counter()
    base = config or CompressConfig()
    if not isinstance(base, CompressConfig):
        raise TypeError(f"config must be a CompressConfig, got {type(base).__name__}")
    d = base.to_dict()
    if method is not None:
        d["method"] = method
    if target is not None:
        d["target"] = str(target)
    for key in list(options):
        if key in RUN_FIELDS:
            d[key] = options.pop(key)
    d["options"] = {**d.get("options", {}), **options}
    if target is None and config is None and method_kinds(d["method"]) == ["weight"]:
        # a weight method alone: its own rule where it has one, else say what it needs
        d["target"] = "auto"
    cfg = CompressConfig.from_dict(d)
    algo = _method_for(cfg)
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")

    batches = as_batches(calibration)
    info = check_calibration(batches)
    work = model if inplace else copy.deepcopy(model)
    snapshot = ModuleSnapshot(work) if inplace else None
    try:
        result = _run_stage(work, batches, info, cfg, algo, progress, t0)
        if then is not None:
            result = _then(result, batches, info, then, progress)
        return result
    except BaseException:
        if snapshot is not None:
            snapshot.restore()  # never leave the user's model half-pruned
        raise


def _method_for(cfg: CompressConfig) -> Method:
    """The method ``cfg`` names, of the kind its target asks for (a weight target:
    the weight method; channel ``random`` gets the run's seed)."""
    kind = "weight" if cfg.parsed_target.kind in WEIGHT_TARGETS else "channel"
    if cfg.method == "random" and kind == "channel":
        return get_method("random", "channel", seed=cfg.seed, **cfg.options)
    return get_method(cfg.method, kind, **cfg.options)


def _run_stage(
    work: nn.Module,
    batches: list[Any],
    info: CalibrationInfo,
    cfg: CompressConfig,
    algo: Method,
    progress: bool | Callable[[Iterable[Any]], Iterable[Any]],
    t0: float,
) -> tuple[nn.Module, CompressionReport]:
    if isinstance(algo, WeightMethod):
        ctx = RunContext(seed=cfg.seed, progress=progress)
        return sparsify_run(work, batches, info, cfg, algo, ctx, t0)
    return _compress(work, batches, info, cfg, algo, progress, t0)


def _then(
    first: tuple[nn.Module, CompressionReport],
    batches: list[Any],
    info: CalibrationInfo,
    then: CompressConfig | Mapping[str, Any],
    progress: bool | Callable[[Iterable[Any]], Iterable[Any]],
) -> tuple[nn.Module, CompressionReport]:
    """Run the second stage on the first's result and merge the two reports."""
    if isinstance(then, CompressConfig):
        cfg2 = then
    elif isinstance(then, Mapping):
        cfg2 = CompressConfig.from_dict(dict(then))
    else:
        raise TypeError(f"then= must be a CompressConfig or a dict, got {type(then).__name__}")
    algo2 = _method_for(cfg2)
    model, r1 = first
    t0 = time.perf_counter()
    model, r2 = _run_stage(model, batches, info, cfg2, algo2, progress, t0)
    merged = CompressionReport(
        method=f"{r1.method}+{r2.method}",
        target=f"{r1.target}, then {r2.target}",
        config={"stages": [r1.config, r2.config]},
        params_before=r1.params_before,
        params_after=r2.params_after,
        macs_before=r1.macs_before,
        macs_after=r2.macs_after,
        seconds=r1.seconds + r2.seconds,
        timings={
            **{f"1.{k}": v for k, v in r1.timings.items()},
            **{f"2.{k}": v for k, v in r2.timings.items()},
        },
        calibration_rows=r1.calibration_rows,
        fitted_examples=r1.fitted_examples,
        groups=r1.groups or r2.groups,
        matrices=r2.matrices or r1.matrices,
        nonzeros_before=r2.nonzeros_before,
        nonzeros_after=r2.nonzeros_after,
        warnings=r1.warnings + [w for w in r2.warnings if w not in r1.warnings],
    )
    return model, merged


def _compress(
    work: nn.Module,
    batches: list[Any],
    info: CalibrationInfo,
    cfg: CompressConfig,
    algo: Method,
    progress: bool | Callable[[Iterable[Any]], Iterable[Any]],
    t0: float,
) -> tuple[nn.Module, CompressionReport]:
    tgt = cfg.parsed_target
    work.eval()
    timings: dict[str, float] = {}

    t = time.perf_counter()
    example, analysis, pinned_warnings = trace_stage(
        work, batches, verify=cfg.verify, seed=cfg.seed
    )
    kernels = _has_functional_products(analysis)
    cost0 = profile(work, example, kernels=kernels)
    report = CompressionReport(method=cfg.method, target=str(tgt), config=cfg.to_dict())
    report.warnings.extend(info.warnings)
    report.warnings.extend(pinned_warnings)
    timings["analysis"] = time.perf_counter() - t

    groups = analysis.prunable
    t = time.perf_counter()
    sequential = cfg.sequential and algo.needs_statistics and bool(groups)
    wrap: Callable[[Iterable[Any]], Iterable[Any]] | None = None
    if progress is True:
        from tqdm.auto import tqdm

        def wrap(it: Iterable[Any]) -> Iterable[Any]:
            return tqdm(it, total=len(batches), desc="calibration", unit="batch")
    elif callable(progress):
        wrap = progress
    collected = Collected(stats={})
    # the calibration passes run on spectrim's own copy, in the layout that runs fastest
    formats = memory_formats(work)
    channels_last = bool(
        cfg.channels_last is not False
        and algo.needs_statistics
        and groups
        and suits_channels_last(work, batches)
    )
    if channels_last:
        channels_last = to_channels_last(work, example, ref=analysis.graph.output_tensors)
        if not channels_last and cfg.channels_last:
            report.warnings.append(
                "channels_last=True: the model does not reproduce its outputs in "
                "channels_last layout; the calibration passes ran in its own layout"
            )
    if algo.needs_statistics and groups:
        share = cfg.sequential_fraction if sequential else 0.0
        collected = collect(
            work,
            analysis,
            batches,
            groups,
            progress=wrap,
            store_fraction=share,
            channels_last=channels_last,
        )
    stats = collected.stats
    if algo.needs_statistics and groups:
        report.calibration_rows = sum(batch_len(b) for b in batches)
    timings["statistics"] = time.perf_counter() - t

    t = time.perf_counter()
    rows: dict[int, float] = {}
    if algo.needs_statistics:
        rows = rows_per_group(groups, stats, info)
        groups = _pin_underdetermined(analysis, groups, rows, info, report)
    solvers = solve_stage(algo, groups, stats, work)
    curves = {gi: s.error_curve() for gi, s in solvers.items()}
    # least-squares errors measured on the calibration rows the fits use are optimistic:
    # judge every width by its expected error on new inputs
    curves = {
        gi: prediction_error_curve(e, rows[gi])
        if gi in rows and solvers[gi].least_squares_curve
        else e
        for gi, e in curves.items()
    }
    other = cost0.macs - sum(cost0.per_module.values())
    cost_model = CostModel(work, analysis, cost0.per_module, other_macs=max(other, 0))
    alloc = None
    if tgt.kind == "dof":
        widths = dof_widths(tgt.value, solvers, round_to=cfg.round_to, min_width=cfg.min_width)
    elif tgt.kind in ("macs", "params"):
        alloc = allocate_budget(
            tgt,
            curves,
            cost_model,
            round_to=cfg.round_to,
            min_width=cfg.min_width,
            max_error=cfg.max_error if cfg.on_unreachable == "stop" else None,
        )
        if not alloc.reachable:
            message = _unreachable_message(tgt, alloc, analysis, cfg)
            if cfg.on_unreachable == "raise":
                raise UnreachableTargetError(message)
            report.warnings.append(message)
        widths = alloc.widths
    else:
        widths = allocate(tgt, curves, cost_model, round_to=cfg.round_to, min_width=cfg.min_width)
    plans: dict[int, GroupPlan] = {}
    for gi, k in widths.items():
        if k < analysis.groups[gi].width:
            plans[gi] = solvers[gi].plan(k)
    timings["selection"] = time.perf_counter() - t
    seq_errors: dict[tuple[int, str], float] = {}
    t = time.perf_counter()
    if sequential and plans and any(p.folds for p in plans.values()):
        keep = {gi: np.sort(p.keep) for gi, p in plans.items()}
        # each solver owns its correction, refit included: a constrained one keeps it
        refits = {gi: functools.partial(solvers[gi].refit, kept) for gi, kept in keep.items()}
        # float64 fit products only where the fit can be (nearly) exact
        exact = {gi: bool(curves[gi][widths[gi]] < _EXACT_FIT_BELOW**2) for gi in keep}
        report.fitted_examples = sum(batch_len(b) for b in batches[: collected.n_stored])
        folds, seq_errors = sequential_correct(
            work,
            analysis,
            batches[: collected.n_stored],
            keep,
            collected,
            exact=exact,
            channels_last=channels_last,
            refit=refits,
        )
        for gi, f in folds.items():
            plans[gi].folds = f
        timings["sequential"] = time.perf_counter() - t
    else:
        apply_plan(work, analysis, plans)
        timings["surgery"] = time.perf_counter() - t
    collected.inputs.clear()
    if channels_last:
        restore_formats(work, formats)  # the user's layout, stride for stride
    cost1 = profile(work, example, kernels=kernels)

    for g in analysis.groups:
        k = widths.get(g.index, g.width)
        gr = GroupReport(
            name=g.name,
            width_before=g.width,
            width_after=k,
            producers=list(g.producers),
            consumers=[c.module for c in g.consumers],
            pinned=g.pinned,
            rows=int(rows[g.index]) if g.index in rows else None,
        )
        if g.index in curves:
            gr.predicted_error = float(np.sqrt(max(curves[g.index][k], 0.0)))
        if g.index in plans:
            if seq_errors:
                gr.consumer_errors = {
                    c.module: seq_errors[(g.index, c.module)]
                    for c in g.consumers
                    if (g.index, c.module) in seq_errors
                }
            else:
                gr.consumer_errors = solvers[g.index].reconstruction_errors(plans[g.index])
        report.groups.append(gr)
    report.params_before, report.params_after = cost0.params, cost1.params
    report.macs_before, report.macs_after = cost0.macs, cost1.macs
    if alloc is not None and alloc.reachable:
        reached = report.macs_ratio if tgt.kind == "macs" else report.params_ratio
        if reached > tgt.value + 0.005:
            report.warnings.append(
                f"target {tgt} not reached: the compressed model has {reached:.3f} of the "
                f"original {tgt.kind.upper() if tgt.kind == 'macs' else 'parameters'} (the "
                f"allocation modelled {alloc.reached:.3f}; the difference is in costs the "
                "model of the allocator does not see, or in round_to/min_width)"
            )
    summary = _pin_summary(analysis)
    if summary:
        report.warnings.insert(0, summary)
    report.timings = timings
    report.seconds = time.perf_counter() - t0
    return work, report


def _reason_kind(reason: str) -> str:
    """A pin reason without the names of the modules it was found at."""
    text = re.sub(r"module '[^']*' \(", "module (", reason)
    text = re.sub(r"(consumer|channel produced twice by|unit group) '[^']*'", r"\1", text)
    text = re.sub(r"'[^']*' is tied to '[^']*'", "a parameter is tied to another module's", text)
    text = re.sub(r"\(groups=\d+\)", "", text)
    text = re.sub(r"value \d+", "a value", text)
    text = re.sub(r"\d+ calibration rows? .*", "too few calibration rows", text)
    return text.strip()


def _pin_summary(analysis: Any, top: int = 3) -> str | None:
    """One line: how many groups are pinned, and the most common reasons."""
    pinned = [g for g in analysis.groups if g.pinned is not None]
    if not pinned:
        return None
    counts = Counter(_reason_kind(g.pinned) for g in pinned)
    reasons = "; ".join(f"{n}× {why}" for why, n in counts.most_common(top))
    more = len(counts) - top
    return (
        f"{len(pinned)} of {len(analysis.groups)} unit groups are pinned and keep their width "
        f"({reasons}{f'; {more} other reason(s)' if more > 0 else ''}; see report.groups)"
    )


def _pin_underdetermined(
    analysis: Any,
    groups: list[UnitGroup],
    rows: Mapping[int, float],
    info: CalibrationInfo,
    report: CompressionReport,
) -> list[UnitGroup]:
    """Pin the groups whose fits would have fewer rows than channels; return the rest.

    With ``n < m`` rows, any ``n`` of the ``m`` channels reproduce the others exactly on
    the calibration data, so every error would read 0 and every correction would be fitted
    to noise (13.7x the output norm on new inputs in the issue's dla34 example).
    """
    keep = []
    for g in groups:
        n = rows.get(g.index)
        if n is None or n >= g.width:
            keep.append(g)
            continue
        per_example = n / max(info.distinct, 1)
        need = math.ceil(g.width / per_example) if per_example > 0 else g.width
        analysis.pin(
            g,
            f"{int(n)} calibration rows for {g.width} channels: errors and corrections "
            f"fitted on fewer rows than channels cannot be checked (about {need} distinct "
            "examples needed)",
        )
        report.warnings.append(
            f"unit group '{g.name}' ({g.width} channels) kept whole: its statistics have "
            f"{int(n)} calibration rows ({info.distinct} distinct examples), fewer than its "
            f"channels, so no error it would report could be trusted; pass at least {need} "
            "distinct examples to compress it"
        )
    return keep


def _unreachable_message(tgt: Target, alloc: Allocation, analysis: Any, cfg: CompressConfig) -> str:
    what = "MACs" if tgt.kind == "macs" else "parameters"
    pinned = sum(1 for g in analysis.groups if g.pinned is not None)
    reasons = Counter(_reason_kind(g.pinned) for g in analysis.groups if g.pinned is not None)
    why = "; ".join(f"{n}× {r}" for r, n in reasons.most_common(3)) or "none"
    if cfg.on_unreachable == "stop":
        done = (
            f"stopped at {tgt.kind}={alloc.reached:.3f}, where no group's predicted "
            f"relative error exceeds max_error={cfg.max_error:g}"
            + (f" ({len(alloc.held)} groups held there)" if alloc.held else "")
        )
    elif cfg.on_unreachable == "force":
        done = f"every prunable group cut to its minimum width: {tgt.kind}={alloc.reached:.3f}"
    else:
        done = "nothing was compressed"
    return (
        f"target {tgt} is unreachable: even every prunable group at its minimum width keeps "
        f"{alloc.floor:.3f} of the {what}, because {pinned} of {len(analysis.groups)} unit "
        f"groups are pinned ({why}) and the rest of the cost is in layers no group shrinks; "
        f"{done}. To go further: ask for {tgt.kind}>={alloc.floor:.3f}, raise max_error, "
        "or let spectrim map the ops the pins name (report.groups has each reason)"
    )


# Groups whose predicted relative error at their width is below this get float64
# products in the sequential fits (exactness to 1e-5); the others float32 (3x cheaper).
_EXACT_FIT_BELOW = 1e-2

_PRODUCTS = {
    "matmul", "mm", "bmm", "baddbmm", "addmm", "addbmm", "mv", "dot", "linear", "einsum",
    "scaled_dot_product_attention", "conv1d", "conv2d", "conv3d", "conv_transpose1d",
    "conv_transpose2d", "conv_transpose3d", "tensordot", "inner", "outer",
}  # fmt: skip


def _has_functional_products(analysis: Any) -> bool:
    """Whether the traced graph multiplies tensors outside hook-counted modules."""
    for op in analysis.graph.ops:
        if op.kind == "function" and op.name in _PRODUCTS:
            return True
        if op.kind == "module" and isinstance(op.target, (nn.MultiheadAttention, nn.RNNBase)):
            return True
    return False
