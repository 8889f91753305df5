"""How much an error measured on the calibration rows under-estimates the error on new inputs.

A reconstruction ``z ≈ B z_S`` fitted by least squares on ``n`` rows with ``k = |S|``
predictors reproduces those rows better than it reproduces new ones: on the fitted rows the
residual is, on average, ``σ²(n − k)/n`` per row, on new rows drawn from the same
distribution ``σ²(n − 1)/(n − k − 1)`` (least squares with a Gaussian random design; the
``S_p`` criterion of Hocking 1976, Breiman & Freedman 1983). The in-sample relative error
curve ``e[k]`` of the ID (and of any fitted selection) is therefore optimistic by the factor

    ρ(k) = n (n − 1) / ((n − k) (n − k − 1)),

which is about ``1 + 2k/n`` while ``k ≪ n`` and grows without bound as ``k → n``: with as
many kept channels as rows, every fit is exact on the calibration data and says nothing
about other inputs. :func:`prediction_error_curve` applies ρ to a whole curve.

Example::

    >>> import numpy as np
    >>> e = np.array([1.0, 0.5, 0.2, 0.0])  # in-sample, 3 channels
    >>> prediction_error_curve(e, rows=10).round(3).tolist()
    [1.0, 0.625, 0.321, 0.0]
"""

from __future__ import annotations

from typing import Any

import numpy as np

__all__ = ["optimism", "prediction_error_curve"]


def optimism(k: Any, rows: float) -> np.ndarray:
    """``ρ(k) = n(n−1)/((n−k)(n−k−1))`` for ``k < n − 1`` (``inf`` beyond).

    Example::

        >>> float(optimism(0, 50)), round(float(optimism(10, 50)), 4)
        (1.0, 1.5705)
    """
    k = np.asarray(k, dtype=np.float64)
    n = float(rows)
    with np.errstate(divide="ignore", invalid="ignore"):
        rho = n * (n - 1.0) / ((n - k) * (n - k - 1.0))
    return np.where(k < n - 1.0, rho, np.inf)


def prediction_error_curve(curve: Any, rows: float) -> np.ndarray:
    """The expected relative squared error on new inputs for every width.

    ``curve[k]`` (``k = 0..m``) is a relative squared error measured on the ``rows``
    calibration rows the fits used. Each value is multiplied by :func:`optimism` ``ρ(k)``;
    widths whose fit has too few rows to be judged (``k ≥ n − 1``, but ``k < m``) get the
    error of keeping nothing, ``max(curve[0], 1)``; exact zeros stay zero (channels that
    are exactly dependent on ``n ≥ m`` rows are dependent); ``curve[m] = 0`` (nothing
    removed). The result is made non-increasing from the right, as the allocator needs.
    """
    e = np.asarray(curve, dtype=np.float64)
    m = len(e) - 1
    k = np.arange(m + 1)
    rho = optimism(k, rows)
    worst = max(float(e[0]) if m >= 0 else 1.0, 1.0)
    with np.errstate(invalid="ignore"):  # 0 * inf where the zeros are kept anyway
        out = np.where(e > 0, np.where(np.isfinite(rho), e * rho, worst), 0.0)
    if m >= 0:
        out[m] = 0.0
    return np.maximum.accumulate(out[::-1])[::-1]
