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

The same greedy (:func:`greedy_allocate`) also takes weight matrices as units: a matrix's
states are the densities of its error curve's convex hull, and its density scales the cost
terms of its weight (its MACs, its parameters, its non-zeros), so one budget spans channel
widths and weight sparsity (``method="id+obs"``, :mod:`spectrim._joint`).

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
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
from torch import nn

from spectrim.budget.densities import convex_steps
from spectrim.config import Target
from spectrim.graph.channels import Analysis

__all__ = [
    "Allocation",
    "CostModel",
    "JointAllocation",
    "allocate",
    "allocate_budget",
    "greedy_allocate",
    "joint_cost",
    "matrix_states",
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


def _scaled(
    base: float, axes: list[_Axis], widths: Mapping[int, int], full: Mapping[int, int]
) -> float:
    """A term's cost at ``widths``: ``base`` times each axis's kept share."""
    f = base
    for ax in axes:
        removed = sum(r * (full[g] - widths.get(g, full[g])) for g, r in ax.per_class.items())
        f *= (ax.length - removed) / ax.length
    return f


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
        #: what the terms of :meth:`add_term` count at full width that the model lacks
        self.full_excess: dict[str, float] = {"macs": 0.0, "params": 0.0}
        #: per module with a channel axis, the axes that shrink it (for latency terms)
        self.module_axes: dict[str, list[_Axis]] = {}
        #: seconds per module (see :meth:`set_latency`) and the time no module explains
        self.latency_terms: list[tuple[float, list[_Axis]]] = []
        self.other_latency = 0.0

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
        # per term, the module whose weight matrix it counts (a weight plan's density
        # scales it: the module's MACs, its ``weight``), else ``None``
        self.mac_owners: list[str | None] = []
        self.param_owners: list[str | None] = []
        self.param_names: list[str] = []  # per parameter term, the parameter's full name
        seen_params: set[int] = set()
        modules = dict(model.named_modules())
        for name, mod in modules.items():
            axes_in = analysis.in_labels.get(name)
            axes_out = analysis.out_labels.get(name)
            axes_chan = analysis.chan_labels.get(name)
            mod_axes = [axis(a) for a in (axes_in, axes_out, axes_chan) if a is not None]
            if mod_axes and not any(True for _ in mod.children()):
                self.module_axes[name] = mod_axes
            if name in module_macs:
                self.mac_terms.append((float(module_macs[name]), mod_axes))
                self.mac_owners.append(name)
            for pname, p in mod.named_parameters(recurse=False):
                if id(p) in seen_params:
                    continue
                seen_params.add(id(p))
                full = f"{name}.{pname}" if name else pname
                self.param_owners.append(name if pname == "weight" and p.dim() >= 2 else None)
                self.param_names.append(full)
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
            total += _scaled(base, axes, widths, full)
        return total

    def add_term(self, key: int, macs: float, params: float, per_unit: int = 1) -> None:
        """A cost the model has only once ``key`` (added with :meth:`add_unit_axes`) is
        narrowed, linear in its units: ``macs`` and ``params`` at full width, less
        ``per_unit`` of the width per unit removed (the expansion a narrowed post-LN
        stream's output gains).  It is counted at every width, and the allocator's budget is
        taken from the real full cost (:attr:`full_excess` removed), so a model whose
        ``key`` stays whole lands below the target, never above it."""
        ax = _Axis(self.widths[key], {key: per_unit})
        self.full_excess["macs"] += float(macs)
        self.full_excess["params"] += float(params)
        if macs:
            self.mac_terms.append((float(macs), [ax]))
            self.mac_owners.append(None)
        if params:
            self.param_terms.append((float(params), [ax]))
            self.param_owners.append(None)
            self.param_names.append(f"<unit {key}>")

    def add_unit_axes(self, key: int, units: int, axes: Mapping[str, tuple[str, int, int]]) -> None:
        """Units other than channels that shrink module costs: ``key`` (an index no channel
        group uses) has ``units`` units, and ``axes[module] = (which, length, per_unit)``
        says that ``module`` loses ``per_unit`` of ``length`` along one axis per unit
        removed: ``"out"`` (its MACs, its weight and bias), ``"in"`` (its MACs and weight)
        or ``"ops"`` (its MACs only: e.g. the attention products a layer computes).
        Attention heads enter the budget this way (:mod:`spectrim._prune`).  A module
        without a ``weight`` (a MoE layer's experts: ``gate_up_proj``, ``down_proj``) loses
        the same share of every parameter it holds."""
        if key in self.widths:
            raise ValueError(f"unit key {key} is already a group of the cost model")
        self.widths[key] = units
        weighted = {n.rpartition(".")[0] for n in self.param_names if n.endswith(".weight")}
        for module, (which, length, per_unit) in axes.items():
            ax = _Axis(length, {key: per_unit})
            for i, owner in enumerate(self.mac_owners):
                if owner == module:
                    self.mac_terms[i][1].append(ax)
            if which == "ops":
                continue
            for i, full in enumerate(self.param_names):
                mod, _, pname = full.rpartition(".")
                shrinks = (
                    pname == "weight"
                    or (which == "out" and pname == "bias")
                    or module not in weighted
                )
                if mod == module and shrinks:
                    self.param_terms[i][1].append(ax)

    def set_latency(self, seconds: Mapping[str, float], total: float) -> None:
        """Measured seconds per leaf module and of the whole forward pass, for ``latency``
        costs: each module's time shrinks with its channel axes as its MACs do (a
        convolution at half its input and half its output channels: a quarter), the
        time of modules without channels and of functional ops stays constant."""
        self.latency_terms = [
            (float(t), list(self.module_axes[name]))
            for name, t in seconds.items()
            if name in self.module_axes
        ]
        self.other_latency = max(float(total) - sum(t for t, _ in self.latency_terms), 0.0)

    def terms_of(self, kind: str) -> list[tuple[float, list[_Axis]]]:
        if kind == "latency":
            return self.latency_terms
        return self.mac_terms if kind == "macs" else self.param_terms

    def owners_of(self, kind: str) -> list[str | None]:
        """Per term of :meth:`terms_of`, the module whose weight matrix it counts."""
        if kind == "latency":
            return [None] * len(self.latency_terms)
        return self.mac_owners if kind == "macs" else self.param_owners

    def macs(self, widths: Mapping[int, int]) -> float:
        return self._eval(self.mac_terms, widths, self.widths) + self.other_macs

    def params(self, widths: Mapping[int, int]) -> float:
        return self._eval(self.param_terms, widths, self.widths)

    def latency(self, widths: Mapping[int, int]) -> float:
        """Modelled seconds per forward pass at ``widths`` (after :meth:`set_latency`)."""
        return self._eval(self.latency_terms, widths, self.widths) + self.other_latency

    def cost(self, kind: str, widths: Mapping[int, int]) -> float:
        if kind == "latency":
            return self.latency(widths)
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
    unit_groups: Collection[int] = (),
    group_steps: Mapping[int, int] | None = None,
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
    res = greedy_allocate(
        target.kind,
        float(target.value),
        cost_model,
        curves,
        {},
        round_to=round_to,
        min_width=min_width,
        max_error=max_error,
        unit_groups=unit_groups,
        group_steps=group_steps,
    )
    return Allocation(
        widths=res.widths,
        kind=res.kind,
        target=res.target,
        reached=res.reached,
        floor=res.floor,
        held=[g for g in res.held if isinstance(g, int)],
    )


@dataclass
class JointAllocation:
    """Widths of channel groups and densities of weight matrices for one budget.

    Attributes:
        widths: group index -> kept width.
        densities: matrix (module name) -> kept share of its weights, in ``(0, 1]``.
        kind: ``"macs"`` (a sparse matrix's MACs count its non-zeros), ``"params"``
            (non-zero parameters) or ``"nonzeros"`` (non-zeros of the weight matrices).
        target: the fraction of the full cost asked for.
        reached: the modelled fraction at ``widths`` and ``densities``.
        floor: the modelled fraction with every unit at its smallest state.
        held: units ``max_error`` stopped (group indices, matrix names).
    """

    widths: dict[int, int]
    densities: dict[str, float]
    kind: str
    target: float
    reached: float
    floor: float
    held: list[int | str]

    @property
    def reachable(self) -> bool:
        return self.floor <= self.target * (1 + 1e-9)


def matrix_states(densities: np.ndarray, errors: np.ndarray) -> tuple[list[float], list[float]]:
    """A weight matrix's states for the greedy: the vertices of the lower convex hull of
    its error curve (densities descending from 1, errors at them), so each next step
    costs no less error per weight removed than the one before.

    Example::

        >>> matrix_states(np.array([1.0, 0.5, 0.25]), np.array([0.0, 0.4, 0.5]))
        ([1.0, 0.25], [0.0, 0.5])
    """
    steps = convex_steps(densities, errors)
    d = [steps[0][0]] + [s[1] for s in steps]
    e_of = dict(
        zip(
            np.asarray(densities, dtype=float).tolist(),
            np.maximum.accumulate(np.asarray(errors, dtype=float)).tolist(),
            strict=True,
        )
    )
    return d, [e_of[x] for x in d]


def _joint_terms(
    cost_model: CostModel, kind: str, matrices: Collection[str]
) -> tuple[list[tuple[float, list[_Axis]]], list[str | None], float]:
    """``(terms, owners, constant)`` of a cost ``kind``; an owner is the module whose
    weight-matrix density scales the term (only for the modules in ``matrices``)."""
    if kind == "nonzeros":
        owners_all = getattr(cost_model, "param_owners", [])
        pick = [i for i, o in enumerate(owners_all) if o in matrices]
        return [cost_model.param_terms[i] for i in pick], [owners_all[i] for i in pick], 0.0
    if kind not in ("macs", "params", "latency"):
        raise ValueError(f"cost kind {kind!r} must be 'macs', 'params', 'latency' or 'nonzeros'")
    terms = cost_model.terms_of(kind)
    owners: list[str | None] = list(cost_model.owners_of(kind)) if matrices else [None] * len(terms)
    extra = {"macs": "other_macs", "latency": "other_latency"}.get(kind)
    return terms, owners, float(getattr(cost_model, extra)) if extra else 0.0


def _term_value(
    term: tuple[float, list[_Axis]],
    owner: str | None,
    full: Mapping[int, int],
    widths: Mapping[int, int],
    dens: Mapping[str, float],
) -> float:
    base, axes = term
    f = _scaled(base, axes, widths, full)
    if owner is not None and owner in dens:
        f *= dens[owner]
    return f


def joint_cost(
    cost_model: CostModel,
    kind: str,
    widths: Mapping[int, int],
    densities: Mapping[str, float],
) -> float:
    """The cost the joint greedy models at ``widths`` and ``densities``: ``"macs"`` (a
    matrix's MACs times its density), ``"params"`` (its weight times its density) or
    ``"nonzeros"`` (the weights of the matrices in ``densities`` only)."""
    terms, owners, extra = _joint_terms(cost_model, kind, list(densities))
    full = dict(cost_model.widths)
    return (
        sum(_term_value(t, o, full, widths, densities) for t, o in zip(terms, owners, strict=True))
        + extra
    )


def greedy_allocate(
    kind: str,
    fraction: float,
    cost_model: CostModel,
    curves: Mapping[int, np.ndarray],
    matrix_curves: Mapping[str, tuple[np.ndarray, np.ndarray]],
    *,
    round_to: int = 1,
    min_width: int = 1,
    max_error: float | None = None,
    unit_groups: Collection[int] = (),
    group_steps: Mapping[int, int] | None = None,
) -> JointAllocation:
    """One lazy greedy over channel groups and weight matrices (see the module docstring).

    Groups in ``unit_groups`` (attention heads: units that are not channels) step one
    unit at a time and keep at least one, whatever ``round_to`` / ``min_width`` say.
    A group in ``group_steps`` keeps a multiple of ``lcm(round_to, step)`` (or its whole
    width): a width its modules need (a MoE model's residual stream, read by kernels
    that want rows of 16 bytes).

    Every unit has states of decreasing size: a group its allowed widths (error curve
    ``curves[g][k]``), a matrix the convex-hull densities of its curve
    ``matrix_curves[name] = (densities, errors)`` (:func:`matrix_states`).  Each cost term
    of ``cost_model`` is its base times the kept fraction of each of its channel axes and,
    when it counts the weight matrix of a module in ``matrix_curves``, that matrix's
    density.  The greedy takes the step with the least error per cost removed until the
    cost is at or below ``fraction`` of the full cost; a matrix's last step stops part-way,
    so a budget a matrix step can meet is met exactly.  ``kind`` is ``"macs"``,
    ``"params"`` or ``"nonzeros"`` (the ``weight`` terms of the matrices in
    ``matrix_curves`` only).  With no matrices this is the channel allocator, step for
    step.
    """
    full_w = dict(cost_model.widths)
    terms, owners, extra = _joint_terms(cost_model, kind, matrix_curves)
    current = dict(full_w)
    dens: dict[str, float] = {}
    # units: (tie-break key, states, errors); groups first, in the order of ``curves``
    keys: list[tuple[int, Any]] = [(0, g) for g in curves]
    states: dict[tuple[int, Any], list[float]] = {}
    errors: dict[tuple[int, Any], list[float]] = {}
    for g, e in curves.items():
        quantum = math.lcm(round_to, int((group_steps or {}).get(g, 1)))
        ks = (
            _allowed(len(e) - 1, 1, 1)
            if g in unit_groups
            else _allowed(len(e) - 1, quantum, min_width)
        )
        states[(0, g)] = [float(k) for k in ks]
        errors[(0, g)] = [float(e[k]) for k in ks]
    for n, (d, e) in matrix_curves.items():
        key = (1, n)
        keys.append(key)
        states[key], errors[key] = matrix_states(d, e)
        dens[n] = 1.0
    touching: dict[tuple[int, Any], list[int]] = {k: [] for k in keys}
    for ti, (_, axes) in enumerate(terms):
        for g in {g for ax in axes for g in ax.per_class}:
            if (0, g) in touching:
                touching[(0, g)].append(ti)
        o = owners[ti]
        if o is not None and (1, o) in touching:
            touching[(1, o)].append(ti)

    def term_value(ti: int, widths: Mapping[int, int], dens: Mapping[str, float]) -> float:
        return _term_value(terms[ti], owners[ti], full_w, widths, dens)

    values = [term_value(ti, current, dens) for ti in range(len(terms))]
    total_full = sum(values) + extra
    cost = total_full
    # the model's real full cost: terms that exist only once a unit is narrowed removed
    total_full -= getattr(cost_model, "full_excess", {}).get(kind, 0.0)
    budget = fraction * total_full
    smallest_w = {**full_w, **{g: int(states[(0, g)][-1]) for g in curves}}
    smallest_d = {n: states[(1, n)][-1] for n in matrix_curves}
    floor_cost = sum(term_value(ti, smallest_w, smallest_d) for ti in range(len(terms))) + extra
    floor = floor_cost / total_full if total_full > 0 else 1.0
    bound = None
    if max_error is not None and floor > fraction * (1 + 1e-9):
        bound = float(max_error) ** 2  # unreachable: stop where errors are still sane
    step = dict.fromkeys(keys, 0)  # index into states[key] of the current state
    held: set[tuple[int, Any]] = set()

    def trial(key: tuple[int, Any], size: float) -> tuple[dict[int, int], dict[str, float]]:
        if key[0] == 0:
            return {**current, key[1]: int(size)}, dens
        return current, {**dens, key[1]: size}

    def delta(key: tuple[int, Any], size: float) -> float:
        w, d = trial(key, size)
        return sum(values[ti] - term_value(ti, w, d) for ti in touching[key])

    def priority(key: tuple[int, Any]) -> float | None:
        i = step[key]
        if i + 1 >= len(states[key]):
            return None
        e0, e1 = errors[key][i], errors[key][i + 1]
        if bound is not None and e1 > bound:
            held.add(key)
            return None
        d_cost = delta(key, states[key][i + 1])
        if d_cost <= 0:
            return math.inf
        return max(e1 - e0, 0.0) / d_cost

    def take(key: tuple[int, Any], size: float) -> None:
        nonlocal cost
        if key[0] == 0:
            current[key[1]] = int(size)
        else:
            dens[key[1]] = size
        for ti in touching[key]:
            new = term_value(ti, current, dens)
            cost += new - values[ti]
            values[ti] = new

    heap: list[tuple[float, tuple[int, Any]]] = []
    for key in keys:
        p = priority(key)
        if p is not None:
            heapq.heappush(heap, (p, key))
    while cost > budget and heap:
        p, key = heapq.heappop(heap)
        fresh = priority(key)
        if fresh is None:
            continue
        if fresh > p * (1 + 1e-9) + 1e-300 and heap and fresh > heap[0][0]:
            heapq.heappush(heap, (fresh, key))  # stale: neighbours changed its cost
            continue
        nxt_size = states[key][step[key] + 1]
        if key[0] == 1:
            saved = delta(key, nxt_size)
            if saved > cost - budget:  # cost is linear in a density: stop part-way
                d0 = dens[key[1]]
                take(key, d0 - (d0 - nxt_size) * (cost - budget) / saved)
                break
        step[key] += 1
        take(key, nxt_size)
        nxt = priority(key)
        if nxt is not None:
            heapq.heappush(heap, (nxt, key))
    return JointAllocation(
        widths={g: current[g] for g in curves},
        densities=dict(dens),
        kind=kind,
        target=float(fraction),
        reached=cost / total_full if total_full > 0 else 1.0,
        floor=floor,
        held=sorted((k[1] for k in held), key=lambda x: (isinstance(x, str), str(x))),
    )
