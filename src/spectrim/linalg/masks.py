"""Weight sparsification kernels: masks, their corrections and what they do to a matrix.

Every kernel works on one weight matrix ``W`` (``out × cols``: a Linear weight, or a conv
weight read as ``C_out × (C_in·kh·kw)``) and, where it uses data, on the Gram ``G = XᵀX``
of the layer's inputs (``cols × cols``; for a conv the rows of ``X`` are the unfolded
patches).  The output error of replacing ``W`` by ``W̃`` on the calibration rows is
``‖X(W − W̃)ᵀ‖_F² = tr(ΔW G ΔWᵀ)`` (:func:`output_error`).

* Magnitude and random masks, per matrix, per row or pooled over matrices
  (:func:`magnitude_keep`, :func:`global_threshold`), and ``n:m`` patterns (:func:`nm_keep`).
* **ℓq / PQ-index bounds** (papers §4.1, §4.4): :func:`pq_keep_counts` — the number of
  weights ``r = d (1+η)^{−q/(q−p)} (1 − I_{p,q})^{qp/(q−p)}`` a vector needs; Paper 3's
  ABP-M count ``r = d·SI_q^{−q/(1−q)}·(1+η)^{−1/(1−q)}`` is the case ``(p, q) = (q, 1)``.
* **Wanda** (Sun et al. 2024): scores ``|W_ij|·‖X_j‖`` compared within each row
  (:func:`wanda_scores`).
* **OBS / SparseGPT** (Frantar & Alistarh 2023): :func:`obs_sparsify` — the column sweep with
  the damped Gram as Hessian, the mask chosen block by block from ``w²/[H⁻¹]_jj²``, and the
  optimal update of the not-yet-visited columns after each pruned column (lazy block updates).
* **Masked least squares** (:func:`masked_refit`): per row, the kept weights that best
  reproduce a target output on the Gram, ``w_S = G_SS⁻¹ (C wᵀ)_S`` (``C = G`` refits the
  layer's own output; ``C = X_sᵀX_o`` reconstructs the original layer from a sparsified
  prefix's inputs).
* **ℓ1-penalised refit** (Paper 3's ABP-L, :func:`lasso_rows`): coordinate descent on the
  centred Gram, so no activation is kept.
* **Spectrum-preserving sparsification** (Paper 4, our reading of §5.2,
  :func:`spectrum_sparsify`): the largest entries kept deterministically, the rest sampled
  with probabilities ∝ ``|w|``, ``w²`` or the ℓ1/ℓ2 hybrid and rescaled by ``1/p``.
* What a mask did to the matrix (:func:`matrix_metrics`): relative spectral and Frobenius
  errors, change of the top singular values, principal angles of the top subspaces, and
  the output error from the Gram.

Example::

    >>> import numpy as np
    >>> W = np.array([[4.0, -1.0, 0.5, 3.0]])
    >>> magnitude_keep(W, density=0.5).astype(int).tolist()
    [[1, 0, 0, 1]]
    >>> nm_keep(np.abs(W), 1, 2).astype(int).tolist()
    [[1, 0, 0, 1]]
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import scipy.linalg
import torch

__all__ = [
    "global_threshold",
    "lasso_rows",
    "magnitude_keep",
    "masked_refit",
    "matrix_metrics",
    "nm_keep",
    "obc_masks",
    "obc_sparsify",
    "obc_trace",
    "obs_sparsify",
    "output_error",
    "parse_nm",
    "pq_keep_counts",
    "rows_keep",
    "spectrum_sparsify",
    "wanda_scores",
]


def _matrix(W: Any, name: str = "W") -> np.ndarray:
    a = np.asarray(W.detach().cpu() if isinstance(W, torch.Tensor) else W, dtype=np.float64)
    if a.ndim != 2:
        raise ValueError(f"{name} must be a 2-D matrix, got shape {a.shape}")
    if not np.all(np.isfinite(a)):
        raise ValueError(f"{name} contains non-finite values (NaN or inf)")
    return a


def _density(density: float) -> float:
    d = float(density)
    if not 0.0 < d <= 1.0:
        raise ValueError(f"density={density!r} must be in (0, 1] (sparsity in [0, 1))")
    return d


def parse_nm(text: str | tuple[int, int]) -> tuple[int, int]:
    """``"2:4"`` → ``(2, 4)``: at most ``n`` non-zeros in every ``m`` consecutive inputs.

    Example::

        >>> parse_nm("2:4")
        (2, 4)
        >>> parse_nm("4:2")
        Traceback (most recent call last):
        ...
        ValueError: n:m pattern '4:2' needs integers 0 < n < m (e.g. '2:4')
    """
    if isinstance(text, tuple):
        n, m = text
    else:
        parts = str(text).split(":")
        try:
            n, m = (int(p) for p in parts) if len(parts) == 2 else (0, 0)
        except ValueError:
            n, m = 0, 0
    if not 0 < n < m:
        raise ValueError(f"n:m pattern {text!r} needs integers 0 < n < m (e.g. '2:4')")
    return int(n), int(m)


def rows_keep(scores: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """Keep the ``counts[i]`` highest scores of row ``i`` (ties broken by position)."""
    scores = np.asarray(scores, dtype=np.float64)
    counts = np.clip(np.asarray(counts, dtype=np.int64), 0, scores.shape[1])
    order = np.argsort(-scores, axis=1, kind="stable")
    rank = np.empty_like(order)
    np.put_along_axis(rank, order, np.arange(scores.shape[1])[None, :], axis=1)
    return rank < counts[:, None]


def magnitude_keep(W: Any, density: float, scope: str = "layer") -> np.ndarray:
    """Keep the ``round(density·size)`` largest ``|w|`` of the matrix (``scope="layer"``)
    or of every row (``scope="row"``)."""
    a = np.abs(_matrix(W))
    d = _density(density)
    if scope == "row":
        return rows_keep(a, np.full(a.shape[0], round(d * a.shape[1])))
    if scope != "layer":
        raise ValueError(f"scope={scope!r} must be 'layer' or 'row'")
    k = round(d * a.size)
    flat = np.zeros(a.size, dtype=bool)
    flat[np.argsort(-a.ravel(), kind="stable")[:k]] = True
    return flat.reshape(a.shape)


def global_threshold(scores: list[np.ndarray], density: float) -> float:
    """The score above which ``round(density·total)`` entries of all ``scores`` lie (pooled
    over matrices: one threshold for the whole model, ``scope="global"``)."""
    d = _density(density)
    flat = np.concatenate([np.ravel(s) for s in scores])
    k = round(d * flat.size)
    if k >= flat.size:
        return -np.inf
    if k <= 0:
        return np.inf
    return float(np.partition(-flat, k - 1)[k - 1] * -1.0)


def nm_keep(scores: Any, n: int, m: int) -> np.ndarray:
    """Keep the ``n`` highest scores in every group of ``m`` consecutive columns of each row.

    Trailing columns that do not fill a group of ``m`` are kept (a conv with 27 input
    columns gets 6 groups of 4 and 3 dense columns).
    """
    s = np.asarray(scores, dtype=np.float64)
    n, m = parse_nm((n, m))
    keep = np.ones(s.shape, dtype=bool)
    full = (s.shape[1] // m) * m
    if full:
        blocks = s[:, :full].reshape(s.shape[0], -1, m)
        order = np.argsort(-blocks, axis=2, kind="stable")
        kb = np.zeros(blocks.shape, dtype=bool)
        np.put_along_axis(kb, order[..., :n], True, axis=2)
        keep[:, :full] = kb.reshape(s.shape[0], full)
    return keep


def pq_keep_counts(
    W: Any, p: float, q: float, eta: float = 0.0, scope: str = "row"
) -> np.ndarray | int:
    """PQ-index bound on the weights to keep (papers §4.4, Diao et al. 2023, Theorem 2):
    ``r = ⌈d (1+η)^{−q/(q−p)} (1 − I_{p,q}(w))^{qp/(q−p)}⌉``, over the non-zero entries.

    ``scope="row"`` gives one count per row (per neuron), ``"layer"`` one for the matrix.
    With ``(p, q) = (q_ℓ, 1)`` this is Paper 3's ABP-M count
    ``⌈d·SI_q^{−q/(1−q)}·(1+η)^{−1/(1−q)}⌉`` (``1 − I_{q,1} = 1/SI_q``).  A row with no
    non-zero keeps 0; a row with one keeps 1.

    Example::

        >>> pq_keep_counts([[1.0, 1.0, 1.0, 1.0], [1.0, 0.0, 0.0, 0.0]], 0.5, 1.0).tolist()
        [4, 1]
        >>> int(pq_keep_counts([[3.0, 1.0]], 0.5, 1.0, eta=1.0, scope="layer"))
        1
    """
    a = np.abs(_matrix(W))
    p, q, eta = float(p), float(q), float(eta)
    if not (0.0 < p < q):
        raise ValueError(f"the PQ bound needs 0 < p < q, got p={p!r}, q={q!r}")
    if not (math.isfinite(eta) and eta > -1.0):
        raise ValueError(
            f"eta={eta!r} must be a finite number > -1 (0 is the tolerance-free bound)"
        )
    rows = a if scope == "row" else a.reshape(1, -1)
    if scope not in ("row", "layer"):
        raise ValueError(f"scope={scope!r} must be 'row' or 'layer'")
    nz = rows > 0
    d = nz.sum(axis=1).astype(np.float64)
    scale = np.where(d > 0, rows.max(axis=1), 1.0)
    u = rows / scale[:, None]
    with np.errstate(divide="ignore", invalid="ignore"):
        mp = (np.sum(np.where(nz, u, 0.0) ** p, axis=1) / np.maximum(d, 1)) ** (1.0 / p)
        mq = (np.sum(np.where(nz, u, 0.0) ** q, axis=1) / np.maximum(d, 1)) ** (1.0 / q)
        ratio = np.where(mq > 0, mp / np.where(mq > 0, mq, 1.0), 1.0)  # 1 − I
    ratio = np.clip(ratio, 0.0, 1.0)
    r = d * (1.0 + eta) ** (-q / (q - p)) * ratio ** (q * p / (q - p))
    counts = np.minimum(np.ceil(r - 1e-9), d).astype(np.int64)
    counts = np.where(d > 0, np.maximum(counts, 1), 0)
    return counts if scope == "row" else int(counts[0])


def wanda_scores(W: Any, G: Any) -> np.ndarray:
    """Wanda's importance ``|W_ij|·‖X_j‖₂`` with ``‖X_j‖₂² = G_jj`` (compare within rows)."""
    a = _matrix(W)
    g = np.diag(_matrix(G, "G"))
    if g.shape[0] != a.shape[1]:
        raise ValueError(f"G is {g.shape[0]}-wide, W has {a.shape[1]} columns")
    return np.abs(a) * np.sqrt(np.maximum(g, 0.0))[None, :]


