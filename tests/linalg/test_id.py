"""Interpolative decomposition from Gram matrices vs brute force on the raw activations."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import scipy.linalg
from hypothesis import given, settings
from hypothesis import strategies as st

from spectrim.linalg import IDFactorization, gram_sqrt, id_factorize

SETTINGS = settings(max_examples=40, deadline=None)


def _rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.max(np.abs(a - b)) / max(1.0, float(np.max(np.abs(b)))))


def _low_rank(rng: np.random.Generator, n: int, m: int, r: int) -> np.ndarray:
    return rng.standard_normal((n, r)) @ rng.standard_normal((r, m))


# --------------------------------------------------------------------------- lstsq / pivots


@pytest.mark.parametrize(("n", "m"), [(80, 15), (12, 30), (25, 25), (200, 3), (1, 4)])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_interpolation_equals_lstsq(n: int, m: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    Z = rng.standard_normal((n, m))
    fac = id_factorize(Z.T @ Z)
    for k in range(1, min(n, m) + 1):
        S = fac.selected(k)
        T = fac.interpolation(k)
        assert T.shape == (k, m)
        # kept columns are reproduced exactly (T[:, S] is exactly the identity)
        np.testing.assert_array_equal(T[:, S], np.eye(k))
        np.testing.assert_array_equal(Z[:, S] @ T[:, S], Z[:, S])
        L = np.linalg.lstsq(Z[:, S], Z, rcond=None)[0]
        assert _rel(T, L) < 1e-8, k


@pytest.mark.parametrize(("n", "m"), [(80, 15), (12, 30), (40, 40)])
@pytest.mark.parametrize("seed", range(4))
def test_pivots_match_cpqr_of_Z(n: int, m: int, seed: int) -> None:
    rng = np.random.default_rng(100 + seed)
    Z = rng.standard_normal((n, m)) * rng.uniform(0.2, 3.0, size=m)
    fac = id_factorize(Z.T @ Z)
    Rz, pz = scipy.linalg.qr(Z, mode="r", pivoting=True)
    r = min(n, m)
    np.testing.assert_array_equal(fac.perm[:r], pz[:r])
    # |R| agrees (rows up to sign) on the meaningful block
    np.testing.assert_allclose(np.abs(fac.R[:r, :]), np.abs(Rz[:r, :]), atol=1e-9 * abs(Rz[0, 0]))


def test_tsqr_equivalence() -> None:
    """Stacked block-R factors (the ID repo's TSQR) and the summed Gram give the same CPQR."""
    rng = np.random.default_rng(7)
    blocks = [rng.standard_normal((30, 10)) * np.arange(1, 11) for _ in range(5)]
    Rs = [np.linalg.qr(b, mode="r") for b in blocks]
    R_stack, p_stack = scipy.linalg.qr(np.vstack(Rs), mode="r", pivoting=True)
    G = sum(b.T @ b for b in blocks)
    fac = id_factorize(G)
    np.testing.assert_array_equal(fac.perm, p_stack)
    np.testing.assert_allclose(np.abs(fac.R), np.abs(R_stack[:10]), atol=1e-9 * abs(R_stack[0, 0]))


def test_matches_reference_getID() -> None:
    """Same T as the ID repo's recipe: CPQR of Z, T = [I, pinv(R11) R12] un-permuted."""
    rng = np.random.default_rng(3)
    Z = rng.standard_normal((60, 9))
    R, P = scipy.linalg.qr(Z, mode="r", pivoting=True)
    fac = id_factorize(Z.T @ Z)
    for k in (1, 4, 8):
        T_ref = np.hstack([np.eye(k), np.linalg.pinv(R[:k, :k]) @ R[:k, k:]])[:, np.argsort(P)]
        np.testing.assert_allclose(fac.interpolation(k), T_ref, atol=1e-9)


# --------------------------------------------------------------------------- error curve


@st.composite
def activations(draw: st.DrawFn) -> np.ndarray:
    n = draw(st.integers(1, 40))
    m = draw(st.integers(1, 14))
    seed = draw(st.integers(0, 2**32 - 1))
    kind = draw(st.sampled_from(["gauss", "relu", "lowrank", "scaled"]))
    rng = np.random.default_rng(seed)
    if kind == "lowrank":
        Z = _low_rank(rng, n, m, draw(st.integers(1, m)))
    else:
        Z = rng.standard_normal((n, m))
    if kind == "relu":
        Z = np.maximum(Z, 0.0)
    if kind == "scaled":
        Z = Z * 10.0 ** rng.uniform(-3, 3, size=m)
    return Z


@SETTINGS
@given(activations())
def test_residual_curve_matches_direct_norms(Z: np.ndarray) -> None:
    fac = id_factorize(Z.T @ Z)
    m = Z.shape[1]
    total = float(np.sum(Z**2))
    assert fac.residuals.shape == (m + 1,)
    assert fac.total == pytest.approx(total, rel=1e-12, abs=1e-300)
    assert fac.residuals[0] == fac.total
    assert fac.residuals[m] == 0.0
    assert np.all(np.diff(fac.residuals) <= 0)
    for k in range(m + 1):
        S = fac.selected(k)
        T = fac.interpolation(k)
        assert np.all(np.isfinite(T))
        direct = float(np.sum((Z - Z[:, S] @ T) ** 2))
        assert abs(direct - fac.residuals[k]) <= 1e-9 * total, (k, direct, fac.residuals[k])
        expected_rel = 0.0 if total == 0 else np.sqrt(fac.residuals[k] / fac.total)
        assert fac.relative_error(k) == pytest.approx(expected_rel, abs=1e-15)
    errs = fac.relative_errors()
    assert np.all(np.diff(errs) <= 0)
    for eps_rel in (0.0, 0.05, 0.5, 1.0):
        k = fac.smallest_k(eps_rel)
        assert errs[k] <= eps_rel
        assert k == 0 or errs[k - 1] > eps_rel


@SETTINGS
@given(activations(), st.floats(1e-6, 1e6))
def test_scale_invariance(Z: np.ndarray, c: float) -> None:
    G = Z.T @ Z
    a, b = id_factorize(G), id_factorize(c * G)
    r = a.rank()
    np.testing.assert_array_equal(a.perm[:r], b.perm[:r])
    np.testing.assert_allclose(b.residuals, c * a.residuals, rtol=1e-8, atol=1e-12 * c * a.total)


# --------------------------------------------------------------------------- exactness


def _rank_deficient_cases() -> list[tuple[str, np.ndarray, int]]:
    rng = np.random.default_rng(11)
    base = rng.standard_normal((50, 6))
    dup = np.hstack([base, base[:, [0, 2]], 2.5 * base[:, [4]]])  # rank 6
    dead = np.hstack([np.zeros((50, 2)), base, np.zeros((50, 1))])  # rank 6
    prod = _low_rank(rng, 50, 20, 5)  # rank 5
    wide = _low_rank(rng, 4, 12, 4)  # n < m, rank 4
    relu = np.maximum(base, 0.0)
    relu_dead = np.hstack([relu, np.zeros((50, 3)), relu[:, :2]])  # rank 6
    mixed = np.hstack([prod[:, :10], np.zeros((50, 2)), prod[:, 10:], prod[:, :3]])  # rank 5
    return [
        ("dup", dup, 6),
        ("dead", dead, 6),
        ("prod", prod, 5),
        ("wide", wide, 4),
        ("relu_dead", relu_dead, 6),
        ("mixed", mixed, 5),
    ]


@pytest.mark.parametrize(("name", "Z", "r"), _rank_deficient_cases())
def test_exact_rank(name: str, Z: np.ndarray, r: int) -> None:
    fac = id_factorize(Z.T @ Z)
    m = Z.shape[1]
    assert fac.rank() == r
    assert fac.smallest_k(1e-6) == r
    assert fac.residuals[r] <= 1e-20 * fac.total
    assert fac.relative_error(r - 1) > 1e-3
    scale = float(np.max(np.abs(Z)))
    for k in range(r, m + 1):
        S = fac.selected(k)
        T = fac.interpolation(k)
        assert np.all(np.isfinite(T))
        np.testing.assert_array_equal(T[:, S], np.eye(k))
        assert np.max(np.abs(Z[:, S] @ T - Z)) <= 1e-10 * scale, (name, k)
    # the first r pivots are independent: they reproduce lstsq exactly
    S = fac.selected(r)
    L = np.linalg.lstsq(Z[:, S], Z, rcond=None)[0]
    assert _rel(fac.interpolation(r), L) < 1e-8


def test_dead_units_are_pivoted_last() -> None:
    rng = np.random.default_rng(5)
    Z = np.maximum(rng.standard_normal((30, 8)), 0)
    Z[:, [1, 6]] = 0.0
    fac = id_factorize(Z.T @ Z)
    assert set(fac.perm[-2:].tolist()) == {1, 6}
    T = fac.interpolation(6)
    np.testing.assert_array_equal(T[:, [1, 6]], 0.0)  # dead units are reconstructed by zero
    T8 = fac.interpolation(8)
    np.testing.assert_array_equal(T8[:, fac.perm], np.eye(8))


def test_all_zero_activations() -> None:
    fac = id_factorize(np.zeros((5, 5)))
    assert fac.total == 0.0
    np.testing.assert_array_equal(fac.residuals, 0.0)
    for k in range(6):
        T = fac.interpolation(k)
        assert np.all(np.isfinite(T))
        assert fac.relative_error(k) == 0.0
        assert fac.pivot_ratio(k) == 0.0
    assert fac.rank() == 0
    assert fac.smallest_k(0.0) == 0
    np.testing.assert_array_equal(gram_sqrt(np.zeros((3, 3))), 0.0)


def test_empty_and_single_unit() -> None:
    fac = id_factorize(np.zeros((0, 0)))
    assert fac.m == 0
    assert fac.interpolation(0).shape == (0, 0)
    assert fac.smallest_k(0.1) == 0
    fac1 = id_factorize([[4.0]])
    assert fac1.selected(1).tolist() == [0]
    np.testing.assert_array_equal(fac1.interpolation(1), [[1.0]])
    assert fac1.relative_error(0) == 1.0
    assert fac1.relative_error(1) == 0.0


def test_badly_scaled_units() -> None:
    """Units whose scales differ by 1e15 keep full relative accuracy (Jacobi scaling)."""
    rng = np.random.default_rng(2)
    scales = np.array([1e6, 1.0, 1e-6, 1.0, 1e-9, 1e3])
    Z = rng.standard_normal((100, 6)) * scales
    fac = id_factorize(Z.T @ Z)
    _, pz = scipy.linalg.qr(Z, mode="r", pivoting=True)
    np.testing.assert_array_equal(fac.perm, pz)
    k = 4
    S, T = fac.selected(k), fac.interpolation(k)
    # reference: lstsq on column-normalised activations (well conditioned), then un-scale
    L = np.linalg.lstsq(Z[:, S] / scales[S], Z / scales, rcond=None)[0]
    # compare coefficients in unit-scale coordinates: T_hat = diag(s_S) T diag(1/s)
    T_hat = scales[S][:, None] * T / scales[None, :]
    off = fac.perm[k:]
    np.testing.assert_allclose(T_hat[:, off], L[:, off], atol=1e-10)
    assert np.max(np.abs(Z - Z[:, S] @ T) / np.abs(scales)) == pytest.approx(
        np.max(np.abs(Z / scales - (Z[:, S] / scales[S]) @ L)), rel=1e-6
    )


def test_pivot_ratio_and_rank_tol() -> None:
    G = np.diag([16.0, 4.0, 1.0, 0.0])
    fac = id_factorize(G)
    assert fac.perm[:3].tolist() == [0, 1, 2]
    assert [fac.pivot_ratio(k) for k in range(5)] == pytest.approx([1.0, 0.5, 0.25, 0.0, 0.0])
    assert fac.rank() == 3
    assert fac.rank(tol=0.3) == 2
    assert fac.rank(tol=0.0) == 3


# --------------------------------------------------------------------------- API hygiene


def test_factorization_is_immutable() -> None:
    fac = id_factorize(np.eye(3))
    with pytest.raises(dataclasses.FrozenInstanceError):
        fac.total = 1.0  # type: ignore[misc]
    for arr in (fac.perm, fac.R, fac.residuals):
        with pytest.raises(ValueError):
            arr[0] = 0
    # selected() returns a copy
    s = fac.selected(2)
    s[0] = 99
    assert fac.perm[0] != 99
    assert fac.perm.dtype == np.int64


def test_k_validation() -> None:
    fac = id_factorize(np.eye(3))
    for bad in (-1, 4):
        with pytest.raises(ValueError, match="k must satisfy"):
            fac.interpolation(bad)
        with pytest.raises(ValueError, match="k must satisfy"):
            fac.selected(bad)
        with pytest.raises(ValueError, match="k must satisfy"):
            fac.relative_error(bad)
    with pytest.raises(TypeError, match="k must be an integer"):
        fac.interpolation(1.5)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="k must be an integer"):
        fac.selected(True)
    assert fac.selected(np.int64(2)).shape == (2,)
    with pytest.raises(ValueError, match="rel_err"):
        fac.smallest_k(-0.1)
    with pytest.raises(ValueError, match="rel_err"):
        fac.smallest_k(float("nan"))


