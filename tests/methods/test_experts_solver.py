""":class:`spectrim.methods.experts.ExpertSolver`'s curves against brute force."""

from __future__ import annotations

import numpy as np
import pytest

from spectrim.graph.experts import ExpertBlock
from spectrim.methods.experts import ExpertOrder, ExpertSolver


def _brute(G: np.ndarray, order: np.ndarray) -> np.ndarray:
    """``‖Z − Z_S B‖²/‖Z‖²`` for ``S`` the first ``k`` of ``order``, by pseudo-inverse."""
    total = np.trace(G)
    out = []
    for k in range(G.shape[0] + 1):
        S = order[:k]
        kept = np.trace(G[:, S] @ np.linalg.pinv(G[np.ix_(S, S)]) @ G[S, :]) if k else 0.0
        out.append((total - kept) / total)
    return np.array(out)


@pytest.mark.parametrize("seed", range(4))
def test_the_reconstruction_curve_is_the_least_squares_error_of_each_order(seed: int) -> None:
    """Three experts of 6 neurons with rank-deficient Grams (two neurons repeat others)
    and arbitrary orders (as ``spectral``'s ridge greedy gives them), one never routed
    to (no Gram: its own curve): the shares-weighted brute force, to 1e-9."""
    rng = np.random.default_rng(seed)
    grams, orders = [], []
    for _ in range(2):
        Z = rng.normal(size=(40, 6))
        Z[:, 4] = Z[:, 0] - 2 * Z[:, 1]
        Z[:, 5] = 3 * Z[:, 2]
        grams.append(Z.T @ Z)
        orders.append(rng.permutation(6))
    block = ExpertBlock("experts", 3, 6, 8)
    idle = np.linspace(1.0, 0.0, 7)
    experts = [ExpertOrder(o, np.linspace(1, 0, 7), G) for o, G in zip(orders, grams)]
    solver = ExpertSolver(block, [*experts, ExpertOrder(np.arange(6), idle)])
    want = sum(
        s * c for s, c in zip(solver.shares, [*(_brute(G, o) for G, o in zip(grams, orders)), idle])
    )
    np.testing.assert_allclose(solver.reconstruction_curve(), want, atol=1e-9)
    assert solver.reconstruction_curve()[-1] == 0.0
