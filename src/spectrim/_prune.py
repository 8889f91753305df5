"""The channel-pruning run behind :func:`spectrim.compress`, as named stages.

``trace → collect → solve → allocate → apply → report``: :func:`spectrim.stages.trace_stage`
and :func:`~spectrim.stages.solve_stage` are shared with ``analyze``; this module adds

* :func:`collect_stage`: the calibration pass (in channels_last where that runs faster);
* :func:`allocate_stage`: the widths a target asks for, from the solvers' error curves
  and the cost model;
* :func:`apply_stage`: each group's plan applied, through the sequential pass (each
  solver refits its own correction on the compressed prefix) or in one surgery;
* :func:`report_stage`: the per-group report, costs and warnings.

:func:`prune_run` chains them; every stage reads the run's :class:`~spectrim.RunContext`
(seed, progress) and writes its wall time into ``report.timings``.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import math
import re
import time
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from torch import nn

from spectrim._experts import (
    EXPERTS_SUFFIX,
    expert_grams,
    expert_step,
    gram_arrays,
    narrow_experts,
)
from spectrim._heads import (
    HEADS_SUFFIX,
    apply_heads,
    head_group_report,
    head_solver_of,
    output_grams,
    unmatched_warning,
)
from spectrim._hidden import (
    HIDDEN_SUFFIX,
    apply_hidden,
    hidden_group_report,
    one_of_two_streams,
    stream_grams,
    stream_refusal,
    tied_head,
)
from spectrim._threads import blas_threads_for
from spectrim.budget import (
    Allocation,
    CostModel,
    JointAllocation,
    allocate,
    allocate_budget,
    dof_widths,
)
from spectrim.calibration import Collected, collect
from spectrim.calibration.batches import stack_examples
from spectrim.calibration.blocks import (
    PREFIX,
    SUFFIX,
    blockwise_correct,
    blockwise_statistics,
    find_chain,
    find_ends,
    plan_blocks,
    suffix_reads_chain_only,
)
from spectrim.calibration.checks import CalibrationInfo, rows_per_group
from spectrim.calibration.gram import GramAccumulator
from spectrim.calibration.outputs import resolve_fit
from spectrim.calibration.sequential import ReaderFits, sequential_correct
from spectrim.calibration.sketch import default_stats_memory, plan_sketches, sketch_groups_message
from spectrim.config import CompressConfig, Target, UnreachableTargetError, parse_bytes
from spectrim.context import RunContext
from spectrim.evaluation.flops import ModelCost, hook_counted, profile
from spectrim.evaluation.latency import compare_latency, module_latencies
from spectrim.graph import Analysis, GroupPlan, UnitGroup, apply_plan
from spectrim.graph.attention import AttentionBlock, find_attention, prepare_attention
from spectrim.graph.experts import ExpertBlock, find_experts
from spectrim.graph.layout import (
    memory_formats,
    restore_formats,
    suits_channels_last,
    to_channels_last,
)
from spectrim.graph.modules import module_kind, weight_kind
from spectrim.graph.stream import ResidualStream, find_stream, width_step
from spectrim.graph.trace import batch_len, routed_modules
from spectrim.linalg import prediction_error_curve
from spectrim.methods import GroupSolver, Method
from spectrim.methods.experts import ExpertSolver
from spectrim.methods.heads import HeadSolver
from spectrim.methods.stream import StreamSolver
from spectrim.report import CompressionReport, GroupReport
from spectrim.stages import solve_stage, trace_stage

__all__ = [
    "ChannelRun",
    "allocate_stage",
    "analyse_stage",
    "apply_stage",
    "collect_stage",
    "cost_model_of",
    "finish_run",
    "fork_run",
    "prepare_run",
    "prune_run",
    "report_stage",
    "solve_curves_stage",
    "allocation_record",
    "unreachable_message",
]


@dataclass
class ChannelRun:
    """What the stages of one channel-pruning run hand on to each other."""

    work: nn.Module
    batches: list[Any]
    info: CalibrationInfo
    cfg: CompressConfig
    method: Method
    ctx: RunContext
    report: CompressionReport
    example: Any = None
    analysis: Analysis | None = None
    kernels: bool = False
    cost0: ModelCost | None = None
    groups: list[UnitGroup] = field(default_factory=list)
    collected: Collected = field(default_factory=lambda: Collected(stats={}))
    #: rows of each sketched group's sketch (kept for the report when the sketches go)
    sketch_rows: dict[int, int] = field(default_factory=dict)
    channels_last: bool = False
    formats: Any = None
    rows: dict[int, float] = field(default_factory=dict)
    solvers: dict[int, GroupSolver] = field(default_factory=dict)
    curves: dict[int, np.ndarray] = field(default_factory=dict)
    widths: dict[int, int] = field(default_factory=dict)
    alloc: Allocation | None = None
    plans: dict[int, GroupPlan] = field(default_factory=dict)
    #: groups whose plan holds the kept channels only: the sequential pass fits their folds
    deferred: set[int] = field(default_factory=set)
    #: modules whose input rows the model routes by its own activations (MoE experts held
    #: as modules): the call that picks their rows (:func:`routed_modules`)
    routed: dict[str, str] = field(default_factory=dict)
    seq_errors: dict[tuple[int, str], float] = field(default_factory=dict)
    #: attention heads on the same budget (``cfg.heads``), keyed HEAD_KEY + block index
    blocks: list[AttentionBlock] = field(default_factory=list)
    head_grams: dict[str, np.ndarray] = field(default_factory=dict)
    head_solvers: dict[int, HeadSolver] = field(default_factory=dict)
    #: the residual stream on the same budget (``cfg.hidden``), keyed HIDDEN_KEY
    stream: ResidualStream | None = None
    stream_gram: np.ndarray | None = None
    stream_solver: StreamSolver | None = None
    #: the experts of MoE layers on the same budget (``cfg.experts``), keyed EXPERTS_KEY +
    #: layer index: their Grams on the original model, solvers and report lines
    expert_blocks: list[ExpertBlock] = field(default_factory=list)
    expert_grams: dict[str, list[np.ndarray | None]] = field(default_factory=dict)
    expert_rows: dict[str, int] = field(default_factory=dict)
    expert_solvers: dict[int, ExpertSolver] = field(default_factory=dict)
    expert_reports: list[GroupReport] = field(default_factory=list)
    #: ``blockwise=True``: the chain of blocks the sequential pass runs on (empty: none)
    chain: list[str] = field(default_factory=list)
    #: the modules run before the chain and after it (a stem, a classifier), which the
    #: first and the last block may include
    ends: tuple[list[str], list[str]] = ([], [])
    #: the sequential pass's consumer fit (``cfg.sequential_fit`` with ``"auto"`` resolved)
    fit: str = "inputs"
    #: the groups' solvers and curves were made during the statistics pass
    #: (``block_statistics``)
    solved: bool = False
    #: a copy made by :func:`fork_run`: its solvers are shared, and not released
    forked: bool = False

    @property
    def sequential(self) -> bool:
        return bool(self.cfg.sequential and self.method.needs_statistics and self.groups)

    def make_plans(self, widths: Mapping[int, int]) -> None:
        """Every narrowed group's plan; without its folds where the sequential pass will
        fit them anyway (:meth:`GroupSolver.kept`)."""
        assert self.analysis is not None
        self.plans, self.deferred = {}, set()
        for gi, k in widths.items():
            if gi >= HEAD_KEY or k >= self.analysis.groups[gi].width:
                continue
            routed = any(c.module in self.routed for c in self.analysis.groups[gi].consumers)
            # a routed consumer keeps the correction fitted on the original model
            keep = self.solvers[gi].kept(k) if self.sequential and not routed else None
            if keep is None:
                self.plans[gi] = self.solvers[gi].plan(k)
            else:
                self.plans[gi] = GroupPlan(keep=keep)
                self.deferred.add(gi)


def _timed(name: str, factorises: bool = False) -> Any:
    """Record the decorated stage's wall time as ``report.timings[name]``; a stage that
    ``factorises`` runs BLAS on all of torch's threads when a group is wide
    (:func:`~spectrim._threads.blas_threads_for`)."""

    def deco(fn: Any) -> Any:
        @functools.wraps(fn)
        def run(state: ChannelRun, *args: Any, **kwargs: Any) -> Any:
            t = time.perf_counter()
            width = max((g.width for g in state.groups), default=0) if factorises else 0
            try:
                with blas_threads_for(width):
                    return fn(state, *args, **kwargs)
            finally:
                state.report.timings[name] = time.perf_counter() - t

        return run

    return deco


#: allocation keys of attention layers: HEAD_KEY + the layer's index (no channel group has
#: so many groups)
HEAD_KEY = 1 << 24
#: allocation key of the residual stream (above every head key)
HIDDEN_KEY = 1 << 25
#: allocation keys of MoE layers' experts: EXPERTS_KEY + the layer's index
EXPERTS_KEY = 1 << 26


def prune_run(
    work: nn.Module,
    batches: list[Any],
    info: CalibrationInfo,
    cfg: CompressConfig,
    method: Method,
    ctx: RunContext,
    t0: float,
) -> tuple[nn.Module, CompressionReport]:
    """Prune the channels of ``work`` in place as ``cfg`` says; ``(work, report)``."""
    return finish_run(prepare_run(work, batches, info, cfg, method, ctx), t0)


def prepare_run(
    work: nn.Module,
    batches: list[Any],
    info: CalibrationInfo,
    cfg: CompressConfig,
    method: Method,
    ctx: RunContext,
) -> ChannelRun:
    """The first half of :func:`prune_run`: trace, statistics and error curves, none of
    which depends on the allocation (the target, ``group_weights``)."""
    report = CompressionReport(method=cfg.method, target=str(cfg.parsed_target))
    report.config = cfg.to_dict()
    state = ChannelRun(work, batches, info, cfg, method.for_run(ctx), ctx, report)
    work.eval()
    if cfg.heads:  # before the trace: the cost model must see the swapped attention
        prepare_attention(work)
    analyse_stage(state)
    collect_stage(state)
    solve_curves_stage(state)
    return state


def finish_run(state: ChannelRun, t0: float) -> tuple[nn.Module, CompressionReport]:
    """The second half of :func:`prune_run`: allocate, apply (pruning ``state.work`` in
    place) and report."""
    allocate_stage(state)
    apply_stage(state)
    report_stage(state)
    state.report.seconds = time.perf_counter() - t0
    return state.work, state.report


def fork_run(state: ChannelRun, cfg: CompressConfig) -> ChannelRun:
    """A prepared run (:func:`prepare_run`) that :func:`finish_run` can finish under
    ``cfg`` (the same statistics; another allocation, e.g. other ``group_weights``) on a
    copy of its model, leaving ``state`` as it was: the statistics, stored inputs and
    solvers are shared and only read (the fork keeps its solvers' selection state, which
    :func:`apply_stage` would otherwise release).  How ``search=N`` compresses its
    candidates without collecting the same statistics again."""
    collected = state.collected
    # the attention layers and the stream are rewritten by their surgery (head counts,
    # writers), and their solvers refer to them: copied together
    blocks, stream, head_solvers, stream_solver, expert_blocks, expert_solvers = copy.deepcopy(
        (
            state.blocks,
            state.stream,
            state.head_solvers,
            state.stream_solver,
            state.expert_blocks,
            state.expert_solvers,
        )
    )
    fork = dataclasses.replace(
        state,
        work=copy.deepcopy(state.work),
        blocks=blocks,
        stream=stream,
        head_solvers=head_solvers,
        stream_solver=stream_solver,
        expert_blocks=expert_blocks,
        expert_solvers=expert_solvers,
        expert_reports=[],
        cfg=cfg,
        report=copy.deepcopy(state.report),
        collected=dataclasses.replace(
            collected,
            stats=dict(collected.stats),
            inputs=dict(collected.inputs),
            sketches=dict(collected.sketches),
            calls=list(collected.calls),
        ),
        sketch_rows=dict(state.sketch_rows),
        widths={},
        alloc=None,
        plans={},
        deferred=set(),
        seq_errors={},
        forked=True,
    )
    fork.report.config = cfg.to_dict()
    return fork


@_timed("analysis")
def analyse_stage(state: ChannelRun) -> None:
    """Trace, channel analysis and self-checks; the original costs."""
    example, analysis, pinned_warnings = trace_stage(
        state.work,
        state.batches,
        verify=state.cfg.verify,
        seed=state.ctx.seed,
        team=state.ctx.team,
    )
    state.example, state.analysis = example, analysis
    state.routed = routed_modules(analysis.graph)
    group_factors(analysis, state.cfg)  # a name that is no group fails before the statistics
    state.kernels = _has_functional_products(analysis)
    state.cost0 = profile(state.work, example, kernels=state.kernels)
    state.report.warnings.extend(state.info.warnings)
    state.report.warnings.extend(pinned_warnings)
    state.groups = analysis.prunable


@_timed("statistics")
def collect_stage(state: ChannelRun) -> None:
    """The calibration pass: the Gram of every group at every consumer (and, for the
    sequential pass, the stored inputs), on spectrim's own copy in its fastest layout."""
    work, cfg, method, groups, analysis = (
        state.work,
        state.cfg,
        state.method,
        state.groups,
        state.analysis,
    )
    assert analysis is not None
    state.formats = memory_formats(work)
    channels_last = bool(
        cfg.channels_last is not False
        and method.needs_statistics
        and groups
        and suits_channels_last(work, state.batches)
    )
    if channels_last:
        channels_last = to_channels_last(work, state.example, ref=analysis.graph.output_tensors)
        if not channels_last and cfg.channels_last:
            state.report.warnings.append(
                "channels_last=True: the model does not reproduce its outputs in "
                "channels_last layout; the calibration passes ran in its own layout"
            )
    state.channels_last = channels_last
    if method.needs_statistics and groups:
        modules = dict(work.named_modules())
        state.fit = resolve_fit(
            cfg.sequential_fit, (modules[c.module] for g in groups for c in g.consumers)
        )
        state.report.sequential_fit = state.fit if state.sequential else ""
        share = cfg.sequential_fraction if state.sequential else 0.0
        sketch_rows = _sketch_plan(state)
        asked = cfg.blockwise or cfg.block_cache is not None or cfg.block_statistics
        # by default block by block where it saves side passes: the residual fit's, and the
        # readers' targets (the whole-model pass runs the original up to each reader)
        saves = state.fit == "residual" or cfg.refit_readers
        if state.sequential and (asked or (cfg.blockwise is None and saves)):
            state.chain = _chain(state, quiet=not asked)
        if state.chain and cfg.block_statistics:
            _collect_by_blocks(state, share, sketch_rows)
        else:
            state.collected = collect(
                work,
                analysis,
                state.batches,
                groups,
                progress=state.ctx.wrap(len(state.batches), "calibration", unit="batch"),
                store_fraction=share,
                channels_last=channels_last,
                team=state.ctx.team,
                sketch_rows=sketch_rows,
                seed=state.ctx.seed,
                keep_inputs=not state.chain,
                keep_calls=state.chain,
            )
            # every rank's statistics summed: each now holds the whole calibration set's
            state.ctx.team.reduce({**state.collected.stats, **state.collected.sketches})
    if method.needs_statistics and (groups or cfg.heads or cfg.hidden or cfg.experts):
        # the examples every pass below reads too (a MoE model may have no channel group)
        rows = sum(batch_len(b) for b in state.batches)
        state.report.calibration_rows = int(state.ctx.team.total(rows))
    if cfg.heads:
        _collect_heads(state)
    if cfg.hidden:
        _collect_hidden(state)
    if cfg.experts:
        _collect_experts(state)


