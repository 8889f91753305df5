"""The optimism factor of in-sample reconstruction errors, against simulated fits."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from spectrim.linalg import fit_reconstruction, optimism, prediction_error_curve, residual_of


@pytest.mark.parametrize(("n", "k"), [(60, 10), (200, 50), (40, 25)])
def test_optimism_matches_fresh_rows(n: int, k: int) -> None:
    """Fit ``z_rest ≈ B z_S`` on ``n`` Gaussian rows; the residual on fresh rows over the
    in-sample residual is ``ρ(k)`` on average (least squares with a random design)."""
    rng = np.random.default_rng(0)
    m = k + 6
    mix = rng.standard_normal((m, m)) / np.sqrt(m)
    S = np.arange(k)
    train, test = [], []
    for _ in range(300):
        Z = rng.standard_normal((n, m)) @ mix
        Z_new = rng.standard_normal((4000, m)) @ mix
        G = Z.T @ Z
        B = fit_reconstruction(G, S)
        train.append(residual_of(G, S, B) / n)
        test.append(residual_of(Z_new.T @ Z_new, S, B) / len(Z_new))
    measured = np.mean(test) / np.mean(train)
    assert measured == pytest.approx(float(optimism(k, n)), rel=0.08)
    assert measured > 1.1  # the in-sample error is clearly optimistic


@given(
    st.lists(st.floats(0.0, 1.0), min_size=2, max_size=30),
    st.floats(1.0, 500.0),
)
def test_curve_is_a_valid_error_curve(values: list[float], rows: float) -> None:
    e = np.maximum.accumulate(np.array([*values, 0.0])[::-1])[::-1]  # an in-sample curve
    out = prediction_error_curve(e, rows)
    assert out.shape == e.shape and out[-1] == 0.0
    assert np.all(np.diff(out) <= 1e-15)  # non-increasing
    assert np.all(out >= e - 1e-15)  # never more optimistic than in-sample
    assert np.all(np.isfinite(out))
    assert np.all(out[e > 0] > 0)  # a non-zero error is never reported as zero


def test_too_few_rows_is_never_a_small_error() -> None:
    e = np.array([1.0, 0.4, 0.1, 0.01, 0.0, 0.0])  # in-sample zero at k = 4
    out = prediction_error_curve(e, rows=4)  # ... but with 4 rows only
    assert out[3] >= 1.0 and out[1] > e[1]
    assert out[4] == 0.0  # exactly dependent channels stay free
    # with plenty of rows the curve barely moves
    np.testing.assert_allclose(prediction_error_curve(e, rows=1e6), e, rtol=1e-4)
