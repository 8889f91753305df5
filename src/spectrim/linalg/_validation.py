"""Input validation shared by the :mod:`spectrim.linalg` kernels.

All checks raise :class:`ValueError` (or :class:`TypeError` for non-numeric input) with a
message that names the offending argument. Every function returns a fresh float64 /
int64 array, so callers may modify the result.
"""

from __future__ import annotations

import numbers
from typing import Any

import numpy as np

__all__ = [
    "SYMMETRY_RTOL",
    "as_float_matrix",
    "as_gram",
    "as_index_set",
    "as_ridge",
    "check_k",
    "default_rtol",
    "to_numpy",
]

#: Relative tolerance for the symmetry check of Gram matrices: ``|G - Gᵀ| <= SYMMETRY_RTOL *
#: max|G|``. Loose enough for Grams accumulated from float32 products, tight enough to catch
#: a non-Gram matrix (e.g. a weight matrix or a cross Gram passed by mistake).
SYMMETRY_RTOL = 1e-6

_EPS = float(np.finfo(np.float64).eps)


def default_rtol(m: int) -> float:
    """Default relative cutoff ``10·m·eps`` used to declare a pivot / eigenvalue numerically zero.

    Example::

        >>> default_rtol(100) < 1e-12
        True
    """
    return 10.0 * max(int(m), 1) * _EPS


def to_numpy(x: Any, name: str) -> np.ndarray:
    """Convert array-likes (and torch tensors, via duck typing) to a real numeric ndarray."""
    # Duck-typed torch support without importing torch here.
    if hasattr(x, "detach") and hasattr(x, "cpu"):
        x = x.detach().cpu().numpy()
    try:
        arr = np.asarray(x)
    except Exception as exc:  # pragma: no cover - exotic inputs
        raise TypeError(f"{name} must be array-like, got {type(x).__name__}") from exc
    if arr.dtype == object or not (
        np.issubdtype(arr.dtype, np.number) or np.issubdtype(arr.dtype, np.bool_)
    ):
        raise TypeError(f"{name} must be a numeric array, got dtype {arr.dtype}")
    if np.iscomplexobj(arr):
        raise TypeError(f"{name} must be real, got dtype {arr.dtype}")
    return arr


def as_float_matrix(
    x: Any, name: str, shape: tuple[int | None, int | None] | None = None
) -> np.ndarray:
    """Return ``x`` as a finite float64 2-D array (a copy), optionally checking its shape.

    ``shape`` entries set to ``None`` are not checked.
    """
    arr = to_numpy(x, name)
    if arr.ndim != 2:
        raise ValueError(
            f"{name} must be a 2-D matrix, got {arr.ndim}-D array of shape {arr.shape}"
        )
    if shape is not None:
        for axis, want in enumerate(shape):
            if want is not None and arr.shape[axis] != want:
                want_str = ", ".join("*" if s is None else str(s) for s in shape)
                raise ValueError(f"{name} must have shape ({want_str}), got {arr.shape}")
    out = np.array(arr, dtype=np.float64, copy=True)
    if not np.all(np.isfinite(out)):
        raise ValueError(f"{name} contains non-finite values (NaN or inf)")
    return out


def as_gram(G: Any, name: str = "G") -> np.ndarray:
    """Validate a Gram matrix and return a symmetrised float64 copy.

    Checks: 2-D, square, finite, symmetric within ``SYMMETRY_RTOL`` (relative to ``max|G|``)
    and a non-negative diagonal (up to rounding; tiny negative diagonal entries are clamped
    to zero). Positive semidefiniteness beyond that is not checked: the kernels treat
    negative eigenvalues as rounding noise.

    Example::

        >>> as_gram([[2.0, 1.0], [1.0, 2.0]]).dtype
        dtype('float64')
    """
    out = as_float_matrix(G, name)
    if out.shape[0] != out.shape[1]:
        raise ValueError(f"{name} must be square, got shape {out.shape}")
    if out.size == 0:
        return out
    scale = float(np.max(np.abs(out)))
    asym = float(np.max(np.abs(out - out.T)))
    if asym > SYMMETRY_RTOL * scale:
        raise ValueError(
            f"{name} must be symmetric: max |{name} - {name}ᵀ| = {asym:.3g} exceeds "
            f"{SYMMETRY_RTOL:g} * max|{name}| = {SYMMETRY_RTOL * scale:.3g}"
        )
    out = 0.5 * (out + out.T)
    diag = np.diag(out)
    if np.any(diag < -SYMMETRY_RTOL * scale):
        j = int(np.argmin(diag))
        raise ValueError(
            f"{name} must be positive semidefinite, but its diagonal entry [{j}, {j}] = "
            f"{diag[j]:.3g} is negative"
        )
    neg = np.flatnonzero(diag < 0)
    if neg.size:
        out[neg, :] = 0.0
        out[:, neg] = 0.0
    return out


def check_k(k: Any, m: int, name: str = "k") -> int:
    """Return ``k`` as a Python int after checking ``0 <= k <= m``."""
    if isinstance(k, bool) or not isinstance(k, numbers.Integral):
        raise TypeError(f"{name} must be an integer, got {type(k).__name__}")
    k = int(k)
    if not 0 <= k <= m:
        raise ValueError(f"{name} must satisfy 0 <= {name} <= {m}, got {k}")
    return k


def as_index_set(S: Any, m: int, name: str = "S") -> np.ndarray:
    """Validate a set of distinct column indices into ``range(m)``; returns an int64 copy.

    Order is preserved (it determines the column order of reconstruction matrices).
    Negative indices are rejected rather than wrapped.
    """
    arr = to_numpy(S, name)
    if arr.ndim != 1:
        raise ValueError(f"{name} must be a 1-D array of indices, got shape {arr.shape}")
    if arr.size == 0:
        return np.zeros(0, dtype=np.int64)
    if np.issubdtype(arr.dtype, np.bool_) or not np.issubdtype(arr.dtype, np.integer):
        raise TypeError(f"{name} must contain integer indices, got dtype {arr.dtype}")
    out = arr.astype(np.int64, copy=True)
    if out.min() < 0 or out.max() >= m:
        raise ValueError(
            f"{name} must contain indices in [0, {m}), got min {out.min()} and max {out.max()}"
        )
    if np.unique(out).size != out.size:
        raise ValueError(f"{name} must not contain duplicate indices")
    return out


def as_ridge(ridge: Any, k: int, name: str = "ridge") -> np.ndarray:
    """Validate a ridge penalty: a scalar or a length-``k`` vector, finite and ``>= 0``.

    Returns a float64 vector of length ``k`` (the per-kept-unit penalties ``τ_j``).
    """
    arr = to_numpy(ridge, name).astype(np.float64)
    if arr.ndim == 0:
        arr = np.full(k, float(arr))
    elif arr.ndim != 1 or arr.shape[0] != k:
        raise ValueError(
            f"{name} must be a scalar or a vector of length {k}, got shape {arr.shape}"
        )
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{name} must be finite")
    if np.any(arr < 0):
        raise ValueError(f"{name} must be non-negative, got min {arr.min():.3g}")
    return arr