def _collect_by_blocks(state: ChannelRun, share: float, sketch_rows: Mapping[int, int]) -> None:
    """``block_statistics=True``: the statistics block by block
    (:func:`~spectrim.calibration.blocks.blockwise_statistics`), each block's groups
    solved as soon as their statistics are complete and their m × m state dropped, so
    that the Grams of one block (not of the whole model) are held at a time."""
    analysis = state.analysis
    assert analysis is not None
    plan = plan_blocks(state.chain, analysis, {g.index: None for g in state.groups}, *state.ends)
    assert not isinstance(plan, str)  # checked by _chain
    kept: list[UnitGroup] = []
    warnings = state.report.warnings
    pinned: list[tuple[int, str]] = []  # (group, its warning): in group order at the end

    def done(gis: list[int], stats: dict[tuple[int, str], Any]) -> None:
        grams = {k: v for k, v in stats.items() if isinstance(v, GramAccumulator)}
        sketches = {k: v for k, v in stats.items() if not isinstance(v, GramAccumulator)}
        state.sketch_rows.update({gi: sk.rows for (gi, _), sk in sketches.items()})
        n = len(warnings)
        groups = _solve_groups(state, [analysis.groups[gi] for gi in gis], grams, sketches)
        left = {g.index for g in groups}
        pinned.extend(zip([gi for gi in gis if gi not in left], warnings[n:]))
        del warnings[n:]
        kept.extend(groups)
        for g in groups:  # what the allocation and the sequential pass still need is O(m)
            solver = state.solvers[g.index]
            if type(solver).kept is not GroupSolver.kept:
                solver.release()

    state.collected = blockwise_statistics(
        state.work,
        analysis,
        state.batches,
        state.groups,
        plan,
        done,
        store_fraction=share,
        channels_last=state.channels_last,
        team=state.ctx.team,
        sketch_rows=sketch_rows,
        seed=state.ctx.seed,
        progress=state.ctx.wrap(len(plan.blocks), "statistics by block", unit="block"),
        block_cache=state.cfg.block_cache,
    )
    state.groups = sorted(kept, key=lambda g: g.index)
    warnings.extend(text for _, text in sorted(pinned, key=lambda p: p[0]))
    state.solved = True


