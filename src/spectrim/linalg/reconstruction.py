"""Linear reconstruction of a layer's units from a kept subset, computed from Gram matrices.

Given kept units ``S`` (|S| = k) of a layer with m units, these kernels find ``B`` (m×k) with
``z ≈ B z_S`` for every activation row ``z``. ``B`` is what gets folded into the consumer layer
(``W_next ← W_next · B``, papers §1.3). Paper 2's ``T`` is ``Bᵀ`` (ridge 0); Paper 1's ``Â_J``
is ``B`` with a (weighted) ridge penalty.

All functions take Gram matrices (m×m, float64), never raw activations:

* :func:`fit_reconstruction` — ``min_B ‖Z − Z[:, S] Bᵀ‖_F² + Σ_j τ_j ‖B[:, j]‖²``
  ⇒ ``B = G[:, S] (G[S, S] + diag τ)⁻¹``.
* :func:`fit_cross_reconstruction` — sequential calibration: the compressed model's kept
  activations ``Z'[:, S]`` predict the original model's ``Z``:
  ``B = C[S, :]ᵀ (G'[S, S] + diag τ)⁻¹`` with ``C = Z'ᵀZ`` and ``G' = Z'ᵀZ'``.
* :func:`residual_of` / :func:`cross_residual_of` — the squared Frobenius reconstruction
  error of any ``B``, by trace formulas.

Singular systems (duplicated or dead units among the kept ones, fewer rows than units) are
solved with a pseudo-inverse (eigenvalues below ``rtol·λ_max`` dropped), which gives the
same answer as ``lstsq`` on the raw activations: the minimum-norm least-squares solution.

Example::

    >>> import numpy as np
    >>> rng = np.random.default_rng(0)
    >>> Z = rng.standard_normal((100, 6))
    >>> G, S = Z.T @ Z, np.array([4, 1, 2])
    >>> B = fit_reconstruction(G, S)
    >>> bool(np.allclose(B.T, np.linalg.lstsq(Z[:, S], Z, rcond=None)[0]))
    True
    >>> bool(np.isclose(residual_of(G, S, B), ((Z - Z[:, S] @ B.T) ** 2).sum()))
    True
"""

from __future__ import annotations

from typing import Any

import numpy as np
import scipy.linalg
from scipy.linalg.lapack import dpocon

from spectrim.linalg._validation import (
    as_float_matrix,
    as_gram,
    as_index_set,
    as_ridge,
    default_rtol,
)

#: Relative eigenvalue cut-off for fits on float32 activations: directions below about
#: float32 precision are noise.
F32_RTOL = 1e-6

__all__ = [
    "order_residual_curve",
    "F32_RTOL",
    "cross_residual_of",
    "fit_cross_reconstruction",
    "fit_reconstruction",
    "fit_rows_reconstruction",
    "residual_of",
]


def _solve_gram_system(A: np.ndarray, rhs: np.ndarray, rtol: float) -> np.ndarray:
    """Solve ``A X = rhs`` for symmetric PSD ``A`` (k×k); minimum-norm ``A⁺ rhs`` if singular.

    Fast path: Jacobi-scaled Cholesky when LAPACK's condition estimate of the scaled matrix
    exceeds ``rtol``. Otherwise an eigendecomposition of ``A`` with eigenvalues
    ``<= rtol·λ_max`` dropped (exactly ``pinv(Z_S) Z`` when ``A = Z_SᵀZ_S``, ``rhs = Z_SᵀZ``).
    O(k³ + k²·cols).
    """
    k = A.shape[0]
    X = np.zeros((k, rhs.shape[1]), dtype=np.float64)
    if k == 0:
        return X
    d = np.diag(A)
    live = np.flatnonzero(d > 0)
    if live.size == 0:
        return X
    if live.size == k:
        s = np.sqrt(d)
        A_hat = A / np.outer(s, s)
        try:
            c, lower = scipy.linalg.cho_factor(A_hat, lower=False, check_finite=False)
        except np.linalg.LinAlgError:
            pass
        else:
            anorm = float(np.max(np.sum(np.abs(A_hat), axis=0)))
            rcond, info = dpocon(c, anorm, uplo="U")
            if info == 0 and rcond > rtol:
                X = scipy.linalg.cho_solve((c, lower), rhs / s[:, None], check_finite=False)
                X /= s[:, None]
                if np.all(np.isfinite(X)):
                    return X
    # Singular / ill-conditioned (or some units exactly zero): pseudo-inverse on the live
    # units (dead units get zero coefficients, which is the minimum-norm choice).
    w, V = scipy.linalg.eigh(A[np.ix_(live, live)], check_finite=False)
    keep = w > rtol * max(float(w[-1]), 0.0)
    Vk = V[:, keep]
    X = np.zeros((k, rhs.shape[1]), dtype=np.float64)
    X[live] = Vk @ ((Vk.T @ rhs[live]) / w[keep][:, None])
    return X


