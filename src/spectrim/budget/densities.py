"""Per-matrix densities for one sparsity budget, from each matrix's error curve.

Each weight matrix ``l`` has ``size_l`` weights and an error curve ``e_l(d)`` measured at a
grid of densities (``1 = d_0 > d_1 > …``): the relative output error its method leaves at
that density.  :func:`allocate_densities` keeps ``density·Σ size_l`` weights in all and
minimises ``Σ_l e_l(d_l)`` greedily: starting from every matrix dense, it takes the next
grid step of the matrix whose step costs the least error per weight removed, until the
budget is met; the last step stops part-way (linear in between grid points), so the
budget is met exactly.  The steps' costs are made non-decreasing per matrix first (the
lower convex hull of each curve), so the greedy is optimal for the convexified curves.

Example::

    >>> import numpy as np
    >>> grid = np.array([1.0, 0.5, 0.0])
    >>> curves = {"a": (grid, np.array([0.0, 0.01, 1.0])), "b": (grid, np.array([0.0, 0.5, 1.0]))}
    >>> d = allocate_densities(curves, {"a": 100, "b": 100}, density=0.75)
    >>> round(d["a"], 3), round(d["b"], 3)
    (0.5, 1.0)
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping

import numpy as np

__all__ = ["allocate_densities", "convex_steps"]


def convex_steps(densities: np.ndarray, errors: np.ndarray) -> list[tuple[float, float, float]]:
    """The lower convex hull of ``(1 − d, e)`` as steps ``(d_from, d_to, slope)`` with
    non-decreasing slopes (error per unit of density removed)."""
    d = np.asarray(densities, dtype=np.float64)
    e = np.maximum.accumulate(np.asarray(errors, dtype=np.float64))  # more removed, no less error
    if d.ndim != 1 or d.shape != e.shape or d.size < 2 or np.any(np.diff(d) >= 0):
        raise ValueError("densities must be a strictly decreasing grid with one error each")
    x = 1.0 - d
    hull = [0]
    for i in range(1, len(x)):
        while len(hull) >= 2:
            a, b = hull[-2], hull[-1]
            # drop b if it lies on or above the chord a→i
            if (e[b] - e[a]) * (x[i] - x[a]) >= (e[i] - e[a]) * (x[b] - x[a]):
                hull.pop()
            else:
                break
        hull.append(i)
    return [
        (float(d[a]), float(d[b]), float((e[b] - e[a]) / (x[b] - x[a])))
        for a, b in itertools.pairwise(hull)
    ]


def allocate_densities(
    curves: Mapping[str, tuple[np.ndarray, np.ndarray]],
    sizes: Mapping[str, int],
    density: float,
) -> dict[str, float]:
    """Densities per matrix keeping ``density`` of all the weights (see module doc)."""
    if not 0.0 < density <= 1.0:
        raise ValueError(f"density={density!r} must be in (0, 1]")
    total = float(sum(sizes[n] for n in curves))
    remove = (1.0 - density) * total
    steps = []
    for n, (d, e) in curves.items():
        for order, (d0, d1, slope) in enumerate(convex_steps(d, e)):
            # error per weight removed: a density step of a larger matrix removes more
            steps.append((slope / max(sizes[n], 1), order, n, d0, d1))
    steps.sort()
    out = {n: 1.0 for n in curves}
    for _slope, _order, n, d0, d1 in steps:
        if remove <= 1e-9:
            break
        weights = (d0 - d1) * sizes[n]
        if weights <= remove:
            out[n] = d1
            remove -= weights
        else:
            out[n] = d0 - remove / sizes[n]
            remove = 0.0
    return out
