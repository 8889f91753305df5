"""Tests of spectrim.evaluation.flops against hand-computed MAC counts."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from torch import nn

from spectrim.evaluation import ModelCost, count_macs, count_params, profile

torch.manual_seed(0)


# --------------------------------------------------------------------------------------------
# Single layers
# --------------------------------------------------------------------------------------------


def test_single_conv2d_hand_count() -> None:
    conv = nn.Conv2d(3, 8, kernel_size=3, padding=1)
    # 8 output channels · 16·16 positions · 3 input channels · 3·3 kernel, per example
    assert count_macs(conv, torch.randn(2, 3, 16, 16)) == 8 * 16 * 16 * 3 * 9


def test_strided_conv2d_hand_count() -> None:
    conv = nn.Conv2d(3, 8, kernel_size=3, stride=2)  # 16 -> 7
    assert count_macs(conv, torch.randn(1, 3, 16, 16)) == 8 * 7 * 7 * 3 * 9


def test_depthwise_conv_hand_count() -> None:
    conv = nn.Conv2d(8, 8, kernel_size=3, padding=1, groups=8)
    assert count_macs(conv, torch.randn(1, 8, 16, 16)) == 8 * 16 * 16 * 1 * 9


def test_grouped_conv_hand_count() -> None:
    conv = nn.Conv2d(8, 12, kernel_size=3, padding=1, groups=4)  # 2 input channels per group
    assert count_macs(conv, torch.randn(3, 8, 10, 10)) == 12 * 10 * 10 * 2 * 9


def test_conv1d_and_conv3d_hand_counts() -> None:
    conv1 = nn.Conv1d(4, 6, kernel_size=5)  # 20 -> 16
    assert count_macs(conv1, torch.randn(1, 4, 20)) == 6 * 16 * 4 * 5
    conv3 = nn.Conv3d(2, 3, kernel_size=(1, 3, 3))  # (4, 8, 8) -> (4, 6, 6)
    assert count_macs(conv3, torch.randn(1, 2, 4, 8, 8)) == 3 * (4 * 6 * 6) * 2 * 9


def test_conv_transpose_counts_input_positions() -> None:
    deconv = nn.ConvTranspose2d(4, 6, kernel_size=3, stride=2)
    # C_in · prod(input spatial) · (C_out / groups) · prod(kernel)
    assert count_macs(deconv, torch.randn(2, 4, 5, 5)) == 4 * 25 * 6 * 9


def test_linear_on_3d_input_counts_every_row() -> None:
    linear = nn.Linear(16, 32)
    assert count_macs(linear, torch.randn(3, 5, 16)) == 5 * 16 * 32


def test_count_is_per_example() -> None:
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.Linear(4 * 6 * 6, 5))
    expected = 4 * 36 * 27 + 144 * 5
    assert count_macs(model, torch.randn(1, 3, 8, 8)) == expected
    assert count_macs(model, torch.randn(7, 3, 8, 8)) == expected


@settings(max_examples=25, deadline=None)
@given(
    groups=st.integers(1, 3),
    in_per_group=st.integers(1, 3),
    out_per_group=st.integers(1, 3),
    kernel=st.integers(1, 4),
    stride=st.integers(1, 3),
    padding=st.integers(0, 2),
    dilation=st.integers(1, 2),
    size=st.integers(6, 12),
)
def test_conv2d_matches_formula(
    groups: int,
    in_per_group: int,
    out_per_group: int,
    kernel: int,
    stride: int,
    padding: int,
    dilation: int,
    size: int,
) -> None:
    assume(size + 2 * padding >= dilation * (kernel - 1) + 1)  # the kernel must fit
    c_in, c_out = groups * in_per_group, groups * out_per_group
    conv = nn.Conv2d(c_in, c_out, kernel, stride, padding, dilation, groups)
    out = (size + 2 * padding - dilation * (kernel - 1) - 1) // stride + 1
    assert count_macs(conv, torch.randn(1, c_in, size, size)) == (
        c_out * out * out * in_per_group * kernel * kernel
    )


# --------------------------------------------------------------------------------------------
# Small networks
# --------------------------------------------------------------------------------------------


def _small_cnn() -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),  # 0: 8·16·16·3·9
        nn.BatchNorm2d(8),  # not counted
        nn.ReLU(),
        nn.MaxPool2d(2),  # -> 8x8
        nn.Conv2d(8, 16, 3, padding=1),  # 4: 16·8·8·8·9
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(16, 10),  # 8: 16·10
    )


def test_small_cnn_hand_count_and_per_module() -> None:
    cost = profile(_small_cnn(), torch.randn(2, 3, 16, 16))
    expected = {"0": 8 * 256 * 27, "4": 16 * 64 * 72, "8": 160}
    assert cost.per_module == expected
    assert cost.macs == sum(expected.values()) == 129184
    params = (8 * 27 + 8) + 16 + (16 * 72 + 16) + (16 * 10 + 10)
    assert cost.params == params


def test_shared_module_called_twice_accumulates() -> None:
    linear = nn.Linear(6, 6)
    model = nn.Sequential(linear, nn.ReLU(), linear)
    cost = profile(model, torch.randn(1, 6))
    assert cost.macs == 2 * 36
    assert cost.per_module == {"0": 72}
    assert cost.params == 42


def test_resnet18_published_macs_and_exact_params() -> None:
    torchvision = pytest.importorskip("torchvision")
    model = torchvision.models.resnet18()
    cost = profile(model, torch.randn(1, 3, 224, 224))
    assert cost.macs == pytest.approx(1.814e9, rel=0.01)
    assert cost.params == 11_689_512
    assert count_params(model) == 11_689_512
    assert cost.per_module["fc"] == 512 * 1000
    assert cost.per_module["conv1"] == 64 * 112 * 112 * 3 * 49
    assert sum(cost.per_module.values()) == cost.macs


def test_resnet50_published_macs() -> None:
    torchvision = pytest.importorskip("torchvision")
    assert count_macs(torchvision.models.resnet50(), torch.randn(1, 3, 224, 224)) == (
        pytest.approx(4.09e9, rel=0.01)
    )


def test_mobilenet_v2_published_macs() -> None:
    torchvision = pytest.importorskip("torchvision")
    assert count_macs(torchvision.models.mobilenet_v2(), torch.randn(1, 3, 224, 224)) == (
        pytest.approx(0.30e9, rel=0.02)
    )


# --------------------------------------------------------------------------------------------
# Attention and function-level tensor products
# --------------------------------------------------------------------------------------------


def _mha_macs(length: int, source: int, embed: int) -> int:
    projections = (2 * length + 2 * source) * embed * embed  # q, k, v, out
    return projections + 2 * length * source * embed  # QKᵀ and AV over all heads


@pytest.mark.parametrize("need_weights", [True, False])
def test_multihead_self_attention(need_weights: bool) -> None:
    mha = nn.MultiheadAttention(16, 4, batch_first=True)
    x = torch.randn(2, 5, 16)
    inputs = {"query": x, "key": x, "value": x, "need_weights": need_weights}
    assert count_macs(mha, inputs) == _mha_macs(5, 5, 16) == 5920


def test_multihead_cross_attention_in_eval_mode() -> None:
    # eval mode + batch_first would take the fused fast path; it must still be counted
    mha = nn.MultiheadAttention(16, 4, batch_first=True).eval()
    q, kv = torch.randn(3, 3, 16), torch.randn(3, 7, 16)
    assert count_macs(mha, (q, kv, kv)) == _mha_macs(3, 7, 16)


def test_transformer_encoder_layer_and_fastpath_flag_restored() -> None:
    before = torch.backends.mha.get_fastpath_enabled()
    layer = nn.TransformerEncoderLayer(16, 4, dim_feedforward=32, batch_first=True).eval()
    cost = profile(layer, torch.randn(2, 5, 16))
    assert cost.macs == _mha_macs(5, 5, 16) + 2 * 5 * 16 * 32
    assert cost.per_module["linear1"] == cost.per_module["linear2"] == 5 * 16 * 32
    assert torch.backends.mha.get_fastpath_enabled() == before


class _HandAttention(nn.Module):
    """Multi-head self-attention written with explicit tensor products."""

    def __init__(self, embed: int, heads: int, style: str) -> None:
        super().__init__()
        self.q, self.k, self.v, self.o = (nn.Linear(embed, embed) for _ in range(4))
        self.heads, self.style = heads, style

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, length, embed = x.shape
        h, d = self.heads, embed // self.heads

        def split(t: torch.Tensor) -> torch.Tensor:
            return t.view(b, length, h, d).transpose(1, 2)

        q, k, v = split(self.q(x)), split(self.k(x)), split(self.v(x))
        if self.style == "matmul":
            att = (q @ k.transpose(-2, -1) / math.sqrt(d)).softmax(-1)
            y = torch.matmul(att, v)
        elif self.style == "einsum":
            att = torch.einsum("bhld,bhmd->bhlm", q, k).softmax(-1)
            y = torch.einsum("bhlm,bhmd->bhld", att, v)
        elif self.style == "bmm":
            q3, k3, v3 = (t.reshape(b * h, length, d) for t in (q, k, v))
            att = torch.baddbmm(torch.zeros(1, length, length), q3, k3.transpose(1, 2))
            y = torch.bmm(att.softmax(-1), v3).view(b, h, length, d)
        else:
            y = F.scaled_dot_product_attention(q, k, v)
        return self.o(y.transpose(1, 2).reshape(b, length, embed))


@pytest.mark.parametrize("style", ["matmul", "einsum", "bmm", "sdpa"])
def test_hand_written_attention(style: str) -> None:
    model = _HandAttention(8, 2, style)
    cost = profile(model, torch.randn(2, 6, 8))
    projections = 4 * 6 * 8 * 8
    attention = 2 * 6 * 6 * 8  # QKᵀ and AV, all heads
    assert cost.macs == projections + attention
    # the products called as functions are attributed to the module that called them
    assert cost.per_module[""] == attention
    assert all(cost.per_module[name] == 6 * 64 for name in "qkvo")


class _FunctionalConv(nn.Conv2d):
    """A conv with its own forward (weight standardisation): counted through its kernel."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight
        w = (w - w.mean(dim=(1, 2, 3), keepdim=True)) / (w.std(dim=(1, 2, 3), keepdim=True) + 1e-5)
        return F.conv2d(x, w, self.bias, self.stride, self.padding, self.dilation, self.groups)


