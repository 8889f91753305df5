"""The module-type registry: matrices, input rows and round trips, against the modules."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from spectrim.graph.modules import WeightKind, register_weight_kind, weight_kind, weight_modules


@pytest.mark.parametrize(
    "module, shape",
    [
        (nn.Linear(6, 4), (3, 5, 6)),
        (nn.Conv2d(3, 5, 3, padding=1), (2, 3, 7, 6)),
        (nn.Conv2d(3, 5, (3, 2), stride=2, dilation=(1, 2), padding=(1, 0)), (2, 3, 9, 8)),
        (nn.Conv2d(3, 5, 3, padding="same"), (2, 3, 6, 6)),
        (nn.Conv1d(4, 6, 3, padding=2, stride=2), (2, 4, 11)),
    ],
)
def test_input_rows_times_matrix_is_the_output(module: nn.Module, shape: tuple[int, ...]) -> None:
    kind = weight_kind(module)
    assert kind is not None
    x = torch.randn(*shape, dtype=torch.float64)
    module = module.double()
    rows = kind.input_rows(module, x)
    y = module(x) - (
        module.bias.reshape(-1, *[1] * (x.dim() - 2))
        if x.dim() > 2 and not isinstance(module, nn.Linear)
        else module.bias
    )
    out = rows @ kind.matrix(module).T
    if isinstance(module, nn.Linear):
        want = y.reshape(-1, y.shape[-1])
    else:
        want = y.movedim(1, -1).reshape(-1, y.shape[1])
    torch.testing.assert_close(out, want)


def test_set_matrix_round_trip_and_grouped_conv_has_no_rows() -> None:
    conv = nn.Conv2d(4, 8, 3)
    kind = weight_kind(conv)
    assert kind is not None
    m = torch.randn(8, 36)
    kind.set_matrix(conv, m)
    torch.testing.assert_close(conv.weight.flatten(1), m)
    dw = nn.Conv2d(4, 4, 3, groups=4)
    assert weight_kind(dw).input_rows(dw, torch.randn(1, 4, 5, 5)) is None  # type: ignore[union-attr]
    assert weight_kind(nn.BatchNorm2d(3)) is None


def test_hf_conv1d_is_a_transposed_linear() -> None:
    pytest.importorskip("transformers")
    from transformers.pytorch_utils import Conv1D

    layer = Conv1D(5, 3)  # nf=5 outputs, nx=3 inputs; weight (3, 5)
    kind = weight_kind(layer)
    assert kind is not None and kind.name == "hf-conv1d"
    x = torch.randn(2, 4, 3)
    out = kind.input_rows(layer, x) @ kind.matrix(layer).T + layer.bias
    torch.testing.assert_close(out, layer(x).reshape(-1, 5))
    kind.set_matrix(layer, torch.zeros(5, 3))
    assert not layer.weight.any()


def test_registering_a_new_type_is_one_call() -> None:
    class Scaled(nn.Linear):
        pass

    assert weight_kind(Scaled(2, 2)).name == "linear"  # type: ignore[union-attr]

    class MyLayer(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.weight = nn.Parameter(torch.randn(3, 2))

    net = nn.Sequential(MyLayer(), nn.Linear(2, 2))
    assert [n for n, _, _ in weight_modules(net)] == ["1"]
    register_weight_kind(
        MyLayer,
        WeightKind("mine", lambda m: m.weight.t(), lambda m, v: None, lambda m, x: x, ()),
    )
    assert [n for n, _, _ in weight_modules(net)] == ["0", "1"]
    assert F.relu(torch.zeros(1)).item() == 0.0


class _TLinear(nn.Module):
    """A linear layer that stores its weight transposed, ``(in, out)``, as HF Conv1D."""

    def __init__(self, nx: int, nf: int) -> None:
        super().__init__()
        self.nx, self.nf = nx, nf
        self.weight = nn.Parameter(torch.randn(nx, nf) / nx**0.5)
        self.bias = nn.Parameter(torch.randn(nf) * 0.1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.weight + self.bias


def _register_tlinear() -> None:
    from spectrim.graph.modules import linear_channels, slice_outputs

    def set_t(m: nn.Module, v: torch.Tensor) -> None:
        with torch.no_grad():
            m.weight.copy_(v.t())

    register_weight_kind(
        _TLinear,
        WeightKind(
            "tlinear",
            lambda m: m.weight.t(),
            set_t,
            lambda m, x: x.reshape(-1, x.shape[-1]),
            ("nx", "nf"),
            slice_outputs("nf", dim=1),
            "nx",
            channels=linear_channels("nf"),
            weight_dims=(1, 0),
            input_axis=-1,
        ),
    )


@pytest.mark.parametrize("method", ["id", "spectral", "l1"])
def test_a_type_registered_once_is_channel_pruned_like_its_builtin_twin(method: str) -> None:
    """One registration (no other file) makes a new layer type prunable end to end: trace,
    channel analysis, statistics, selection, folds, surgery and the self-checks give the
    same model as the same weights in ``nn.Linear``."""
    import spectrim

    _register_tlinear()
    torch.manual_seed(0)
    mine = nn.Sequential(_TLinear(6, 24), nn.ReLU(), _TLinear(24, 3)).eval()
    twin = nn.Sequential(nn.Linear(6, 24), nn.ReLU(), nn.Linear(24, 3)).eval()
    with torch.no_grad():
        for a, b in ((mine[0], twin[0]), (mine[2], twin[2])):
            b.weight.copy_(a.weight.t())
            b.bias.copy_(a.bias)
    x = torch.randn(400, 6)
    small, report = spectrim.compress(mine, x, method=method, target="width=0.5")
    ref, _ = spectrim.compress(twin, x, method=method, target="width=0.5")
    assert small[0].nf == ref[0].out_features == 12 and small[2].nx == 12
    assert small[0].weight.shape == (6, 12) and small[2].weight.shape == (12, 3)
    torch.testing.assert_close(small(x), ref(x), rtol=1e-4, atol=1e-5)
    assert report.macs_after < report.macs_before


def test_gpt2_ffn_is_channel_pruned_through_hf_conv1d() -> None:
    """GPT-2's Conv1D layers (an addmm with transposed weights) were opaque before the
    registry knew them: its FFN widths now shrink and the model still generates."""
    transformers = pytest.importorskip("transformers")
    import spectrim

    torch.manual_seed(0)
    cfg = transformers.GPT2Config(
        n_layer=2, n_embd=32, n_head=4, n_positions=32, vocab_size=100, bos_token_id=0,
        eos_token_id=0,
    )  # fmt: skip
    model = transformers.GPT2LMHeadModel(cfg).eval()
    ids = torch.randint(0, 100, (48, 12))
    batches = [{"input_ids": ids[i : i + 16]} for i in range(0, 48, 16)]
    small, report = spectrim.compress(model, batches, method="id", target="macs=0.85")
    ffn = {g.name: g for g in report.groups if g.name.endswith("mlp.c_fc")}
    assert len(ffn) == 2 and all(g.width_after < g.width_before for g in ffn.values())
    assert report.macs_ratio < 0.9
    fc = small.transformer.h[0].mlp.c_fc
    assert fc.weight.shape == (32, fc.nf) and small.transformer.h[0].mlp.c_proj.nx == fc.nf
    with torch.no_grad():
        a, b = model(input_ids=ids[:4]).logits, small(input_ids=ids[:4]).logits
    assert float((a - b).norm() / a.norm()) < 0.2
    assert small.generate(ids[:1, :4], max_new_tokens=3, do_sample=False).shape == (1, 7)


def _ws_net() -> nn.Module:
    """Both of timm's weight-standardised convolutions, a bias, a stride and a group."""
    std_conv = pytest.importorskip("timm.layers.std_conv")
    torch.manual_seed(0)
    net = nn.Sequential(
        std_conv.ScaledStdConv2d(3, 16, 3, padding=1, bias=True, gain_init=0.7),
        nn.ReLU(),
        std_conv.StdConv2d(16, 24, 3, stride=2, padding=1, bias=False),
        nn.ReLU(),
        std_conv.ScaledStdConv2d(24, 24, 3, padding=1, groups=24),  # depthwise
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(24, 5),
    )
    with torch.no_grad():  # gains away from their init: each channel scaled differently
        for m in net.modules():
            if isinstance(getattr(m, "gain", None), torch.Tensor):
                m.gain.uniform_(0.5, 1.5)
    return net.eval()