def test_direct_construction_validation() -> None:
    with pytest.raises(ValueError, match="perm"):
        IDFactorization(perm=np.array([0, 0]), R=np.eye(2), residuals=np.zeros(3), total=0.0)
    with pytest.raises(ValueError, match="R must have shape"):
        IDFactorization(perm=np.array([1, 0]), R=np.eye(3), residuals=np.zeros(3), total=0.0)
    with pytest.raises(ValueError, match="residuals"):
        IDFactorization(perm=np.array([1, 0]), R=np.eye(2), residuals=np.zeros(2), total=0.0)


def test_cholesky_route_matches_cpqr_on_a_wide_layer() -> None:
    """From CHOLESKY_FROM units on, ``auto`` takes the pivoted Cholesky; on a wide
    layer with a decaying spectrum, duplicated and dead units it picks CPQR's pivots,
    the same residual curve, and an exact interpolation at the rank."""
    from spectrim.linalg.interpolative import CHOLESKY_FROM

    rng = np.random.default_rng(5)
    m, r = CHOLESKY_FROM + 76, 700
    base = rng.standard_normal((3000, r)) * np.logspace(0, -2, r)
    Z = np.maximum(base @ rng.standard_normal((r, m - 100)), 0.0)  # ReLU units
    Z = np.hstack([Z, 2.0 * Z[:, :60], np.zeros((3000, 40))])  # duplicates and dead units
    G = Z.T @ Z
    chol, cpqr = id_factorize(G), id_factorize(G, method="cpqr")
    rank = cpqr.rank()
    assert rank == chol.rank() <= m - 100
    np.testing.assert_array_equal(chol.perm[: rank - 20], cpqr.perm[: rank - 20])
    assert set(chol.perm[-40:]) == set(range(m - 40, m))  # the dead units come last
    keep = cpqr.residuals > 1e-9 * cpqr.total
    np.testing.assert_allclose(chol.residuals[keep], cpqr.residuals[keep], rtol=1e-6)
    S, T = chol.selected(rank), chol.interpolation(rank)
    assert np.linalg.norm(Z - Z[:, S] @ T) <= 1e-6 * np.linalg.norm(Z)
    with pytest.raises(ValueError, match="method="):
        id_factorize(G[:3, :3], method="qr")


