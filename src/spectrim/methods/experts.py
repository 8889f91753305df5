"""The neurons of mixture-of-experts layers: one order per expert, one width per layer.

Each expert ``e`` of a layer has the Gram ``G_e = Σ_t w_t² h_t h_tᵀ`` of its hidden
activations ``h_t = act(gate_e x_t) ⊙ up_e x_t`` over the calibration tokens the router
sends to it, each weighted by its router weight ``w_t`` (the expert's output is
``w_t · down_e h_t``, so that is the Gram of what reaches the layer's output).  A method
orders each expert's neurons and gives its error curve; keeping ``k`` neurons keeps the
first ``k`` of every expert (the parameters are 3-D: one width per layer), with the
least-squares fold ``B_e = G_e[:, S] G_e[S, S]⁻¹`` into the expert's down projection for
a correcting method.  An expert sent fewer calibration tokens than it has neurons is
topped up to that many rows by its activations on other tokens of the layer
(:func:`spectrim._experts.top_up`); only without any calibration token has it no Gram:
its neurons are then ordered by their weights' norm and sliced without a fold.

Each method provides :meth:`spectrim.methods.Method.expert_solver`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from spectrim.graph.experts import ExpertBlock
from spectrim.linalg import fit_reconstruction, order_residual_curve

__all__ = ["ExpertOrder", "ExpertSolver", "neuron_norms", "output_weight_grams"]


@dataclass(frozen=True)
class ExpertOrder:
    """One expert's neurons, most valuable first, and the relative error ``curve[k]`` of
    keeping the first ``k`` (``curve[width] = 0``); ``gram`` (for a fold) and its ridge."""

    order: np.ndarray
    curve: np.ndarray
    gram: np.ndarray | None = None
    ridge: float = 0.0


class ExpertSolver:
    """Per-expert orders of one MoE layer, its error curve and the plan of a width.

    Args:
        block: the layer's experts.
        experts: one :class:`ExpertOrder` per expert.
        correct: fold each expert's least-squares correction where it has a Gram.
        shares: each expert's weight in the layer's curve (default: its Gram's trace
            over the layer's, or equal shares without statistics).
    """

    def __init__(
        self,
        block: ExpertBlock,
        experts: Sequence[ExpertOrder],
        correct: bool = True,
        shares: np.ndarray | None = None,
    ) -> None:
        if len(experts) != block.experts:
            raise ValueError(f"experts '{block.name}': {len(experts)} orders, not {block.experts}")
        for e, x in enumerate(experts):
            if sorted(np.asarray(x.order).tolist()) != list(range(block.width)):
                raise ValueError(f"experts '{block.name}': expert {e}'s order is not a permutation")
        self.block = block
        self.experts = list(experts)
        self.correct = bool(correct)
        if shares is None:
            traces = np.array([np.trace(x.gram) if x.gram is not None else 0.0 for x in experts])
            shares = traces if traces.sum() > 0 else np.ones(block.experts)
        self.shares = np.asarray(shares, dtype=float) / float(np.sum(shares))

    def error_curve(self) -> np.ndarray:
        """``e[k]`` for ``k = 0..width``: the experts' curves weighted by their shares,
        non-increasing, ``e[width] = 0``."""
        c = sum(s * np.asarray(x.curve, float) for s, x in zip(self.shares, self.experts))
        c = np.maximum.accumulate(np.maximum(np.asarray(c), 0.0)[::-1])[::-1]
        c[-1] = 0.0
        return c

    def reconstruction_curve(self) -> np.ndarray:
        """``e[k]``: the relative least-squares error of reconstructing every expert's
        hidden units from the first ``k`` of its order (weighted by the shares), whatever
        criterion made the order: the scale of ``id``'s curve and of the channel groups'
        on a shared budget (``experts=True``).  An expert without a Gram keeps its own
        curve."""
        c = sum(
            s * (order_residual_curve(x.gram, x.order) if x.gram is not None else x.curve)
            for s, x in zip(self.shares, self.experts)
        )
        c = np.maximum.accumulate(np.maximum(np.asarray(c, float), 0.0)[::-1])[::-1]
        c[-1] = 0.0
        return c

    def plan(self, k: int) -> tuple[np.ndarray, list[np.ndarray | None]]:
        """The first ``k`` neurons of every expert (sorted rows) and their folds."""
        if not 1 <= k <= self.block.width:
            raise ValueError(f"experts '{self.block.name}': k={k} not in [1, {self.block.width}]")
        keep = np.stack([np.sort(np.asarray(x.order)[:k]) for x in self.experts])
        folds: list[np.ndarray | None] = []
        for x, s in zip(self.experts, keep, strict=True):
            if self.correct and x.gram is not None and k < self.block.width:
                folds.append(fit_reconstruction(x.gram, s, ridge=x.ridge))
            else:
                folds.append(None)
        return keep, folds


def _weights(block: ExpertBlock, model: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    gate_up, down = block.weights(model)
    return gate_up.detach().double(), down.detach().double()


def neuron_norms(block: ExpertBlock, model: nn.Module, p: float = 2.0) -> np.ndarray:
    """``experts × width``: the ``p``-norm of each neuron's weights (its gate and up rows,
    its down column)."""
    gate_up, down = _weights(block, model)
    n = block.width
    parts = torch.cat([gate_up[:, :n], gate_up[:, n:], down.transpose(1, 2)], dim=2)
    return parts.norm(p=p, dim=2).cpu().numpy()


def output_weight_grams(block: ExpertBlock, model: nn.Module) -> list[np.ndarray]:
    """Per expert ``downᵀdown`` (``width × width``), scaled to trace ``width``."""
    _, down = _weights(block, model)
    out = []
    for e in range(block.experts):
        m = (down[e].T @ down[e]).cpu().numpy()
        t = float(np.trace(m))
        out.append(m * (m.shape[0] / t) if t > 0 else m)
    return out


def by_norm(scores: np.ndarray) -> ExpertOrder:
    """An expert's neurons by decreasing score, the curve of the scores' squares."""
    order = np.argsort(-scores, kind="stable")
    kept = np.concatenate([[0.0], np.cumsum(scores[order] ** 2)])
    curve = (
        1.0 - kept / kept[-1]
        if kept[-1] > 0
        else (1.0 - np.arange(len(kept)) / (len(kept) - 1)) ** 2
    )
    return ExpertOrder(order, curve)
