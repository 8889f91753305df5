"""Channel-flow analysis on small hand-built models, one construct at a time."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from _toy_models import ALL_MODELS, FlattenHead, build
from torch import nn

from spectrim.graph import Analysis, UnitGroup, analyze_channels, trace
from spectrim.graph.verify import self_check


def analyze(name: str) -> tuple[nn.Module, Analysis]:
    model, x = build(name)
    return model, analyze_channels(model, x)


def consumer(group: UnitGroup, module: str) -> np.ndarray:
    for slot in group.consumers:
        if slot.module == module:
            return slot.positions
    raise AssertionError(f"{module} is not a consumer of {group.name}: {group.consumers}")


def column(n: int, start: int = 0) -> np.ndarray:
    return np.arange(start, start + n)[:, None]


# ------------------------------------------------------------------------------- trace


def test_trace_records_modules_and_functions() -> None:
    model, x = build("residual")
    g = trace(model, x)
    names = [op.name for op in g.ops]
    for expected in ("stem", "bn", "relu", "c1", "c2", "add", "mean", "head"):
        assert expected in names, names
    assert len(g.inputs) == 1 and g.inputs[0].shape == tuple(x.shape)
    assert len(g.outputs) == 1 and g.outputs[0].shape == (2, 4)
    assert model.training is False  # restored


def test_analysis_leaves_model_unchanged_and_restores_training_flag() -> None:
    model, x = build("residual")
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    analyze_channels(model, x)
    assert model.training
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k  # BN running stats not updated


# ----------------------------------------------------------------------------- groups


def test_residual_add_merges_producers_into_one_group() -> None:
    _, a = analyze("residual")
    stream = a.group("stem")
    assert stream.pinned is None
    assert stream.producers == ["stem", "c2"]
    assert stream.width == 8
    assert stream.passengers == ["bn"]
    assert np.array_equal(consumer(stream, "c1"), column(8))
    assert np.array_equal(consumer(stream, "head"), column(8))
    assert sorted(c.module for c in stream.consumers) == ["c1", "head"]
    # producer channel maps: both convs produce channel i as their output i
    for p in stream.producers:
        assert np.array_equal(stream.producer_channels[p], np.arange(8))
    inner = a.group("c1")
    assert inner.pinned is None and inner.producers == ["c1"]
    assert [c.module for c in inner.consumers] == ["c2"]
    # c2 is a producer of the stream, never its own group
    assert "c2" not in [g.name for g in a.groups]
    assert [g.name for g in a.prunable] == ["stem", "c1"]


def test_concat_positions_follow_the_concatenation() -> None:
    _, a = analyze("dense")
    ga, gb = a.group("a"), a.group("b")
    assert ga.pinned is None and gb.pinned is None
    assert sorted(c.module for c in ga.consumers) == ["b", "c"]
    assert np.array_equal(consumer(ga, "b"), column(4))
    assert np.array_equal(consumer(ga, "c"), column(4, 0))  # first in the cat
    assert np.array_equal(consumer(gb, "c"), column(5, 4))  # after a's 4 channels
    assert a.in_labels["c"].shape == (9,)


@pytest.mark.parametrize("how", ["torch.flatten", "view", "reshape", "nn.Flatten"])
def test_flatten_to_linear_repeats_each_channel_hw_times(how: str) -> None:
    model = FlattenHead(how).eval()
    a = analyze_channels(model, torch.randn(2, 3, 6, 6))
    g = a.group("c")
    assert g.pinned is None
    (slot,) = g.consumers
    assert slot.module == "fc" and slot.repeats == 9  # r = H·W = 3·3
    # flatten of (C, H, W) is channel-major: channel i occupies features 9i .. 9i+8
    expected = np.arange(4)[:, None] * 9 + np.arange(9)[None, :]
    assert np.array_equal(slot.positions, expected)


def test_flatten_positions_match_a_real_forward() -> None:
    """Perturbing channel i of the conv changes exactly fc's input features positions[i]."""
    model = FlattenHead().eval()
    x = torch.randn(2, 3, 6, 6)
    g = analyze_channels(model, x).group("c")
    seen: list[torch.Tensor] = []
    h = model.fc.register_forward_pre_hook(lambda m, args: seen.append(args[0].clone()))
    try:
        with torch.no_grad():
            model(x)
            base = seen[-1]
            for i in range(4):
                model.c.bias[i] += 10.0
                model(x)
                model.c.bias[i] -= 10.0
                changed = torch.nonzero((seen[-1] - base).abs().amax(0) > 1e-4).flatten()
                assert np.array_equal(np.sort(changed.numpy()), g.consumers[0].positions[i])
    finally:
        h.remove()


def test_depthwise_conv_and_batchnorm_are_passengers() -> None:
    _, a = analyze("depthwise")
    g = a.group("pw")
    assert g.pinned is None
    assert g.producers == ["pw"]
    assert g.passengers == ["bn", "dw", "bn2"]
    assert [c.module for c in g.consumers] == ["pw2"]
    assert "dw" not in [x.name for x in a.groups]


