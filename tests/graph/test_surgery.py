"""Surgery: producers, passengers and consumers are sliced consistently, and folds
``W ← W B`` (``W (B ⊗ I)`` after a flatten) are applied on the right columns."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from _toy_models import FlattenHead, build
from torch import nn

from spectrim.graph import GroupPlan, analyze_channels, apply_plan


def outputs(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(x)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / a.abs().max())


def test_slicing_without_fold_drops_the_right_columns() -> None:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 2)).eval()
    a = analyze_channels(net, torch.randn(3, 4))
    (g,) = a.prunable
    w0, b0, w2 = net[0].weight.clone(), net[0].bias.clone(), net[2].weight.clone()
    keep = np.array([5, 1, 3])
    apply_plan(net, a, {g.index: GroupPlan(keep=keep)})
    kept = np.sort(keep)
    assert (net[0].out_features, net[2].in_features) == (3, 3)
    assert torch.equal(net[0].weight, w0[kept])
    assert torch.equal(net[0].bias, b0[kept])
    assert torch.equal(net[2].weight, w2[:, kept])
    assert isinstance(net[0].weight, nn.Parameter) and net[0].weight.requires_grad


def test_fold_reconstructs_a_duplicated_neuron_exactly() -> None:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 2)).eval()
    with torch.no_grad():  # neuron 5 = 3 · neuron 2 (positively scaled, survives ReLU)
        net[0].weight[5] = 3 * net[0].weight[2]
        net[0].bias[5] = 3 * net[0].bias[2]
    x = torch.randn(32, 4)
    ref = outputs(net, x)
    a = analyze_channels(net, x[:2])
    (g,) = a.prunable
    keep = np.array([0, 1, 2, 3, 4])
    B = np.zeros((6, 5))
    B[keep, np.arange(5)] = 1.0
    B[5, 2] = 3.0
    plain = copy.deepcopy(net)
    w2 = net[2].weight.detach().clone()
    apply_plan(net, a, {g.index: GroupPlan(keep=keep, folds={"2": B})})
    assert net[2].in_features == 5
    expected = w2[:, :5].clone()
    expected[:, 2] += 3.0 * w2[:, 5]
    assert torch.allclose(net[2].weight, expected, atol=1e-6)
    assert rel(ref, outputs(net, x)) < 1e-6
    # without the fold the output is wrong: the test is not vacuous
    apply_plan(plain, a, {g.index: GroupPlan(keep=keep)})
    assert rel(ref, outputs(plain, x)) > 1e-3


def test_fold_through_flatten_is_kron_with_identity() -> None:
    torch.manual_seed(0)
    model = FlattenHead().eval()
    with torch.no_grad():  # channel 3 duplicates channel 1
        model.c.weight[3] = model.c.weight[1]
        model.c.bias[3] = model.c.bias[1]
    x = torch.randn(8, 3, 6, 6)
    ref = outputs(model, x)
    a = analyze_channels(model, x[:2])
    g = a.group("c")
    keep = np.array([0, 1, 2])
    B = np.zeros((4, 3))
    B[keep, keep] = 1.0
    B[3, 1] = 1.0
    sliced = copy.deepcopy(model)
    apply_plan(model, a, {g.index: GroupPlan(keep=keep, folds={"fc": B})})
    assert model.c.out_channels == 3 and model.fc.in_features == 27
    assert rel(ref, outputs(model, x)) < 1e-6
    # the folded weight is W[:, ch1] + W[:, ch3] on channel 1's 9 features
    w = sliced.fc.weight
    assert torch.allclose(model.fc.weight[:, 9:18], w[:, 9:18] + w[:, 27:36])
    apply_plan(sliced, a, {g.index: GroupPlan(keep=keep)})  # no fold: not exact
    assert rel(ref, outputs(sliced, x)) > 1e-3


def test_residual_group_slices_every_producer_passenger_and_consumer() -> None:
    model, x = build("residual")
    a = analyze_channels(model, x)
    g = a.group("stem")
    with torch.no_grad():  # make stream channels 2 and 6 identically zero
        for conv in (model.stem, model.c2):
            conv.weight[[2, 6]] = 0
            conv.bias[[2, 6]] = 0
        model.bn.bias[[2, 6]] = 0
        model.bn.running_mean[[2, 6]] = 0
    x = torch.randn(4, 3, 6, 6)
    ref = outputs(model, x)
    keep = np.array([0, 1, 3, 4, 5, 7])
    apply_plan(model, a, {g.index: GroupPlan(keep=keep)})
    assert model.stem.out_channels == 6 and model.stem.weight.shape[0] == 6
    assert model.c2.out_channels == 6 and model.c2.bias.shape == (6,)
    assert model.bn.num_features == 6 and model.bn.running_var.shape == (6,)
    assert model.c1.in_channels == 6 and model.c1.weight.shape[1] == 6
    assert model.head.in_features == 6
    assert rel(ref, outputs(model, x)) < 1e-6


def test_depthwise_passenger_keeps_groups_equal_to_channels() -> None:
    model, x = build("depthwise")
    a = analyze_channels(model, x)
    g = a.group("pw")
    dw_w = model.dw.weight.clone()
    apply_plan(model, a, {g.index: GroupPlan(keep=np.array([0, 2, 5]))})
    assert (model.dw.in_channels, model.dw.out_channels, model.dw.groups) == (3, 3, 3)
    assert torch.equal(model.dw.weight, dw_w[[0, 2, 5]])
    assert model.bn.num_features == model.bn2.num_features == 3
    assert model.pw2.in_channels == 3
    assert outputs(model, x).shape == (2, 4, 6, 6)


def test_concat_consumer_loses_the_right_columns() -> None:
    model, x = build("dense")
    a = analyze_channels(model, x)
    wc = model.c.weight.clone()
    apply_plan(
        model,
        a,
        {a.group("a").index: GroupPlan(keep=np.array([1, 3])),
         a.group("b").index: GroupPlan(keep=np.array([0, 4]))},
    )  # fmt: skip
    assert model.a.out_channels == 2 and model.b.in_channels == 2 and model.b.out_channels == 2
    assert model.c.in_channels == 4
    assert torch.equal(model.c.weight, wc[:, [1, 3, 4, 8]])
    assert outputs(model, x).shape == (2, 2)


def test_two_surgeries_with_already_equal_one() -> None:
    """A second surgery told what the first removed (``already``) indexes the sliced
    modules where they are now: the dense block's concat consumer ends as in one go."""
    model, x = build("dense")
    a = analyze_channels(model, x)
    ga, gb = a.group("a").index, a.group("b").index
    one, two = copy.deepcopy(model), copy.deepcopy(model)
    plans = {ga: GroupPlan(keep=np.array([1, 3])), gb: GroupPlan(keep=np.array([0, 4]))}
    apply_plan(one, a, plans)
    apply_plan(two, a, {ga: plans[ga]})
    gone = {int(c) for c in a.groups[ga].classes if c not in a.groups[ga].classes[[1, 3]]}
    apply_plan(two, a, {gb: plans[gb]}, already=gone)
    for p, q in zip(one.parameters(), two.parameters()):
        assert torch.equal(p, q)
    assert torch.equal(outputs(one, x), outputs(two, x))
    with pytest.raises(ValueError, match="already removed"):
        apply_plan(two, a, {ga: GroupPlan(keep=np.array([1]))}, already=gone)
    fold = {"c": np.eye(a.groups[gb].width)[:, [0, 4]]}
    with pytest.raises(ValueError, match="folds cannot be applied"):
        apply_plan(copy.deepcopy(model), a, {gb: GroupPlan(np.array([0, 4]), folds=fold)},
                   already=gone)  # fmt: skip


