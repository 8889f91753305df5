"""Sequential calibration: corrections that undo the error of the compressed prefix.

In one-shot mode every consumer's correction ``B`` is fitted on the original model's
activations, so errors of earlier layers accumulate.  Here the calibration batches run
in lock-step through the model *while it is being compressed*: at each consumer (in
execution order) the inputs ``Z'`` produced by the already-compressed prefix are paired
with the original model's inputs ``Z`` at the same point, and the correction solves

    min_B ‖Z − Z'[:, S] Bᵀ‖²  (cross-covariance least squares),

so the consumer reconstructs the *original* activations from the compressed ones.  (The
naive variant, fitting ``Z'`` from ``Z'[:, S]``, reproduces the compressed model's own
drift; issue #2 reports it losing about nine points of accuracy on ResNet-56.)

Cost: one forward pass of the original model and one of the *compressed* model (both in
the calibration mini-batches), plus the Gram products; memory holds the original
consumer inputs of the pruned groups and the live activations of all batches at once.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from greenlet import getcurrent, greenlet
from torch import nn

from spectrim.calibration.collect import _channel_dim, group_rows
from spectrim.calibration.gram import GramAccumulator
from spectrim.graph.channels import Analysis, UnitGroup
from spectrim.graph.surgery import (
    GroupPlan,
    _fold_consumer,
    _gather_index,
    _new_positions,
    apply_plan,
)
from spectrim.graph.trace import batch_len, call_model
from spectrim.linalg import fit_cross_reconstruction

__all__ = ["original_rows", "sequential_correct"]

Key = tuple[int, str]


def original_rows(
    model: nn.Module,
    analysis: Analysis,
    batches: Sequence[Any],
    groups: Sequence[UnitGroup],
    progress: Callable[[Iterable[Any]], Iterable[Any]] | None = None,
    fraction: float = 1.0,
    min_rows_per_unit: int = 32,
) -> tuple[dict[Key, list[torch.Tensor]], dict[Key, GramAccumulator], int]:
    """Run the original model once over ``batches``; return the Gram of each (group,
    consumer) input over all batches, and its rows (one tensor per batch, in batch order)
    for the first ``n_keep`` batches, and ``n_keep``.

    ``n_keep`` covers at least ``fraction`` of the examples and, for every (group,
    consumer), at least ``min_rows_per_unit`` rows per channel of the group (decided after
    the first batch), so wide layers (transformer FFNs) are never fitted on too few rows.
    """
    modules = dict(model.named_modules())
    parts: dict[Key, list[torch.Tensor]] = {}
    done: set[Key] = set()
    batch_index = [0]
    sizes = np.cumsum([batch_len(b) for b in batches])
    n_keep = [len(batches)]
    grams: dict[Key, GramAccumulator] = {}
    per_module: dict[str, list[tuple[Key, torch.Tensor]]] = {}
    for g in groups:
        for slot in g.consumers:
            pos = torch.as_tensor(slot.positions, dtype=torch.long)
            per_module.setdefault(slot.module, []).append(((g.index, slot.module), pos))

    def make_hook(name: str) -> Callable[..., None]:
        def hook(module: nn.Module, args: tuple[Any, ...]) -> None:
            x = args[0].detach()
            for key, pos in per_module[name]:
                if key in done:
                    continue  # shared module: first call only
                done.add(key)
                r = group_rows(x, _channel_dim(module, x), pos).float().contiguous()
                if batch_index[0] < n_keep[0]:
                    parts.setdefault(key, []).append(r)
                if key not in grams:
                    grams[key] = GramAccumulator(r.shape[1])
                grams[key].update(r)

        return hook

    handles = [modules[n].register_forward_pre_hook(make_hook(n)) for n in per_module]
    try:
        with torch.no_grad():
            for i, batch in enumerate(progress(batches) if progress is not None else batches):
                batch_index[0] = i
                done.clear()
                call_model(model, batch)
                if i == 0 and parts:
                    need = math.ceil(fraction * int(sizes[-1]))
                    first = max(int(sizes[0]), 1)
                    for p in parts.values():
                        per_example = max(p[0].shape[0] / first, 1e-9)
                        need = max(need, math.ceil(min_rows_per_unit * p[0].shape[1] / per_example))
                    n_keep[0] = min(int(np.searchsorted(sizes, need)) + 1, len(batches))
    finally:
        for h in handles:
            h.remove()
    return parts, grams, n_keep[0]


_F32_RTOL = 1e-6
_EXACT_FITS = True  # float64 products for the fits: exact on rank-deficient data


def _relative_residual(
    z: Sequence[torch.Tensor], g_c: np.ndarray, cross: np.ndarray, b: np.ndarray
) -> float:
    """``‖Z − Z'_S Bᵀ‖ / ‖Z‖`` from float64-product Grams and an exact ``‖Z‖²``.

    (A trace formula on float32-product Grams would cancel at ~sqrt(float32 eps).)
    """
    total = sum(float(torch.linalg.vector_norm(p, dtype=torch.float64) ** 2) for p in z)
    if total <= 0:
        return 0.0
    s = np.arange(g_c.shape[0])
    res = total - 2.0 * float(np.sum(cross[s, :].T * b)) + float(np.sum((b @ g_c) * b))
    return float(np.sqrt(max(res, 0.0) / total))


def _run_lockstep(
    model: nn.Module,
    batches: list[Any],
    names: list[str],
    fold: Callable[[str, nn.Module, list[torch.Tensor]], None],
) -> None:
    """Run every batch's forward pass, pausing all of them at each consumer in ``names``.

    Each batch runs in its own greenlet (one OS thread, normal intra-op parallelism); at a
    consumer's first call every greenlet parks its input, ``fold`` sees all inputs at
    once and updates the module, then all resume.  This is the whole calibration set
    flowing as one batch, but computed in the original mini-batches.
    """
    modules = dict(model.named_modules())
    if len(batches) == 1:
        seen: set[str] = set()

        def hook1(name: str) -> Callable[..., None]:
            def h(module: nn.Module, args: tuple[Any, ...]) -> None:
                if name not in seen:
                    seen.add(name)
                    fold(name, module, [args[0].detach()])

            return h

        handles = [modules[n].register_forward_pre_hook(hook1(n)) for n in names]
        try:
            with torch.no_grad():
                call_model(model, batches[0])
        finally:
            for hd in handles:
                hd.remove()
        return

    parent = getcurrent()
    seen_by: dict[Any, set[str]] = {}

    def hook(name: str) -> Callable[..., None]:
        def h(module: nn.Module, args: tuple[Any, ...]) -> None:
            me = getcurrent()
            seen = seen_by.setdefault(me, set())
            if name not in seen:
                seen.add(name)
                parent.switch(("park", name, module, args[0].detach()))

        return h

    def runner(batch: Any) -> Callable[[], tuple[str]]:
        def run() -> tuple[str]:
            call_model(model, batch)
            return ("done",)

        return run

    handles = [modules[n].register_forward_pre_hook(hook(n)) for n in names]
    grad = torch.is_grad_enabled()
    torch.set_grad_enabled(False)  # greenlet-safe: no nested context managers
    try:
        lets = [greenlet(runner(b)) for b in batches]
        states = [g.switch() for g in lets]
        while True:
            parked = [i for i, st in enumerate(states) if st[0] == "park"]
            if not parked:
                break
            if len(parked) != len(lets) or len({states[i][1] for i in parked}) != 1:
                raise RuntimeError(
                    "sequential calibration: the calibration batches take different paths "
                    "through the model; use sequential=False"
                )
            name, module = states[0][1], states[0][2]
            fold(name, module, [states[i][3] for i in parked])
            states = [lets[i].switch() for i in parked]
    finally:
        torch.set_grad_enabled(grad)
        for hd in handles:
            hd.remove()


def sequential_correct(
    model: nn.Module,
    analysis: Analysis,
    batches: Sequence[Any],
    keep: Mapping[int, np.ndarray],
    rows: Mapping[Key, Sequence[torch.Tensor]],
    original: Mapping[Key, GramAccumulator],
    ridge: float = 0.0,
) -> tuple[dict[int, dict[str, np.ndarray]], dict[Key, float]]:
    """Prune ``model`` in place, fitting every consumer's correction sequentially.

    The producers and passengers of every pruned group are sliced first, so the pass
    runs the *compressed* network (about ``macs_ratio`` of a forward pass).  At each
    consumer, in execution order, the kept inputs ``Z'_S`` of the compressed prefix are
    paired with the original inputs ``Z`` and ``B = argmin ‖Z − Z'_S Bᵀ‖`` is folded
    into the consumer's original weights before it runs.

    Args:
        model: the model to prune (in place).
        analysis: its channel analysis.
        batches: the calibration batches, in the order used for ``rows``.
        keep: group index -> kept channel indices for every pruned group.
        rows: original consumer-input rows from :func:`original_rows`.
        original: their Grams (also from :func:`original_rows`).
        ridge: relative ridge ``τ = ridge·tr(G'_SS)/k``.

    Returns:
        ``folds[group][consumer] = B`` and the relative error of each fit.
    """
    modules = dict(model.named_modules())
    keep = {gi: np.sort(np.asarray(k, dtype=np.int64)) for gi, k in keep.items()}
    dropped: set[int] = set()
    for gi, kept in keep.items():
        g = analysis.groups[gi]
        mask = np.ones(g.width, dtype=bool)
        mask[kept] = False
        dropped.update(int(c) for c in g.classes[mask])
    per_module: dict[str, list[tuple[int, np.ndarray, np.ndarray]]] = {}
    for gi, kept in keep.items():
        for slot in analysis.groups[gi].consumers:
            newpos = _new_positions(analysis.in_labels[slot.module], dropped)
            per_module.setdefault(slot.module, []).append(
                (gi, slot.positions, newpos[slot.positions[kept]])
            )
    orig_w: dict[str, torch.Tensor] = {}
    for name in per_module:
        w = modules[name].weight
        assert isinstance(w, torch.Tensor)
        orig_w[name] = w.data
    apply_plan(model, analysis, {gi: GroupPlan(keep=k) for gi, k in keep.items()})
    modules = dict(model.named_modules())
    folds: dict[int, dict[str, np.ndarray]] = {gi: {} for gi in keep}
    errors: dict[Key, float] = {}
    done: set[str] = set()

    def fold(name: str, module: nn.Module, xs: list[torch.Tensor]) -> None:
        """Fit and fold the corrections of consumer ``name`` from all its inputs ``xs``."""
        done.add(name)
        cd = _channel_dim(module, xs[0])
        applied = []
        for gi, positions, new_positions in per_module[name]:
            parts = rows[(gi, name)]
            pos_t = torch.as_tensor(new_positions, dtype=torch.long)
            m = parts[0].shape[1]
            acc = GramAccumulator(len(new_positions), cross_dim=m, exact=_EXACT_FITS)
            if len(xs) == 1 and len(parts) > 1:  # the caller passed one concatenated batch
                parts = [torch.cat(list(parts))]
            if len(xs) != len(parts):
                raise RuntimeError(
                    f"sequential calibration: consumer '{name}' ran on {len(xs)} batches in "
                    f"the compressed pass but {len(parts)} in the original pass"
                )
            for x, z_o in zip(xs, parts):
                z_c = group_rows(x, cd, pos_t).float()
                if z_c.shape[0] != z_o.shape[0]:
                    raise RuntimeError(
                        f"sequential calibration: consumer '{name}' got {z_c.shape[0]} rows "
                        f"where the original pass had {z_o.shape[0]}"
                    )
                acc.update(z_c, z_o)
            g_c, cross = acc.gram_numpy(), acc.cross_numpy()
            s = np.arange(g_c.shape[0])
            tau = ridge * float(np.trace(g_c)) / max(len(g_c), 1)
            # activations are float32: directions below ~float32 precision are noise
            b = fit_cross_reconstruction(g_c, cross, s, ridge=tau, rtol=_F32_RTOL)
            folds[gi][name] = b
            errors[(gi, name)] = _relative_residual(parts, g_c, cross, b)
            applied.append((positions, keep[gi], b))
        w = orig_w[name]
        if name in analysis.out_labels:  # also a producer: keep its sliced outputs
            idx = _gather_index(analysis.out_labels[name], dropped, {})
            w = w.index_select(0, torch.as_tensor(idx, device=w.device))
        weight = module.weight
        assert isinstance(weight, torch.Tensor)
        module.weight = nn.Parameter(w, requires_grad=weight.requires_grad)
        _fold_consumer(module, analysis.in_labels[name], dropped, {}, applied)

    _run_lockstep(model, list(batches), list(per_module), fold)
    missing = sorted(set(per_module) - done)
    if missing:
        raise RuntimeError(
            f"sequential calibration: consumer(s) {missing} did not run on the calibration batch"
        )
    return folds, errors
