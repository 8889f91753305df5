"""The weight-sparsification pipeline behind :func:`spectrim.compress` (private).

Stages: trace (for the structured step) → the weight matrices (the module-type registry)
→ the statistics the method declares (input Grams, one pass; or per matrix from the
already-sparsified prefix in a sequential run, with the cross term against the original
model when a refit reconstructs the original outputs) → one :class:`WeightPlan` per matrix
→ its applier → channels no consumer reads any more removed through the channel surgery
→ the report (per-matrix spectra and output errors).
"""

from __future__ import annotations

import copy
import time
from collections import Counter
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np
import torch
from torch import nn

from spectrim.budget.densities import allocate_densities
from spectrim.calibration.batches import head_examples
from spectrim.calibration.checks import CalibrationInfo
from spectrim.calibration.inputs import input_gram_at, input_grams, module_calls
from spectrim.config import CompressConfig
from spectrim.context import RunContext
from spectrim.evaluation.flops import profile
from spectrim.graph import GroupPlan, apply_plan
from spectrim.graph.channels import Analysis, shared_tensors
from spectrim.graph.modules import WeightKind, module_kind, weight_modules
from spectrim.graph.surgery import WeightPlan, apply_weight_plans
from spectrim.graph.trace import batch_len, model_outputs
from spectrim.linalg.masks import matrix_metrics, output_error, pq_keep_counts
from spectrim.methods.weights import MatrixUnit, WeightMethod, pooled_keep, refit_values
from spectrim.report import CompressionReport, MatrixReport
from spectrim.stages import trace_stage

__all__ = ["sparsifiable", "sparsify_run", "weight_curves", "weight_nonzeros"]


def sparsifiable(
    work: nn.Module, report: CompressionReport
) -> list[tuple[str, nn.Module, WeightKind]]:
    """The weight matrices a weight method may sparsify (a warning for each tied one)."""
    shared = {n for names in shared_tensors(work) for n in names}
    out = []
    for name, module, kind in weight_modules(work):
        pname = f"{name}.weight" if name else "weight"
        if pname in shared:
            report.warnings.append(
                f"module '{name}': its weight is shared with another module (tied); left "
                "dense, since one mask cannot fit the inputs of both users"
            )
            continue
        if kind.matrix(module).numel() == 0:
            continue
        out.append((name, module, kind))
    return out


def _dead_channel_plans(work: nn.Module, analysis: Analysis) -> dict[int, GroupPlan]:
    """Per prunable group, drop the channels whose columns are zero in every consumer
    (nothing reads them: removing them and their producers' rows is exact)."""
    modules = dict(work.named_modules())
    plans: dict[int, GroupPlan] = {}
    for g in analysis.prunable:
        alive = np.zeros(g.width, dtype=bool)
        readable = True
        for slot in g.consumers:
            mod = modules.get(slot.module)
            kind = module_kind(mod) if mod is not None else None
            if kind is None or kind.in_size is None:  # not a consumer surgery folds into
                readable = False
                break
            assert mod is not None
            w = mod.weight.detach()  # (out, in, ...): inputs along dim 1
            nz = (w != 0).flatten(2).any(dim=(0, 2)) if w.dim() > 2 else (w != 0).any(dim=0)
            cols = torch.as_tensor(slot.positions)
            alive |= nz[cols.to(nz.device)].any(dim=1).cpu().numpy()
        if not readable or alive.all():
            continue
        if not alive.any():
            alive[0] = True  # a group keeps at least one channel
        plans[g.index] = GroupPlan(keep=np.flatnonzero(alive))
    return plans


def weight_nonzeros(model: nn.Module) -> int:
    """Non-zero weights in the matrices a weight method would sparsify."""
    units = sparsifiable(model, CompressionReport("", ""))
    return sum(int((k.matrix(m) != 0).sum()) for _, m, k in units)


#: densities at which each matrix's error curve is measured (allocation="curves")
CURVE_GRID = np.array(
    [1.0, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.25, 0.2, 0.15, 0.1, 0.07, 0.05, 0.03]
)


#: examples (whole leading batches) on which ``allocation="output"`` measures the gains
_PROBE_EXAMPLES = 128