def _chain(state: ChannelRun, quiet: bool = False) -> list[str]:
    """The model's chain of blocks, if the block-by-block pass can run every group's fits
    in it; else the whole-model pass, with a warning unless ``quiet`` (``blockwise=None``
    chose it)."""
    assert state.analysis is not None
    why = ""
    if state.cfg.heads or state.cfg.hidden or state.cfg.experts:
        why = "heads, the hidden width and the experts have their own passes"
    chain = [] if why else find_chain(state.work, state.example)
    if not why and not chain:
        why = "spectrim found no chain of blocks (layers each fed the previous one's output)"
    if not why:
        state.ends = find_ends(state.work, state.example, chain)
        plan = plan_blocks(
            chain, state.analysis, {g.index: None for g in state.groups}, *state.ends
        )
        why = plan if isinstance(plan, str) else ""
        ends = (
            not isinstance(plan, str)
            and plan.blocks[0][0] == PREFIX
            and plan.blocks[-1][-1] == SUFFIX
        )
        if ends and not state.ctx.team.broadcast(
            suffix_reads_chain_only(state.work, state.example, chain)
        ):
            why = (
                "the modules after the chain of blocks also read what the modules before "
                "it computed, so they cannot run as a block on the pruned prefix"
            )
    if why:
        if not quiet:
            cfg = state.cfg
            asked = (
                "blockwise=True"
                if cfg.blockwise
                else "block_statistics"
                if cfg.block_statistics
                else "block_cache"
            )
            state.report.warnings.append(
                f"{asked}: {why}; the corrections were fitted by the whole-model pass"
            )
        return []
    return chain


