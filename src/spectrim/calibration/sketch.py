"""Randomized row sketches of a layer's activations, for layers too wide for their Gram.

The float64 Gram of a group of ``m`` units costs ``8·m²`` bytes per consumer (2 GiB at
``m = 16384``).  A Gaussian sketch keeps ``k < m`` mixtures of the activation rows instead,

    Y = Ω Z    (k×m; Ω is k×n with independent N(0, 1/k) entries),

``8·k·m`` bytes, with ``E[YᵀY] = ZᵀZ``.  A column-pivoted QR of ``Y`` picks the units and
gives the interpolation: the randomized interpolative decomposition (Liberty, Woolfe,
Martinsson, Rokhlin & Tygert, PNAS 2007; Halko, Martinsson & Tropp 2011 §5.2), which is
exact when ``Z`` has rank below ``k`` and otherwise errs like a least-squares fit on ``k``
Gaussian rows (:class:`~spectrim.methods.interpolative.SketchIDSolver` corrects its curve
for that).  The sketch streams: ``Y = Σ_b Ω_b Z_b`` over batches, each ``Ω_b`` drawn from
a generator seeded by ``(seed, batch, call)``, so it depends on which calibration batch the
rows came from, not on how the batches were spread over processes.

:func:`plan_sketches` decides which groups get a sketch, from a memory budget for the
statistics (``CompressConfig.stats_memory``).

Example::

    >>> import torch
    >>> z = torch.randn(500, 3) @ torch.randn(3, 40)     # 40 units of rank 3
    >>> sk = RowSketch(40, rows=16, seed=0)
    >>> sk.begin(0); _ = sk.update(z)
    >>> from spectrim.linalg import id_from_rows
    >>> fac = id_from_rows(sk.sketch_numpy())        # the randomized ID
    >>> S, T = fac.selected(3), fac.interpolation(3)
    >>> zn = z.double().numpy()
    >>> bool(((zn[:, S] @ T - zn) ** 2).sum() < 1e-8 * (zn**2).sum())
    True
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator, Mapping
from typing import NamedTuple

import numpy as np
import torch

from spectrim.calibration.gram import NoTF32, rows_from_activation

__all__ = [
    "MIN_SKETCH_ROWS",
    "OMEGA_COLUMNS",
    "SKETCH_FROM",
    "SKETCH_SHARE",
    "RowSketch",
    "SketchProducts",
    "default_stats_memory",
    "plan_sketches",
    "sketch_groups_message",
]

#: groups narrower than this keep their exact Grams whatever the budget
SKETCH_FROM = 512
#: a sketch keeps this share of its group's width as rows, unless the budget asks for fewer
SKETCH_SHARE = 0.5
#: ``Ω`` is drawn (and multiplied) this many activation rows at a time
OMEGA_COLUMNS = 1024
#: fewer sketch rows than this (or than an eighth of the width) and the budget is refused
MIN_SKETCH_ROWS = 64


class SketchProducts(NamedTuple):
    """One batch's contribution to a :class:`RowSketch`: its row count ``n``, ``Ω_b Z_b``
    (float64, k×m) and the squared column norms ``Σ z²`` (float64, m)."""

    n: int
    sketch: torch.Tensor
    energies: torch.Tensor


class RowSketch:
    """``Y = Σ_b Ω_b Z_b`` over batches of rows (k×m, float64), plus each unit's exact
    energy ``Σ z²`` and the row count.

    Args:
        dim: number of units ``m`` (columns of the rows).
        rows: sketch rows ``k``.
        seed: seeds every ``Ω``, with the batch and call numbers (:meth:`begin`).
        device: where the state lives; ``None``: the first rows' device.

    ``Ω`` is drawn :data:`OMEGA_COLUMNS` rows at a time, on the rows' device (so a sketch made on a GPU differs from the CPU's,
    with the same distribution); the products are float32 (TF32 off) summed in float64.
    """

    def __init__(
        self,
        dim: int,
        rows: int,
        seed: int = 0,
        device: str | torch.device | None = None,
    ) -> None:
        for name, v in (("dim", dim), ("rows", rows)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        self.dim, self.rows, self.seed = dim, rows, int(seed)
        self._follow = device is None
        self.device = torch.device("cpu" if device is None else device)
        self._batch, self._call, self._count = 0, 0, 0
        self._allocate()

    def _allocate(self) -> None:
        self._y = torch.zeros(self.rows, self.dim, dtype=torch.float64, device=self.device)
        self._sq = torch.zeros(self.dim, dtype=torch.float64, device=self.device)

    def _adopt(self, device: torch.device) -> None:
        if self._follow:
            self._follow = False
            if device != self.device and self._count == 0:
                self.device = device
                self._allocate()

    def __repr__(self) -> str:
        return f"RowSketch(dim={self.dim}, rows={self.rows}, count={self._count})"

    def begin(self, batch: int) -> None:
        """Start calibration batch number ``batch`` (its index in the whole set): the
        following updates draw ``Ω`` for ``(seed, batch, 0)``, ``(seed, batch, 1)``, ..."""
        self._batch, self._call = int(batch), 0

    def omega(
        self, n: int, batch: int, call: int, device: torch.device | str = "cpu"
    ) -> torch.Tensor:
        """The ``k×n`` float32 ``Ω`` of update ``call`` of batch ``batch`` (what
        :meth:`update` multiplies by; for tests and brute-force checks)."""
        return torch.cat(list(self._omega_blocks(n, batch, call, torch.device(device))), dim=1)

    def _omega_blocks(
        self, n: int, batch: int, call: int, device: torch.device
    ) -> Iterator[torch.Tensor]:
        """``Ω`` in blocks of :data:`OMEGA_COLUMNS` columns, each from its own generator
        seeded by ``(seed, batch, call, block)``: the same ``Ω`` however it is consumed."""
        g = torch.Generator(device=device)
        scale = 1.0 / math.sqrt(self.rows)
        for block, start in enumerate(range(0, n, OMEGA_COLUMNS)):
            words = np.random.SeedSequence([self.seed, batch, call, block]).generate_state(2)
            g.manual_seed(int(words[0]) << 31 | int(words[1]) >> 1)
            c = min(OMEGA_COLUMNS, n - start)
            yield torch.randn(self.rows, c, generator=g, device=device) * scale

    @torch.no_grad()
    def update(self, x: torch.Tensor) -> SketchProducts:
        """Add the rows of ``x`` (n×m, any floating dtype and device); returns what was
        added."""
        if not isinstance(x, torch.Tensor) or x.dim() != 2 or x.shape[1] != self.dim:
            shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"x must be a tensor of shape (n, {self.dim}), got {shape}")
        if not x.is_floating_point():
            raise ValueError(f"x must have a floating-point dtype, got {x.dtype}")
        self._adopt(x.device)
        x = x.detach()
        n = int(x.shape[0])
        y = torch.zeros(self.rows, self.dim, dtype=torch.float64, device=self.device)
        start = 0
        with NoTF32(self.device):
            for om in self._omega_blocks(n, self._batch, self._call, self.device):
                c = om.shape[1]
                xs = x[start : start + c].to(device=self.device, dtype=torch.float32)
                y += (om @ xs).to(torch.float64)
                start += c
            sq = torch.linalg.vector_norm(x.to(self.device, torch.float32), dim=0)
        self._call += 1
        return self.add(SketchProducts(n, y, sq.to(torch.float64).square()))

    def update_activation(self, x: torch.Tensor, channel_dim: int) -> SketchProducts:
        """:meth:`update` with the rows of an activation tensor
        (:func:`~spectrim.calibration.gram.rows_from_activation`)."""
        return self.update(rows_from_activation(x, channel_dim))

    def add(self, products: SketchProducts) -> SketchProducts:
        """Add one batch's :class:`SketchProducts` (e.g. of an identical input read by
        another consumer); returns them."""
        n, y, sq = products
        if tuple(y.shape) != (self.rows, self.dim):
            raise ValueError(f"a sketch of shape {tuple(y.shape)} does not fit {self!r}")
        if not bool(torch.isfinite(sq).all()):
            raise ValueError("x contains non-finite values (NaN or inf)")
        self._adopt(y.device)
        self._y += y.to(self.device)
        self._sq += sq.to(self.device)
        self._count += int(n)
        return products

    def flat(self) -> torch.Tensor:
        """The state as one float64 vector (count, sketch, energies), for reductions."""
        count = torch.tensor([float(self._count)], dtype=torch.float64, device=self.device)
        return torch.cat([count, self._y.reshape(-1), self._sq])

    def set_flat(self, flat: torch.Tensor) -> None:
        """Replace the state by a vector laid out as :meth:`flat` (e.g. summed over ranks)."""
        size = 1 + self._y.numel() + self._sq.numel()
        if flat.dim() != 1 or flat.numel() != size:
            raise ValueError(
                f"a flat state of {self!r} has {size} entries, got {tuple(flat.shape)}"
            )
        self._follow = False
        flat = flat.to(device=self.device, dtype=torch.float64)
        self._count = round(float(flat[0]))
        self._y.copy_(flat[1 : 1 + self._y.numel()].view_as(self._y))
        self._sq.copy_(flat[1 + self._y.numel() :])

    @property
    def count(self) -> int:
        """Rows added so far."""
        return self._count

    @property
    def nbytes(self) -> int:
        """Bytes of the float64 state."""
        return 8 * (self.rows * self.dim + self.dim)

    def sketch_numpy(self) -> np.ndarray:
        """``Y`` as a float64 NumPy array (k×m)."""
        return self._y.detach().cpu().numpy().copy()

    def energies_numpy(self) -> np.ndarray:
        """The exact ``Σ z²`` of every unit (the diagonal of ``ZᵀZ``)."""
        return self._sq.detach().cpu().numpy().copy()


def default_stats_memory(device: torch.device | str | None = None) -> int:
    """The statistics' memory budget when none is given: a quarter of the device's
    memory (the host's RAM for the CPU).

    Example::

        >>> default_stats_memory("cpu") > 0
        True
    """
    dev = torch.device("cpu" if device is None else device)
    if dev.type == "cuda" and torch.cuda.is_available():
        total = torch.cuda.get_device_properties(dev).total_memory
    else:
        try:
            total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        except (ValueError, OSError, AttributeError):  # pragma: no cover - non-POSIX
            total = 16 << 30
    return int(total) // 4


def plan_sketches(
    widths: Mapping[int, int],
    consumers: Mapping[int, int],
    budget: int,
    *,
    names: Mapping[int, str] | None = None,
) -> dict[int, int]:
    """Sketch rows per group so that the statistics fit in ``budget`` bytes.

    Exact statistics cost ``8·m²`` bytes per consumer, a sketch ``8·k·m``.  When the exact
    Grams of all groups fit, nothing is sketched.  Otherwise groups of at least
    :data:`SKETCH_FROM` units are sketched at ``k = m/2`` (:data:`SKETCH_SHARE`), widest
    first, until the total fits; if even that is too much, all of those sketches shrink
    by one common factor.

    Args:
        widths: group index → width ``m``.
        consumers: group index → number of consumers (Grams) it has.
        budget: bytes for all the statistics.
        names: group names for the error message.

    Returns:
        group index → sketch rows ``k``, for the groups to sketch.

    Raises:
        ValueError: the budget is too small even with every sketchable group sketched to
            :data:`MIN_SKETCH_ROWS` rows (or an eighth of its width), naming the widest group.

    Example::

        >>> plan_sketches({0: 4096, 1: 64}, {0: 1, 1: 1}, budget=1 << 30)
        {}
        >>> plan_sketches({0: 4096, 1: 64}, {0: 1, 1: 1}, budget=100 << 20)
        {0: 2048}
    """
    exact = {g: 8 * m * m * consumers.get(g, 1) for g, m in widths.items()}
    total = sum(exact.values())
    if total <= budget:
        return {}
    wide = sorted((g for g, m in widths.items() if m >= SKETCH_FROM), key=lambda g: -widths[g])
    out: dict[int, int] = {}
    for g in wide:
        if total <= budget:
            return out
        k = max(1, int(widths[g] * SKETCH_SHARE))
        out[g] = k
        total -= exact[g] - 8 * k * widths[g] * consumers.get(g, 1)
    if total <= budget:
        return out
    fixed = sum(v for g, v in exact.items() if g not in out)
    per_row = {g: 8 * widths[g] * consumers.get(g, 1) for g in out}  # bytes per sketch row
    room = budget - fixed
    # common share r of each width: Σ r·m·per_row ≤ room
    scale = sum(widths[g] * per_row[g] for g in out)
    r = room / scale if scale and room > 0 else 0.0
    for g in out:
        out[g] = int(r * widths[g])
    short = [g for g in out if out[g] < max(MIN_SKETCH_ROWS, widths[g] // 8)]
    if short or not out:
        g = max(short or widths, key=lambda i: widths[i])
        name = (names or {}).get(g, f"group {g}")
        need = fixed + sum(max(MIN_SKETCH_ROWS, widths[i] // 8) * per_row[i] for i in out)
        raise ValueError(
            f"stats_memory={_human(budget)} is too small: unit group '{name}' "
            f"({widths[g]} units) alone needs {_human(exact[g])} of exact statistics, and "
            f"sketching every group of {SKETCH_FROM} units or more still needs about "
            f"{_human(need)}; raise stats_memory"
        )
    return out


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"  # pragma: no cover


def sketch_groups_message(
    plan: Mapping[int, int], widths: Mapping[int, int], names: Mapping[int, str]
) -> str:
    """One line for the report: which groups were sketched, and how."""
    parts = [f"'{names[g]}' ({widths[g]} units, {k} rows)" for g, k in plan.items()]
    return (
        "stats_memory: the exact statistics would not fit, so these groups were selected from "
        "a randomized sketch of their activations: " + ", ".join(parts)
    )
