"""Baselines: keep the filters of largest norm (``l1``, ``l2``) or random ones, without
any correction of the consumers (what Torch-Pruning and ``torch.nn.utils.prune`` do).

For a group with several producers (a residual stream) a channel's score is the sum of
its filter norms over all producers.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
from torch import nn

from spectrim.calibration.gram import GramAccumulator
from spectrim.context import RunContext
from spectrim.graph.attention import AttentionBlock
from spectrim.graph.channels import UnitGroup
from spectrim.graph.experts import ExpertBlock
from spectrim.graph.modules import module_kind
from spectrim.graph.stream import ResidualStream
from spectrim.methods.base import GroupSolver, Method, OrderSolver, register_method
from spectrim.methods.experts import ExpertOrder, ExpertSolver, by_norm, neuron_norms
from spectrim.methods.heads import HeadSolver, head_norms
from spectrim.methods.stream import StreamSolver, stream_weight_scores

__all__ = ["L1Method", "L2Method", "RandomMethod", "filter_norms"]


def filter_norms(group: UnitGroup, model: nn.Module, p: float) -> np.ndarray:
    """Sum over the group's producers of each output filter's ``p``-norm."""
    modules = dict(model.named_modules())
    score = np.zeros(group.width)
    for name in group.producers:
        mod = modules[name]
        kind = module_kind(mod)
        out_dim = kind.weight_dims[0] if kind is not None else 0
        w = mod.weight.detach().double().movedim(out_dim, 0)
        norms = w.reshape(w.shape[0], -1).norm(p=p, dim=1).cpu().numpy()
        copies = group.producer_copies.get(name)  # a channel output at several rows
        score += (
            norms[copies].sum(0) if copies is not None else norms[group.producer_channels[name]]
        )
    return score


class _NormMethod(Method):
    needs_statistics = False
    p: float = 1.0

    def solver(
        self, group: UnitGroup, stats: Mapping[str, GramAccumulator], model: nn.Module
    ) -> GroupSolver:
        score = filter_norms(group, model, self.p)
        order = np.argsort(-score, kind="stable")
        return OrderSolver(group, order, weights=score**2)

    def head_solver(
        self, block: AttentionBlock, gram: np.ndarray | None, model: nn.Module
    ) -> HeadSolver:
        """Heads of largest weight norm first, no correction."""
        score = head_norms(block, model, self.p)
        order = np.argsort(-score, kind="stable")
        w = score[order] ** 2
        kept = np.concatenate([[0.0], np.cumsum(w)])
        curve = 1.0 - kept / kept[-1] if kept[-1] > 0 else None
        return HeadSolver(block, order, curve, correct=False)

    def expert_solver(
        self, block: ExpertBlock, grams: list[np.ndarray | None] | None, model: nn.Module
    ) -> ExpertSolver:
        """Each expert's neurons of largest weight norm first, no correction."""
        norms = neuron_norms(block, model, self.p)
        return ExpertSolver(block, [by_norm(n) for n in norms], correct=False)

    def stream_solver(
        self, stream: ResidualStream, gram: np.ndarray | None, model: nn.Module
    ) -> StreamSolver:
        """Coordinates of largest summed weight magnitude first, no refit."""
        score = stream_weight_scores(stream, model, self.p)
        return StreamSolver(gram, order=np.argsort(-score, kind="stable"), correct=False)


@register_method("l1")
class L1Method(_NormMethod):
    """Largest L1 filter norm first."""

    p = 1.0


@register_method("l2")
class L2Method(_NormMethod):
    """Largest L2 filter norm first."""

    p = 2.0


@register_method("random")
class RandomMethod(Method):
    """Random channels (seeded); the floor every method must beat."""

    needs_statistics = False

    def __init__(self, seed: int | None = None, **options: Any) -> None:
        super().__init__(**options)
        self.seed = seed
        self.rng = np.random.default_rng(0 if seed is None else seed)

    def for_run(self, ctx: RunContext) -> Method:
        """Its own ``seed`` option when given, else the run's."""
        return self if self.seed is not None else RandomMethod(seed=ctx.seed)

    def solver(
        self, group: UnitGroup, stats: Mapping[str, GramAccumulator], model: nn.Module
    ) -> GroupSolver:
        # a channel carries no information about its worth here, so the allocator gets
        # the curve of an "average" channel: (1 - k/m)^2 spreads a budget ~uniformly
        m = group.width
        curve = (1.0 - np.arange(m + 1) / m) ** 2
        return OrderSolver(group, self.rng.permutation(m), curve=curve)

    def head_solver(
        self, block: AttentionBlock, gram: np.ndarray | None, model: nn.Module
    ) -> HeadSolver:
        """Random heads, no correction."""
        return HeadSolver(block, self.rng.permutation(block.units), correct=False)

    def expert_solver(
        self, block: ExpertBlock, grams: list[np.ndarray | None] | None, model: nn.Module
    ) -> ExpertSolver:
        """Random neurons in every expert, no correction."""
        m = block.width
        curve = (1.0 - np.arange(m + 1) / m) ** 2
        orders = [ExpertOrder(self.rng.permutation(m), curve) for _ in range(block.experts)]
        return ExpertSolver(block, orders, correct=False)

    def stream_solver(
        self, stream: ResidualStream, gram: np.ndarray | None, model: nn.Module
    ) -> StreamSolver:
        """Random coordinates, no refit."""
        return StreamSolver(gram, order=self.rng.permutation(stream.width), correct=False)