def test_weight_standardised_convs_become_plain_with_the_same_bits() -> None:
    """``make_plain`` stores the weight a StdConv2d/ScaledStdConv2d computes in forward:
    the model's outputs are unchanged to the bit, and each conv is a plain Conv2d."""
    from spectrim.graph.modules import StandardisedConv2d, make_plain, module_kind

    net = _ws_net()
    x = torch.randn(4, 3, 12, 12)
    with torch.no_grad():
        ref = net(x)
    assert module_kind(net[0]).plain is not None and weight_kind(net[0]) is None
    assert make_plain(net) == ["0", "2", "4"]
    assert all(type(net[i]) is StandardisedConv2d for i in (0, 2, 4))
    assert net[4].groups == 24 and net[2].bias is None and net[2].stride == (2, 2)
    assert not hasattr(net[0], "gain")
    with torch.no_grad():
        assert torch.equal(net(x), ref)
    rebuilt = StandardisedConv2d(**net[2].spectrim_kwargs())  # what a manifest records
    assert rebuilt.weight.shape == net[2].weight.shape and rebuilt.stride == net[2].stride


def test_nf_resnet_is_channel_pruned_through_its_standardised_convs(tmp_path: Path) -> None:
    """Found by a held-out sweep (stop 49): timm's NF-ResNets standardise their conv
    weights in forward, so every group failed the shrink self-check and nothing was
    pruned.  Made plain first, they compress; the user's model keeps its own types; the
    saved result reloads into a fresh model; sparsity of the stored weights is real."""
    timm = pytest.importorskip("timm")
    import spectrim
    from spectrim.graph.modules import StandardisedConv2d
    from spectrim.io import load_compressed, save_compressed

    def make() -> nn.Module:
        torch.manual_seed(0)
        return timm.create_model("nf_resnet26", num_classes=10).eval()

    model = make()
    before = {n: type(m) for n, m in model.named_modules()}
    x = torch.randn(64, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    small, report = spectrim.compress(model, x, "id", "macs=0.7")
    assert report.macs_ratio < 0.72  # all 22 groups were pinned before: 1.0
    assert sum(1 for g in report.groups if g.pinned is None) >= 12
    assert any("weight-standardised" in w and "(29 in all)" in w for w in report.warnings)
    assert {n: type(m) for n, m in model.named_modules()} == before  # untouched
    assert type(small.stem.conv) is StandardisedConv2d
    save_compressed(small, tmp_path / "m", report)
    back = load_compressed(tmp_path / "m", make())
    with torch.no_grad():
        assert torch.equal(back(x[:4]), small(x[:4]))
    net = _ws_net()
    sparse, _ = spectrim.compress(net, torch.randn(128, 3, 8, 8), "magnitude", "sparsity=0.5")
    w = sparse[2].weight  # zeros of the weight the conv computes with, not of a raw one
    assert type(sparse[2]) is StandardisedConv2d
    assert abs(float((w == 0).float().mean()) - 0.5) < 0.02


_PARAMETRIZED = {
    "weight_norm": lambda m: nn.utils.parametrizations.weight_norm(m),
    "spectral_norm": lambda m: nn.utils.parametrizations.spectral_norm(m),
    "orthogonal": lambda m: nn.utils.parametrizations.orthogonal(m),
    "weight_norm hook": lambda m: nn.utils.weight_norm(m),
    "spectral_norm hook": lambda m: nn.utils.spectral_norm(m),
}


@pytest.mark.filterwarnings("ignore:.*weight_norm.* is deprecated:FutureWarning")
@pytest.mark.parametrize("how", list(_PARAMETRIZED))
def test_parametrized_weights_are_stored_and_pruned_and_the_users_model_kept(
    how: str, tmp_path: Path
) -> None:
    """A weight computed by a parametrization (or the older hooks) made the surgery
    crash (weight_norm: ``KeyError: attribute 'weight' already exists``) or pinned every
    group.  The copy now stores the computed weight and is pruned; the user's model keeps
    its parametrizations, its state and its outputs, and can be compressed again; the
    result reloads into a fresh parametrized model."""
    import spectrim
    from spectrim.io import load_compressed, save_compressed

    torch.manual_seed(0)
    wrap = _PARAMETRIZED[how]
    net = nn.Sequential(
        wrap(nn.Linear(16, 64)), nn.ReLU(), wrap(nn.Linear(64, 64)), nn.ReLU(), nn.Linear(64, 4)
    ).train()
    x = torch.randn(512, 16, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = net.eval()(x[:16])
    net.train()
    state = {k: v.clone() for k, v in net.state_dict().items()}
    types = [type(m) for m in net]
    whole, report = spectrim.compress(net, x, "id", "width=1.0")
    assert [type(m) for m in whole] == [nn.Linear, nn.ReLU, nn.Linear, nn.ReLU, nn.Linear]
    assert any("stored as computed" in w for w in report.warnings)
    with torch.no_grad():
        torch.testing.assert_close(whole(x[:16]), ref, rtol=1e-6, atol=1e-6)
    small, report = spectrim.compress(net, x, "id", "width=0.5")
    assert [g.pinned for g in report.groups[:2]] == [None, None]
    assert small[0].out_features == 32 and small[2].out_features == 32
    assert [type(m) for m in net] == types and net.training
    assert all(torch.equal(v, state[k]) for k, v in net.state_dict().items())
    with torch.no_grad():
        assert torch.equal(net.eval()(x[:16]), ref)
    save_compressed(small, tmp_path / "m", report)
    fresh = nn.Sequential(
        wrap(nn.Linear(16, 64)), nn.ReLU(), wrap(nn.Linear(64, 64)), nn.ReLU(), nn.Linear(64, 4)
    )
    back = load_compressed(tmp_path / "m", fresh)
    assert [type(m) for m in back] == [type(m) for m in small]
    with torch.no_grad():
        assert torch.equal(back(x[:16]), small.eval()(x[:16]))


@pytest.mark.filterwarnings("ignore:.*weight_norm.* is deprecated:FutureWarning")
def test_a_failed_inplace_run_puts_swapped_modules_back(monkeypatch: pytest.MonkeyPatch) -> None:
    """``inplace=True`` changes the user's model before surgery (plain convs swapped in,
    a parametrized Linear turned back into a Linear, a weight-norm hook removed); a run
    that fails afterwards restores the original modules, classes and hooks."""
    import spectrim
    import spectrim.api

    net = _ws_net()
    net[8] = nn.utils.parametrizations.weight_norm(net[8])
    net.append(nn.utils.weight_norm(nn.Linear(5, 3)))
    originals, classes = list(net), [type(m) for m in net]
    hooks = dict(net[9]._forward_pre_hooks)
    x = torch.randn(64, 3, 8, 8)
    with torch.no_grad():
        ref = net(x[:4])

    def fail(*args: object, **kwargs: object) -> None:
        raise RuntimeError("a failure after the swap")

    monkeypatch.setattr(spectrim.api, "_run_stage", fail)
    with pytest.raises(RuntimeError, match="after the swap"):
        spectrim.compress(net, x, "id", "width=0.5", inplace=True)
    assert all(a is b for a, b in zip(net, originals, strict=True))
    assert [type(m) for m in net] == classes and dict(net[9]._forward_pre_hooks) == hooks
    with torch.no_grad():
        assert torch.equal(net(x[:4]), ref)


def test_timm_conv2d_same_rows_are_the_patches_of_its_padded_input() -> None:
    """timm's ``Conv2dSame`` pads by the input's size in forward (its ``padding`` is 0):
    read as a plain conv, its Gram rows missed the border patches (32 rows for 50
    outputs here), so the statistics of what it computes were wrong.  Its rows now
    reproduce its output, and weight sparsification gives it the same model as the
    equivalent static-padded ``Conv2d``."""
    conv2d_same = pytest.importorskip("timm.layers.conv2d_same")
    import spectrim

    torch.manual_seed(0)
    conv = conv2d_same.Conv2dSame(16, 8, 3, stride=2, bias=False)
    x = torch.randn(2, 16, 9, 9)
    kind = weight_kind(conv)
    assert kind is not None and kind.name == "conv2d-same"
    rows = kind.input_rows(conv, x)
    assert rows is not None and rows.shape == (2 * 5 * 5, 16 * 9)
    with torch.no_grad():
        out = conv(x).permute(0, 2, 3, 1).reshape(-1, 8)
        torch.testing.assert_close(rows @ kind.matrix(conv).T, out, rtol=1e-5, atol=1e-5)
    same = nn.Sequential(
        nn.Conv2d(3, 32, 3, padding=1), nn.ReLU(), conv2d_same.Conv2dSame(32, 8, 3, stride=2),
        nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4),
    ).eval()  # fmt: skip
    static = nn.Sequential(
        nn.Conv2d(3, 32, 3, padding=1), nn.ReLU(), nn.Conv2d(32, 8, 3, stride=2, padding=1),
        nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4),
    ).eval()  # fmt: skip
    static.load_state_dict(same.state_dict())  # on 9² inputs both pad one pixel each side
    xs = torch.randn(256, 3, 9, 9)
    a, _ = spectrim.compress(same, xs, "obs", "sparsity=0.5")
    b, _ = spectrim.compress(static, xs, "obs", "sparsity=0.5")
    assert torch.equal(a[2].weight, b[2].weight)


