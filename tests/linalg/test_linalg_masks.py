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
    obc_masks,
    obc_sparsify,
    obc_trace,
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


@settings(max_examples=20, deadline=None)
@given(st.integers(0, 10_000), st.sampled_from([1e-3, 0.1, 10.0]))
def test_masked_refit_ridge_towards_a_prior_equals_augmented_lstsq(seed: int, damp: float) -> None:
    """``prior``: each row minimises ‖X_S w_S − X w‖² + δ‖w_S − p_S‖², solved here by
    least squares on the rows stacked with √δ·I (δ = damp·mean(diag G))."""
    X, W = _data(seed)
    rng = np.random.default_rng(seed + 2)
    keep = rng.random(W.shape) < 0.5
    P = W + 0.3 * rng.standard_normal(W.shape)
    G = X.T @ X
    delta = damp * float(np.diag(G).mean())
    got = masked_refit(W, G, keep, damp=damp, prior=P)
    for i in range(W.shape[0]):
        S = np.flatnonzero(keep[i])
        if S.size == 0:
            assert not got[i].any()
            continue
        A = np.vstack([X[:, S], np.sqrt(delta) * np.eye(S.size)])
        b = np.concatenate([X @ W[i], np.sqrt(delta) * P[i, S]])
        ref = np.linalg.lstsq(A, b, rcond=None)[0]
        assert np.allclose(got[i, S], ref, atol=1e-7 * max(1.0, np.abs(ref).max()))
    assert not got[~keep].any()
    # an enormous ridge returns the prior's kept entries; the zero prior is the old ridge
    assert np.allclose(masked_refit(W, G, keep, damp=1e9, prior=P), np.where(keep, P, 0), atol=1e-6)
    assert np.allclose(masked_refit(W, G, keep, damp=0.1, prior=np.zeros_like(W)),
                       masked_refit(W, G, keep, damp=0.1))  # fmt: skip


def _damped_np(G: np.ndarray, damp: float) -> np.ndarray:
    H = G.copy()
    d = np.diag(H).copy()
    dead = d <= 0
    d[dead] = 1.0
    d += damp * (d[~dead].mean() if (~dead).any() else 1.0)
    H[np.diag_indices_from(H)] = d
    return H


def _support_error(w: np.ndarray, H: np.ndarray, S: list[int]) -> float:
    """Brute force: min over w̃ supported on S of (w̃ − w)ᵀH(w̃ − w), by solving."""
    if not S:
        return float(w @ H @ w)
    v = np.zeros_like(w)
    v[S] = np.linalg.solve(H[np.ix_(S, S)], (H @ w)[S])
    d = w - v
    return float(d @ H @ d)


@settings(max_examples=15, deadline=None)
@given(st.integers(0, 10_000))
def test_obc_trace_is_the_exact_greedy(seed: int) -> None:
    """Each step of the trace removes the weight whose removal (with the best refit of the
    rest) raises the damped error least, and its loss is that exact increase; weights that
    start at zero are never candidates."""
    X, W = _data(seed, cols=7, rows=3)
    W[1, 2] = W[2, [0, 5]] = 0.0
    G = X.T @ X
    H = _damped_np(G, 0.01)
    order, losses = obc_trace(W, G, damp=0.01)
    for i in range(W.shape[0]):
        S = [j for j in range(W.shape[1]) if W[i, j] != 0]
        e0 = _support_error(W[i], H, S)
        for t in range(order.shape[1]):
            if not S:
                assert order[i, t] == -1 and np.isinf(losses[i, t])
                continue
            errs = {p: _support_error(W[i], H, [q for q in S if q != p]) for p in S}
            best = min(errs, key=errs.__getitem__)
            assert errs[order[i, t]] <= errs[best] + 1e-9 * max(1.0, errs[best])
            assert np.isclose(losses[i, t], errs[order[i, t]] - e0, rtol=1e-6, atol=1e-9)
            S.remove(int(order[i, t]))
            e0 = errs[order[i, t]]


