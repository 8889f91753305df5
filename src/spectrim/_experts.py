"""The MoE run behind ``spectrim.compress(..., target="experts=F")``.

``find → collect → solve → allocate → apply → report``:

* find: every experts module in Hugging Face's 3-D layout
  (:func:`spectrim.graph.experts.find_experts`: Mixtral, Qwen2/3-MoE, OLMoE, DeepSeek-V3,
  GraniteMoE, PhiMoE);
* collect: per expert, the Gram of its hidden activations over the tokens the router sends
  it, each row weighted by its router weight (padded positions left out), in float64.  An
  expert the router sent fewer tokens than it has neurons is topped up to that many rows
  by its activations on a sample of the layer's tokens drawn evenly from every batch
  (:func:`top_up`);
* solve: one :class:`~spectrim.methods.experts.ExpertSolver` per layer, from the method's
  :meth:`~spectrim.methods.Method.expert_solver`;
* allocate: ``experts=F`` keeps about ``F·width`` neurons in every expert, a multiple of 16
  bytes per row (:func:`expert_width`: the default experts kernel needs it);
* apply: layer by layer in execution order.  In sequential mode (the default) each layer's
  Grams are measured on the model whose earlier layers are already narrowed, so its
  selection and folds see the inputs (and the routing) the compressed model gives it;
* report: one group per layer, MACs and parameters before and after.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from spectrim.calibration.batches import token_mask
from spectrim.calibration.checks import CalibrationInfo
from spectrim.calibration.gram import GramAccumulator, Products
from spectrim.config import CompressConfig
from spectrim.context import RunContext
from spectrim.distributed import SOLO, Team
from spectrim.graph.experts import ExpertBlock, find_experts, row_step
from spectrim.graph.trace import StopPass, call_until_stopped
from spectrim.methods import Method
from spectrim.methods.experts import ExpertSolver
from spectrim.report import CompressionReport, GroupReport
from spectrim.stages import begin_run, end_run, example_cost

__all__ = [
    "EXPERTS_SUFFIX",
    "expert_grams",
    "gram_arrays",
    "expert_step",
    "expert_width",
    "experts_run",
    "narrow_experts",
    "top_up",
]

#: the report names a MoE layer's group "<experts module> (experts)"
EXPERTS_SUFFIX = " (experts)"


def _hidden(module: nn.Module, x: torch.Tensor, e: int) -> torch.Tensor:
    """Expert ``e``'s hidden activations ``act(gate x) ⊙ up x`` of the rows ``x``."""
    gate_up: Any = module.gate_up_proj
    act: Any = module.act_fn
    gate, up = torch.nn.functional.linear(x, gate_up[e]).chunk(2, dim=-1)
    result: torch.Tensor = act(gate) * up
    return result


