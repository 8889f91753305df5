"""Per-group widths from a target: uniform width, per-layer error, or a global
MACs/params budget allocated from the groups' error curves in one pass.

The cost model is exact for the module costs it is given: a module's MACs (and each
parameter tensor's size) scale with the kept fraction of every channel axis it has
(input features of a consumer, outputs of a producer, channels of a depthwise conv
or BatchNorm).  The global allocator is a lazy greedy on marginal error per marginal
cost: repeatedly remove the channel (or ``round_to`` channels) whose removal raises
the summed relative error the least per MAC (or parameter) saved, until the target is
met.  Error curves come from one factorisation per group, so no forward pass and no
re-pruning happens inside the loop.

Example::

    >>> import numpy as np
    >>> # squared relative errors e[k]; error=0.5 asks for e[k] <= 0.25
    >>> curves = {0: np.array([1.0, 0.2, 0.0]), 1: np.array([1.0, 0.5, 0.1, 0.0])}
    >>> widths_for_error(curves, 0.5, round_to=1, min_width=1)
    {0: 1, 1: 2}
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
from torch import nn

from spectrim.config import Target
from spectrim.graph.channels import Analysis

__all__ = [
    "Allocation",
    "CostModel",
    "allocate",
    "allocate_budget",
    "uniform_widths",
    "widths_for_error",
]


def _allowed(m: int, round_to: int, min_width: int) -> list[int]:
    """Allowed widths of an ``m``-channel group, descending (``m`` always allowed)."""
    lo = min(m, max(min_width, round_to))
    ks = {m}
    k = (m // round_to) * round_to
    while k >= lo:
        ks.add(k)
        k -= round_to
    return sorted((k for k in ks if k >= 1), reverse=True)


def _round_up(k: int, m: int, round_to: int, min_width: int) -> int:
    k = max(k, min_width, 1)
    if round_to > 1:
        k = int(math.ceil(k / round_to) * round_to)
    return min(k, m)


def uniform_widths(
    widths: Mapping[int, int], fraction: float, round_to: int = 1, min_width: int = 1
) -> dict[int, int]:
    """Keep ``round(fraction·m)`` channels of every group (rounded up to ``round_to``)."""
    return {g: _round_up(round(fraction * m), m, round_to, min_width) for g, m in widths.items()}


def widths_for_error(
    curves: Mapping[int, np.ndarray], error: float, round_to: int = 1, min_width: int = 1
) -> dict[int, int]:
    """Fewest channels per group with relative error ``sqrt(e[k]) <= error``."""
    out = {}
    for g, e in curves.items():
        m = len(e) - 1
        ok = np.nonzero(np.sqrt(np.maximum(e, 0.0)) <= error + 1e-12)[0]
        k = int(ok[0]) if len(ok) else m
        out[g] = _round_up(k, m, round_to, min_width)
    return out


def dof_widths(
    alpha: float, solvers: Mapping[int, Any], round_to: int = 1, min_width: int = 1
) -> dict[int, int]:
    """Per group ``⌈c·N(α·tr Σ̂)⌉`` channels (``solver.width_for_dof``), rounded up."""
    return {
        g: _round_up(s.width_for_dof(alpha), s.group.width, round_to, min_width)
        for g, s in solvers.items()
    }


@dataclass
class _Axis:
    length: int
    per_class: dict[int, int]  # group index -> occurrences of each of its channels


class CostModel:
    """MACs and parameter counts of the pruned model as a function of group widths.

    Args:
        model: the (unpruned) model.
        analysis: its channel analysis.
        module_macs: MACs per module qualified name (from
            :func:`spectrim.evaluation.profile`); MACs not attributed to a module
            (functional matmuls) are passed as ``other_macs`` and stay constant.
    """

    def __init__(
        self,
        model: nn.Module,
        analysis: Analysis,
        module_macs: Mapping[str, int],
        other_macs: int = 0,
    ) -> None:
        self.widths = {g.index: g.width for g in analysis.groups}
        group_of = analysis.class_group
        self.other_macs = other_macs

        def axis(labels: np.ndarray) -> _Axis:
            per: dict[int, int] = {}
            for c in labels.tolist():
                gi = group_of.get(c)
                if gi is not None:
                    per[gi] = per.get(gi, 0) + 1
            return _Axis(len(labels), {g: n // self.widths[g] for g, n in per.items()})

        # each entry: (base cost, [axes]) for MACs and for params
        self.mac_terms: list[tuple[float, list[_Axis]]] = []
        self.param_terms: list[tuple[float, list[_Axis]]] = []
        seen_params: set[int] = set()
        modules = dict(model.named_modules())
        for name, mod in modules.items():
            axes_in = analysis.in_labels.get(name)
            axes_out = analysis.out_labels.get(name)
            axes_chan = analysis.chan_labels.get(name)
            mod_axes = [axis(a) for a in (axes_in, axes_out, axes_chan) if a is not None]
            if name in module_macs:
                self.mac_terms.append((float(module_macs[name]), mod_axes))
            for pname, p in mod.named_parameters(recurse=False):
                if id(p) in seen_params:
                    continue
                seen_params.add(id(p))
                full = f"{name}.{pname}" if name else pname
                if full in analysis.param_dims:
                    self.param_terms.append((float(p.numel()), [axis(analysis.chan_labels[full])]))
                    continue
                axes = []
                if axes_chan is not None:
                    axes.append(axis(axes_chan))
                else:
                    if axes_out is not None and p.dim() >= 1:
                        axes.append(axis(axes_out))
                    if axes_in is not None and p.dim() >= 2:
                        axes.append(axis(axes_in))
                self.param_terms.append((float(p.numel()), axes))

    @staticmethod
    def _eval(
        terms: list[tuple[float, list[_Axis]]], widths: Mapping[int, int], full: Mapping[int, int]
    ) -> float:
        total = 0.0
        for base, axes in terms:
            f = base
            for ax in axes:
                removed = sum(
                    r * (full[g] - widths.get(g, full[g])) for g, r in ax.per_class.items()
                )
                f *= (ax.length - removed) / ax.length
            total += f
        return total

    def terms_of(self, kind: str) -> list[tuple[float, list[_Axis]]]:
        return self.mac_terms if kind == "macs" else self.param_terms

    def macs(self, widths: Mapping[int, int]) -> float:
        return self._eval(self.mac_terms, widths, self.widths) + self.other_macs

    def params(self, widths: Mapping[int, int]) -> float:
        return self._eval(self.param_terms, widths, self.widths)

    def cost(self, kind: str, widths: Mapping[int, int]) -> float:
        return self.macs(widths) if kind == "macs" else self.params(widths)


@dataclass
class Allocation:
    """Widths for a ``macs``/``params`` target, and whether the target could be met.

    Attributes:
        widths: group index -> kept width.
        kind: ``"macs"`` or ``"params"``.
        target: the fraction asked for.
        reached: the modelled fraction of the full cost at ``widths``.
        floor: the modelled fraction with every group at its minimum width (the most any
            allocation can remove; pinned groups and unmodelled costs stay).
        held: groups the error bound stopped short of their minimum width (only when the
            target is unreachable).
    """

    widths: dict[int, int]
    kind: str
    target: float
    reached: float
    floor: float
    held: list[int]

    @property
    def reachable(self) -> bool:
        return self.floor <= self.target * (1 + 1e-9)


def allocate(
    target: Target,
    curves: Mapping[int, np.ndarray],
    cost_model: CostModel | None = None,
    round_to: int = 1,
    min_width: int = 1,
    max_error: float | None = None,
) -> dict[int, int]:
    """Widths for every group in ``curves`` that reach ``target``.

    For ``macs``/``params`` targets the greedy stops as soon as the modelled cost is at
    or below ``target.value`` times the full cost (see :func:`allocate_budget`, which also
    says whether that was possible).
    """
    widths = {g: len(e) - 1 for g, e in curves.items()}
    if target.kind == "width":
        return uniform_widths(widths, target.value, round_to, min_width)
    if target.kind == "error":
        return widths_for_error(curves, target.value, round_to, min_width)
    if cost_model is None:
        raise ValueError(f"target {target} needs a cost model")
    return allocate_budget(target, curves, cost_model, round_to, min_width, max_error).widths


def allocate_budget(
    target: Target,
    curves: Mapping[int, np.ndarray],
    cost_model: CostModel,
    round_to: int = 1,
    min_width: int = 1,
    max_error: float | None = None,
) -> Allocation:
    """The lazy greedy for a ``macs``/``params`` target (see the module docstring).

    When even every group at its minimum width cannot reach the target (pinned groups,
    costs no group can remove), a model cut to those minimum widths would trade its
    function for a target it still misses. With ``max_error`` set, no group is then
    narrowed past the width where its predicted relative error ``sqrt(e[k])`` exceeds
    ``max_error``; without it every group goes to its minimum width. A reachable target is
    allocated without that bound either way.

    Example::

        >>> import numpy as np
        >>> from spectrim.config import Target
        >>> class Flat:  # every channel of the single group costs the same
        ...     widths, other_macs = {0: 4}, 0.0
        ...     def terms_of(self, kind): return [(4.0, [_Axis(4, {0: 1})])]
        >>> curve = np.array([1.0, 0.6, 0.3, 0.1, 0.0])
        >>> a = allocate_budget(Target("macs", 0.5), {0: curve}, Flat())
        >>> a.widths, a.reachable, a.reached
        ({0: 2}, True, 0.5)
    """
    widths = {g: len(e) - 1 for g, e in curves.items()}
    kind = target.kind
    full_w = dict(cost_model.widths)
    current = dict(full_w)
    terms = cost_model.terms_of(kind)
    extra = cost_model.other_macs if kind == "macs" else 0.0
    # incremental evaluation: each group touches only the terms with one of its axes
    touching: dict[int, list[int]] = {g: [] for g in curves}
    for ti, (_, axes) in enumerate(terms):
        for g in {g for ax in axes for g in ax.per_class}:
            if g in touching:
                touching[g].append(ti)

    def term_value(ti: int, widths: Mapping[int, int]) -> float:
        base, axes = terms[ti]
        f = base
        for ax in axes:
            removed = sum(
                r * (full_w[g] - widths.get(g, full_w[g])) for g, r in ax.per_class.items()
            )
            f *= (ax.length - removed) / ax.length
        return f

    values = [term_value(ti, current) for ti in range(len(terms))]
    total_full = sum(values) + extra
    budget = target.value * total_full
    cost = total_full
    allowed = {g: _allowed(widths[g], round_to, min_width) for g in curves}
    smallest = {**full_w, **{g: allowed[g][-1] for g in curves}}
    floor_cost = sum(term_value(ti, smallest) for ti in range(len(terms))) + extra
    floor = floor_cost / total_full if total_full > 0 else 1.0
    bound = None
    if max_error is not None and floor > target.value * (1 + 1e-9):
        bound = float(max_error) ** 2  # unreachable: stop where errors are still sane
    step = {g: 0 for g in curves}  # index into allowed[g] of the current width
    held: set[int] = set()

    def delta(g: int, k2: int) -> float:
        trial = dict(current)
        trial[g] = k2
        return sum(values[ti] - term_value(ti, trial) for ti in touching[g])

    def priority(g: int) -> float | None:
        i = step[g]
        if i + 1 >= len(allowed[g]):
            return None
        k, k2 = allowed[g][i], allowed[g][i + 1]
        e = curves[g]
        if bound is not None and float(e[k2]) > bound:
            held.add(g)
            return None
        d_err = float(e[k2] - e[k])
        d_cost = delta(g, k2)
        if d_cost <= 0:
            return math.inf
        return max(d_err, 0.0) / d_cost

    heap: list[tuple[float, int]] = []
    for g in curves:
        p = priority(g)
        if p is not None:
            heapq.heappush(heap, (p, g))
    while cost > budget and heap:
        p, g = heapq.heappop(heap)
        fresh = priority(g)
        if fresh is None:
            continue
        if fresh > p * (1 + 1e-9) + 1e-300 and heap and fresh > heap[0][0]:
            heapq.heappush(heap, (fresh, g))  # stale: neighbours changed its cost
            continue
        step[g] += 1
        current[g] = allowed[g][step[g]]
        for ti in touching[g]:
            new = term_value(ti, current)
            cost += new - values[ti]
            values[ti] = new
        nxt = priority(g)
        if nxt is not None:
            heapq.heappush(heap, (nxt, g))
    return Allocation(
        widths={g: current[g] for g in curves},
        kind=kind,
        target=float(target.value),
        reached=cost / total_full if total_full > 0 else 1.0,
        floor=floor,
        held=sorted(held),
    )
