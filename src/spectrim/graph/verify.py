"""Self-checks that make a wrong graph analysis cost compression, never correctness.

* **Permutation check**: permuting the channels of every prunable group (producers,
  passengers and consumers alike) must leave the model's outputs unchanged.  A missed
  consumer, a missed BatchNorm or a wrong flatten/concat mapping breaks it.
* **Shrink check**: removing a channel from every group must still run and give outputs
  of the original shapes (catches hard-coded channel counts the tracer cannot see).

Groups that fail are found by bisection and pinned with the reason.

Example::

    >>> import torch, torch.nn as nn
    >>> from spectrim.graph import analyze_channels
    >>> net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 4, 3))
    >>> a = analyze_channels(net, torch.randn(1, 3, 8, 8))
    >>> self_check(net, a, torch.randn(1, 3, 8, 8))
    []
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from spectrim.graph.channels import Analysis, UnitGroup, analyze_channels
from spectrim.graph.surgery import GroupPlan, apply_plan
from spectrim.graph.trace import model_outputs

__all__ = ["check_runs", "output_change", "same_outputs", "self_check", "trace_and_check"]


def output_change(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    """The largest change from the outputs ``a`` (the reference) to ``b``: per float
    output, the largest absolute difference over the reference's largest magnitude;
    ``inf`` when the count or a shape differs, another dtype's values differ, or a
    difference is NaN.

    Example::

        >>> import torch
        >>> round(output_change([torch.tensor([2.0, 4.0])], [torch.tensor([2.0, 3.0])]), 6)
        0.25
    """
    if len(a) != len(b):
        return math.inf
    worst = 0.0
    for x, y in zip(a, b):
        if x.shape != y.shape:
            return math.inf
        if x.numel() == 0:
            continue
        if x.is_floating_point():
            change = (x - y).abs().max().item() / (x.abs().max().item() + 1e-12)
            worst = max(worst, change if change == change else math.inf)  # NaN: the worst
        elif not torch.equal(x, y):
            return math.inf
    return worst


def same_outputs(a: list[torch.Tensor], b: list[torch.Tensor], rtol: float) -> bool:
    """Same count and shapes, floats within ``rtol`` of each reference's largest
    magnitude (``a`` is the reference), other dtypes equal."""
    return output_change(a, b) <= rtol


def _bisect(
    groups: Sequence[UnitGroup], ok: Callable[[Sequence[UnitGroup]], bool]
) -> list[UnitGroup]:
    """Groups that make ``ok`` fail (assuming failures are caused by single groups)."""
    if not groups or ok(groups):
        return []
    if len(groups) == 1:
        return list(groups)
    mid = len(groups) // 2
    return _bisect(groups[:mid], ok) + _bisect(groups[mid:], ok)


def self_check(
    model: nn.Module,
    analysis: Analysis,
    example: Any,
    seed: int = 0,
    rtol: float = 1e-4,
    ref: list[torch.Tensor] | None = None,
) -> list[tuple[str, str]]:
    """Run the permutation and shrink checks; pin failing groups.

    ``ref``: ``model``'s outputs on ``example`` when the caller has them (the trace's,
    if it traced this example), else one forward pass computes them.
    Returns ``(group name, reason)`` for every group pinned here.
    """
    rng = np.random.default_rng(seed)
    model = model.eval()
    if ref is None:
        ref = model_outputs(model, example)
    pinned: list[tuple[str, str]] = []

    def permuted_ok(groups: Sequence[UnitGroup], m2: nn.Module | None = None) -> bool:
        m2 = copy.deepcopy(model) if m2 is None else m2
        plans = {
            g.index: GroupPlan(keep=np.arange(g.width), perm=rng.permutation(g.width))
            for g in groups
        }
        try:
            apply_plan(m2, analysis, plans)
            return same_outputs(ref, model_outputs(m2, example), rtol)
        except Exception:
            return False

    def shrunk_ok(groups: Sequence[UnitGroup], m2: nn.Module | None = None) -> bool:
        m2 = copy.deepcopy(model) if m2 is None else m2
        plans = {g.index: GroupPlan(keep=np.arange(g.width - 1)) for g in groups if g.width > 1}
        try:
            apply_plan(m2, analysis, plans)
            out = model_outputs(m2, example)
        except Exception:
            return False
        return len(out) == len(ref) and all(x.shape == y.shape for x, y in zip(out, ref))

    # The common case, nothing fails: both checks on every group, on one copy (permuting
    # keeps every width, so the permuted copy has the original's channel structure).
    both = copy.deepcopy(model)
    if permuted_ok(analysis.prunable, both) and shrunk_ok(analysis.prunable, both):
        return []
    for check, why in ((permuted_ok, "permutation self-check failed"),
                       (shrunk_ok, "shrink self-check failed (hard-coded channel count?)")):  # fmt: skip
        bad = _bisect(analysis.prunable, check)
        for g in bad:
            analysis.pin(g, why)
            pinned.append((g.name, why))
    return pinned


def check_runs(model: nn.Module, example: Any) -> None:
    """Raise ``ValueError`` if ``model`` fails on ``example`` by itself (a plain call):
    what failed in spectrim's own work on it was then the inputs, not spectrim."""
    try:
        model_outputs(model, example)
    except Exception as plain:
        raise ValueError(
            f"the model fails on the first calibration batch by itself, before spectrim "
            f"changes anything: {type(plain).__name__}: {plain} (are the calibration "
            "inputs the kind and size the model takes?)"
        ) from plain


def trace_and_check(
    model: nn.Module, example: Any, *, verify: bool = True, seed: int = 0
) -> tuple[Analysis, list[str]]:
    """Trace ``model`` on ``example`` and (optionally) self-check every unit group.

    Returns the channel analysis and one warning per group the self-check pinned.
    A model that fails on ``example`` by itself (a plain call, no tracer) raises
    ``ValueError``: the inputs do not suit the model (e.g. images of a size its position
    tables were not built for).  One that runs but cannot be traced raises
    ``RuntimeError`` naming the cause; outputs that are not finite raise ``ValueError``
    (the checks would compare NaN with NaN).
    """
    try:
        analysis = analyze_channels(model, example)
    except Exception as exc:
        check_runs(model, example)
        raise RuntimeError(
            f"spectrim could not trace the model on the calibration batch: {exc}"
        ) from exc
    for i, t in enumerate(analysis.graph.output_tensors):
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise ValueError(
                f"the model's output {i} holds NaN or inf on the example it was traced on "
                "(the first examples of the first batch): the model overflows or is broken "
                "on these inputs, so nothing it computes can be checked"
            )
    warnings: list[str] = []
    if verify:
        # the trace ran this model on this example: its outputs are the reference
        ref = analysis.graph.output_tensors or None
        for name, why in self_check(model, analysis, example, seed=seed, ref=ref):
            warnings.append(f"unit group '{name}' pinned: {why}")
    return analysis, warnings