def weight_curves(
    algo: WeightMethod,
    names: list[str],
    by_name: dict[str, tuple[nn.Module, WeightKind]],
    weights0: dict[str, np.ndarray],
    grams0: dict[str, Any],
    ctx: RunContext,
    at: int | None = None,
) -> tuple[dict[str, tuple[np.ndarray, np.ndarray]], dict[str, int], dict[str, np.ndarray]]:
    """``(curves, sizes, probes)``: per matrix with a Gram, the method's mask (and refit)
    at every density of :data:`CURVE_GRID`, judged by the squared relative output error
    on the original model's inputs (one-shot); its number of weights; and its sparsified
    values at grid index ``at`` (when given)."""
    curves: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    sizes: dict[str, int] = {}
    probes: dict[str, np.ndarray] = {}
    for n in names:
        acc = grams0.get(n)
        if acc is None:  # no Gram: cannot be judged
            continue
        module, kind = by_name[n]
        unit = MatrixUnit(n, module, kind, weights0[n], gram=acc.gram_numpy(), rows=acc.count)
        if algo.needs_mean:
            unit.mean = acc.mean_numpy()
        errors = [0.0]
        grid = algo.sparsify_grid(unit, [float(d) for d in CURVE_GRID[1:]], ctx.rng)
        for i, (values, keep) in enumerate(grid, start=1):
            if algo.refit:
                values = refit_values(unit, keep, algo.refit_ridge, algo.refit_prior, values)
            errors.append(output_error(unit.weight, values, unit.gram))
            if i == at:
                probes[n] = np.where(keep, values, 0.0)
        curves[n] = (CURVE_GRID, np.asarray(errors))
        sizes[n] = int(unit.weight.size)
    return curves, sizes, probes


def _curve_densities(
    algo: WeightMethod,
    names: list[str],
    by_name: dict[str, tuple[nn.Module, WeightKind]],
    weights0: dict[str, np.ndarray],
    grams0: dict[str, Any],
    density: float,
    ctx: RunContext,
    work: nn.Module | None = None,
    probe: Any = None,
) -> tuple[dict[str, float], dict[str, float]]:
    """``(densities, gains)``: per-matrix densities from each matrix's error curve
    (:func:`weight_curves`), then :func:`allocate_densities`.  With a ``probe`` batch
    (``allocation="output"``) each curve is first multiplied by the matrix's gain: the
    relative error of the model's outputs on ``probe`` with that matrix alone sparsified
    (at the grid density nearest the target), over the matrix's own output error there."""
    at = max(int(np.argmin(np.abs(CURVE_GRID - density))), 1)
    curves, sizes, probes = weight_curves(algo, names, by_name, weights0, grams0, ctx, at)
    if not curves:
        return {}, {}
    gains: dict[str, float] = {}
    if probe is not None and work is not None:
        gains = _output_gains(
            work, probe, by_name, probes, {n: c[1][at] for n, c in curves.items()}
        )
        curves = {n: (d, e * gains[n]) for n, (d, e) in curves.items()}
    return allocate_densities(curves, sizes, density), gains


def _probe_batches(batches: list[Any]) -> list[Any]:
    """The leading batches holding at least :data:`_PROBE_EXAMPLES` examples."""
    out, n = [], 0
    for b in batches:
        out.append(b)
        n += batch_len(b)
        if n >= _PROBE_EXAMPLES:
            break
    return out


def _flat_outputs(model: nn.Module, batches: list[Any]) -> torch.Tensor:
    return torch.cat(
        [t.detach().double().reshape(-1) for b in batches for t in model_outputs(model, b)]
    )


def _output_gains(
    work: nn.Module,
    probe: Any,
    by_name: dict[str, tuple[nn.Module, WeightKind]],
    values: dict[str, np.ndarray],
    own: dict[str, float],
) -> dict[str, float]:
    """Per matrix: (squared relative error of the model's outputs on ``probe`` with only
    that matrix replaced by ``values``) / (its own squared relative output error ``own``)."""
    with torch.no_grad():
        ref = _flat_outputs(work, probe)
        energy = float(ref.square().sum()) or 1.0
        gains = {}
        for n, v in values.items():
            module, kind = by_name[n]
            saved = kind.matrix(module).detach().clone()
            kind.set_matrix(module, torch.as_tensor(v))
            try:
                out = _flat_outputs(work, probe)
            finally:
                kind.set_matrix(module, saved)
            final = float((out - ref).square().sum()) / energy
            gains[n] = final / max(own[n], 1e-12)
    return gains


