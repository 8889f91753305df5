"""Adding a method touches no core file: register a class, and compress() runs it."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any, ClassVar

import pytest
import torch
from threadpoolctl import threadpool_info
from torch import nn

import spectrim
from spectrim.calibration import GramAccumulator
from spectrim.graph import UnitGroup
from spectrim.methods import available, get_method, register_method, unregister_method
from spectrim.methods.base import GroupSolver, Method
from spectrim.methods.interpolative import IDSolver


def _blas_threads() -> list[int]:
    return [i["num_threads"] for i in threadpool_info() if i["user_api"] == "blas"]


@pytest.fixture
def probe() -> Iterator[type[Method]]:
    """A user-defined method (ID selection, recording the BLAS threads it ran with)."""

    @register_method("test-probe")
    class Probe(Method):
        seen: ClassVar[list[list[int]]] = []

        def __init__(self, scale: float = 1.0, **options: Any) -> None:
            super().__init__(**options)
            self.scale = scale

        def solver(
            self, group: UnitGroup, stats: Mapping[str, GramAccumulator], model: nn.Module
        ) -> GroupSolver:
            Probe.seen.append(_blas_threads())
            return IDSolver(group, {n: acc.gram_numpy() * self.scale for n, acc in stats.items()})

    yield Probe
    unregister_method("test-probe")


def test_registered_method_runs_through_compress(probe: type[Method]) -> None:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 3)).eval()
    x = torch.randn(256, 8)
    assert "test-probe" in available()
    small, report = spectrim.compress(net, x, method="test-probe", target="width=0.5", scale=2.0)
    ref, _ = spectrim.compress(net, x, method="id", target="width=0.5")
    assert report.method == "test-probe" and small[0].out_features == 16
    with torch.no_grad():  # a scaled Gram selects and fits exactly like ID
        torch.testing.assert_close(small(x), ref(x), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="unknown option"):
        get_method("test-probe", sclae=2.0)
    with pytest.raises(ValueError, match="already registered"):
        register_method("id")(probe)


def test_unregister_takes_a_method_out_and_names_a_missing_one() -> None:
    """A plug-in (or a docstring example) leaves the process's registry as it found it:
    unregistered, the name is gone from ``available`` and ``compress`` refuses it; the
    same name can be registered again; an unknown name is refused by name."""

    class First(Method):
        needs_statistics = False

    register_method("test-gone")(First)
    assert "test-gone" in available()
    unregister_method("test-gone")
    assert "test-gone" not in available()
    with pytest.raises(ValueError, match="test-gone"):
        spectrim.compress(nn.Linear(4, 4), torch.randn(8, 4), method="test-gone")
    register_method("test-gone")(First)  # no "already registered": it was removed
    unregister_method("test-gone")
    with pytest.raises(ValueError, match="no weight method named 'test-gone' is registered"):
        unregister_method("test-gone", kind="weight")


def test_compress_runs_numpy_blas_on_one_thread_and_restores_it(probe: Any) -> None:
    """NumPy/SciPy BLAS threads busy-wait between calls and slow torch down: compress()
    limits them to one while it runs, and gives the user's setting back after."""
    before = _blas_threads()
    net = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 3)).eval()
    spectrim.compress(net, torch.randn(64, 8), method="test-probe", target="width=0.5")
    assert probe.seen and all(t == 1 for threads in probe.seen for t in threads)
    assert _blas_threads() == before


def test_the_sequential_pass_uses_the_solvers_own_refit() -> None:
    """The solver owns its correction: the sequential pass calls ``refit`` and folds what
    it returns (here a constrained one, every kept channel's weight halved), instead of an
    unconstrained least squares that would drop the constraint."""
    calls: list[str] = []

    class Halved(IDSolver):
        def refit(self, keep, consumer, gram, cross, rows):  # type: ignore[no-untyped-def]
            calls.append(consumer)
            b = super().refit(keep, consumer, gram, cross, rows)
            assert b.shape == (self.group.width, len(keep))
            return 0.5 * b

    @register_method("test-halved")
    class HalvedMethod(Method):
        def solver(self, group, stats, model):  # type: ignore[no-untyped-def]
            return Halved(group, {n: acc.gram_numpy() for n, acc in stats.items()})

    try:
        torch.manual_seed(0)
        net = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 3)).eval()
        x = torch.randn(256, 8)
        small, _ = spectrim.compress(net, x, method="test-halved", target="width=0.5")
        ref, _ = spectrim.compress(net, x, method="id", target="width=0.5")
        assert calls == ["2"]
        torch.testing.assert_close(small[2].weight, 0.5 * ref[2].weight, rtol=1e-6, atol=1e-7)
    finally:
        unregister_method("test-halved")
