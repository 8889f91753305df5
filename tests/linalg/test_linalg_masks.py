"""Weight-sparsification kernels against brute force (numpy lstsq, SVD, enumeration)."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import scipy.linalg
from hypothesis import given, settings
from hypothesis import strategies as st

from spectrim.linalg.masks import (
    global_threshold,
    lasso_rows,
    magnitude_keep,
    masked_refit,
    matrix_metrics,
    nm_keep,
    obs_sparsify,
    output_error,
    parse_nm,
    pq_keep_counts,
    spectrum_sparsify,
    wanda_scores,
)


def _data(seed: int, n: int = 200, cols: int = 8, rows: int = 5):
    rng = np.random.default_rng(seed)
    # correlated inputs, so the data-aware choices differ from magnitude
    X = rng.standard_normal((n, cols)) @ rng.standard_normal((cols, cols))
    W = rng.standard_normal((rows, cols))
    return X, W


def _masked_lstsq(X: np.ndarray, W: np.ndarray, keep: np.ndarray, Y: np.ndarray | None = None):
    """Brute force: per row, lstsq of the row's output on the kept input columns."""
    target = X @ W.T if Y is None else Y
    out = np.zeros_like(W)
    for i in range(W.shape[0]):
        S = np.flatnonzero(keep[i])
        if S.size:
            out[i, S] = np.linalg.lstsq(X[:, S], target[:, i], rcond=None)[0]
    return out


def test_parse_nm_and_errors() -> None:
    assert parse_nm("2:4") == (2, 4)
    for bad in ("4:2", "2-4", "a:b", "0:4", "2:2"):
        with pytest.raises(ValueError, match="n:m pattern"):
            parse_nm(bad)


def test_magnitude_keep_counts_and_global_threshold() -> None:
    rng = np.random.default_rng(0)
    W = rng.standard_normal((6, 10))
    keep = magnitude_keep(W, 0.3)
    assert keep.sum() == 18
    # every kept |w| is at least every dropped one
    assert np.abs(W[keep]).min() >= np.abs(W[~keep]).max()
    rows = magnitude_keep(W, 0.5, scope="row")
    assert (rows.sum(axis=1) == 5).all()
    A, B = rng.standard_normal((3, 4)), rng.standard_normal((5, 2))
    thr = global_threshold([np.abs(A), np.abs(B)], 0.5)
    assert (np.abs(A) >= thr).sum() + (np.abs(B) >= thr).sum() == 11
    with pytest.raises(ValueError, match="density"):
        magnitude_keep(W, 0.0)
    with pytest.raises(ValueError, match="density"):
        magnitude_keep(W, 1.5)


@settings(max_examples=25, deadline=None)
@given(st.integers(1, 3), st.integers(0, 10_000))
def test_nm_keep_pattern(n: int, seed: int) -> None:
    m = 4
    s = np.random.default_rng(seed).random((3, 10))
    keep = nm_keep(s, n, m)
    for g in range(2):  # two full groups of 4, then 2 trailing columns kept
        block = keep[:, 4 * g : 4 * g + 4]
        assert (block.sum(axis=1) == n).all()
        vals = s[:, 4 * g : 4 * g + 4]
        for i in range(3):
            assert vals[i][block[i]].min() >= vals[i][~block[i]].max()
    assert keep[:, 8:].all()


def _pq_bound_brute(w: np.ndarray, p: float, q: float, eta: float) -> int:
    x = np.abs(w[w != 0])
    d = x.size
    index = 1 - d ** (1 / q - 1 / p) * np.sum(x**p) ** (1 / p) / np.sum(x**q) ** (1 / q)
    r = d * (1 + eta) ** (-q / (q - p)) * (1 - index) ** (q * p / (q - p))
    return max(min(math.ceil(r - 1e-9), d), 1)


@settings(max_examples=40, deadline=None)
@given(
    st.integers(0, 10_000),
    st.sampled_from([(0.5, 1.0), (0.3, 1.0), (1.0, 2.0), (0.7, 1.0)]),
    st.sampled_from([0.0, 0.1, 0.5]),
)
def test_pq_keep_counts_against_the_formula(seed: int, pq: tuple[float, float], eta: float) -> None:
    rng = np.random.default_rng(seed)
    W = rng.standard_t(2, size=(4, 12)) * (rng.random((4, 12)) > 0.2)
    W[0, 0] = 1.0  # no empty row
    p, q = pq
    got = pq_keep_counts(W, p, q, eta)
    want = [_pq_bound_brute(W[i], p, q, eta) if np.any(W[i]) else 0 for i in range(4)]
    assert list(got) == want
    assert pq_keep_counts(W, p, q, eta, scope="layer") == _pq_bound_brute(W.ravel(), p, q, eta)