def _sketch_plan(state: ChannelRun) -> dict[int, int]:
    """Sketch rows for the groups whose exact Grams would not fit ``cfg.stats_memory``
    (:func:`~spectrim.calibration.sketch.plan_sketches`); the reason in the warnings."""
    cfg, groups = state.cfg, state.groups
    explicit = cfg.stats_memory is not None
    budget = (
        parse_bytes(cfg.stats_memory)
        if cfg.stats_memory is not None
        else default_stats_memory(state.ctx.device)
    )
    widths = {g.index: g.width for g in groups}
    names = {g.index: g.name for g in groups}
    consumers = {g.index: len(g.consumers) for g in groups}
    try:
        plan = plan_sketches(widths, consumers, budget, names=names)
        if plan and not state.method.sketches:
            g = max(plan, key=lambda i: widths[i])
            raise ValueError(
                f"stats_memory={budget} bytes: the exact Grams of unit group '{names[g]}' "
                f"({widths[g]} units) and the others do not fit, and method "
                f"'{cfg.method}' has no sketched path; raise stats_memory or use method='id'"
            )
    except ValueError as exc:
        if explicit:
            raise
        # the default budget is a guess at the machine: go on exactly, and say so
        state.report.warnings.append(f"{exc} (the exact Grams were used)")
        return {}
    if plan:
        state.report.warnings.append(sketch_groups_message(plan, widths, names))
    return plan


def _needs_budget(state: ChannelRun, option: str, what: str, instead: str) -> None:
    """``heads=True`` / ``hidden=True`` share a ``macs``/``params`` budget: refuse others."""
    tgt = state.cfg.parsed_target
    if tgt.kind not in ("macs", "params"):
        raise ValueError(
            f"{option}=True puts {what} on a macs= or params= budget, not {tgt}; {instead}"
        )


def _collect_hidden(state: ChannelRun) -> None:
    """``hidden=True``: the residual stream and the Gram of its normalised values."""
    _needs_budget(state, "hidden", "the residual width",
                  "for a fraction of the width use target='hidden=F'")  # fmt: skip
    found = find_stream(state.work)
    why = stream_refusal(state.work, found, state.batches[0], state.ctx.team) if found else None
    state.stream = found if why is None else None
    if state.stream is None:
        state.report.warnings.append(
            f"hidden=True: {why or 'no residual stream spectrim recognises'}; the hidden size "
            "is kept"
        )
        return
    other = one_of_two_streams(state.work, state.stream, "hidden=True")
    if other:
        state.report.warnings.append(other)
    state.stream_gram, _ = stream_grams(
        state.work, state.stream, state.batches, team=state.ctx.team
    )


def _collect_experts(state: ChannelRun) -> None:
    """``experts=True``: the MoE layers and each expert's Gram on the original model."""
    _needs_budget(state, "experts", "the neurons of mixture-of-experts layers",
                  "for a fraction of every expert's neurons use target='experts=F'")  # fmt: skip
    state.expert_blocks = find_experts(state.work)
    if not state.expert_blocks:
        state.report.warnings.append(
            "experts=True: no mixture-of-experts layer spectrim recognises; none was narrowed"
        )
        return
    if state.method.needs_statistics:
        accs = expert_grams(state.work, state.expert_blocks, state.batches, team=state.ctx.team)
        state.expert_grams = {name: gram_arrays(a) for name, a in accs.items()}
        state.expert_rows = {name: sum(x.count for x in a) for name, a in accs.items()}


def _collect_heads(state: ChannelRun) -> None:
    """``heads=True``: the attention layers and their output projections' input Grams."""
    _needs_budget(state, "heads", "attention heads",
                  "for a fraction of every layer's heads use target='heads=F'")  # fmt: skip
    state.blocks = find_attention(state.work)
    if not state.blocks:
        state.report.warnings.append(
            "heads=True: no attention layer spectrim recognises; only channels were pruned"
        )
        return
    unmatched = unmatched_warning(state.work, state.blocks, "heads=True")
    if unmatched:
        state.report.warnings.append(unmatched)
    if state.method.needs_statistics:
        grams = output_grams(state.work, state.blocks, state.batches, team=state.ctx.team)
        state.head_grams = {n: acc.gram_numpy() for n, (acc, _) in grams.items()}


@_timed("selection", factorises=True)
def solve_curves_stage(state: ChannelRun) -> None:
    """One solver per group and its error curve, judged on new inputs."""
    if not state.solved:  # block_statistics solved each block's groups as it went
        stats, sketches = state.collected.stats, state.collected.sketches
        state.groups = _solve_groups(state, state.groups, stats, sketches)
    shared = bool(state.blocks) and state.method.needs_statistics
    if state.stream is not None:
        stream_solver = state.method.stream_solver(state.stream, state.stream_gram, state.work)
        state.stream_solver = stream_solver
        # a channel group's curve is the error at one place; the stream's is its mean over
        # every norm, and an error there reaches every one of them
        state.curves[HIDDEN_KEY] = len(state.stream.sites) * stream_solver.error_curve()
    for i, x in enumerate(state.expert_blocks):
        grams = state.expert_grams.get(x.name) if state.method.needs_statistics else None
        xsolver = state.method.expert_solver(x, grams, state.work)
        state.expert_solvers[EXPERTS_KEY + i] = xsolver
        # the relative least-squares error of reconstructing the experts' hidden units
        # along each method's order, as a channel group's curve reconstructs its
        # consumers' inputs (spectral's own curves, one ridge greedy per expert, are on no
        # common scale: at macs=0.826 they cut two layers of a small Mixtral to 36 and 40
        # neurons and kept another whole, +1.8% perplexity against +0.1% uniform)
        state.curves[EXPERTS_KEY + i] = (
            xsolver.reconstruction_curve() if grams is not None else xsolver.error_curve()
        )
    for i, b in enumerate(state.blocks):
        solver = head_solver_of(
            state.method, b, state.head_grams.get(b.out), state.work, state.cfg.query_heads
        )
        state.head_solvers[HEAD_KEY + i] = solver
        state.curves[HEAD_KEY + i] = (
            solver.reconstruction_curve() if shared else solver.error_curve()
        )


