"""Streamed calibration statistics at every consumer of every unit group.

One forward pass over the calibration batches; forward pre-hooks on the consumer
modules turn each input into a (rows × channels) matrix restricted to the group's
channels (conv: rows are example × position; after a flatten, each repetition of a
channel is its own row, matching the ``T ⊗ I`` fold) and add its Gram into a float64
accumulator.  Memory is O(m²) per (group, consumer); activations are never stored.

Example::

    >>> import torch, torch.nn as nn
    >>> from spectrim.graph import analyze_channels
    >>> net = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 2))
    >>> a = analyze_channels(net, torch.randn(3, 4))
    >>> stats = collect_statistics(net, a, [torch.randn(16, 4)], a.prunable)
    >>> stats[(a.prunable[0].index, "2")].count
    16
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from torch import nn

from spectrim.calibration.gram import GramAccumulator
from spectrim.graph.channels import Analysis, UnitGroup
from spectrim.graph.trace import call_model

__all__ = ["collect_statistics", "group_rows"]

StatKey = tuple[int, str]  # (group index, consumer module name)


def group_rows(x: torch.Tensor, channel_dim: int, positions: torch.Tensor) -> torch.Tensor:
    """Rows of the group's channels: ``(rows · r, m)`` for ``positions`` of shape ``(m, r)``."""
    moved = x.movedim(channel_dim, -1)
    m, r = positions.shape
    length = moved.shape[-1]
    flat = positions.reshape(-1)
    if r == 1 and m == length and bool((flat == torch.arange(m, device=flat.device)).all()):
        return moved.reshape(-1, m)  # the group is the whole channel axis, in order
    sel = moved.reshape(-1, length).index_select(-1, flat)  # (rows, m*r)
    sel = sel.reshape(-1, m, r).transpose(1, 2)  # (rows, r, m)
    return sel.reshape(-1, m)


def _channel_dim(module: nn.Module, x: torch.Tensor) -> int:
    if isinstance(module, nn.Linear):
        return x.dim() - 1
    return 1


def collect_statistics(
    model: nn.Module,
    analysis: Analysis,
    batches: Iterable[Any],
    groups: Sequence[UnitGroup],
    progress: Callable[[Iterable[Any]], Iterable[Any]] | None = None,
) -> dict[StatKey, GramAccumulator]:
    """Accumulate ``ZᵀZ`` of each group's channels at each of its consumers' inputs.

    Args:
        model: the model whose activations are measured (same module names as the
            analysed one).
        analysis: the channel analysis.
        batches: calibration batches (tensor, tuple or dict each).
        groups: the groups to measure.
        progress: optional wrapper around the batch iterator (e.g. ``tqdm``).
    """
    modules = dict(model.named_modules())
    stats: dict[StatKey, GramAccumulator] = {}
    per_module: dict[str, list[tuple[StatKey, torch.Tensor]]] = {}
    for g in groups:
        for slot in g.consumers:
            key = (g.index, slot.module)
            stats[key] = GramAccumulator(g.width)
            pos = torch.as_tensor(slot.positions, dtype=torch.long)
            per_module.setdefault(slot.module, []).append((key, pos))
    handles = []
    cache: dict[tuple[int, int], torch.Tensor] = {}

    def make_hook(name: str) -> Callable[..., None]:
        entries = per_module[name]

        def hook(module: nn.Module, args: tuple[Any, ...]) -> None:
            x = args[0]
            cd = _channel_dim(module, x)
            for key, pos in entries:
                # identical inputs read by several consumers (inception branches) share work
                ck = (id(x), key[0])
                rows = cache.get(ck)
                if rows is None:
                    rows = group_rows(x.detach(), cd, pos.to(x.device)).float()
                    cache[ck] = rows
                stats[key].update(rows)

        return hook

    for name in per_module:
        if name not in modules:
            raise KeyError(f"consumer module '{name}' not found in the model")
        handles.append(modules[name].register_forward_pre_hook(make_hook(name)))
    was_training = model.training
    model.eval()
    it = progress(batches) if progress is not None else batches
    try:
        with torch.no_grad():
            for batch in it:
                cache.clear()
                call_model(model, batch)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
        cache.clear()
    return stats
