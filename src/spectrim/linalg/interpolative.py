"""Interpolative decomposition (ID) of a layer's activations, computed from their Gram matrix.

Paper 2 (Chee et al., NeurIPS 2022) selects units with a column-pivoted QR (CPQR) of the
activation matrix ``Z`` (n×m, rows = samples or sample·positions, columns = units). CPQR
only depends on inner products of the columns of ``Z``, i.e. on ``G = ZᵀZ``: any ``R0`` with
``R0ᵀR0 = G`` has the same CPQR pivots and the same ``|R|`` as ``Z``. (When ``n >= m`` this
is the TSQR argument ``Z = U R0`` with ``U`` orthonormal; in general both factorisations are
the unique Cholesky-like factor of ``ΠᵀGΠ`` up to row signs.) So the kernels here take the
m×m Gram matrix — which can be streamed with O(m²) memory — and never see raw activations.

Numerics: everything is float64 LAPACK. Working from ``G`` squares the condition number:
singular values of ``Z`` below about ``sqrt(m·eps)·σ_max(Z)`` are not resolved and are treated
as exact zeros. That is far below anything that matters for pruning.

Example::

    >>> import numpy as np
    >>> rng = np.random.default_rng(0)
    >>> Z = rng.standard_normal((50, 8)) @ rng.standard_normal((8, 12))  # rank 8, 12 units
    >>> fac = id_factorize(Z.T @ Z)
    >>> S, T = fac.selected(8), fac.interpolation(8)
    >>> bool(np.allclose(Z[:, S] @ T, Z))
    True
    >>> fac.smallest_k(1e-6), fac.rank()
    (8, 8)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import scipy.linalg
from scipy.linalg.lapack import dpstrf, dtrcon

from spectrim.linalg._validation import as_gram, check_k, default_rtol

__all__ = ["CHOLESKY_FROM", "IDFactorization", "gram_sqrt", "id_factorize", "id_from_rows"]

#: ``id_factorize(method="auto")`` uses the pivoted Cholesky from this width on
CHOLESKY_FROM = 1024


def gram_sqrt(G: Any, *, rtol: float | None = None) -> np.ndarray:
    """Return an m×m matrix ``R0`` with ``R0ᵀ R0 = G`` (a "square root" of a PSD Gram matrix).

    ``G`` is first Jacobi-scaled to unit diagonal (``Ĝ = D⁻¹GD⁻¹``, ``D = diag(G)^½``) so
    that units with very different activation scales are all represented to full relative
    accuracy; then ``Ĝ = V diag(w) Vᵀ`` (``scipy.linalg.eigh``) and ``R0 = diag(√w) Vᵀ D``.
    Eigenvalues ``w <= rtol·max(w)`` (including the small negative ones produced by rounding)
    are set to zero, so numerically rank-deficient Grams give an ``R0`` whose trailing rows
    are exactly zero. Units with a zero diagonal entry (dead units) get an exactly zero column.

    Rows are ordered by decreasing eigenvalue. ``R0`` is not triangular; it is meant as the
    input of a column-pivoted QR (:func:`id_factorize`) or of least squares.

    Args:
        G: symmetric PSD m×m matrix (float64, finite).
        rtol: relative eigenvalue cutoff in the scaled problem; default ``10·m·eps``.

    Complexity: O(m³) time (one symmetric eigendecomposition), O(m²) memory.

    Example::

        >>> import numpy as np
        >>> G = np.array([[4.0, 2.0], [2.0, 1.0]])  # rank 1
        >>> R0 = gram_sqrt(G)
        >>> bool(np.allclose(R0.T @ R0, G)), bool(np.all(R0[1] == 0))
        (True, True)
    """
    G = as_gram(G, "G")
    m = G.shape[0]
    if rtol is None:
        rtol = default_rtol(m)
    elif not (np.isfinite(rtol) and rtol >= 0):
        raise ValueError(f"rtol must be a finite non-negative float, got {rtol!r}")
    R0 = np.zeros((m, m), dtype=np.float64)
    d = np.diag(G)
    live = np.flatnonzero(d > 0)
    if live.size == 0:
        return R0
    s = np.sqrt(d[live])
    G_hat = G[np.ix_(live, live)] / np.outer(s, s)
    w, V = scipy.linalg.eigh(G_hat, check_finite=False)
    w = w[::-1]
    V = V[:, ::-1]
    w = np.where(w > rtol * max(float(w[0]), 0.0), w, 0.0)
    R0[: live.size, live] = (np.sqrt(w)[:, None] * V.T) * s[None, :]
    return R0


@dataclass(frozen=True, eq=False)
class IDFactorization:
    """Column-pivoted QR of a Gram square root: everything needed for IDs of every size k.

    Built by :func:`id_factorize`. With ``Π`` the pivot permutation, ``Z Π = Q R`` for the
    (implicit) activation matrix ``Z``. Keeping the first ``k`` pivots ``S_k = perm[:k]``
    and the interpolation matrix ``T_k = [I, R11⁺R12] Πᵀ`` gives ``Z ≈ Z[:, S_k] T_k`` with
    squared error ``‖R22‖_F² = residuals[k]``.

    Attributes:
        perm: pivot order, int64 array of length m (a permutation of ``range(m)``).
        R: r×m upper-trapezoidal factor (float64), ``r <= m`` (m×m from a Gram; fewer
            rows from a sketch of ``k < m`` rows, :func:`id_from_rows`: the missing rows
            are zero); ``|R[i, i]|`` is non-increasing.
        residuals: float64 array of length m+1; ``residuals[k] = ‖Z − Z[:, S_k] T_k‖_F²
            = Σ_{i≥k} ‖R[i, i:]‖²``; ``residuals[m] = 0``.
        total: ``residuals[0] = ‖Z‖_F² = trace(G)`` (up to rounding).

    All arrays are read-only.

    Example::

        >>> import numpy as np
        >>> Z = np.random.default_rng(1).standard_normal((40, 6))
        >>> fac = id_factorize(Z.T @ Z)
        >>> k = 3
        >>> E = Z - Z[:, fac.selected(k)] @ fac.interpolation(k)
        >>> bool(np.isclose((E**2).sum(), fac.residuals[k]))
        True
    """

    perm: np.ndarray
    R: np.ndarray
    residuals: np.ndarray
    total: float

    def __post_init__(self) -> None:
        perm = np.array(self.perm, dtype=np.int64, copy=True)
        R = np.array(self.R, dtype=np.float64, copy=True)
        residuals = np.array(self.residuals, dtype=np.float64, copy=True)
        m = perm.shape[0]
        if perm.ndim != 1 or not np.array_equal(np.sort(perm), np.arange(m)):
            raise ValueError("perm must be a permutation of range(m)")
        if R.ndim != 2 or R.shape[1] != m or R.shape[0] > m:
            raise ValueError(f"R must have shape (r, {m}) with r <= {m}, got {R.shape}")
        if residuals.shape != (m + 1,):
            raise ValueError(f"residuals must have shape ({m + 1},), got {residuals.shape}")
        for arr in (perm, R, residuals):
            arr.setflags(write=False)
        object.__setattr__(self, "perm", perm)
        object.__setattr__(self, "R", R)
        object.__setattr__(self, "residuals", residuals)
        object.__setattr__(self, "total", float(self.total))

    @property
    def m(self) -> int:
        """Number of units (columns of ``Z``)."""
        return int(self.perm.shape[0])

    def selected(self, k: int | np.integer) -> np.ndarray:
        """The first ``k`` pivots (kept units), in pivot order. O(k).

        Example::

            >>> import numpy as np
            >>> id_factorize(np.diag([1.0, 9.0, 4.0])).selected(2).tolist()
            [1, 2]
        """
        k = check_k(k, self.m)
        return self.perm[:k].copy()

    def interpolation(self, k: int | np.integer, *, rtol: float | None = None) -> np.ndarray:
        """Interpolation matrix ``T`` (k×m) with ``T[:, S] = I`` and ``Z ≈ Z[:, S] T``.

        ``T = [I_k, X] Πᵀ`` where ``X`` solves ``R11 X = R12``. When ``R11`` is numerically
        nonsingular (LAPACK ``dtrcon`` reciprocal condition estimate ``> rtol``) ``X`` comes
        from a triangular solve; otherwise (rank deficiency: duplicated or dead units among
        the kept ones) ``X = R11⁺ R12`` from an SVD least-squares solve that drops singular
        values below ``rtol·σ_max(R11)``. Either way each non-kept column gets its
        least-squares reconstruction from the kept ones (the minimum-norm one if it is not
        unique), and the kept columns are reproduced exactly.

        Args:
            k: number of kept units, ``0 <= k <= m``.
            rtol: relative cutoff (default ``10·m·eps``).

        Complexity: O(k²(m−k)) (triangular solve), O(k³ + k²(m−k)) in the rank-deficient case.

        Example::

            >>> import numpy as np
            >>> fac = id_factorize(np.array([[1.0, 2.0], [2.0, 4.0]]))  # z1 = 2·z0
            >>> fac.interpolation(1)
            array([[0.5, 1. ]])
        """
        m = self.m
        k = check_k(k, m)
        if rtol is None:
            rtol = default_rtol(m)
        T = np.zeros((k, m), dtype=np.float64)
        if k == 0:
            return T
        T[np.arange(k), self.perm[:k]] = 1.0
        if k == m:
            return T
        R = self.R
        if k > R.shape[0]:  # more kept units than rows of a sketch: the rest are zero
            R = np.zeros((k, m))
            R[: self.R.shape[0]] = self.R
        R11 = R[:k, :k]
        R12 = R[:k, k:]
        if float(np.abs(R11[0, 0])) == 0.0:
            # Z == 0 (CPQR puts the largest column first): nothing to interpolate.
            return T
        X: np.ndarray | None = None
        rcond, info = dtrcon(np.asfortranarray(R11), norm="1", uplo="U", diag="N")
        if info == 0 and rcond > rtol:
            X = scipy.linalg.solve_triangular(R11, R12, lower=False, check_finite=False)
            if not np.all(np.isfinite(X)):
                X = None
        if X is None:
            X = scipy.linalg.lstsq(R11, R12, cond=rtol, check_finite=False)[0]
        T[:, self.perm[k:]] = X
        return T

    def relative_error(self, k: int | np.integer) -> float:
        """``‖Z − Z[:, S_k] T_k‖_F / ‖Z‖_F = sqrt(residuals[k] / total)`` (0 when ``Z = 0``). O(1).

        Example::

            >>> import numpy as np
            >>> id_factorize(np.diag([3.0, 1.0])).relative_error(1)
            0.5
        """
        k = check_k(k, self.m)
        if self.total <= 0.0:
            return 0.0
        return float(np.sqrt(max(float(self.residuals[k]), 0.0) / self.total))

    def relative_errors(self) -> np.ndarray:
        """Vector of :meth:`relative_error` for ``k = 0..m`` (length m+1, non-increasing). O(m)."""
        if self.total <= 0.0:
            return np.zeros(self.m + 1)
        return np.sqrt(np.maximum(self.residuals, 0.0) / self.total)

    def pivot_ratio(self, k: int | np.integer) -> float:
        """``|R[k, k]| / |R[0, 0]|`` (0-indexed), the cheap error proxy of the ID repository.

        This is ``|r_{k+1,k+1}| / |r_{11}|`` in the paper's 1-indexed notation: the residual
        norm of the next pivot if ``k`` units are kept. 0 for ``k = m`` or ``Z = 0``. O(1).
        """
        k = check_k(k, self.m)
        if k >= self.R.shape[0]:
            return 0.0
        r00 = abs(float(self.R[0, 0]))
        return 0.0 if r00 == 0.0 else abs(float(self.R[k, k])) / r00

    def rank(self, tol: float | None = None) -> int:
        """Numerical rank: number of leading pivots with ``|R[i, i]| > tol·|R[0, 0]|``.

        ``tol`` defaults to ``10·m·eps``. Relative to the largest unit, so units whose
        activations are ~``tol`` times smaller than the largest one's count as zero. O(m).

        Example::

            >>> import numpy as np
            >>> id_factorize(np.diag([2.0, 0.0, 1.0])).rank()
            2
        """
        m = self.m
        if tol is None:
            tol = default_rtol(m)
        elif not (np.isfinite(tol) and tol >= 0):
            raise ValueError(f"tol must be a finite non-negative float, got {tol!r}")
        if m == 0 or self.R.shape[0] == 0:
            return 0
        d = np.abs(np.diag(self.R))
        if d[0] == 0.0:
            return 0
        small = np.flatnonzero(d <= tol * d[0])
        return int(small[0]) if small.size else len(d)

    def smallest_k(self, rel_err: float) -> int:
        """Smallest ``k`` with ``relative_error(k) <= rel_err``. O(m).

        Example::

            >>> import numpy as np
            >>> fac = id_factorize(np.diag([9.0, 4.0, 1.0]))  # squared errors 14, 5, 1, 0
            >>> fac.smallest_k(0.0), fac.smallest_k(0.3), fac.smallest_k(1.0)
            (3, 2, 0)
        """
        if not (np.isfinite(rel_err) and rel_err >= 0):
            raise ValueError(f"rel_err must be a finite non-negative float, got {rel_err!r}")
        errs = self.relative_errors()
        ok = np.flatnonzero(errs <= rel_err)
        # errs[m] == 0, so ok is never empty.
        return int(ok[0])


def id_factorize(G: Any, method: str = "auto") -> IDFactorization:
    """Interpolative-decomposition factorisation of the activations whose Gram matrix is ``G``.

    Two routes to the same pivots and ``R`` (up to row signs):

    * ``"cpqr"``: one column-pivoted QR (``scipy.linalg.qr(R0, mode="r", pivoting=True)``,
      LAPACK ``dgeqp3``) of ``R0 = gram_sqrt(G)``, whose Jacobi-scaled ``eigh`` resolves
      units of any scale (1e15 apart) and cuts numerical noise per unit;
    * ``"cholesky"``: one diagonally pivoted Cholesky ``ΠᵀGΠ = RᵀR`` (LAPACK ``dpstrf``),
      which picks the column of largest residual norm at every step as CPQR does, at a
      tenth of the cost (m = 4096, 2 threads: 1.1 s against 15.2 s; the same pivots for
      the first 4055).  It stops at the numerical rank, where no residual exceeds
      ``m·eps·max diag G``: units below about ``sqrt(m·eps)`` of the largest one's scale
      count as zero (the Gram's own resolution, see the module docstring) instead of being
      ordered among themselves.
    * ``"auto"`` (default): ``"cholesky"`` from :data:`CHOLESKY_FROM` units on, where the
      O(m³) steps dominate a compression, else ``"cpqr"``.

    The residual curve for every ``k`` is a reversed cumulative sum of squared row norms
    of ``R`` (accurate even when the tail is tiny).

    Args:
        G: symmetric PSD m×m Gram matrix ``ZᵀZ`` (float64, finite). Normalising it (e.g.
            dividing by the number of rows) only scales ``R``/``residuals``, not pivots or ``T``.
        method: ``"auto"``, ``"cpqr"`` or ``"cholesky"``.

    Complexity: O(m³) time, O(m²) memory; afterwards every ``k`` is cheap (see the methods).

    Example::

        >>> import numpy as np
        >>> Z = np.random.default_rng(0).standard_normal((30, 5))
        >>> fac = id_factorize(Z.T @ Z)
        >>> bool(np.isclose(fac.total, np.trace(Z.T @ Z)))
        True
        >>> bool((id_factorize(Z.T @ Z, "cholesky").perm == fac.perm).all())
        True
    """
    if method not in ("auto", "cpqr", "cholesky"):
        raise ValueError(f"method={method!r} must be 'auto', 'cpqr' or 'cholesky'")
    G = as_gram(G, "G")
    m = G.shape[0]
    if m == 0:
        return IDFactorization(
            perm=np.zeros(0, dtype=np.int64),
            R=np.zeros((0, 0)),
            residuals=np.zeros(1),
            total=0.0,
        )
    if method == "cholesky" or (method == "auto" and m >= CHOLESKY_FROM):
        U, piv, rank, info = dpstrf(G, lower=0, tol=-1.0)
        if info < 0:  # pragma: no cover - an argument LAPACK rejects
            raise ValueError(f"dpstrf rejected its argument {-info}")
        perm = np.asarray(piv, dtype=np.int64) - 1
        R = np.triu(U)
        R[int(rank) :, :] = 0.0  # below the rank: in the span of the columns before
    else:
        R, perm = scipy.linalg.qr(gram_sqrt(G), mode="r", pivoting=True, check_finite=False)
        R = np.triu(R)
    row_sq = np.einsum("ij,ij->i", R, R)
    residuals = np.zeros(m + 1, dtype=np.float64)
    residuals[:m] = np.cumsum(row_sq[::-1])[::-1]
    return IDFactorization(perm=perm, R=R, residuals=residuals, total=float(residuals[0]))


def id_from_rows(Y: Any) -> IDFactorization:
    """Interpolative-decomposition factorisation from rows ``Y`` (r×m) of the activations,
    or of any sketch of them (``Y = ΩZ``, :class:`~spectrim.calibration.sketch.RowSketch`).

    One column-pivoted QR of ``Y`` (LAPACK ``dgeqp3``, O(r·m·min(r, m))): with ``Y = Z`` it
    is the factorisation :func:`id_factorize` computes from ``ZᵀZ``; with a Gaussian sketch
    of ``r < m`` rows it is the randomized ID, whose ``R`` has ``r`` rows (the residuals of
    its first ``r`` pivots are those of the sketch: 0 from ``r`` on).  No Jacobi scaling
    and no Gram: the condition number is not squared.

    Example::

        >>> import numpy as np
        >>> Z = np.random.default_rng(0).standard_normal((30, 5))
        >>> a, b = id_from_rows(Z), id_factorize(Z.T @ Z, "cpqr")
        >>> bool((a.perm == b.perm).all()), bool(np.allclose(a.residuals, b.residuals))
        (True, True)
    """
    Y = np.asarray(Y, dtype=np.float64)
    if Y.ndim != 2:
        raise ValueError(f"Y must be a 2-D array of rows, got shape {Y.shape}")
    if not np.all(np.isfinite(Y)):
        raise ValueError("Y contains non-finite values (NaN or inf)")
    r, m = Y.shape
    if m == 0 or r == 0:
        return IDFactorization(
            perm=np.arange(m, dtype=np.int64),
            R=np.zeros((0, m)),
            residuals=np.zeros(m + 1),
            total=0.0,
        )
    R, perm = scipy.linalg.qr(Y, mode="r", pivoting=True, check_finite=False)
    R = np.triu(R[: min(r, m)])
    row_sq = np.einsum("ij,ij->i", R, R)
    residuals = np.zeros(m + 1, dtype=np.float64)
    residuals[: len(row_sq)] = np.cumsum(row_sq[::-1])[::-1]
    return IDFactorization(perm=perm, R=R, residuals=residuals, total=float(residuals[0]))
