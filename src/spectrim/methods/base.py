"""The method interface and registry.

A method turns one unit group (and, if it needs them, the group's calibration
statistics) into a :class:`GroupSolver`, which exposes an error curve for the budget
allocator and a :class:`~spectrim.graph.GroupPlan` for any kept width.  Registering a
new method touches no core file::

    >>> import numpy as np
    >>> from spectrim.methods import Method, OrderSolver, available, register_method
    >>> @register_method("first-k")
    ... class FirstK(Method):
    ...     needs_statistics = False
    ...     def solver(self, group, stats, model):
    ...         return OrderSolver(group, np.arange(group.width))
    >>> "first-k" in available()
    True

and :func:`unregister_method` takes it out again (the registry is global to the process)::

    >>> from spectrim.methods import unregister_method
    >>> unregister_method("first-k")
    >>> "first-k" in available()
    False
"""

from __future__ import annotations

import inspect
import math
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, ClassVar, TypeVar

import numpy as np
from torch import nn

from spectrim.calibration.gram import GramAccumulator
from spectrim.calibration.sketch import RowSketch
from spectrim.context import RunContext
from spectrim.graph.channels import UnitGroup
from spectrim.graph.surgery import GroupPlan
from spectrim.linalg.reconstruction import F32_RTOL, fit_cross_reconstruction, residual_of
from spectrim.linalg.selection import cross_greedy

if TYPE_CHECKING:
    from spectrim.graph.attention import AttentionBlock
    from spectrim.graph.experts import ExpertBlock
    from spectrim.graph.stream import ResidualStream
    from spectrim.methods.experts import ExpertSolver
    from spectrim.methods.heads import HeadSolver
    from spectrim.methods.stream import StreamSolver

__all__ = [
    "GroupSolver",
    "Method",
    "OrderSolver",
    "available",
    "coerce_options",
    "get_method",
    "gram_reconstruction_errors",
    "method_kinds",
    "register_method",
]


def gram_reconstruction_errors(
    grams: Mapping[str, np.ndarray], plan: GroupPlan
) -> dict[str, float]:
    """Each consumer's relative reconstruction error ``‖Z − Z_S Bᵀ‖_F / ‖Z‖_F`` from its
    Gram ``G = ZᵀZ`` and the plan's fold ``B`` (0 where the inputs are all zero): what
    the Gram-based solvers (``id``, ``spectral``) report.

    Example::

        >>> import numpy as np
        >>> z = np.random.default_rng(0).standard_normal((50, 4))
        >>> keep = np.array([0, 2])
        >>> b = np.linalg.lstsq(z[:, keep], z, rcond=None)[0].T  # (4, 2)
        >>> err = gram_reconstruction_errors({"c": z.T @ z}, GroupPlan(keep, {"c": b}))
        >>> brute = np.linalg.norm(z - z[:, keep] @ b.T) / np.linalg.norm(z)
        >>> bool(np.isclose(err["c"], brute))
        True
    """
    out = {}
    for name, g in grams.items():
        t = float(np.trace(g))
        b = plan.folds[name]
        out[name] = float(np.sqrt(residual_of(g, plan.keep, b) / t)) if t > 0 else 0.0
    return out