def test_lq_count_is_paper3_formula() -> None:
    """ABP-M's ⌈d·SI^{−q/(1−q)}·(1+η)^{−1/(1−q)}⌉ with SI = M₁/M_q (papers §4.1)."""
    w = np.array([[5.0, 1.0, 0.5, 0.2, 0.1, 0.05]])
    q, eta = 0.5, 0.2
    d = w.size
    si = np.mean(np.abs(w)) / np.mean(np.abs(w) ** q) ** (1 / q)
    r = math.ceil(d * si ** (-q / (1 - q)) * (1 + eta) ** (-1 / (1 - q)))
    assert pq_keep_counts(w, q, 1.0, eta)[0] == r
    with pytest.raises(ValueError, match="0 < p < q"):
        pq_keep_counts(w, 1.0, 0.5)
    with pytest.raises(ValueError, match="eta"):
        pq_keep_counts(w, 0.5, 1.0, eta=-1)


def test_wanda_scores() -> None:
    X, W = _data(1)
    s = wanda_scores(W, X.T @ X)
    assert np.allclose(s, np.abs(W) * np.linalg.norm(X, axis=0))


@settings(max_examples=20, deadline=None)
@given(st.integers(0, 10_000))
def test_masked_refit_equals_lstsq(seed: int) -> None:
    X, W = _data(seed)
    rng = np.random.default_rng(seed + 1)
    keep = rng.random(W.shape) < 0.5
    got = masked_refit(W, X.T @ X, keep, damp=0.0)
    assert np.allclose(got, _masked_lstsq(X, W, keep), atol=1e-8)
    assert not got[~keep].any()
    # cross term: reconstruct the outputs of other inputs Xo from X
    Xo = X + 0.1 * rng.standard_normal(X.shape)
    got = masked_refit(W, X.T @ X, keep, C=X.T @ Xo, damp=0.0)
    assert np.allclose(got, _masked_lstsq(X, W, keep, Xo @ W.T), atol=1e-8)


def test_obs_is_exact_masked_least_squares_when_pruned_columns_come_first() -> None:
    X, W = _data(3, cols=8)
    keep = np.ones(W.shape, dtype=bool)
    keep[:, :3] = False  # every pruned weight precedes every kept one
    keep[1, 5] = False  # ... except one, but in its own row: row 1 checked separately
    out, k = obs_sparsify(W, X.T @ X, keep=keep, damp=0.0)
    ref = _masked_lstsq(X, W, keep)
    assert (k == keep).all()
    rows = [0, 2, 3, 4]
    assert np.allclose(out[rows], ref[rows], atol=1e-8)


@pytest.mark.parametrize("seed", range(4))
def test_obs_against_exhaustive_masks(seed: int) -> None:
    """On a 1×6 row at 50%: OBS's error is never below the best mask's (all 20 masks
    enumerated, each with its exact masked least squares), and refitting OBS's own mask
    reaches that mask's optimum, never above OBS's values."""
    X, W = _data(seed, cols=6, rows=1)
    G = X.T @ X

    def err(V: np.ndarray) -> float:
        return float(np.linalg.norm(X @ (W - V).T) ** 2)

    best = min(
        err(_masked_lstsq(X, W, np.isin(np.arange(6), S)[None, :]))
        for S in itertools.combinations(range(6), 3)
    )
    out, keep = obs_sparsify(W, G, 0.5, damp=0.0)
    assert keep.sum() == 3
    assert err(out) >= best - 1e-9
    refit = masked_refit(W, G, keep, damp=0.0)
    assert best - 1e-9 <= err(refit) <= err(out) + 1e-9


def test_obs_and_wanda_beat_magnitude_on_correlated_inputs() -> None:
    """Not a theorem per matrix (the masks are heuristics), but on average over random
    layers with unevenly scaled, correlated inputs the data-aware masks reconstruct the
    output better than magnitude's."""
    errs: dict[str, list[float]] = {"magnitude": [], "wanda": [], "obs": []}
    for seed in range(30):
        rng = np.random.default_rng(seed)
        X = rng.standard_normal((300, 16)) * rng.uniform(0.1, 3.0, 16)
        X = X + 0.5 * X[:, [0]]
        W = rng.standard_normal((8, 16))
        G = X.T @ X
        mag = np.where(magnitude_keep(W, 0.5, scope="row"), W, 0.0)
        wk = np.zeros_like(W, dtype=bool)
        s = wanda_scores(W, G)
        for i in range(8):
            wk[i, np.argsort(-s[i])[:8]] = True
        obs, _ = obs_sparsify(W, G, 0.5)
        for name, V in (("magnitude", mag), ("wanda", np.where(wk, W, 0.0)), ("obs", obs)):
            errs[name].append(output_error(W, V, G))
    mean = {k: float(np.mean(v)) for k, v in errs.items()}
    assert mean["obs"] < mean["wanda"] < mean["magnitude"]