def test_se_gate_producer_is_sliced_with_the_stream() -> None:
    model, x = build("se")
    a = analyze_channels(model, x)
    apply_plan(model, a, {a.group("c").index: GroupPlan(keep=np.arange(5))})
    assert model.c.out_channels == 5 and model.e.out_channels == 5
    assert model.r.in_channels == 5 and model.out.in_channels == 5
    assert outputs(model, x).shape == (2, 4, 6, 6)


def test_per_channel_parameter_is_sliced() -> None:
    model, x = build("layer_scale")
    a = analyze_channels(model, x)
    gamma = model.gamma.detach().clone()
    apply_plan(model, a, {a.group("c").index: GroupPlan(keep=np.array([1, 4]))})
    assert isinstance(model.gamma, nn.Parameter)
    assert torch.equal(model.gamma.detach(), gamma[[1, 4]])
    assert outputs(model, x).shape == (2, 2, 6, 6)


def test_plans_are_validated() -> None:
    model, x = build("option_a")
    a = analyze_channels(model, x)
    pinned = a.group("c")
    with pytest.raises(ValueError, match="'c' is pinned"):
        apply_plan(model, a, {pinned.index: GroupPlan(keep=np.arange(2))})
    g = a.group("mid")
    with pytest.raises(ValueError, match="at least one channel"):
        apply_plan(model, a, {g.index: GroupPlan(keep=np.array([], dtype=np.int64))})
    with pytest.raises(ValueError, match="out of range or repeated"):
        apply_plan(model, a, {g.index: GroupPlan(keep=np.array([0, 6]))})
    with pytest.raises(ValueError, match="out of range or repeated"):
        apply_plan(model, a, {g.index: GroupPlan(keep=np.array([1, 1]))})
    with pytest.raises(ValueError, match="fold for consumer 'c2' has shape"):
        apply_plan(model, a, {g.index: GroupPlan(keep=np.arange(3), folds={"c2": np.eye(3)})})
    # nothing was modified by the rejected plans
    assert model.mid.out_channels == 6 and model.c2.in_channels == 6


def test_full_keep_is_a_no_op() -> None:
    model, x = build("residual")
    a = analyze_channels(model, x)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    apply_plan(model, a, {g.index: GroupPlan(keep=np.arange(g.width)) for g in a.prunable})
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
