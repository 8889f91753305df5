"""The randomized ID solver (SketchIDSolver): its curve against brute force on the rows."""

from __future__ import annotations

import numpy as np
import pytest

from spectrim.graph.channels import UnitGroup
from spectrim.methods.interpolative import SketchIDSolver


def _group(m: int) -> UnitGroup:
    return UnitGroup(0, "g", np.arange(m), ["a"], [], [])


def _activations(rng: np.random.Generator, n: int, m: int) -> np.ndarray:
    # a decaying spectrum, as trained layers have
    U = rng.standard_normal((n, m))
    return U @ (rng.standard_normal((m, m)) * (np.arange(m) + 1.0)[:, None] ** -1.0)


@pytest.mark.parametrize("consumers", [1, 2])
def test_the_curve_estimates_the_error_of_the_units_it_picks(consumers: int) -> None:
    """Up to half the sketch rows, the curve is within a factor 1.6 of the true
    least-squares error of reconstructing the activations from the picked units."""
    rng = np.random.default_rng(consumers)
    m, n, k = 300, 3000, 120
    Zs = [_activations(rng, n, m) for _ in range(consumers)]
    sketches = {f"c{i}": rng.standard_normal((k, n)) @ Z / np.sqrt(k) for i, Z in enumerate(Zs)}
    solver = SketchIDSolver(_group(m), sketches)
    curve = solver.error_curve()
    assert curve[0] == pytest.approx(1.0, rel=0.2) and curve[m] == 0.0
    assert np.all(np.diff(curve) <= 0)
    Z = np.vstack(Zs)
    total = float((Z**2).sum())
    r = consumers * k
    for j in (5, 20, 60, r // 2):
        S = solver.factorization.selected(j)
        B = np.linalg.lstsq(Z[:, S], Z, rcond=None)[0]
        true = float(((Z - Z[:, S] @ B) ** 2).sum()) / total
        assert 1 / 1.6 < curve[j] / true < 1.6, (j, curve[j], true)
    # beyond what the sketch judges: above the truth (the chord of a convex curve)
    S = solver.factorization.selected(200)
    B = np.linalg.lstsq(Z[:, S], Z, rcond=None)[0]
    assert curve[200] >= float(((Z - Z[:, S] @ B) ** 2).sum()) / total


def test_plans_keep_their_units_and_fit_each_consumer_on_its_own_sketch() -> None:
    rng = np.random.default_rng(3)
    Z = _activations(rng, 1000, 80)
    sk = {"a": rng.standard_normal((40, 1000)) @ Z, "b": rng.standard_normal((40, 1000)) @ Z}
    solver = SketchIDSolver(_group(80), sk)
    plan = solver.plan(15)
    assert list(plan.keep) == sorted(solver.factorization.selected(15))
    for name, Y in sk.items():
        B = plan.folds[name]
        np.testing.assert_allclose(B[plan.keep], np.eye(15), atol=1e-12)
        brute = np.linalg.lstsq(Y[:, plan.keep], Y, rcond=None)[0].T
        np.testing.assert_allclose(B, brute, atol=1e-8)
    errs = solver.reconstruction_errors(plan)
    assert set(errs) == {"a", "b"} and all(0 < e < 1 for e in errs.values())