def fit_reconstruction(
    G: Any, S: Any, ridge: float | np.ndarray = 0.0, *, rtol: float | None = None
) -> np.ndarray:
    """Least-squares reconstruction ``B`` (m×k) of all units from the kept units ``S``.

    Minimises ``‖Z − Z[:, S] Bᵀ‖_F² + Σ_j τ_j ‖B[:, j]‖²`` over ``B``, where ``G = ZᵀZ`` and
    ``τ = ridge`` (a scalar, or one penalty per kept unit — Paper 1's ``I_τ``). Closed form
    ``B = G[:, S] (G[S, S] + diag τ)⁻¹``.

    With ``ridge == 0`` the rows ``B[S, :]`` are set to exactly the identity (each kept unit
    reproduces itself — an exact minimiser for those rows even if ``G[S, S]`` is singular),
    and the other rows are the minimum-norm least-squares solution (a pseudo-inverse that
    drops eigenvalues of ``G[S, S]`` below ``rtol·λ_max``), i.e. ``lstsq(Z[:, S], Z)``.

    Args:
        G: m×m symmetric PSD Gram matrix (float64).
        S: k distinct unit indices (kept units, any order; columns of ``B`` follow it).
        ridge: scalar or length-k vector of non-negative penalties.
        rtol: relative eigenvalue cutoff for singular systems, default ``10·k·eps``.

    Complexity: O(k³ + m·k²).

    Example::

        >>> import numpy as np
        >>> G = np.array([[1.0, 2.0], [2.0, 4.0]])  # z1 = 2·z0
        >>> fit_reconstruction(G, [1])
        array([[0.5],
               [1. ]])
        >>> fit_reconstruction(G, [1], ridge=1.0)  # 2 / (4 + 1), 4 / (4 + 1)
        array([[0.4],
               [0.8]])
    """
    G = as_gram(G, "G")
    m = G.shape[0]
    S = as_index_set(S, m, "S")
    k = S.size
    tau = as_ridge(ridge, k, "ridge")
    if rtol is None:
        rtol = default_rtol(k)
    if k == 0:
        return np.zeros((m, 0), dtype=np.float64)
    A = G[np.ix_(S, S)] + np.diag(tau)
    Bt = _solve_gram_system(A, G[S, :], rtol)
    B = np.ascontiguousarray(Bt.T)
    if not np.any(tau):
        B[S, :] = np.eye(k)
    return B


def fit_rows_reconstruction(
    Y: Any, S: Any, ridge: float = 0.0, *, rtol: float | None = None
) -> tuple[np.ndarray, float]:
    """:func:`fit_reconstruction` from rows ``Y`` (r×m) instead of their Gram: the ``B``
    (m×k) minimising ``‖Y − Y[:, S] Bᵀ‖_F² + τ‖B‖_F²``, and that squared residual.

    For a sketch ``Y = ΩZ`` of activations too wide for their Gram
    (:class:`~spectrim.calibration.sketch.RowSketch`): only ``Y[:, S]ᵀY`` (k×m) and
    ``Y[:, S]ᵀY[:, S]`` are formed, never an m×m matrix.  Kept units reproduce themselves
    exactly when ``ridge == 0``; with fewer rows than kept units the fit is the
    minimum-norm one.  O(r·k·m + k³).

    Example::

        >>> import numpy as np
        >>> Y = np.random.default_rng(0).standard_normal((40, 6))
        >>> B, res = fit_rows_reconstruction(Y, [1, 4])
        >>> bool(np.allclose(B, fit_reconstruction(Y.T @ Y, [1, 4])))
        True
        >>> bool(np.isclose(res, ((Y - Y[:, [1, 4]] @ B.T) ** 2).sum()))
        True
    """
    Y = as_float_matrix(Y, "Y")
    m = Y.shape[1]
    S = as_index_set(S, m, "S")
    k = S.size
    if not (np.isfinite(ridge) and ridge >= 0):
        raise ValueError(f"ridge must be a finite non-negative float, got {ridge!r}")
    if rtol is None:
        rtol = default_rtol(k)
    if k == 0:
        return np.zeros((m, 0), dtype=np.float64), float(np.sum(Y * Y))
    YS = Y[:, S]
    Bt = _solve_gram_system(YS.T @ YS + ridge * np.eye(k), YS.T @ Y, rtol)
    B = np.ascontiguousarray(Bt.T)
    if ridge == 0:
        B[S, :] = np.eye(k)
    E = Y - YS @ B.T
    return B, float(np.sum(E * E))


