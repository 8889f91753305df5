"""Self-checks: correct analyses pass, deliberately broken ones are caught and pinned."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from _toy_models import ALL_MODELS, build
from torch import nn

import spectrim
import spectrim.graph.verify as verify_module
from spectrim.graph import Analysis, GroupPlan, analyze_channels, apply_plan
from spectrim.graph.verify import self_check
from spectrim.zoo import CifarResNet

PERM_FAIL = "permutation self-check failed"
SHRINK_FAIL = "shrink self-check failed"


def permute_all(model: nn.Module, a: Analysis, seed: int = 1) -> nn.Module:
    """A copy of ``model`` with every prunable group's channels permuted (no identities)."""
    rng = np.random.default_rng(seed)
    plans = {}
    for g in a.prunable:
        perm = rng.permutation(g.width)
        while g.width > 1 and np.array_equal(perm, np.arange(g.width)):
            perm = rng.permutation(g.width)
        plans[g.index] = GroupPlan(keep=np.arange(g.width), perm=perm)
    m2 = copy.deepcopy(model)
    apply_plan(m2, a, plans)
    return m2


def assert_same_outputs(m1: nn.Module, m2: nn.Module, x: torch.Tensor, rtol: float = 1e-5):
    with torch.no_grad():
        y1, y2 = m1(x), m2(x)
    y1 = y1 if isinstance(y1, tuple) else (y1,)
    y2 = y2 if isinstance(y2, tuple) else (y2,)
    for a, b in zip(y1, y2):
        assert a.shape == b.shape
        assert float((a - b).abs().max()) <= rtol * float(a.abs().max())


@pytest.mark.parametrize("name", sorted(set(ALL_MODELS) - {"shape_assert", "literal_view"}))
def test_self_check_passes_on_correct_graphs(name: str) -> None:
    model, x = build(name)
    a = analyze_channels(model, x)
    prunable = [g.name for g in a.prunable]
    assert self_check(model, a, x) == []
    assert [g.name for g in a.prunable] == prunable


def test_passing_graph_costs_one_copy(monkeypatch: pytest.MonkeyPatch) -> None:
    """When nothing fails, both checks run on a single copy (no bisection copies)."""
    model, x = build("residual")
    a = analyze_channels(model, x)
    copies: list[object] = []
    real = copy.deepcopy

    def counting(obj, *args):  # type: ignore[no-untyped-def]
        if obj is model:  # deepcopy recurses through the patched name: count the root only
            copies.append(obj)
        return real(obj, *args)

    monkeypatch.setattr(verify_module.copy, "deepcopy", counting)
    assert self_check(model, a, x) == []
    assert len(copies) == 1


@pytest.mark.parametrize(
    "name", ["residual", "dense", "flatten", "depthwise", "se", "layer_scale", "shared_conv"]
)
def test_permuting_every_group_preserves_outputs(name: str) -> None:
    model, x = build(name)
    a = analyze_channels(model, x)
    assert a.prunable
    permuted = permute_all(model, a)
    assert_same_outputs(model, permuted, x)
    # and the permutation really moved weights
    changed = [
        k
        for k, v in permuted.state_dict().items()
        if v.shape == model.state_dict()[k].shape and not torch.equal(v, model.state_dict()[k])
    ]
    assert changed


def test_permutation_on_option_b_resnet() -> None:
    torch.manual_seed(0)
    model = CifarResNet(14, shortcut="B", width=8).eval()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.2)
                m.bias.normal_(0, 0.2)
    x = torch.randn(2, 3, 16, 16)
    a = analyze_channels(model, x)
    assert len(a.prunable) == 9  # 6 inner block groups + 3 residual streams
    assert_same_outputs(model, permute_all(model, a), x)
    assert self_check(model, a, x) == []


def test_dropped_consumer_is_caught_by_the_permutation_check() -> None:
    model, x = build("residual")
    a = analyze_channels(model, x)
    g = a.group("c1")
    # the analysis "forgets" that c2 reads c1's channels
    g.consumers = [c for c in g.consumers if c.module != "c2"]
    del a.in_labels["c2"]
    # sanity: the broken analysis really gives wrong permuted models
    with pytest.raises(AssertionError):
        assert_same_outputs(model, permute_all(model, a), x)
    pinned = self_check(model, a, x)
    assert pinned == [("c1", PERM_FAIL)]
    assert a.group("c1").pinned == PERM_FAIL
    assert a.group("stem").pinned is None  # the healthy group stays prunable
    assert [gr.name for gr in a.prunable] == ["stem"]


def test_dropped_passenger_is_caught() -> None:
    model, x = build("depthwise")
    a = analyze_channels(model, x)
    del a.chan_labels["bn"]  # BatchNorm statistics would no longer follow the channels
    a.group("pw").passengers.remove("bn")
    assert self_check(model, a, x) == [("pw", PERM_FAIL)]
    assert a.prunable == []


def test_wrong_flatten_mapping_is_caught() -> None:
    model, x = build("flatten")
    a = analyze_channels(model, x)
    labels = a.in_labels["fc"]
    # pretend the flatten were channel-last (tile instead of repeat)
    a.in_labels["fc"] = labels.reshape(4, 9).T.reshape(-1).copy()
    assert self_check(model, a, x) == [("c", PERM_FAIL)]


def test_hidden_channel_count_is_caught_by_the_shrink_check() -> None:
    model, x = build("shape_assert")
    a = analyze_channels(model, x)
    assert a.group("c").pinned is None  # invisible to the tracer
    pinned = self_check(model, a, x)
    assert len(pinned) == 1 and pinned[0][0] == "c" and pinned[0][1].startswith(SHRINK_FAIL)
    assert a.group("c").pinned.startswith(SHRINK_FAIL)
    assert a.group("mid").pinned is None


def test_compress_pins_a_failing_group_and_stays_correct(monkeypatch: pytest.MonkeyPatch) -> None:
    """A broken analysis injected into compress() costs compression, never correctness."""
    model, _ = build("residual")
    x = torch.randn(64, 3, 6, 6)
    real = verify_module.analyze_channels

    def broken(m: nn.Module, example: object) -> Analysis:
        a = real(m, example)
        g = a.group("c1")
        g.consumers = [c for c in g.consumers if c.module != "c2"]
        del a.in_labels["c2"]
        return a

    monkeypatch.setattr(verify_module, "analyze_channels", broken)
    small, report = spectrim.compress(model, x, method="id", target="width=0.5")
    assert any("'c1'" in w and PERM_FAIL in w for w in report.warnings), report.warnings
    assert report.widths["c1"] == [6, 6]
    assert report.widths["stem"] == [8, 4]
    with torch.no_grad():
        assert small(x).shape == model(x).shape
    assert small.c1.out_channels == 6 and small.c2.in_channels == 6


def test_compress_pins_hidden_channel_count_and_runs() -> None:
    model, _ = build("shape_assert")
    x = torch.randn(32, 3, 6, 6)
    small, report = spectrim.compress(model, x, method="id", target="width=0.5")
    assert report.widths["c"] == [8, 8]
    assert report.widths["mid"] == [6, 3]
    assert any("'c'" in w and SHRINK_FAIL in w for w in report.warnings)
    with torch.no_grad():
        assert small(x).shape == (32, 2, 6, 6)
