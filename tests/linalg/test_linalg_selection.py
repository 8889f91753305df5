"""Spectral-pruning greedy selection against brute force (papers §2.3, §2.8, §5b.1)."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from spectrim.linalg import (
    block_greedy,
    cross_greedy,
    degrees_of_freedom,
    fit_reconstruction,
    gram_spectrum,
    spectral_greedy,
    spectral_loss,
)


def _problem(seed: int, m: int, rank: int | None = None, n: int = 300):
    rng = np.random.default_rng(seed)
    r = m if rank is None else rank
    Z = np.maximum(rng.standard_normal((n, r)) @ rng.standard_normal((r, m)), 0.0)
    Z[:, 0] = 0.0  # a dead unit
    W = rng.standard_normal((5, m))
    return Z, Z.T @ Z / n, W.T @ W


def _brute_loss(Z: np.ndarray, J: list[int], M: np.ndarray, tau: np.ndarray) -> float:
    """min_A ‖Z − Z_J Aᵀ‖²_M/n + Σ_j τ_j‖A[:, j]‖²_M solved explicitly by ridge regression."""
    n = Z.shape[0]
    if not J:
        return float(np.trace(M @ (Z.T @ Z) / n))
    ZJ = Z[:, J]
    A = np.linalg.solve(ZJ.T @ ZJ / n + np.diag(tau[J]), ZJ.T @ Z / n).T  # (m, k)
    R = Z - ZJ @ A.T
    return float(np.trace(M @ (R.T @ R) / n) + np.sum(tau[J] * np.einsum("ij,ik,kj->j", A, M, A)))


@pytest.mark.parametrize("theta", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("tau", [0.0, 0.05])
def test_greedy_matches_brute_force_steps(theta: float, tau: float) -> None:
    """Each greedy step picks the unit whose addition minimises the objective (brute force
    over all candidates), and the tracked losses equal the direct formula."""
    Z, sigma, W = _problem(0, 7)
    M = theta * np.eye(7) + (1 - theta) * W
    taus = np.full(7, tau)
    sel = spectral_greedy(sigma, theta=theta, weight=W, tau=tau)
    J: list[int] = []
    for step in range(7):
        cands = [j for j in range(7) if j not in J]
        losses = {j: spectral_loss(sigma, [*J, j], theta=theta, weight=W, tau=tau) for j in cands}
        best = min(losses.values())
        j = int(sel.order[step])
        assert losses[j] <= best + 1e-9 * max(abs(best), 1.0)
        J.append(j)
        assert sel.losses[step + 1] == pytest.approx(losses[j], rel=1e-8, abs=1e-10)
        # the formula equals the explicit ridge-regression objective on the data
        if tau > 0 or np.linalg.matrix_rank(Z[:, J]) == len(J):
            assert losses[j] == pytest.approx(_brute_loss(Z, J, M, taus), rel=1e-7, abs=1e-9)


def test_small_m_greedy_is_near_the_best_subset() -> None:
    """Not a guarantee (greedy), but on a small problem it is within a few percent of the
    exhaustive optimum at every k and exactly optimal at k = 1."""
    _, sigma, W = _problem(1, 8)
    sel = spectral_greedy(sigma, theta=0.5, weight=W)
    for k in range(1, 8):
        best = min(
            spectral_loss(sigma, list(J), theta=0.5, weight=W)
            for J in itertools.combinations(range(8), k)
        )
        assert sel.losses[k] <= best * 1.05 + 1e-12
        if k == 1:
            assert sel.losses[1] == pytest.approx(best, rel=1e-10)


def test_exact_reconstruction_at_rank_theta1_tau0() -> None:
    """θ=1, τ→0, k ≥ rank: zero loss, and the ridge reconstruction reproduces every unit."""
    Z, sigma, _ = _problem(2, 12, rank=4)
    rank = np.linalg.matrix_rank(Z)
    sel = spectral_greedy(sigma, theta=1.0, tau=0.0)
    assert sel.losses[rank] <= 1e-10 * sel.losses[0]
    J = np.sort(sel.selected(rank))
    B = fit_reconstruction(sigma, J, ridge=1e-14)
    np.testing.assert_allclose(Z[:, J] @ B.T, Z, atol=1e-6 * np.abs(Z).max())
    assert 0 not in J  # the dead unit carries nothing


def test_loss_a_equals_measured_mse_of_the_pruned_layer() -> None:
    """L_A from Σ equals the mean squared reconstruction error measured on the data, plus
    the ridge term (papers §2.8)."""
    Z, sigma, _ = _problem(3, 10)
    tau = 0.01 * np.trace(sigma)
    J = np.sort(spectral_greedy(sigma, 4, tau=tau).selected(4))
    A = fit_reconstruction(sigma, J, ridge=tau)
    mse = float(np.mean(np.sum((Z - Z[:, J] @ A.T) ** 2, axis=1)))
    ridge_term = tau * float(np.sum(A**2))
    assert spectral_loss(sigma, J, tau=tau) == pytest.approx(mse + ridge_term, rel=1e-9)


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 10_000), m=st.integers(1, 9), theta=st.floats(0.0, 1.0))
def test_greedy_losses_non_increasing_and_start_at_trace(seed: int, m: int, theta: float) -> None:
    _, sigma, W = _problem(seed, m, n=50)
    sel = spectral_greedy(sigma, theta=theta, weight=W, tau=1e-3)
    assert sorted(sel.order.tolist()) == list(range(m))
    M = theta * np.eye(m) + (1 - theta) * W
    assert sel.losses[0] == pytest.approx(float(np.sum(M * sigma)), rel=1e-12, abs=1e-12)
    assert np.all(np.diff(sel.losses) <= 1e-9 * max(sel.losses[0], 1e-300))


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 10_000), m=st.integers(1, 12), rank=st.integers(1, 12))
def test_degrees_of_freedom_monotone_and_below_rank(seed: int, m: int, rank: int) -> None:
    Z, sigma, _ = _problem(seed, m, rank=min(rank, m), n=40)
    mu = gram_spectrum(sigma)
    lams = np.logspace(-6, 2, 20) * max(np.trace(sigma), 1e-12)
    dof = np.asarray(degrees_of_freedom(mu, lams))
    assert np.all(np.diff(dof) <= 1e-12)
    assert dof[0] <= np.linalg.matrix_rank(Z) + 1e-9


def test_validation() -> None:
    with pytest.raises(ValueError, match="theta"):
        spectral_greedy(np.eye(3), theta=1.5)
    with pytest.raises(ValueError, match="weighting"):
        spectral_greedy(np.eye(3), theta=0.5)
    with pytest.raises(ValueError, match="tau"):
        spectral_greedy(np.eye(3), tau=[-1.0, 0.0, 0.0])
    with pytest.raises(ValueError, match="k="):
        spectral_greedy(np.eye(3), 4)


# --- block_greedy (attention heads) -----------------------------------------------------


def _blocks(sizes: list[int]) -> list[np.ndarray]:
    ends = np.cumsum(sizes)
    return [np.arange(e - s, e) for s, e in zip(sizes, ends, strict=True)]


def _brute_block_greedy(S, blocks, theta=1.0, weight=None):
    """Greedy by direct solves: at each step the block whose union with the chosen ones
    has the smallest spectral_loss."""
    chosen: list[int] = []
    losses = [spectral_loss(S, [], theta=theta, weight=weight)]
    for _ in range(len(blocks)):
        best = min(
            (j for j in range(len(blocks)) if j not in chosen),
            key=lambda j: spectral_loss(
                S, np.concatenate([blocks[i] for i in [*chosen, j]]), theta=theta, weight=weight
            ),
        )
        chosen.append(best)
        losses.append(
            spectral_loss(
                S, np.concatenate([blocks[i] for i in chosen]), theta=theta, weight=weight
            )
        )
    return chosen, np.array(losses)


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 10_000), theta=st.sampled_from([1.0, 0.5, 0.0]))
def test_block_greedy_matches_brute_force(seed: int, theta: float) -> None:
    rng = np.random.default_rng(seed)
    sizes = list(rng.integers(1, 4, size=int(rng.integers(2, 6))))
    m = int(sum(sizes))
    Z = rng.standard_normal((3 * m, m)) * rng.uniform(0.2, 3.0, size=m)
    S = Z.T @ Z
    A = rng.standard_normal((4, m))
    W = A.T @ A
    blocks = _blocks(sizes)
    sel = block_greedy(S, blocks, theta=theta, weight=None if theta == 1.0 else W)
    order, losses = _brute_block_greedy(S, blocks, theta, None if theta == 1.0 else W)
    np.testing.assert_allclose(sel.losses, losses, rtol=1e-8, atol=1e-8 * losses[0])
    # ties aside, the same blocks in the same order
    assert sel.order.tolist() == order


def test_block_greedy_unit_blocks_equal_spectral_greedy() -> None:
    rng = np.random.default_rng(3)
    Z = rng.standard_normal((50, 8)) * np.arange(1, 9)
    S = Z.T @ Z
    one = spectral_greedy(S)
    blk = block_greedy(S, [np.array([i]) for i in range(8)])
    assert blk.order.tolist() == one.order.tolist()
    np.testing.assert_allclose(blk.losses, one.losses, rtol=1e-9, atol=1e-9 * one.losses[0])


def test_block_greedy_redundant_block_gains_nothing() -> None:
    rng = np.random.default_rng(1)
    X = rng.standard_normal((80, 3))
    Z = np.hstack([X, X @ rng.standard_normal((3, 3)), rng.standard_normal((80, 2)) * 1e-3])
    sel = block_greedy(Z.T @ Z, _blocks([3, 3, 2]))
    assert sel.order[0] in (0, 1) and sel.order[1] == 2  # the copy adds nothing
    assert sel.losses[1] < 1e-3 * sel.losses[0]


def test_block_greedy_rejects_overlapping_blocks() -> None:
    with pytest.raises(ValueError, match="disjoint"):
        block_greedy(np.eye(4), [np.array([0, 1]), np.array([1, 2])])


def _cross_problem(seed: int, m: int, p: int, rank: int, n: int = 200):
    """Original units Z (n×p) and a drifted, partly dead copy Z' (n×m) of the same rows."""
    rng = np.random.default_rng(seed)
    base = np.maximum(rng.standard_normal((n, rank)) @ rng.standard_normal((rank, m)), 0.0)
    Zc = base + 0.1 * rng.standard_normal((n, m))
    Zc[:, 1] = 0.0  # a dead unit in the compressed prefix
    Zc[:, 2] = Zc[:, 3]  # and a duplicate
    Z = base[:, :p] if p <= m else np.hstack([base, base[:, : p - m] ** 2])
    return Z, Zc