class _LinearPlusProduct(nn.Linear):
    """A Linear subclass with a custom forward doing one extra matmul."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = super().forward(x)
        return y @ torch.ones(self.out_features, 3)


def test_no_double_count_and_custom_forwards() -> None:
    assert count_macs(_FunctionalConv(3, 4, 3), torch.randn(2, 3, 8, 8)) == 4 * 36 * 27
    assert count_macs(_LinearPlusProduct(5, 7), torch.randn(1, 5)) == 5 * 7 + 7 * 3


def test_functional_linear_at_top_level() -> None:
    class Functional(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.w = nn.Parameter(torch.randn(9, 4))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return F.linear(x, self.w) + torch.mv(self.w, x[0, 0])[None, None]

    cost = profile(Functional(), torch.randn(1, 3, 4))
    assert cost.macs == 3 * 4 * 9 + 9 * 4
    assert cost.per_module == {"": cost.macs}


# --------------------------------------------------------------------------------------------
# Inputs, model state, errors
# --------------------------------------------------------------------------------------------


class _TokenModel(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(100, 16)
        self.head = nn.Linear(16, 4)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.head(self.embed(input_ids) * attention_mask[..., None])


def test_dict_and_tuple_inputs() -> None:
    model = _TokenModel()
    ids, mask = torch.randint(0, 100, (2, 7)), torch.ones(2, 7)
    expected = 7 * 16 * 4  # the embedding lookup is not counted
    assert count_macs(model, {"input_ids": ids, "attention_mask": mask}) == expected
    assert count_macs(model, (ids, mask)) == expected
    assert count_macs(model, [ids, mask]) == expected


def test_model_left_unmodified_and_flags_restored() -> None:
    model = _small_cnn()
    model.train()
    model[1].eval()  # a mixed train/eval state must survive
    flags = [m.training for m in model.modules()]
    state = {k: v.clone() for k, v in model.state_dict().items()}
    profile(model, torch.randn(4, 3, 16, 16))
    assert [m.training for m in model.modules()] == flags
    for key, value in model.state_dict().items():
        # batch-norm statistics would move in train mode
        assert torch.equal(value, state[key]), key
    for module in model.modules():
        assert not module._forward_hooks and not module._forward_pre_hooks
    assert torch.is_grad_enabled()


def test_unsupported_inputs_name_the_type() -> None:
    with pytest.raises(TypeError, match="ndarray"):
        count_macs(nn.Linear(2, 2), np.zeros((1, 2), dtype=np.float32))
    with pytest.raises(ValueError, match="batch size"):
        count_macs(nn.Identity(), (1, 2))
    with pytest.raises(TypeError, match="str"):
        count_macs("resnet18", torch.randn(1, 3))  # type: ignore[arg-type]


def test_count_params_unique_and_excludes_buffers() -> None:
    class Tied(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed = nn.Embedding(10, 4)
            self.decode = nn.Linear(4, 10, bias=False)
            self.decode.weight = self.embed.weight

    assert count_params(Tied()) == 40
    assert count_params(nn.BatchNorm2d(8)) == 16  # running stats are buffers
    with pytest.raises(ValueError, match="uninitialized"):
        count_params(nn.LazyLinear(3))


def test_model_cost_is_frozen_and_serialisable() -> None:
    cost = profile(nn.Linear(3, 2), torch.randn(1, 3))
    assert cost == ModelCost(macs=6, params=8, per_module={"": 6})
    assert cost.to_dict() == {"macs": 6, "params": 8, "per_module": {"": 6}}
    with pytest.raises(AttributeError):
        cost.macs = 0  # type: ignore[misc]


def test_grouped_mm_is_counted_as_the_loop_over_experts_it_replaces() -> None:
    """transformers runs MoE experts through ``torch._grouped_mm`` by default (which
    ``torch.utils.flop_counter`` does not count); its MACs must equal those of the plain
    per-expert ``F.linear`` loop (``"eager"``) and of the batched kernel on the same
    tokens and routing, and not be missing from the experts module's count."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.MixtralConfig(
        vocab_size=80, hidden_size=32, intermediate_size=24, num_hidden_layers=1,
        num_attention_heads=4, num_key_value_heads=2, num_local_experts=4,
        num_experts_per_tok=2,
    )  # fmt: skip
    model = transformers.MixtralForCausalLM(cfg).eval()
    x = {"input_ids": torch.randint(3, 80, (2, 12))}
    counts = {}
    for impl in ("grouped_mm", "eager", "batched_mm"):
        model.set_experts_implementation(impl)
        counts[impl] = profile(model, x).per_module.get("model.layers.0.mlp.experts")
    # 24 tokens, 2 experts each, per routed token 32·48 (gate and up) + 24·32 (down)
    assert counts == dict.fromkeys(counts, 24 * 2 * (32 * 48 + 24 * 32) // 2)