def fit_cross_reconstruction(
    G_comp: Any,
    C: Any,
    S: Any,
    ridge: float | np.ndarray = 0.0,
    *,
    rtol: float | None = None,
) -> np.ndarray:
    """Reconstruct the ORIGINAL model's activations from the COMPRESSED model's kept units.

    For sequential calibration: ``Z`` (n×m) are the original model's activations at this
    layer and ``Z'`` (n×p) the compressed model's (same inputs, same rows). Minimises
    ``‖Z − Z'[:, S] Bᵀ‖_F² + Σ_j τ_j ‖B[:, j]‖²``; the normal equations
    ``(Z'_SᵀZ'_S + diag τ) Bᵀ = Z'_SᵀZ`` give ``B = C[S, :]ᵀ (G_comp[S, S] + diag τ)⁻¹``.
    Singular ``G_comp[S, S]`` gets the minimum-norm solution (``lstsq(Z'[:, S], Z)``).
    When ``C`` equals ``G_comp`` exactly (``Z' = Z``) the result is :func:`fit_reconstruction`'s,
    including its exact identity rows.

    Args:
        G_comp: p×p Gram ``Z'ᵀZ'`` of the compressed model's activations (usually p = m, the
            full pre-pruning width; pass ``S = np.arange(p)`` if it is already restricted).
        C: p×m cross Gram ``Z'ᵀZ`` (rows: compressed-model units, columns: original units).
        S: k distinct indices into ``range(p)``.
        ridge: scalar or length-k vector of non-negative penalties.
        rtol: relative eigenvalue cutoff for singular systems, default ``10·k·eps``.

    Returns:
        B of shape (m, k): ``z ≈ B z'_S``.

    Complexity: O(k³ + m·k²).

    Example::

        >>> import numpy as np
        >>> rng = np.random.default_rng(0)
        >>> Z = rng.standard_normal((200, 5))
        >>> Zc = Z + 0.1 * rng.standard_normal((200, 5))  # compressed model drifted a little
        >>> S = np.array([0, 3])
        >>> B = fit_cross_reconstruction(Zc.T @ Zc, Zc.T @ Z, S)
        >>> bool(np.allclose(B.T, np.linalg.lstsq(Zc[:, S], Z, rcond=None)[0]))
        True
    """
    G_comp = as_gram(G_comp, "G_comp")
    p = G_comp.shape[0]
    C = as_float_matrix(C, "C", shape=(p, None))
    m = C.shape[1]
    S = as_index_set(S, p, "S")
    k = S.size
    tau = as_ridge(ridge, k, "ridge")
    if C.shape == G_comp.shape and np.array_equal(C, G_comp):
        # Z' == Z: same problem as fit_reconstruction (identity rows on S when ridge == 0).
        return fit_reconstruction(G_comp, S, tau, rtol=rtol)
    if rtol is None:
        rtol = default_rtol(k)
    if k == 0:
        return np.zeros((m, 0), dtype=np.float64)
    A = G_comp[np.ix_(S, S)] + np.diag(tau)
    Bt = _solve_gram_system(A, C[S, :], rtol)
    return np.ascontiguousarray(Bt.T)


def residual_of(G: Any, S: Any, B: Any) -> float:
    """Squared reconstruction error ``‖Z − Z[:, S] Bᵀ‖_F²`` from the Gram matrix alone.

    Trace formula ``tr G − 2⟨G[:, S], B⟩ + ⟨B G[S, S], B⟩``, clamped at 0. Absolute
    accuracy is about ``eps · tr(G) · (1 + ‖B‖²)``, so tiny residuals are not resolved
    relative to themselves. O(m·k²).

    Example::

        >>> import numpy as np
        >>> residual_of(np.diag([3.0, 1.0]), [0], np.array([[1.0], [0.0]]))
        1.0
    """
    G = as_gram(G, "G")
    m = G.shape[0]
    S = as_index_set(S, m, "S")
    B = as_float_matrix(B, "B", shape=(m, S.size))
    G_SS = G[np.ix_(S, S)]
    val = np.trace(G) - 2.0 * np.sum(G[:, S] * B) + np.sum((B @ G_SS) * B)
    return max(float(val), 0.0)