def test_obs_density_one_and_nm() -> None:
    X, W = _data(5, cols=16)
    out, keep = obs_sparsify(W, X.T @ X, 1.0)
    assert keep.all() and np.allclose(out, W)
    out, keep = obs_sparsify(W, X.T @ X, nm=(2, 4))
    assert (keep.reshape(W.shape[0], 4, 4).sum(axis=2) == 2).all()
    assert not out[~keep].any()


def test_lasso_rows_kkt_and_zero_penalty() -> None:
    X, W = _data(7, n=400)
    Xc = X - X.mean(axis=0)
    S = Xc.T @ Xc / X.shape[0]
    lam = 0.5
    w = lasso_rows(W, S, lam, tol=1e-12, max_sweeps=5000)
    grad = (w - W) @ S  # ∂/∂w of ½(w−w₀)ᵀΣ(w−w₀)
    nz = w != 0
    assert np.allclose(grad[nz], -lam * np.sign(w[nz]), atol=1e-6)
    assert (np.abs(grad[~nz]) <= lam + 1e-6).all()
    assert (~nz).any()
    assert np.allclose(lasso_rows(W, S, 0.0, tol=1e-13, max_sweeps=5000), W, atol=1e-6)


def test_spectrum_sampler_is_unbiased_over_seeds() -> None:
    rng = np.random.default_rng(0)
    W = rng.standard_normal((6, 8))
    runs = [
        spectrum_sparsify(W, 0.5, det_fraction=0.25, rng=np.random.default_rng(s))[0]
        for s in range(4000)
    ]
    mean = np.mean(runs, axis=0)
    sd = np.std(runs, axis=0) / math.sqrt(len(runs))
    assert np.all(np.abs(mean - W) <= 5 * sd + 1e-12)
    kept = np.mean([np.count_nonzero(r) for r in runs[:500]])
    assert abs(kept - 24) < 0.5  # the budget is met in expectation
    # det_fraction=1 is magnitude pruning
    det, keep = spectrum_sparsify(W, 0.5, det_fraction=1.0)
    assert (keep == magnitude_keep(W, 0.5)).all() and np.allclose(det[keep], W[keep])
    for dist in ("l2", "hybrid"):
        V, keep = spectrum_sparsify(W, 0.5, distribution=dist, rescale=False)
        assert np.allclose(V[keep], W[keep])


def test_matrix_metrics_against_svd() -> None:
    rng = np.random.default_rng(2)
    W = rng.standard_normal((9, 7))
    V = np.where(magnitude_keep(W, 0.6), W, 0.0)
    X = rng.standard_normal((50, 7))
    m = matrix_metrics(W, V, X.T @ X, k=3)
    s = np.linalg.svd(W, compute_uv=False)
    sv = np.linalg.svd(V, compute_uv=False)
    assert m["spectral_error"] == pytest.approx(np.linalg.norm(W - V, 2) / s[0])
    assert m["frobenius_error"] == pytest.approx(np.linalg.norm(W - V) / np.linalg.norm(W))
    assert m["top_sv_change"] == pytest.approx(np.max(np.abs(sv[:3] - s[:3]) / s[:3]))
    U, _, Vt = np.linalg.svd(W)
    Ub, _, Vtb = np.linalg.svd(V)
    ang = np.degrees(scipy.linalg.subspace_angles(U[:, :3], Ub[:, :3])).max()
    assert m["left_angle"] == pytest.approx(ang)
    ang = np.degrees(scipy.linalg.subspace_angles(Vt[:3].T, Vtb[:3].T)).max()
    assert m["right_angle"] == pytest.approx(ang)
    out_err = np.linalg.norm(X @ (W - V).T) ** 2 / np.linalg.norm(X @ W.T) ** 2
    assert m["output_error"] == pytest.approx(out_err)
    assert output_error(W, W, X.T @ X) == 0.0
    assert m["density"] == pytest.approx(np.count_nonzero(V) / V.size)