@settings(max_examples=15, deadline=None)
@given(st.integers(0, 10_000), st.sampled_from([0.2, 0.5, 0.8]))
def test_obc_allocation_and_values(seed: int, density: float) -> None:
    """The removals, spread over rows, minimise the summed (running-maximum) step losses
    over every split of the count between rows (brute force); each row loses a prefix of
    its greedy order; the values are the exact masked optimum on the damped Gram; several
    densities from one trace equal separate calls."""
    X, W = _data(seed, cols=5, rows=3)
    G = X.T @ X
    H = _damped_np(G, 0.01)
    values, keep = obc_sparsify(W, G, density)
    assert int(keep.sum()) == round(density * W.size)
    order, losses = obc_trace(W, G)
    mono = np.maximum.accumulate(losses, axis=1)
    cost = np.concatenate([np.zeros((3, 1)), np.cumsum(mono, axis=1)], axis=1)
    removed = 5 - keep.sum(axis=1)
    best = min(
        sum(cost[i, c[i]] for i in range(3))
        for c in itertools.product(range(6), repeat=3)
        if sum(c) == W.size - keep.sum()
    )
    assert np.isclose(sum(cost[i, removed[i]] for i in range(3)), best)
    for i in range(3):
        assert set(np.flatnonzero(~keep[i])) == set(order[i, : removed[i]])
        S = list(np.flatnonzero(keep[i]))
        ref = np.zeros(5)
        if S:
            ref[S] = np.linalg.solve(H[np.ix_(S, S)], (H @ W[i])[S])
        assert np.allclose(values[i], ref, atol=1e-9)
    many = obc_masks(W, G, [0.8, density, 0.2])
    assert np.array_equal(many[1][1], keep) and np.allclose(many[1][0], values)


def test_obc_halves_obs_layer_error_on_resnet20(data_root) -> None:  # type: ignore[no-untyped-def]
    """On a real layer (pretrained ResNet-20, its input Gram on CIFAR-10 images) at 10%
    density, OBC's output error is well below SparseGPT's, with or without the refit."""
    import torch

    from spectrim.calibration.inputs import input_grams
    from spectrim.zoo import load_dataset, load_pretrained

    model = load_pretrained("resnet20-cifar10").eval()
    x = load_dataset("cifar10", "calib", limit=128).tensors[0]
    name = "layer2.1.conv2"
    G = input_grams(model, [x[:64], x[64:]], [name])[name].gram_numpy()
    W = model.get_submodule(name).weight.detach().double().flatten(1).numpy()
    obs, k1 = obs_sparsify(W, G, 0.1)
    obc, k2 = obc_sparsify(W, G, 0.1)
    assert k1.sum() == k2.sum() == round(0.1 * W.size)
    e_obs, e_obc = output_error(W, obs, G), output_error(W, obc, G)
    e_refit = output_error(W, masked_refit(W, G, k1), G)
    assert e_obc < 0.8 * min(e_obs, e_refit), (e_obc, e_obs, e_refit)
    assert torch.isfinite(torch.as_tensor(obc)).all()


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


@pytest.mark.parametrize("shape", [(9, 7), (150, 400), (400, 150), "rank 5"])
def test_matrix_metrics_against_svd(shape: tuple[int, int] | str) -> None:
    """Against full SVDs: small matrices take a dense SVD, larger ones (more than 96
    singular values) the Lanczos iteration for their top ``k``; a matrix of rank below
    ``k`` compares its nonzero directions only."""
    rng = np.random.default_rng(2)
    if shape == "rank 5":  # the top singular subspaces of the mask's result stay defined
        W = rng.standard_normal((200, 5)) @ rng.standard_normal((5, 300))
    else:
        assert isinstance(shape, tuple)
        W = rng.standard_normal(shape) * np.linspace(3.0, 0.1, shape[1])  # a decaying spectrum
    V = np.where(magnitude_keep(W, 0.6), W, 0.0)
    X = rng.standard_normal((50, W.shape[1]))
    k = 3 if shape == (9, 7) else 8
    m = matrix_metrics(W, V, X.T @ X, k=k)
    s = np.linalg.svd(W, compute_uv=False)
    sv = np.linalg.svd(V, compute_uv=False)
    r = min(k, int(np.count_nonzero(s > s[0] * 1e-12)))
    assert m["spectral_error"] == pytest.approx(np.linalg.norm(W - V, 2) / s[0], rel=1e-9)
    assert m["frobenius_error"] == pytest.approx(np.linalg.norm(W - V) / np.linalg.norm(W))
    assert m["top_sv_change"] == pytest.approx(np.max(np.abs(sv[:r] - s[:r]) / s[:r]), rel=1e-9)
    U, _, Vt = np.linalg.svd(W)
    Ub, _, Vtb = np.linalg.svd(V)
    ang = np.degrees(scipy.linalg.subspace_angles(U[:, :r], Ub[:, :r])).max()
    assert m["left_angle"] == pytest.approx(ang, rel=1e-6, abs=1e-6)
    ang = np.degrees(scipy.linalg.subspace_angles(Vt[:r].T, Vtb[:r].T)).max()
    assert m["right_angle"] == pytest.approx(ang, rel=1e-6, abs=1e-6)
    out_err = np.linalg.norm(X @ (W - V).T) ** 2 / np.linalg.norm(X @ W.T) ** 2
    assert m["output_error"] == pytest.approx(out_err)
    assert output_error(W, W, X.T @ X) == 0.0
    assert m["density"] == pytest.approx(np.count_nonzero(V) / V.size)
