"""Consumer fits in output space (``sequential_fit="outputs"/"residual"``), against brute
force: the unfolding, the residual partners, and the refitted weights of whole models."""

from __future__ import annotations

import copy
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import spectrim
from spectrim.calibration import collect
from spectrim.calibration.outputs import (
    consumer_rows,
    output_rows,
    residual_partners,
    rows_of,
    set_unfolded_weight,
    supports_output_fit,
)
from spectrim.calibration.sequential import sequential_correct
from spectrim.config import CompressConfig
from spectrim.evaluation import evaluate
from spectrim.graph import analyze_channels


@pytest.mark.parametrize(
    ("module", "shape"),
    [
        (nn.Linear(6, 4), (5, 6)),
        (nn.Linear(6, 4), (2, 3, 6)),
        (nn.Conv1d(3, 4, 3, stride=2, padding=1, dilation=2), (2, 3, 11)),
        (nn.Conv2d(3, 5, 3, padding=1), (2, 3, 6, 7)),
        (nn.Conv2d(3, 5, (3, 1), stride=(2, 1), padding=(1, 0), bias=False), (2, 3, 6, 5)),
    ],
)
def test_unfolded_rows_times_the_weight_are_the_outputs(module: nn.Module, shape: Any) -> None:
    torch.manual_seed(0)
    x = torch.randn(*shape)
    w = module.weight.reshape(module.weight.shape[0], -1)
    y = consumer_rows(module, x) @ w.T
    if module.bias is not None:
        y = y + module.bias
    torch.testing.assert_close(y, output_rows(module, module(x)), rtol=1e-5, atol=1e-5)