def _damped(G: np.ndarray, damp: float) -> torch.Tensor:
    H = torch.as_tensor(G, dtype=torch.float64).clone()
    diag = torch.diagonal(H)
    dead = diag <= 0
    diag[dead] = 1.0
    mean = float(diag[~dead].mean()) if bool((~dead).any()) else 1.0
    diag += float(damp) * mean
    return H


def obs_sparsify(
    W: Any,
    G: Any,
    density: float | None = None,
    nm: tuple[int, int] | None = None,
    *,
    blocksize: int = 128,
    damp: float = 0.01,
    keep: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """SparseGPT's OBS sweep: ``(W̃, keep)`` minimising ``tr(ΔW H ΔWᵀ)`` greedily.

    ``H = G + damp·mean(diag G)·I`` (inputs that never fire get ``H_jj = 1`` and their
    weights zero). Columns are visited left to right; within each block of ``blocksize``
    columns the mask keeps, over the whole block, the ``density`` share of the largest
    ``w_ij² / [H⁻¹]_jj²`` (or the ``n`` largest of every ``m`` columns per row for
    ``nm``), or follows a given ``keep`` mask.  After each pruned column the
    not-yet-visited weights of the row get the optimal compensation ``−δ_j [H⁻¹]_{j,j:}``
    from the upper Cholesky factor of ``H⁻¹``; the updates of later blocks are applied
    once per block.  When every pruned weight of a row precedes every kept one this is
    exactly the masked least squares of :func:`masked_refit`; otherwise it is the
    sequential approximation SparseGPT makes.
    """
    a = _matrix(W)
    rows, cols = a.shape
    if density is None and nm is None and keep is None:
        raise ValueError("obs_sparsify needs density=, nm= or keep=")
    dens = _density(density) if density is not None else 1.0
    Wt = torch.as_tensor(a, dtype=torch.float64).clone()
    Gm = _matrix(G, "G")
    H = _damped(Gm, damp)
    dead = torch.as_tensor(np.diag(Gm) <= 0)
    Wt[:, dead] = 0.0
    L = torch.linalg.cholesky(H)
    Hinv = torch.cholesky_inverse(L)
    U = torch.linalg.cholesky(Hinv, upper=True)
    if nm is not None:
        blocksize = max(blocksize - blocksize % nm[1], nm[1])
    kept = torch.ones(rows, cols, dtype=torch.bool)
    given = None if keep is None else torch.as_tensor(np.asarray(keep, dtype=bool))
    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        W1 = Wt[:, i1:i2].clone()
        U1 = U[i1:i2, i1:i2]
        Err = torch.zeros_like(W1)
        d1 = torch.diagonal(U1)
        if given is not None:
            k1 = given[:, i1:i2].clone()
        elif nm is None:
            score = (W1**2 / d1[None, :] ** 2).flatten()
            k1 = torch.zeros(score.numel(), dtype=torch.bool)
            nkeep = round(dens * score.numel())
            if nkeep:
                k1[torch.topk(score, nkeep).indices] = True
            k1 = k1.reshape(W1.shape)
        else:
            k1 = torch.ones_like(W1, dtype=torch.bool)
        n, m = nm if nm is not None else (0, 0)
        for j in range(i2 - i1):
            if nm is not None and given is None and (i1 + j) % m == 0 and i1 + j + m <= cols:
                # SparseGPT's n:m: the group's scores use the weights as updated so far
                width = min(m, i2 - i1 - j)
                if width == m:
                    s = W1[:, j : j + m] ** 2 / d1[j : j + m][None, :] ** 2
                    drop = torch.topk(s, m - n, dim=1, largest=False).indices
                    k1[:, j : j + m].scatter_(1, drop, False)
            w = W1[:, j]
            qv = torch.where(k1[:, j], w, torch.zeros_like(w))
            err = (w - qv) / U1[j, j]
            W1[:, j:] -= err[:, None] * U1[j, j:][None, :]
            W1[:, j] = qv
            Err[:, j] = err
        Wt[:, i1:i2] = W1
        kept[:, i1:i2] = k1
        Wt[:, i2:] -= Err @ U[i1:i2, i2:]
    Wt[~kept] = 0.0
    return Wt.numpy(), kept.numpy()


def obc_trace(
    W: Any,
    G: Any,
    steps: int | None = None,
    *,
    damp: float = 0.01,
    chunk_bytes: int = 1 << 28,
) -> tuple[np.ndarray, np.ndarray]:
    """The exact greedy OBS removal order of every row (OBC, Frantar & Alistarh 2022).

    Per row, with ``H = G + damp·mean(diag G)·I`` and ``H⁻¹`` restricted to the row's
    remaining weights ``S``, each step removes the weight with the smallest loss
    ``w_p² / [H_S⁻¹]_pp`` (the exact increase of ``(w̃−w)ᵀH(w̃−w)``), updates the rest
    optimally, ``w_S −= (w_p/[H_S⁻¹]_pp)·H_S⁻¹[:, p]``, and downdates ``H_S⁻¹``.  Weights
    that are already zero are not candidates (their rows start from ``H_S⁻¹`` of their
    non-zeros).  Rows run in parallel, ``chunk_bytes`` of inverses at a time.

    Returns ``(order, losses)``, both ``rows × steps``: the column removed at each step
    (``-1`` once a row has no weight left) and its loss (``inf`` then).  ``steps``
    defaults to the most non-zeros of a row.
    """
    a = _matrix(W)
    rows, cols = a.shape
    Gm = _matrix(G, "G")
    if Gm.shape != (cols, cols):
        raise ValueError(f"G is {Gm.shape}, W has {cols} columns")
    H = _damped(Gm, damp)
    dead = torch.as_tensor(np.diag(Gm) <= 0)
    Wt = torch.as_tensor(a, dtype=torch.float64).clone()
    Wt[:, dead] = 0.0
    support = Wt != 0
    nmax = int(support.sum(dim=1).max()) if rows else 0
    steps = nmax if steps is None else min(int(steps), nmax)
    order = np.full((rows, steps), -1, dtype=np.int64)
    losses = np.full((rows, steps), np.inf)
    per = max(1, int(chunk_bytes // (8 * cols * cols)))
    for r0 in range(0, rows, per):
        r1 = min(r0 + per, rows)
        w = Wt[r0:r1].clone()
        s = support[r0:r1]
        sf = s.to(torch.float64)
        # H restricted to each row's support, identity elsewhere (decoupled, never picked)
        Hs = H[None] * (sf[:, :, None] * sf[:, None, :]) + torch.diag_embed(1.0 - sf)
        Hi = torch.cholesky_inverse(torch.linalg.cholesky(Hs))
        gone = ~s
        idx = torch.arange(r1 - r0)
        for t in range(steps):
            d = torch.diagonal(Hi, dim1=1, dim2=2)
            score = torch.where(gone, torch.inf, w**2 / torch.where(gone, 1.0, d))
            p = score.argmin(dim=1)
            loss = score[idx, p]
            live = torch.isfinite(loss)
            if not bool(live.any()):
                break
            col = Hi[idx, :, p] * live[:, None]  # H_S⁻¹[:, p] (rows that are done: 0)
            hpp = torch.where(live, d[idx, p], 1.0)
            w -= (w[idx, p] / hpp)[:, None] * col
            w[idx[live], p[live]] = 0.0
            Hi.baddbmm_(col[:, :, None], (col / hpp[:, None])[:, None, :], alpha=-1.0)
            gone[idx[live], p[live]] = True
            order[r0:r1, t] = np.where(live.numpy(), p.numpy(), -1)
            losses[r0:r1, t] = loss.numpy()
        del Hi, Hs
    return order, losses


def obc_sparsify(
    W: Any, G: Any, density: float, *, damp: float = 0.01, reach: float = 2.0
) -> tuple[np.ndarray, np.ndarray]:
    """OBC (Frantar & Alistarh 2022): ``(W̃, keep)`` with ``round(density·size)`` weights
    kept, each row pruned by the exact greedy OBS order of :func:`obc_trace`, and the
    removals spread over the rows where they cost least.

    Each row's step losses are made non-decreasing (running maximum) and the matrix's
    removals are the smallest of them, so a row loses weights in its greedy order; rows
    are traced up to ``reach`` times the mean number of removals (a row never loses more).
    The values are the exact optimum for that mask, ``(H_SS) w̃_S = (H w)_S`` with the
    damped ``H`` of the trace.  :func:`obc_masks` does several densities on one trace.

    Example::

        >>> import numpy as np
        >>> rng = np.random.default_rng(0); X = rng.standard_normal((200, 6))
        >>> W = rng.standard_normal((3, 6))
        >>> Wn, keep = obc_sparsify(W, X.T @ X, 0.5)
        >>> int(keep.sum()), bool(np.all(Wn[~keep] == 0))
        (9, True)
    """
    return obc_masks(W, G, [density], damp=damp, reach=reach)[0]


def obc_masks(
    W: Any, G: Any, densities: Any, *, damp: float = 0.01, reach: float = 2.0
) -> list[tuple[np.ndarray, np.ndarray]]:
    """:func:`obc_sparsify` at every density of ``densities``, from one trace (deep
    enough for the sparsest)."""
    a = _matrix(W)
    dens = [_density(d) for d in densities]
    Gm = _matrix(G, "G")
    nz = a != 0
    nz[:, np.diag(Gm) <= 0] = False
    removes = [int(nz.sum()) - round(d * a.size) for d in dens]
    most = max(removes, default=0)
    H = _damped(Gm, damp).numpy()
    out: list[tuple[np.ndarray, np.ndarray]] = []
    order, ranked = np.zeros((a.shape[0], 1), dtype=np.int64), np.zeros(0, dtype=np.int64)
    if most > 0:
        mean = most / max(a.shape[0], 1)
        order, losses = obc_trace(a, Gm, math.ceil(reach * mean) + 1, damp=damp)
        if int(np.isfinite(losses).sum()) < most:  # short rows: trace every row to its end
            order, losses = obc_trace(a, Gm, damp=damp)
        ranked = np.argsort(np.maximum.accumulate(losses, axis=1), axis=None, kind="stable")
    for remove in removes:
        if remove <= 0:
            out.append((np.where(nz, a, 0.0), nz.copy()))
            continue
        count = np.bincount(ranked[:remove] // order.shape[1], minlength=a.shape[0])
        # a row's removals are a prefix of its order (the running maximum is non-decreasing)
        keep = nz.copy()
        for i in np.flatnonzero(count):
            keep[i, order[i, : count[i]]] = False
        out.append((masked_refit(a, H, keep, damp=0.0), keep))
    return out


def masked_refit(
    W: Any,
    G: Any,
    keep: Any,
    C: Any | None = None,
    *,
    damp: float = 1e-8,
    prior: Any | None = None,
) -> np.ndarray:
    """Per row, the kept weights that best reproduce the row's output: exact masked least
    squares ``w_S = (G_SS + δI)⁻¹ (C wᵀ)_S`` with ``δ = damp·mean(diag G)``.

    The ridge ``δ‖w_S‖²`` pulls towards zero; with ``prior`` (a matrix of ``W``'s shape)
    it pulls towards the prior's kept entries instead, ``δ‖w_S − p_S‖²``, i.e.
    ``w_S = (G_SS + δI)⁻¹ ((C wᵀ)_S + δ p_S)``.

    ``C`` is the cross Gram ``X_sᵀX_o`` between the inputs the layer now receives (a
    sparsified prefix) and the original inputs; the default ``C = G`` refits the layer's own
    output.  Rows are solved in batches of equal support size by Cholesky.

    Example::

        >>> import numpy as np
        >>> rng = np.random.default_rng(0); X = rng.standard_normal((50, 4))
        >>> W = rng.standard_normal((1, 4)); keep = np.array([[True, True, False, True]])
        >>> ref = np.linalg.lstsq(X[:, keep[0]], X @ W[0], rcond=None)[0]
        >>> bool(np.allclose(masked_refit(W, X.T @ X, keep)[0, keep[0]], ref))
        True
    """
    a = _matrix(W)
    Gm = _matrix(G, "G")
    mask = np.asarray(keep, dtype=bool)
    if mask.shape != a.shape:
        raise ValueError(f"keep has shape {mask.shape}, W has {a.shape}")
    B = (a @ (Gm if C is None else _matrix(C, "C")).T).T  # cols × rows: (C wᵀ) per row
    diag = np.diag(Gm)
    live = diag > 0
    delta = float(damp) * (float(diag[live].mean()) if live.any() else 1.0)
    if prior is not None:
        pm = _matrix(prior, "prior")
        if pm.shape != a.shape:
            raise ValueError(f"prior has shape {pm.shape}, W has {a.shape}")
        B = B + delta * pm.T
    out = np.zeros_like(a)
    sizes = mask.sum(axis=1)
    for s in np.unique(sizes):
        if s == 0:
            continue
        idx = np.flatnonzero(sizes == s)
        S = np.stack([np.flatnonzero(mask[i]) for i in idx])  # (r, s)
        Gs = torch.as_tensor(Gm[S[:, :, None], S[:, None, :]])  # (r, s, s)
        Gs = Gs + delta * torch.eye(int(s), dtype=torch.float64)
        rhs = torch.as_tensor(B[S, idx[:, None]])[..., None]  # (r, s, 1)
        Lc, info = torch.linalg.cholesky_ex(Gs)
        sol = torch.cholesky_solve(rhs, Lc)
        bad = info != 0
        if bool(bad.any()):
            sol[bad] = torch.linalg.lstsq(Gs[bad], rhs[bad]).solution
        out[idx[:, None], S] = sol[..., 0].numpy()
    return out


def lasso_rows(
    W: Any,
    cov: Any,
    lam: float,
    *,
    max_sweeps: int = 500,
    tol: float = 1e-7,
) -> np.ndarray:
    """ℓ1-penalised refit of every row's output (Paper 3's ABP-L), on the input covariance.

    Minimises ``½ (w − w₀)ᵀ Σ (w − w₀) + λ‖w‖₁`` per row ``w₀`` of ``W``, i.e. the lasso
    ``(1/2n)‖g − X̄w − b‖² + λ‖w‖₁`` with a free intercept on the centred inputs ``X̄``
    (``Σ = X̄ᵀX̄/n``), whose target ``g`` is the row's own output on the calibration data.
    The intercept is then ``b = b₀ + μᵀ(w₀ − w)``.  Cyclic coordinate descent over columns,
    all rows at once; stops when no coefficient moves by more than ``tol·max|w₀|``.
    """
    a = _matrix(W)
    S = _matrix(cov, "cov")
    lam = float(lam)
    if not (math.isfinite(lam) and lam >= 0):
        raise ValueError(f"lambda={lam!r} must be a finite number >= 0")
    w = a.copy()
    diag = np.diag(S).copy()
    live = diag > 1e-300
    w[:, ~live] = 0.0
    scale = max(float(np.abs(a).max()), 1e-300)
    for _ in range(max_sweeps):
        moved = 0.0
        for j in np.flatnonzero(live):
            # partial residual correlation of column j: Σ_j·(w₀ − w) + Σ_jj w_j
            rho = (a - w) @ S[:, j] + diag[j] * w[:, j]
            new = np.sign(rho) * np.maximum(np.abs(rho) - lam, 0.0) / diag[j]
            moved = max(moved, float(np.max(np.abs(new - w[:, j]))))
            w[:, j] = new
        if moved <= tol * scale:
            break
    return w


def _pick_probabilities(s: np.ndarray, budget: float) -> np.ndarray:
    """Inclusion probabilities ``p = min(1, c·s)`` summing to ``budget`` (water filling)."""
    p = np.zeros_like(s)
    if budget <= 0 or not np.any(s > 0):
        return p
    pos = s > 0
    budget = min(budget, float(pos.sum()))
    order = np.argsort(-s[pos])
    vals = s[pos][order]
    tail = np.cumsum(vals[::-1])[::-1]  # Σ_{i≥t} vals
    # the first t entries saturate at 1; c·Σ_{i≥t} vals = budget − t
    for t in range(vals.size):
        c = (budget - t) / tail[t]
        if c * vals[t] <= 1.0:
            break
    probs = np.minimum(1.0, c * vals)
    probs[:t] = 1.0
    out = np.zeros(int(pos.sum()))
    out[order] = probs
    p[pos] = out
    return p


def spectrum_sparsify(
    W: Any,
    density: float,
    *,
    det_fraction: float = 0.5,
    distribution: str = "l1",
    rescale: bool = True,
    alpha: float = 0.5,
    rng: np.random.Generator | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Spectrum-preserving sparsification of a matrix (Paper 4; our reading of §5.2).

    The ``det_fraction`` share of the budget ``k = round(density·size)`` goes to the
    largest ``|w|`` (kept as they are); the rest of the budget is spent in expectation by
    independent Bernoulli draws among the other entries with probabilities ``p ∝ |w|``
    (``"l1"``), ``w²`` (``"l2"``) or ``α|w|/‖W‖₁ + (1−α)w²/‖W‖_F²`` (``"hybrid"``,
    Kundu–Drineas), capped at 1.  With ``rescale`` a sampled entry becomes ``w/p``, so the
    sampled part is unbiased (``E W̃ = W``) and, by matrix Bernstein bounds, its spectral
    error is controlled.  Returns ``(W̃, keep)``; the number kept is ``k`` in expectation.
    """
    a = _matrix(W)
    d = _density(density)
    f = float(det_fraction)
    if not 0.0 <= f <= 1.0:
        raise ValueError(f"det_fraction={det_fraction!r} must be in [0, 1]")
    if distribution not in ("l1", "l2", "hybrid"):
        raise ValueError(f"distribution={distribution!r} must be 'l1', 'l2' or 'hybrid'")
    rng = rng if rng is not None else np.random.default_rng(0)
    k = round(d * a.size)
    k_det = round(f * k)
    mag = np.abs(a).ravel()
    order = np.argsort(-mag, kind="stable")
    keep = np.zeros(a.size, dtype=bool)
    keep[order[:k_det]] = True
    rest = ~keep
    s = np.zeros_like(mag)
    if distribution == "l1":
        s[rest] = mag[rest]
    elif distribution == "l2":
        s[rest] = mag[rest] ** 2
    else:
        l1, l2 = mag[rest].sum(), (mag[rest] ** 2).sum()
        if l1 > 0:
            s[rest] = alpha * mag[rest] / l1 + (1 - alpha) * mag[rest] ** 2 / l2
    p = _pick_probabilities(s, float(k - k_det))
    drawn = rng.random(a.size) < p
    keep |= drawn
    out = np.where(keep, a.ravel(), 0.0)
    if rescale:
        sampled = drawn & rest
        out[sampled] = out[sampled] / p[sampled]
    return out.reshape(a.shape), keep.reshape(a.shape)


def output_error(W: Any, W_new: Any, G: Any) -> float:
    """Relative output error on the calibration rows, ``tr(ΔW G ΔWᵀ) / tr(W G Wᵀ)``."""
    a, b, g = _matrix(W), _matrix(W_new, "W_new"), _matrix(G, "G")
    delta = a - b
    # (X G) ⊙ X summed: one BLAS product each (an unoptimised einsum is a C triple loop,
    # 0.3 s for one 1536 × 384 matrix against milliseconds)
    den = float(np.sum((a @ g) * a))
    num = float(np.sum((delta @ g) * delta))
    return num / den if den > 0 else 0.0


#: below this many singular values a dense SVD is as quick as the iterative one
_DENSE_SVD_BELOW = 96


def _top_singular(a: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The ``k`` largest singular values of ``a`` (descending) and their left and right
    vectors: a dense SVD for a small matrix, else ARPACK's Lanczos iteration to machine
    precision from a fixed start (the same numbers every run): 4-5 times quicker for a
    transformer's 384 × 1536 matrix, where the report computes three per matrix."""
    n = min(a.shape)
    if n <= max(_DENSE_SVD_BELOW, 2 * k + 1) or not np.any(a):
        U, s, Vt = np.linalg.svd(a, full_matrices=False)
        return U[:, :k], s[:k], Vt[:k]
    import scipy.sparse.linalg

    start = np.random.default_rng(0).standard_normal(n)
    U, s, Vt = scipy.sparse.linalg.svds(a, k=k, tol=0, v0=start)
    order = np.argsort(s)[::-1]
    return U[:, order], s[order], Vt[order]


def matrix_metrics(W: Any, W_new: Any, G: Any | None = None, k: int = 8) -> dict[str, float]:
    """What sparsification did to one matrix.

    ``density``; ``spectral_error`` ``‖W−W̃‖₂/‖W‖₂``; ``frobenius_error``
    ``‖W−W̃‖_F/‖W‖_F``; ``top_sv_change`` ``max_{i≤k} |σ_i(W̃)−σ_i(W)|/σ_i(W)``;
    ``left_angle`` / ``right_angle``: the largest principal angle (degrees) between the
    top-``k`` left / right singular subspaces; ``output_error`` (with ``G``, see
    :func:`output_error`).

    Example::

        >>> import numpy as np
        >>> m = matrix_metrics(np.eye(3), np.diag([1.0, 1.0, 0.0]), k=2)
        >>> m["density"], round(m["spectral_error"], 6), round(m["frobenius_error"], 4)
        (0.2222222222222222, 1.0, 0.5774)
    """
    a, b = _matrix(W), _matrix(W_new, "W_new")
    if a.shape != b.shape:
        raise ValueError(f"W_new has shape {b.shape}, W has {a.shape}")
    out: dict[str, float] = {"density": float(np.count_nonzero(b)) / max(b.size, 1)}
    Ua, sa, Vta = _top_singular(a, k)
    Ub, sb, Vtb = _top_singular(b, k)
    sd = _top_singular(a - b, 1)[1]
    norm2 = float(sa[0]) if sa.size else 0.0
    fro = float(np.linalg.norm(a))
    out["spectral_error"] = float(sd[0]) / norm2 if norm2 > 0 else 0.0
    out["frobenius_error"] = float(np.linalg.norm(a - b)) / fro if fro > 0 else 0.0
    r = int(min(k, np.count_nonzero(sa > sa[0] * 1e-12) if sa.size else 0))
    if r:
        out["top_sv_change"] = float(np.max(np.abs(sb[:r] - sa[:r]) / sa[:r]))
        out["left_angle"] = float(
            np.degrees(scipy.linalg.subspace_angles(Ua[:, :r], Ub[:, :r])).max()
        )
        out["right_angle"] = float(
            np.degrees(scipy.linalg.subspace_angles(Vta[:r].T, Vtb[:r].T)).max()
        )
    if G is not None:
        out["output_error"] = output_error(a, b, G)
    return out