class GroupSolver(ABC):
    """Per-group answers a method gives the pipeline.

    ``least_squares_curve``: the error curve is the in-sample residual of unregularised
    least-squares fits on the calibration rows (as for ``id``); the pipeline then corrects
    it for the optimism of fitting on those rows
    (:func:`spectrim.linalg.prediction_error_curve`). Regularised fits (``spectral``'s ridge)
    and proxy curves (``l1``) are used as they are.
    """

    group: UnitGroup
    least_squares_curve: ClassVar[bool] = False
    #: relative Tikhonov penalty of the refits, ``τ = ridge·tr(G)/k`` (``id``'s option)
    ridge: float = 0.0

    @abstractmethod
    def error_curve(self) -> np.ndarray:
        """``e[k]`` for ``k = 0..m``: relative (squared) error when keeping ``k``
        channels, non-increasing, ``e[m] == 0``."""

    @abstractmethod
    def plan(self, k: int) -> GroupPlan:
        """Kept channels and consumer corrections for width ``k``."""

    def reconstruction_errors(self, plan: GroupPlan) -> dict[str, float]:
        """Relative reconstruction error per consumer (empty if unknown)."""
        return {}

    def reconstruction_curve(self) -> np.ndarray:
        """``e[k]``: the relative least-squares error of reconstructing the group's
        consumer inputs from the first ``k`` channels of this solver's order, the one
        scale every solver can share (a budget across kinds of units, ``heads=True``).
        The default is :meth:`error_curve` (already that for ``id``); solvers whose curve
        measures something else override it."""
        return self.error_curve()

    def width_for_dof(self, alpha: float) -> int:
        """Width from the degrees of freedom ``c·N(α·tr Σ̂)`` (``target="dof=α"``)."""
        raise ValueError(
            f"target dof={alpha:g} needs a method that measures degrees of freedom "
            f"(e.g. 'spectral'); unit group '{self.group.name}' has none"
        )

    def row_ridge(self, keep: np.ndarray) -> np.ndarray | None:
        """Ridge of the kept channels per calibration row for sequential refits (or None)."""
        return None

    def kept(self, k: int) -> np.ndarray | None:
        """The kept channels of :meth:`plan` alone, when its corrections need not be
        computed because the sequential pass refits them (:meth:`refit`); ``None``
        (default): the corrections are part of the plan, call :meth:`plan`.  For a
        4096-wide layer the folds of a plan cost two ``eigh`` of the kept block, a
        quarter of the whole compression, only to be replaced."""
        return None

    def reselect(self, gram: np.ndarray, cross: np.ndarray, k: int) -> np.ndarray:
        """``k`` kept channels (sorted) chosen in the sequential pass
        (``sequential_select=True``): ``gram`` is the group's full-width Gram in the
        compressed prefix at its first consumer, ``cross`` its cross Gram with the
        original model's channels there.  The default keeps the channels from which the
        original's are best reconstructed (:func:`~spectrim.linalg.cross_greedy`)."""
        return np.sort(cross_greedy(gram, cross, k=k).order)

    #: attributes only the selection needs (Grams, factorizations): :meth:`release`
    #: drops them
    selection_state: ClassVar[tuple[str, ...]] = ("grams",)

    def release(self) -> None:
        """Drop :attr:`selection_state` once the plans are made and the sequential pass
        refits the corrections on fresh statistics: from then on only :meth:`refit`,
        :meth:`row_ridge` and :meth:`error_curve` are called, and the m × m matrices of
        every group need not be held through that pass (a BERT-base block by block: peak
        5.9 → 5.0 GiB, ``benchmarks/scale.py --parts offload``).  With
        ``block_statistics`` the release comes before the allocation, so a solver that
        implements :meth:`kept` must answer it (and :meth:`width_for_dof`) without this
        state."""
        for name in self.selection_state:
            self.__dict__.pop(name, None)

    def refit(
        self, keep: np.ndarray, consumer: str, gram: np.ndarray, cross: np.ndarray, rows: int
    ) -> np.ndarray:
        """The correction ``B`` (``m × k``) of ``consumer`` in the sequential pass.

        ``gram``: Gram of the kept channels (sorted ``keep``) as the compressed prefix
        produces them; ``cross``: their cross Gram with the original model's channels;
        ``rows``: calibration rows behind both.  The default is the unconstrained least
        squares with the solver's ``ridge`` and :meth:`row_ridge`; a method whose
        correction has a constraint (a mask, a block structure) overrides it, so the
        sequential pass never fits the constraint away.
        """
        tau: float | np.ndarray = self.ridge * float(np.trace(gram)) / max(len(gram), 1)
        extra = self.row_ridge(keep)
        if extra is not None:
            tau = tau + np.asarray(extra, dtype=np.float64) * rows
        s = np.arange(gram.shape[0])
        return fit_cross_reconstruction(gram, cross, s, ridge=tau, rtol=F32_RTOL)


class OrderSolver(GroupSolver):
    """Keep the first ``k`` channels of a fixed priority order, no correction."""

    def __init__(
        self,
        group: UnitGroup,
        order: np.ndarray,
        weights: np.ndarray | None = None,
        curve: np.ndarray | None = None,
    ):
        self.group = group
        self.order = np.asarray(order, dtype=np.int64)
        w = np.ones(group.width) if weights is None else np.asarray(weights, dtype=np.float64)
        kept = np.concatenate([[0.0], np.cumsum(w[self.order])])
        total = kept[-1]
        self._curve = 1.0 - kept / total if total > 0 else np.zeros(group.width + 1)
        if curve is not None:
            self._curve = np.asarray(curve, dtype=np.float64)
        self._curve = np.maximum.accumulate(self._curve[::-1])[::-1]

    def error_curve(self) -> np.ndarray:
        return self._curve

    def plan(self, k: int) -> GroupPlan:
        return GroupPlan(keep=np.sort(self.order[:k]))


