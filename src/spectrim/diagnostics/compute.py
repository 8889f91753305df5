"""The statistics behind :func:`spectrim.analyze` (engine reuse: graph, calibration, linalg, id).

Pipeline (one calibration pass, one held-out pass, one forward pass per sensitivity run):

1. trace and analyse the channels (:func:`spectrim.graph.analyze_channels`), self-check;
2. stream the consumer-input Grams of every prunable group on the calibration batches and,
   separately, on the held-out batches (:func:`spectrim.calibration.collect`);
3. per group, from the summed calibration Gram ``G = Σ_c G_c``: spectrum of ``Σ̂ = G/rows``
   (normalised by its trace), ``N(λ)`` at ``λ = α·tr Σ̂``, effective rank, and the ID error
   curve of :class:`spectrim.methods.interpolative.IDSolver` (the same selection as
   ``compress(method="id")``);
4. theory vs practice: the folds ``B_c`` fitted on calibration at the predicted width are
   scored on the held-out Grams; each group alone is compressed to ``sensitivity_fraction``
   of its width and the held-out predictions are compared with the original's;
5. per Conv/Linear weight: PQ index, spectral norm and stable rank
   (:mod:`spectrim.linalg.sparsity`).
"""

from __future__ import annotations

import copy
import math
import time
import warnings
from collections.abc import Callable, Iterable, Sequence
from typing import Any, cast

import numpy as np
import torch
from torch import nn
from torch.utils.data import TensorDataset

from spectrim._threads import single_threaded_blas
from spectrim.calibration import GramAccumulator, collect
from spectrim.calibration.batches import as_batches
from spectrim.calibration.checks import check_calibration, rows_per_group
from spectrim.diagnostics.report import (
    CompressibilityReport,
    GroupDiagnostics,
    SensitivityResult,
    WeightDiagnostics,
)
from spectrim.evaluation._common import extract_logits
from spectrim.evaluation.metrics import accuracy_from_logits, agreement_from_logits
from spectrim.graph import Analysis, UnitGroup, apply_plan, call_model
from spectrim.graph.modules import make_plain, weight_modules
from spectrim.graph.trace import batch_len
from spectrim.linalg import (
    degrees_of_freedom,
    effective_rank,
    gram_spectrum,
    pq_index,
    residual_of,
    spectral_norm,
)
from spectrim.linalg.masks import pq_keep_counts
from spectrim.methods import get_method
from spectrim.methods.interpolative import IDSolver
from spectrim.stages import solve_stage, trace_stage

__all__ = ["DEFAULT_ALPHAS", "analyze", "correlations", "weight_diagnostics"]

#: Default relative ridge levels ``α`` (``λ = α·tr Σ̂``).
DEFAULT_ALPHAS: tuple[float, ...] = (1e-4, 1e-3, 1e-2, 1e-1)

Wrap = Callable[[Iterable[Any]], Iterable[Any]]
_HELD_BATCH = 256  # held-out tensors: larger batches, fewer calls in the sensitivity runs