def test_same_padding_standardised_convs_become_plain_and_read_their_padded_rows() -> None:
    """The DeepMind NFNets' ``ScaledStdConv2dSame`` (weight standardisation and
    TensorFlow "same" padding, both in forward) becomes a ``StandardisedConv2dSame`` with
    the same bits; its Gram rows are the patches of its padded input; plain
    ``StandardisedConv2d`` keeps Conv2d's output fits, a conv that pads first does not."""
    std_conv = pytest.importorskip("timm.layers.std_conv")
    from spectrim.calibration.outputs import supports_output_fit
    from spectrim.graph.modules import (
        StandardisedConv2d,
        StandardisedConv2dSame,
        make_plain,
        pad_same,
    )

    torch.manual_seed(0)
    net = nn.Sequential(std_conv.ScaledStdConv2dSame(16, 8, 3, stride=2)).eval()
    with torch.no_grad():
        net[0].gain.uniform_(0.5, 1.5)
    x = torch.randn(2, 16, 10, 10)
    with torch.no_grad():
        ref = net(x)
    assert make_plain(net) == ["0"] and type(net[0]) is StandardisedConv2dSame
    with torch.no_grad():
        out = net(x)
    assert torch.equal(out, ref) and out.shape == (2, 8, 5, 5)
    kind = weight_kind(net[0])
    assert kind is not None
    rows = kind.input_rows(net[0], x)
    assert rows is not None and rows.shape == (50, 144)
    flat = out.permute(0, 2, 3, 1).reshape(-1, 8) - net[0].bias
    torch.testing.assert_close(rows @ kind.matrix(net[0]).T, flat, rtol=1e-5, atol=1e-5)
    back = StandardisedConv2dSame(**net[0].spectrim_kwargs())
    back.load_state_dict(net[0].state_dict())
    with torch.no_grad():
        assert torch.equal(back(x), out)
    # timm's pad_same and spectrim's agree, odd and even sizes, strides 1 and 2
    padding = pytest.importorskip("timm.layers.padding")
    for size, stride in ((9, 2), (10, 2), (7, 1)):
        y = torch.randn(1, 2, size, size + 1)
        a = pad_same(y, (3, 5), (stride, stride), (1, 2))
        assert torch.equal(a, padding.pad_same(y, (3, 5), (stride, stride), (1, 2)))
    assert supports_output_fit(StandardisedConv2d(3, 4, 3))
    assert not supports_output_fit(StandardisedConv2dSame(3, 4, 3))


def test_a_renamed_subclass_of_a_same_padding_standardised_conv_keeps_its_padding() -> None:
    """Whether a standardised conv pads "same" in forward is decided by the timm class it
    was registered as, not by its own name ending in "Same": a user's subclass named
    otherwise was made a conv without the padding before (a smaller output)."""
    std_conv = pytest.importorskip("timm.layers.std_conv")
    from spectrim.graph.modules import StandardisedConv2dSame, make_plain

    class Mine(std_conv.ScaledStdConv2dSame):  # type: ignore[misc, name-defined]
        pass

    torch.manual_seed(0)
    net = nn.Sequential(Mine(4, 6, 3, stride=2)).eval()
    x = torch.randn(2, 4, 9, 9)
    with torch.no_grad():
        ref = net(x)
    assert make_plain(net) == ["0"] and type(net[0]) is StandardisedConv2dSame
    with torch.no_grad():
        assert torch.equal(net(x), ref)