def _solve_groups(
    state: ChannelRun,
    groups: list[UnitGroup],
    stats: Mapping[tuple[int, str], GramAccumulator],
    sketches: Mapping[tuple[int, str], Any],
) -> list[UnitGroup]:
    """Solvers and error curves of ``groups`` (into ``state``); the groups left after
    those with too few calibration rows are pinned."""
    analysis = state.analysis
    assert analysis is not None
    if state.method.needs_statistics:
        rows = rows_per_group(groups, {**stats, **sketches}, state.info)
        state.rows.update(rows)
        groups = _pin_underdetermined(analysis, groups, rows, state.info, state.report)
    solvers = solve_stage(state.method, groups, stats, state.work, sketches=sketches)
    state.solvers.update(solvers)
    # with heads on the budget every curve must be on one scale: the least-squares error
    # of reconstructing the consumers' inputs along each solver's order
    shared = bool(state.blocks) and state.method.needs_statistics
    for gi, solver in solvers.items():
        e = solver.reconstruction_curve() if shared else solver.error_curve()
        # least-squares errors measured on the calibration rows the fits use are
        # optimistic: judge every width by its expected error on new inputs
        if gi in state.rows and (shared or solver.least_squares_curve):
            e = prediction_error_curve(e, state.rows[gi])
        state.curves[gi] = e
    return groups


def cost_model_of(state: ChannelRun, *, stream: bool = True) -> CostModel:
    """The cost model of the run's model (MACs not attributed to a module stay constant);
    with ``stream=False`` the residual stream (``hidden=True``) stays out of it."""
    analysis, cost0 = state.analysis, state.cost0
    assert analysis is not None and cost0 is not None
    other = cost0.macs - sum(cost0.per_module.values())
    model = CostModel(state.work, analysis, cost0.per_module, other_macs=max(other, 0))
    for i, b in enumerate(state.blocks):
        model.add_unit_axes(HEAD_KEY + i, b.units, head_axes(state.work, b))
    for i, x in enumerate(state.expert_blocks):  # every cost of the experts is linear in it
        model.add_unit_axes(EXPERTS_KEY + i, x.width, {x.name: ("out", x.width, 1)})
    if stream and state.stream is not None:
        s, d = state.stream, state.stream.width
        model.add_unit_axes(HIDDEN_KEY, d, stream_axes(s))
        # a norm whose output is the model's (a d × k expansion), a tied head's input (a
        # k × k map, at most d × k) or an embedding norm's output (a d × k map into the
        # stream) gains a linear map once the stream is narrowed
        maps = any(not site.readers for site in s.sites) + len(s.embedding_norms)
        maps += tied_head(state.work, s) is not None
        if maps:
            reader = next(r for site in s.sites for r in site.readers)
            weight: Any = state.work.get_submodule(reader).weight
            tokens = cost0.per_module.get(reader, 0) / weight.numel()
            for _ in range(maps):
                model.add_term(HIDDEN_KEY, macs=d * d * tokens, params=d * d + d)
    return model


def stream_axes(stream: ResidualStream) -> dict[str, tuple[str, int, int]]:
    """What one coordinate of the residual stream costs (:meth:`CostModel.add_unit_axes`):
    an output row of every writer and embedding, an input column of every reader, an entry
    of every norm.  The map a narrowed output or a tied LM head's input gains (``d·k``,
    or ``k·k`` counted as ``d·k``) is added by :func:`cost_model_of`."""
    d = stream.width
    axes: dict[str, tuple[str, int, int]] = {m: ("out", d, 1) for m in stream.embeddings}
    axes.update({m: ("out", d, 1) for m in stream.writers})
    for site in stream.sites:
        axes[site.norm] = ("out", d, 1)
        axes.update({r: ("in", d, 1) for r in site.readers})
    return axes


def head_axes(model: nn.Module, block: AttentionBlock) -> dict[str, tuple[str, int, int]]:
    """What one unit of an attention layer costs (:meth:`CostModel.add_unit_axes`): its
    rows of q, k and v, its columns of the output projection, its share of the attention
    products (counted at the module that holds the projections)."""
    d, r = block.head_dim, block.unit_heads
    modules = dict(model.named_modules())
    axes: dict[str, tuple[str, int, int]] = {}
    for proj in block.projections:
        kind = module_kind(modules[proj.module])
        assert kind is not None
        length = int(modules[proj.module].weight.shape[kind.weight_dims[0]])
        per = block.role_rows(proj.role)  # 0 for a shared KV head (multi-query)
        _, _, old = axes.get(proj.module, ("out", length, 0))
        axes[proj.module] = ("out", length, old + per)  # a fused qkv adds its three parts
    axes[block.out] = ("in", block.heads * d, r * d)
    holder = block.projections[0].module.rpartition(".")[0]
    axes.setdefault(holder, ("ops", block.heads, r))
    return axes


@_timed("allocation", factorises=True)
def allocate_stage(state: ChannelRun) -> None:
    """The width of every group the target asks for, and its plan."""
    cfg, analysis, cost0 = state.cfg, state.analysis, state.cost0
    assert analysis is not None and cost0 is not None
    tgt = cfg.parsed_target
    cost_model = cost_model_of(state)
    # the curves the allocator sees: the user's (or the search's) factors applied
    factors = group_factors(
        analysis, cfg, state.blocks, state.stream, state.expert_blocks if cfg.experts else None
    )
    curves = {g: e * factors.get(g, 1.0) for g, e in state.curves.items()}
    if tgt.kind == "dof":
        widths = dof_widths(
            tgt.value, state.solvers, round_to=cfg.round_to, min_width=cfg.min_width
        )
    elif tgt.kind in ("macs", "params", "latency"):
        steps = {  # widths the experts kernel needs (rows of 16 bytes)
            EXPERTS_KEY + i: expert_step(x, state.work) for i, x in enumerate(state.expert_blocks)
        }
        if state.stream is not None:
            steps[HIDDEN_KEY] = width_step(state.work, state.stream)

        def run(curves: dict[int, np.ndarray], model: CostModel, goal: Target = tgt) -> Allocation:
            return allocate_budget(
                goal,
                curves,
                model,
                round_to=cfg.round_to,
                min_width=cfg.min_width,
                max_error=cfg.max_error if cfg.on_unreachable == "stop" else None,
                unit_groups=state.head_solvers.keys(),
                group_steps=steps,
            )

        if tgt.kind == "latency":
            alloc = _latency_allocation(state, curves, cost_model, run)
        else:
            alloc = run(curves, cost_model)
        excess = cost_model.full_excess.get(tgt.kind, 0.0)
        d = cost_model.widths.get(HIDDEN_KEY, 0)
        whole = {**alloc.widths, HIDDEN_KEY: d}
        if excess and (
            alloc.widths.get(HIDDEN_KEY) == d
            or cost_model.cost(tgt.kind, whole) - excess <= cost_model.cost(tgt.kind, alloc.widths)
        ):
            # the stream stays whole, or narrowing it saves less than its output expansion
            # costs: allocate again without the stream (nothing extra to count then)
            alloc = run(
                {g: e for g, e in curves.items() if g != HIDDEN_KEY},
                cost_model_of(state, stream=False),
            )
            alloc.widths[HIDDEN_KEY] = cost_model.widths[HIDDEN_KEY]
        alloc.held = [g for g in alloc.held if g < HEAD_KEY]
        state.report.allocation = allocation_record(alloc, analysis)
        if not alloc.reachable:
            message = unreachable_message(tgt, alloc, analysis, cfg)
            if cfg.on_unreachable == "raise":
                raise UnreachableTargetError(message)
            state.report.warnings.append(message)
        widths = alloc.widths
        state.alloc = alloc
    else:
        widths = allocate(tgt, curves, cost_model, round_to=cfg.round_to, min_width=cfg.min_width)
    state.make_plans(widths)
    # rank 0's decisions on every rank (the same statistics, but floating point may differ)
    state.widths, state.plans = state.ctx.team.broadcast((dict(widths), state.plans))


