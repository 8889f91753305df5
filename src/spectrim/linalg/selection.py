"""Greedy unit selection for spectral pruning (Paper 1, Suzuki et al.), from Gram matrices.

For a layer with (uncentred) covariance ``Σ`` (m×m) and kept set ``J``, the ridge residual
covariance is ``E_J = Σ − Σ[:, J] (Σ[J, J] + diag τ_J)⁻¹ Σ[J, :]`` and the combined
information loss is ``L(J) = tr(M E_J)`` with ``M = θ·I + (1 − θ)·W`` (``θ = 1``: the
input-aware loss ``L_A``; ``θ = 0``: the output-aware loss ``L_B`` with ``W = Σ_c W_cᵀW_c``
from the consumers' weights).

:func:`spectral_greedy` adds, at each step, the unit with the largest decrease of ``L``.
Adding unit ``j`` changes ``E`` by the rank-one term ``e eᵀ / (E_jj + τ_j)`` with
``e = E[:, j]`` (block inversion), so the decrease is ``eᵀ M e / (E_jj + τ_j)`` for every
candidate at once.  ``E = Σ − C Cᵀ`` is kept implicitly through the chosen columns ``C``,
and the numerators ``E_jᵀ M E_j`` are updated by a rank-one recurrence that needs one
pass over the ``k`` stored steps: O(m·k) per step after one O(m³) product, O(k²·m) for
``k`` units, in float64, without the m×m temporaries of explicit downdates.  m = 1536
at θ = 0.5 takes 2.5–3.7 s on 2 cores, 1.2–1.4× less than the m×m matrix-vector products
per step it replaced (``benchmarks/scale.py --parts greedy``).
Running all ``m`` steps gives the loss for every width in one pass (the error curve).

Example::

    >>> import numpy as np
    >>> rng = np.random.default_rng(0)
    >>> Z = rng.standard_normal((200, 3)) @ rng.standard_normal((3, 6))  # rank 3
    >>> sel = spectral_greedy(Z.T @ Z / 200)
    >>> bool(sel.losses[3] < 1e-9 * sel.losses[0])  # 3 units reconstruct all 6
    True
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from spectrim.linalg._validation import as_float_matrix, as_gram, as_index_set

__all__ = [
    "SpectralSelection",
    "block_greedy",
    "cross_greedy",
    "spectral_greedy",
    "spectral_loss",
]


@dataclass(frozen=True)
class SpectralSelection:
    """Result of :func:`spectral_greedy`.

    Attributes:
        order: units in the order they were added (length ``k``).
        losses: ``losses[i] = L(order[:i])`` for ``i = 0..k`` (``losses[0] = tr(M Σ)``).
    """

    order: np.ndarray
    losses: np.ndarray

    def selected(self, k: int) -> np.ndarray:
        """The first ``k`` units chosen."""
        if not 0 <= k <= len(self.order):
            raise ValueError(f"k={k} must be in [0, {len(self.order)}]")
        return self.order[:k].copy()


def _weighting(m: int, theta: float, weight: Any | None) -> np.ndarray:
    if not 0.0 <= theta <= 1.0:
        raise ValueError(f"theta={theta} must be in [0, 1]")
    if weight is None:
        if theta < 1.0:
            raise ValueError("theta < 1 needs the output-aware weighting matrix `weight`")
        return np.eye(m)
    W = as_gram(weight, "weight")
    if W.shape[0] != m:
        raise ValueError(f"weight must be {m}×{m}, got {W.shape}")
    return theta * np.eye(m) + (1.0 - theta) * W


def _as_tau(tau: Any, m: int) -> np.ndarray:
    t = np.asarray(tau, dtype=np.float64)
    if t.ndim == 0:
        t = np.full(m, float(t))
    if t.shape != (m,) or not np.all(np.isfinite(t)) or np.any(t < 0):
        raise ValueError(f"tau must be a non-negative scalar or a length-{m} vector")
    return t


def spectral_loss(
    sigma: Any, J: Any, *, theta: float = 1.0, weight: Any | None = None, tau: Any = 0.0
) -> float:
    """``L(J) = tr(M E_J)`` by direct solve (the brute-force reference for the greedy).

    Example::

        >>> spectral_loss(np.diag([2.0, 1.0]), [0])
        1.0
    """
    S = as_gram(sigma, "sigma")
    m = S.shape[0]
    idx = as_index_set(J, m, "J")
    M = _weighting(m, theta, weight)
    t = _as_tau(tau, m)[idx]
    E = S.copy()
    if idx.size:
        A = S[np.ix_(idx, idx)] + np.diag(t)
        E -= S[:, idx] @ np.linalg.pinv(A, hermitian=True) @ S[idx, :]
    return float(np.sum(M * E))


def spectral_greedy(
    sigma: Any,
    k: int | None = None,
    *,
    theta: float = 1.0,
    weight: Any | None = None,
    tau: Any = 0.0,
    rtol: float = 1e-12,
) -> SpectralSelection:
    """Greedy forward selection minimising ``θ·L_A + (1 − θ)·L_B`` (exact rank-one updates).

    Args:
        sigma: m×m covariance (second moment) of the units, float64 PSD.
        k: number of units to select (default: all ``m``, giving the full loss curve).
        theta: weight of the input-aware loss (1: reconstruct the units themselves).
        weight: m×m PSD output-aware matrix ``Σ_c W_cᵀW_c`` (needed when ``theta < 1``).
        tau: ridge penalty per unit (scalar or length m), in the units of ``sigma``.
        rtol: candidates with residual variance ``E_jj <= rtol·max(diag Σ)`` (and no
            ridge) carry nothing new and gain 0; ties go to the lowest index.

    Complexity: one m×m product (``Σ M Σ``, O(m³) at BLAS-3 speed) and O(k·m) per step,
    O(m³ + k²·m) time in all; O(m² + k·m) memory.  Every caller in spectrim runs all m
    steps; for k ≪ m the product dominates.
    """
    S = as_gram(sigma, "sigma")
    m = S.shape[0]
    k = m if k is None else int(k)
    if not 0 <= k <= m:
        raise ValueError(f"k={k} must be in [0, {m}]")
    M = _weighting(m, theta, weight)
    t = _as_tau(tau, m)
    plain = theta == 1.0  # M = I
    # E = S − C Cᵀ is never formed: with c = E[:, j]/sqrt(E_jj + τ_j) the update is
    # E ← E − c cᵀ, and the gains' numerators num_j = E_jᵀ M E_j follow by
    # num ← num − 2 c ⊙ v + c² (cᵀMc) with v = E M c = S M c − C (MC)ᵀ c.
    # No m×m product per step: c, M c and S M c are each a column of S, M S and
    # P = S M S less the same combination of the earlier steps' ones (c = (S_j − C C_jᵀ)/√d,
    # and likewise for the others), so one pass over the stored steps gives all three.
    MS = S if plain else M @ S  # column j: M S_j
    P = S @ MS  # S M S (symmetric: its rows are its columns)
    num = np.einsum("ij,ij->j", S, MS)  # S_jᵀ M S_j
    SM = S if plain else np.ascontiguousarray(MS.T)  # row j: M S_j
    r = np.diag(S).copy()  # E_jj
    floor = rtol * max(float(np.max(r, initial=0.0)), 0.0)
    # row s: [c_s, S M c_s] (M = I) or [c_s, M c_s, S M c_s]
    parts = 2 if plain else 3
    H = np.zeros((k, parts * m))
    bases = (S, P) if plain else (S, SM, P)  # rows, read contiguously
    chosen = np.zeros(m, dtype=bool)
    order = np.empty(k, dtype=np.int64)
    losses = np.empty(k + 1)
    loss = float(np.sum(M * S))
    losses[0] = loss
    exhausted = False
    for step in range(k):
        d = r + t
        live = (~chosen) & (r > floor) & (d > 0)
        gain = np.full(m, -np.inf)
        gain[~chosen] = 0.0
        gain[live] = np.maximum(num[live], 0.0) / d[live]
        j = int(np.argmax(gain))
        order[step] = j
        chosen[j] = True
        if live[j]:
            Hs = H[:step]
            row = np.concatenate([b[j] for b in bases])
            if step:
                row -= Hs[:, j] @ Hs
            row /= np.sqrt(d[j])
            c, g = row[:m], row[(parts - 1) * m :]
            mc = c if plain else row[m : 2 * m]
            v = g - (Hs[:, :m].T @ (Hs[:, (parts - 2) * m : (parts - 1) * m] @ c) if step else 0.0)
            num = num - 2.0 * c * v + c * c * float(c @ mc)
            r = r - c * c
            H[step] = row
            # tr(M E) drops by cᵀMc; with M = I it is the sum of the tracked diagonal
            loss = float(r.sum()) if plain else loss - float(c @ mc)
        else:
            exhausted = True
        if exhausted and not np.any(t) and not np.any(r[~chosen] > floor):
            loss = 0.0  # nothing left above the noise floor and no ridge: E is ~0
        losses[step + 1] = max(loss, 0.0)
    return SpectralSelection(order=order, losses=losses)


def block_greedy(
    sigma: Any,
    blocks: Any,
    k: int | None = None,
    *,
    theta: float = 1.0,
    weight: Any | None = None,
    rtol: float = 1e-10,
) -> SpectralSelection:
    """Greedy forward selection of whole *blocks* of units minimising ``tr(M E_J)``.

    The block version of :func:`spectral_greedy` (attention heads: a block is the ``d``
    columns one head writes into the output projection's input).  Adding block ``b`` to
    the kept set lowers the residual covariance ``E`` by ``E[:, b] E[b, b]⁺ E[b, :]``
    (block Schur complement), so its gain is ``tr(E[b, b]⁺ E[b, :] M E[:, b])``; ``E`` is
    downdated explicitly after each choice (``O(m²·d)``), which is cheap for the few
    dozen heads of a layer.  ``E[b, b]⁺`` drops eigenvalues below ``rtol·max(diag Σ)``, so a
    block that repeats kept ones gains nothing.  ``θ = 1`` (``M = I``) is the block
    interpolative decomposition (reconstruct the units themselves); ``θ < 1`` mixes in
    the output-aware ``W``.

    Args:
        sigma: m×m PSD Gram / covariance of the units.
        blocks: a list of index arrays, disjoint, covering any subset of ``range(m)``.
        k: number of blocks to select (default: all, giving the full loss curve).
        theta, weight: as in :func:`spectral_greedy`.
        rtol: relative eigenvalue cutoff of the block pseudo-inverses.

    Returns:
        :class:`SpectralSelection` over *block* indices; ``losses[i]`` is
        ``tr(M E)`` after the first ``i`` blocks (exactly :func:`spectral_loss` of the
        union of their columns).

    Example::

        >>> rng = np.random.default_rng(0)
        >>> Z = rng.standard_normal((100, 4))
        >>> Z = np.hstack([Z, Z[:, :2] @ rng.standard_normal((2, 2))])  # block 2 = f(block 0)
        >>> sel = block_greedy(Z.T @ Z, [np.arange(0, 2), np.arange(2, 4), np.arange(4, 6)])
        >>> sorted(sel.order[:2].tolist()), bool(sel.losses[2] < 1e-9 * sel.losses[0])
        ([0, 1], True)
    """
    S = as_gram(sigma, "sigma")
    m = S.shape[0]
    idx = [as_index_set(b, m, f"blocks[{i}]") for i, b in enumerate(blocks)]
    flat = np.concatenate(idx) if idx else np.zeros(0, dtype=np.int64)
    if len(np.unique(flat)) != len(flat):
        raise ValueError("blocks must be disjoint")
    n = len(idx)
    k = n if k is None else int(k)
    if not 0 <= k <= n:
        raise ValueError(f"k={k} must be in [0, {n}]")
    M = _weighting(m, theta, weight)
    E = S.copy()
    floor = rtol * max(float(np.max(np.diag(S), initial=0.0)), 0.0)
    chosen = np.zeros(n, dtype=bool)
    order = np.empty(k, dtype=np.int64)
    losses = np.empty(k + 1)
    losses[0] = float(np.sum(M * E))

    def pinv_block(b: np.ndarray) -> np.ndarray:
        w, V = np.linalg.eigh(E[np.ix_(b, b)])
        keep = w > max(floor, 0.0)
        return (V[:, keep] / w[keep]) @ V[:, keep].T

    for step in range(k):
        ME = M @ E if theta < 1.0 else E
        best, best_gain, best_inv = -1, -np.inf, None
        for j in np.flatnonzero(~chosen):
            b = idx[j]
            inv = pinv_block(b)
            gain = float(np.sum(inv * (E[b, :] @ ME[:, b]))) if inv.size else 0.0
            if gain > best_gain:
                best, best_gain, best_inv = int(j), gain, inv
        assert best_inv is not None
        b = idx[best]
        chosen[best] = True
        order[step] = best
        if best_inv.size:
            Eb = E[:, b]
            E = E - Eb @ best_inv @ Eb.T
            E = (E + E.T) / 2.0
        losses[step + 1] = max(float(np.sum(M * E)), 0.0)
    return SpectralSelection(order=order, losses=losses)


def cross_greedy(
    gram: Any,
    cross: Any,
    target_energy: float | None = None,
    k: int | None = None,
    *,
    weight: Any | None = None,
    rtol: float = 1e-12,
) -> SpectralSelection:
    """Greedy selection of the units of ``Z'`` that best reconstruct *another* matrix ``Z``.

    The selection of the sequential pass (``CompressConfig(sequential_select=True)``):
    ``Z'`` (n×m) are a layer's units as the already-compressed prefix produces them, ``Z``
    (n×p) the original model's at the same point, and the kept set ``S`` should minimise
    ``min_B ‖Z − Z'[:, S] Bᵀ‖²``, the error the correction is then fitted to.  Adding unit
    ``j`` lowers it by ``‖R_j‖² / r_j`` with ``R = Z'ᵀ(I − P_S)Z`` and
    ``r_j = ‖(I − P_S) z'_j‖²`` (``P_S`` the projector on the kept columns); both follow
    from the Grams by one rank-one downdate per step (Gram–Schmidt on ``Z'`` in Gram
    form).  With ``Z' = Z`` this is the greedy column-subset selection of ``Z`` itself
    (the ``θ = 1`` case of :func:`spectral_greedy`).  With a p×p PSD ``weight`` ``M`` the
    error is ``tr(M EᵀE)`` for the residual ``E`` (spectral pruning's output-aware mix
    ``θ·I + (1 − θ)·W``), and the gains are ``R_j M R_jᵀ / r_j``.

    Args:
        gram: m×m Gram ``Z'ᵀZ'``.
        cross: m×p cross Gram ``Z'ᵀZ``.
        target_energy: ``tr(M ZᵀZ)`` (``‖Z‖_F²`` without ``weight``), the error of the
            empty set: ``losses[0]``.  Without it the losses are offset by that unknown
            (``losses[0] = 0``, then minus the gains); their differences are the same.
        k: number of units to select (default: all ``m``).
        weight: p×p PSD weighting of the target's units (default: the identity).
        rtol: candidates with ``r_j <= rtol·max(diag Z'ᵀZ')`` carry nothing new and gain
            0; they are taken last, lowest index first.

    Returns:
        :class:`SpectralSelection`: ``losses[i] = min_B ‖Z − Z'[:, order[:i]] Bᵀ‖²``.

    Complexity: O(k·m·(m + p)) time, O(m·(m + p)) memory.

    Example::

        >>> rng = np.random.default_rng(0)
        >>> Z = rng.standard_normal((300, 4)) @ rng.standard_normal((4, 6))
        >>> Zc = Z + 0.01 * rng.standard_normal(Z.shape)  # the prefix drifted a little
        >>> sel = cross_greedy(Zc.T @ Zc, Zc.T @ Z, float(np.sum(Z * Z)), k=4)
        >>> bool(sel.losses[4] < 1e-3 * sel.losses[0])  # 4 units carry the rank-4 Z
        True
    """
    G = as_gram(gram, "gram")
    m = G.shape[0]
    R = as_float_matrix(cross, "cross", shape=(m, None))
    k = m if k is None else int(k)
    if not 0 <= k <= m:
        raise ValueError(f"k={k} must be in [0, {m}]")
    if target_energy is not None and (not np.isfinite(target_energy) or target_energy < 0):
        raise ValueError(f"target_energy={target_energy} must be a non-negative number")
    M = None if weight is None else as_gram(weight, "weight")
    if M is not None and M.shape[0] != R.shape[1]:
        raise ValueError(f"weight must be {R.shape[1]}×{R.shape[1]}, got {M.shape}")

    def numerators() -> np.ndarray:  # R_j M R_jᵀ
        return np.einsum("ij,ij->i", R, R if M is None else R @ M)

    r = np.diag(G).copy()  # ‖(I − P) z'_j‖²
    num = numerators()
    floor = rtol * max(float(np.max(r, initial=0.0)), 0.0)
    A = np.zeros((m, k))  # A[:, t] = Z'ᵀ e_t for the orthonormal basis e of the kept span
    chosen = np.zeros(m, dtype=bool)
    order = np.empty(k, dtype=np.int64)
    losses = np.empty(k + 1)
    loss = 0.0 if target_energy is None else float(target_energy)
    losses[0] = loss
    for step in range(k):
        live = (~chosen) & (r > floor)
        gain = np.full(m, -np.inf)
        gain[~chosen] = 0.0
        gain[live] = num[live] / r[live]
        j = int(np.argmax(gain))
        order[step] = j
        chosen[j] = True
        if live[j]:
            scale = np.sqrt(r[j])
            a = (G[:, j] - A[:, :step] @ A[j, :step]) / scale
            b = R[j, :] / scale  # eᵀZ for the new basis vector e
            R -= np.outer(a, b)
            A[:, step] = a
            r = np.maximum(r - a * a, 0.0)
            num = numerators()
            loss -= float(b @ b) if M is None else float(b @ M @ b)
        losses[step + 1] = loss if target_energy is None else max(loss, 0.0)
    return SpectralSelection(order=order, losses=losses)
