"""Input Grams of weight matrices: the statistics weight sparsification declares it needs.

For every module with a :class:`~spectrim.graph.modules.WeightKind`, the rows ``X`` of its
input (a conv's unfolded patches) are streamed into a float64
:class:`~spectrim.calibration.gram.GramAccumulator`, so ``XᵀX`` matches the columns of
the weight read as a matrix — for every such module, whether or not its channels are
pinned.

* :func:`input_grams` — one pass, every listed module at once (the original model).
* :func:`input_gram_at` — one module, fed by a model being sparsified in place, with the
  cross term ``X_sᵀX_o`` against the original model's inputs on the same batches (the
  sequential pass; each forward stops at the module).
* :func:`execution_order` — the order in which the modules first run.

Example::

    >>> import torch, torch.nn as nn
    >>> net = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
    >>> grams = input_grams(net, [torch.randn(10, 4)], ["0", "2"])
    >>> grams["0"].count, tuple(grams["2"].gram.shape)
    (10, (3, 3))
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from torch import nn

from spectrim.calibration.batches import drop_padding, token_mask
from spectrim.calibration.checks import CalibrationError
from spectrim.calibration.gram import GramAccumulator
from spectrim.graph.modules import input_channel_axis, weight_kind
from spectrim.graph.trace import StopPass, call_model, call_until_stopped

__all__ = [
    "calls_per_module",
    "execution_order",
    "input_gram_at",
    "input_grams",
    "module_calls",
]


def _rows(
    name: str, module: nn.Module, args: tuple[Any, ...], mask: torch.Tensor | None = None
) -> torch.Tensor | None:
    kind = weight_kind(module)
    if kind is None or not args or not isinstance(args[0], torch.Tensor):
        return None
    x = args[0].detach()
    x, _ = drop_padding(x, mask, input_channel_axis(module, x))  # real tokens only
    rows = kind.input_rows(module, x)
    if rows is None:
        return None
    rows = rows.float()
    if not bool(torch.isfinite(rows).all()):
        raise CalibrationError(
            f"the input of module '{name}' has NaN or inf on the calibration data"
        )
    return rows


def module_calls(model: nn.Module, batch: Any, names: Iterable[str]) -> list[str]:
    """The named modules in the order they run on ``batch``, once per call."""
    order: list[str] = []
    modules = dict(model.named_modules())
    handles = []
    for n in dict.fromkeys(names):

        def hook(module: nn.Module, args: tuple[Any, ...], n: str = n) -> None:
            order.append(n)

        handles.append(modules[n].register_forward_pre_hook(hook))
    try:
        with torch.no_grad():
            call_model(model, batch)
    finally:
        for h in handles:
            h.remove()
    return order


def execution_order(model: nn.Module, batch: Any, names: Iterable[str]) -> list[str]:
    """``names`` in the order their modules first run on ``batch`` (modules that never run
    come last, sorted)."""
    wanted = list(names)
    seen = list(dict.fromkeys(module_calls(model, batch, wanted)))
    return seen + sorted(set(wanted) - set(seen))


def calls_per_module(model: nn.Module, batch: Any, names: Iterable[str]) -> dict[str, int]:
    """How many times each named module runs in one forward pass on ``batch``."""
    wanted = list(names)
    counts = dict.fromkeys(wanted, 0)
    for n in module_calls(model, batch, wanted):
        counts[n] += 1
    return counts


def input_grams(
    model: nn.Module,
    batches: Sequence[Any],
    names: Sequence[str],
    *,
    sums: bool = False,
    progress: Callable[[Iterable[Any]], Iterable[Any]] | None = None,
) -> dict[str, GramAccumulator]:
    """``XᵀX`` of the input rows of every module in ``names``, in one pass over
    ``batches`` (modules whose inputs cannot be read as rows, e.g. grouped convs, are
    left out of the result)."""
    modules = dict(model.named_modules())
    out: dict[str, GramAccumulator] = {}
    skip: set[str] = set()
    current: list[torch.Tensor | None] = [None]  # the token mask of the running batch
    handles = []
    for n in names:

        def hook(module: nn.Module, args: tuple[Any, ...], n: str = n) -> None:
            if n in skip:
                return
            rows = _rows(n, module, args, current[0])
            if rows is None:
                skip.add(n)
                return
            acc = out.get(n)
            if acc is None:
                acc = out[n] = GramAccumulator(rows.shape[1], sums=sums)
            acc.update(rows)

        handles.append(modules[n].register_forward_pre_hook(hook))
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for batch in progress(batches) if progress is not None else batches:
                current[0] = token_mask(batch)
                call_model(model, batch)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return out


def _capture(model: nn.Module, module: nn.Module, batch: Any, stop: bool) -> list[torch.Tensor]:
    got: list[torch.Tensor] = []

    def hook(mod: nn.Module, args: tuple[Any, ...]) -> None:
        got.append(args[0].detach())
        if stop:
            raise StopPass

    h = module.register_forward_pre_hook(hook)
    try:
        with torch.no_grad():
            call_until_stopped(model, batch)
    finally:
        h.remove()
    return got


def input_gram_at(
    work: nn.Module,
    name: str,
    batches: Sequence[Any],
    *,
    original: nn.Module | None = None,
    sums: bool = False,
    stop_early: bool = True,
) -> GramAccumulator | None:
    """``X_sᵀX_s`` of module ``name``'s input rows in ``work`` and, with ``original``,
    the cross term ``X_sᵀX_o`` with the rows the same module receives in ``original`` on
    the same batches.  Each forward pass stops once the module has run
    (``stop_early``; pass ``False`` for a module called more than once per pass).
    ``None`` when the module's inputs cannot be read as rows."""
    mod_w = dict(work.named_modules())[name]
    mod_o = dict(original.named_modules())[name] if original is not None else None
    acc: GramAccumulator | None = None
    for batch in batches:
        xs = _capture(work, mod_w, batch, stop_early)
        xo = (
            _capture(original, mod_o, batch, stop_early)
            if original is not None and mod_o is not None
            else []
        )
        mask = token_mask(batch)
        for i, x in enumerate(xs):
            rows = _rows(name, mod_w, (x,), mask)
            if rows is None:
                return None
            y = _rows(name, mod_o, (xo[i],), mask) if mod_o is not None else None
            if acc is None:
                acc = GramAccumulator(
                    rows.shape[1], cross_dim=rows.shape[1] if y is not None else None, sums=sums
                )
            acc.update(rows, y)
    return acc