@settings(max_examples=30, deadline=None)
@given(
    dims=st.sampled_from([1, 2]),
    kernel=st.integers(1, 4),
    stride=st.integers(1, 3),
    padding=st.integers(0, 2),
    dilation=st.integers(1, 2),
    bias=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_unfolding_matches_any_convolution(
    dims: int, kernel: int, stride: int, padding: int, dilation: int, bias: bool, seed: int
) -> None:
    """The unfolded rows times the flattened weight are the convolution's outputs, for any
    kernel, stride, padding and dilation of a 1-D or 2-D convolution."""
    torch.manual_seed(seed)
    conv_t = nn.Conv1d if dims == 1 else nn.Conv2d
    conv = conv_t(3, 4, kernel, stride=stride, padding=padding, dilation=dilation, bias=bias)
    size = dilation * (kernel - 1) + 1 + torch.randint(0, 5, ()).item()
    x = torch.randn(2, 3, *([size] * dims), dtype=torch.float64)
    conv = conv.double()
    rows = consumer_rows(conv, x)
    assert rows_of(conv, x) == rows.shape[0]
    y = rows @ conv.weight.reshape(4, -1).T
    if bias:
        y = y + conv.bias
    torch.testing.assert_close(y, output_rows(conv, conv(x)))


def test_unsupported_consumers_are_refused() -> None:
    assert supports_output_fit(nn.Conv2d(4, 4, 3))
    assert not supports_output_fit(nn.Conv2d(4, 4, 3, groups=2))
    assert not supports_output_fit(nn.Conv2d(4, 4, 3, padding="same"))
    assert not supports_output_fit(nn.Conv2d(4, 4, 3, padding=1, padding_mode="reflect"))
    assert not supports_output_fit(nn.ConvTranspose2d(4, 4, 3))
    with pytest.raises(TypeError, match="ConvTranspose2d"):
        consumer_rows(nn.ConvTranspose2d(4, 4, 3), torch.randn(1, 4, 5, 5))


def test_set_unfolded_weight_round_trips_and_checks_the_shape() -> None:
    conv = nn.Conv2d(3, 2, 3)
    w = np.arange(2 * 28, dtype=np.float64).reshape(2, 28)
    set_unfolded_weight(conv, w)
    assert torch.equal(conv.weight.reshape(2, -1).double(), torch.as_tensor(w[:, :27]))
    assert torch.equal(conv.bias.double(), torch.as_tensor(w[:, 27]))
    with pytest.raises(ValueError, match="shape"):
        set_unfolded_weight(conv, w[:, :27])


def test_set_unfolded_weight_never_writes_into_the_tensors_the_module_held() -> None:
    """A failed ``inplace=True`` run is undone by putting the module's old tensors back,
    so a fit must leave them as they were (it wrote into the bias once)."""
    conv = nn.Conv2d(3, 2, 3).to(memory_format=torch.channels_last)
    weight, bias = conv.weight.data, conv.bias.data
    old_w, old_b = weight.clone(), bias.clone()
    set_unfolded_weight(conv, np.ones((2, 28)))
    assert torch.equal(weight, old_w) and torch.equal(bias, old_b)
    assert bool((conv.weight == 1).all()) and bool((conv.bias == 1).all())
    assert conv.weight.is_contiguous(memory_format=torch.channels_last)  # the layout kept


class _Block(nn.Module):
    """conv → BN → dropout → (+ x) → ReLU, and a second consumer whose output is
    rectified before any addition."""

    def __init__(self, add: str = "iadd") -> None:
        super().__init__()
        self.conv, self.bn, self.drop = (
            nn.Conv2d(4, 4, 3, padding=1),
            nn.BatchNorm2d(4),
            nn.Dropout(),
        )
        self.side = nn.Conv2d(4, 4, 1)
        self.add = add
        self.calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.drop(self.bn(self.conv(x)))
        if self.add == "iadd":
            y += x
        else:
            y = torch.add(x, y)
        self.calls += 1
        return F.relu(y) + F.relu(self.side(y)) * 0


@pytest.mark.parametrize("add", ["iadd", "torch.add"])
def test_residual_partner_is_the_other_operand_with_the_bn_scale(add: str) -> None:
    torch.manual_seed(0)
    block = _Block(add)
    block.bn.running_var.uniform_(0.5, 2.0)
    block.bn.weight.data.uniform_(0.5, 2.0)
    block.eval()
    xs = [torch.randn(2, 4, 5, 5), torch.randn(3, 4, 5, 5)]
    found = residual_partners({"conv": block.conv, "side": block.side}, xs, block)
    assert set(found) == {"conv"}  # 'side' is rectified before it is added
    bn = block.bn
    scale = (bn.weight / torch.sqrt(bn.running_var + bn.eps)).double()
    for x, p in zip(xs, found["conv"]):
        assert torch.equal(p.other, x)
        assert p.scale is not None
        torch.testing.assert_close(p.scale, scale)
    assert block.calls == 2
    first = residual_partners({"conv": block.conv}, xs, block, first=True)
    assert len(first["conv"]) == 2 and block.calls == 2  # stopped at the addition


def test_no_partner_in_training_mode_batch_norm() -> None:
    block = _Block().train()
    assert residual_partners({"conv": block.conv}, [torch.randn(2, 4, 5, 5)], block) == {}


# ----------------------------------------------------------------- whole models


class _ResNet(nn.Module):
    """A stem and two residual blocks (the first conv2 with a bias), as in a CIFAR ResNet."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.stem, self.bn0 = nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)
        self.blocks = nn.ModuleList()
        for bias in (True, False):
            b = nn.Module()
            b.conv1, b.bn1 = nn.Conv2d(8, 12, 3, padding=1, bias=False), nn.BatchNorm2d(12)
            b.conv2, b.bn2 = nn.Conv2d(12, 8, 3, padding=1, bias=bias), nn.BatchNorm2d(8)
            self.blocks.append(b)
        self.head = nn.Linear(8, 5)
        for m in self.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.data.uniform_(0.5, 1.5)
                m.bias.data.uniform_(-0.3, 0.3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn0(self.stem(x)))
        for b in self.blocks:
            h = F.relu(b.bn1(b.conv1(x)))
            x = F.relu(b.bn2(b.conv2(h)) + x)
        return self.head(x.mean((2, 3)))


def _inputs(model: nn.Module, module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    got: list[torch.Tensor] = []
    h = module.register_forward_pre_hook(lambda m, a: got.append(a[0].detach()))
    with torch.no_grad():
        model(x)
    h.remove()
    return got[0]


def _lstsq(a: torch.Tensor, y: torch.Tensor, bias: bool) -> torch.Tensor:
    a = a.double()
    if bias:
        a = torch.cat([a, a.new_ones(a.shape[0], 1)], 1)
    return torch.linalg.lstsq(a, y.double()).solution.T  # (out, cols)


@pytest.mark.parametrize(
    ("fit", "select"), [("outputs", False), ("residual", False), ("residual", True)]
)
def test_block_consumers_equal_brute_force_least_squares(fit: str, select: bool) -> None:
    """Each block's ``conv2`` equals least squares on brute-force activations of the final
    model (with ``select``, on the channels chosen in the pass)."""
    model = _ResNet().eval()
    x = torch.randn(24, 3, 8, 8)
    batches = [x[:8], x[8:16], x[16:]]
    a = analyze_channels(model, x[:2])
    inner = [g for g in a.prunable if g.name.endswith("conv1")]
    assert len(inner) == 2
    col = collect(model, a, batches, inner, store_fraction=1.0)
    keep = {g.index: np.array([0, 2, 3, 5, 7, 8, 11]) for g in inner}
    work = copy.deepcopy(model)
    _, errors, kept = sequential_correct(
        work,
        a,
        batches,
        keep,
        col,
        fit=fit,
        original=copy.deepcopy(model),
        reselect=[g.index for g in inner] if select else (),
    )
    if select:  # other channels than asked, at the same width
        assert any(not np.array_equal(kept[g.index], keep[g.index]) for g in inner)
    for i, (b_o, b_c) in enumerate(zip(model.blocks, work.blocks)):
        assert b_c.conv2.in_channels == 7
        z_c = _inputs(work, b_c.conv2, x)
        with torch.no_grad():
            y = output_rows(b_o.conv2, b_o.conv2(_inputs(model, b_o.conv2, x))).double()
        if fit == "residual":  # the block input is the other operand (identity shortcut)
            r, r_c = _inputs(model, b_o.conv1, x), _inputs(work, b_c.conv1, x)
            bn = b_c.bn2
            s = (bn.weight / torch.sqrt(bn.running_var + bn.eps)).detach().double()
            y = y + output_rows(b_o.conv2, (r - r_c).double()) / s
            if i == 1:  # the first block's errors reach the second's input
                assert not torch.allclose(r, r_c, atol=1e-4)
        ref = _lstsq(consumer_rows(b_c.conv2, z_c), y, bias=b_c.conv2.bias is not None)
        got = b_c.conv2.weight.detach().reshape(8, -1).double()
        if b_c.conv2.bias is not None:
            got = torch.cat([got, b_c.conv2.bias.detach().double()[:, None]], 1)
        torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-5)
        rows = torch.cat([consumer_rows(b_c.conv2, z_c).double(), torch.ones(len(y), 1)], 1)
        res = (y - rows[:, : got.shape[1]] @ got.T).norm() / y.norm()
        (gi,) = [g.index for g in inner if g.name == f"blocks.{i}.conv1"]
        assert errors[(gi, f"blocks.{i}.conv2")] == pytest.approx(float(res), rel=1e-3, abs=1e-6)


def test_too_few_rows_keep_the_interpolation_with_a_warning() -> None:
    """Two 8×8 images give 128 rows for 64 unknowns per output (7 channels × 9 taps + the
    bias): the output fit would follow the rows, so both blocks keep the interpolation,
    exactly, and say so."""
    model = _ResNet().eval()
    x = torch.randn(2, 3, 8, 8)
    a = analyze_channels(model, x)
    inner = [g for g in a.prunable if g.name.endswith("conv1")]
    col = collect(model, a, [x], inner, store_fraction=1.0)
    keep = {g.index: np.array([0, 2, 3, 5, 7, 8, 11]) for g in inner}
    plain, refit = copy.deepcopy(model), copy.deepcopy(model)
    sequential_correct(plain, a, [x], keep, col)
    lines: list[str] = []
    folds, _, _ = sequential_correct(
        refit, a, [x], keep, col, fit="residual", original=model, warn=lines.append
    )
    assert len(lines) == 2 and "'blocks.0.conv2'" in lines[0] and "128 calibration rows" in lines[0]
    assert all(f"blocks.{i}.conv2" in folds[g.index] for i, g in enumerate(inner))
    for p, q in zip(plain.parameters(), refit.parameters()):
        torch.testing.assert_close(p, q)


def _block_sum(model: nn.Module, blk: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The sum ``bn2(conv2(h)) + x`` of residual block ``blk`` (before its ReLU)."""
    got: dict[str, torch.Tensor] = {}
    h1 = blk.bn2.register_forward_hook(lambda m, a, o: got.__setitem__("y", o))
    h2 = blk.conv1.register_forward_pre_hook(lambda m, a: got.__setitem__("r", a[0]))
    with torch.no_grad():
        model(x)
    h1.remove(), h2.remove()
    return got["y"] + got["r"]


def test_residual_fit_brings_the_sum_closer_than_the_output_fit() -> None:
    """What the residual fit is for: the block outputs (the sums) of the compressed model
    are closer to the original's than with the output fit alone (on the fitted rows,
    where least squares guarantees it block by block)."""
    model = _ResNet().eval()
    x = torch.randn(32, 3, 8, 8)
    a = analyze_channels(model, x[:2])
    inner = [g for g in a.prunable if g.name.endswith("conv1")]
    col = collect(model, a, [x], inner, store_fraction=1.0)
    keep = {g.index: np.arange(0, 12, 3) for g in inner}
    target = _block_sum(model, model.blocks[1], x)
    err = {}
    for fit in ("outputs", "residual"):
        work = copy.deepcopy(model)
        sequential_correct(work, a, [x], keep, col, fit=fit, original=copy.deepcopy(model))
        got = _block_sum(work, work.blocks[1], x)
        err[fit] = float((got - target).norm() / target.norm())
    assert err["residual"] < err["outputs"]


class _PostLN(nn.Module):
    """A post-LayerNorm FFN block on token embeddings (BERT's layout), twice."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.emb = nn.Embedding(40, 16)
        self.layers = nn.ModuleList()
        for _ in range(2):
            blk = nn.Module()
            blk.up, blk.down = nn.Linear(16, 32), nn.Linear(32, 16)
            blk.drop, blk.norm = nn.Dropout(0.1), nn.LayerNorm(16)
            self.layers.append(blk)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        h = self.emb(input_ids)
        for blk in self.layers:
            h = blk.norm(blk.drop(blk.down(F.gelu(blk.up(h)))) + h)
        return h


def test_padded_text_residual_fit_ignores_padding() -> None:
    """Padded dict batches give the same residual fits as one sentence per batch, and
    those equal brute-force least squares on the real tokens."""
    model = _PostLN().eval()
    g = torch.Generator().manual_seed(1)
    lengths = [5, 9, 3, 7, 6, 8] * 5  # 190 real tokens: 11 per unknown of a down projection
    sents = [torch.randint(0, 40, (n,), generator=g) for n in lengths]

    def batch(items: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        t = max(len(s) for s in items)
        ids = torch.zeros(len(items), t, dtype=torch.long)
        mask = torch.zeros(len(items), t, dtype=torch.long)
        for i, s in enumerate(items):
            ids[i, : len(s)], mask[i, : len(s)] = s, 1
        return {"input_ids": ids, "attention_mask": mask}

    padded = [batch(sents[:13]), batch(sents[13:])]
    single = [batch([s]) for s in sents]
    cfg = {"target": "width=0.5", "sequential_fraction": 1.0, "sequential_fit": "residual"}
    a, _ = spectrim.compress(model, padded, **cfg)
    b, _ = spectrim.compress(model, single, **cfg)
    for la, lb in zip(a.layers, b.layers):
        torch.testing.assert_close(la.down.weight, lb.down.weight, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(la.down.bias, lb.down.bias, rtol=1e-4, atol=1e-5)
    # brute force on the real tokens of the second layer
    ids = torch.cat(sents)[None]
    mask = torch.ones_like(ids)

    def grab(m: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
        blk = m.layers[1]
        got: dict[str, torch.Tensor] = {}
        h1 = blk.down.register_forward_pre_hook(lambda mod, x: got.__setitem__("z", x[0][0]))
        h2 = blk.up.register_forward_pre_hook(lambda mod, x: got.__setitem__("r", x[0][0]))
        with torch.no_grad():
            m(input_ids=ids, attention_mask=mask)
        h1.remove(), h2.remove()
        return got["z"], got["r"]

    z_o, r_o = grab(model)
    z_c, r_c = grab(a)
    with torch.no_grad():
        y = model.layers[1].down(z_o).double() + (r_o - r_c).double()
    ref = _lstsq(z_c, y, bias=True)
    got = torch.cat([a.layers[1].down.weight, a.layers[1].down.bias[:, None]], 1).double()
    torch.testing.assert_close(got.detach(), ref, rtol=1e-3, atol=1e-4)


def test_config_and_entry_point_validate_the_fit() -> None:
    with pytest.raises(ValueError, match="sequential_fit='kernel' must be one of"):
        CompressConfig(sequential_fit="kernel")
    assert CompressConfig.from_dict(
        CompressConfig(sequential_fit="outputs").to_dict()
    ).sequential_fit == ("outputs")
    model = _ResNet().eval()
    x = torch.randn(4, 3, 8, 8)
    a = analyze_channels(model, x[:2])
    col = collect(model, a, [x], a.prunable, store_fraction=1.0)
    with pytest.raises(ValueError, match="original model"):
        sequential_correct(model, a, [x], {}, col, fit="residual")
    with pytest.raises(ValueError, match="partners"):
        sequential_correct(model, a, [x], {}, col, fit="residual", original=model, runner=model)
    with pytest.raises(ValueError, match="resolve 'auto'"):
        sequential_correct(model, a, [x], {}, col, fit="auto")


@pytest.mark.parametrize("kind", ["conv", "mlp"])
def test_auto_runs_the_residual_fit_on_convolutions_and_the_interpolation_else(
    kind: str,
) -> None:
    """The default fit is ``"auto"``: the residual output fit where a pruned group feeds a
    convolution with taps, the interpolation where only ``Linear`` layers read it; the
    report names the fit that ran, and the weights are that fit's."""
    torch.manual_seed(0)
    if kind == "conv":
        model: nn.Module = _ResNet().eval()
        x = torch.randn(32, 3, 8, 8)
    else:
        model = nn.Sequential(nn.Linear(6, 24), nn.ReLU(), nn.Linear(24, 3)).eval()
        x = torch.randn(256, 6)
    expect = "residual" if kind == "conv" else "inputs"
    small, rep = spectrim.compress(model, x, target="width=0.5", sequential_fraction=1.0)
    assert CompressConfig().sequential_fit == "auto" and rep.config["sequential_fit"] == "auto"
    assert rep.sequential_fit == expect
    states = {}
    for fit in ("inputs", "residual"):
        other, _ = spectrim.compress(
            model, x, target="width=0.5", sequential_fraction=1.0, sequential_fit=fit
        )
        states[fit] = other.state_dict()
    mine = small.state_dict()
    assert all(torch.equal(mine[k], v) for k, v in states[expect].items())
    if kind == "conv":  # the two fits differ here, so the equality above says which ran
        assert not all(torch.equal(mine[k], v) for k, v in states["inputs"].items())
    _, one_shot = spectrim.compress(model, x, target="width=0.5", sequential=False)
    assert one_shot.sequential_fit == ""


def test_residual_fit_beats_the_interpolation_on_pretrained_resnet20() -> None:
    from spectrim.zoo import load_dataset, load_pretrained

    model = load_pretrained("resnet20-cifar10")
    calib = load_dataset("cifar10", "calib", limit=256).tensors[0]
    test = load_dataset("cifar10", "eval", limit=300)
    res = {}
    for fit in ("inputs", "residual"):
        small, rep = spectrim.compress(model, calib, target="macs=0.5", sequential_fit=fit)
        res[fit] = (evaluate(small, test, reference=model), rep)
    assert res["inputs"][1].widths == res["residual"][1].widths  # same allocation
    e_in, e_res = res["inputs"][0], res["residual"][0]
    assert e_in.fidelity is not None and e_res.fidelity is not None
    assert e_res.fidelity["rel_l2"] < e_in.fidelity["rel_l2"]
    assert e_res.agreement is not None and e_in.agreement is not None
    assert e_res.agreement > e_in.agreement
