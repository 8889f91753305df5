"""The attention-head run behind ``spectrim.compress(..., target="heads=F")``.

``find → collect → solve → allocate → apply → report``:

* find: every attention layer a registered finder recognises
  (:func:`spectrim.graph.attention.find_attention`);
* collect: the Gram of each output projection's input over the calibration tokens
  (padded positions left out), in float64;
* solve: one :class:`~spectrim.methods.heads.HeadSolver` per layer, from the method's
  :meth:`~spectrim.methods.Method.head_solver`;
* allocate: ``heads=F`` keeps ``round(F·units)`` units (at least one) in every layer;
* apply: layer by layer in execution order.  In sequential mode (the default) each
  layer's correction is refitted on the outputs of the already-pruned layers before it,
  reconstructing the original model's per-head outputs (cross-Gram least squares, as
  for channels); the kept heads are always those chosen on the original statistics;
* report: one group per layer (units before/after, the predicted error), MACs and
  parameters before and after.
"""

from __future__ import annotations

import copy
import dataclasses
import time
import traceback
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from spectrim.calibration.batches import drop_padding, token_mask
from spectrim.calibration.checks import CalibrationInfo
from spectrim.calibration.gram import GramAccumulator
from spectrim.config import CompressConfig
from spectrim.context import RunContext
from spectrim.distributed import SOLO, Team
from spectrim.graph.attention import (
    AttentionBlock,
    find_attention,
    prepare_attention,
    unmatched_attention,
    unmatched_reason,
)
from spectrim.graph.trace import StopPass, call_until_stopped
from spectrim.methods import Method
from spectrim.methods.heads import HeadSolver
from spectrim.report import CompressionReport, GroupReport
from spectrim.stages import begin_run, end_run, example_cost

__all__ = [
    "HEADS_SUFFIX",
    "apply_heads",
    "head_group_report",
    "head_solver_of",
    "heads_run",
    "output_grams",
    "unmatched_warning",
]

#: the report names an attention layer's group "<layer> (heads)" (``group_weights`` too)
HEADS_SUFFIX = " (heads)"


#: spectrim's own source folder: an error raised from a file under it is spectrim's
_PACKAGE = Path(__file__).resolve().parent


def _raised_by_the_model(e: BaseException) -> bool:
    """Whether the innermost frame of ``e``'s traceback is outside spectrim (the model's
    own code, or torch's on its behalf).

    Example::

        >>> try:
        ...     int("x")
        ... except ValueError as e:
        ...     _raised_by_the_model(e)
        True
    """
    frames = traceback.extract_tb(e.__traceback__)
    return bool(frames) and _PACKAGE not in Path(frames[-1].filename).resolve().parents


