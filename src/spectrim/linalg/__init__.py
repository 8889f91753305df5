"""Float64 linear-algebra kernels on Gram matrices (numpy / scipy LAPACK, CPU).

Every kernel takes a symmetric PSD Gram matrix ``G = ZᵀZ`` (m×m) of a layer's activations
``Z`` (rows = samples or sample·positions, columns = units), never the activations themselves.
See :mod:`spectrim.calibration` for streaming such Grams out of a model.

* Interpolative decomposition (Paper 2): :func:`id_factorize` → :class:`IDFactorization`,
  :func:`gram_sqrt`; from rows or a randomized sketch of them: :func:`id_from_rows`.
* Reconstruction of all units from kept ones (Papers 1 and 2): :func:`fit_reconstruction`,
  :func:`fit_cross_reconstruction`, :func:`fit_rows_reconstruction` (from rows or a
  sketch), :func:`residual_of`, :func:`cross_residual_of`.
* Spectra (Paper 1): :func:`gram_spectrum`, :func:`degrees_of_freedom`,
  :func:`ridge_leverage_scores`, :func:`effective_rank`.
* Errors on new inputs from errors on the calibration rows: :func:`prediction_error_curve`,
  :func:`optimism`.
* Spectral-pruning selection (Paper 1): :func:`spectral_greedy`, :func:`spectral_loss`;
  whole blocks of units (attention heads): :func:`block_greedy`; the units of one
  matrix that best reconstruct another (the sequential pass): :func:`cross_greedy`.
* Weight sparsity and spectra (Paper 3, PQ index): :func:`pq_index`, :func:`soft_sparsity`,
  :func:`power_mean`, :func:`spectral_norm`, :func:`stable_rank`, :func:`weight_matrix`.

Example::

    >>> import numpy as np
    >>> from spectrim.linalg import id_factorize, fit_reconstruction
    >>> Z = np.random.default_rng(0).standard_normal((64, 10))
    >>> G = Z.T @ Z
    >>> fac = id_factorize(G)
    >>> k = fac.smallest_k(0.5)
    >>> B = fit_reconstruction(G, fac.selected(k))  # == fac.interpolation(k).T
    >>> bool(np.allclose(B, fac.interpolation(k).T))
    True
"""

from spectrim.linalg._validation import default_rtol
from spectrim.linalg.interpolative import IDFactorization, gram_sqrt, id_factorize, id_from_rows
from spectrim.linalg.prediction import optimism, prediction_error_curve
from spectrim.linalg.reconstruction import (
    cross_residual_of,
    fit_cross_reconstruction,
    fit_reconstruction,
    fit_rows_reconstruction,
    order_residual_curve,
    residual_of,
)
from spectrim.linalg.selection import (
    SpectralSelection,
    block_greedy,
    cross_greedy,
    spectral_greedy,
    spectral_loss,
)
from spectrim.linalg.sparsity import (
    power_mean,
    pq_index,
    soft_sparsity,
    spectral_norm,
    stable_rank,
    weight_matrix,
)
from spectrim.linalg.spectrum import (
    degrees_of_freedom,
    effective_rank,
    gram_spectrum,
    ridge_leverage_scores,
)

__all__ = [
    "IDFactorization",
    "SpectralSelection",
    "cross_greedy",
    "cross_residual_of",
    "default_rtol",
    "degrees_of_freedom",
    "effective_rank",
    "fit_cross_reconstruction",
    "fit_reconstruction",
    "fit_rows_reconstruction",
    "order_residual_curve",
    "gram_spectrum",
    "gram_sqrt",
    "id_factorize",
    "id_from_rows",
    "optimism",
    "power_mean",
    "pq_index",
    "prediction_error_curve",
    "residual_of",
    "ridge_leverage_scores",
    "soft_sparsity",
    "block_greedy",
    "spectral_greedy",
    "spectral_loss",
    "spectral_norm",
    "stable_rank",
    "weight_matrix",
]
