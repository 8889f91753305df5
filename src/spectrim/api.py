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
import time
from collections.abc import Callable, Iterable
from typing import Any

import numpy as np
from torch import nn

from spectrim._threads import single_threaded_blas
from spectrim.budget import CostModel, allocate, dof_widths
from spectrim.calibration import Collected, collect
from spectrim.calibration.batches import as_batches, check_batch, head_examples, inputs_only
from spectrim.calibration.sequential import sequential_correct
from spectrim.config import RUN_FIELDS, CompressConfig, Target
from spectrim.evaluation.flops import profile
from spectrim.graph import GroupPlan, apply_plan
from spectrim.graph.layout import (
    memory_formats,
    restore_formats,
    suits_channels_last,
    to_channels_last,
)
from spectrim.graph.trace import batch_len
from spectrim.graph.verify import trace_and_check
from spectrim.methods import get_method
from spectrim.report import CompressionReport, GroupReport

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
    **options: Any,
) -> tuple[nn.Module, CompressionReport]:
    """Compress ``model`` with ``method`` to ``target``; return ``(new_model, report)``.

    Args:
        model: a trained model.  Not modified unless ``inplace=True``.
        calibration: unlabelled inputs (see :func:`as_batches`); a few hundred examples
            are enough for most CNNs.
        method: registered method name (default ``"id"``); overrides ``config.method``.
        target: ``"macs=F"``, ``"params=F"``, ``"width=F"`` or ``"error=E"`` (or a
            :class:`~spectrim.config.Target`); overrides ``config.target``.
        config: a full :class:`~spectrim.config.CompressConfig`.
        inplace: prune ``model`` itself instead of a deep copy.
        progress: show a progress bar over calibration batches (or pass a wrapper).
        **options: extra :class:`~spectrim.config.CompressConfig` fields
            (``round_to``, ``min_width``, ``verify``, ``seed``, ``sequential``) or
            method options (e.g. ``ridge`` for ``id``).
    """
    t0 = time.perf_counter()
    base = config or CompressConfig()
    d = base.to_dict()
    if method is not None:
        d["method"] = method
    if target is not None:
        d["target"] = str(target)
    for key in list(options):
        if key in RUN_FIELDS:
            d[key] = options.pop(key)
    d["options"] = {**d.get("options", {}), **options}
    cfg = CompressConfig.from_dict(d)
    tgt = cfg.parsed_target
    algo = (
        get_method(cfg.method, **cfg.options)
        if cfg.method != "random"
        else get_method("random", seed=cfg.seed, **cfg.options)
    )
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")

    batches = as_batches(calibration)
    check_batch(batches[0])
    example = head_examples(batches[0])
    work = model if inplace else copy.deepcopy(model)
    work.eval()
    timings: dict[str, float] = {}

    t = time.perf_counter()
    analysis, pinned_warnings = trace_and_check(work, example, verify=cfg.verify, seed=cfg.seed)
    kernels = _has_functional_products(analysis)
    cost0 = profile(work, example, kernels=kernels)
    report = CompressionReport(method=cfg.method, target=str(tgt), config=cfg.to_dict())
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
    solvers = {}
    for g in groups:
        gstats = {
            slot.module: stats[(g.index, slot.module)]
            for slot in g.consumers
            if (g.index, slot.module) in stats
        }
        solvers[g.index] = algo.solver(g, gstats, work)
    curves = {gi: s.error_curve() for gi, s in solvers.items()}
    other = cost0.macs - sum(cost0.per_module.values())
    cost_model = CostModel(work, analysis, cost0.per_module, other_macs=max(other, 0))
    if tgt.kind == "dof":
        widths = dof_widths(tgt.value, solvers, round_to=cfg.round_to, min_width=cfg.min_width)
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
        ridge = float(cfg.options.get("ridge", 0.0))
        row_ridge: dict[int, np.ndarray] = {}
        for gi, kept in keep.items():
            r = solvers[gi].row_ridge(kept)
            if r is not None:
                row_ridge[gi] = r
        # float64 fit products only where the fit can be (nearly) exact
        exact = {gi: bool(curves[gi][widths[gi]] < _EXACT_FIT_BELOW**2) for gi in keep}
        report.fitted_examples = sum(batch_len(b) for b in batches[: collected.n_stored])
        folds, seq_errors = sequential_correct(
            work,
            analysis,
            batches[: collected.n_stored],
            keep,
            collected,
            ridge=ridge,
            row_ridge=row_ridge,
            exact=exact,
            channels_last=channels_last,
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
    report.timings = timings
    report.seconds = time.perf_counter() - t0
    return work, report


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