def sparsify_run(
    work: nn.Module,
    batches: list[Any],
    info: CalibrationInfo,
    cfg: CompressConfig,
    algo: WeightMethod,
    ctx: RunContext,
    t0: float,
    densities: Mapping[str, float] | None = None,
) -> tuple[nn.Module, CompressionReport]:
    """Sparsify the weights of ``work`` in place as ``cfg`` says; ``(work, report)``.
    ``densities`` (module name -> kept share) replaces the method's own per-matrix
    allocation (the joint allocator's decision, :mod:`spectrim._joint`)."""
    tgt = cfg.parsed_target
    name = algo.name
    density = None if tgt.kind == "auto" else 1.0 - tgt.value
    nm = tgt.pattern
    if tgt.kind == "auto" and not algo.self_sized:
        raise ValueError(
            f"method '{name}' needs target='sparsity=S' or 'sparsity=n:m' ('auto' is for "
            "lq, pqi and lq-lasso, which size themselves)"
        )
    if nm is not None and not algo.supports_nm:
        raise ValueError(
            f"method '{name}' does not make n:m patterns; use obs, wanda, magnitude or random"
        )
    if nm is not None and algo.scope == "global":
        raise ValueError("an n:m pattern is per row; scope='global' does not apply")
    if algo.rounds > 1 and (nm is not None or density is None):
        raise ValueError(
            f"method '{name}': rounds={algo.rounds} needs a sparsity=S target (not n:m or auto)"
        )
    team = ctx.team
    example = team.broadcast(head_examples(batches[0]))  # rank 0's: every rank traces it
    work.eval()
    timings: dict[str, float] = {}
    report = CompressionReport(method=name, target=str(tgt), config=cfg.to_dict())
    report.warnings.extend(info.warnings)

    t = time.perf_counter()
    analysis = None
    if algo.structured:
        example, analysis, _ = trace_stage(work, [example], verify=cfg.verify, seed=cfg.seed)
    cost0 = profile(work, example)
    units = sparsifiable(work, report)
    if not units:
        raise ValueError(
            "the model has no weight matrix to sparsify: no nn.Linear, nn.Conv1d/2d/3d (or "
            "another registered module type, spectrim.graph.modules) with an unshared weight"
        )
    names = [n for n, _, _ in units]
    by_name = {n: (m, k) for n, m, k in units}
    ran = module_calls(work, example, names)  # one forward pass for order and counts
    order = list(dict.fromkeys(ran)) + sorted(set(names) - set(ran))
    calls = Counter(ran)
    timings["analysis"] = time.perf_counter() - t

    t = time.perf_counter()
    # the original model's input Grams: the statistics of one-shot methods and of every
    # matrix's output error in the report
    grams0 = input_grams(
        work, batches, names, sums=algo.needs_mean, progress=ctx.wrap(len(batches))
    )
    team.reduce(grams0)  # the whole calibration set's Grams on every rank
    report.calibration_rows = int(team.total(sum(batch_len(b) for b in batches)))
    timings["statistics"] = time.perf_counter() - t

    t = time.perf_counter()
    weights0 = {
        n: by_name[n][1].matrix(by_name[n][0]).detach().double().cpu().numpy() for n in names
    }
    solved: dict[str, float] = {}
    pooled: dict[str, np.ndarray] = {}
    if isinstance(getattr(algo, "eta", None), float) and density is not None and density < 1:
        plain = [MatrixUnit(n, *by_name[n], weights0[n]) for n in names]
        algo.eta = algo.solve_eta(plain, density)  # type: ignore[attr-defined]
        solved["eta"] = algo.eta  # type: ignore[attr-defined]
    if algo.scope == "global" and (density is None or density < 1):
        plain = [MatrixUnit(n, *by_name[n], weights0[n]) for n in names]
        d = density if density is not None else algo.global_density(plain)
        pooled = pooled_keep(algo, plain, d)
    per_matrix: dict[str, float] = {}
    if densities is not None:
        per_matrix = {n: float(densities.get(n, 1.0)) for n in names}
        solved["densities"] = per_matrix  # type: ignore[assignment]
    elif algo.allocation != "uniform" and density is not None and density < 1 and nm is None:
        probe = _probe_batches(batches) if algo.allocation == "output" else None
        per_matrix, gains = _curve_densities(
            algo, names, by_name, weights0, grams0, density, ctx, work, probe
        )
        solved["densities"] = per_matrix  # type: ignore[assignment]
        if gains:
            solved["output_gains"] = gains  # type: ignore[assignment]
    # rank 0's decisions on every rank
    per_matrix, pooled, solved = team.broadcast((per_matrix, pooled, solved))
    if "eta" in solved:
        algo.eta = solved["eta"]  # type: ignore[attr-defined]
    sequential = cfg.sequential and algo.needs_statistics and algo.scope != "global"
    original = copy.deepcopy(work) if sequential and algo.refit else None
    rng = ctx.rng()
    values_of: dict[str, np.ndarray] = {}
    rounds = algo.rounds
    for r in range(1, rounds + 1):
        if r > 1 and original is not None and algo.refit_to == "previous":
            original = copy.deepcopy(work)  # this round's refits reconstruct the last round's

        it: Iterable[str] = order
        desc = "matrices" if rounds == 1 else f"matrices (round {r}/{rounds})"
        for n in ctx.wrap(len(order), desc)(it):
            module, kind = by_name[n]
            unit = MatrixUnit(n, module, kind, values_of.get(n, weights0[n]))
            if algo.needs_statistics:
                acc = (
                    input_gram_at(
                        work,
                        n,
                        batches,
                        original=original,
                        sums=algo.needs_mean,
                        stop_early=calls.get(n, 0) == 1,
                    )
                    if sequential
                    else grams0.get(n)
                )
                if sequential:  # this matrix's Gram over every rank's batches
                    team.reduce({} if acc is None else {n: acc})
                if acc is None or acc.count == 0:
                    if r == 1:
                        report.warnings.append(
                            f"module '{n}' ({kind.name}): its inputs cannot be read as rows of "
                            f"the weight's columns (grouped conv, or it never ran); '{name}' "
                            "left it dense"
                        )
                    continue
                unit.gram = acc.gram_numpy()
                unit.rows = acc.count
                if original is not None and acc.cross is not None:
                    unit.cross = acc.cross_numpy()
                if algo.needs_mean:
                    unit.mean = acc.mean_numpy()
            dens = per_matrix.get(n, density)
            if dens is not None:  # round r keeps d^(r/R): the same share of what remains
                dens = float(dens) ** (r / rounds)
            if dens is not None and dens >= 1.0:
                keep = np.ones(unit.weight.shape, dtype=bool)  # sparsity 0: nothing changes
                values = unit.weight
            elif n in pooled:
                keep = pooled[n]
                values = np.where(keep, unit.weight, 0.0)
            else:
                values, keep = algo.sparsify(unit, dens, nm, rng)
            if keep.all() and not algo.sets_values:
                values = unit.weight  # nothing removed: exactly the original
            elif algo.refit:
                values = refit_values(unit, keep, algo.refit_ridge, algo.refit_prior, values)
            values, keep = team.broadcast((values, keep))  # rank 0's mask and values
            plan = WeightPlan(n, keep, values)
            apply_weight_plans(work, {n: plan})
            delta = algo.bias_delta(unit, values)
            bias = getattr(module, "bias", None)
            if delta is not None and isinstance(bias, torch.Tensor):
                with torch.no_grad():
                    bias.add_(torch.as_tensor(delta, dtype=bias.dtype))
            values_of[n] = np.where(keep, values, 0.0)
    if rounds > 1:
        solved["rounds"] = rounds
    timings["sparsify"] = time.perf_counter() - t

    t = time.perf_counter()
    removed = 0
    if analysis is not None:
        dead = _dead_channel_plans(work, analysis)
        if dead:
            removed = sum(analysis.groups[g].width - len(p.keep) for g, p in dead.items())
            apply_plan(work, analysis, dead)
    timings["structured"] = time.perf_counter() - t

    t = time.perf_counter()
    for n in names:
        module, kind = by_name[n]
        W0 = weights0[n]
        rep = MatrixReport(name=n, kind=kind.name, shape=list(W0.shape), density=1.0)
        rep.lq_bound = int(np.sum(pq_keep_counts(W0, 0.5, 1.0, 0.0, scope="row")))
        if n in values_of:
            g0 = grams0.get(n)
            metrics = matrix_metrics(W0, values_of[n], g0.gram_numpy() if g0 is not None else None)
            for key, value in metrics.items():
                setattr(rep, key, value)
        else:
            rep.note = "left dense"
        report.matrices.append(rep)
        report.nonzeros_before += int(np.count_nonzero(W0))
        report.nonzeros_after += int(np.count_nonzero(values_of.get(n, W0)))
    if removed:
        report.warnings.append(
            f"{removed} channels no longer read by any consumer were removed with their "
            "producers' filters (exact); the non-zero counts above are before that removal"
        )
    if solved:
        report.config["solved"] = solved
    cost1 = profile(work, example)
    report.params_before, report.params_after = cost0.params, cost1.params
    report.macs_before, report.macs_after = cost0.macs, cost1.macs
    timings["report"] = time.perf_counter() - t
    report.timings = timings
    report.seconds = time.perf_counter() - t0
    return work, report