def group_factors(
    analysis: Analysis,
    cfg: CompressConfig,
    blocks: Sequence[AttentionBlock] = (),
    stream: ResidualStream | None = None,
    experts: Sequence[ExpertBlock] | None = None,
) -> dict[int, float]:
    """``cfg.group_weights`` (group name -> factor) by curve key: the channel groups by
    index, an attention layer's heads (``"<layer> (heads)"``, with ``heads=True``) and the
    residual stream (``"<stream> (hidden)"``, with ``hidden=True``) by their keys.  A name
    that is no group of the model is an error that lists some that are; before the
    attention layers and the stream are found (``blocks``/``stream`` not given) any name
    with their suffix passes when the option is on."""
    index = {g.name: g.index for g in analysis.groups}
    index.update({f"{b.name}{HEADS_SUFFIX}": HEAD_KEY + i for i, b in enumerate(blocks)})
    if stream is not None:
        index[f"{stream.name}{HIDDEN_SUFFIX}"] = HIDDEN_KEY
    index.update(
        {f"{x.name}{EXPERTS_SUFFIX}": EXPERTS_KEY + i for i, x in enumerate(experts or [])}
    )
    pending = [s for s, on in ((HEADS_SUFFIX, cfg.heads and not blocks),
                               (HIDDEN_SUFFIX, cfg.hidden and stream is None),
                               (EXPERTS_SUFFIX, cfg.experts and experts is None)) if on]  # fmt: skip
    weights = cfg.group_weights
    unknown = sorted(n for n in set(weights) - set(index) if not n.endswith(tuple(pending)))
    if unknown:
        some = ", ".join(sorted(index)[:5])
        raise ValueError(
            f"group_weights names {', '.join(map(repr, unknown))}, which is no group on "
            f"this budget (channel groups are named after their first producer, e.g. {some}; "
            f"with heads=True an attention layer's heads are '<layer>{HEADS_SUFFIX}', with "
            f"hidden=True the residual stream is '<stream>{HIDDEN_SUFFIX}', with experts=True "
            f"a MoE layer is '<experts module>{EXPERTS_SUFFIX}', as in the report)"
        )
    return {index[name]: float(f) for name, f in weights.items() if name in index}


#: rounds of the latency loop, timed calls per model per measurement, and the relative
#: distance to the target at which the loop stops
LATENCY_ROUNDS, LATENCY_REPEATS, LATENCY_CLOSE = 5, 15, 0.02


def _latency_allocation(
    state: ChannelRun,
    curves: dict[int, np.ndarray],
    cost_model: CostModel,
    run: Callable[[dict[int, np.ndarray], CostModel, Target], Allocation],
) -> Allocation:
    """``latency=F``: the greedy on per-module times measured on this machine, closed on
    the measured latency of the pruned shapes.

    Each leaf module's time at ``latency_batch`` (its share of one forward pass,
    :func:`~spectrim.evaluation.latency.module_latencies`) is its cost, shrinking with its
    channels as its MACs do; what no module explains (functional ops, Python) stays
    constant.  That model is only a guide (oneDNN's speed changes with the widths, and
    elementwise modules spectrim sees no channels in stay constant), so the widths the
    greedy picks for a fraction ``f`` are cut into a copy of the model (slices only, no
    corrections) and timed against the original, interleaved (about a second of calls
    each); ``f`` moves by the secant of the measured ratios against the modelled ones,
    up to :data:`LATENCY_ROUNDS` rounds, until the measured ratio is within
    :data:`LATENCY_CLOSE` of ``F``.  The cost model stays fixed, so a smaller ``f``
    always means smaller shapes.  The closest round is kept; every round is in
    ``report.latency``.
    """
    cfg, analysis = state.cfg, state.analysis
    assert analysis is not None
    goal = cfg.parsed_target.value  # heads=/hidden= were refused (_needs_budget)
    base = copy.deepcopy(state.work)
    if state.channels_last:
        restore_formats(base, state.formats)  # timed in the layout the user gets
    example = stack_examples(state.batches, cfg.latency_batch)
    per, total = module_latencies(base, example, warmup=2, repeats=LATENCY_REPEATS)
    cost_model.set_latency(per, total)
    # about a second of timed calls per model and round: small models are noisy
    repeats = int(min(max(LATENCY_REPEATS, 1.0 / max(total, 1e-6)), 200))
    rounds: list[dict[str, float]] = []
    best: tuple[float, Allocation] | None = None
    f = goal
    for _ in range(LATENCY_ROUNDS):
        alloc = run(curves, cost_model, Target("latency", f))
        probe = copy.deepcopy(base)
        apply_plan(probe, analysis, {
            gi: GroupPlan(keep=np.arange(k), folds={})
            for gi, k in alloc.widths.items()
            if gi < HEAD_KEY and k < analysis.groups[gi].width
        })  # fmt: skip
        timed = compare_latency(base, probe, example, warmup=2, repeats=repeats)
        ratio = timed["compressed_median"] / timed["original_median"]
        rounds.append({"fraction": f, "modelled": alloc.reached, "measured": ratio})
        if best is None or abs(ratio - goal) < abs(best[0] - goal):
            best = (ratio, alloc)
        if abs(ratio - goal) <= LATENCY_CLOSE * goal:
            break
        f_next = _next_fraction(rounds, goal, floor=alloc.floor)
        if f_next is None:
            break
        f = f_next
    assert best is not None
    state.report.latency = {
        "target": goal,
        "batch": cfg.latency_batch,
        "measured": best[0],
        "seconds_original": total,
        "rounds": rounds,
    }
    if abs(best[0] - goal) > 0.1 * goal:
        state.report.warnings.append(
            f"target latency={goal:g} not met: the closest of {len(rounds)} rounds measured "
            f"{best[0]:.3f} of the original's time at batch {cfg.latency_batch} (noise, "
            "or the time of what channels do not shrink)"
        )
    return best[1]


