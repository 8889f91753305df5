"""The module-type registry: matrices, input rows and round trips, against the modules."""

from __future__ import annotations

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
