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
    """Up to 0.8 of the sketch rows the curve is within 30% of the true least-squares
    error of reconstructing the activations from the units it picks; beyond (a power-law
    extrapolation) within 50%."""
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
    for j, tol in (
        (5, 1.3),
        (20, 1.3),
        (r // 2, 1.3),
        (int(0.9 * r), 1.5),
        (min(r + 60, 280), 1.5),
    ):
        S = solver.factorization.selected(j)
        B = np.linalg.lstsq(Z[:, S], Z, rcond=None)[0]
        true = float(((Z - Z[:, S] @ B) ** 2).sum()) / total
        assert 1 / tol < curve[j] / true < tol, (j, curve[j], true)


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


def test_beyond_the_judged_pivots_units_follow_their_energy() -> None:
    rng = np.random.default_rng(4)
    Z = _activations(rng, 2000, 100)
    energies = (Z**2).sum(0)
    solver = SketchIDSolver(_group(100), {"c": rng.standard_normal((20, 2000)) @ Z}, 0.0, energies)
    judged = 16  # 0.8 of the 20 rows
    np.testing.assert_array_equal(solver.order[:judged], solver.factorization.perm[:judged])
    tail = solver.order[judged:]
    assert sorted(tail) == sorted(solver.factorization.perm[judged:])
    assert np.all(np.diff(energies[tail]) <= 0)
    assert list(solver.plan(40).keep) == sorted(solver.order[:40])