def test_se_gating_mul_joins_the_gate_producer() -> None:
    _, a = analyze("se")
    g = a.group("c")
    assert g.pinned is None
    assert g.producers == ["c", "e"]  # x * sigmoid(e(...)): channel i of e gates channel i
    assert sorted(c.module for c in g.consumers) == ["out", "r"]
    squeeze = a.group("r")
    assert squeeze.pinned is None and [c.module for c in squeeze.consumers] == ["e"]


def test_option_a_channel_padding_is_pinned() -> None:
    _, a = analyze("option_a")
    padded = a.group("c")
    assert padded.pinned is not None and "pad" in padded.pinned
    # the block's output is added to the padded identity: pinned too
    assert a.group("c2").pinned is not None
    # the untouched inner layer stays prunable
    assert a.group("mid").pinned is None
    assert [g.name for g in a.prunable] == ["mid"]


def test_view_with_literal_channel_count_is_pinned() -> None:
    """``a.view(N, 4, 36)`` names every size, the channel count among them: the analysis
    follows it (the count is the channel axis's), and the shrink self-check pins it, since
    a hard-coded 4 cannot hold 3 channels with no ``-1`` to absorb them."""
    model, x = build("literal_view")
    a = analyze_channels(model, x)
    assert a.group("a").pinned is None
    assert self_check(model, a, x) == [
        ("a", "shrink self-check failed (hard-coded channel count?)")
    ]
    ok = a.group("b")  # view(N, -1) is a flatten
    assert ok.pinned is None
    assert consumer(ok, "fb").shape == (5, 36)


