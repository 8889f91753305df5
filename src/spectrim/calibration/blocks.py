"""Sequential correction block by block, with memory for one block at a time.

The whole-model sequential pass (:func:`~spectrim.calibration.sequential.sequential_correct`)
keeps the original model's input at every corrected consumer for the fitted share of the
calibration set, and runs all the fitted batches in lock-step through the whole model:
its memory grows with the number of corrected layers.  Most models are a chain of blocks
(transformer layers, residual blocks) each fed the previous one's output.  Here the
fitted batches enter the first block from a cache, and each block in turn is

1. run in its original form (a copy of the block's weights) on the original model's
   inputs, keeping its consumers' inputs (the fit targets) and its outputs;
2. compressed and corrected by the same sequential fits, on the compressed prefix's
   inputs, keeping its outputs;

so memory holds two block-boundary activations per fitted batch, one block's copy and
one block's consumer inputs.  The fits are the same as the whole-model pass's (same rows,
same targets), so the result is the same to float32 rounding (``tests/calibration/
test_blocks.py``).  The statistics pass and the allocation are unchanged.

:func:`find_chain` finds the chain by running the model once: the longest run of calls of
the children of ``nn.ModuleList`` / ``nn.Sequential`` containers where each call's first
argument is the previous call's output.  :func:`plan_blocks` makes each chain module a
block.  A pruned group may span blocks (a residual stream read by every block of a
stage): each block slices its own share of the group's producers, passengers and
consumers and fits its consumers, and hands the next block an output already narrowed.
Only a group whose channels are chosen in the pass (``sequential_select``) merges the
blocks it spans, as its channels are known only at its first consumer.  A group that
reaches the modules run before or after the chain (:func:`find_ends`: a stem convolution
and its BatchNorm, a classifier) adds them as a block before the chain (:data:`PREFIX`)
or after it (:data:`SUFFIX`): those blocks run the model itself from the
calibration batch up to the chain, or from the chain's output on, and nothing in them is
pruned before their original outputs are kept.  A group that reaches elsewhere outside
the chain leaves the whole-model pass in charge.
"""

from __future__ import annotations

import copy
import dataclasses
import os
import sys
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from greenlet import getcurrent
from torch import nn

from spectrim.calibration.batches import drop_padding, token_mask
from spectrim.calibration.collect import (
    Collected,
    StatKey,
    call_keeper,
    collect,
    group_view,
    stored_batches,
)
from spectrim.calibration.outputs import residual_partners
from spectrim.calibration.sequential import (
    ReaderFits,
    Refit,
    Select,
    find_readers,
    reader_candidates,
    sequential_correct,
)
from spectrim.calibration.spill import Spill
from spectrim.distributed import SOLO, Team
from spectrim.graph.channels import Analysis, UnitGroup
from spectrim.graph.layout import channels_last_batch
from spectrim.graph.modules import input_channel_axis
from spectrim.graph.trace import batch_len, call_model, tensors_in

__all__ = [
    "PREFIX",
    "SUFFIX",
    "BlockPlan",
    "blockwise_correct",
    "blockwise_statistics",
    "find_chain",
    "find_ends",
    "plan_blocks",
    "suffix_reads_chain_only",
]

#: the names a block plan gives the modules run before the chain (the model's prefix, e.g.
#: a stem) and after it (its suffix, e.g. the classifier); no module can be called these
PREFIX, SUFFIX = "<prefix>", "<suffix>"


def _hidden(out: Any) -> Any:
    """The tensor a block hands on: its output, or the first item of a tuple output."""
    return out[0] if isinstance(out, (tuple, list)) and out else out


def _containers(model: nn.Module) -> dict[str, nn.Module]:
    """Children of every ``ModuleList`` / ``Sequential`` that are not containers
    themselves (a nested ``Sequential`` passes its children on), by qualified name."""
    out: dict[str, nn.Module] = {}
    for name, mod in model.named_modules():
        if isinstance(mod, (nn.ModuleList, nn.Sequential)):
            for child, sub in mod.named_children():
                if not isinstance(sub, (nn.ModuleList, nn.Sequential)):
                    out[f"{name}.{child}" if name else child] = sub
    return out


def _run_hooked(model: nn.Module, batch: Any, handles: Sequence[Any]) -> Any:
    """``model``'s output on ``batch`` without gradients; the hooks ``handles`` removed
    after."""
    try:
        with torch.no_grad():
            return call_model(model, batch)
    finally:
        for hd in handles:
            hd.remove()


