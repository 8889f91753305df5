"""``GroupSolver.kept``: the kept channels without the plan's folds, for the sequential
pass that refits them; the same sets as ``plan``, and the same compressed model."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import spectrim
from spectrim.graph.channels import UnitGroup
from spectrim.methods.base import GroupSolver, OrderSolver
from spectrim.methods.interpolative import IDSolver, SketchIDSolver
from spectrim.methods.spectral import SpectralSolver


def _solvers() -> list[GroupSolver]:
    rng = np.random.default_rng(0)
    Z = np.maximum(rng.standard_normal((300, 16)) @ rng.standard_normal((16, 16)), 0.0)
    G = Z.T @ Z
    group = UnitGroup(0, "g", np.arange(16), ["a"], [], [])
    W = rng.standard_normal((4, 16))
    return [
        IDSolver(group, {"c": G}),
        SketchIDSolver(group, {"c": rng.standard_normal((8, 300)) @ Z}),
        SpectralSolver(group, {"c": G}, {"c": 300}, {"c": W.T @ W}, theta=0.5),
    ]


@pytest.mark.parametrize("index", [0, 1, 2])
@pytest.mark.parametrize("k", [1, 5, 15])
def test_kept_is_the_plans_kept_set(index: int, k: int) -> None:
    solver = _solvers()[index]
    kept = solver.kept(k)
    assert kept is not None
    np.testing.assert_array_equal(kept, np.sort(solver.plan(k).keep))


def test_a_solver_without_corrections_has_no_shortcut() -> None:
    group = UnitGroup(0, "g", np.arange(4), ["a"], [], [])
    assert OrderSolver(group, np.arange(4)).kept(2) is None


@pytest.mark.parametrize("method", ["id", "spectral"])
def test_sequential_runs_never_compute_the_plans_folds(
    method: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A sequential run makes its plans from ``kept`` (plan() would fit folds the pass
    replaces); a one-shot run still needs plan()'s folds."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(
        torch.nn.Linear(8, 32), torch.nn.ReLU(), torch.nn.Linear(32, 32), torch.nn.ReLU(),
        torch.nn.Linear(32, 4),
    ).eval()  # fmt: skip
    x = torch.randn(256, 8)
    ref, r0 = spectrim.compress(net, x, method, "macs=0.5")
    calls: list[int] = []
    for cls in (IDSolver, SpectralSolver):
        real = cls.plan
        monkeypatch.setattr(
            cls, "plan", lambda self, k, real=real: calls.append(k) or real(self, k)
        )
    small, r1 = spectrim.compress(net, x, method, "macs=0.5")
    assert not calls and r1.widths == r0.widths
    for p, q in zip(ref.parameters(), small.parameters()):
        assert torch.equal(p, q)
    spectrim.compress(net, x, method, "macs=0.5", sequential=False)
    assert calls
