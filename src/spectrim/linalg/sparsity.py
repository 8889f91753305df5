"""Soft sparsity and spectral summaries of weight matrices (papers §4.1, §4.4, §5b.3).

* :func:`power_mean` — ``M_r(w) = (Σ_i |w_i|^r / d)^{1/r}``.
* :func:`pq_index` — the PQ index of Diao et al. (ICLR 2023), for ``0 < p < q``:
  ``I_{p,q}(w) = 1 − d^{1/q − 1/p}·‖w‖_p / ‖w‖_q = 1 − M_p(w) / M_q(w)``, in
  ``[0, 1 − d^{1/q − 1/p}]``; 0 iff all ``|w_i|`` are equal, larger = sparser. With
  ``q = 1`` and ``p ∈ (0, 1)`` it is the ℓ_p "soft sparsity" of Yang et al. (Paper 3):
  ``1 − I_{p,1} = 1 / SI_p`` where ``SI_p = M_1 / M_p`` (:func:`soft_sparsity`).
* :func:`spectral_norm`, :func:`stable_rank` — ``‖W‖₂`` and ``‖W‖_F² / ‖W‖₂²`` (between 1
  and ``rank(W)``; 0 for ``W = 0``).

A conv weight ``(out, in, kh, kw)`` is read as the matrix ``(out, in·kh·kw)``
(:func:`weight_matrix`): one row per output neuron, as in the PQI code's "neuron" scope.

Example::

    >>> import numpy as np
    >>> float(pq_index([1.0, -1.0, 1.0, 1.0]))  # flat: not sparse at all
    0.0
    >>> round(float(pq_index([1.0, 0.0, 0.0, 0.0])), 6)  # one non-zero: 1 − d^{1 − 1/0.5}
    0.75
    >>> stable_rank(np.eye(3))
    3.0
"""

from __future__ import annotations

from typing import Any

import numpy as np
import scipy.sparse.linalg

from spectrim.linalg._validation import to_numpy

__all__ = [
    "power_mean",
    "pq_index",
    "soft_sparsity",
    "spectral_norm",
    "stable_rank",
    "weight_matrix",
]

#: Above this smaller dimension :func:`spectral_norm` uses Lanczos (``svds``) instead of a full SVD.
_DENSE_SVD_LIMIT = 512


def _as_values(w: Any, name: str = "w") -> np.ndarray:
    arr = to_numpy(w, name).astype(np.float64)
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{name} contains non-finite values (NaN or inf)")
    return arr


def _check_exponent(r: float, name: str) -> float:
    r = float(r)
    if not (np.isfinite(r) and r > 0):
        raise ValueError(f"{name} must be a finite positive number, got {r!r}")
    return r


def _power_mean(a: np.ndarray, r: float, axis: int | None) -> np.ndarray:
    """``M_r`` of ``|a|`` along ``axis``, computed on ``|a| / max|a|`` (no over/underflow)."""
    mag = np.abs(a)
    scale = np.max(mag, axis=axis, keepdims=True) if mag.size else np.zeros_like(mag)
    with np.errstate(invalid="ignore", divide="ignore"):
        unit = np.where(scale > 0, mag / np.where(scale > 0, scale, 1.0), 0.0)
    mean = np.mean(unit**r, axis=axis, keepdims=True) if mag.size else unit
    out = scale * mean ** (1.0 / r)
    return np.squeeze(out, axis=axis) if axis is not None else out.reshape(())


def power_mean(w: Any, r: float, axis: int | None = None) -> np.ndarray | float:
    """Power mean ``M_r(w) = (Σ_i |w_i|^r / d)^{1/r}`` for ``r > 0``, over ``axis``.

    ``axis=None`` pools every entry. Returns a float for ``axis=None``, else an array.
    O(size of ``w``).

    Example::

        >>> power_mean([1.0, 4.0], 0.5)  # ((1 + 2) / 2)² = 2.25
        2.25
    """
    a = _as_values(w)
    r = _check_exponent(r, "r")
    if a.size == 0:
        raise ValueError("w is empty")
    out = _power_mean(a, r, axis)
    return float(out) if out.ndim == 0 else out


