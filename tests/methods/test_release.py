"""``GroupSolver.release``: once the plans are made, the selection's m × m state goes and
the sequential refit still works; the pipeline's models do not change."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import spectrim
from spectrim.graph.channels import UnitGroup
from spectrim.methods.base import GroupSolver
from spectrim.methods.interpolative import IDSolver
from spectrim.methods.spectral import SpectralSolver


def _gram(seed: int, m: int = 12, n: int = 200) -> np.ndarray:
    Z = np.random.default_rng(seed).standard_normal((n, m)) @ np.diag(np.linspace(2, 0.1, m))
    return Z.T @ Z


@pytest.mark.parametrize("kind", ["id", "spectral"])
def test_release_keeps_the_refit_and_drops_the_grams(kind: str) -> None:
    group = UnitGroup(0, "g", np.arange(12), ["a"], [], [])
    G = _gram(0)
    if kind == "id":
        solver: IDSolver | SpectralSolver = IDSolver(group, {"c": G}, ridge=1e-3)
    else:
        solver = SpectralSolver(group, {"c": G}, {"c": 200}, {"c": np.eye(12)}, theta=1.0)
    keep = np.sort(solver.plan(5).keep)
    cross = G[np.ix_(keep, np.arange(12))]
    before = solver.refit(keep, "c", G[np.ix_(keep, keep)], cross, 200)
    curve = solver.error_curve().copy()
    solver.release()
    for name in type(solver).selection_state:
        assert not hasattr(solver, name)
    np.testing.assert_array_equal(
        solver.refit(keep, "c", G[np.ix_(keep, keep)], cross, 200), before
    )
    np.testing.assert_array_equal(solver.error_curve(), curve)
    with pytest.raises(AttributeError):
        solver.plan(5)  # the selection is over: a clear failure, never a stale answer


@pytest.mark.parametrize("method", ["id", "spectral"])
def test_releasing_changes_nothing_in_the_model(
    method: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The sequential run releases every refitted group's solver; the model and the
    report's errors are what they are when nothing is released."""
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 4)
    )
    x = torch.randn(512, 16) @ torch.diag(torch.linspace(2, 0.05, 16))
    released: list[str] = []
    real = GroupSolver.release
    monkeypatch.setattr(
        GroupSolver, "release", lambda self: (released.append(self.group.name), real(self))[1]
    )
    small, report = spectrim.compress(net, x, method, "width=0.75")
    assert len(released) == 2
    monkeypatch.setattr(GroupSolver, "release", lambda self: None)
    kept, report2 = spectrim.compress(net, x, method, "width=0.75")
    a, b = small.state_dict(), kept.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert [g.consumer_errors for g in report.groups] == [g.consumer_errors for g in report2.groups]