class _TokensToImage(nn.Module):
    """PVT-v2's and SegFormer's Mix-FFN: tokens ``(B, N, C)`` through a Linear, back to an
    image with ``x.transpose(1, 2).view(B, C, H, W)`` (every size read from the input)
    for a depthwise conv, and to tokens again."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(6, 12)
        self.dw = nn.Conv2d(12, 12, 3, padding=1, groups=12)
        self.fc2 = nn.Linear(12, 6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        h = self.fc1(x)
        c = h.shape[-1]
        img = self.dw(h.transpose(1, 2).view(b, c, 4, n // 4))
        return self.fc2(torch.relu(img.flatten(2).transpose(1, 2)))


def test_a_view_that_names_the_channel_count_read_from_the_input_is_followed() -> None:
    """Before stop 49 every such view pinned its channels ("reshapes the channel axis
    with literal sizes"): PVT-v2 kept 51 of 51 groups.  Followed now, the FFN width is a
    group that passes the self-checks and compresses."""
    import spectrim

    torch.manual_seed(0)
    model = _TokensToImage().eval()
    x = torch.randn(64, 16, 6)
    a = analyze_channels(model, x[:2])
    g = a.group("fc1")
    assert g.pinned is None and self_check(model, a, x[:2]) == []
    small, _ = spectrim.compress(model, x, "id", "width=0.5")
    assert small.fc1.out_features == 6 and small.dw.groups == 6
    assert small(x[:2]).shape == (2, 16, 6)


def test_unknown_op_is_pinned_and_named() -> None:
    _, a = analyze("unknown_op")
    g = a.group("c")
    assert g.pinned is not None and "cumsum" in g.pinned
    assert "c" not in [x.name for x in a.prunable]


def test_layernorm_over_channels_is_pinned() -> None:
    _, a = analyze("layernorm")
    g = a.group("a")
    assert g.pinned is not None and "LayerNorm" in g.pinned and "'ln'" in g.pinned
    assert a.group("b").pinned is None


def test_layernorm_over_a_spatial_axis_passes_channels_through() -> None:
    _, a = analyze("spatial_layernorm")
    g = a.group("c")
    assert g.pinned is None
    assert [c.module for c in g.consumers] == ["out"]


def test_model_outputs_are_pinned() -> None:
    _, a = analyze("two_outputs")
    assert a.group("c").pinned == "reaches the model output"
    assert a.group("a").pinned == "reaches the model output"  # returned as 2nd output
    assert a.group("b").pinned is None
    for name in ALL_MODELS:
        _, an = analyze(name)
        last = an.groups[-1]
        assert last.pinned is not None, (name, last)


def test_split_grouped_conv_and_groupnorm_are_pinned() -> None:
    _, a = analyze("split")
    assert "split" in (a.group("c").pinned or "")
    _, a = analyze("grouped")
    assert "grouped convolution" in (a.group("c").pinned or "")
    assert "groups=2" in (a.group("c").pinned or "")
    _, a = analyze("groupnorm")
    assert "GroupNorm" in (a.group("c").pinned or "")


def test_module_called_twice_ties_its_inputs_to_its_outputs() -> None:
    _, a = analyze("shared_conv")
    g = a.group("c0")
    assert g.pinned is None
    assert g.producers == ["c0", "s"]
    assert sorted(c.module for c in g.consumers) == ["h", "s"]
    assert [x.name for x in a.prunable] == ["c0"]


def test_per_channel_parameter_is_a_passenger() -> None:
    _, a = analyze("layer_scale")
    g = a.group("c")
    assert g.pinned is None
    assert g.passengers == ["gamma"]
    assert a.param_dims == {"gamma": 0}


@pytest.mark.parametrize("name", sorted(ALL_MODELS))
def test_groups_are_consistent(name: str) -> None:
    """Structural invariants of every analysis."""
    model, a = analyze(name)
    modules = dict(model.named_modules())
    for i, g in enumerate(a.groups):
        assert g.index == i
        assert g.name == g.producers[0]
        assert g.width == len(np.unique(g.classes))
        if g.pinned is None:
            assert g.consumers, g  # an unpinned group is read by someone
        for p in g.producers:
            idx = g.producer_channels[p]
            assert sorted(idx.tolist()) == sorted(set(idx.tolist()))
            assert np.array_equal(a.out_labels[p][idx], g.classes)
        for slot in g.consumers:
            assert slot.positions.shape[0] == g.width
            assert np.array_equal(
                a.in_labels[slot.module][slot.positions],
                np.repeat(g.classes[:, None], slot.repeats, 1),
            )
            mod = modules[slot.module]
            n_in = mod.in_features if isinstance(mod, nn.Linear) else mod.in_channels
            assert slot.positions.max() < n_in
    # every class belongs to exactly one group
    owners = [gi for g in a.groups for gi in [g.index] * g.width]
    assert len(owners) == sum(g.width for g in a.groups)
    assert len({int(c) for g in a.groups for c in g.classes}) == len(owners)


def test_summary_and_to_dict_mention_pinned_reasons() -> None:
    _, a = analyze("option_a")
    text = a.summary()
    assert "pinned (function 'pad'" in text
    assert "mid: width 6, 1 producer(s), 1 consumer(s): prunable" in text
    d = a.group("mid").to_dict()
    assert d == {
        "name": "mid",
        "width": 6,
        "producers": ["mid"],
        "consumers": ["c2"],
        "passengers": [],
        "pinned": None,
    }
    with pytest.raises(KeyError, match="nope"):
        a.group("nope")


class _ReshapeAs(nn.Module):
    """Linear → BatchNorm1d on the flattened tokens → ``reshape_as`` (LeViT's pattern)."""

    def __init__(self, to_input: bool) -> None:
        super().__init__()
        self.a, self.bn, self.b = nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Linear(8, 2)
        self.to_input = to_input

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.a(x)
        like = y if self.to_input else torch.zeros(y.shape)
        return self.b(self.bn(y.flatten(0, 1)).reshape_as(like))


def test_reshape_as_follows_a_tensor_with_the_same_channels_only() -> None:
    x = torch.randn(3, 5, 4)
    ok = analyze_channels(_ReshapeAs(True).eval(), x)
    assert [g.name for g in ok.prunable] == ["a"]
    literal = analyze_channels(_ReshapeAs(False).eval(), x)
    assert not literal.prunable
    assert "reshapes the channel axis to another tensor's shape" in (literal.groups[0].pinned or "")


def test_a_channel_produced_unevenly_often_is_pinned_not_a_crash() -> None:
    """One producer whose channels come out a different number of times (channels 0 and 1
    tied by a swap, 2 and 3 alone) cannot be sliced as one group: it is pinned.  Tied
    parts of a fused projection, each channel equally often, are followed instead
    (tests/graph/test_architectures.py, Phi-3)."""

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.Conv2d(3, 4, 1), nn.Conv2d(4, 5, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = self.a(x)
            return self.b(y + torch.cat([y[:, 1:2], y[:, 0:1], y[:, 2:4]], 1))

    analysis = analyze_channels(Net().eval(), torch.randn(2, 3, 8, 8))
    (group,) = [g for g in analysis.groups if g.producers == ["a"]]
    assert group.pinned is not None and not group.producer_copies


class _XIELU(nn.Module):
    """Linear → Apertus's xIELU (``where(x > 0, …, expm1(min(x, eps)) …)``, a 0-d
    parameter ``eps``) → Linear; and, with ``reduce``, a ``max`` over the channel axis."""

    def __init__(self, reduce: bool = False) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(4, 8), nn.Linear(8, 3)
        self.eps = nn.Parameter(torch.tensor(-1e-6))
        self.reduce = reduce

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.a(x)
        y = torch.where(y > 0, y * y + 0.5 * y, (torch.expm1(torch.min(y, self.eps)) - y) * 0.8)
        if self.reduce:
            y = y - y.max(dim=-1, keepdim=True).values
        return self.b(y)


def test_comparisons_and_a_two_tensor_min_are_element_by_element() -> None:
    """``x > 0``, ``torch.where``, ``expm1`` and ``torch.min(x, eps)`` map each channel to
    itself (Apertus's FFN was pinned on ``gt``); ``x.max(dim=-1)`` over the channels is
    still a reduction and pins.  The permutation and shrink self-checks pass."""
    x = torch.randn(16, 4)
    model = _XIELU().eval()
    ok = analyze_channels(model, x)
    assert [g.name for g in ok.prunable] == ["a"]
    assert self_check(model, ok, x) == []
    pinned = analyze_channels(_XIELU(reduce=True).eval(), x)
    assert not pinned.prunable
    assert "reduces over channels" in (pinned.groups[0].pinned or "")