def _cross_brute(Z: np.ndarray, Zc: np.ndarray, S: list[int]) -> float:
    """min_B ‖Z − Zc[:, S] Bᵀ‖² by least squares on the rows."""
    if not S:
        return float(np.sum(Z * Z))
    B, *_ = np.linalg.lstsq(Zc[:, S], Z, rcond=None)
    R = Z - Zc[:, S] @ B
    return float(np.sum(R * R))


@settings(max_examples=15, deadline=None)
@given(
    seed=st.integers(0, 10_000),
    m=st.integers(4, 9),
    p=st.integers(1, 12),
    rank=st.integers(1, 9),
)
def test_cross_greedy_matches_brute_force_steps(seed: int, m: int, p: int, rank: int) -> None:
    """Every step's loss is the least-squares residual of the rows, and every choice is
    the best single addition by brute force (ties only among zero gains)."""
    Z, Zc = _cross_problem(seed, m, p, rank)
    sel = cross_greedy(Zc.T @ Zc, Zc.T @ Z, float(np.sum(Z * Z)))
    total = float(np.sum(Z * Z))
    for i in range(m + 1):
        S = sel.order[:i].tolist()
        assert sel.losses[i] == pytest.approx(_cross_brute(Z, Zc, S), abs=1e-7 * total)
    for i in range(m):
        S = sel.order[:i].tolist()
        best = min(_cross_brute(Z, Zc, [*S, j]) for j in range(m) if j not in S)
        assert _cross_brute(Z, Zc, [*S, int(sel.order[i])]) <= best + 1e-7 * total
    assert sorted(sel.order.tolist()) == list(range(m))


