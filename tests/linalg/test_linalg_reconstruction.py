"""fit_reconstruction / fit_cross_reconstruction / residual_of vs brute force on activations."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from spectrim.linalg import (
    cross_residual_of,
    fit_cross_reconstruction,
    fit_reconstruction,
    id_factorize,
    residual_of,
)

SETTINGS = settings(max_examples=40, deadline=None)


def _rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.max(np.abs(a - b)) / max(1.0, float(np.max(np.abs(b)))))


def _ridge_brute(Zs: np.ndarray, Z: np.ndarray, tau: np.ndarray) -> np.ndarray:
    """min ‖Z − Zs Bᵀ‖² + Σ τ_j ‖B[:, j]‖² as an augmented least-squares problem."""
    k = Zs.shape[1]
    A = np.vstack([Zs, np.diag(np.sqrt(tau))])
    rhs = np.vstack([Z, np.zeros((k, Z.shape[1]))])
    return np.linalg.lstsq(A, rhs, rcond=None)[0].T


def _subset(rng: np.random.Generator, m: int, k: int) -> np.ndarray:
    return rng.permutation(m)[:k]


# --------------------------------------------------------------------------- fit_reconstruction


@pytest.mark.parametrize(("n", "m", "k"), [(100, 12, 5), (100, 12, 12), (30, 8, 1), (9, 20, 9)])
@pytest.mark.parametrize("seed", range(3))
def test_fit_reconstruction_equals_lstsq(n: int, m: int, k: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    Z = rng.standard_normal((n, m))
    S = _subset(rng, m, k)
    B = fit_reconstruction(Z.T @ Z, S)
    assert B.shape == (m, k)
    assert B.dtype == np.float64
    np.testing.assert_array_equal(B[S, :], np.eye(k))  # exact identity rows
    L = np.linalg.lstsq(Z[:, S], Z, rcond=None)[0].T
    assert _rel(B, L) < 1e-8


def test_fit_reconstruction_agrees_with_id() -> None:
    rng = np.random.default_rng(4)
    Z = np.maximum(rng.standard_normal((70, 16)), 0)
    G = Z.T @ Z
    fac = id_factorize(G)
    for k in (1, 5, 10, 16):
        S = fac.selected(k)
        B = fit_reconstruction(G, S)
        np.testing.assert_allclose(B, fac.interpolation(k).T, atol=1e-9)
        assert residual_of(G, S, B) == pytest.approx(fac.residuals[k], abs=1e-9 * fac.total)


@pytest.mark.parametrize("ridge", [1e-3, 0.5, 10.0, 1e4])
def test_ridge_closed_form(ridge: float) -> None:
    rng = np.random.default_rng(1)
    Z = rng.standard_normal((50, 10))
    G = Z.T @ Z
    S = np.array([7, 2, 5, 0])
    B = fit_reconstruction(G, S, ridge=ridge)
    closed = G[:, S] @ np.linalg.inv(G[np.ix_(S, S)] + ridge * np.eye(4))
    np.testing.assert_allclose(B, closed, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(B, _ridge_brute(Z[:, S], Z, np.full(4, ridge)), atol=1e-9)
    # ridge shrinks: the kept rows are no longer the identity
    assert not np.allclose(B[S, :], np.eye(4), atol=1e-6)


def test_weighted_ridge_vector() -> None:
    rng = np.random.default_rng(2)
    Z = rng.standard_normal((40, 8))
    S = np.array([1, 3, 6])
    tau = np.array([0.0, 2.0, 30.0])
    B = fit_reconstruction(Z.T @ Z, S, ridge=tau)
    np.testing.assert_allclose(B, _ridge_brute(Z[:, S], Z, tau), atol=1e-9)
    np.testing.assert_array_equal(fit_reconstruction(Z.T @ Z, S, np.zeros(3))[S], np.eye(3))


def test_ridge_on_singular_system_still_solves() -> None:
    rng = np.random.default_rng(3)
    Z = rng.standard_normal((30, 4))
    Z = np.hstack([Z, Z[:, :1], np.zeros((30, 1))])  # unit 4 duplicates unit 0, unit 5 dead
    S = np.array([0, 4, 5])
    B = fit_reconstruction(Z.T @ Z, S, ridge=0.1)
    np.testing.assert_allclose(B, _ridge_brute(Z[:, S], Z, np.full(3, 0.1)), atol=1e-9)


@pytest.mark.parametrize("case", ["duplicate", "dead", "wide"])
def test_singular_kept_set(case: str) -> None:
    rng = np.random.default_rng(9)
    if case == "wide":
        Z = rng.standard_normal((4, 10))  # k = 6 > n = 4 rows
        S = np.array([0, 2, 4, 6, 8, 9])
    else:
        Z = rng.standard_normal((40, 6))
        if case == "duplicate":
            Z = np.hstack([Z, 3.0 * Z[:, [1]]])  # unit 6 = 3 · unit 1
            S = np.array([1, 6, 3])
        else:
            Z = np.hstack([Z, np.zeros((40, 1))])  # unit 6 dead
            S = np.array([6, 0, 2])
    G = Z.T @ Z
    B = fit_reconstruction(G, S)
    assert np.all(np.isfinite(B))
    np.testing.assert_array_equal(B[S, :], np.eye(S.size))
    L, *_ = np.linalg.lstsq(Z[:, S], Z, rcond=None)
    L = L.T
    # same (optimal) residual as lstsq, and min-norm rows off S equal lstsq's rows
    direct = np.sum((Z - Z[:, S] @ B.T) ** 2)
    best = np.sum((Z - Z[:, S] @ L.T) ** 2)
    assert direct == pytest.approx(best, rel=1e-9, abs=1e-9 * np.sum(Z**2))
    off = np.setdiff1d(np.arange(Z.shape[1]), S)
    assert _rel(B[off], L[off]) < 1e-8
    assert residual_of(G, S, B) == pytest.approx(direct, abs=1e-9 * np.sum(Z**2))


def test_empty_kept_set_and_all_zero() -> None:
    G = np.eye(3)
    assert fit_reconstruction(G, np.array([], dtype=int)).shape == (3, 0)
    assert residual_of(G, [], np.zeros((3, 0))) == pytest.approx(3.0)
    B = fit_reconstruction(np.zeros((3, 3)), [2, 0])
    np.testing.assert_array_equal(B, np.eye(3)[:, [2, 0]])
    Bc = fit_cross_reconstruction(np.zeros((3, 3)), np.ones((3, 2)) * 0, [1])
    np.testing.assert_array_equal(Bc, 0.0)


@SETTINGS
@given(
    st.integers(1, 40),
    st.integers(1, 12),
    st.integers(0, 2**32 - 1),
    st.sampled_from([0.0, 1e-2, 1.0]),
)
def test_fit_is_optimal_and_residual_matches(n: int, m: int, seed: int, ridge: float) -> None:
    rng = np.random.default_rng(seed)
    Z = np.maximum(rng.standard_normal((n, m)), 0)
    G = Z.T @ Z
    k = int(rng.integers(1, m + 1))
    S = _subset(rng, m, k)
    B = fit_reconstruction(G, S, ridge=ridge)
    assert np.all(np.isfinite(B))
    total = max(float(np.sum(Z**2)), 1.0)

    def objective(Bx: np.ndarray) -> float:
        return float(np.sum((Z - Z[:, S] @ Bx.T) ** 2) + ridge * np.sum(Bx**2))

    base = objective(B)
    assert residual_of(G, S, B) == pytest.approx(base - ridge * np.sum(B**2), abs=1e-9 * total)
    for _ in range(3):
        P = B + 1e-3 * rng.standard_normal(B.shape)
        assert objective(P) >= base - 1e-9 * total


# --------------------------------------------------------------------------- cross reconstruction


@pytest.mark.parametrize(("n", "m", "p", "k"), [(120, 10, 10, 4), (120, 10, 7, 7), (60, 6, 15, 5)])
@pytest.mark.parametrize("seed", range(3))
def test_cross_equals_lstsq(n: int, m: int, p: int, k: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    Z = rng.standard_normal((n, m))
    Zc = np.maximum(Z[:, rng.integers(0, m, p)] + 0.3 * rng.standard_normal((n, p)), 0)
    S = _subset(rng, p, k)
    B = fit_cross_reconstruction(Zc.T @ Zc, Zc.T @ Z, S)
    assert B.shape == (m, k)
    L = np.linalg.lstsq(Zc[:, S], Z, rcond=None)[0].T
    assert _rel(B, L) < 1e-8
    direct = float(np.sum((Z - Zc[:, S] @ B.T) ** 2))
    got = cross_residual_of(Z.T @ Z, Zc.T @ Zc, Zc.T @ Z, S, B)
    assert got == pytest.approx(direct, rel=1e-9)


def test_cross_with_ridge() -> None:
    rng = np.random.default_rng(5)
    Z = rng.standard_normal((80, 7))
    Zc = Z + 0.2 * rng.standard_normal((80, 7))
    S = np.array([6, 1, 3])
    tau = np.array([0.5, 0.0, 4.0])
    B = fit_cross_reconstruction(Zc.T @ Zc, Zc.T @ Z, S, ridge=tau)
    np.testing.assert_allclose(B, _ridge_brute(Zc[:, S], Z, tau), atol=1e-9)


def test_cross_equals_fit_reconstruction_when_same_model() -> None:
    rng = np.random.default_rng(6)
    Z = np.maximum(rng.standard_normal((50, 9)), 0)
    G = Z.T @ Z
    S = np.array([4, 0, 8])
    for ridge in (0.0, 0.3):
        np.testing.assert_array_equal(
            fit_cross_reconstruction(G, Z.T @ Z, S, ridge), fit_reconstruction(G, S, ridge)
        )
    # a cross Gram that equals G only up to rounding gives the same answer to rounding
    C = G * (1 + 1e-15 * rng.standard_normal(G.shape))
    np.testing.assert_allclose(
        fit_cross_reconstruction(G, C, S), fit_reconstruction(G, S), atol=1e-9
    )


def test_cross_singular_compressed_activations() -> None:
    rng = np.random.default_rng(8)
    Z = rng.standard_normal((40, 6))
    Zc = Z + 0.1 * rng.standard_normal((40, 6))
    Zc[:, 2] = 0.0  # a unit died in the compressed model
    Zc[:, 4] = -2.0 * Zc[:, 0]  # and one became collinear
    S = np.array([0, 2, 4, 5])
    B = fit_cross_reconstruction(Zc.T @ Zc, Zc.T @ Z, S)
    L = np.linalg.lstsq(Zc[:, S], Z, rcond=None)[0].T  # minimum-norm solution
    assert _rel(B, L) < 1e-8
    np.testing.assert_array_equal(B[:, 1], 0.0)


def test_cross_already_restricted() -> None:
    rng = np.random.default_rng(10)
    Z = rng.standard_normal((60, 8))
    Zs = Z[:, [1, 5, 6]] + 0.05 * rng.standard_normal((60, 3))
    B = fit_cross_reconstruction(Zs.T @ Zs, Zs.T @ Z, np.arange(3))
    np.testing.assert_allclose(B, np.linalg.lstsq(Zs, Z, rcond=None)[0].T, atol=1e-9)


# --------------------------------------------------------------------------- residual_of


@SETTINGS
@given(st.integers(1, 30), st.integers(1, 10), st.integers(0, 2**32 - 1))
def test_residual_of_arbitrary_B(n: int, m: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    Z = rng.standard_normal((n, m))
    k = int(rng.integers(0, m + 1))
    S = _subset(rng, m, k)
    B = rng.standard_normal((m, k))
    direct = float(np.sum((Z - Z[:, S] @ B.T) ** 2))
    scale = float(np.sum(Z**2)) * (1 + float(np.sum(B**2)))
    assert residual_of(Z.T @ Z, S, B) == pytest.approx(direct, abs=1e-12 * scale)


# --------------------------------------------------------------------------- validation


def test_argument_validation() -> None:
    G = np.eye(4)
    with pytest.raises(ValueError, match="S must not contain duplicate"):
        fit_reconstruction(G, [1, 1])
    with pytest.raises(ValueError, match=r"S must contain indices in \[0, 4\)"):
        fit_reconstruction(G, [0, 4])
    with pytest.raises(ValueError, match=r"S must contain indices in \[0, 4\)"):
        fit_reconstruction(G, [-1])
    with pytest.raises(TypeError, match="S must contain integer"):
        fit_reconstruction(G, [0.0, 1.0])
    with pytest.raises(TypeError, match="S must contain integer"):
        fit_reconstruction(G, np.array([True, False]))
    with pytest.raises(ValueError, match="S must be a 1-D"):
        fit_reconstruction(G, [[0, 1]])
    with pytest.raises(ValueError, match="ridge must be non-negative"):
        fit_reconstruction(G, [0], ridge=-1.0)
    with pytest.raises(ValueError, match="ridge must be finite"):
        fit_reconstruction(G, [0], ridge=float("inf"))
    with pytest.raises(ValueError, match="ridge must be a scalar or a vector of length 2"):
        fit_reconstruction(G, [0, 1], ridge=np.ones(3))
    with pytest.raises(ValueError, match=r"C must have shape \(4, \*\)"):
        fit_cross_reconstruction(G, np.ones((3, 4)), [0])
    with pytest.raises(ValueError, match="C contains non-finite"):
        fit_cross_reconstruction(G, np.full((4, 2), np.nan), [0])
    with pytest.raises(ValueError, match="G_comp must be square"):
        fit_cross_reconstruction(np.ones((4, 3)), np.ones((4, 2)), [0])
    with pytest.raises(ValueError, match=r"B must have shape \(4, 2\)"):
        residual_of(G, [0, 1], np.ones((4, 3)))
    with pytest.raises(ValueError, match=r"C must have shape \(4, 3\)"):
        cross_residual_of(np.eye(3), G, np.ones((4, 2)), [0], np.ones((3, 1)))


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 10_000), rank=st.integers(1, 8))
def test_order_residual_curve_matches_direct_least_squares(seed: int, rank: int) -> None:
    """Every prefix of a fixed order, against the exact least squares by direct solve
    (rank-deficient Grams included)."""
    from spectrim.linalg import order_residual_curve, residual_of

    rng = np.random.default_rng(seed)
    Z = rng.standard_normal((40, rank)) @ rng.standard_normal((rank, 8))
    G = Z.T @ Z
    order = rng.permutation(8)
    curve = order_residual_curve(G, order)
    t = float(np.trace(G))
    for k in range(9):
        S = order[:k]
        B = fit_reconstruction(G, S) if k else np.zeros((8, 0))
        want = residual_of(G, S, B) / t
        assert curve[k] == pytest.approx(want, abs=1e-6)


def _pinv_residual(G: np.ndarray, S: np.ndarray) -> float:
    """``tr G − tr(G_{:,S} G_{S,S}⁺ G_{S,:})``: the least squares by pseudo-inverse."""
    if S.size == 0:
        return float(np.trace(G))
    return float(np.trace(G) - np.trace(G[:, S] @ np.linalg.pinv(G[np.ix_(S, S)]) @ G[S, :]))


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 10_000), kind=st.sampled_from(["copy", "sum", "dead"]))
def test_order_residual_curve_with_a_dependent_unit_before_the_span_is_full(
    seed: int, kind: str
) -> None:
    """A unit that lies in the span of some units before it in the order (a copy, a
    combination, a dead unit) while the span is not yet everything: it explains nothing.
    The unpivoted QR gave it an arbitrary direction, which counted as explained energy
    (an order [4, 1, 0, ...] with unit 0 = unit 4 + 2·unit 1 read 0.18 at k = 3 where the
    least squares leave 0.63)."""
    from spectrim.linalg import order_residual_curve

    rng = np.random.default_rng(seed)
    Z = rng.standard_normal((40, 8))
    order = rng.permutation(8)
    a, b, c = order[:3]  # c depends on a and b, which come before it
    Z[:, c] = {"copy": Z[:, a], "sum": Z[:, a] - 2 * Z[:, b], "dead": 0 * Z[:, a]}[kind]
    G = Z.T @ Z
    curve = order_residual_curve(G, order)
    t = float(np.trace(G))
    for k in range(9):
        assert curve[k] == pytest.approx(_pinv_residual(G, order[:k]) / t, abs=1e-8), k
    assert curve[3] == pytest.approx(curve[2], abs=1e-12)


# --------------------------------------------------------------------------- from rows


@pytest.mark.parametrize(("n", "k"), [(40, 3), (6, 4), (3, 5)])
def test_fit_from_rows_is_least_squares_on_the_rows(n: int, k: int) -> None:
    from spectrim.linalg import fit_rows_reconstruction

    rng = np.random.default_rng(n)
    Y = rng.standard_normal((n, 8))
    S = np.array([6, 1, 3, 0, 5][:k])
    B, res = fit_rows_reconstruction(Y, S)
    brute = np.linalg.lstsq(Y[:, S], Y, rcond=None)[0]  # minimum norm when n < k
    np.testing.assert_allclose(
        B[np.setdiff1d(np.arange(8), S)], brute.T[np.setdiff1d(np.arange(8), S)], atol=1e-9
    )
    np.testing.assert_allclose(B[S], np.eye(k))
    assert res == pytest.approx(((Y - Y[:, S] @ B.T) ** 2).sum(), abs=1e-9)
    # with a ridge: the closed form on the rows' Gram
    Br, _ = fit_rows_reconstruction(Y, S, ridge=0.5)
    np.testing.assert_allclose(Br, fit_reconstruction(Y.T @ Y, S, ridge=0.5), atol=1e-10)
