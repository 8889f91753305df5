"""Spectral summaries of a Gram / second-moment matrix (Paper 1, Suzuki et al. IJCAI 2020).

* :func:`gram_spectrum` — eigenvalues of ``Σ̂``, descending, clamped at 0.
* :func:`degrees_of_freedom` — ``N̂(λ) = Tr[Σ̂(Σ̂ + λI)⁻¹] = Σ_j μ_j / (μ_j + λ)``.
* :func:`ridge_leverage_scores` — ``ℓ_j(λ) = [Σ̂(Σ̂ + λI)⁻¹]_jj`` (they sum to ``N̂(λ)``).
* :func:`effective_rank` — ``exp(entropy(μ / Σμ))`` (Roy & Vetterli 2007).

Example::

    >>> import numpy as np
    >>> mu = np.array([4.0, 1.0, 0.0])
    >>> float(degrees_of_freedom(mu, 1.0))  # 4/5 + 1/2
    1.3
    >>> round(effective_rank(mu), 4)
    1.6494
"""

from __future__ import annotations

from typing import Any

import numpy as np
import scipy.linalg

from spectrim.linalg._validation import as_gram, default_rtol, to_numpy

__all__ = [
    "degrees_of_freedom",
    "effective_rank",
    "gram_spectrum",
    "ridge_leverage_scores",
]


def _as_eigvals(eigvals: Any, name: str = "eigvals") -> np.ndarray:
    arr = to_numpy(eigvals, name).astype(np.float64)
    if arr.ndim != 1:
        raise ValueError(f"{name} must be a 1-D array, got shape {arr.shape}")
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{name} contains non-finite values (NaN or inf)")
    # Negative eigenvalues of a PSD matrix are rounding noise: treat them as zero.
    return np.maximum(arr, 0.0)


def _as_lam(lam: Any, name: str = "lam") -> np.ndarray:
    arr = to_numpy(lam, name).astype(np.float64)
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{name} must be finite")
    if np.any(arr < 0):
        raise ValueError(f"{name} must be non-negative, got min {arr.min():.3g}")
    return arr


def gram_spectrum(G: Any, *, rtol: float | None = None) -> np.ndarray:
    """Eigenvalues of a symmetric PSD matrix, in descending order, noise clamped to 0.

    Eigenvalues ``<= rtol·λ_max`` (default ``rtol = 10·m·eps``, the eigensolver's rounding
    level), including the small negative ones, are returned as exactly 0, so a rank-r
    Gram has exactly r non-zero eigenvalues. Pass ``rtol=0`` to clamp only negatives.
    O(m³) (``scipy.linalg.eigh``, eigenvalues only).

    Example::

        >>> gram_spectrum([[2.0, 0.0], [0.0, 5.0]]).tolist()
        [5.0, 2.0]
        >>> gram_spectrum([[1.0, 1.0], [1.0, 1.0]]).tolist()  # rank 1
        [2.0, 0.0]
    """
    G = as_gram(G, "G")
    m = G.shape[0]
    if rtol is None:
        rtol = default_rtol(m)
    elif not (np.isfinite(rtol) and rtol >= 0):
        raise ValueError(f"rtol must be a finite non-negative float, got {rtol!r}")
    if m == 0:
        return np.zeros(0)
    w = scipy.linalg.eigh(G, eigvals_only=True, check_finite=False)[::-1]
    cutoff = rtol * max(float(w[0]), 0.0)
    return np.where(w > cutoff, w, 0.0)


def degrees_of_freedom(eigvals: Any, lam: Any) -> np.ndarray | float:
    """Degrees of freedom ``N(λ) = Σ_j μ_j / (μ_j + λ)``, vectorised over ``lam``.

    Non-increasing in ``λ``; ``N(0)`` is the number of positive eigenvalues (so ``N(λ) <=
    rank``). Negative ``eigvals`` (rounding) count as 0. Returns a float for scalar ``lam``,
    else an array of ``lam``'s shape. O(m · len(lam)).

    Args:
        eigvals: eigenvalues ``μ`` of ``Σ̂`` (any order), e.g. from :func:`gram_spectrum`.
        lam: ``λ >= 0`` (scalar or array).

    Example::

        >>> degrees_of_freedom([1.0, 1.0, 0.0], [0.0, 1.0]).tolist()
        [2.0, 1.0]
    """
    mu = _as_eigvals(eigvals)
    lam_arr = _as_lam(lam)
    lam_flat = lam_arr.reshape(-1, 1)
    pos = mu > 0
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = np.where(pos[None, :], mu[None, :] / (mu[None, :] + lam_flat), 0.0)
    out = ratio.sum(axis=1).reshape(lam_arr.shape)
    if out.ndim == 0:
        return float(out)
    return out


def ridge_leverage_scores(G: Any, lam: float) -> np.ndarray:
    """Ridge leverage scores ``ℓ_j(λ) = [G (G + λI)⁻¹]_jj`` of the units; ``Σ_j ℓ_j = N(λ)``.

    Computed from the eigendecomposition ``G = V diag(μ) Vᵀ`` as
    ``ℓ = (V ⊙ V) · (μ / (μ + λ))``; requires ``λ > 0``. O(m³).

    Example::

        >>> ridge_leverage_scores([[3.0, 0.0], [0.0, 1.0]], 1.0).tolist()
        [0.75, 0.5]
    """
    G = as_gram(G, "G")
    lam_arr = _as_lam(lam)
    if lam_arr.ndim != 0:
        raise ValueError(f"lam must be a scalar, got shape {lam_arr.shape}")
    lam_f = float(lam_arr)
    if lam_f <= 0:
        raise ValueError(f"lam must be positive, got {lam_f!r}")
    if G.shape[0] == 0:
        return np.zeros(0)
    mu, V = scipy.linalg.eigh(G, check_finite=False)
    mu = np.maximum(mu, 0.0)
    return (V * V) @ (mu / (mu + lam_f))


def effective_rank(eigvals: Any) -> float:
    """Effective rank ``exp(H(p))`` with ``p = μ / Σμ`` and Shannon entropy ``H`` (0 log 0 = 0).

    Between 1 (one non-zero eigenvalue) and the number of non-zero eigenvalues (flat
    spectrum); 0 for an all-zero spectrum. Negative ``eigvals`` (rounding) count as 0. O(m).

    Example::

        >>> effective_rank([2.0, 2.0, 0.0])
        2.0
    """
    mu = _as_eigvals(eigvals)
    total = float(mu.sum())
    if total <= 0.0:
        return 0.0
    p = mu[mu > 0] / total
    return float(np.exp(-np.sum(p * np.log(p))))
