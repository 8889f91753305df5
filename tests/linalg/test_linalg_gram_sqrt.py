"""gram_sqrt and the Gram-matrix input validation shared by all linalg kernels."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from spectrim.linalg import (
    fit_reconstruction,
    gram_spectrum,
    gram_sqrt,
    id_factorize,
    residual_of,
)


@settings(max_examples=40, deadline=None)
@given(
    st.integers(1, 40),
    st.integers(1, 15),
    st.integers(0, 2**32 - 1),
    st.booleans(),
)
def test_square_root_reproduces_gram(n: int, m: int, seed: int, relu: bool) -> None:
    rng = np.random.default_rng(seed)
    Z = rng.standard_normal((n, m)) * 10.0 ** rng.uniform(-2, 2, size=m)
    if relu:
        Z = np.maximum(Z, 0)
    G = Z.T @ Z
    R0 = gram_sqrt(G)
    assert R0.shape == (m, m)
    assert R0.dtype == np.float64
    scale = np.sqrt(np.outer(np.diag(G), np.diag(G)))
    # accurate relative to each pair of units' scales (Jacobi scaling)
    assert np.all(np.abs(R0.T @ R0 - G) <= 1e-12 * m * scale + 1e-300)


def test_rank_deficient_trailing_rows_are_zero() -> None:
    rng = np.random.default_rng(0)
    Z = rng.standard_normal((6, 3)) @ rng.standard_normal((3, 10))
    R0 = gram_sqrt(Z.T @ Z)
    np.testing.assert_array_equal(R0[3:], 0.0)
    np.testing.assert_allclose(R0.T @ R0, Z.T @ Z, atol=1e-12 * np.abs(Z.T @ Z).max())


def test_dead_units_get_zero_columns() -> None:
    Z = np.random.default_rng(1).standard_normal((20, 5))
    Z[:, 2] = 0.0
    R0 = gram_sqrt(Z.T @ Z)
    np.testing.assert_array_equal(R0[:, 2], 0.0)


def test_small_negative_eigenvalues_are_clamped() -> None:
    # PSD up to rounding: a rank-1 Gram with a tiny negative perturbation off the diagonal
    v = np.array([1.0, 2.0, 3.0])
    G = np.outer(v, v)
    G[0, 1] = G[1, 0] = 2.0 + 1e-13
    R0 = gram_sqrt(G)
    assert np.all(np.isfinite(R0))
    np.testing.assert_allclose(R0.T @ R0, G, atol=1e-11)


def test_accepts_torch_and_lists() -> None:
    G = np.array([[2.0, 1.0], [1.0, 2.0]])
    np.testing.assert_allclose(gram_sqrt(torch.tensor(G)), gram_sqrt(G))
    np.testing.assert_allclose(gram_sqrt(G.tolist()), gram_sqrt(G))
    np.testing.assert_allclose(gram_sqrt(G.astype(np.float32)), gram_sqrt(G))


def test_symmetrises_within_tolerance() -> None:
    G = np.array([[2.0, 1.0 + 1e-9], [1.0, 2.0]])
    R0 = gram_sqrt(G)
    np.testing.assert_allclose(R0.T @ R0, [[2.0, 1.0 + 5e-10], [1.0 + 5e-10, 2.0]], atol=1e-14)


@pytest.mark.parametrize(
    "func",
    [
        gram_sqrt,
        id_factorize,
        gram_spectrum,
        lambda G: fit_reconstruction(G, [0]),
        lambda G: residual_of(G, [0], np.zeros((2, 1))),
    ],
)
def test_invalid_gram_inputs(func: Callable[[Any], object]) -> None:
    f = func
    with pytest.raises(ValueError, match="G must be a 2-D matrix"):
        f(np.ones(3))
    with pytest.raises(ValueError, match="G must be square"):
        f(np.ones((2, 3)))
    with pytest.raises(ValueError, match="G must be symmetric"):
        f(np.array([[1.0, 0.5], [0.0, 1.0]]))
    with pytest.raises(ValueError, match="G contains non-finite"):
        f(np.array([[1.0, np.nan], [np.nan, 1.0]]))
    with pytest.raises(ValueError, match="G contains non-finite"):
        f(np.array([[np.inf, 0.0], [0.0, 1.0]]))
    with pytest.raises(ValueError, match="G must be positive semidefinite"):
        f(np.array([[-1.0, 0.0], [0.0, 1.0]]))
    with pytest.raises(TypeError, match="G must be real"):
        f(np.eye(2) * 1j)
    with pytest.raises(TypeError, match="G must be a numeric array"):
        f(np.array([["a", "b"], ["c", "d"]]))


def test_rtol_validation() -> None:
    with pytest.raises(ValueError, match="rtol"):
        gram_sqrt(np.eye(2), rtol=-1.0)
