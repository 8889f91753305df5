"""Streamed calibration statistics at every consumer of every unit group.

One forward pass over the calibration batches; forward pre-hooks on the consumer
modules restrict each input to the group's channels (conv: rows are example ×
position; after a flatten, each repetition of a channel is its own row, matching the
``T ⊗ I`` fold) and add its Gram into a float64 accumulator.  Memory is O(m²) per
(group, consumer); activations are only kept when asked (``store_fraction``, for the
sequential corrections of :mod:`spectrim.calibration.sequential`).

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

import math
import weakref
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from spectrim.calibration.batches import drop_padding, token_mask
from spectrim.calibration.checks import CalibrationError, first_bad_example
from spectrim.calibration.gram import GramAccumulator, Products
from spectrim.calibration.sketch import RowSketch, SketchProducts
from spectrim.distributed import SOLO, Team
from spectrim.graph.channels import Analysis, UnitGroup
from spectrim.graph.layout import channels_last_batch
from spectrim.graph.modules import input_channel_axis
from spectrim.graph.trace import batch_len, call_model

__all__ = [
    "Collected",
    "call_keeper",
    "collect",
    "collect_statistics",
    "group_rows",
    "group_view",
    "stored_batches",
]

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


def whole_axis(positions: torch.Tensor) -> bool:
    """Whether ``positions`` (``(m, r)``) is ``0..m-1`` in order, each once."""
    m, r = positions.shape
    flat = positions[:, 0]
    return r == 1 and bool((flat == torch.arange(m, device=flat.device)).all())


def group_view(
    x: torch.Tensor, channel_dim: int, positions: torch.Tensor, whole: bool | None = None
) -> tuple[torch.Tensor, int]:
    """The group's channels of ``x`` and their axis, in a layout that
    :meth:`GramAccumulator.update_activation` takes without flattening: ``x`` itself when
    the group is the whole channel axis in order, the selected channels when each occurs
    once, else (after a flatten) the ``(rows · r, m)`` matrix of :func:`group_rows`.
    ``whole`` is :func:`whole_axis` of ``positions`` when the caller already knows it.
    """
    m, r = positions.shape
    if r != 1:
        return group_rows(x, channel_dim, positions), 1
    if whole is None:
        whole = whole_axis(positions)
    if whole and m == x.shape[channel_dim]:
        return x, channel_dim
    return x.index_select(channel_dim, positions[:, 0].to(x.device)), channel_dim


@dataclass
class Collected:
    """What one calibration pass gathered.

    Attributes:
        stats: ``(group, consumer) -> GramAccumulator`` over every call of every batch.
        calls: per stored batch, the arguments of the ``keep_calls`` modules' first call
            (``{name: (args, kwargs)}``; ``args[0]`` only for the first name).
        sketches: ``(group, consumer) -> RowSketch`` instead, for the groups given
            ``sketch_rows`` (too wide for their Grams; :mod:`spectrim.calibration.sketch`).
        inputs: ``(group, consumer) -> [group view of the consumer's input]`` at the
            consumer's first call in each of the first ``n_stored`` batches (copies).
        n_stored: how many leading batches ``inputs`` covers.
        channel_dims: ``(group, consumer) -> `` the channel axis of its stored inputs.
        first_numel: ``(group, consumer) -> `` the size of the group's view of the
            consumer's input in this process's first batch (what decides the stored share).
    """

    stats: dict[StatKey, GramAccumulator]
    inputs: dict[StatKey, list[torch.Tensor]] = field(default_factory=dict)
    n_stored: int = 0
    channel_dims: dict[StatKey, int] = field(default_factory=dict)
    sketches: dict[StatKey, RowSketch] = field(default_factory=dict)
    calls: list[dict[str, tuple[tuple[Any, ...], dict[str, Any]]]] = field(default_factory=list)
    first_numel: dict[StatKey, int] = field(default_factory=dict)

    def statistic(self, key: StatKey) -> GramAccumulator | RowSketch:
        """The Gram or, for a sketched group, the sketch of ``key``."""
        return self.stats[key] if key in self.stats else self.sketches[key]


def collect(
    model: nn.Module,
    analysis: Analysis,
    batches: Sequence[Any],
    groups: Sequence[UnitGroup],
    progress: Callable[[Iterable[Any]], Iterable[Any]] | None = None,
    *,
    store_fraction: float = 0.0,
    min_rows_per_unit: int = 32,
    channels_last: bool = False,
    team: Team = SOLO,
    sketch_rows: Mapping[int, int] | None = None,
    seed: int = 0,
    keep_inputs: bool = True,
    keep_calls: Sequence[str] = (),
    forward: Callable[[int, Any], Any] | None = None,
) -> Collected:
    """Accumulate ``ZᵀZ`` of each group's channels at each of its consumers' inputs, and
    keep the inputs themselves for a leading share of the batches.

    With ``store_fraction > 0`` the inputs of the first batches covering that fraction of
    the examples are stored; the share is raised (after the first batch) until every
    (group, consumer) has at least ``min_rows_per_unit`` rows per channel, so wide layers
    (transformer FFNs) are never fitted on too few rows.

    Args:
        model: the model whose activations are measured (same module names as the
            analysed one).
        analysis: the channel analysis.
        batches: calibration batches (tensor, tuple or dict each).
        groups: the groups to measure.
        progress: optional wrapper around the batch iterator (e.g. ``tqdm``).
        store_fraction: share of the examples whose consumer inputs are kept (0: none).
        min_rows_per_unit: floor on stored rows per channel when storing.
        channels_last: the model is in ``channels_last`` layout (see
            :mod:`spectrim.graph.layout`); each 4-D tensor batch is converted to it just
            before its forward pass (one batch at a time: no second copy of the data).
        team: the processes sharing the run, each with its shard of the batches
            (:meth:`~spectrim.distributed.Team.shard`): the stored share is decided on
            the whole set by rank 0 and each rank keeps the stored batches it holds (maybe
            none), so the fits see the batches one process would.  The statistics are
            this rank's; the caller reduces them.
        sketch_rows: group index → rows of a randomized sketch kept instead of its Grams
            (:func:`~spectrim.calibration.sketch.plan_sketches`); each batch's ``Ω`` is
            seeded by ``seed`` and the batch's index in the whole calibration set.
        keep_inputs: with ``False`` the stored share is decided as above (``n_stored``)
            but no input is kept past the first batch (the block-by-block pass,
            :mod:`spectrim.calibration.blocks`, measures them itself, a block at a time).
        keep_calls: modules whose call arguments are kept for the stored batches
            (``Collected.calls``): the chain of blocks of that pass, so that it needs no
            forward pass of its own to find them.
        forward: ``forward(i, batch)`` runs batch ``i`` instead of ``model(batch)`` (the
            block-by-block statistics, :func:`~spectrim.calibration.blocks.blockwise_statistics`,
            run one block from its cached input); the hooks are on ``model``'s modules.
    """
    modules = dict(model.named_modules())
    out = Collected(stats={})
    per_module: dict[str, list[tuple[StatKey, torch.Tensor, bool]]] = {}
    for g in groups:
        for slot in g.consumers:
            key = (g.index, slot.module)
            if sketch_rows and g.index in sketch_rows:
                out.sketches[key] = RowSketch(g.width, sketch_rows[g.index], seed=seed)
            else:
                # products only: column sums would be one more pass over every activation
                out.stats[key] = GramAccumulator(g.width, sums=False)
            pos = torch.as_tensor(slot.positions, dtype=torch.long)
            per_module.setdefault(slot.module, []).append((key, pos, whole_axis(pos)))
    missing = sorted(set(per_module) - set(modules))
    if missing:
        raise KeyError(f"consumer module '{missing[0]}' not found in the model")
    lengths, mine = (
        team.positions([batch_len(b) for b in batches])
        if store_fraction > 0
        else ([batch_len(b) for b in batches], list(range(len(batches))))
    )
    sizes = np.cumsum(lengths)
    # stored: the batches whose index in the whole calibration set is below n_store
    n_store = [len(lengths) if store_fraction > 0 else 0]
    batch_index = [0]
    stop_storing = [False]
    stored_now: set[str] = set()
    # identical inputs read by several consumers (inception branches) share the products;
    # a weak reference, so that each activation is freed as early as in a plain forward
    # pass (holding them to the end of the batch costs fresh pages, i.e. time)
    cache: dict[tuple[int, int], tuple[weakref.ref[torch.Tensor], Products | SketchProducts]] = {}
    layout: dict[StatKey, int] = {}
    # the first batch's group view sizes, per (group, consumer): they decide the stored
    # share, so without keep_inputs nothing is copied (a whole batch's consumer inputs)
    first_numel: dict[StatKey, int] = {}
    masks = [token_mask(b) for b in batches]

    def make_hook(name: str) -> Callable[..., None]:
        entries = per_module[name]

        def hook(module: nn.Module, args: tuple[Any, ...]) -> None:
            src = args[0]  # the shared object (a detached alias would be new per call)
            x = src.detach()
            store = (
                not stop_storing[0] and mine[batch_index[0]] < n_store[0] and name not in stored_now
            )
            stored_now.add(name)
            xcd = input_channel_axis(module, x)
            # padded token positions never reach the statistics (nor the stored inputs)
            x, xcd = drop_padding(x, masks[batch_index[0]], xcd)
            for key, pos, whole in entries:
                acc = out.statistic(key)
                hit = cache.get((id(src), key[0]))
                view: torch.Tensor | None = None
                if hit is not None and hit[0]() is src:
                    acc.add(hit[1])  # type: ignore[arg-type]
                else:
                    view, cd = group_view(x, xcd, pos, whole)
                    try:
                        products = acc.update_activation(view, cd)
                    except ValueError as exc:
                        if "non-finite" not in str(exc):
                            raise
                        raise _non_finite(name, x, batch_index[0], sizes) from None
                    cache[(id(src), key[0])] = (weakref.ref(src), products)
                if batch_index[0] == 0 and key not in first_numel:  # sizes the stored share
                    first_numel[key] = x.numel() // max(int(x.shape[xcd]), 1) * pos.numel()
                if store and keep_inputs:
                    if view is None:
                        view, cd = group_view(x, xcd, pos, whole)
                    # a copy: later in-place ops must not change what was measured
                    out.inputs.setdefault(key, []).append(view.clone() if view is x else view)
                    layout[key] = cd

        return hook

    handles = [modules[n].register_forward_pre_hook(make_hook(n)) for n in per_module]
    for mod_name in keep_calls:
        keeper = call_keeper(mod_name, keep_calls[0], out)
        handles.append(modules[mod_name].register_forward_pre_hook(keeper, with_kwargs=True))
    was_training = model.training
    model.eval()
    it = progress(batches) if progress is not None else batches
    try:
        with torch.no_grad():
            for i, batch in enumerate(it):
                batch_index[0] = i
                if keep_calls and (i == 0 or mine[i] < n_store[0]):
                    out.calls.append({})
                for sk in out.sketches.values():
                    sk.begin(team.rank + i * team.size)  # the batch's index in the whole set
                stored_now.clear()
                cache.clear()
                if forward is not None:
                    forward(i, batch)
                else:
                    call_model(model, channels_last_batch(batch) if channels_last else batch)
                if i == 0 and store_fraction > 0:
                    widths = {key: out.statistic(key).dim for key in first_numel}
                    n = stored_batches(
                        widths, first_numel, sizes, store_fraction, min_rows_per_unit
                    )
                    n_store[0] = team.broadcast(n)  # rank 0 holds the first batch: its call
                    if mine[0] >= n_store[0] or not keep_inputs:  # nothing more to keep
                        out.inputs.clear()
                    if not keep_inputs:
                        stop_storing[0] = True
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
        cache.clear()
    out.n_stored = sum(1 for g in mine if g < n_store[0])
    out.channel_dims = layout
    out.first_numel = first_numel
    del out.calls[out.n_stored :]
    return out


def call_keeper(name: str, first: str, out: Collected) -> Callable[..., None]:
    """A forward pre-hook (``with_kwargs=True``) keeping module ``name``'s arguments at its
    first call in each stored batch of ``out.calls``; the first positional argument is kept
    only for ``first`` and left out (``None``) for the others.  Shared by the whole-model
    and the block-by-block sequential passes."""

    def hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        if out.calls and name not in out.calls[-1]:
            head = args[0] if name == first and args else None
            out.calls[-1][name] = ((head, *args[1:]), dict(kwargs))

    return hook


def _non_finite(name: str, x: torch.Tensor, batch: int, sizes: np.ndarray) -> CalibrationError:
    """The error for a consumer input holding NaN/inf, naming the batch and example."""
    start = int(sizes[batch - 1]) if batch > 0 else 0
    size = int(sizes[batch]) - start
    j = first_bad_example(x, size)
    where = f"example {start + j} (index {j} in the batch)" if j is not None and j >= 0 else ""
    return CalibrationError(
        f"the input of '{name}' holds NaN or inf on calibration batch {batch}"
        + (f", {where}" if where else "")
        + ", although the calibration inputs are finite: the model overflows or divides by "
        "zero there, so its statistics cannot be measured"
    )


def stored_batches(
    widths: Mapping[StatKey, int],
    first_numel: Mapping[StatKey, int],
    sizes: np.ndarray,
    fraction: float,
    min_rows_per_unit: int,
) -> int:
    """How many leading batches to store, decided from the sizes of the first batch's
    group views (``first_numel``, of groups ``widths`` wide): the whole number of
    batches nearest to ``fraction`` of the examples, raised until every (group,
    consumer) has ``min_rows_per_unit`` rows per channel."""
    share = fraction * float(sizes[-1])
    after = int(np.searchsorted(sizes, share)) + 1  # fewest batches covering the share
    before = after - 1
    count = after
    if before >= 1 and share - float(sizes[before - 1]) <= float(sizes[after - 1]) - share:
        count = before
    need = 0
    first = max(int(sizes[0]), 1)
    for key, numel in first_numel.items():
        width = widths[key]
        per_example = max(numel / width / first, 1e-9)
        need = max(need, math.ceil(min_rows_per_unit * width / per_example))
    floor = int(np.searchsorted(sizes, need)) + 1
    return min(max(count, floor), len(sizes))


def collect_statistics(
    model: nn.Module,
    analysis: Analysis,
    batches: Iterable[Any],
    groups: Sequence[UnitGroup],
    progress: Callable[[Iterable[Any]], Iterable[Any]] | None = None,
) -> dict[StatKey, GramAccumulator]:
    """Accumulate ``ZᵀZ`` of each group's channels at each of its consumers' inputs.

    The statistics-only form of :func:`collect` (nothing is stored).
    """
    return collect(model, analysis, list(batches), groups, progress).stats