def expert_grams(
    model: nn.Module,
    blocks: Sequence[ExpertBlock],
    batches: Sequence[Any],
    progress: Any = None,
    *,
    stop: bool = False,
    team: Team = SOLO,
) -> dict[str, list[GramAccumulator]]:
    """Per experts module, one accumulator per expert of the router-weighted Gram of its
    hidden activations (see :mod:`spectrim.methods.experts`).  With ``stop``, each pass
    ends after the last of ``blocks``.  With a ``team``, each rank runs its own batches and
    the Grams are summed over the ranks."""
    modules = dict(model.named_modules())
    accs = {
        b.name: [GramAccumulator(b.width, sums=False) for _ in range(b.experts)] for b in blocks
    }
    # per layer: each expert's sum of squared router weights, and for top_up about
    # ``width`` of the layer's real tokens, the same number from every batch
    weight2 = {b.name: torch.zeros(b.experts, dtype=torch.float64) for b in blocks}
    samples: dict[str, list[tuple[int, torch.Tensor]]] = {b.name: [] for b in blocks}
    everywhere, mine = team.positions([1] * len(batches))
    per_batch = {b.name: -(-b.width // max(1, len(everywhere))) for b in blocks}
    last = blocks[-1].name if stop else None
    mask: list[torch.Tensor | None] = [None]
    place = [0]

    def hook(name: str) -> Any:
        def fn(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            names = ("hidden_states", "top_k_index", "top_k_weights")
            given = list(args) + [kwargs[n] for n in names[len(args) :] if n in kwargs]
            if len(given) < 3:
                raise TypeError(
                    f"experts '{name}' ({type(module).__name__}) was called without "
                    "(hidden_states, top_k_index, top_k_weights)"
                )
            x, index, weights = (t.detach() for t in given[:3])
            real = None
            if mask[0] is not None and mask[0].numel() == x.shape[0]:
                real = mask[0].reshape(-1).to(x.device)
            with torch.no_grad():
                for e, acc in enumerate(accs[name]):
                    tok, pos = torch.where(index == e)
                    if real is not None:
                        keep = real[tok]
                        tok, pos = tok[keep], pos[keep]
                    if len(tok):  # the module computes h again inside: it keeps no copy
                        w = weights[tok, pos, None]
                        acc.update(_hidden(module, x[tok], e) * w.to(x.dtype))
                        weight2[name][e] += float(w.double().square().sum())
                rows = x if real is None else x[real]
                samples[name].append((place[0], _sample_rows(rows, per_batch[name], place[0])))
            if name == last:
                raise StopPass

        return fn

    handles = [
        modules[b.name].register_forward_pre_hook(hook(b.name), with_kwargs=True) for b in blocks
    ]
    it = progress(batches) if progress is not None else batches
    try:
        with torch.no_grad():
            for i, batch in enumerate(it):
                mask[0], place[0] = token_mask(batch), mine[i]
                call_until_stopped(model, batch)
    finally:
        for h in handles:
            h.remove()
    flat = {f"{n}#{e}": a for n, per in accs.items() for e, a in enumerate(per)}
    team.reduce(flat)
    team.sum_(list(weight2.values()))
    for b in blocks:  # every process the same sample, in the order of the whole set
        drawn = sorted((d for part in team.gather(samples[b.name]) for d in part), key=_first)
        if drawn:
            top_up(modules[b.name], accs[b.name], weight2[b.name], torch.cat([t for _, t in drawn]))
    return accs


def _first(item: tuple[int, torch.Tensor]) -> int:
    return item[0]


def _sample_rows(x: torch.Tensor, r: int, seed: int) -> torch.Tensor:
    """``r`` of the rows of ``x`` (all of them if fewer), drawn without replacement by a
    generator seeded with ``seed`` (the batch's place in the whole calibration set, so the
    draw does not depend on how the batches are shared between processes), on the CPU."""
    x = x.detach().reshape(-1, x.shape[-1])
    pick = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))[:r]
    return x[pick.to(x.device)].cpu()


def top_up(
    module: nn.Module,
    accs: Sequence[GramAccumulator],
    weight2: torch.Tensor,
    sample: torch.Tensor,
) -> None:
    """Add to the Gram of every expert of ``module`` that had fewer calibration rows ``n``
    than neurons ``m`` the Gram of its activations on ``sample`` (tokens of the layer,
    whichever expert they were sent to), scaled to count as ``m − n`` rows of its mean squared router weight; its row
    count stays ``n``.

    With fewer rows than neurons, any ``n`` neurons reproduce the others exactly on the
    calibration rows: the order past the ``n``-th pivot would be arbitrary and the fold
    fitted to noise (a copy of a kept neuron folded into unrelated ones; the dense
    groups are pinned for this, but an expert cannot be: every expert of a layer keeps
    the same number of neurons).  The layer's other tokens say how the expert's neurons
    relate on the layer's inputs, which is what the fold needs on new ones.  An expert
    the router never reached gets its whole Gram from them (the layer's mean squared
    weight).
    """
    if not len(sample):
        return
    counts = torch.tensor([a.count for a in accs], dtype=torch.float64)
    reached = counts > 0
    mean_w2 = float(weight2[reached].sum() / counts[reached].sum()) if bool(reached.any()) else 1.0
    gate_up: Any = module.gate_up_proj
    for e, acc in enumerate(accs):
        m, n = acc.dim, acc.count
        if n >= m:
            continue
        w2 = float(weight2[e] / n) if n > 0 else float(mean_w2)
        with torch.no_grad():
            h = _hidden(module, sample.to(gate_up.device, gate_up.dtype), e).double()
        acc.add(Products(0, (h.T @ h) * ((m - n) * w2 / len(h)), None))


def gram_arrays(accs: Sequence[GramAccumulator]) -> list[np.ndarray | None]:
    """Each expert's Gram from :func:`expert_grams`' accumulators as a float64 array;
    ``None`` for an expert without statistics (no calibration token at all)."""
    grams = [a.gram_numpy() for a in accs]
    return [g if a.count > 0 or np.any(g) else None for a, g in zip(accs, grams)]


def expert_step(block: ExpertBlock, model: nn.Module, round_to: int = 1) -> int:
    """The multiple every width of ``block`` must be: ``round_to`` and the rows of 16
    bytes Hugging Face's default experts kernel (``torch._grouped_mm``) needs: its down
    projection's rows are ``width`` elements long and must be a multiple of 16 bytes (4
    float32 or 8 bfloat16 neurons), or the model no longer runs."""
    return math.lcm(max(1, int(round_to)), row_step(block.module(model)))


def expert_width(block: ExpertBlock, model: nn.Module, fraction: float, round_to: int = 1) -> int:
    """Neurons per expert for ``experts=fraction``: the nearest multiple of
    :func:`expert_step`, at least one step, at most the width."""
    step = expert_step(block, model, round_to)
    k = max(step, round(fraction * block.width / step) * step)
    return min(block.width, k)


def _group_report(
    block: ExpertBlock, width: int, k: int, solver: ExpertSolver | None, rows: int | None = None
) -> GroupReport:
    """The report line of one MoE layer keeping ``k`` of its ``width`` neurons per expert
    (predicted error from ``solver``'s curve; none kept whole without one)."""
    error = float(np.sqrt(max(solver.error_curve()[k], 0.0))) if solver is not None else 0.0
    return GroupReport(
        name=f"{block.name}{EXPERTS_SUFFIX}",
        width_before=width,
        width_after=k,
        producers=[f"{block.name}.gate_up_proj"],
        consumers=[f"{block.name}.down_proj"],
        predicted_error=error,
        rows=rows or None,
    )


def narrow_experts(
    work: nn.Module,
    blocks: Sequence[ExpertBlock],
    widths: Sequence[int],
    method: Method,
    batches: list[Any],
    *,
    sequential: bool,
    solvers: Sequence[ExpertSolver] | None = None,
    rows: Mapping[str, int] | None = None,
    team: Team = SOLO,
    progress: Any = None,
    timings: dict[str, float] | None = None,
) -> list[GroupReport]:
    """Narrow the experts of ``blocks`` to ``widths`` (neurons per expert, one per block)
    in place, layer by layer in execution order; in sequential mode each layer's Grams
    are measured on the model whose earlier layers are already narrowed.  ``solvers``
    (one per block, from the original model's Grams, as a shared budget's curves were
    made): used as they are in one-shot mode, where they are what a fresh pass would
    give, so no pass runs; ``rows``: the calibration rows each block's Grams were
    measured on, for the report.  The report line of every block."""
    stats = method.needs_statistics
    grams: dict[str, list[np.ndarray | None]] = {}
    rows = dict(rows or {})
    timings = timings if timings is not None else {}
    for key in ("collect", "solve", "apply"):
        timings.setdefault(key, 0.0)

    def collect(todo: Sequence[ExpertBlock], stop: bool) -> None:
        t = time.perf_counter()
        wrap = progress if not stop else None
        for name, accs in expert_grams(work, todo, batches, wrap, stop=stop, team=team).items():
            grams[name], rows[name] = gram_arrays(accs), sum(a.count for a in accs)
        timings["collect"] += time.perf_counter() - t

    reuse = solvers is not None and not sequential
    if reuse and len(solvers or ()) != len(blocks):
        raise ValueError(f"{len(solvers or ())} expert solvers for {len(blocks)} MoE layers")
    if stats and not sequential and not reuse:
        collect(blocks, stop=False)
    reports = []
    for i, (b, k) in enumerate(zip(blocks, widths, strict=True)):
        width = b.width
        if k >= width:  # kept whole: no statistics needed
            reports.append(_group_report(b, width, width, None))
            continue
        if stats and sequential:
            collect([b], stop=True)  # on the model with the layers before it narrowed
        t = time.perf_counter()
        solver: ExpertSolver
        if reuse:
            assert solvers is not None
            solver = solvers[i]
        else:
            solver = method.expert_solver(b, grams.get(b.name) if stats else None, work)
        timings["solve"] += time.perf_counter() - t
        t = time.perf_counter()
        keep, folds = team.broadcast(solver.plan(k))
        b.prune(work, keep, folds)
        timings["apply"] += time.perf_counter() - t
        reports.append(_group_report(b, width, k, solver, rows.get(b.name)))
    return reports


def experts_run(
    work: nn.Module,
    batches: list[Any],
    info: CalibrationInfo,
    cfg: CompressConfig,
    method: Method,
    ctx: RunContext,
    t0: float,
) -> tuple[nn.Module, CompressionReport]:
    """Narrow every MoE layer's experts of ``work`` in place as ``cfg`` (``experts=F``) says."""
    tgt = cfg.parsed_target
    method, report = begin_run(work, cfg, method, info, ctx)
    timings: dict[str, float] = {}
    t = time.perf_counter()
    blocks = find_experts(work)
    if not blocks:
        raise ValueError(
            f"target {tgt}: no mixture-of-experts layer in {type(work).__name__} that "
            "spectrim recognises (Hugging Face's experts modules with 3-D gate_up_proj and "
            "down_proj: Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE, DeepSeek-V3, GraniteMoE, PhiMoE)"
        )
    team = ctx.team
    example, cost0 = example_cost(work, batches, team)
    timings["find"] = time.perf_counter() - t
    widths = [expert_width(b, work, tgt.value, cfg.round_to) for b in blocks]
    report.groups.extend(
        narrow_experts(
            work,
            blocks,
            widths,
            method,
            batches,
            sequential=cfg.sequential,
            team=team,
            progress=ctx.wrap(len(batches)),
            timings=timings,
        )
    )
    end_run(report, work, example, cost0, info, timings, t0)
    return work, report