# --------------------------------------------------------------------------- from rows / sketches


@pytest.mark.parametrize(("n", "m"), [(80, 15), (12, 30), (25, 25)])
def test_id_from_rows_is_the_gram_route_on_the_rows(n: int, m: int) -> None:
    """CPQR of Z itself: the pivots and residual curve of ``id_factorize(ZᵀZ)``."""
    from spectrim.linalg import id_from_rows

    rng = np.random.default_rng(n + m)
    Z = rng.standard_normal((n, m)) * rng.uniform(0.5, 2.0, m)
    a, b = id_from_rows(Z), id_factorize(Z.T @ Z, "cpqr")
    r = min(n, m)
    np.testing.assert_array_equal(a.perm[:r], b.perm[:r])
    np.testing.assert_allclose(a.residuals, b.residuals, rtol=1e-8, atol=1e-9 * b.total)
    assert a.R.shape == (r, m)
    for k in (1, r // 2, r):
        S, T = a.selected(k), a.interpolation(k)
        brute = np.linalg.lstsq(Z[:, S], Z, rcond=None)[0]
        assert _rel(T, brute) < 1e-8


def test_the_randomized_id_is_exact_on_low_rank_activations() -> None:
    """Rank-r activations, a Gaussian sketch of k > r rows: the r units it picks
    reconstruct every unit to rounding, the residual curve reaches 0 at r."""
    from spectrim.linalg import id_from_rows

    rng = np.random.default_rng(5)
    Z = _low_rank(rng, 500, 120, 9)
    Y = rng.standard_normal((20, 500)) @ Z / np.sqrt(20)
    fac = id_from_rows(Y)
    S, T = fac.selected(9), fac.interpolation(9)
    assert np.linalg.norm(Z - Z[:, S] @ T) < 1e-9 * np.linalg.norm(Z)
    assert fac.residuals[9] < 1e-20 * fac.total and fac.residuals[8] > 1e-6 * fac.total
    # more kept units than sketch rows: a minimum-norm interpolation, kept units exact
    T30 = fac.interpolation(30)
    np.testing.assert_allclose(T30[:, fac.selected(30)], np.eye(30), atol=1e-12)
    assert fac.pivot_ratio(25) == 0.0 and fac.rank() == 9
