"""Per-matrix densities from error curves, against exhaustive search on a grid."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from spectrim.budget.densities import allocate_densities, convex_steps

GRID = np.array([1.0, 0.75, 0.5, 0.25])


def _convex(e: np.ndarray) -> np.ndarray:
    """A convex, non-decreasing curve in the removed share (what the greedy is exact for)."""
    steps = np.sort(np.abs(e))
    return np.concatenate([[0.0], np.cumsum(steps)])


@settings(max_examples=40, deadline=None)
@given(
    st.integers(0, 10_000),
    st.sampled_from([0.5, 0.625, 0.75]),
    st.sampled_from([(100, 100, 100), (100, 30, 10), (10, 200, 50)]),
)
def test_greedy_matches_exhaustive_search_on_convex_curves(
    seed: int, density: float, size_list: tuple[int, int, int]
) -> None:
    rng = np.random.default_rng(seed)
    names = ["a", "b", "c"]
    sizes = dict(zip(names, size_list, strict=True))
    total = sum(size_list)
    curves = {n: (GRID, _convex(rng.random(3))) for n in names}
    got = allocate_densities(curves, sizes, density)
    kept = sum(got[n] * sizes[n] for n in names)
    assert kept == pytest.approx(density * total)
    best = min(
        sum(curves[n][1][i] for n, i in zip(names, idx, strict=True))
        for idx in itertools.product(range(4), repeat=3)
        if sum(GRID[i] * sizes[n] for n, i in zip(names, idx, strict=True))
        <= density * total + 1e-9
    )

    def err(n: str, d: float) -> float:
        return float(np.interp(1 - d, 1 - GRID, curves[n][1]))

    assert sum(err(n, got[n]) for n in names) <= best + 1e-9


def test_convex_steps_drop_points_above_the_hull_and_flat_budgets() -> None:
    steps = convex_steps(np.array([1.0, 0.5, 0.0]), np.array([0.0, 0.9, 1.0]))
    assert len(steps) == 1 and steps[0][:2] == (1.0, 0.0)  # the middle point is above the chord
    d = allocate_densities({"x": (GRID, np.array([0, 1, 2, 3.0]))}, {"x": 10}, 1.0)
    assert d == {"x": 1.0}
    with pytest.raises(ValueError, match="decreasing"):
        convex_steps(np.array([0.5, 1.0]), np.array([0.0, 1.0]))