@single_threaded_blas()
def analyze(
    model: nn.Module,
    calibration: Any,
    *,
    heldout: Any = None,
    labels: Any = None,
    alphas: Sequence[float] = DEFAULT_ALPHAS,
    dof_alpha: float | None = None,
    error: float = 0.1,
    sensitivity: bool = True,
    sensitivity_fraction: float = 0.25,
    max_sensitivity_groups: int | None = None,
    pq: tuple[float, float] = (0.5, 1.0),
    verify: bool = True,
    progress: bool | Wrap = False,
) -> CompressibilityReport:
    """How compressible is ``model``, layer by layer, and does the theory predict practice?

    Args:
        model: a trained model (not modified; the analysis runs on a deep copy).
        calibration: unlabelled inputs for the statistics (a tensor, a Dataset or an
            iterable of batches, as for :func:`spectrim.compress`).
        heldout: inputs for the theory-vs-practice checks. When ``None`` the last quarter of
            ``calibration`` (examples of a tensor/``TensorDataset``, else batches) is held out
            and the statistics use the rest; the report says so.
        labels: integer labels of the held-out examples (or of all calibration examples
            when ``heldout`` is split from it). A labelled ``TensorDataset`` provides them by
            itself. With labels, "accuracy kept" is accuracy relative to the original's;
            without, the agreement of top-1 predictions with the original.
        alphas: relative ridge levels: ``N(λ)`` is reported at ``λ = α·tr Σ̂`` per group.
        dof_alpha: the ``α`` of ``N(λ)/m`` in the correlation (default: the middle one,
            ``sorted(alphas)[len(alphas) // 2]``).
        error: relative ID reconstruction error that defines each group's predicted width.
        sensitivity: run the one-group-at-a-time compression (one forward pass each).
        sensitivity_fraction: kept share of channels in those runs.
        max_sensitivity_groups: measure at most this many groups, spread evenly over depth.
        pq: ``(p, q)`` of the PQ index, ``0 < p < q`` (default ``(0.5, 1)``: the ℓ_0.5 soft
            sparsity).
        verify: run the graph self-checks first (failing groups are pinned).
        progress: show progress bars (or pass a wrapper around iterables, like tqdm).

    Example::

        >>> import torch, torch.nn as nn, spectrim
        >>> net = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 3))
        >>> report = spectrim.analyze(net, torch.randn(256, 8), sensitivity=False)
        >>> g = report.groups[0]
        >>> g.name, g.width, 0 < g.dof[0] <= g.width
        ('0', 32, True)
        >>> paths = report.write("/tmp/spectrim-analyze-doctest")  # doctest: +SKIP
    """
    t0 = time.perf_counter()
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    alpha_list = _check_alphas(alphas)
    d_alpha = alpha_list[len(alpha_list) // 2] if dof_alpha is None else float(dof_alpha)
    if not (math.isfinite(d_alpha) and d_alpha > 0):
        raise ValueError(f"dof_alpha must be a positive number, got {dof_alpha!r}")
    if not (math.isfinite(error) and error >= 0):
        raise ValueError(f"error must be a non-negative number, got {error!r}")
    if not 0 < sensitivity_fraction <= 1:
        raise ValueError(f"sensitivity_fraction must be in (0, 1], got {sensitivity_fraction!r}")
    if max_sensitivity_groups is not None and max_sensitivity_groups < 0:
        raise ValueError(f"max_sensitivity_groups must be >= 0, got {max_sensitivity_groups}")
    p, q = (float(v) for v in pq)
    if not 0 < p < q:
        raise ValueError(f"pq must be (p, q) with 0 < p < q, got {pq!r}")
    wrap = _wrapper(progress)

    calib_batches, held_batches, held_labels, source = _split_data(calibration, heldout, labels)
    info = check_calibration(calib_batches)
    check_calibration(held_batches)
    n_calib = sum(batch_len(b) for b in calib_batches)
    n_held = sum(batch_len(b) for b in held_batches)
    if held_labels is not None and held_labels.numel() != n_held:
        raise ValueError(
            f"labels: {held_labels.numel()} labels for {n_held} held-out examples"
            + (f" (or {n_calib + n_held} calibration examples)" if heldout is None else "")
        )
    report = CompressibilityReport(
        model=type(model).__name__,
        n_calibration=n_calib,
        n_heldout=n_held,
        heldout_source=source,
        alphas=alpha_list,
        dof_alpha=d_alpha,
        error=float(error),
        pq_p=p,
        pq_q=q,
        sensitivity_fraction=float(sensitivity_fraction),
    )
    timings = report.timings

    t = time.perf_counter()
    work = copy.deepcopy(model).eval()
    make_plain(work)  # weight-standardised convs: the weights their forward computes
    _, analysis, pinned_warnings = trace_stage(work, calib_batches, verify=verify)
    report.warnings.extend(info.warnings)
    report.warnings.extend(pinned_warnings)
    report.pinned = {g.name: str(g.pinned) for g in analysis.groups if g.pinned is not None}
    groups = analysis.prunable
    timings["analysis"] = time.perf_counter() - t

    t = time.perf_counter()
    calib_stats = collect(work, analysis, calib_batches, groups, progress=wrap).stats
    held_stats = collect(work, analysis, held_batches, groups, progress=wrap).stats
    timings["statistics"] = time.perf_counter() - t

    t = time.perf_counter()
    solvers = cast(
        "dict[int, IDSolver]",
        solve_stage(get_method("id"), groups, calib_stats, work, nonempty=True),
    )
    for g in groups:
        solver = solvers.get(g.index)
        if solver is None:
            report.warnings.append(f"unit group '{g.name}': no consumer was called; skipped")
            continue
        diag = _group_diagnostics(g, solver, calib_stats, held_stats, report)
        report.groups.append(diag)
        rows = rows_per_group([g], calib_stats, info)[g.index]
        if rows < g.width:
            report.warnings.append(
                f"unit group '{g.name}' ({g.width} channels): {int(rows)} calibration rows, "
                "fewer than its channels, so its error curve reaches 0 on the calibration "
                "data whatever the layer does; judge it by the held-out error"
            )
    timings["spectra"] = time.perf_counter() - t

    t = time.perf_counter()
    report.weights = weight_diagnostics(work, analysis, p=p, q=q)
    timings["weights"] = time.perf_counter() - t

    t = time.perf_counter()
    if sensitivity and report.groups and max_sensitivity_groups != 0:
        _sensitivity(
            work, analysis, solvers, report, held_batches, held_labels, wrap, max_sensitivity_groups
        )
    else:
        report.sensitivity_meaning = "not measured"
        report.notes.append("sensitivity runs were not requested; no correlation is reported")
    timings["sensitivity"] = time.perf_counter() - t
    report.seconds = time.perf_counter() - t0
    return report


# ------------------------------------------------------------------------------------- inputs


def _check_alphas(alphas: Sequence[float]) -> list[float]:
    out = sorted(float(a) for a in alphas)
    if not out:
        raise ValueError("alphas must hold at least one value")
    if not all(math.isfinite(a) and a > 0 for a in out):
        raise ValueError(f"alphas must be positive numbers, got {list(alphas)!r}")
    return out


def _wrapper(progress: bool | Wrap) -> Wrap | None:
    if callable(progress):
        return progress
    if not progress:
        return None

    def wrap(it: Iterable[Any]) -> Iterable[Any]:
        from tqdm.auto import tqdm

        return tqdm(it, desc="analyze", unit="step", leave=False)

    return wrap


def _labels_of(data: Any) -> torch.Tensor | None:
    """Integer labels carried by a labelled ``TensorDataset`` (``None`` otherwise)."""
    if isinstance(data, TensorDataset) and len(data.tensors) >= 2:
        y = data.tensors[1]
        if not (y.is_floating_point() or y.is_complex() or y.dtype == torch.bool):
            return _usable(y.reshape(-1).long())
    return None


def _usable(y: torch.Tensor) -> torch.Tensor | None:
    """``y`` unless every label is negative (unlabelled data marks examples with -1)."""
    return y if y.numel() and bool((y >= 0).any()) else None


def _as_label_tensor(labels: Any) -> torch.Tensor:
    y = labels if isinstance(labels, torch.Tensor) else torch.as_tensor(np.asarray(labels))
    if y.is_floating_point() or y.is_complex() or y.dtype == torch.bool:
        raise ValueError(f"labels must be integer class indices, got dtype {y.dtype}")
    return y.detach().cpu().long().reshape(-1)


def _split_data(
    calibration: Any, heldout: Any, labels: Any
) -> tuple[list[Any], list[Any], torch.Tensor | None, str]:
    """Calibration batches, held-out batches, held-out labels and a note on the split."""
    given = None if labels is None else _usable(_as_label_tensor(labels))
    if heldout is not None:
        y = given if given is not None else _labels_of(heldout)
        return as_batches(calibration), as_batches(heldout, _HELD_BATCH), y, "passed as heldout"
    if given is None:
        given = _labels_of(calibration)
    if isinstance(calibration, (torch.Tensor, TensorDataset)):
        tensors = [calibration] if isinstance(calibration, torch.Tensor) else calibration.tensors
        n = int(tensors[0].shape[0])
        if n < 2:
            raise ValueError("need at least 2 calibration examples to hold some out")
        cut = n - max(1, n // 4)
        y = given[cut:] if given is not None and given.numel() == n else given
        calib, held = tensors[0][:cut], tensors[0][cut:]
        note = f"the last {n - cut} of {n} calibration examples (not used for the statistics)"
        return as_batches(calib), as_batches(held, _HELD_BATCH), y, note
    batches = as_batches(calibration)
    if len(batches) < 2:
        raise ValueError(
            "cannot hold out part of a single calibration batch: pass heldout=... or more "
            "than one batch"
        )
    cut = len(batches) - max(1, len(batches) // 4)
    n_total = sum(batch_len(b) for b in batches)
    n_cut = sum(batch_len(b) for b in batches[:cut])
    y = given[n_cut:] if given is not None and given.numel() == n_total else given
    note = (
        f"the last {len(batches) - cut} of {len(batches)} calibration batches "
        "(not used for the statistics)"
    )
    return batches[:cut], batches[cut:], y, note


# ------------------------------------------------------------------------------------ groups


def _group_diagnostics(
    g: UnitGroup,
    solver: IDSolver,
    calib_stats: dict[tuple[int, str], GramAccumulator],
    held_stats: dict[tuple[int, str], GramAccumulator],
    report: CompressibilityReport,
) -> GroupDiagnostics:
    total = sum(solver.grams.values())
    assert isinstance(total, np.ndarray)
    trace = float(np.trace(total))
    mu = gram_spectrum(total)
    eig = mu / trace if trace > 0 else np.zeros_like(mu)
    # N(α·tr Σ̂) from eigenvalues of Σ̂/tr Σ̂: the row count and the trace cancel.
    dof = np.atleast_1d(degrees_of_freedom(eig, np.asarray(report.alphas)))
    curve = np.sqrt(np.maximum(solver.error_curve(), 0.0))
    k = int(np.flatnonzero(curve <= report.error)[0]) if curve.size else 0
    k = min(max(k, 1), g.width)
    diag = GroupDiagnostics(
        index=g.index,
        name=g.name,
        width=g.width,
        producers=list(g.producers),
        consumers=list(solver.grams),
        rows=sum(calib_stats[(g.index, c)].count for c in solver.grams),
        rank=int(np.count_nonzero(mu)),
        effective_rank=effective_rank(mu),
        eigenvalues=[float(v) for v in eig],
        dof=[float(v) for v in dof],
        dof_at_alpha=float(degrees_of_freedom(eig, report.dof_alpha)),
        error_curve=[float(v) for v in curve],
        predicted_width=k,
        predicted_error=float(curve[k]),
    )
    plan = solver.plan(k)
    res_sum = tr_sum = 0.0
    for name, b in plan.folds.items():
        acc = held_stats.get((g.index, name))
        if acc is None or acc.count == 0:
            continue
        G_h = acc.gram_numpy()
        res, tr = residual_of(G_h, plan.keep, b), float(np.trace(G_h))
        diag.consumer_errors[name] = math.sqrt(res / tr) if tr > 0 else 0.0
        res_sum, tr_sum = res_sum + res, tr_sum + tr
    if diag.consumer_errors:
        diag.measured_error = math.sqrt(res_sum / tr_sum) if tr_sum > 0 else 0.0
    return diag


# ------------------------------------------------------------------------------------ weights


def weight_diagnostics(
    model: nn.Module, analysis: Analysis | None = None, *, p: float = 0.5, q: float = 1.0
) -> list[WeightDiagnostics]:
    """PQ index (whole matrix and per row), spectral norm, stable rank and the weights
    the ℓq bound keeps (Paper 3's ABP-M count with q = 0.5, η = 0, summed over rows) of
    every weight matrix of a registered module type (:mod:`spectrim.graph.modules`:
    ``nn.Linear`` / ``nn.Conv{1,2,3}d`` read as ``(out, in·kh·kw)``, ...).

    Example::

        >>> [w.shape for w in weight_diagnostics(nn.Sequential(nn.Linear(4, 3), nn.Conv1d(3, 2, 5)))]
        [[3, 4], [2, 15]]
    """
    producer_of: dict[str, str] = {}
    if analysis is not None:
        for g in analysis.groups:
            for name in g.producers:
                producer_of.setdefault(name, g.name)
    out = []
    for name, module, kind in weight_modules(model):
        W = kind.matrix(module).detach().double().cpu().numpy()
        rows = np.asarray(pq_index(W, p=p, q=q, axis=1))
        s = spectral_norm(W)
        fro = float(np.linalg.norm(W))
        out.append(
            WeightDiagnostics(
                name=name,
                shape=[int(W.shape[0]), int(W.shape[1])],
                group=producer_of.get(name),
                pq_index=float(pq_index(W, p=p, q=q)),
                pq_index_row_mean=float(rows.mean()),
                pq_index_row_median=float(np.median(rows)),
                spectral_norm=s,
                frobenius_norm=fro,
                stable_rank=max(fro * fro / (s * s), 1.0) if s > 0 else 0.0,
                lq_keep=int(np.sum(pq_keep_counts(W, 0.5, 1.0, 0.0, scope="row"))),
            )
        )
    return out


# -------------------------------------------------------------------------------- sensitivity


def _logits(model: nn.Module, batches: Sequence[Any]) -> torch.Tensor:
    chunks = []
    with torch.no_grad():
        for b in batches:
            chunks.append(extract_logits(call_model(model, b)).detach().float().cpu())
    return torch.cat(chunks, dim=0)


def _spread(n: int, cap: int | None) -> list[int]:
    """``cap`` indices of ``range(n)`` spread evenly (all when ``cap`` is None or >= n)."""
    if cap is None or cap >= n:
        return list(range(n))
    return sorted(set(np.rint(np.linspace(0, n - 1, cap)).astype(int).tolist()))


def _sensitivity(
    work: nn.Module,
    analysis: Analysis,
    solvers: dict[int, IDSolver],
    report: CompressibilityReport,
    batches: Sequence[Any],
    labels: torch.Tensor | None,
    wrap: Wrap | None,
    cap: int | None,
) -> None:
    frac = report.sensitivity_fraction
    try:
        ref = _logits(work, batches)
        base_acc = accuracy_from_logits(ref, labels) if labels is not None else None
    except Exception as exc:
        report.warnings.append(f"sensitivity runs skipped: {exc}")
        report.sensitivity_meaning = "not measured"
        return
    if base_acc is not None and base_acc > 0:
        report.sensitivity_metric = "accuracy"
        report.baseline_accuracy = base_acc
        report.sensitivity_meaning = (
            f"held-out top-1 accuracy with only this layer compressed to {frac:g} of its "
            f"channels (ID, one-shot folds), divided by the original's accuracy "
            f"({base_acc:.4f}) on the same {report.n_heldout} labelled examples"
        )
    else:
        report.sensitivity_metric = "agreement"
        report.baseline_accuracy = base_acc
        report.sensitivity_meaning = (
            f"share of the {report.n_heldout} held-out examples on which the model with only "
            f"this layer compressed to {frac:g} of its channels (ID, one-shot folds) predicts "
            "the same top-1 class as the original (no labels were given)"
        )
    chosen = [report.groups[i] for i in _spread(len(report.groups), cap)]
    if len(chosen) < len(report.groups):
        report.notes.append(
            f"sensitivity measured on {len(chosen)} of {len(report.groups)} groups "
            "(max_sensitivity_groups), spread evenly over depth"
        )
    for gd in wrap(chosen) if wrap is not None else chosen:
        k = min(max(1, round(frac * gd.width)), gd.width)
        small = copy.deepcopy(work)
        apply_plan(small, analysis, {gd.index: solvers[gd.index].plan(k)})
        out = _logits(small, batches)
        agree = agreement_from_logits(ref, out)
        acc = accuracy_from_logits(out, labels) if labels is not None else None
        kept = acc / base_acc if acc is not None and base_acc else agree
        gd.sensitivity = SensitivityResult(width=k, agreement=agree, accuracy=acc, kept=kept)
    for x in ("N/m", "N"):
        for y in ("kept", "agreement"):
            rho, r = correlations(report, x, y)
            report.correlation_table[f"{x} vs {y}"] = {"spearman": rho, "pearson": r}
    report.spearman, report.pearson = correlations(report)
    if report.spearman is None:
        report.notes.append(
            "no correlation: it needs at least 3 measured groups with varying values"
        )


_X = {"N/m": lambda g: g.dof_ratio, "N": lambda g: g.dof_at_alpha}
_Y = {
    "kept": lambda s: s.kept,
    "agreement": lambda s: s.agreement,
}


def correlations(
    report: CompressibilityReport, x: str = "N/m", y: str = "kept"
) -> tuple[float | None, float | None]:
    """Spearman and Pearson correlation across the measured groups (``None`` if undefined).

    ``x``: ``"N/m"`` (``N(λ)/m`` at ``report.dof_alpha``) or ``"N"`` (``N(λ)``); ``y``:
    ``"kept"`` (the accuracy kept) or ``"agreement"``. Needs 3 groups and non-constant values.

    Example::

        >>> correlations(CompressibilityReport())
        (None, None)
    """
    from scipy import stats

    fx, fy = _X[x], _Y[y]
    pairs = [
        (fx(g), v)
        for g in report.groups
        if g.sensitivity is not None and (v := fy(g.sensitivity)) is not None
    ]
    if len(pairs) < 3:
        return None, None
    xs, ys = (np.array(v, dtype=np.float64) for v in zip(*pairs))
    if np.ptp(xs) == 0 or np.ptp(ys) == 0:
        return None, None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        rho = float(stats.spearmanr(xs, ys).statistic)
        r = float(stats.pearsonr(xs, ys).statistic)
    return (rho if math.isfinite(rho) else None), (r if math.isfinite(r) else None)