def cross_residual_of(G: Any, G_comp: Any, C: Any, S: Any, B: Any) -> float:
    """Squared error ``‖Z − Z'[:, S] Bᵀ‖_F²`` of a cross reconstruction, from Gram matrices.

    ``G = ZᵀZ`` (m×m, original model), ``G_comp = Z'ᵀZ'`` (p×p), ``C = Z'ᵀZ`` (p×m),
    ``B`` (m×k). Trace formula ``tr G − 2⟨C[S, :]ᵀ, B⟩ + ⟨B G_comp[S, S], B⟩``, clamped at 0.
    O(m·k²).

    Example::

        >>> import numpy as np
        >>> Z, Zc = np.eye(2), 2 * np.eye(2)
        >>> B = np.array([[0.5], [0.0]])  # z0 = 0.5 z'0; z1 is not reconstructed
        >>> cross_residual_of(Z.T @ Z, Zc.T @ Zc, Zc.T @ Z, [0], B)
        1.0
    """
    G = as_gram(G, "G")
    m = G.shape[0]
    G_comp = as_gram(G_comp, "G_comp")
    p = G_comp.shape[0]
    C = as_float_matrix(C, "C", shape=(p, m))
    S = as_index_set(S, p, "S")
    B = as_float_matrix(B, "B", shape=(m, S.size))
    val = np.trace(G) - 2.0 * np.sum(C[S, :].T * B) + np.sum((B @ G_comp[np.ix_(S, S)]) * B)
    return max(float(val), 0.0)


def order_residual_curve(G: Any, order: Any) -> np.ndarray:
    """``e[k] = ‖Z − Z[:, S_k] B‖²_F / ‖Z‖²_F`` for ``S_k = order[:k]``, ``k = 0..m``, each
    ``B`` the exact least squares: the relative error of reconstructing every unit from
    the first ``k`` of a fixed order (a selection made by another criterion, e.g.
    ``spectral``'s ridge greedy), on the scale of :func:`spectrim.linalg.id_factorize`'s
    curve.  From an orthonormal basis ``Q`` of the order's prefixes (the QR of a square
    root of the permuted Gram): ``e[k]·tr G`` is the energy of every unit outside the
    first ``j(k)`` columns of ``Q``, ``j(k)`` the independent units among the first ``k``.
    A unit in the span of the units before it (a dead unit, a copy, a sum of earlier
    ones) adds nothing and takes no column of ``Q``: an unpivoted QR would give it an
    arbitrary direction, which then counted as explained energy.  O(m³), one QR more
    per dependent unit that is not dead.

    Example::

        >>> import numpy as np
        >>> G = np.array([[1.0, 1.0, 0.0], [1.0, 1.0, 0.0], [0.0, 0.0, 2.0]])
        >>> order_residual_curve(G, [0, 1, 2]).round(3).tolist()
        [1.0, 0.5, 0.5, 0.0]
    """
    G = as_gram(G, "G")
    m = G.shape[0]
    idx = as_index_set(order, m, "order")
    if idx.size != m:
        raise ValueError(f"order must list all {m} units, got {idx.size}")
    P = G[np.ix_(idx, idx)].copy()
    total = float(np.trace(G))
    if total <= 0:
        return np.zeros(m + 1)
    # a square root X (XᵀX = P), its columns in the given order
    w, V = np.linalg.eigh(P)
    X = np.sqrt(np.maximum(w, 0.0))[:, None] * V.T
    # a unit whose energy outside the span of the live units before it is below this adds
    # nothing (the square root's own rounding is about 1e-16 of the trace)
    floor = 1e-12 * total
    live = np.diag(P) > floor  # dead units first: they need no QR
    Q = np.zeros((m, 0))
    for _ in range(m + 1):
        cols = np.flatnonzero(live)
        if cols.size == 0:
            break
        Q, R = scipy.linalg.qr(X[:, cols], mode="economic", check_finite=False)
        small = np.flatnonzero(np.abs(np.diag(R)) ** 2 <= floor)
        if small.size == 0:
            break
        live[cols[small[0]]] = False  # the first is dependent; the later are not known yet
    captured = np.concatenate([[0.0], np.cumsum(((Q.T @ X) ** 2).sum(axis=1))])
    j = np.concatenate([[0], np.cumsum(live)])  # live units among the first k
    curve = np.maximum(total - captured[j], 0.0) / total
    curve[-1] = 0.0  # every unit kept: nothing to reconstruct
    return np.maximum.accumulate(curve[::-1])[::-1]