def pq_index(w: Any, p: float = 0.5, q: float = 1.0, axis: int | None = None) -> np.ndarray | float:
    """PQ index ``I_{p,q}(w) = 1 − M_p(w) / M_q(w)`` (``0 < p < q``), over ``axis``.

    Equal to ``1 − d^{1/q − 1/p}·‖w‖_p/‖w‖_q`` with ``d`` entries (papers §4.4, Diao et al.
    2023, Definition 1). It lies in ``[0, 1 − d^{1/q − 1/p}]``: 0 iff every ``|w_i|`` is the
    same, the maximum for a single non-zero; scale-invariant; larger means sparser. An
    all-zero vector gets 0 (as in the PQI code). Tiny negative rounding is clamped to 0.
    The default ``(p, q) = (0.5, 1)`` is SAP's main setting and the ℓ_{0.5} soft sparsity.

    Args:
        w: values; ``axis=None`` pools all of them (the "layer" scope), ``axis=1`` of a
            weight matrix gives one value per row (the "neuron" scope).
        p, q: exponents with ``0 < p < q``.
        axis: axis to reduce over.

    Returns a float for ``axis=None``, else an array. O(size of ``w``).

    Example::

        >>> round(float(pq_index([3.0, 1.0])), 6)  # 1 − ((√3 + 1)/2)² / 2
        0.066987
        >>> pq_index([[1.0, 1.0], [1.0, 0.0]], axis=1).round(3).tolist()
        [0.0, 0.5]
    """
    a = _as_values(w)
    p = _check_exponent(p, "p")
    q = _check_exponent(q, "q")
    if not p < q:
        raise ValueError(f"pq_index needs p < q, got p={p!r}, q={q!r}")
    if a.size == 0:
        raise ValueError("w is empty")
    mp = _power_mean(a, p, axis)
    mq = _power_mean(a, q, axis)
    with np.errstate(invalid="ignore", divide="ignore"):
        out = np.where(mq > 0, 1.0 - mp / np.where(mq > 0, mq, 1.0), 0.0)
    out = np.clip(out, 0.0, 1.0)
    return float(out) if out.ndim == 0 else out


def soft_sparsity(w: Any, q: float = 0.5, axis: int | None = None) -> np.ndarray | float:
    """Length-normalised ℓ_q soft sparsity ``SI_q(w) = M_1(w) / M_q(w)`` for ``0 < q < 1``.

    The form of Paper 3's group code (papers §4.1): ``SI_q = d^{1/q − 1}·‖w‖_1/‖w‖_q`` in
    ``[1, d^{1/q − 1}]``, larger = sparser; ``SI_q = 1 / (1 − I_{q,1})`` with :func:`pq_index`.
    An all-zero vector gets 1. Returns a float for ``axis=None``, else an array.

    Example::

        >>> soft_sparsity([1.0, 0.0, 0.0, 0.0])  # d^{1/q − 1} = 4
        4.0
    """
    q = _check_exponent(q, "q")
    if not q < 1:
        raise ValueError(f"soft_sparsity needs 0 < q < 1, got q={q!r}")
    index = np.asarray(pq_index(w, p=q, q=1.0, axis=axis))
    out = 1.0 / (1.0 - index)
    return float(out) if out.ndim == 0 else out


def weight_matrix(weight: Any) -> np.ndarray:
    """A weight tensor as a float64 matrix with one row per output unit: ``(out, −1)``.

    Example::

        >>> weight_matrix(np.zeros((8, 3, 3, 3))).shape
        (8, 27)
    """
    a = _as_values(weight, "weight")
    if a.ndim < 1:
        raise ValueError("weight must have at least one dimension")
    return a.reshape(a.shape[0], -1)


def _as_matrix(W: Any) -> np.ndarray:
    a = _as_values(W, "W")
    if a.ndim != 2:
        raise ValueError(f"W must be a 2-D matrix, got shape {a.shape}")
    return a


def spectral_norm(W: Any) -> float:
    """Largest singular value ``‖W‖₂`` of a matrix (0 for an empty or zero matrix).

    A dense SVD (singular values only) when the smaller side is at most 512, else
    Lanczos (``scipy.sparse.linalg.svds``, k=1) with a dense fallback.

    Example::

        >>> spectral_norm([[3.0, 0.0], [0.0, -4.0]])
        4.0
    """
    a = _as_matrix(W)
    if a.size == 0 or not np.any(a):
        return 0.0
    if min(a.shape) <= _DENSE_SVD_LIMIT:
        return float(np.linalg.svd(a, compute_uv=False)[0])
    try:
        s = scipy.sparse.linalg.svds(a, k=1, return_singular_vectors=False, random_state=0)
        return float(np.max(s))
    except Exception:  # pragma: no cover - ARPACK did not converge
        return float(np.linalg.svd(a, compute_uv=False)[0])


def stable_rank(W: Any) -> float:
    """Stable rank ``‖W‖_F² / ‖W‖₂²``: between 1 and ``rank(W)``; 0 for ``W = 0``.

    Example::

        >>> stable_rank([[1.0, 0.0], [0.0, 0.5]])  # (1 + 0.25) / 1
        1.25
    """
    a = _as_matrix(W)
    s2 = spectral_norm(a)
    if s2 == 0.0:
        return 0.0
    # ‖W‖_F² ≥ ‖W‖₂² exactly; clamp the rounding so the result is never below 1
    return max(float(np.sum(a * a)) / (s2 * s2), 1.0)
