"""Sequential calibration: corrections that undo the error of the compressed prefix.

In one-shot mode every consumer's correction ``B`` is fitted on the original model's
activations, so errors of earlier layers accumulate.  Here the calibration set runs as
one batch through the model *while it is being compressed*: at each consumer (in
execution order) the inputs ``Z'`` produced by the already-compressed prefix are paired
with the original model's inputs ``Z`` at the same point, and the correction solves

    min_B ‖Z − Z'[:, S] Bᵀ‖²  (cross-covariance least squares),

so the consumer reconstructs the *original* activations from the compressed ones.  (The
naive variant, fitting ``Z'`` from ``Z'[:, S]``, reproduces the compressed model's own
drift and was measured to lose about nine points of accuracy on ResNet-56.)

Cost: two forward passes over the calibration set (original, then compressed) plus the
Gram products; memory holds the original consumer inputs of the pruned groups.

The temporary corrections are applied by swapping each consumer's weight for an
equivalent full-width weight (zero columns for dropped channels), so no shapes change
during the pass; the final surgery is done by :func:`spectrim.graph.apply_plan`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from spectrim.calibration.collect import _channel_dim, group_rows
from spectrim.calibration.gram import GramAccumulator
from spectrim.graph.channels import Analysis, UnitGroup
from spectrim.graph.trace import call_model
from spectrim.linalg import cross_residual_of, fit_cross_reconstruction

__all__ = ["concat_batches", "original_rows", "sequential_folds"]

Key = tuple[int, str]


def concat_batches(batches: Sequence[Any]) -> Any:
    """All calibration batches as one batch (tensors, tuples or dicts of tensors)."""
    first = batches[0]
    try:
        if isinstance(first, torch.Tensor):
            return torch.cat(list(batches))
        if isinstance(first, dict):
            return {k: torch.cat([b[k] for b in batches]) for k in first}
        if isinstance(first, (tuple, list)):
            return type(first)(torch.cat([b[i] for b in batches]) for i in range(len(first)))
    except RuntimeError as exc:
        raise ValueError(
            f"sequential calibration needs batches that concatenate into one ({exc}); "
            "pad inputs to one shape or use sequential=False"
        ) from exc
    raise TypeError(f"cannot concatenate calibration batches of type {type(first).__name__}")


def original_rows(
    model: nn.Module, analysis: Analysis, batches: Sequence[Any], groups: Sequence[UnitGroup]
) -> tuple[dict[Key, torch.Tensor], dict[Key, GramAccumulator]]:
    """Run the original model once over ``batches``; keep each (group, consumer) input
    rows (in batch order) and their Gram."""
    modules = dict(model.named_modules())
    parts: dict[Key, list[torch.Tensor]] = {}
    done: set[Key] = set()
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
                parts.setdefault(key, []).append(r)
                if key not in grams:
                    grams[key] = GramAccumulator(r.shape[1])
                grams[key].update(r)

        return hook

    handles = [modules[n].register_forward_pre_hook(make_hook(n)) for n in per_module]
    try:
        with torch.no_grad():
            for batch in batches:
                done.clear()
                call_model(model, batch)
    finally:
        for h in handles:
            h.remove()
    rows = {k: torch.cat(v) if len(v) > 1 else v[0] for k, v in parts.items()}
    parts.clear()
    return rows, grams


def _effective_weight(
    w: torch.Tensor, folds: list[tuple[np.ndarray, np.ndarray, np.ndarray]]
) -> torch.Tensor:
    """Full-width weight equal to the folded consumer on the kept channels."""
    w64 = w.double()
    out = w64.clone()
    for pos, keep, b in folds:
        m, r = pos.shape
        cols = w64[:, torch.as_tensor(pos.reshape(-1))].reshape(w.shape[0], m, r, *w.shape[2:])
        bt = torch.as_tensor(b, dtype=torch.float64, device=w.device)
        folded = torch.einsum("omr...,mk->okr...", cols, bt)
        out[:, torch.as_tensor(pos.reshape(-1))] = 0.0
        out[:, torch.as_tensor(pos[keep].reshape(-1))] = folded.reshape(
            w.shape[0], -1, *w.shape[2:]
        )
    return out.to(w.dtype)


def sequential_folds(
    model: nn.Module,
    analysis: Analysis,
    batch: Any,
    keep: Mapping[int, np.ndarray],
    rows: Mapping[Key, torch.Tensor],
    original: Mapping[Key, GramAccumulator],
    ridge: float = 0.0,
) -> tuple[dict[int, dict[str, np.ndarray]], dict[Key, float]]:
    """Cross-covariance corrections for every pruned group, fitted in execution order.

    Args:
        model: the model (unchanged on return).
        analysis: its channel analysis.
        batch: the whole calibration set as one batch.
        keep: group index -> kept channel indices (sorted) for every pruned group.
        rows: original consumer-input rows from :func:`original_rows`.
        original: their Grams (also from :func:`original_rows`).
        ridge: relative ridge ``τ = ridge·tr(G')/m``.

    Returns:
        ``folds[group][consumer] = B`` and the relative error of each fit.
    """
    modules = dict(model.named_modules())
    per_module: dict[str, list[tuple[int, np.ndarray]]] = {}
    for gi in keep:
        g = analysis.groups[gi]
        for slot in g.consumers:
            per_module.setdefault(slot.module, []).append((gi, slot.positions))
    folds: dict[int, dict[str, np.ndarray]] = {gi: {} for gi in keep}
    errors: dict[Key, float] = {}
    saved: dict[str, torch.Tensor] = {}

    def make_hook(name: str) -> Callable[..., None]:
        def hook(module: nn.Module, args: tuple[Any, ...]) -> None:
            if name in saved:
                return
            x = args[0].detach()
            cd = _channel_dim(module, x)
            applied = []
            for gi, positions in per_module[name]:
                pos_t = torch.as_tensor(positions, dtype=torch.long)
                z_c = group_rows(x, cd, pos_t).float()
                z_o = rows[(gi, name)]
                acc = GramAccumulator(z_c.shape[1], cross_dim=z_o.shape[1])
                acc.update(z_c, z_o)
                g_c, cross = acc.gram_numpy(), acc.cross_numpy()
                s = keep[gi]
                tau = ridge * float(np.trace(g_c)) / max(len(g_c), 1)
                b = fit_cross_reconstruction(g_c, cross, s, ridge=tau)
                folds[gi][name] = b
                # relative error of reconstructing the original inputs, from Grams
                g_o = original[(gi, name)].gram_numpy()
                denom = float(np.trace(g_o))
                res = cross_residual_of(g_o, g_c, cross, s, b)
                errors[(gi, name)] = float(np.sqrt(res / denom)) if denom > 0 else 0.0
                applied.append((positions, s, b))
            saved[name] = module.weight.data
            module.weight.data = _effective_weight(module.weight.data, applied)

        return hook

    handles = [modules[n].register_forward_pre_hook(make_hook(n)) for n in per_module]
    try:
        with torch.no_grad():
            call_model(model, batch)
    finally:
        for h in handles:
            h.remove()
        for name, w in saved.items():
            modules[name].weight.data = w
    return folds, errors