def _next_fraction(rounds: list[dict[str, float]], goal: float, floor: float) -> float | None:
    """The latency fraction to ask the greedy for next: the secant of the measured ratios
    against the modelled ones through the last two rounds when it slopes upwards, else
    the last modelled fraction scaled by ``goal / measured``; within ``[floor, 1]``
    (below the modelled floor the greedy cannot go).  ``None`` when that was asked
    already (the floor, or the whole model).

    Example::

        >>> _next_fraction([{"fraction": 0.5, "modelled": 0.5, "measured": 0.6}], 0.5, 0.1)
        0.4166666666666667
        >>> rounds = [{"fraction": 0.5, "modelled": 0.5, "measured": 0.7},
        ...           {"fraction": 0.3, "modelled": 0.3, "measured": 0.6}]
        >>> round(_next_fraction(rounds, 0.5, floor=0.1), 4)
        0.1
        >>> _next_fraction([{"fraction": 0.1, "modelled": 0.1, "measured": 0.6}], 0.5, 0.1)
    """
    last = rounds[-1]
    f = last["modelled"] * goal / last["measured"]
    if len(rounds) >= 2:
        prev = rounds[-2]
        run = last["modelled"] - prev["modelled"]
        slope = (last["measured"] - prev["measured"]) / run if abs(run) > 1e-9 else 0.0
        if slope > 0:
            f = last["modelled"] + (goal - last["measured"]) / slope
    f = float(min(max(f, floor * (1 + 1e-6)), 1.0))
    asked = {round(r["fraction"], 6) for r in rounds}
    return None if round(f, 6) in asked else f


@_timed("apply")
def apply_stage(state: ChannelRun) -> None:
    """Apply the plans: through the sequential pass when corrections are refitted on the
    compressed prefix (each solver's own refit, so a constraint survives), else in one
    surgery."""
    analysis, plans, collected = state.analysis, state.plans, state.collected
    assert analysis is not None
    heads = {k: w for k, w in state.widths.items() if HEAD_KEY <= k < HIDDEN_KEY}
    stream_plan = None
    if state.stream is not None and state.stream_solver is not None:
        k = state.widths.get(HIDDEN_KEY, state.stream.width)
        if k < state.stream.width:
            stream_plan = state.ctx.team.broadcast(state.stream_solver.plan(k))
    refit_stream = stream_plan is not None and stream_plan.correct
    original = (
        copy.deepcopy(state.work)
        if (
            (heads and state.cfg.sequential and state.method.needs_statistics)
            or refit_stream
            or (
                state.sequential
                and (state.fit == "residual" or state.cfg.refit_readers)
                and not state.chain
            )
        )
        else None
    )
    readers = ReaderFits() if state.cfg.refit_readers else None
    if state.sequential and plans and (state.deferred or any(p.folds for p in plans.values())):
        keep = {gi: np.sort(p.keep) for gi, p in plans.items()}
        refits = {gi: state.solvers[gi].refit for gi in keep}
        reselect = (
            {gi: state.solvers[gi].reselect for gi in keep} if state.cfg.sequential_select else {}
        )
        # float64 fit products only where the fit can be (nearly) exact
        exact = {gi: bool(state.curves[gi][state.widths[gi]] < _EXACT_FIT_BELOW**2) for gi in keep}
        # the refits use fresh statistics: the selection's Grams need not live through them
        for gi in keep:
            if not state.forked:
                state.solvers[gi].release()
        state.sketch_rows.update({gi: sk.rows for (gi, _), sk in collected.sketches.items()})
        for stat in [stat for stat in collected.stats if stat[0] in keep]:
            del collected.stats[stat]
        collected.sketches.clear()
        stored = state.batches[: collected.n_stored]
        fitted = sum(batch_len(b) for b in stored)
        if not stored:  # a rank that stored none still runs the pass, adding no rows
            stored = state.batches[:1]
        state.report.fitted_examples = int(state.ctx.team.total(fitted))
        fallback: list[str] = []  # consumers whose output fit had too few rows
        fixed = {
            gi: {c.module: plans[gi].folds.get(c.module) for c in analysis.groups[gi].consumers
                 if c.module in state.routed}
            for gi in keep
        }  # fmt: skip
        fixed = {gi: f for gi, f in fixed.items() if f}
        if fixed:
            first = min(c for f in fixed.values() for c in f)
            state.report.warnings.append(
                f"sequential: {sum(len(f) for f in fixed.values())} consumer(s) run on rows "
                f"the model routes by its own activations (the first: '{first}', its rows "
                f"picked by {state.routed[first]}); the pruned layers before them change which "
                "rows they get, so they keep the correction fitted on the original model, as "
                "with sequential=False"
            )
        if state.chain:
            plan = plan_blocks(state.chain, analysis, keep, *state.ends, whole=reselect)
            assert not isinstance(plan, str)  # checked on all groups before collecting
            state.report.blocks = len(plan.blocks)
            folds, state.seq_errors, keep = blockwise_correct(
                state.work,
                analysis,
                stored,
                keep,
                plan,
                contributes=collected.n_stored > 0,
                exact=exact,
                refit=refits,
                team=state.ctx.team,
                calls=collected.calls if collected.n_stored else None,  # consumed
                channels_last=state.channels_last,
                reselect=reselect,
                fit=state.fit,
                warn=fallback.append,
                block_cache=state.cfg.block_cache,
                readers=readers,
                routed=state.routed,
                fixed=fixed,
            )
            state.report.blocks += readers.extra_blocks if readers is not None else 0
        else:
            folds, state.seq_errors, keep = sequential_correct(
                state.work,
                analysis,
                stored,
                keep,
                collected,
                exact=exact,
                channels_last=state.channels_last,
                refit=refits,
                team=state.ctx.team,
                reselect=reselect,
                fit=state.fit,
                original=original,
                warn=fallback.append,
                readers=readers,
                routed=state.routed,
                fixed=fixed,
            )
        if fallback:
            state.report.warnings.append(
                f"sequential_fit={state.fit!r}: {len(fallback)} consumer(s) "
                f"kept the channel interpolation; the first: {fallback[0]}"
            )
        for gi, f in folds.items():
            plans[gi].keep = keep[gi]
            plans[gi].folds = f
        if readers is not None:
            state.report.readers = {
                "refitted": {n: list(e) for n, e in readers.errors.items()},
                "skipped": dict(readers.skipped),
            }
    else:
        apply_plan(state.work, analysis, plans)
        if readers is not None:
            state.report.warnings.append(
                "refit_readers: no sequential pass ran (no group with a correction was "
                "pruned), so no reader was refitted"
            )
    collected.inputs.clear()
    if state.channels_last:
        restore_formats(state.work, state.formats)  # the user's layout, stride for stride
    for key, k in sorted(heads.items()):
        block, solver = state.blocks[key - HEAD_KEY], state.head_solvers[key]
        if k < block.units:
            apply_heads(state.work, block, solver, k, state.batches, original, state.ctx.team)
    if state.expert_blocks:  # sequential: each layer's Grams on the model narrowed before it
        keys = [EXPERTS_KEY + i for i in range(len(state.expert_blocks))]
        widths = [state.widths.get(key, x.width) for key, x in zip(keys, state.expert_blocks)]
        state.expert_reports = narrow_experts(
            state.work,
            state.expert_blocks,
            widths,
            state.method,
            state.batches,
            sequential=state.cfg.sequential,
            solvers=[state.expert_solvers[key] for key in keys],  # one-shot: the curves' own
            rows=state.expert_rows,
            team=state.ctx.team,
        )
    if stream_plan is not None and state.stream is not None:  # last: its refit sees all
        apply_hidden(state.work, state.stream, stream_plan, state.batches,
                     original if refit_stream else None, sequential=state.cfg.sequential,
                     team=state.ctx.team)  # fmt: skip


