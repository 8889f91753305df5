"""``spectral``: spectral pruning (Suzuki et al., IJCAI 2020), papers §2 and §5b.1.

Per unit group, from the streamed statistics:

* ``Σ̂ = Σ_c G_c / Σ_c n_c``, the uncentred covariance of the group's channels at its
  consumers' inputs (all consumers stacked, as for ``id``); its eigenvalues ``μ`` give the
  degrees of freedom ``N(λ) = Σ μ/(μ+λ)`` with ``λ = α·tr Σ̂`` and the ridge leverage
  scores ``ℓ_j(λ)``.
* The kept set ``J`` minimises ``θ·L_A(J) + (1 − θ)·L_B(J)`` by the exact greedy of
  :func:`spectrim.linalg.spectral_greedy`; the output-aware matrix is
  ``Σ_c Σ_taps W_cᵀW_c`` over the consumers' weights restricted to the group's input
  columns, scaled to trace ``m`` so that ``θ`` mixes two losses of the same scale.
* Every consumer gets the ridge reconstruction ``Â_J = Σ̂_c[:, J] (Σ̂_c[J, J] + I_τ)⁻¹``
  from its own statistics, folded by the same surgery as ``id`` (and refitted on the
  compressed prefix in sequential mode, with the same ``I_τ``).
* The error curve for the global ``macs``/``params`` allocation is the greedy's loss
  ``L(J_k)/L(∅)`` for every width ``k`` (one greedy run of ``m`` steps); ``target="dof=α"``
  keeps ``⌈c·N(α·tr Σ̂)⌉`` channels per group.

Options:
    theta: weight of the input-aware loss in ``[0, 1]`` (default 0.5).
    alpha: ``λ = α·tr Σ̂`` for the ridge penalty and leverage scores (default 1e-4).
    tau: ``"uniform"`` (``τ_j = λ``, default) or ``"leverage"`` (``τ_j = c·λ·ℓ_j(λ)``,
        the theory's ``λ·m♯·q_j`` with ``m♯ = c·N(λ)``), or ``"none"`` (``τ = 0``).
    c: the multiplier in ``m♯ = c·N(λ)`` (``dof`` targets and the leverage rule; default 1).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from torch import nn

from spectrim.calibration.gram import GramAccumulator
from spectrim.graph.attention import AttentionBlock
from spectrim.graph.channels import UnitGroup
from spectrim.graph.experts import ExpertBlock
from spectrim.graph.modules import module_kind
from spectrim.graph.stream import ResidualStream
from spectrim.graph.surgery import GroupPlan
from spectrim.linalg import (
    degrees_of_freedom,
    fit_reconstruction,
    gram_spectrum,
    order_residual_curve,
    ridge_leverage_scores,
    spectral_greedy,
)
from spectrim.linalg.selection import cross_greedy
from spectrim.methods.base import GroupSolver, Method, gram_reconstruction_errors, register_method
from spectrim.methods.experts import (
    ExpertOrder,
    ExpertSolver,
    by_norm,
    neuron_norms,
    output_weight_grams,
)
from spectrim.methods.heads import HeadSolver, greedy_solver, output_weight_gram
from spectrim.methods.stream import StreamSolver, pca_rotation

__all__ = ["SpectralMethod", "SpectralSolver", "consumer_weight_gram"]

_TAU_RULES = ("uniform", "leverage", "none")


def consumer_weight_gram(module: nn.Module, positions: np.ndarray) -> np.ndarray:
    """``Σ_taps W[:, cols]ᵀ W[:, cols]`` (m×m, float64) of a consumer over the group's input
    columns ``positions`` (m, r); the ``r`` repeats after a flatten and the kernel taps of a
    conv are summed (papers §5b.1: cross-tap correlations are ignored).

    Example::

        >>> lin = nn.Linear(3, 2, bias=False)
        >>> with torch.no_grad():
        ...     _ = lin.weight.copy_(torch.tensor([[1.0, 0.0, 2.0], [0.0, 1.0, 0.0]]))
        >>> consumer_weight_gram(lin, np.array([[0], [2]])).tolist()
        [[1.0, 2.0], [2.0, 4.0]]
    """
    w = getattr(module, "weight", None)
    kind = module_kind(module)
    if kind is None or kind.in_size is None or not isinstance(w, torch.Tensor) or w.dim() < 2:
        raise TypeError(f"consumer of type {type(module).__name__} has no weight matrix")
    w = w.movedim(kind.weight_dims[1], 1)
    m, r = positions.shape
    cols = w.detach().double()[:, torch.as_tensor(positions.reshape(-1))]
    cols = cols.reshape(w.shape[0], m, r, -1)  # (out, m, r, taps)
    return torch.einsum("omrt,onrt->mn", cols, cols).cpu().numpy()


class SpectralSolver(GroupSolver):
    """Greedy θ-mixed selection and ridge reconstruction for one group."""

    selection_state = ("grams", "sigma", "selection")

    def __init__(
        self,
        group: UnitGroup,
        grams: Mapping[str, np.ndarray],
        counts: Mapping[str, int],
        weights: Mapping[str, np.ndarray],
        theta: float = 0.5,
        alpha: float = 1e-4,
        tau: str = "uniform",
        c: float = 1.0,
    ):
        if not grams:
            raise ValueError(f"unit group '{group.name}' has no consumer statistics")
        self.group = group
        self.grams = dict(grams)
        self.counts = dict(counts)
        m = group.width
        n = max(sum(self.counts.values()), 1)
        self.sigma = sum(self.grams.values()) / n
        trace = self.trace = float(np.trace(self.sigma))
        self.lam = alpha * trace
        self.alpha, self.c, self.tau_rule = alpha, c, tau
        self.eigvals = gram_spectrum(self.sigma)
        if tau == "leverage" and self.lam > 0:
            self.tau = c * self.lam * ridge_leverage_scores(self.sigma, self.lam)
        elif tau == "uniform":
            self.tau = np.full(m, self.lam)
        else:
            self.tau = np.zeros(m)
        out_w: np.ndarray | None = None
        if weights:
            total_w = np.sum(list(weights.values()), axis=0)
            if float(np.trace(total_w)) > 0:
                out_w = total_w * (m / float(np.trace(total_w)))
        if out_w is None and theta < 1.0:
            raise ValueError(f"unit group '{group.name}': consumers have all-zero weights")
        # the loss's weighting M = θ·I + (1 − θ)·W, for the selection in the sequential pass
        self.mix = (
            None if theta >= 1.0 or out_w is None else theta * np.eye(m) + (1 - theta) * out_w
        )
        self.selection = spectral_greedy(
            self.sigma, theta=theta, weight=out_w if theta < 1.0 else None, tau=self.tau
        )
        self.order = self.selection.order  # what kept() needs once released
        losses = self.selection.losses
        curve = losses / losses[0] if losses[0] > 0 else np.zeros_like(losses)
        curve[-1] = 0.0  # keeping every channel changes nothing (no fold, no ridge)
        self._curve = np.maximum.accumulate(np.maximum(curve, 0.0)[::-1])[::-1]

    def error_curve(self) -> np.ndarray:
        return self._curve

    def degrees_of_freedom(self, alpha: float | None = None) -> float:
        """``N(λ)`` with ``λ = α·tr Σ̂`` (this solver's ``alpha`` by default)."""
        lam = self.lam if alpha is None else alpha * self.trace
        return float(degrees_of_freedom(self.eigvals, lam))

    def width_for_dof(self, alpha: float) -> int:
        """``⌈c·N(α·tr Σ̂)⌉``, clipped to ``[1, m]``."""
        return min(
            max(math.ceil(self.c * self.degrees_of_freedom(alpha) - 1e-9), 1), self.group.width
        )

    def reselect(self, gram: np.ndarray, cross: np.ndarray, k: int) -> np.ndarray:
        """The sequential pass's selection under this solver's θ-mixed loss: the kept
        set's residual of the original channels weighted by ``θ·I + (1 − θ)·W``."""
        return np.sort(cross_greedy(gram, cross, k=k, weight=self.mix).order)

    def row_ridge(self, keep: np.ndarray) -> np.ndarray:
        """``τ`` of the kept channels, per calibration row (multiply by a row count)."""
        return self.tau[np.asarray(keep, dtype=np.int64)]

    def kept(self, k: int) -> np.ndarray:
        if not 0 <= k <= len(self.order):
            raise ValueError(f"k={k} must be in [0, {len(self.order)}]")
        return np.sort(self.order[:k])

    def plan(self, k: int) -> GroupPlan:
        J = self.kept(k)
        folds = {}
        for name, G in self.grams.items():
            ridge = self.tau[J] * self.counts[name]
            folds[name] = fit_reconstruction(G, J, ridge=ridge)
        return GroupPlan(keep=J, folds=folds)

    def reconstruction_curve(self) -> np.ndarray:
        """The least-squares error along the greedy's order (its own curve is the θ-mixed
        ridge loss, with a ridge floor: another scale)."""
        return order_residual_curve(sum(self.grams.values()), self.order)

    def reconstruction_errors(self, plan: GroupPlan) -> dict[str, float]:
        return gram_reconstruction_errors(self.grams, plan)


@register_method("spectral")
class SpectralMethod(Method):
    """Spectral pruning: degrees of freedom, θ-mixed greedy selection, ridge folds.

    Example::

        >>> import torch, torch.nn as nn, spectrim
        >>> net = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 3))
        >>> small, _ = spectrim.compress(
        ...     net, torch.randn(256, 8), method="spectral", target="width=0.5", theta=1.0
        ... )
        >>> small[0].out_features
        16
    """

    needs_statistics = True

    def __init__(
        self,
        theta: float = 0.5,
        alpha: float = 1e-4,
        tau: str = "uniform",
        c: float = 1.0,
        **options: Any,
    ) -> None:
        super().__init__(**options)
        if not 0.0 <= float(theta) <= 1.0:
            raise ValueError(f"spectral: theta={theta} must be in [0, 1]")
        if not float(alpha) >= 0.0 or not math.isfinite(float(alpha)):
            raise ValueError(f"spectral: alpha={alpha} must be a non-negative number")
        if tau not in _TAU_RULES:
            raise ValueError(f"spectral: tau={tau!r} must be one of {', '.join(_TAU_RULES)}")
        if not float(c) > 0.0:
            raise ValueError(f"spectral: c={c} must be positive")
        self.theta, self.alpha, self.tau, self.c = float(theta), float(alpha), tau, float(c)

    def solver(
        self, group: UnitGroup, stats: Mapping[str, GramAccumulator], model: nn.Module
    ) -> GroupSolver:
        modules = dict(model.named_modules())
        grams = {name: acc.gram_numpy() for name, acc in stats.items()}
        counts = {name: acc.count for name, acc in stats.items()}
        weights = {}
        if self.theta < 1.0:
            for slot in group.consumers:
                if slot.module in grams:
                    weights[slot.module] = consumer_weight_gram(
                        modules[slot.module], slot.positions
                    )
        return SpectralSolver(
            group, grams, counts, weights, self.theta, self.alpha, self.tau, self.c
        )

    def head_solver(
        self, block: AttentionBlock, gram: np.ndarray | None, model: nn.Module
    ) -> HeadSolver:
        """θ-mixed block greedy (output-aware part: ``W_oᵀW_o``), ridge ``α·tr G`` fold
        (none with ``tau="none"``; the ``leverage`` rule is per unit, so heads use uniform)."""
        if gram is None:
            raise ValueError(f"spectral: attention '{block.name}' has no statistics")
        weight = output_weight_gram(block, model) if self.theta < 1.0 else None
        ridge = 0.0 if self.tau == "none" else self.alpha * float(np.trace(gram))
        return greedy_solver(block, gram, theta=self.theta, weight=weight, ridge=ridge)

    def expert_solver(
        self, block: ExpertBlock, grams: list[np.ndarray | None] | None, model: nn.Module
    ) -> ExpertSolver:
        """Per expert, the θ-mixed greedy on its Gram (output-aware part: its ``downᵀdown``)
        and its ridge ``α·tr G`` fold (none with ``tau="none"``)."""
        if grams is None:
            raise ValueError(f"spectral: experts '{block.name}' have no statistics")
        norms = neuron_norms(block, model)
        weights = output_weight_grams(block, model) if self.theta < 1.0 else None
        orders = []
        for e, g in enumerate(grams):
            if g is None or not np.trace(g) > 0:  # never routed to: by weight, no fold
                orders.append(by_norm(norms[e]))
                continue
            ridge = 0.0 if self.tau == "none" else self.alpha * float(np.trace(g))
            sel = spectral_greedy(
                g, theta=self.theta, weight=None if weights is None else weights[e], tau=ridge
            )
            losses = sel.losses
            curve = losses / losses[0] if losses[0] > 0 else np.zeros_like(losses)
            orders.append(ExpertOrder(sel.order, curve, g, ridge))
        return ExpertSolver(block, orders)

    def stream_solver(
        self, stream: ResidualStream, gram: np.ndarray | None, model: nn.Module
    ) -> StreamSolver:
        """Pre-LN: the PCA of the normalised stream (SliceGPT's rotation); post-LN (whose
        norms do not commute with rotations): the spectral greedy selection with its
        ridge ``α·tr Σ``.  Readers refitted either way."""
        if gram is None:
            raise ValueError(f"spectral: the residual stream of '{stream.name}' has no statistics")
        ridge = max(self.alpha, 1e-6) if self.tau != "none" else 1e-6
        if stream.kind == "pre":
            return StreamSolver(gram, rotation=pca_rotation(gram), ridge=ridge)
        tau = 0.0 if self.tau == "none" else self.alpha * float(np.trace(gram))
        order = spectral_greedy(gram, theta=1.0, tau=tau).order
        return StreamSolver(gram, order=order, ridge=ridge)
