"""``latency=F``: the latency cost model (measured per-module seconds), the allocator trading channels by time instead of MACs, and the closed loop in
``compress`` on a model whose time is its matrix products."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import spectrim
from spectrim.budget import CostModel, allocate_budget
from spectrim.config import CompressConfig, Target
from spectrim.evaluation import profile
from spectrim.evaluation.latency import module_latencies
from spectrim.graph import analyze_channels


def _mlp() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 16)
    )  # fmt: skip


def _cost_model(net: nn.Module) -> tuple[CostModel, list[int]]:
    x = torch.randn(4, 16)
    a = analyze_channels(net, x)
    cost = profile(net, x)
    cm = CostModel(net, a, cost.per_module)
    groups = [g.index for g in a.groups if g.pinned is None]
    return cm, groups


def test_the_latency_cost_is_the_measured_seconds_shrinking_with_the_channels() -> None:
    cm, (g0, g1) = _cost_model(_mlp())
    cm.set_latency({"0": 4.0, "1": 0.5, "2": 2.0, "4": 1.0}, total=8.0)
    full = {g0: 64, g1: 64}
    assert cm.cost("latency", full) == pytest.approx(8.0)  # 7.5 in modules + 0.5 constant
    # half of the first group: Linear 0 (out) and Linear 2 (in) halve; the ReLU module
    # has no channel axis spectrim tracks, so its time stays
    assert cm.cost("latency", {g0: 32, g1: 64}) == pytest.approx(8.0 - 2.0 - 1.0)
    assert cm.cost("latency", {g0: 16, g1: 32}) == pytest.approx(1.0 + 0.5 + 0.5 + 2 / 8 + 0.5)


def test_the_allocator_cuts_where_time_goes_not_where_macs_go() -> None:
    """Two groups with the same error curve and the same MACs per channel: under MACs the
    greedy splits evenly; under a latency table where the first layer is slow, it takes
    the first group's channels."""
    cm, (g0, g1) = _cost_model(_mlp())
    curve = np.linspace(1.0, 0.0, 65) ** 2
    curves = {g0: curve, g1: curve.copy()}
    by_macs = allocate_budget(Target("macs", 0.6), curves, cm).widths
    cm.set_latency({"0": 20.0, "2": 2.0, "4": 1.0}, total=23.0)
    by_time = allocate_budget(Target("latency", 0.6), curves, cm).widths
    assert abs(by_macs[g0] - by_macs[g1]) <= 8
    assert by_time[g0] < by_macs[g0] and by_time[g1] > by_time[g0]


def test_module_latencies_sum_a_module_called_twice() -> None:
    class Twice(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(512, 512)
            self.other = nn.Linear(512, 512)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.other(self.lin(self.lin(x)))

    x = torch.randn(512, 512)
    per, total = module_latencies(Twice(), x, warmup=2, repeats=9)
    assert set(per) == {"lin", "other"} and per["lin"] + per["other"] <= total
    # two calls' time, not the last one's: against a twin called once in the same passes,
    # so a busy machine slows both alike
    assert per["lin"] > 1.3 * per["other"]


def test_compress_to_a_latency_target_on_a_matmul_bound_model() -> None:
    """Wide linear layers at batch 512, where time follows the products: the loop lands
    near the target, every round is reported, and the model has the best round's shapes."""
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Linear(256, 1024), nn.ReLU(), nn.Linear(1024, 1024), nn.ReLU(), nn.Linear(1024, 10)
    )  # fmt: skip
    x = torch.randn(1024, 256)
    small, report = spectrim.compress(net, x, "l1", "latency=0.5", latency_batch=512)
    lat = report.latency
    assert lat is not None and lat["batch"] == 512 and 1 <= len(lat["rounds"]) <= 5
    assert lat["measured"] in [r["measured"] for r in lat["rounds"]]
    assert abs(lat["measured"] - 0.5) < 0.2  # timing on a shared CI machine: loose
    assert 0.2 < report.macs_ratio < 0.8
    assert small(x[:4]).shape == (4, 10)


def test_latency_targets_are_parsed_checked_and_refused_where_not_built() -> None:
    assert str(Target.parse("latency=0.5")) == "latency=0.5"
    with pytest.raises(ValueError, match="latency_batch"):
        CompressConfig(latency_batch=0)
    with pytest.raises(ValueError, match="must be a fraction"):
        Target.parse("latency=1.5")
    net = _mlp()
    with pytest.raises(ValueError, match="heads=True puts"):
        spectrim.compress(net, torch.randn(64, 16), "id", "latency=0.5", heads=True)