@settings(max_examples=10, deadline=None)
@given(seed=st.integers(0, 10_000), m=st.integers(4, 7), p=st.integers(1, 8))
def test_cross_greedy_weighted_matches_brute_force(seed: int, m: int, p: int) -> None:
    """With a weight M the loss is tr(M EᵀE) of the least-squares residual E (the fit
    itself does not depend on M), and each choice is the best single addition."""
    Z, Zc = _cross_problem(seed, m, p, rank=3)
    rng = np.random.default_rng(seed + 1)
    W = rng.standard_normal((4, Z.shape[1]))
    M = 0.5 * np.eye(Z.shape[1]) + 0.5 * W.T @ W

    def brute(S: list[int]) -> float:
        E = Z if not S else Z - Zc[:, S] @ np.linalg.lstsq(Zc[:, S], Z, rcond=None)[0]
        return float(np.trace(M @ E.T @ E))

    start = brute([])
    sel = cross_greedy(Zc.T @ Zc, Zc.T @ Z, start, weight=M)
    for i in range(m + 1):
        assert sel.losses[i] == pytest.approx(brute(sel.order[:i].tolist()), abs=1e-7 * start)
    for i in range(m):
        S = sel.order[:i].tolist()
        best = min(brute([*S, j]) for j in range(m) if j not in S)
        assert brute([*S, int(sel.order[i])]) <= best + 1e-7 * start
    # without the start, the same order and the losses offset by it
    off = cross_greedy(Zc.T @ Zc, Zc.T @ Z, weight=M)
    assert off.order.tolist() == sel.order.tolist()
    np.testing.assert_allclose(off.losses + start, sel.losses, atol=1e-7 * start)


