"""Spectral helpers: degrees of freedom, leverage scores, effective rank."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from spectrim.linalg import (
    degrees_of_freedom,
    effective_rank,
    gram_spectrum,
    ridge_leverage_scores,
)

SETTINGS = settings(max_examples=50, deadline=None)


def _gram(seed: int, n: int = 30, m: int = 12, r: int | None = None) -> np.ndarray:
    rng = np.random.default_rng(seed)
    Z = rng.standard_normal((n, r or m)) @ rng.standard_normal((r or m, m)) if r else None
    if Z is None:
        Z = rng.standard_normal((n, m)) * rng.uniform(0.1, 5, size=m)
    return Z.T @ Z / n


@pytest.mark.parametrize("seed", range(3))
def test_dof_equals_trace_formula(seed: int) -> None:
    G = _gram(seed)
    mu = gram_spectrum(G)
    lams = np.array([1e-4, 1e-2, 0.3, 1.0, 10.0, 1e3])
    got = degrees_of_freedom(mu, lams)
    assert isinstance(got, np.ndarray)
    assert got.shape == lams.shape
    for lam, val in zip(lams, got):
        brute = np.trace(G @ np.linalg.inv(G + lam * np.eye(G.shape[0])))
        assert val == pytest.approx(brute, rel=1e-10)
        scalar = degrees_of_freedom(mu, float(lam))
        assert isinstance(scalar, float)
        assert scalar == pytest.approx(val, rel=1e-14)
    # 2-D lam keeps its shape
    assert np.shape(degrees_of_freedom(mu, lams.reshape(2, 3))) == (2, 3)


@SETTINGS
@given(
    st.lists(st.floats(0, 1e6, allow_subnormal=False), min_size=0, max_size=30),
    st.lists(st.floats(0, 1e6, allow_subnormal=False), min_size=2, max_size=10),
)
def test_dof_monotone_and_bounded(eigvals: list[float], lams: list[float]) -> None:
    mu = np.array(eigvals, dtype=np.float64)
    lam = np.sort(np.array(lams))
    dof = np.atleast_1d(degrees_of_freedom(mu, lam))
    rank = int(np.sum(mu > 0))
    assert np.all(np.diff(dof) <= 1e-12 * max(rank, 1))
    assert np.all(dof <= rank + 1e-12)
    assert np.all(dof >= 0)
    assert degrees_of_freedom(mu, 0.0) == rank


def test_dof_low_rank() -> None:
    G = _gram(0, r=3)
    mu = gram_spectrum(G)
    assert degrees_of_freedom(mu, 1e-8) == pytest.approx(3.0, abs=1e-5)
    assert degrees_of_freedom(mu, 1e-8) <= 3.0 + 1e-9


def test_negative_rounding_eigenvalues_count_as_zero() -> None:
    assert degrees_of_freedom([1.0, -1e-17], 0.0) == 1.0
    assert effective_rank([1.0, -1e-17]) == 1.0


def test_leverage_scores() -> None:
    G = _gram(1)
    lam = 0.5
    lev = ridge_leverage_scores(G, lam)
    brute = np.diag(G @ np.linalg.inv(G + lam * np.eye(G.shape[0])))
    np.testing.assert_allclose(lev, brute, rtol=1e-10)
    assert lev.sum() == pytest.approx(degrees_of_freedom(gram_spectrum(G), lam), rel=1e-12)
    assert np.all((lev >= 0) & (lev <= 1))
    with pytest.raises(ValueError, match="lam must be positive"):
        ridge_leverage_scores(G, 0.0)
    with pytest.raises(ValueError, match="lam must be a scalar"):
        ridge_leverage_scores(G, np.ones(2))  # type: ignore[arg-type]


def test_gram_spectrum() -> None:
    G = _gram(2)
    mu = gram_spectrum(G)
    np.testing.assert_allclose(mu, np.sort(np.linalg.eigvalsh(G))[::-1], rtol=1e-10)
    assert np.all(np.diff(mu) <= 0)
    assert gram_spectrum(np.zeros((0, 0))).shape == (0,)
    assert np.all(gram_spectrum(_gram(3, r=2)) >= 0)


def test_effective_rank() -> None:
    assert effective_rank([3.0, 3.0, 3.0, 3.0]) == pytest.approx(4.0)
    assert effective_rank([5.0, 0.0, 0.0]) == pytest.approx(1.0)
    assert effective_rank([0.0, 0.0]) == 0.0
    assert effective_rank([]) == 0.0
    p = np.array([0.5, 0.25, 0.25])
    assert effective_rank(4 * p) == pytest.approx(np.exp(-np.sum(p * np.log(p))))


@SETTINGS
@given(st.lists(st.floats(0, 1e8, allow_subnormal=False), min_size=1, max_size=40))
def test_effective_rank_bounds(eigvals: list[float]) -> None:
    mu = np.array(eigvals)
    er = effective_rank(mu)
    nnz = int(np.sum(mu > 0))
    if nnz == 0:
        assert er == 0.0
    else:
        assert 1.0 - 1e-12 <= er <= nnz + 1e-9


def test_spectrum_validation() -> None:
    with pytest.raises(ValueError, match="eigvals must be a 1-D"):
        degrees_of_freedom(np.eye(2), 1.0)
    with pytest.raises(ValueError, match="eigvals contains non-finite"):
        degrees_of_freedom([1.0, np.nan], 1.0)
    with pytest.raises(ValueError, match="lam must be non-negative"):
        degrees_of_freedom([1.0], -1.0)
    with pytest.raises(ValueError, match="lam must be finite"):
        degrees_of_freedom([1.0], [1.0, np.inf])
    with pytest.raises(ValueError, match="eigvals contains non-finite"):
        effective_rank([np.inf])