@_timed("report")
def report_stage(state: ChannelRun) -> None:
    """Per-group widths, predicted and measured errors, costs and warnings."""
    analysis, report, cost0 = state.analysis, state.report, state.cost0
    assert analysis is not None and cost0 is not None
    cost1 = profile(state.work, state.example, kernels=state.kernels)
    for g in analysis.groups:
        k = state.widths.get(g.index, g.width)
        gr = GroupReport(
            name=g.name,
            width_before=g.width,
            width_after=k,
            producers=list(g.producers),
            consumers=[c.module for c in g.consumers],
            pinned=g.pinned,
            rows=int(state.rows[g.index]) if g.index in state.rows else None,
        )
        sketched = {gi: sk.rows for (gi, _), sk in state.collected.sketches.items()}
        if g.index in (state.sketch_rows or sketched):
            gr.sketch_rows = (state.sketch_rows or sketched)[g.index]
        if g.index in state.curves:
            gr.predicted_error = float(np.sqrt(max(state.curves[g.index][k], 0.0)))
        if g.index in state.plans:
            if state.seq_errors:
                gr.consumer_errors = {
                    c.module: state.seq_errors[(g.index, c.module)]
                    for c in g.consumers
                    if (g.index, c.module) in state.seq_errors
                }
            else:
                gr.consumer_errors = state.solvers[g.index].reconstruction_errors(
                    state.plans[g.index]
                )
        report.groups.append(gr)
    for i, b in enumerate(state.blocks):
        solver = state.head_solvers[HEAD_KEY + i]
        k = state.widths.get(HEAD_KEY + i, len(solver.order))
        report.groups.append(head_group_report(b, solver, k))
    if state.stream is not None and state.stream_solver is not None:
        k = state.widths.get(HIDDEN_KEY, state.stream.width)
        report.groups.append(hidden_group_report(state.stream, state.stream_solver, k))
    report.groups.extend(state.expert_reports)  # from narrow_experts (apply_stage)
    report.params_before, report.params_after = cost0.params, cost1.params
    report.macs_before, report.macs_after = cost0.macs, cost1.macs
    tgt, alloc = state.cfg.parsed_target, state.alloc
    if alloc is not None and alloc.reachable:
        reached = report.macs_ratio if tgt.kind == "macs" else report.params_ratio
        if tgt.kind != "latency" and reached > tgt.value + 0.005:
            report.warnings.append(
                f"target {tgt} not reached: the compressed model has {reached:.3f} of the "
                f"original {tgt.kind.upper() if tgt.kind == 'macs' else 'parameters'} (the "
                f"allocation modelled {alloc.reached:.3f}; the difference is in costs the "
                "model of the allocator does not see, or in round_to/min_width)"
            )
    summary = _pin_summary(analysis)
    if summary:
        report.warnings.insert(0, summary)
    moe = find_experts(state.work) if not state.cfg.experts else []
    if moe:  # the experts are no channel groups: say where they are narrowed
        report.warnings.insert(
            0,
            f"{len(moe)} mixture-of-experts layer(s) ({moe[0].name}, ...) keep their experts: "
            "their neurons are narrowed by target='experts=F' or, on this budget, by "
            "experts=True, not by channel targets",
        )


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


def allocation_record(alloc: Allocation | JointAllocation, analysis: Any) -> dict[str, Any]:
    """``alloc`` as :attr:`CompressionReport.allocation`: held units by name."""
    groups = analysis.groups

    def name(u: int | str) -> str:
        return groups[u].name if isinstance(u, int) and 0 <= u < len(groups) else str(u)

    return {
        "kind": alloc.kind,
        "target": float(alloc.target),
        "reached": float(alloc.reached),
        "floor": float(alloc.floor),
        "reachable": bool(alloc.reachable),
        "held": [name(u) for u in alloc.held],
    }


def unreachable_message(
    tgt: Target, alloc: Allocation | JointAllocation, analysis: Any, cfg: CompressConfig
) -> str:
    what = {"macs": "MACs", "latency": "latency"}.get(tgt.kind, "parameters")
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
        if op.kind == "module" and not hook_counted(op.target):
            # products inside a module the hooks do not count: a weight type with its own
            # forward (HF Conv1D), or an opaque one holding matrices (attention, RNNs)
            kind = module_kind(op.target)
            if weight_kind(op.target) is not None or kind is None or kind.channels is None:
                if any(p.dim() >= 2 for p in op.target.parameters(recurse=False)):
                    return True
    return False