class Method(ABC):
    """A compression method: build one solver per unit group.

    Subclasses set ``needs_statistics`` and implement :meth:`solver`; options arrive as
    keyword arguments and must be validated in ``__init__``.
    """

    name: ClassVar[str] = ""
    #: ``"channel"`` (a solver per unit group) or ``"weight"`` (a plan per weight matrix)
    kind: ClassVar[str] = "channel"
    needs_statistics: ClassVar[bool] = True
    #: selects from randomized sketches of wide groups' activations (:meth:`sketch_solver`)
    #: when their exact Grams exceed the run's ``stats_memory``
    sketches: ClassVar[bool] = False

    def __init__(self, **options: Any) -> None:
        if options:
            raise ValueError(
                f"method '{self.name}': unknown option(s) {', '.join(sorted(options))}"
            )

    def for_run(self, ctx: RunContext) -> Method:
        """The method as the run with context ``ctx`` uses it: itself, unless it makes
        random choices and takes the run's seed (``random``)."""
        return self

    @abstractmethod
    def solver(
        self,
        group: UnitGroup,
        stats: Mapping[str, GramAccumulator],
        model: nn.Module,
    ) -> GroupSolver:
        """Solver for ``group``; ``stats`` maps consumer module name to its Gram."""

    def sketch_solver(
        self, group: UnitGroup, sketches: Mapping[str, RowSketch], model: nn.Module
    ) -> GroupSolver:
        """Solver for a group too wide for its Grams: ``sketches`` maps consumer module
        name to a randomized sketch of its inputs (:mod:`spectrim.calibration.sketch`).
        Methods that set ``sketches = True`` override it."""
        raise ValueError(
            f"method '{self.name}' needs the exact Grams of unit group '{group.name}' "
            f"({group.width} units); raise stats_memory or use method='id'"
        )

    def head_solver(
        self, block: AttentionBlock, gram: np.ndarray | None, model: nn.Module
    ) -> HeadSolver:
        """Solver over the heads of one attention layer (``target="heads=F"``); ``gram``
        is the output projection's input Gram (``None`` for a method without
        statistics).  Methods that can select heads override it."""
        raise ValueError(f"method '{self.name}' cannot select attention heads")

    def expert_solver(
        self, block: ExpertBlock, grams: list[np.ndarray | None] | None, model: nn.Module
    ) -> ExpertSolver:
        """Solver over the neurons of one MoE layer's experts (``target="experts=F"``);
        ``grams[e]`` is expert ``e``'s router-weighted hidden Gram (``None`` where the
        calibration sent it no token; ``grams`` is ``None`` for a method without
        statistics).  Methods that can select expert neurons override it."""
        raise ValueError(f"method '{self.name}' cannot select the neurons of MoE experts")

    def stream_solver(
        self, stream: ResidualStream, gram: np.ndarray | None, model: nn.Module
    ) -> StreamSolver:
        """Solver for the residual stream's new basis (``target="hidden=F"``); ``gram`` is
        the Gram of the normalised stream summed over its norms (``None`` for a method
        without statistics).  Methods that can narrow the stream override it."""
        raise ValueError(f"method '{self.name}' cannot narrow the residual stream")


_REGISTRY: dict[tuple[str, str], type[Method]] = {}
M = TypeVar("M", bound=type[Method])
KINDS = ("channel", "weight")


def register_method(name: str, kind: str = "channel") -> Callable[[M], M]:
    """Class decorator registering a :class:`Method` under ``name`` for ``kind``
    (``"channel"`` or ``"weight"``; one name may have one method of each kind, as
    ``random`` has: the target says which runs)."""
    if kind not in KINDS:
        raise ValueError(f"method kind {kind!r} must be one of {', '.join(KINDS)}")

    def deco(cls: M) -> M:
        if (name, kind) in _REGISTRY and _REGISTRY[(name, kind)] is not cls:
            raise ValueError(f"{kind} method name {name!r} is already registered")
        cls.name = name
        cls.kind = kind
        _REGISTRY[(name, kind)] = cls
        return cls

    return deco


def unregister_method(name: str, kind: str = "channel") -> None:
    """Remove the method registered under ``name`` for ``kind`` (a plug-in's or a test's:
    every later :func:`get_method`, ``compress`` and ``available`` call no longer sees it).

    Raises:
        ValueError: no ``kind`` method is registered under ``name``.
    """
    if _REGISTRY.pop((name, kind), None) is None:
        raise ValueError(f"no {kind} method named {name!r} is registered")


def method_kinds(name: str) -> list[str]:
    """The kinds registered under ``name`` (``[]`` when none)."""
    return [k for k in KINDS if (name, k) in _REGISTRY]


