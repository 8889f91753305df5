"""PQ index / soft sparsity, spectral norm and stable rank against brute force and invariants."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from spectrim.linalg import (
    power_mean,
    pq_index,
    soft_sparsity,
    spectral_norm,
    stable_rank,
    weight_matrix,
)

SETTINGS = settings(max_examples=60, deadline=None)
PQ = [(0.5, 1.0), (0.2, 1.0), (1.0, 2.0), (0.5, 2.0), (0.8, 1.5)]

vectors = st.lists(
    st.floats(-1e3, 1e3, allow_nan=False, allow_subnormal=False), min_size=1, max_size=40
)


def _pq_loops(w: list[float], p: float, q: float) -> float:
    """``1 − d^{1/q − 1/p}·‖w‖_p/‖w‖_q`` with explicit sums (papers §4.4)."""
    d = len(w)
    norm_p = sum(abs(x) ** p for x in w) ** (1 / p)
    norm_q = sum(abs(x) ** q for x in w) ** (1 / q)
    if norm_q == 0:
        return 0.0
    return 1 - d ** (1 / q - 1 / p) * norm_p / norm_q


@pytest.mark.parametrize(("p", "q"), PQ)
@pytest.mark.parametrize("seed", range(3))
def test_pq_index_matches_norm_formula(p: float, q: float, seed: int) -> None:
    rng = np.random.default_rng(seed)
    W = rng.standard_t(2, size=(7, 30)) * rng.uniform(0.01, 100)
    assert pq_index(W, p, q) == pytest.approx(_pq_loops(W.ravel().tolist(), p, q), abs=1e-12)
    rows = pq_index(W, p, q, axis=1)
    assert isinstance(rows, np.ndarray) and rows.shape == (7,)
    for i in range(7):
        assert rows[i] == pytest.approx(_pq_loops(W[i].tolist(), p, q), abs=1e-12)
    cols = pq_index(W, p, q, axis=0)
    assert cols[3] == pytest.approx(_pq_loops(W[:, 3].tolist(), p, q), abs=1e-12)


def test_power_mean_and_soft_sparsity_brute_force() -> None:
    w = np.array([0.5, -2.0, 0.0, 3.0])
    assert power_mean(w, 0.5) == pytest.approx((np.mean(np.sqrt(np.abs(w)))) ** 2)
    assert power_mean(w, 2.0) == pytest.approx(np.sqrt(np.mean(w**2)))
    si = soft_sparsity(w, 0.5)
    assert si == pytest.approx(power_mean(w, 1.0) / power_mean(w, 0.5))
    assert si == pytest.approx(1 / (1 - pq_index(w, 0.5, 1.0)))
    # Paper 3's unnormalised form: SI = d^{1/q − 1}·‖w‖_1/‖w‖_q
    d, q = 4, 0.5
    assert si == pytest.approx(d ** (1 / q - 1) * np.sum(np.abs(w)) / np.sum(np.abs(w) ** q) ** 2)


def test_extreme_scales_do_not_overflow() -> None:
    w = np.array([1e300, 1e299, 0.0])
    assert 0 < pq_index(w) < 1
    assert pq_index(w) == pytest.approx(pq_index(w / 1e300), rel=1e-12)
    assert pq_index(np.array([1e-300, 1e-300])) == 0.0


@SETTINGS
@given(vectors, st.sampled_from(PQ))
def test_pq_index_bounds(w: list[float], pq: tuple[float, float]) -> None:
    p, q = pq
    d = len(w)
    value = pq_index(w, p, q)
    assert 0.0 <= value <= 1 - d ** (1 / q - 1 / p) + 1e-12
    assert soft_sparsity(w, 0.5) >= 1.0 - 1e-12


@SETTINGS
@given(
    st.integers(1, 50),
    st.floats(1e-6, 1e6),
    st.lists(st.booleans(), min_size=50, max_size=50),
    st.sampled_from(PQ),
)
def test_pq_index_zero_for_constant_magnitude(
    d: int, c: float, signs: list[bool], pq: tuple[float, float]
) -> None:
    w = np.array([c if s else -c for s in signs[:d]])
    assert pq_index(w, *pq) == pytest.approx(0.0, abs=1e-12)
    assert pq_index(np.zeros(d), *pq) == 0.0


@SETTINGS
@given(st.integers(2, 50), st.integers(0, 49), st.sampled_from(PQ))
def test_pq_index_maximal_for_one_nonzero(d: int, at: int, pq: tuple[float, float]) -> None:
    p, q = pq
    w = np.zeros(d)
    w[at % d] = -3.5
    assert pq_index(w, p, q) == pytest.approx(1 - d ** (1 / q - 1 / p), abs=1e-12)


@SETTINGS
@given(vectors, st.floats(1e-3, 1e3), st.sampled_from(PQ))
def test_pq_index_scale_invariant(w: list[float], c: float, pq: tuple[float, float]) -> None:
    a = np.array(w)
    assert pq_index(c * a, *pq) == pytest.approx(pq_index(a, *pq), abs=1e-9)
    assert pq_index(np.r_[a, a], *pq) == pytest.approx(pq_index(a, *pq), abs=1e-9)  # cloning


@SETTINGS
@given(
    st.lists(st.floats(0.01, 100), min_size=2, max_size=30),
    st.floats(0.05, 0.95),
    st.sampled_from(PQ),
)
def test_pq_index_increases_when_mass_concentrates(
    w: list[float], share: float, pq: tuple[float, float]
) -> None:
    """Inverse Robin Hood: moving mass from a smaller entry to a larger one makes w sparser."""
    a = np.array(w)
    i, j = int(np.argmin(a)), int(np.argmax(a))
    assume(a[j] - a[i] > 1e-3 * a[j])
    b = a.copy()
    moved = share * b[i]
    b[i] -= moved
    b[j] += moved
    assert pq_index(b, *pq) > pq_index(a, *pq) - 1e-12


@pytest.mark.parametrize("shape", [(5, 3), (40, 70), (600, 530)])
def test_spectral_norm_and_stable_rank_match_svd(shape: tuple[int, int]) -> None:
    rng = np.random.default_rng(1)
    W = rng.standard_normal(shape) @ np.diag(rng.uniform(0.1, 3, size=shape[1]))
    s = np.linalg.svd(W, compute_uv=False)
    assert spectral_norm(W) == pytest.approx(s[0], rel=1e-9)  # (600, 530): the Lanczos path
    assert stable_rank(W) == pytest.approx(np.sum(s**2) / s[0] ** 2, rel=1e-9)
    assert spectral_norm(torch.tensor(W)) == pytest.approx(s[0], rel=1e-9)


@SETTINGS
@given(st.integers(1, 12), st.integers(1, 12), st.integers(1, 6), st.integers(0, 10_000))
def test_stable_rank_between_one_and_rank(n: int, m: int, r: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    r = min(r, n, m)
    W = rng.standard_normal((n, r)) @ rng.standard_normal((r, m))
    rank = np.linalg.matrix_rank(W)
    sr = stable_rank(W)
    assert 1.0 <= sr <= rank + 1e-9
    assert stable_rank(np.zeros((n, m))) == 0.0 and spectral_norm(np.zeros((n, m))) == 0.0


def test_weight_matrix_and_errors() -> None:
    conv = torch.nn.Conv2d(3, 8, 3)
    W = weight_matrix(conv.weight)
    assert W.shape == (8, 27) and W.dtype == np.float64
    np.testing.assert_array_equal(W[2], conv.weight[2].detach().double().numpy().ravel())
    with pytest.raises(ValueError, match="p < q"):
        pq_index([1.0, 2.0], p=1.0, q=1.0)
    with pytest.raises(ValueError, match="positive"):
        pq_index([1.0], p=-0.5)
    with pytest.raises(ValueError, match="non-finite"):
        pq_index([1.0, float("nan")])
    with pytest.raises(ValueError, match="empty"):
        pq_index([])
    with pytest.raises(ValueError, match="0 < q < 1"):
        soft_sparsity([1.0], q=1.5)
    with pytest.raises(ValueError, match="2-D"):
        stable_rank(np.ones(3))
