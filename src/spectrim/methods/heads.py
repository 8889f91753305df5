"""Attention heads: one solver per attention layer, over its units (heads or KV groups).

Heads are selected where their outputs meet: the input of the output projection, whose
Gram ``G = ZᵀZ`` (``Z``: the concatenated per-head outputs of the calibration tokens, padded
positions left out) splits into one ``d``-column block per head.

* ``id``: block greedy selection reconstructing ``Z`` itself
  (:func:`spectrim.linalg.block_greedy` with ``θ = 1``, the block analogue of the column
  pivoting of an interpolative decomposition), then the least-squares correction
  ``B = G[:, S] G[S, S]⁺`` folded into the output projection (``W_o ← W_o B``).
* ``spectral``: the same greedy with the θ-mixed loss, the output-aware part weighted by
  the output projection ``W_oᵀW_o``, and its ridge fit.
* ``l1`` / ``l2``: heads of largest weight norm (all their q, k, v rows and output
  projection columns), no correction (Torch-Pruning's head magnitude).
* ``random``: seeded random heads, no correction.

Each method provides its solver through :meth:`spectrim.methods.Method.head_solver`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from spectrim.graph.attention import AttentionBlock
from spectrim.graph.modules import module_kind
from spectrim.linalg import (
    block_greedy,
    fit_cross_reconstruction,
    fit_reconstruction,
    order_residual_curve,
)
from spectrim.linalg.reconstruction import F32_RTOL

__all__ = ["HeadPlan", "HeadSolver", "head_norms", "output_weight_gram"]


@dataclass(frozen=True)
class HeadPlan:
    """Kept units (sorted) and the correction ``B`` (``n × k`` columns) or ``None``."""

    keep: np.ndarray
    fold: np.ndarray | None


class HeadSolver:
    """Units in order of preference, an error curve, and the correction of a kept set.

    Args:
        block: the attention layer.
        order: all units, most valuable first.
        curve: ``curve[k]``, the relative (squared) error keeping the first ``k`` units
            (length ``units + 1``, ``curve[units] = 0``); default: an "average unit" curve
            ``(1 − k/U)²``.
        gram: the output projection's input Gram (needed for a correction).
        ridge: the correction's Tikhonov penalty, in the units of ``gram``.
        correct: fold a least-squares correction into the output projection.
    """

    def __init__(
        self,
        block: AttentionBlock,
        order: np.ndarray,
        curve: np.ndarray | None = None,
        gram: np.ndarray | None = None,
        ridge: float = 0.0,
        correct: bool = True,
    ) -> None:
        self.block = block
        self.order = np.asarray(order, dtype=np.int64)
        u = block.units
        if sorted(self.order.tolist()) != list(range(u)):
            raise ValueError(f"attention '{block.name}': order must list each of {u} units once")
        c = (1.0 - np.arange(u + 1) / u) ** 2 if curve is None else np.asarray(curve, float)
        self._curve = np.maximum.accumulate(np.maximum(c, 0.0)[::-1])[::-1]
        self._curve[-1] = 0.0
        self.gram = gram
        self.ridge = float(ridge)
        self.correct = bool(correct) and gram is not None

    def error_curve(self) -> np.ndarray:
        """``e[k]`` for ``k = 0..units``, non-increasing, ``e[units] = 0``."""
        return self._curve

    def reconstruction_curve(self) -> np.ndarray:
        """The relative least-squares error of reconstructing all heads' outputs from the
        first ``k`` units of the order (the scale channel groups share under
        ``heads=True``); the error curve without statistics."""
        if self.gram is None:
            return self._curve
        cols = np.concatenate([self.block.columns([u]) for u in self.order])
        per = len(cols) // self.block.units
        return order_residual_curve(self.gram, cols)[::per]

    def plan(self, k: int) -> HeadPlan:
        """The first ``k`` units and, for a correcting method, their least-squares fold."""
        if not 1 <= k <= self.block.units:
            raise ValueError(f"attention '{self.block.name}': k={k} not in [1, {self.block.units}]")
        keep = np.sort(self.order[:k])
        if not self.correct or k == self.block.units:
            return HeadPlan(keep, None)
        assert self.gram is not None
        cols = self.block.columns(keep)
        return HeadPlan(keep, fit_reconstruction(self.gram, cols, ridge=self.ridge))

    def refit(self, keep: np.ndarray, gram: np.ndarray, cross: np.ndarray) -> np.ndarray | None:
        """The fold for ``keep`` from the compressed prefix: ``gram = Z'ᵀZ'`` and
        ``cross = Z'ᵀZ`` at the output projection's input (all columns), ``Z`` the original
        model's.  ``None`` for a method without a correction."""
        if not self.correct:
            return None
        cols = self.block.columns(keep)
        assert self.gram is not None
        tau = self.ridge * float(np.trace(gram)) / max(float(np.trace(self.gram)), 1e-300)
        return fit_cross_reconstruction(gram, cross, cols, ridge=tau, rtol=F32_RTOL)


def greedy_solver(
    block: AttentionBlock,
    gram: np.ndarray,
    *,
    theta: float = 1.0,
    weight: np.ndarray | None = None,
    ridge: float = 0.0,
) -> HeadSolver:
    """:class:`HeadSolver` from the block greedy on ``gram`` (relative loss curve)."""
    sel = block_greedy(gram, block.unit_columns(), theta=theta, weight=weight)
    losses = sel.losses
    curve = losses / losses[0] if losses[0] > 0 else np.zeros_like(losses)
    return HeadSolver(block, sel.order, curve, gram=gram, ridge=ridge)


def _out_matrix(block: AttentionBlock, model: nn.Module) -> torch.Tensor:
    mod = dict(model.named_modules())[block.out]
    kind = module_kind(mod)
    assert kind is not None
    return mod.weight.detach().double().movedim(kind.weight_dims[1], 1)  # (out, in)


def output_weight_gram(block: AttentionBlock, model: nn.Module) -> np.ndarray:
    """``W_oᵀW_o`` of the output projection (``n × n``), scaled to trace ``n``."""
    w = _out_matrix(block, model)
    m = (w.T @ w).cpu().numpy()
    t = float(np.trace(m))
    return m * (m.shape[0] / t) if t > 0 else m


def head_norms(block: AttentionBlock, model: nn.Module, p: float) -> np.ndarray:
    """Per unit: the ``p``-norm of all its weights (q, k, v rows, output projection columns)."""
    modules = dict(model.named_modules())
    out = _out_matrix(block, model)
    weights = []
    for proj in block.projections:
        mod = modules[proj.module]
        kind = module_kind(mod)
        assert kind is not None
        weights.append((proj, mod.weight.detach().double().movedim(kind.weight_dims[0], 0)))
    score = np.zeros(block.units)
    for u in range(block.units):
        parts = [out[:, torch.as_tensor(block.columns([u]))].reshape(-1)]
        for proj, w in weights:
            if block.role_rows(proj.role):  # not a KV head every unit shares
                parts.append(w[torch.as_tensor(block.projection_rows(proj, [u]))].reshape(-1))
        score[u] = float(torch.cat(parts).norm(p=p))
    return score