def test_cross_greedy_with_equal_matrices_is_the_plain_greedy() -> None:
    """Z' = Z: the same problem as spectral_greedy's input-aware case."""
    Z, sigma, _ = _problem(3, 10, rank=6)
    n = Z.shape[0]
    a = cross_greedy(sigma, sigma, float(np.trace(sigma)))
    b = spectral_greedy(sigma)
    assert a.order[:6].tolist() == b.order[:6].tolist()
    np.testing.assert_allclose(a.losses, b.losses, atol=1e-9 * float(np.trace(Z.T @ Z) / n))


def test_cross_greedy_prefers_the_unit_that_carries_the_target() -> None:
    """A unit with little energy of its own but all of the target's wins over a loud one
    the target does not need (the input-aware greedy on Z' alone picks the loud one)."""
    rng = np.random.default_rng(0)
    n = 500
    signal, loud = rng.standard_normal(n), 10.0 * rng.standard_normal(n)
    Zc = np.stack([0.1 * signal, loud], axis=1)
    Z = signal[:, None]
    assert cross_greedy(Zc.T @ Zc, Zc.T @ Z, float(np.sum(Z * Z)), k=1).order.tolist() == [0]
    assert spectral_greedy(Zc.T @ Zc, 1).order.tolist() == [1]


def test_cross_greedy_validation() -> None:
    g = np.eye(3)
    with pytest.raises(ValueError, match="k=4"):
        cross_greedy(g, np.ones((3, 2)), 1.0, k=4)
    with pytest.raises(ValueError, match="cross"):
        cross_greedy(g, np.ones((2, 2)), 1.0)
    with pytest.raises(ValueError, match="target_energy"):
        cross_greedy(g, np.ones((3, 2)), float("nan"))
    with pytest.raises(ValueError, match="weight must be 2×2"):
        cross_greedy(g, np.ones((3, 2)), weight=np.eye(3))