def _rows(x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    x, _ = drop_padding(x.detach(), mask, x.dim() - 1)
    return x.reshape(-1, x.shape[-1])


def output_grams(
    model: nn.Module,
    blocks: Sequence[AttentionBlock],
    batches: Sequence[Any],
    reference: nn.Module | None = None,
    progress: Any = None,
    *,
    stop: bool = False,
    team: Team = SOLO,
) -> dict[str, tuple[GramAccumulator, np.ndarray | None]]:
    """Per output projection: the Gram of its input on ``model`` and, with ``reference``
    (a model with the same module names), the cross Gram ``Z'ᵀZ`` with the reference's
    input at the same place.  Padded token positions (``attention_mask``) are dropped.
    With ``stop``, each forward pass ends at the last of ``blocks`` (in execution order):
    what comes after it is not needed (the sequential refit of one layer); not for a
    layer the model runs more than once per pass (ALBERT's), whose Grams sum all its
    calls.  A pass without ``stop`` records those calls in each block's
    :attr:`~spectrim.graph.attention.AttentionBlock.calls`.  With a
    ``team``, each rank runs its own batches and both Grams are summed over the ranks."""
    modules = dict(model.named_modules())
    names = [b.out for b in blocks]
    accs = {b.out: GramAccumulator(b.heads * b.head_dim, sums=False) for b in blocks}
    cross: dict[str, torch.Tensor] = {}
    seen: dict[str, list[torch.Tensor]] = {n: [] for n in names}  # in call order
    mask: list[torch.Tensor | None] = [None]
    calls = dict.fromkeys(names, 0)  # in the first batch's pass

    last = names[-1] if stop and blocks[-1].calls == 1 else None

    def ref_hook(name: str) -> Any:
        def hook(module: nn.Module, args: tuple[Any, ...]) -> None:
            seen[name].append(_rows(args[0], mask[0]).double())
            if name == last:
                raise StopPass

        return hook

    def hook(name: str) -> Any:
        def fn(module: nn.Module, args: tuple[Any, ...]) -> None:
            x = _rows(args[0], mask[0])
            if not counted[0]:
                calls[name] += 1
            accs[name].update(x)
            if reference is not None:
                z = seen[name].pop(0)  # a layer every depth runs (ALBERT): the same call
                c = x.double().T @ z
                cross[name] = cross[name] + c if name in cross else c
            if name == last:
                raise StopPass

        return fn

    handles = [modules[n].register_forward_pre_hook(hook(n)) for n in names]
    if reference is not None:
        ref_modules = dict(reference.named_modules())
        handles += [ref_modules[n].register_forward_pre_hook(ref_hook(n)) for n in names]
    it = progress(batches) if progress is not None else batches
    counted = [False]
    try:
        with torch.no_grad():
            for batch in it:
                mask[0] = token_mask(batch)
                for m in (reference, model):
                    if m is not None:
                        call_until_stopped(m, batch)
                counted[0] = True
    finally:
        for h in handles:
            h.remove()
    if not stop:
        for b in blocks:
            b.calls = max(calls[b.out], 1)
    team.reduce(accs)
    if reference is not None:
        # every rank holds a cross term for every name (zeros where it saw no rows)
        for n in names:
            if n not in cross:
                w = accs[n].dim
                cross[n] = torch.zeros(w, w, dtype=torch.float64, device=accs[n].device)
        team.sum_([cross[n] for n in names])
    return {n: (accs[n], cross[n].cpu().numpy() if n in cross else None) for n in names}


def apply_heads(
    work: nn.Module,
    block: AttentionBlock,
    solver: HeadSolver,
    k: int,
    batches: list[Any],
    original: nn.Module | None,
    team: Team = SOLO,
) -> None:
    """Keep ``k`` units of ``block``: the solver's plan, its correction refitted on the
    compressed prefix against ``original`` when given (the sequential mode); with a
    ``team``, the refit's Grams are summed over the ranks and rank 0's plan is used."""
    if block.slots is not None:  # the ranks' units are the same query heads: rank 0's
        block.slots = team.broadcast(block.slots)
    plan = solver.plan(k)
    keep, fold = plan.keep, plan.fold
    if original is not None and fold is not None:
        ((acc, cross),) = output_grams(
            work, [block], batches, reference=original, stop=True, team=team
        ).values()
        assert cross is not None
        fold = solver.refit(plan.keep, acc.gram_numpy(), cross)
    keep, fold = team.broadcast((keep, fold))
    block.prune(work, keep, fold)


def head_solver_of(
    method: Method,
    block: AttentionBlock,
    gram: np.ndarray | None,
    model: nn.Module,
    query_heads: bool = False,
) -> HeadSolver:
    """``method``'s solver for ``block``.  With ``query_heads`` and grouped-query attention
    its units become the query heads inside the KV groups (``CompressConfig.query_heads``):
    the method ranks the single query heads (its own solver on a view of the layer where
    each query head is a unit and the keys and values stay), and keeping ``k`` units keeps
    the first ``k`` heads of every group in that ranking (:meth:`AttentionBlock.set_slots`).
    The error curve is the relative least-squares error of those heads' reconstruction of
    all heads' outputs (the ranking's own curve, every ``kv_heads``-th point, for a method
    without statistics).  The slots are not chosen again as units: a unit pairs heads of
    different groups by rank, and a greedy over those pairs could trade a group's
    redundant head for another group's needed one."""
    if not (query_heads and block.kv_heads > 1 and block.group_size > 1):
        return method.head_solver(block, gram, model)
    ranked = method.head_solver(dataclasses.replace(block, kv_heads=1, slots=None), gram, model)
    block.set_slots(ranked.order)
    order = np.arange(block.units)
    if ranked.gram is None:
        curve = ranked.error_curve()[:: block.kv_heads]
        return HeadSolver(block, order, curve, correct=False)
    gram, ridge, correct = ranked.gram, ranked.ridge, ranked.correct
    curve = HeadSolver(block, order, gram=gram).reconstruction_curve()
    return HeadSolver(block, order, curve, gram=gram, ridge=ridge, correct=correct)


def head_group_report(
    block: AttentionBlock, solver: HeadSolver, k: int, rows: int | None = None
) -> GroupReport:
    """The report line of one attention layer keeping ``k`` of its units."""
    return GroupReport(
        name=f"{block.name}{HEADS_SUFFIX}",
        width_before=len(solver.order),
        width_after=k,
        producers=sorted({p.module for p in block.projections}),
        consumers=[block.out],
        predicted_error=float(np.sqrt(max(solver.error_curve()[k], 0.0))),
        rows=rows,
    )


def unmatched_warning(model: nn.Module, blocks: list[AttentionBlock], what: str) -> str | None:
    """The warning for ``what`` (a target) when attention layers of ``model`` that look
    like attention are not among ``blocks``: they keep every head."""
    left = unmatched_attention(model, blocks)
    if not left:
        return None
    why = unmatched_reason(model)
    return (
        f"{what}: {len(left)} attention layer(s) that spectrim does not recognise keep every "
        f"head: {', '.join(left[:3])}" + (", ..." if len(left) > 3 else "")
        + (f" ({why})" if why else "")
    )  # fmt: skip


def heads_run(
    work: nn.Module,
    batches: list[Any],
    info: CalibrationInfo,
    cfg: CompressConfig,
    method: Method,
    ctx: RunContext,
    t0: float,
) -> tuple[nn.Module, CompressionReport]:
    """Remove attention heads of ``work`` in place as ``cfg`` (``heads=F``) says."""
    tgt = cfg.parsed_target
    method, report = begin_run(work, cfg, method, info, ctx)
    timings: dict[str, float] = {}
    t = time.perf_counter()
    prepare_attention(work)  # nn.MultiheadAttention -> HeadAttention (exact)
    blocks = find_attention(work)
    if not blocks:
        why = unmatched_reason(work)
        raise ValueError(
            f"target {tgt}: no attention layer in {type(work).__name__} that spectrim "
            + (f"can prune: {why}" if why else
               "recognises (Hugging Face BERT-family, DeBERTa, DistilBERT, GPT-2, GPTBigCode, "
               "GPT-NeoX, Falcon, LLaMA/Mistral/Qwen2/Gemma, Phi, Phi-3, OPT, BART and its kin, "
               "T5, UMT5, MPNet, BLOOM, ALBERT, CodeGen, ModernBERT, OpenAI GPT, XGLM, "
               "GPT-OSS, MPT and ViT "
               "attention, timm ViT attention, nn.MultiheadAttention; "
               "register others with spectrim.graph.attention.register_attention)")
        )  # fmt: skip
    team = ctx.team
    example, cost0 = example_cost(work, batches, team)
    original = copy.deepcopy(work) if (cfg.sequential and method.needs_statistics) else None
    timings["find"] = time.perf_counter() - t

    t = time.perf_counter()
    grams: dict[str, np.ndarray] = {}
    rows = 0
    if method.needs_statistics:
        stats = output_grams(work, blocks, batches, progress=ctx.wrap(len(batches)), team=team)
        grams = {n: acc.gram_numpy() for n, (acc, _) in stats.items()}
        rows = min(acc.count for acc, _ in stats.values())
    timings["collect"] = time.perf_counter() - t

    t = time.perf_counter()
    solvers: list[HeadSolver] = [
        head_solver_of(method, b, grams.get(b.out), work, cfg.query_heads) for b in blocks
    ]
    widths = [min(b.units, max(1, round(tgt.value * b.units))) for b in blocks]
    whole = [b for b, k in zip(blocks, widths, strict=True) if k == b.units]
    unmatched = unmatched_warning(work, blocks, str(tgt))
    if unmatched:
        report.warnings.append(unmatched)
    if whole and tgt.value < 1:
        b = whole[0]
        report.warnings.append(
            f"target {tgt}: {len(whole)} of {len(blocks)} attention layers keep every head, "
            f"their {b.units} removable unit(s) of {b.unit_heads} head(s) each being too "
            f"coarse for {tgt.value:g} (e.g. '{b.name}', {b.heads} heads"
            + (f" in {b.blocks} parts" if b.blocks > 1 else "")
            + (f" on {b.kv_heads} KV heads; query_heads=True removes single query heads"
               if b.unit_heads > 1 and b.blocks == 1 and not b.per_query else "")
            + ")"
        )  # fmt: skip
    timings["solve"] = time.perf_counter() - t

    t = time.perf_counter()
    done: list[str] = []
    try:
        for b, s, k in zip(blocks, solvers, widths, strict=True):
            units = b.units
            if k < units:
                apply_heads(work, b, s, k, batches, original, team)
                done.append(b.name)
            report.groups.append(head_group_report(b, s, k, rows or None))
        timings["apply"] = time.perf_counter() - t
        end_run(report, work, example, cost0, info, timings, t0)
    except (RuntimeError, ValueError, IndexError, TypeError) as e:
        if not done or not _raised_by_the_model(e):  # spectrim's own errors say enough
            raise
        raise ValueError(
            f"target {tgt}: after removing heads of '{done[-1]}' the model no longer runs "
            f"({type(e).__name__}: {str(e)[:200]}): its code ties the head count to "
            "something spectrim does not change (e.g. a relative-position bias shared by "
            "every layer, or the heads' output reshaped to the width of the layer's input, "
            "as LED's decoder does), so its heads cannot be removed"
        ) from e
    return work, report
