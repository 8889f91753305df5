"""``id``: interpolative-decomposition pruning (Chee, Flynn, Damle, De Sa, NeurIPS 2022).

Per unit group: one column-pivoted QR (LAPACK) of a square root of the summed
consumer-input Gram ``Σ_c Z_cᵀZ_c`` (the stacked activations of all consumers) gives
the kept set ``S`` for every width at once, and the whole error curve.  Each consumer
then gets its own least-squares interpolation ``B_c = G_c[:, S] G_c[S, S]⁺`` from its
own input statistics (for a single consumer this is exactly the ID matrix ``Tᵀ``), folded
into its weights by the surgery.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
from torch import nn

from spectrim.calibration.gram import GramAccumulator
from spectrim.calibration.sketch import RowSketch
from spectrim.graph.attention import AttentionBlock
from spectrim.graph.channels import UnitGroup
from spectrim.graph.experts import ExpertBlock
from spectrim.graph.stream import ResidualStream
from spectrim.graph.surgery import GroupPlan
from spectrim.linalg import (
    fit_reconstruction,
    fit_rows_reconstruction,
    id_factorize,
    id_from_rows,
)
from spectrim.linalg._validation import check_k
from spectrim.methods.base import GroupSolver, Method, gram_reconstruction_errors, register_method
from spectrim.methods.experts import ExpertOrder, ExpertSolver, by_norm, neuron_norms
from spectrim.methods.heads import HeadSolver, greedy_solver
from spectrim.methods.stream import StreamSolver

__all__ = ["IDMethod", "IDSolver", "SketchIDSolver"]


class IDSolver(GroupSolver):
    """Column selection and per-consumer interpolation for one group."""

    least_squares_curve = True

    selection_state = ("grams", "factorization")

    def __init__(self, group: UnitGroup, grams: Mapping[str, np.ndarray], ridge: float = 0.0):
        if not grams:
            raise ValueError(f"unit group '{group.name}' has no consumer statistics")
        self.group = group
        self.grams = dict(grams)
        self.ridge = ridge
        total = sum(self.grams.values())
        self.factorization = id_factorize(total)
        self.order = self.factorization.perm  # what kept() needs once released
        t = self.factorization.total
        res = self.factorization.residuals
        self._curve = res / t if t > 0 else np.zeros_like(res)
        self._curve = np.maximum.accumulate(self._curve[::-1])[::-1]

    def error_curve(self) -> np.ndarray:
        return self._curve

    def kept(self, k: int) -> np.ndarray:
        k = check_k(k, len(self.order))
        return np.sort(self.order[:k])

    def plan(self, k: int) -> GroupPlan:
        S = self.kept(k)
        folds = {}
        for name, G in self.grams.items():
            tau = self.ridge * float(np.trace(G)) / max(G.shape[0], 1)
            folds[name] = fit_reconstruction(G, S, ridge=tau)
        return GroupPlan(keep=S, folds=folds)

    def reconstruction_errors(self, plan: GroupPlan) -> dict[str, float]:
        return gram_reconstruction_errors(self.grams, plan)


def sketch_curve(residuals: np.ndarray, total: float, rows: int) -> np.ndarray:
    """The error curve of a randomized ID from the residuals of its ``rows``-row sketch
    (see :class:`SketchIDSolver`).

    Example::

        >>> import numpy as np
        >>> res = np.array([8.0, 4.0, 2.0, 0.0, 0.0, 0.0, 0.0])  # 6 units, a 3-row sketch
        >>> sketch_curve(res, 8.0, 3).round(3).tolist()  # judged to 2 units, then extrapolated
        [1.0, 0.75, 0.75, 0.424, 0.23, 0.098, 0.0]
    """
    m = len(residuals) - 1
    e = residuals / total if total > 0 else np.zeros(m + 1)
    last = max(0, min(int(0.8 * rows), m))  # the widest width the sketch judges
    j = np.arange(last + 1)
    curve = np.zeros(m + 1)
    curve[: last + 1] = e[: last + 1] * rows / (rows - j)
    half = last // 2
    if last < m and curve[last] > 0 and half >= 1:
        # a power law through the curve at last/2 and last, shifted to reach 0 at m
        a = max(float(np.log(curve[half] / curve[last]) / np.log(last / half)), 0.5)
        tail = np.arange(last, m + 1)
        shape = (last / tail) ** a - (last / m) ** a
        curve[last:] = curve[last] * shape / shape[0]
    elif last < m:
        curve[last:] = curve[last] * (m - np.arange(last, m + 1)) / (m - last)
    curve[m] = 0.0
    return np.maximum.accumulate(curve[::-1])[::-1]


class SketchIDSolver(GroupSolver):
    """The randomized ID of a group too wide for its Grams, from Gaussian sketches
    ``Y_c = Ω_c Z_c`` (k×m) of its consumers' inputs (:mod:`spectrim.calibration.sketch`).

    One column-pivoted QR of the stacked sketches ``[Y_1; …; Y_C]`` (``C·k`` rows, whose
    Gram estimates ``Σ_c Z_cᵀZ_c`` without bias) gives the order of the first ``0.8·C·k``
    units; after them (where the sketch's residuals are mostly noise) the units follow
    by their exact energy ``Σ z²`` (``energies``, tracked with the sketch).  Each consumer's
    correction is fitted on its own sketch (:func:`~spectrim.linalg.fit_rows_reconstruction`)
    and, in the sequential pass (the default), refitted on exact statistics of the kept
    units, which are small.

    The error curve: the pivots are chosen to fit ``r = C·k`` random mixtures of the rows,
    which they fit better than the rows themselves, like a least-squares fit of ``j``
    predictors on ``r`` rows: the sketch's residual after ``j`` pivots is multiplied by
    ``r / (r − j)`` (the expected in-sample residual of least squares with a Gaussian
    design is ``σ²(r − j)``, against ``σ²r`` for the whole population).  Measured on a
    1024-wide layer (``benchmarks/scale.py --parts sketch``) this is within 1% of the
    truth at ``j = r/4`` and 13% below it at ``j = 0.99·r``; it is used up to ``j₀ =
    0.8·r``.  Wider widths are beyond the sketch: there the curve is extrapolated by the
    power law ``e(j) ∝ j^−a`` through its values at ``j₀/2`` and ``j₀``, shifted to reach 0
    at full width (``tests/methods/test_sketch_solver.py``: within 30% of the truth up to
    ``j₀``, 50% beyond, on activations with a decaying spectrum).
    """

    least_squares_curve = True
    selection_state = ("sketches", "factorization")

    def __init__(
        self,
        group: UnitGroup,
        sketches: Mapping[str, np.ndarray],
        ridge: float = 0.0,
        energies: np.ndarray | None = None,
    ):
        if not sketches:
            raise ValueError(f"unit group '{group.name}' has no consumer statistics")
        self.group = group
        self.sketches = dict(sketches)
        self.ridge = ridge
        Y = np.vstack(list(self.sketches.values()))
        self.rows = int(Y.shape[0])
        self.factorization = fac = id_from_rows(Y)
        self._curve = sketch_curve(fac.residuals, fac.total, self.rows)
        # beyond the pivots the sketch judges, the units of most energy first: within 1-2%
        # of the exact ID's error where the sketch's own pivots lose 3-6% (1024-wide layer)
        judged = min(int(0.8 * self.rows), fac.m)
        self.order = fac.perm.copy()
        if energies is not None and judged < fac.m:
            rest = fac.perm[judged:]
            self.order[judged:] = rest[np.argsort(-np.asarray(energies)[rest], kind="stable")]

    def error_curve(self) -> np.ndarray:
        return self._curve

    def kept(self, k: int) -> np.ndarray:
        return np.sort(self.order[:k])

    def plan(self, k: int) -> GroupPlan:
        S = self.kept(k)
        folds = {}
        for name, Y in self.sketches.items():
            tau = self.ridge * float(np.sum(Y * Y)) / max(Y.shape[1], 1)
            folds[name] = fit_rows_reconstruction(Y, S, ridge=tau)[0]
        return GroupPlan(keep=S, folds=folds)

    def reconstruction_errors(self, plan: GroupPlan) -> dict[str, float]:
        out = {}
        for name, Y in self.sketches.items():
            t = float(np.sum(Y * Y))
            E = Y - Y[:, plan.keep] @ plan.folds[name].T
            out[name] = float(np.sqrt(np.sum(E * E) / t)) if t > 0 else 0.0
        return out


@register_method("id")
class IDMethod(Method):
    """Interpolative decomposition with the correction folded into every consumer.

    Options:
        ridge: relative Tikhonov penalty on the interpolation (``τ = ridge·tr(G)/m``);
            0 (default) is the exact ID.
    """

    needs_statistics = True
    sketches = True

    def __init__(self, ridge: float = 0.0, **options: Any) -> None:
        super().__init__(**options)
        if ridge < 0:
            raise ValueError(f"id: ridge={ridge} must be non-negative")
        self.ridge = float(ridge)

    def solver(
        self, group: UnitGroup, stats: Mapping[str, GramAccumulator], model: nn.Module
    ) -> GroupSolver:
        grams = {name: acc.gram_numpy() for name, acc in stats.items()}
        return IDSolver(group, grams, self.ridge)

    def sketch_solver(
        self, group: UnitGroup, sketches: Mapping[str, RowSketch], model: nn.Module
    ) -> GroupSolver:
        """The randomized ID from sketches of the consumers' inputs (:class:`SketchIDSolver`)."""
        energies = np.sum([s.energies_numpy() for s in sketches.values()], axis=0)
        return SketchIDSolver(
            group, {n: s.sketch_numpy() for n, s in sketches.items()}, self.ridge, energies
        )

    def head_solver(
        self, block: AttentionBlock, gram: np.ndarray | None, model: nn.Module
    ) -> HeadSolver:
        """Block ID: heads chosen to reconstruct all heads' outputs, correction folded."""
        if gram is None:
            raise ValueError(f"id: attention '{block.name}' has no statistics")
        tau = self.ridge * float(np.trace(gram)) / max(gram.shape[0], 1)
        return greedy_solver(block, gram, theta=1.0, ridge=tau)

    def expert_solver(
        self, block: ExpertBlock, grams: list[np.ndarray | None] | None, model: nn.Module
    ) -> ExpertSolver:
        """Per expert, the column-pivoted QR of its Gram: neurons chosen to reconstruct all
        of its hidden units, their least-squares fold into its down projection."""
        if grams is None:
            raise ValueError(f"id: experts '{block.name}' have no statistics")
        norms = neuron_norms(block, model)
        orders = []
        for e, g in enumerate(grams):
            if g is None or not np.trace(g) > 0:  # never routed to: by weight, no fold
                orders.append(by_norm(norms[e]))
                continue
            f = id_factorize(g)
            curve = f.residuals / f.total if f.total > 0 else np.zeros(block.width + 1)
            tau = self.ridge * float(np.trace(g)) / max(g.shape[0], 1)
            orders.append(ExpertOrder(f.perm, curve, g, tau))
        return ExpertSolver(block, orders)

    def stream_solver(
        self, stream: ResidualStream, gram: np.ndarray | None, model: nn.Module
    ) -> StreamSolver:
        """Coordinates by the column-pivoted QR of the normalised stream; readers refitted."""
        if gram is None:
            raise ValueError(f"id: the residual stream of '{stream.name}' has no statistics")
        order = id_factorize(gram).perm
        return StreamSolver(gram, order=order, ridge=max(self.ridge, 1e-6))
