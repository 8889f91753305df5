"""Streaming second-moment statistics of layer activations.

:class:`GramAccumulator` sums ``XᵀX`` (and optionally a cross term ``XᵀY``), the row count
and the column sums over any number of batches, in O(dim²) memory and without keeping the
rows. Each chunk of at most ``chunk_rows`` rows is multiplied in float32 (``torch.mm``, or
one ``torch.bmm`` over all full chunks; fast BLAS / cuBLAS) and the chunk products are
added into a float64 accumulator, so rounding error is bounded per chunk and does not grow
with the total number of rows.
``exact=True`` multiplies in float64 instead (for tests and small problems).

:func:`rows_from_activation` flattens an activation tensor into the (rows, channels) matrix
whose Gram the :mod:`spectrim.linalg` kernels consume (papers §1.2: for a conv layer the rows
are (example, position) pairs).

Example::

    >>> import torch
    >>> acc = GramAccumulator(dim=3)
    >>> for _ in range(4):
    ...     _ = acc.update(rows_from_activation(torch.randn(2, 3, 5, 5), channel_dim=1))
    >>> acc.count, tuple(acc.gram.shape), acc.gram.dtype
    (200, (3, 3), torch.float64)
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch

__all__ = ["GramAccumulator", "NoTF32", "Products", "rows_from_activation"]

_EXACT_CHUNK_BYTES = 4 << 20  # float64 working set per product in exact mode
#: (half of float32's largest value)²: a bound on cross products that none can exceed
_SAFE_BOUND = (float(torch.finfo(torch.float32).max) / 2) ** 2
#: default bound on the float32 products held at once (per-example or per-chunk blocks)
SCRATCH_BYTES = 256 << 20


class Products(NamedTuple):
    """One batch's contribution to a :class:`GramAccumulator` (float64 tensors).

    Returned by :meth:`GramAccumulator.update` / :meth:`~GramAccumulator.update_activation`
    so that another accumulator fed the same rows can take them with
    :meth:`~GramAccumulator.add` instead of multiplying again.  ``sums`` / ``y_sums`` are
    ``None`` when the accumulator does not track column sums.
    """

    rows: int
    gram: torch.Tensor
    sums: torch.Tensor | None
    cross: torch.Tensor | None = None
    y_sums: torch.Tensor | None = None
    y_sq: torch.Tensor | None = None


def rows_from_activation(t: torch.Tensor, channel_dim: int) -> torch.Tensor:
    """Reshape an activation tensor into a (rows, channels) matrix.

    The channel axis is moved last and all other axes are flattened in their original
    (row-major) order: (N, C, H, W) with ``channel_dim=1`` → (N·H·W, C) with row index
    ``n·H·W + h·W + w``; (B, T, H) with ``channel_dim=-1`` → (B·T, H); (N, C) → (N, C).
    Returns a view when possible, a copy otherwise; dtype and device are unchanged.

    Args:
        t: activation tensor with at least one dimension.
        channel_dim: the channel (unit) axis; negative values count from the end.

    Example::

        >>> import torch
        >>> rows_from_activation(torch.zeros(2, 3, 4, 5), channel_dim=1).shape
        torch.Size([40, 3])
        >>> rows_from_activation(torch.zeros(2, 7, 16), channel_dim=-1).shape
        torch.Size([14, 16])
    """
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"t must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() == 0:
        raise ValueError("t must have at least one dimension, got a 0-d tensor")
    if isinstance(channel_dim, bool) or not isinstance(channel_dim, int):
        raise TypeError(f"channel_dim must be an int, got {type(channel_dim).__name__}")
    nd = t.dim()
    if not -nd <= channel_dim < nd:
        raise ValueError(
            f"channel_dim must be in [{-nd}, {nd}) for a {nd}-D tensor, got {channel_dim}"
        )
    cd = channel_dim % nd
    channels = t.shape[cd]
    moved = t.movedim(cd, -1)
    rows = 1
    for size in moved.shape[:-1]:
        rows *= int(size)
    return moved.reshape(rows, channels)


class GramAccumulator:
    """Accumulate ``XᵀX`` (and optionally ``XᵀY``) over batches of rows, in float64.

    Args:
        dim: number of columns of ``x`` (units / channels).
        cross_dim: number of columns of ``y`` for the cross term ``XᵀY``; ``None`` disables it.
        device: where the float64 accumulators live and where chunk products are computed
            (e.g. ``"cuda"``; rows elsewhere are moved chunk by chunk).  ``None`` (default):
            the device of the first rows added, so GPU activations are accumulated on the
            GPU and never copied to the host.
        chunk_rows: at most this many rows per ``torch.mm`` call (bounds float32 error
            growth and temporary memory).
        exact: multiply chunks in float64 instead of float32 (slower; for tests).
        sums: also track column sums (``sums``, ``mean``, ``y_sums``, ``y_mean``).  Off
            for the calibration passes, which need only the products: a column sum is one
            more pass over every activation.
        scratch_bytes: bound on the products computed at once.  Blocks of examples (or
            row chunks) are multiplied as many at a time as fit; a single product larger
            than the bound (a layer thousands of units wide: ``4·m²`` bytes) is computed
            in column tiles.  Peak memory per update is then the float64 state, one
            float64 product (``8·m²`` each) and the bound.

    Attributes (read-only properties): ``count`` (rows seen), ``gram`` (``ΣXᵀX``), ``cross``
    (``ΣXᵀY``), ``sums`` / ``y_sums`` (column sums), ``y_sq_sums`` (``diag YᵀY``),
    ``mean`` / ``y_mean``,
    ``second_moment`` (``gram / count``, Paper 1's uncentred ``Σ̂``).  ``y_sq_sums`` is
    always tracked with the cross term (it gives least-squares residuals).

    Accuracy: each float32 chunk product has relative error about ``1e-7``–``1e-6``; summing in
    float64 keeps the total at that level for any number of rows.  On CUDA the products are
    true float32 (TF32 is switched off around them whatever the global setting: TF32 would
    lose ~3 digits), summed in float64 on the device.

    Reductions across processes (:class:`spectrim.distributed.Team`) read and write the
    whole state as one float64 vector: :meth:`flat` / :meth:`set_flat`.

    Example::

        >>> import torch
        >>> x, y = torch.randn(1000, 4), torch.randn(1000, 2)
        >>> acc = GramAccumulator(4, cross_dim=2, chunk_rows=256)
        >>> _ = acc.update(x[:300], y[:300]); _ = acc.update(x[300:], y[300:])
        >>> bool(torch.allclose(acc.gram, x.double().T @ x.double(), rtol=1e-5, atol=1e-3))
        True
        >>> tuple(acc.cross.shape), acc.count
        ((4, 2), 1000)
    """

    def __init__(
        self,
        dim: int,
        cross_dim: int | None = None,
        device: str | torch.device | None = None,
        chunk_rows: int = 8192,
        exact: bool = False,
        sums: bool = True,
        scratch_bytes: int = SCRATCH_BYTES,
    ) -> None:
        if isinstance(dim, bool) or not isinstance(dim, int) or dim < 1:
            raise ValueError(f"dim must be a positive int, got {dim!r}")
        if cross_dim is not None and (
            isinstance(cross_dim, bool) or not isinstance(cross_dim, int) or cross_dim < 1
        ):
            raise ValueError(f"cross_dim must be a positive int or None, got {cross_dim!r}")
        if isinstance(chunk_rows, bool) or not isinstance(chunk_rows, int) or chunk_rows < 1:
            raise ValueError(f"chunk_rows must be a positive int, got {chunk_rows!r}")
        self.dim = dim
        self.cross_dim = cross_dim
        #: follow the first rows' device (``device=None``) until rows arrive
        self._follow = device is None
        self.device = torch.device("cpu" if device is None else device)
        self.chunk_rows = chunk_rows
        self.exact = bool(exact)
        self.track_sums = bool(sums)
        self.scratch_bytes = max(int(scratch_bytes), 1)
        self._buffers: dict[str, torch.Tensor] = {}
        self._count = 0
        self._allocate()

    def _allocate(self) -> None:
        """Zeroed float64 state on ``self.device``."""
        dim, cross_dim, f64 = self.dim, self.cross_dim, torch.float64
        self._gram = torch.zeros(dim, dim, dtype=f64, device=self.device)
        self._sums: torch.Tensor | None = None
        self._cross: torch.Tensor | None = None
        self._y_sums: torch.Tensor | None = None
        self._y_sq: torch.Tensor | None = None
        if self.track_sums:
            self._sums = torch.zeros(dim, dtype=f64, device=self.device)
        if cross_dim is not None:
            self._cross = torch.zeros(dim, cross_dim, dtype=f64, device=self.device)
            self._y_sq = torch.zeros(cross_dim, dtype=f64, device=self.device)
            if self.track_sums:
                self._y_sums = torch.zeros(cross_dim, dtype=f64, device=self.device)

    def _adopt(self, device: torch.device) -> None:
        """With ``device=None``: move the (still empty) state to the first rows' device."""
        if not self._follow:
            return
        self._follow = False
        if device != self.device and self._count == 0:
            self.device = device
            self._buffers.clear()
            self._allocate()

    def __repr__(self) -> str:
        return (
            f"GramAccumulator(dim={self.dim}, cross_dim={self.cross_dim}, "
            f"device='{self.device}', count={self._count}, exact={self.exact})"
        )

    # ------------------------------------------------------------------ updating

    @staticmethod
    def _check_rows(t: object, width: int, name: str) -> torch.Tensor:
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 2 or t.shape[1] != width:
            raise ValueError(
                f"{name} must have shape (n, {width}), got {tuple(t.shape)} "
                "(use rows_from_activation to flatten activation tensors)"
            )
        if not (t.is_floating_point()):
            raise ValueError(f"{name} must have a floating-point dtype, got {t.dtype}")
        return t.detach()

    @torch.no_grad()
    def update(self, x: torch.Tensor, y: torch.Tensor | None = None) -> Products:
        """Add the rows of ``x`` (n×dim; and ``y``, n×cross_dim) to the statistics.

        ``x`` may have any floating dtype and live on any device. Validation (shape, dtype,
        finiteness) happens before anything is accumulated, so a rejected batch leaves the
        accumulator unchanged. O(n·dim·(dim + cross_dim)).  Returns the batch's
        :class:`Products`.
        """
        x = self._check_rows(x, self.dim, "x")
        self._adopt(x.device)
        if self.cross_dim is None:
            if y is not None:
                raise ValueError(
                    "y was given but this accumulator has no cross term (cross_dim=None)"
                )
        else:
            if y is None:
                raise ValueError(f"y is required because cross_dim={self.cross_dim} was set")
            y = self._check_rows(y, self.cross_dim, "y")
            if y.shape[0] != x.shape[0]:
                raise ValueError(
                    f"x and y must have the same number of rows, got {x.shape[0]} and {y.shape[0]}"
                )
        n = int(x.shape[0])
        if n == 0:
            rest = (self._sums, self._cross, self._y_sums, self._y_sq)
            zero = [None if t is None else torch.zeros_like(t) for t in rest]
            return self.add(Products(0, torch.zeros_like(self._gram), *zero))
        # chunks of at most chunk_rows rows as (chunks, rows, dim) blocks: all full chunks
        # in one block when the rows are contiguous (one batched product instead of one per
        # chunk; exact mode converts one chunk at a time), the rest one block each.  The
        # products are per-example products of the transposed blocks (each chunk's product
        # in the compute dtype, their sum in float64).
        cr = self.chunk_rows
        batched = not self.exact and x.is_contiguous() and (y is None or y.is_contiguous())
        whole = (n // cr) * cr if batched else 0
        blocks: list[tuple[torch.Tensor, torch.Tensor | None]] = []
        if whole:
            yb = None if y is None else y[:whole].view(-1, cr, y.shape[1])
            blocks.append((x[:whole].view(-1, cr, self.dim), yb))
        for start in range(whole, n, cr):
            yc = None if y is None else y[start : start + cr].unsqueeze(0)
            blocks.append((x[start : start + cr].unsqueeze(0), yc))
        parts = [
            self._example_products(xb.transpose(1, 2), None if yb is None else yb.transpose(1, 2))
            for xb, yb in blocks
        ]
        return self.add(parts[0] if len(parts) == 1 else _sum_products(parts))

    @torch.no_grad()
    def update_activation(
        self, x: torch.Tensor, channel_dim: int, y: torch.Tensor | None = None
    ) -> Products:
        """Add an activation tensor without flattening it into rows first.

        Equivalent to ``update(rows_from_activation(x, channel_dim), ...)`` (and the
        same for ``y``, which must have ``x``'s layout except for its channel count), but
        without a transposed copy of the activation: a tensor whose channel axis is
        innermost in memory (``(B, T, H)``, or ``channels_last`` images) is a row matrix
        already; for channel-first tensors (``N, C, *spatial``) whose spatial size is at
        least the channel count the products are batched per example (``torch.bmm``).
        This is what keeps calibration close to the cost of a plain forward pass.  Each
        per-example product is a float32 sum over the spatial positions (float64 with
        ``exact=True``); the sum over examples is float64.  Returns the
        :class:`Products` added.

        Example::

            >>> import torch
            >>> x = torch.randn(4, 3, 5, 5)
            >>> a, b = GramAccumulator(3), GramAccumulator(3)
            >>> _ = a.update_activation(x, 1); _ = b.update(rows_from_activation(x, 1))
            >>> bool(torch.allclose(a.gram, b.gram)), a.count
            (True, 100)
        """
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
        self._adopt(x.device)
        cd = channel_dim % max(x.dim(), 1)
        spatial = 1
        for size in x.shape[2:]:
            spatial *= int(size)
        # channel axis innermost in memory (channels_last): already a row matrix, unless
        # y is not (then its rows would be a copy; the per-example products take both)
        innermost = all(
            t.dim() >= 2 and t.stride(cd) == 1 and t.shape[cd] > 1
            for t in ((x,) if y is None else (x, y))
        )
        if x.dim() < 3 or cd != 1 or innermost or spatial < x.shape[1] or x.shape[1] != self.dim:
            ry = None if y is None else rows_from_activation(y, cd)
            return self.update(rows_from_activation(x, cd), ry)
        if (y is None) != (self.cross_dim is None):
            raise ValueError(
                "y must be given exactly when this accumulator has a cross term "
                f"(cross_dim={self.cross_dim})"
            )
        if not x.is_floating_point():
            raise ValueError(f"x must have a floating-point dtype, got {x.dtype}")
        n = int(x.shape[0])
        if y is not None and (
            y.shape[0] != n or y.shape[2:] != x.shape[2:] or y.shape[1] != self.cross_dim
        ):
            raise ValueError(
                f"y must have shape ({n}, {self.cross_dim}, *{tuple(x.shape[2:])}), "
                f"got {tuple(y.shape)}"
            )
        xr = x.detach().reshape(n, self.dim, spatial)
        yr = None if y is None else y.detach().reshape(n, -1, spatial)
        step = n
        if self.exact:
            # float64 copies of a few examples at a time: one large temporary per call
            # costs more in fresh pages than the products themselves (ResNet stage 1: 3.5x)
            per_example = 8 * spatial * (self.dim + (self.cross_dim or 0))
            step = max(1, _EXACT_CHUNK_BYTES // per_example)
        parts = [
            self._example_products(xr[i : i + step], None if yr is None else yr[i : i + step])
            for i in range(0, n, step)
        ]
        return self.add(parts[0] if len(parts) == 1 else _sum_products(parts))

    def _example_products(self, xr: torch.Tensor, yr: torch.Tensor | None) -> Products:
        """Products of ``(n, dim, s)`` (and ``(n, cross_dim, s)``) per example, summed;
        as many examples at a time as ``scratch_bytes`` allows, in column tiles when one
        example's product alone exceeds it."""
        cdt = torch.float64 if self.exact else torch.float32
        n = xr.shape[0]
        cols = self.dim + (self.cross_dim or 0)
        per = self.dim * cols * (8 if self.exact else 4)
        if per > self.scratch_bytes:
            return self._tiled_products(xr, yr, cdt)
        step = max(1, self.scratch_bytes // per)
        if step < n:
            parts = [
                self._example_products(xr[i : i + step], None if yr is None else yr[i : i + step])
                for i in range(0, n, step)
            ]
            return _sum_products(parts)
        return self._block_products(xr, yr, cdt)

    def _tiled_products(
        self, xr: torch.Tensor, yr: torch.Tensor | None, cdt: torch.dtype
    ) -> Products:
        """One example at a time, ``Xᵀ[X Y]`` a block of columns at a time."""
        f64 = torch.float64
        n, dim, spatial = xr.shape
        tile = max(1, self.scratch_bytes // (dim * (8 if self.exact else 4)))
        gram = torch.zeros(dim, dim, dtype=f64, device=self.device)
        cross = None
        if yr is not None:
            cross = torch.zeros(dim, int(self.cross_dim or 0), dtype=f64, device=self.device)
        sums = y_sums = y_sq = None
        with NoTF32(self.device):
            for i in range(n):
                x = xr[i].to(device=self.device, dtype=cdt)  # (dim, s)
                for j in range(0, dim, tile):
                    gram[:, j : j + tile] += (x @ x[j : j + tile].T).to(f64)
                if self.track_sums:
                    s = x.sum(1, dtype=f64)
                    sums = s if sums is None else sums + s
                if yr is not None and cross is not None:
                    y = yr[i].to(device=self.device, dtype=cdt)
                    for j in range(0, y.shape[0], tile):
                        cross[:, j : j + tile] += (x @ y[j : j + tile].T).to(f64)
                    sq = torch.linalg.vector_norm(y, dim=1).to(f64).square()
                    y_sq = sq if y_sq is None else y_sq + sq
                    if self.track_sums:
                        ys = y.sum(1, dtype=f64)
                        y_sums = ys if y_sums is None else y_sums + ys
        return Products(n * spatial, gram, sums, cross, y_sums, y_sq)

    def _block_products(
        self, xr: torch.Tensor, yr: torch.Tensor | None, cdt: torch.dtype
    ) -> Products:
        """All of ``xr``'s examples in one batched product."""
        f64 = torch.float64
        n, _, spatial = xr.shape
        xr = xr.to(device=self.device, dtype=cdt)
        with NoTF32(self.device):
            out = self._scratch("g", n, cdt)
            gram = _f64_sum(torch.bmm(xr, xr.transpose(1, 2), out=out))
            sums = xr.sum(2).sum(0, dtype=f64) if self.track_sums else None
            cross = y_sums = y_sq = None
            if yr is not None:
                yr = yr.to(device=self.device, dtype=cdt)
                out = self._scratch("c", n, cdt)
                cross = _f64_sum(torch.bmm(xr, yr.transpose(1, 2), out=out))
                y_sums = yr.sum(2).sum(0, dtype=f64) if self.track_sums else None
                y_sq = torch.linalg.vector_norm(yr, dim=2).to(f64).square().sum(0)
        return Products(n * spatial, gram, sums, cross, y_sums, y_sq)

    def _scratch(self, which: str, n: int, dtype: torch.dtype) -> torch.Tensor:
        """A reused ``(n, dim, dim)`` (``"g"``) or ``(n, dim, cross_dim)`` (``"c"``)
        buffer for per-example products, reused from call to call (a calibration pass
        multiplies blocks of the same shape batch after batch)."""
        cols = self.dim if which == "g" else int(self.cross_dim or 0)
        buf = self._buffers.get(which)
        if buf is None or buf.dtype != dtype or buf.shape[0] < n:
            buf = torch.empty(n, self.dim, cols, dtype=dtype, device=self.device)
            self._buffers[which] = buf
        return buf[:n]

    def add(self, products: Products) -> Products:
        """Add one batch's :class:`Products` (from an accumulator of the same shape and
        options fed the same rows); returns them.

        Example::

            >>> import torch
            >>> a, b = GramAccumulator(2), GramAccumulator(2)
            >>> _ = b.add(a.update(torch.ones(3, 2)))
            >>> b.count, b.gram.tolist()
            (3, [[3.0, 3.0], [3.0, 3.0]])
        """
        n, gram, sums, cross, y_sums, y_sq = products
        self._adopt(gram.device)
        if gram.shape != self._gram.shape or (cross is None) != (self._cross is None):
            raise ValueError(
                f"products of shape {tuple(gram.shape)} (cross term: {cross is not None}) do "
                f"not fit this accumulator (dim={self.dim}, cross_dim={self.cross_dim})"
            )
        if (sums is None) != (self._sums is None):
            raise ValueError("products and accumulator disagree on tracking column sums")
        # Non-finite rows make the (small) products non-finite: check those, not the rows
        # (a non-finite entry of a column reaches that column's diagonal entry).
        if not bool(torch.isfinite(gram.diagonal()).all()):
            raise ValueError("x contains non-finite values (NaN or inf)")
        # |cross_ij| ≤ √(gram_ii · y_sq_j) (Cauchy–Schwarz): with that bound below half of
        # float32's largest value no cross entry can be infinite (and a NaN in y makes its
        # y_sq NaN, failing the test); the (large) cross products are read only otherwise
        if (
            cross is not None
            and not (y_sq is not None and bool(y_sq.max() * gram.diagonal().max() < _SAFE_BOUND))
            and not bool(torch.isfinite(cross).all())
        ):
            raise ValueError("y contains non-finite values (NaN or inf)")
        self._gram += gram
        if sums is not None and self._sums is not None:
            self._sums += sums
        if cross is not None and self._cross is not None:
            self._cross += cross
            if y_sums is not None and self._y_sums is not None:
                self._y_sums += y_sums
            if y_sq is not None and self._y_sq is not None:
                self._y_sq += y_sq
        self._count += n
        return products

    def merge(self, other: GramAccumulator) -> GramAccumulator:
        """Add another accumulator's statistics into this one (in place); returns ``self``.

        Both must have the same ``dim`` and ``cross_dim``. Useful for data-parallel or
        per-worker accumulation.

        Example::

            >>> import torch
            >>> a, b = GramAccumulator(2), GramAccumulator(2)
            >>> _ = a.update(torch.ones(3, 2)); _ = b.update(torch.ones(2, 2))
            >>> a.merge(b).count
            5
        """
        if not isinstance(other, GramAccumulator):
            raise TypeError(f"other must be a GramAccumulator, got {type(other).__name__}")
        self._adopt(other.device)
        if (
            other.dim != self.dim
            or other.cross_dim != self.cross_dim
            or other.track_sums != self.track_sums
        ):
            raise ValueError(
                f"other must have dim={self.dim}, cross_dim={self.cross_dim}, "
                f"sums={self.track_sums}; got dim={other.dim}, cross_dim={other.cross_dim}, "
                f"sums={other.track_sums}"
            )
        for mine, theirs in (
            (self._gram, other._gram),
            (self._sums, other._sums),
            (self._cross, other._cross),
            (self._y_sums, other._y_sums),
            (self._y_sq, other._y_sq),
        ):
            if mine is not None and theirs is not None:
                mine += theirs.to(self.device)
        self._count += other._count
        return self

    def _state(self) -> list[torch.Tensor]:
        return [
            t
            for t in (self._gram, self._sums, self._cross, self._y_sums, self._y_sq)
            if t is not None
        ]

    def flat(self) -> torch.Tensor:
        """The whole state as one float64 vector on ``device``: the row count, then the
        Gram and the other sums (what a cross-process reduction adds up).

        Example::

            >>> import torch
            >>> a, b = GramAccumulator(2), GramAccumulator(2)
            >>> _ = a.update(torch.ones(3, 2)); _ = b.update(torch.ones(2, 2))
            >>> b.set_flat(a.flat() + b.flat())
            >>> b.count, b.gram.tolist()
            (5, [[5.0, 5.0], [5.0, 5.0]])
        """
        count = torch.tensor([float(self._count)], dtype=torch.float64, device=self.device)
        return torch.cat([count] + [t.reshape(-1) for t in self._state()])

    def set_flat(self, flat: torch.Tensor) -> None:
        """Replace the state by a vector laid out as :meth:`flat` (e.g. its sum over
        processes)."""
        state = self._state()
        size = 1 + sum(t.numel() for t in state)
        if flat.dim() != 1 or flat.numel() != size:
            raise ValueError(
                f"a flat state of this accumulator has {size} entries, got {tuple(flat.shape)}"
            )
        self._follow = False
        flat = flat.to(device=self.device, dtype=torch.float64)
        self._count = round(float(flat[0]))
        start = 1
        for t in state:
            t.copy_(flat[start : start + t.numel()].view_as(t))
            start += t.numel()

    def reset(self) -> None:
        """Zero all statistics (keeps dims, device and options)."""
        self._count = 0
        for t in (self._gram, self._sums, self._cross, self._y_sums, self._y_sq):
            if t is not None:
                t.zero_()

    # ------------------------------------------------------------------ results

    @property
    def count(self) -> int:
        """Number of rows accumulated so far."""
        return self._count

    @property
    def gram(self) -> torch.Tensor:
        """``Σ xᵀx`` over all rows: a float64 (dim, dim) tensor (a symmetrised copy)."""
        return 0.5 * (self._gram + self._gram.T)

    @property
    def cross(self) -> torch.Tensor:
        """``Σ xᵀy`` over all rows: a float64 (dim, cross_dim) tensor (a copy)."""
        if self._cross is None:
            raise ValueError("this accumulator has no cross term (cross_dim=None)")
        return self._cross.clone()

    def _no_sums(self) -> ValueError:
        return ValueError("this accumulator does not track column sums (created with sums=False)")

    @property
    def sums(self) -> torch.Tensor:
        """Column sums of ``x`` (float64, length dim; a copy)."""
        if self._sums is None:
            raise self._no_sums()
        return self._sums.clone()

    @property
    def y_sums(self) -> torch.Tensor:
        """Column sums of ``y`` (float64, length cross_dim; a copy)."""
        if self._cross is None:
            raise ValueError("this accumulator has no cross term (cross_dim=None)")
        if self._y_sums is None:
            raise self._no_sums()
        return self._y_sums.clone()

    @property
    def y_sq_sums(self) -> torch.Tensor:
        """Column sums of ``y²`` (the diagonal of ``YᵀY``; float64, a copy): with
        ``cross`` and ``gram`` they give least-squares residuals ``‖Y − XB‖²``."""
        if self._y_sq is None:
            raise ValueError("this accumulator has no cross term (cross_dim=None)")
        return self._y_sq.clone()

    def _require_rows(self) -> None:
        if self._count == 0:
            raise ValueError("no rows have been accumulated yet (count == 0)")

    @property
    def mean(self) -> torch.Tensor:
        """Column means of ``x`` (float64). Raises ``ValueError`` if no rows were seen."""
        self._require_rows()
        return self.sums / self._count

    @property
    def y_mean(self) -> torch.Tensor:
        """Column means of ``y`` (float64). Raises ``ValueError`` if no rows were seen."""
        self._require_rows()
        return self.y_sums / self._count

    @property
    def second_moment(self) -> torch.Tensor:
        """Uncentred second moment ``gram / count`` (Paper 1's ``Σ̂``)."""
        self._require_rows()
        return self.gram / self._count

    def gram_numpy(self, normalize: bool = False) -> np.ndarray:
        """``gram`` as a float64 numpy array (divided by ``count`` if ``normalize``).

        Example::

            >>> import torch
            >>> acc = GramAccumulator(2, exact=True)
            >>> _ = acc.update(torch.tensor([[1.0, 2.0], [3.0, 4.0]]))
            >>> acc.gram_numpy().tolist()
            [[10.0, 14.0], [14.0, 20.0]]
        """
        g = self.second_moment if normalize else self.gram
        return g.cpu().numpy()

    def cross_numpy(self, normalize: bool = False) -> np.ndarray:
        """``cross`` as a float64 numpy array (divided by ``count`` if ``normalize``)."""
        c = self.cross
        if normalize:
            self._require_rows()
            c = c / self._count
        return c.cpu().numpy()

    def mean_numpy(self) -> np.ndarray:
        """``mean`` as a float64 numpy array."""
        return self.mean.cpu().numpy()


class NoTF32:
    """Products in true float32 on CUDA whatever ``allow_tf32`` says (restored after);
    nothing to do on other devices.

    >>> with NoTF32(torch.device("cpu")):
    ...     float(torch.ones(2) @ torch.ones(2))
    2.0
    """

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"

    def __enter__(self) -> None:
        if self.cuda:
            self.saved = torch.backends.cuda.matmul.allow_tf32
            torch.backends.cuda.matmul.allow_tf32 = False

    def __exit__(self, *exc: object) -> None:
        if self.cuda:
            torch.backends.cuda.matmul.allow_tf32 = self.saved


def _f64_sum(t: torch.Tensor) -> torch.Tensor:
    """The float64 sum of ``(n, a, b)`` per-chunk products over ``n``, a new tensor (a
    plain conversion for one chunk: the reduction kernel costs 2.5× as much for the same
    result)."""
    # a copy even when t is float64 already: t is a scratch buffer the next batch reuses
    return t[0].to(torch.float64, copy=True) if t.shape[0] == 1 else t.sum(0, dtype=torch.float64)


def _sum_products(parts: list[Products]) -> Products:
    def total(ts: list[torch.Tensor | None]) -> torch.Tensor | None:
        return None if ts[0] is None else torch.stack([t for t in ts if t is not None]).sum(0)

    gram = total([p.gram for p in parts])
    assert gram is not None
    return Products(
        sum(p.rows for p in parts),
        gram,
        total([p.sums for p in parts]),
        total([p.cross for p in parts]),
        total([p.y_sums for p in parts]),
        total([p.y_sq for p in parts]),
    )
