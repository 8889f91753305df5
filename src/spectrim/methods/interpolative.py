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
from spectrim.graph.attention import AttentionBlock
from spectrim.graph.channels import UnitGroup
from spectrim.graph.stream import ResidualStream
from spectrim.graph.surgery import GroupPlan
from spectrim.linalg import fit_reconstruction, id_factorize, residual_of
from spectrim.methods.base import GroupSolver, Method, register_method
from spectrim.methods.heads import HeadSolver, greedy_solver
from spectrim.methods.stream import StreamSolver

__all__ = ["IDMethod", "IDSolver"]


class IDSolver(GroupSolver):
    """Column selection and per-consumer interpolation for one group."""

    least_squares_curve = True

    def __init__(self, group: UnitGroup, grams: Mapping[str, np.ndarray], ridge: float = 0.0):
        if not grams:
            raise ValueError(f"unit group '{group.name}' has no consumer statistics")
        self.group = group
        self.grams = dict(grams)
        self.ridge = ridge
        total = sum(self.grams.values())
        self.factorization = id_factorize(total)
        t = self.factorization.total
        res = self.factorization.residuals
        self._curve = res / t if t > 0 else np.zeros_like(res)
        self._curve = np.maximum.accumulate(self._curve[::-1])[::-1]

    def error_curve(self) -> np.ndarray:
        return self._curve

    def plan(self, k: int) -> GroupPlan:
        S = np.sort(self.factorization.selected(k))
        folds = {}
        for name, G in self.grams.items():
            tau = self.ridge * float(np.trace(G)) / max(G.shape[0], 1)
            folds[name] = fit_reconstruction(G, S, ridge=tau)
        return GroupPlan(keep=S, folds=folds)

    def reconstruction_errors(self, plan: GroupPlan) -> dict[str, float]:
        out = {}
        for name, G in self.grams.items():
            t = float(np.trace(G))
            b = plan.folds[name]
            out[name] = float(np.sqrt(residual_of(G, plan.keep, b) / t)) if t > 0 else 0.0
        return out


@register_method("id")
class IDMethod(Method):
    """Interpolative decomposition with the correction folded into every consumer.

    Options:
        ridge: relative Tikhonov penalty on the interpolation (``τ = ridge·tr(G)/m``);
            0 (default) is the exact ID.
    """

    needs_statistics = True

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

    def head_solver(
        self, block: AttentionBlock, gram: np.ndarray | None, model: nn.Module
    ) -> HeadSolver:
        """Block ID: heads chosen to reconstruct all heads' outputs, correction folded."""
        if gram is None:
            raise ValueError(f"id: attention '{block.name}' has no statistics")
        tau = self.ridge * float(np.trace(gram)) / max(gram.shape[0], 1)
        return greedy_solver(block, gram, theta=1.0, ridge=tau)

    def stream_solver(
        self, stream: ResidualStream, gram: np.ndarray | None, model: nn.Module
    ) -> StreamSolver:
        """Coordinates by the column-pivoted QR of the normalised stream; readers refitted."""
        if gram is None:
            raise ValueError(f"id: the residual stream of '{stream.name}' has no statistics")
        order = id_factorize(gram).perm
        return StreamSolver(gram, order=order, ridge=max(self.ridge, 1e-6))
