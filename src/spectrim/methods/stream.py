"""The residual stream's new basis: one solver per model (``target="hidden=F"``).

The stream of width ``d`` keeps ``k`` coordinates in a basis ``E`` (``d × k``, orthonormal
columns).  Every writer writes ``Eᵀ·`` its old output, and every reader sees ``u = Eᵀx``.
Two kinds of basis:

* a **selection** (``E`` = columns of the identity): ``k`` of the stream's coordinates are
  kept.  Works for pre-LN and post-LN models (a post-LN norm is sliced to the kept
  coordinates).  ``id`` orders the coordinates by the column-pivoted QR of the stream's
  Gram (the interpolative decomposition of the normalised stream); ``l1`` / ``l2`` by the
  norms of all the weights that touch a coordinate (Torch-Pruning's grouped magnitude);
  ``random`` at random;
* a **rotation** (``E`` = the top ``k`` eigenvectors of the stream's Gram, its PCA):
  SliceGPT's route, for pre-LN models only (an RMSNorm commutes with rotations; a
  post-LN LayerNorm's affine does not).  ``spectral`` uses it on pre-LN models and the
  spectral greedy selection on post-LN ones.

With ``correct``, each reader is refitted by least squares to see what it saw before
(:mod:`spectrim._hidden`); ``l1``, ``l2`` and ``random`` only restrict.

Example::

    >>> import numpy as np
    >>> G = np.diag([4.0, 1.0, 9.0])
    >>> s = StreamSolver(G, order=np.array([2, 0, 1]))
    >>> s.plan(2).basis.T.tolist()  # most valuable first
    [[0.0, 0.0, 1.0], [1.0, 0.0, 0.0]]
    >>> round(float(s.error_curve()[2]), 4)  # the share of the energy left out
    0.0714
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from spectrim.graph.stream import ResidualStream, reads_matrix, writes_matrix
from spectrim.linalg import order_residual_curve

__all__ = ["StreamPlan", "StreamSolver", "stream_weight_scores"]


@dataclass(frozen=True)
class StreamPlan:
    """The basis ``E`` (``d × k``, float64) and whether the readers are refitted."""

    basis: np.ndarray
    correct: bool
    ridge: float

    @property
    def keep(self) -> np.ndarray | None:
        """The kept coordinates when ``basis`` is a selection, else ``None``."""
        E = self.basis
        if np.all((E == 0) | (E == 1)) and np.all(E.sum(0) == 1) and np.all(E.sum(1) <= 1):
            return np.asarray(np.argmax(E, axis=0), dtype=np.int64)
        return None


class StreamSolver:
    """A selection order or a rotation of the stream, and its error curve.

    Args:
        gram: the stream's ``d × d`` Gram (``None`` for a method without statistics).
        order: coordinates, most valuable first (a selection), or
        rotation: ``d × d`` orthonormal columns, most valuable first (a rotation).
        correct: refit the readers by least squares.
        ridge: the refit's Tikhonov penalty relative to the mean diagonal of its Gram.
    """

    def __init__(
        self,
        gram: np.ndarray | None,
        *,
        order: np.ndarray | None = None,
        rotation: np.ndarray | None = None,
        correct: bool = True,
        ridge: float = 1e-6,
    ) -> None:
        if (order is None) == (rotation is None):
            raise ValueError("a stream solver takes an order or a rotation")
        self.gram, self.correct, self.ridge = gram, correct, float(ridge)
        self.order = None if order is None else np.asarray(order, dtype=np.int64)
        self.rotation = rotation
        d = len(self.order) if self.order is not None else rotation.shape[0]  # type: ignore[union-attr]
        if self.order is not None and sorted(self.order.tolist()) != list(range(d)):
            raise ValueError(f"order must list each of the {d} coordinates once")
        self.width = d

    def plan(self, k: int) -> StreamPlan:
        """The basis keeping ``k`` coordinates, most valuable first."""
        if not 1 <= k <= self.width:
            raise ValueError(f"hidden width {k} must be in [1, {self.width}]")
        if self.rotation is not None:
            E = np.ascontiguousarray(self.rotation[:, :k])
        else:
            assert self.order is not None
            keep = self.order[:k]
            E = np.zeros((self.width, k))
            E[keep, np.arange(k)] = 1.0
        return StreamPlan(E, self.correct, self.ridge)

    def error_curve(self) -> np.ndarray:
        """``e[k]``: the relative squared error of the stream reconstructed from ``k``
        coordinates (least squares with ``correct``, plain restriction without)."""
        d = self.width
        G = self.gram
        if G is None or np.trace(G) <= 0:
            return (1.0 - np.arange(d + 1) / d) ** 2
        t = float(np.trace(G))
        if self.rotation is not None:
            kept = np.einsum("ij,ij->j", self.rotation, G @ self.rotation)
            c = 1.0 - np.concatenate([[0.0], np.cumsum(kept)]) / t
        elif self.correct:
            assert self.order is not None
            c = order_residual_curve(G, self.order)
        else:
            assert self.order is not None
            c = 1.0 - np.concatenate([[0.0], np.cumsum(np.diag(G)[self.order])]) / t
        return np.clip(c, 0.0, 1.0)


def pca_rotation(gram: np.ndarray) -> np.ndarray:
    """Eigenvectors of ``gram``, largest eigenvalue first (signs fixed: the largest entry
    of each column positive, so the result does not depend on LAPACK's choice)."""
    w, V = np.linalg.eigh(np.asarray(gram, dtype=np.float64))
    V = V[:, np.argsort(-w, kind="stable")]
    signs = np.sign(V[np.argmax(np.abs(V), axis=0), np.arange(V.shape[1])])
    return np.asarray(V * np.where(signs == 0, 1.0, signs), dtype=np.float64)


def stream_weight_scores(stream: ResidualStream, model: nn.Module, p: float) -> np.ndarray:
    """Per stream coordinate: ``Σ |w|^p`` over every weight that touches it (the writers'
    and embeddings' output rows, the readers' input columns and the norms' scales), as
    Torch-Pruning sums a coupled group's magnitudes."""
    total = torch.zeros(stream.width, dtype=torch.float64)
    for name in stream.embeddings + stream.writers:
        W = writes_matrix(model.get_submodule(name), name)
        total += W.double().abs().pow(p).sum(1).cpu()
    for site in stream.sites:
        for name in site.readers:
            W = reads_matrix(model.get_submodule(name), name)
            total += W.double().abs().pow(p).sum(0).cpu()
        w = getattr(model.get_submodule(site.norm), "weight", None)
        if isinstance(w, torch.Tensor) and w.shape == (stream.width,):
            total += w.detach().double().abs().pow(p).cpu()
    return total.numpy()