def find_chain(model: nn.Module, batch: Any) -> list[str]:
    """Names of the longest chain of blocks the model runs on ``batch``, in call order
    (fewer than two: no chain).

    Example::

        >>> import torch, torch.nn as nn
        >>> layers = nn.ModuleList(nn.TransformerEncoderLayer(8, 2, 16) for _ in range(3))
        >>> class Net(nn.Module):
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.stem, self.layers = nn.Linear(2, 8), layers
        ...     def forward(self, x):
        ...         x = self.stem(x)
        ...         for layer in self.layers:
        ...             x = layer(x)
        ...         return x
        >>> find_chain(Net().eval(), torch.randn(4, 5, 2))
        ['layers.0', 'layers.1', 'layers.2']
    """
    cands = _containers(model)
    calls: list[tuple[str, Any, Any]] = []
    depth = [0]
    handles = []

    def pre(name: str) -> Any:
        def h(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            if depth[0] == 0:
                calls.append((name, args[0] if args else None, None))
            depth[0] += 1

        return h

    def post(name: str) -> Any:
        def h(module: nn.Module, args: tuple[Any, ...], out: Any) -> None:
            depth[0] -= 1
            if depth[0] == 0 and calls and calls[-1][0] == name:
                calls[-1] = (name, calls[-1][1], _hidden(out))

        return h

    for name, mod in cands.items():
        handles.append(mod.register_forward_pre_hook(pre(name), with_kwargs=True))
        handles.append(mod.register_forward_hook(post(name)))
    _run_hooked(model, batch, handles)
    best: list[str] = []
    run: list[str] = []
    for i, (name, x, _) in enumerate(calls):
        linked = (
            bool(run) and isinstance(x, torch.Tensor) and x is calls[i - 1][2] and name not in run
        )
        run = [*run, name] if linked else ([name] if isinstance(x, torch.Tensor) else [])
        if len(run) > len(best):
            best = list(run)
    return best if len(best) >= 2 else []


class _Reached(BaseException):
    """Raised by the pre-hook of the chain's first module to stop the model there (a
    ``BaseException``, so that a model's own ``except Exception`` cannot swallow it)."""

    def __init__(self, args: tuple[Any, ...]) -> None:
        super().__init__()
        self.args_seen = args


def _run_prefix(model: nn.Module, batch: Any, first: str) -> Any:
    """The first positional argument the chain's ``first`` module receives when ``model``
    runs on ``batch``, computed by the modules before it only."""
    module = model.get_submodule(first)
    owner = getcurrent()  # the lock-step runs batches in greenlets: only this one stops

    def stop(mod: nn.Module, args: tuple[Any, ...]) -> None:
        if getcurrent() is owner:
            raise _Reached(args)

    handle = module.register_forward_pre_hook(stop)
    try:
        call_model(model, batch)
    except _Reached as reached:
        return reached.args_seen[0]
    finally:
        handle.remove()
    raise RuntimeError(f"block-by-block pass: '{first}' did not run on the calibration batch")


def _run_suffix(model: nn.Module, batch: Any, last: str, x: Any) -> Any:
    """``model``'s output on ``batch`` when the chain's ``last`` module hands on ``x``
    instead of its own output: the modules after the chain run on ``x``.  The whole model
    runs (the chain's own work is discarded), so the suffix sees every argument the
    model's code gives it."""

    owner = getcurrent()  # the lock-step runs batches in greenlets: only this one swaps

    def swap(mod: nn.Module, args: tuple[Any, ...], out: Any) -> Any:
        if getcurrent() is not owner:
            return None
        if isinstance(out, tuple) and out:
            return (x, *out[1:])
        if isinstance(out, list) and out:
            return [x, *out[1:]]
        return x

    handle = model.get_submodule(last).register_forward_hook(swap)
    try:
        return call_model(model, batch)
    finally:
        handle.remove()


def find_ends(model: nn.Module, batch: Any, chain: Sequence[str]) -> tuple[list[str], list[str]]:
    """Names of the modules that run before the ``chain`` (the model's prefix, e.g. its
    stem) and after it (its suffix, e.g. the classifier) on ``batch``, each in call
    order; the chain modules' ancestors and descendants excluded.

    Example::

        >>> import torch, torch.nn as nn
        >>> net = nn.Sequential(
        ...     nn.Conv2d(3, 8, 3), nn.ReLU(),
        ...     nn.Sequential(nn.Conv2d(8, 8, 1), nn.Conv2d(8, 8, 1)),
        ...     nn.Flatten(), nn.LazyLinear(2),
        ... )
        >>> find_ends(net, torch.randn(1, 3, 8, 8), ["2.0", "2.1"])
        (['0', '1'], ['3', '4'])
    """
    order: list[str] = []
    ends = [-1, -1]  # where in ``order`` the chain began and ended
    ancestors = {n.rsplit(".", i)[0] for n in chain for i in range(1, n.count(".") + 1)} | {""}

    def note(name: str) -> Any:
        def h(module: nn.Module, args: tuple[Any, ...]) -> None:
            if name == chain[0] and ends[0] < 0:
                ends[0] = len(order)
            if name not in order:
                order.append(name)

        return h

    def last(module: nn.Module, args: tuple[Any, ...], out: Any) -> None:
        if ends[1] < 0:
            ends[1] = len(order)

    skip = {n for n, _ in model.named_modules() if any(_inside(n, c) for c in chain)}
    handles = [
        mod.register_forward_pre_hook(note(name))
        for name, mod in model.named_modules()
        if name == chain[0] or (name not in ancestors and name not in skip)
    ]
    handles.append(model.get_submodule(chain[-1]).register_forward_hook(last))
    _run_hooked(model, batch, handles)
    if min(ends) < 0:
        return [], []
    return order[: ends[0]], order[ends[1] :]


def _flipped(batch: Any, gen: torch.Generator) -> Any:
    """``batch`` with its examples in reverse order (every tensor alike), or, where that
    changes nothing (a batch of one, identical examples), its floating tensors replaced
    by noise of their scale."""
    if isinstance(batch, torch.Tensor):
        if batch.dim() and batch.shape[0] > 1:
            flipped = batch.flip(0)
            if not batch.is_floating_point() or not torch.equal(flipped, batch):
                return flipped
        if batch.is_floating_point():
            noise = torch.randn(batch.shape, generator=gen, dtype=batch.dtype)
            return noise * batch.std().clamp_min(1.0) + batch.mean()
        return batch
    if isinstance(batch, Mapping):
        return {k: _flipped(v, gen) for k, v in batch.items()}
    if isinstance(batch, (tuple, list)):
        return type(batch)(_flipped(v, gen) for v in batch)
    return batch


def suffix_reads_chain_only(model: nn.Module, batch: Any, chain: Sequence[str]) -> bool:
    """Whether the modules after the ``chain`` compute the model's output from the
    chain's last output alone: the suffix's output with the chain's output held fixed
    does not move, bit for bit, when the model's input does.  A model whose later modules
    also read what the modules before the chain computed (an Inception module whose
    other branches read the input of the chain's branch) fails this: the original side
    of its suffix cannot run on a prefix already pruned, so a plan that prunes both the
    prefix and the suffix leaves the whole-model pass in charge.

    Example::

        >>> import torch, torch.nn as nn
        >>> net = nn.Sequential(nn.Linear(4, 8), nn.Sequential(nn.ReLU(), nn.Linear(8, 8)),
        ...                     nn.Linear(8, 2))
        >>> suffix_reads_chain_only(net, torch.randn(3, 4), ["1.0", "1.1"])
        True
    """
    seen: list[Any] = []

    def keep(mod: nn.Module, args: tuple[Any, ...], out: Any) -> None:
        seen.append(_hidden(out))

    handle = model.get_submodule(chain[-1]).register_forward_hook(keep)
    # the plain run is the suffix's output on the chain's own output x
    a = tensors_in(_run_hooked(model, batch, [handle]))
    if not seen or not isinstance(seen[-1], torch.Tensor):
        return False
    x = seen[-1]
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        b = tensors_in(_run_suffix(model, _flipped(batch, gen), chain[-1], x))
    # bit for bit: the suffix ran on the same tensor, so only a read of something else
    # can move it (a tolerance would miss a model whose outputs hardly vary)
    return len(a) == len(b) and all(u.shape == v.shape and torch.equal(u, v) for u, v in zip(a, b))


@dataclass(frozen=True)
class BlockPlan:
    """Blocks of consecutive chain modules, the pruned groups each touches (a group that
    spans blocks is listed in each), and the modules :data:`PREFIX` and :data:`SUFFIX`
    stand for."""

    blocks: list[list[str]]
    groups: list[list[int]]
    prefix: tuple[str, ...] = ()
    suffix: tuple[str, ...] = ()

    def member(self, b: int) -> Callable[[str], bool]:
        """Whether a module (or parameter), by qualified name, belongs to block ``b``."""
        roots = [n for n in self.blocks[b] if n not in (PREFIX, SUFFIX)]
        roots += list(self.prefix) if PREFIX in self.blocks[b] else []
        roots += list(self.suffix) if SUFFIX in self.blocks[b] else []
        return lambda name: any(_inside(name, r) for r in roots)


def _inside(name: str, block: str) -> bool:
    return name == block or name.startswith(block + ".")


def plan_blocks(
    chain: Sequence[str],
    analysis: Analysis,
    keep: Mapping[int, Any],
    prefix: Collection[str] = (),
    suffix: Collection[str] = (),
    whole: Collection[int] = (),
) -> BlockPlan | str:
    """One block per chain module, or a reason (text) when a pruned group reaches
    outside the chain, its ``prefix`` and its ``suffix`` (:func:`find_ends`).  A group
    that reaches the prefix adds a block :data:`PREFIX` before the chain, one that
    reaches the suffix a block :data:`SUFFIX` after it.

    A group may span blocks: each block slices and fits its own share of the group's
    producers, passengers and consumers, and hands the next block an output already
    narrowed.  The groups in ``whole`` (those whose channels are chosen in the pass,
    ``sequential_select``) merge the blocks they span into one.

    Example::

        >>> import torch, torch.nn as nn
        >>> from spectrim.graph import analyze_channels
        >>> mlp = lambda: nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 4))
        >>> net = nn.Sequential(mlp(), mlp(), mlp())
        >>> a = analyze_channels(net, torch.randn(2, 4))
        >>> everything = {g.index: None for g in a.prunable}
        >>> plan = plan_blocks(["0", "1", "2"], a, everything)
        >>> plan.blocks, [len(g) for g in plan.groups]  # the 4-wide groups span two blocks
        ([['0'], ['1'], ['2']], [2, 3, 2])
        >>> plan_blocks(["0", "1", "2"], a, everything, whole=everything).blocks
        [['0', '1', '2']]
        >>> inner = {g.index: None for g in a.prunable if g.width == 8}  # inside each block
        >>> plan_blocks(["1"], a, inner, prefix=["0"], suffix=["2"]).blocks  # around '1'
        [['<prefix>'], ['1'], ['<suffix>']]
    """
    ends = {0: set(prefix), len(chain) + 1: set(suffix)}  # their positions in the chain
    chain = [PREFIX, *chain, SUFFIX]
    touched: dict[int, set[int]] = {}
    for gi in keep:
        g = analysis.groups[gi]
        names = [*g.producers, *(s.module for s in g.consumers), *g.passengers]
        idx = set()
        for n in names:
            hit = [i for i, b in enumerate(chain[1:-1], 1) if _inside(n, b)]
            hit += [i for i, end in ends.items() if any(_inside(n, e) for e in end)]
            if not hit:
                return (
                    f"unit group '{g.name}' reaches '{n}', outside the chain of blocks "
                    "and the modules run before and after it"
                )
            idx.add(hit[0])
        touched[gi] = idx
    if all(max(ix) < len(chain) - 1 for ix in touched.values()):  # no group needs the suffix
        chain = chain[:-1]
    if all(min(ix) > 0 for ix in touched.values()):  # nor the prefix
        chain = chain[1:]
        touched = {gi: {i - 1 for i in ix} for gi, ix in touched.items()}
    # merge the span of every group that must lie in one block
    owner = list(range(len(chain)))
    spans = [(min(touched[gi]), max(touched[gi])) for gi in whole if gi in touched]
    for lo, hi in spans:
        for i in range(lo + 1, hi + 1):
            owner[i] = owner[lo]
    blocks: list[list[str]] = []
    block_of: list[int] = []  # chain position -> block
    for i, name in enumerate(chain):
        if owner[i] == i:  # not merged into the block before
            blocks.append([name])
        else:
            blocks[-1].append(name)
        block_of.append(len(blocks) - 1)
    groups: list[list[int]] = [[] for _ in blocks]
    for gi, ix in touched.items():
        for b in sorted({block_of[i] for i in ix}):
            groups[b].append(gi)
    return BlockPlan(blocks, groups, tuple(prefix), tuple(suffix))


def _scrub(value: Any) -> Any:
    """Arguments safe to run a block with again: Hugging Face key/value caches dropped
    (a block run twice would append to them).  A cache exists only where transformers
    was imported, so its module is looked up, not imported."""
    cache_utils = sys.modules.get("transformers.cache_utils")
    if cache_utils is not None and isinstance(value, getattr(cache_utils, "Cache", ())):
        return None
    if isinstance(value, dict):
        return {k: (False if k == "use_cache" else _scrub(v)) for k, v in value.items()}
    return value


def blockwise_correct(
    model: nn.Module,
    analysis: Analysis,
    batches: Sequence[Any],
    keep: Mapping[int, np.ndarray],
    plan: BlockPlan,
    *,
    contributes: bool = True,
    exact: Mapping[int, bool] | None = None,
    refit: Mapping[int, Refit] | None = None,
    team: Team = SOLO,
    calls: Sequence[Mapping[str, tuple[tuple[Any, ...], dict[str, Any]]]] | None = None,
    channels_last: bool = False,
    reselect: Collection[int] | Mapping[int, Select] = (),
    fit: str = "inputs",
    warn: Callable[[str], None] | None = None,
    block_cache: str | os.PathLike[str] | None = None,
    readers: ReaderFits | None = None,
    routed: Collection[str] = (),
    fixed: Mapping[int, Mapping[str, np.ndarray | None]] | None = None,
) -> tuple[dict[int, dict[str, np.ndarray]], dict[tuple[int, str], float], dict[int, np.ndarray]]:
    """Prune ``model`` in place, fitting every consumer's correction block by block.

    Args:
        model: the model (original weights; pruned in place).
        analysis: its channel analysis.
        batches: the fitted calibration batches.
        keep: group index -> kept channels, for every pruned group.
        plan: :func:`plan_blocks`'s blocks.
        contributes: whether this process's ``batches`` count (a rank that holds none
            passes one batch and ``False``, as for the whole-model pass).
        exact, refit, team, channels_last, reselect, fit, warn: as for
            :func:`~spectrim.calibration.sequential.sequential_correct`.
        calls: per batch, every chain module's arguments as the calibration pass kept
            them (``Collected.calls``; the first module's input included); ``None``: one
            forward pass here finds them.  A list passed here is emptied: the pass keeps
            its own copy, and drops the chain's inputs from it once it holds them
            elsewhere (in its boundaries, or their files).
        block_cache: a folder to hold the block boundaries in between blocks
            (:class:`~spectrim.calibration.spill.Spill`); ``None``: in memory.
        readers: refit the readers too, as
            :func:`~spectrim.calibration.sequential.sequential_correct` does (their
            original outputs are kept on the block's original copy, with the consumers'
            inputs), in the blocks that hold a pruned group and in the modules after the
            chain (a block :data:`SUFFIX` of their own when no group reaches them).
        routed, fixed: the modules whose rows the model routes and the corrections of
            those that are consumers, as for
            :func:`~spectrim.calibration.sequential.sequential_correct`.

    Returns:
        ``folds[group][consumer] = B``, the relative error of each fit and every group's
        kept channels.
    """
    modules = dict(model.named_modules())
    keep = dict(keep)
    names = [n for blk in plan.blocks for n in blk if n not in (PREFIX, SUFFIX)]
    masks = [token_mask(b) for b in batches]
    if calls is None or len(calls) != len(batches):
        calls = _capture(model, batches, names)
    # safe to run again: Hugging Face key/value caches dropped
    scrubbed: list[dict[str, tuple[tuple[Any, ...], dict[str, Any]]]] = [
        {n: (tuple(_scrub(a) for a in args), _scrub(kw)) for n, (args, kw) in c.items()}
        for c in calls
    ]
    if isinstance(calls, list):
        calls.clear()  # consumed: only the pass's copy refers to the chain's inputs now

    def model_batch(i: int) -> Any:
        return channels_last_batch(batches[i]) if channels_last else batches[i]

    if readers is not None and plan.suffix and plan.blocks[-1][-1] != SUFFIX:
        # the modules after the chain (a classifier) read the compressed chain's output:
        # a block of their own, for their readers, where the suffix can run as one
        if plan.blocks[0][0] != PREFIX or team.broadcast(
            suffix_reads_chain_only(model, model_batch(0), names)
        ):
            plan = dataclasses.replace(
                plan, blocks=[*plan.blocks, [SUFFIX]], groups=[*plan.groups, []]
            )
            readers.extra_blocks += 1

    with Spill(block_cache) as spill:
        return _blocks(
            model, modules, analysis, batches, keep, plan, names, masks, scrubbed, spill,
            model_batch, contributes=contributes, exact=exact, refit=refit, team=team,
            channels_last=channels_last, reselect=reselect, fit=fit, warn=warn,
            readers=readers, routed=routed, fixed=fixed,
        )  # fmt: skip


def _blocks(
    model: nn.Module,
    modules: Mapping[str, nn.Module],
    analysis: Analysis,
    batches: Sequence[Any],
    keep: dict[int, np.ndarray],
    plan: BlockPlan,
    names: Sequence[str],
    masks: Sequence[torch.Tensor | None],
    calls: Sequence[dict[str, tuple[tuple[Any, ...], dict[str, Any]]]],
    spill: Spill,
    model_batch: Callable[[int], Any],
    *,
    contributes: bool,
    exact: Mapping[int, bool] | None,
    refit: Mapping[int, Refit] | None,
    team: Team,
    channels_last: bool,
    reselect: Collection[int] | Mapping[int, Select],
    fit: str,
    warn: Callable[[str], None] | None,
    readers: ReaderFits | None = None,
    routed: Collection[str] = (),
    fixed: Mapping[int, Mapping[str, np.ndarray | None]] | None = None,
) -> tuple[dict[int, dict[str, np.ndarray]], dict[tuple[int, str], float], dict[int, np.ndarray]]:
    """:func:`blockwise_correct`'s pass, its boundaries kept by ``spill`` (each list
    holds a value or a handle per batch; ``spill.get`` reads either)."""
    first = names[0]

    if plan.blocks[0][0] == PREFIX:  # the first block runs the model from its batches
        xs_o: list[Any] = list(batches)
    else:
        xs_o = [spill.put(c[first][0][0]) for c in calls]
    for c in calls:  # the chain's inputs are in xs_o (or its files), or the prefix's
        args, kwargs = c[first]
        c[first] = ((None, *args[1:]), kwargs)
    xs_c: list[Any] = list(xs_o)  # nothing before the chain is pruned
    folds: dict[int, dict[str, np.ndarray]] = {}
    errors: dict[tuple[int, str], float] = {}
    run_block = _block_runner(model, names, calls, spill, model_batch)
    consumers = {c.module for gi in keep for c in analysis.groups[gi].consumers}

    for b, (blk, gis) in enumerate(zip(plan.blocks, plan.groups)):
        mods = [None if n in (PREFIX, SUFFIX) else modules[n] for n in blk]
        member = plan.member(b)
        if not gis and (readers is None or SUFFIX not in blk):
            with torch.no_grad():
                new_o = [spill.put(run_block(mods, blk, x, i)) for i, x in enumerate(xs_o)]
                new_c = [
                    new_o[i] if xs_c[i] is xs_o[i] else spill.put(run_block(mods, blk, x, i))
                    for i, x in enumerate(xs_c)
                ]
            spill.release([*xs_o, *xs_c], keep=[*new_o, *new_c])
            xs_o, xs_c = new_o, new_c
            continue
        # the original block: a copy of its modules; the prefix and the suffix are the
        # model's own, which nothing has pruned before their block's fits
        originals = [None if m is None else copy.deepcopy(m) for m in mods]
        inputs: dict[tuple[int, str], list[Any]] = {}  # tensors, or handles to files
        current = [0]  # the batch the original block is running
        hooks = []
        targets: dict[str, nn.Module] = {}  # consumer -> its module in the original block
        for gi in gis:
            for slot in analysis.groups[gi].consumers:
                if not member(slot.module):  # fitted in its own block
                    continue
                j = next((j for j, c in enumerate(blk) if _inside(slot.module, c)), -1)
                orig = None if j < 0 else originals[j]
                if orig is None:  # a consumer in the prefix or the suffix
                    target = modules[slot.module]
                else:
                    rel = slot.module[len(blk[j]) + 1 :]
                    target = orig.get_submodule(rel) if rel else orig
                targets[slot.module] = target
                pos = torch.as_tensor(slot.positions, dtype=torch.long)
                keeper = _keeper(inputs, (gi, slot.module), pos, masks, current, spill.put)
                hooks.append(target.register_forward_pre_hook(keeper))
        outputs: dict[str, list[Any]] = {}  # reader -> its original outputs (or handles)
        if readers is not None:
            found: dict[str, nn.Module] = {}
            for root, o in zip(blk, originals):
                if o is not None:
                    named = ((f"{root}.{r}" if r else root, m) for r, m in o.named_modules())
                else:  # the prefix or the suffix: the model's own, unchanged until its fits
                    ends = plan.prefix if root == PREFIX else plan.suffix
                    named = ((n, m) for n, m in modules.items() if any(_inside(n, e) for e in ends))
                found.update(reader_candidates(named, consumers))
            found = {n: m for n, m in found.items() if member(n)}
            if found:

                def probe(
                    item: Any,
                    mods: Sequence[nn.Module | None] = originals,
                    blk: Sequence[str] = blk,
                ) -> Any:
                    return run_block(mods, blk, item, 0)

                chosen = team.broadcast(find_readers(found, probe, xs_o[0], fit, readers.skipped))
                for name in chosen:
                    outputs[name] = []
                    keeper = _output_keeper(outputs[name], masks, current, spill.put)
                    hooks.append(found[name].register_forward_hook(keeper))
        try:
            with torch.no_grad():
                new_o = []
                for i, x in enumerate(xs_o):
                    current[0] = i
                    new_o.append(spill.put(run_block(originals, blk, x, i)))
        finally:
            for hd in hooks:
                hd.remove()
        partners = None
        if fit == "residual":  # the original operands of the block's residual additions

            def original(
                item: Any, mods: Sequence[nn.Module | None] = originals, blk: Sequence[str] = blk
            ) -> Any:
                return run_block(mods, blk, item[0], item[1])

            items = [(x, i) for i, x in enumerate(xs_o)]
            # the operands, one per batch and consumer, wait for their fit in files too,
            # each written as its batch is done
            partners = (
                residual_partners(targets, items, original, store=spill.put) if contributes else {}
            )
        del originals
        outs: dict[int, Any] = {}
        # each batch's input to each of the block's modules, as this pass reached it: a
        # side pass for a consumer starts at its own module (everything before it is final)
        entry: dict[tuple[int, int], Any] = {}

        def runner(
            item: Any,
            mods: Sequence[nn.Module | None] = mods,
            blk: Sequence[str] = blk,
            outs: dict[int, Any] = outs,
            entry: dict[tuple[int, int], Any] = entry,
        ) -> Any:
            x, i = item
            for j in range(len(blk)):
                if fit == "residual":  # only its side passes start inside the block
                    entry[(i, j)] = x  # at j = 0 the boundary's handle when on disk
                x = run_block(mods[j : j + 1], blk[j : j + 1], x, i)
            outs[i] = spill.put(x)
            return x

        def side_runner(
            name: str,
            mods: Sequence[nn.Module | None] = mods,
            blk: Sequence[str] = blk,
            entry: dict[tuple[int, int], Any] = entry,
        ) -> Callable[[Any], Any]:
            # a consumer in the prefix or the suffix: from the block's start
            j = next((j for j, c in enumerate(blk) if _inside(name, c)), 0)

            def side(item: Any) -> Any:
                i = item[1]
                return run_block(mods[j:], blk[j:], entry[(i, j)], i)

            return side

        collected = Collected(stats={}, inputs=inputs, n_stored=len(xs_c) if contributes else 0)
        f, e, k = sequential_correct(
            model,
            analysis,
            [(x, i) for i, x in enumerate(xs_c)],
            {gi: keep[gi] for gi in gis},
            collected,
            exact=None if exact is None else {gi: exact[gi] for gi in gis if gi in exact},
            refit=None if refit is None else {gi: refit[gi] for gi in gis if gi in refit},
            team=team,
            runner=runner,
            masks=masks,
            channels_last=channels_last,
            reselect=(
                {gi: reselect[gi] for gi in gis if gi in reselect}
                if isinstance(reselect, Mapping)
                else [gi for gi in gis if gi in reselect]
            ),
            fit=fit,
            partners=partners,
            side_runner=side_runner,
            warn=warn,
            within=member,
            fetch=spill.get,
            readers=readers,
            reader_outputs=outputs if readers is not None else None,
            routed=routed,
            fixed={gi: fixed[gi] for gi in gis if gi in fixed} if fixed else None,
        )
        keep.update(k)
        for gi, at in f.items():  # a group spanning blocks has consumers in several
            folds.setdefault(gi, {}).update(at)
        errors.update(e)
        if partners:
            spill.release([p.other for ps in partners.values() for p in ps])
        del partners
        old = [*xs_o, *xs_c]
        xs_o, xs_c = new_o, [outs[i] for i in range(len(xs_c))]
        spill.release(old, keep=[*xs_o, *xs_c])
        # the previous boundaries must not live through the next block (the side passes'
        # entries are this block's inputs)
        del old
        entry.clear()
        outs.clear()
        spill.release([h for hs in [*inputs.values(), *outputs.values()] for h in hs])
        inputs.clear()  # its consumers' original inputs, fitted
        outputs.clear()
    return folds, errors, keep


RunBlock = Callable[[Sequence[nn.Module | None], Sequence[str], Any, int], Any]


def _block_runner(
    model: nn.Module,
    names: Sequence[str],
    calls: Sequence[Mapping[str, tuple[tuple[Any, ...], dict[str, Any]]]],
    spill: Spill,
    model_batch: Callable[[int], Any],
) -> RunBlock:
    """``run_block(mods, blk, x, i)``: the block ``blk`` (its modules ``mods``, ``None``
    for :data:`PREFIX` / :data:`SUFFIX`) run on batch ``i``'s boundary ``x`` (a value or
    a handle of ``spill``) with the batch's own arguments (``calls``)."""
    first = names[0]

    def run_block(mods: Sequence[nn.Module | None], blk: Sequence[str], x: Any, i: int) -> Any:
        x = spill.get(x)  # a boundary written to disk, or the value itself
        for name, mod in zip(blk, mods):
            if name == PREFIX:  # the model itself, stopped at the chain
                x = _run_prefix(model, model_batch(i), first)
                continue
            if name == SUFFIX:  # the model itself, the chain's output replaced by x
                x = _run_suffix(model, model_batch(i), names[-1], x)
                continue
            assert mod is not None
            args, kwargs = calls[i][name]
            x = _hidden(mod(x, *args[1:], **kwargs))
        return x

    return run_block


def _capture(
    model: nn.Module,
    batches: Iterable[Any],
    names: Sequence[str],
    heads: Callable[[Any], Any] | None = None,
) -> list[dict[str, tuple[tuple[Any, ...], dict[str, Any]]]]:
    """Every chain module's arguments at its first call in each batch, from one forward
    pass per batch (what the calibration pass keeps with ``keep_calls``).  With
    ``heads``, each batch's input of the chain's first module is handed to it as the
    batch is run (``heads(x)``, e.g. :meth:`Spill.put`) and its place in the arguments
    left ``None``: the calls then hold no activation."""
    modules = dict(model.named_modules())
    out = Collected(stats={})
    hs = [
        modules[n].register_forward_pre_hook(call_keeper(n, names[0], out), with_kwargs=True)
        for n in names
    ]
    first = names[0]
    try:
        with torch.no_grad():
            for batch in batches:
                out.calls.append({})
                call_model(model, batch)
                if heads is not None and first in out.calls[-1]:
                    args, kwargs = out.calls[-1][first]
                    out.calls[-1][first] = ((heads(args[0]), *args[1:]), kwargs)
    finally:
        for hd in hs:
            hd.remove()
    return out.calls


def blockwise_statistics(
    model: nn.Module,
    analysis: Analysis,
    batches: Sequence[Any],
    groups: Sequence[UnitGroup],
    plan: BlockPlan,
    done: Callable[[list[int], dict[StatKey, Any]], None],
    *,
    store_fraction: float = 0.0,
    min_rows_per_unit: int = 32,
    channels_last: bool = False,
    team: Team = SOLO,
    sketch_rows: Mapping[int, int] | None = None,
    seed: int = 0,
    progress: Callable[[Iterable[Any]], Iterable[Any]] | None = None,
    block_cache: str | os.PathLike[str] | None = None,
) -> Collected:
    """The calibration statistics block by block: memory for one block's statistics.

    The calibration pass (:func:`~spectrim.calibration.collect.collect`) runs every batch
    through the whole model and so holds the Grams of every group at its end (a
    BERT-base's twelve 3072-wide FFN groups: about 1 GiB, and as much again in their
    factorisations).  Here every batch first runs once to find the chain's arguments,
    then each block of ``plan`` runs on all batches from its cached inputs (in memory, or
    in files under ``block_cache``), measuring the statistics of its own consumers.  When
    a group's last block is done its statistics are complete: ``done(group indices,
    {(group, consumer): statistic})`` gets them (summed over ``team``), to make what it
    needs of them (the solvers' curves and orders) and let them go.  The statistics are
    the calibration pass's, batch for batch (``tests/calibration/test_blocks.py``).

    Args:
        model, analysis, batches, groups: as for
            :func:`~spectrim.calibration.collect.collect`.
        plan: :func:`plan_blocks` of every group in ``groups``.
        done: called once per block with the groups that block completed.
        store_fraction, min_rows_per_unit: the sequential pass's share, decided as the
            calibration pass decides it.
        channels_last, team, sketch_rows, seed, progress: as for
            :func:`~spectrim.calibration.collect.collect` (``progress`` wraps the blocks).
        block_cache: a folder for the block boundaries; ``None``: in memory.

    Returns:
        A :class:`Collected` with no statistics: ``n_stored``, and ``calls`` of the
        stored batches (the chain's first input included) for
        :func:`blockwise_correct`.
    """
    names = [n for blk in plan.blocks for n in blk if n not in (PREFIX, SUFFIX)]
    first = names[0]
    wanted = {g.index for g in groups}
    last: dict[int, int] = {}
    for b, gis in enumerate(plan.groups):
        for gi in gis:
            if gi in wanted:
                last[gi] = b
    end = max(last.values(), default=-1)  # no block after it measures anything
    lengths, mine = (
        team.positions([batch_len(b) for b in batches])
        if store_fraction > 0
        else ([batch_len(b) for b in batches], list(range(len(batches))))
    )

    def model_batch(i: int) -> Any:
        return channels_last_batch(batches[i]) if channels_last else batches[i]

    with Spill(block_cache) as spill:
        each = (model_batch(i) for i in range(len(batches)))  # one converted at a time
        calls = _capture(model, each, names, spill.put)
        xs: list[Any] = [c[first][0][0] for c in calls]  # the chain's inputs (or handles)
        heads = list(xs)
        run_block = _block_runner(model, names, calls, spill, model_batch)
        modules = dict(model.named_modules())
        pending: dict[StatKey, Any] = {}
        first_numel: dict[StatKey, int] = {}
        blocks = range(end + 1)
        for b in progress(blocks) if progress is not None else blocks:
            blk = plan.blocks[b]
            mods = [None if n in (PREFIX, SUFFIX) else modules[n] for n in blk]
            member = plan.member(b)
            measured = []  # the block's groups, with their consumers in this block only
            for gi in plan.groups[b]:
                if gi not in wanted:
                    continue
                g = analysis.groups[gi]
                inside = [c for c in g.consumers if member(c.module)]
                if inside:
                    measured.append(dataclasses.replace(g, consumers=inside))
            new: list[Any] = [None] * len(batches)
            prefix = blk[0] == PREFIX  # runs the model from the batch itself

            def forward(
                i: int,
                batch: Any,
                mods: Sequence[nn.Module | None] = mods,
                blk: Sequence[str] = blk,
                new: list[Any] = new,
                prefix: bool = prefix,
                xs: list[Any] = xs,
                more: bool = b < end,
            ) -> None:
                x = run_block(mods, blk, None if prefix else xs[i], i)
                new[i] = spill.put(x) if more else None  # the last block's: not needed

            part = collect(
                model,
                analysis,
                batches,
                measured,
                team=team,
                sketch_rows=sketch_rows,
                seed=seed,
                forward=forward,
            )
            team.reduce({**part.stats, **part.sketches})
            first_numel.update(part.first_numel)
            pending.update(part.stats)
            pending.update(part.sketches)
            del part
            finished = [gi for gi in plan.groups[b] if last.get(gi) == b]
            if finished:
                done(finished, {k: pending.pop(k) for k in list(pending) if k[0] in finished})
            spill.release(xs, keep=[*new, *heads])  # the chain's inputs: for the stored batches
            xs = new
        spill.release(xs, keep=heads)
        n_store = 0
        if store_fraction > 0:
            sizes = np.cumsum(lengths)
            widths = {key: analysis.groups[key[0]].width for key in first_numel}
            n = stored_batches(widths, first_numel, sizes, store_fraction, min_rows_per_unit)
            n_store = team.broadcast(n)  # rank 0 holds the first batch: its decision
        n_stored = sum(1 for g in mine if g < n_store)
        stored = calls[:n_stored]
        for i, c in enumerate(stored):
            args, kwargs = c[first]
            c[first] = ((spill.get(heads[i]), *args[1:]), kwargs)
        spill.release(heads)
    return Collected(stats={}, n_stored=n_stored, calls=stored, first_numel=first_numel)


def _output_keeper(
    outputs: list[Any],
    masks: Sequence[torch.Tensor | None],
    current: list[int],
    put: Callable[[Any], Any],
) -> Any:
    """A forward hook keeping a reader's output, first call per batch (``current[0]``),
    padding dropped, as ``put`` keeps it."""
    seen: set[int] = set()

    def h(module: nn.Module, args: tuple[Any, ...], out: Any) -> None:
        i = current[0]
        if i in seen:
            return
        seen.add(i)
        y = out.detach()
        kept = drop_padding(y, masks[i], input_channel_axis(module, y))[0]
        outputs.append(put(kept.clone() if kept is y else kept))  # an in-place op may follow

    return h


def _keeper(
    inputs: dict[tuple[int, str], list[Any]],
    key: tuple[int, str],
    positions: torch.Tensor,
    masks: Sequence[torch.Tensor | None],
    current: list[int],
    put: Callable[[Any], Any] = lambda x: x,
) -> Any:
    """A pre-hook keeping the group's view of a consumer's input, first call per batch
    (``current[0]``), as ``put`` keeps it (:meth:`Spill.put`: in memory or in a file)."""
    seen: set[int] = set()

    def h(module: nn.Module, args: tuple[Any, ...]) -> None:
        i = current[0]
        if i in seen:
            return
        seen.add(i)
        x = args[0].detach()
        x, cd = drop_padding(x, masks[i], input_channel_axis(module, x))
        view, _ = group_view(x, cd, positions)
        inputs.setdefault(key, []).append(put(view.clone() if view is x else view))

    return h