def get_method(name: str, kind: str | None = None, **options: Any) -> Method:
    """Instantiate a registered method by name (and kind: by default the channel method
    when the name has both), its options checked against the types of its ``__init__``
    defaults (a number for a float option, ...).

    Example::

        >>> get_method("id", ridge="abc")
        Traceback (most recent call last):
        ...
        ValueError: method 'id': option ridge='abc' must be a number (float)
    """
    kinds = method_kinds(name)
    if not kinds:
        raise ValueError(f"unknown method {name!r}; available: {', '.join(available())}")
    if kind is None:
        kind = kinds[0]
    if kind not in kinds:
        other = ", ".join(kinds)
        raise ValueError(
            f"method {name!r} is a {other} method, not a {kind} method"
            + (
                " (weight methods take target='sparsity=S', 'sparsity=n:m' or 'auto')"
                if kind == "channel"
                else " (channel methods take macs/params/width/error/dof targets)"
            )
        )
    cls = _REGISTRY[(name, kind)]
    return cls(**coerce_options(cls, options))


def _coerce(name: str, key: str, value: Any, default: Any) -> Any:
    def bad(kind: str) -> ValueError:
        return ValueError(f"method '{name}': option {key}={value!r} must be {kind}")

    if isinstance(default, bool):
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false"):
            return value.lower() == "true"
        raise bad("true or false")
    if isinstance(default, (int, float)):
        kind = "an integer (int)" if isinstance(default, int) else "a number (float)"
        if isinstance(value, bool):
            raise bad(kind)
        try:
            number = int(value) if isinstance(default, int) else float(value)
        except (TypeError, ValueError):
            raise bad(kind) from None
        if isinstance(default, int) and isinstance(value, float) and value != number:
            raise bad(kind)
        if not math.isfinite(number):
            raise bad("a finite number")
        return number
    if isinstance(default, str) and not isinstance(value, str):
        raise bad("a string")
    return value


def coerce_options(cls: type[Method], options: Mapping[str, Any]) -> dict[str, Any]:
    """``options`` converted to the types of ``cls.__init__``'s defaults; raises
    ``ValueError`` naming the method, the option and the expected type."""
    params = inspect.signature(cls.__init__).parameters
    open_ended = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    unknown = sorted(k for k in options if k not in params and not open_ended)
    if unknown:
        known = sorted(k for k in params if k != "self")
        raise ValueError(
            f"method '{cls.name}': unknown option(s) {', '.join(unknown)} "
            f"(its options: {', '.join(known) or 'none'})"
        )
    out = {}
    for key, value in options.items():
        p = params.get(key)
        if p is None or p.default is inspect.Parameter.empty or p.default is None:
            out[key] = value
        else:
            out[key] = _coerce(cls.name, key, value, p.default)
    return out


def method_pair(name: str, **options: Any) -> tuple[Method, Method]:
    """``"CHANNEL+WEIGHT"`` (e.g. ``"id+obs"``): a channel method and a weight method that
    share one budget (:func:`spectrim.compress` allocates it jointly).  Each option goes
    to the method(s) whose ``__init__`` takes it.

    Example::

        >>> channel, weight = method_pair("id+obs", ridge=1e-6, refit=True)
        >>> channel.name, weight.name, weight.refit
        ('id', 'obs', True)
        >>> method_pair("obs+id")
        Traceback (most recent call last):
        ...
        ValueError: method 'obs+id': the first method must be a channel method (available('channel')), the second a weight method (available('weight'))
    """
    parts = name.split("+")
    if len(parts) != 2 or not all(parts):
        raise ValueError(f"method {name!r}: a pair is written CHANNEL+WEIGHT, e.g. 'id+obs'")
    a, b = parts
    for part in parts:
        if not method_kinds(part):
            raise ValueError(
                f"method {name!r}: unknown method {part!r}; available: {', '.join(available())}"
            )
    if "channel" not in method_kinds(a) or "weight" not in method_kinds(b):
        raise ValueError(
            f"method {name!r}: the first method must be a channel method "
            "(available('channel')), the second a weight method (available('weight'))"
        )
    classes = (_REGISTRY[(a, "channel")], _REGISTRY[(b, "weight")])
    accepted = [set(inspect.signature(c.__init__).parameters) - {"self"} for c in classes]
    split: tuple[dict[str, Any], dict[str, Any]] = ({}, {})
    for key, value in options.items():
        sides = [i for i in (0, 1) if key in accepted[i]]
        if not sides:
            raise ValueError(
                f"method {name!r}: unknown option {key} ({a}'s options: "
                f"{', '.join(sorted(accepted[0])) or 'none'}; {b}'s options: "
                f"{', '.join(sorted(accepted[1])) or 'none'})"
            )
        for i in sides:
            split[i][key] = value
    return (
        classes[0](**coerce_options(classes[0], split[0])),
        classes[1](**coerce_options(classes[1], split[1])),
    )


def available(kind: str | None = None) -> list[str]:
    """Names of the registered methods (of one ``kind``, or all)."""
    return sorted({n for n, k in _REGISTRY if kind is None or k == kind})
