"""End-to-end coverage of real architectures: analysis, self-checks, ID compression.

For every model ``spectrim.compress(model, calib, method="id", target="macs=0.7")`` on a
handful of random inputs must run, give a model whose outputs have the original shapes,
reach the MACs target (as measured by the profiler), lower the parameter count and leave
the user's model bit-for-bit unchanged.  Weights are random (no hub access); models whose
compression takes more than ~30 s on 2 CPU cores are marked ``slow``.

The Vision Transformer runs twice: the real ``vit_b_16`` at 224×224 (slow) and a tiny
``VisionTransformer(image_size=32, patch_size=8, num_layers=2, hidden_dim=64)`` that
exercises the same code paths in under a second.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils._pytree import tree_flatten

import spectrim
from spectrim.evaluation import profile
from spectrim.graph import analyze_channels
from spectrim.zoo import CifarResNet

tv = pytest.importorskip("torchvision.models")

slow = pytest.mark.slow


def images(n: int, size: int) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(0))


# name -> (builder, input size, images, minimum number of prunable groups)
CASES: list[Any] = [
    pytest.param("cifar_resnet20_A", lambda: CifarResNet(20), 32, 8, 9),
    pytest.param("cifar_resnet56_A", lambda: CifarResNet(56), 32, 8, 27),
    pytest.param("cifar_resnet20_B", lambda: CifarResNet(20, shortcut="B"), 32, 8, 12),
    pytest.param("resnet18", lambda: tv.resnet18(), 64, 8, 12),
    pytest.param("resnet50", lambda: tv.resnet50(), 64, 8, 37, marks=slow),
    pytest.param("vgg16_bn", lambda: tv.vgg16_bn(), 64, 8, 15, marks=slow),
    pytest.param("mobilenet_v2", lambda: tv.mobilenet_v2(), 64, 8, 25, marks=slow),
    pytest.param("mobilenet_v3_small", lambda: tv.mobilenet_v3_small(), 64, 8, 27),
    pytest.param("efficientnet_b0", lambda: tv.efficientnet_b0(), 64, 8, 40, marks=slow),
    pytest.param("densenet121", lambda: tv.densenet121(), 64, 8, 120),
    pytest.param("shufflenet_v2_x1_0", lambda: tv.shufflenet_v2_x1_0(), 64, 8, 18),
    pytest.param(
        "googlenet",
        lambda: tv.googlenet(aux_logits=False, init_weights=False),
        64,
        8,
        57,
    ),
    pytest.param("regnet_x_400mf", lambda: tv.regnet_x_400mf(), 64, 16, 5),
    # convnext's and vit's MLPs are 4x wide: fewer images leave them fewer rows than
    # channels, so they would be kept whole and macs=0.7 out of reach
    pytest.param("convnext_tiny", lambda: tv.convnext_tiny(), 64, 32, 18, marks=slow),
    pytest.param("vit_b_16", lambda: tv.vit_b_16(), 224, 16, 12, marks=slow),
    pytest.param(
        "vit_tiny",
        lambda: tv.VisionTransformer(
            image_size=32, patch_size=8, num_layers=2, num_heads=2, hidden_dim=64, mlp_dim=128
        ),
        32,
        8,
        2,
    ),
]


def flat_outputs(out: Any) -> list[torch.Tensor]:
    if hasattr(out, "to_tuple"):
        out = out.to_tuple()
    return [t for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor)]


def run(model: nn.Module, batch: Any) -> list[torch.Tensor]:
    with torch.no_grad():
        out = model(**batch) if isinstance(batch, dict) else model(batch)
    return flat_outputs(out)


def check_compression(
    model: nn.Module,
    calib: Any,
    example: Any,
    state_hash: Callable[[nn.Module], str],
    min_prunable: int,
    target: float = 0.7,
) -> tuple[nn.Module, spectrim.CompressionReport]:
    model.eval()
    h = state_hash(model)
    ref = run(model, example)
    small, report = spectrim.compress(model, calib, method="id", target=f"macs={target}")
    # the user's model is unchanged, bit for bit, and still computes the same
    assert state_hash(model) == h
    after = run(model, example)
    assert all(torch.equal(a, b) for a, b in zip(ref, after))
    # the compressed model runs and returns outputs of the original shapes
    out = run(small, example)
    assert [t.shape for t in out] == [t.shape for t in ref]
    assert all(bool(torch.isfinite(t).all()) for t in out if t.is_floating_point())
    # the target is reached, as measured by the profiler on the new model
    assert report.macs_after < report.macs_before
    assert report.params_after < report.params_before
    assert report.macs_after <= target * report.macs_before * (1 + 1e-9)
    assert report.macs_after >= (target - 0.05) * report.macs_before
    assert profile(small, example).macs == report.macs_after
    # the analysis found the structure and the self-checks found nothing to repair (groups
    # kept whole because a few images give fewer rows than channels count as found)
    prunable = [g for g in report.groups if g.pinned is None or "calibration rows" in g.pinned]
    assert len(prunable) >= min_prunable, report.table()
    assert any(g.width_after < g.width_before for g in prunable)
    assert not [w for w in report.warnings if "self-check" in w], report.warnings
    return small, report


@pytest.mark.parametrize("name,build,size,n,min_prunable", CASES)
def test_architecture(
    name: str,
    build: Callable[[], nn.Module],
    size: int,
    n: int,
    min_prunable: int,
    state_hash: Callable[[nn.Module], str],
) -> None:
    torch.manual_seed(0)
    model = build().eval()
    x = images(n, size)
    _, report = check_compression(model, x, x[:2], state_hash, min_prunable)
    # the classifier output is never pruned
    pinned_out = [g for g in report.groups if g.pinned == "reaches the model output"]
    assert pinned_out and all(g.width_after == g.width_before for g in pinned_out)


def test_levit_reshape_as_is_mapped(state_hash: Callable[[nn.Module], str]) -> None:
    """timm's LeViT normalises with ``bn(x.flatten(0, 1)).reshape_as(x)``: mapped exactly
    (the target shape follows ``x``, whose channels are the same), where 13 of its 18
    groups used to be pinned on it; the self-checks confirm the mapping."""
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    model = timm.models.levit.Levit(
        img_size=64, embed_dim=(64, 96), key_dim=16, num_heads=(2, 3), depth=(1, 1),
        attn_ratio=(2.0, 2.0), mlp_ratio=(2.0, 2.0), num_classes=10,
    ).eval()  # fmt: skip
    x = torch.randn(128, 3, 64, 64)
    _, report = check_compression(model, x, x[:2], state_hash, min_prunable=7, target=0.9)
    assert not [g for g in report.groups if "reshape_as" in (g.pinned or "")]


def test_option_a_shortcut_groups_are_pinned_by_pad() -> None:
    """On option-A ResNets the padded streams are pinned, naming F.pad; the inner convs of
    every block are prunable."""
    model = CifarResNet(20).eval()
    a = analyze_channels(model, images(2, 32))
    inner = {f"layer{s}.{b}.conv1" for s in (1, 2, 3) for b in range(3)}
    assert {g.name for g in a.prunable} == inner
    assert "pad" in (a.group("conv1").pinned or "")


# ------------------------------------------------------------------------ MiniLM (HF)


def tokenize(tok: Any, sentences: list[str], length: int = 24) -> dict[str, torch.Tensor]:
    enc = tok(sentences, padding="max_length", truncation=True, max_length=length,
              return_tensors="pt")  # fmt: skip
    return dict(enc)


def embed(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """all-MiniLM-L6-v2 sentence embedding: masked mean pooling, L2-normalised."""
    with torch.no_grad():
        h = model(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).to(h.dtype)
    e = (h * mask).sum(1) / mask.sum(1).clamp_min(1)
    return torch.nn.functional.normalize(e, dim=-1)


def ffn_groups(report: spectrim.CompressionReport) -> list[Any]:
    return [g for g in report.groups if g.name.endswith("intermediate.dense")]


def test_minilm_ffn_neurons_are_prunable(
    minilm: tuple[nn.Module, Any], sts_train_sentences: list[str], state_hash
) -> None:
    model, tok = minilm
    sts_sentences = sts_train_sentences
    a = analyze_channels(model, tokenize(tok, sts_sentences[:2]))
    ffn = [g for g in a.groups if g.name.endswith("intermediate.dense")]
    assert len(ffn) == 6
    for i, g in enumerate(ffn):
        assert g.pinned is None, g
        assert g.width == 1536
        assert g.producers == [f"encoder.layer.{i}.intermediate.dense"]
        assert [c.module for c in g.consumers] == [f"encoder.layer.{i}.output.dense"]
    # 192 sentences: more real (unpadded) tokens than the 1536 FFN neurons
    calib = [tokenize(tok, sts_sentences[i : i + 32]) for i in range(0, 192, 32)]
    assert sum(int(b["attention_mask"].sum()) for b in calib) > 1536
    small, report = check_compression(model, calib, calib[0], state_hash, min_prunable=6)
    for g in ffn_groups(report):
        assert g.width_after < g.width_before
    mods = dict(small.named_modules())
    for i in range(6):
        k = mods[f"encoder.layer.{i}.intermediate.dense"].out_features
        assert mods[f"encoder.layer.{i}.output.dense"].in_features == k < 1536


# spectral's θ-mixed greedy runs all 1536 steps for each of the six FFNs' curves: 35-45 s
@pytest.mark.parametrize("method", ["id", pytest.param("spectral", marks=slow)])
def test_minilm_embeddings_survive_ffn_pruning(
    minilm: tuple[nn.Module, Any],
    sts_train_sentences: list[str],
    sts_sentences: list[str],
    method: str,
) -> None:
    """Keeping ~85% of the FFN MACs (macs=0.9 overall), sentence embeddings of 128
    held-out STS-B sentences stay close to the original ones; the ID correction beats
    magnitude pruning at the same budget; so does ``spectral`` (default θ=0.5).

    Measured (256 sts-train calibration sentences, 24 tokens, 128 sts-test sentences
    scored): FFN MACs kept 0.85, cosine min 0.925 / mean 0.981 for ``id``, min 0.925 /
    mean 0.976 for ``spectral``, min 0.761 / mean 0.898 for ``l1``.
    """
    model, tok = minilm
    # calibrated on sts-train, scored on sts-test sentences
    calib = [tokenize(tok, sts_train_sentences[i : i + 32]) for i in range(0, 256, 32)]
    held = tokenize(tok, sts_sentences[1000:1128])
    ref = embed(model, held)
    small, _ = spectrim.compress(model, calib, method=method, target="macs=0.9")
    # fraction of FFN MACs kept, measured by the profiler
    ex = calib[0]
    before, after = profile(model, ex).per_module, profile(small, ex).per_module
    ffn = [k for k in before if k.endswith(("intermediate.dense", "output.dense"))
           and "attention" not in k]  # fmt: skip
    assert len(ffn) == 12
    kept = sum(after[k] for k in ffn) / sum(before[k] for k in ffn)
    assert 0.80 <= kept <= 0.88, kept
    cos = (ref * embed(small, held)).sum(-1)
    assert float(cos.min()) >= 0.9, float(cos.min())
    assert float(cos.mean()) >= 0.95, float(cos.mean())
    l1, _ = spectrim.compress(model, calib, method="l1", target="macs=0.9")
    cos_l1 = (ref * embed(l1, held)).sum(-1)
    assert float(cos.mean()) > float(cos_l1.mean())


def test_ghostnet_literal_channel_slice_is_mapped(state_hash: Callable[[nn.Module], str]) -> None:
    """timm's GhostNet ends every ghost module with ``torch.cat([x1, x2], 1)[:, :out_chs]``.
    When the slice keeps every channel (``out_chs`` equals the concatenated width, as in
    every ghost module of ghostnet_050) it stays exact after any shrink (``[:, :k]``
    clamps), so the channels pass through (ghostnet_100 at 64×64: 18 of 32 groups
    prunable, where 32 of its 55 groups used to be pinned on the slice and 9 prunable)."""
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    model = timm.create_model("ghostnet_050", num_classes=10).eval()
    x = torch.randn(96, 3, 32, 32)
    _, report = check_compression(model, x, x[:2], state_hash, min_prunable=10, target=0.9)
    assert not [g for g in report.groups if "__getitem__" in (g.pinned or "")]


def test_a_partial_literal_channel_slice_is_mapped_and_pinned() -> None:
    """``x[:, :3]`` of a 4-channel tensor: its channels are followed (the consumer after it
    reads 3 of them) but pinned, since the bound is a literal in the model's code."""

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Conv2d(3, 4, 1)
            self.b = nn.Conv2d(3, 6, 1)
            self.c = nn.Conv2d(3, 6, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.c(self.a(x)[:, :3]) + self.b(x)[:, :6]

    a = analyze_channels(Net().eval(), torch.randn(2, 3, 8, 8))
    by_producer = {g.producers[0]: g for g in a.groups}
    assert "slices the channel axis with literal bounds" in (by_producer["a"].pinned or "")
    assert by_producer["c"].pinned is not None  # reaches the output


def _exact_and_reloads(
    model: nn.Module,
    small: nn.Module,
    report: Any,
    make: Callable[[], nn.Module],
    test: dict[str, torch.Tensor],
    where: Any,
) -> None:
    """``small`` gives ``model``'s logits on ``test`` (to 1e-4) and, saved under ``where``
    and loaded onto ``make()``, its own exactly."""
    from spectrim.io.manifest import load_compressed, save_compressed

    with torch.no_grad():
        want, got = model(**test).logits, small(**test).logits
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    save_compressed(small, where / "m", report)
    back = load_compressed(where / "m", make())
    with torch.no_grad():
        torch.testing.assert_close(back(**test).logits, got)


def test_phi3_fused_gate_up_projection_is_pruned_exactly(tmp_path: Any) -> None:
    """Phi-3's MLP is one ``gate_up_proj`` whose output is ``chunk(2, dim=-1)``-ed into the
    gate and the up halves (then ``up * act(gate)``): neuron ``j`` is rows ``j`` and
    ``F + j`` of one Linear.  ``chunk`` ties the halves position by position, so both keep
    the same neurons and stay equal (once pinned as "splits the channel axis").  Neurons
    whose up rows are zero are dead: removing them is exact, and the l1 score counts
    both rows of a neuron."""
    transformers = pytest.importorskip("transformers")
    from spectrim.graph.attention import find_attention
    from spectrim.methods.magnitude import filter_norms

    def make() -> nn.Module:
        torch.manual_seed(0)
        cfg = transformers.Phi3Config(
            vocab_size=60, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, pad_token_id=0,
        )  # fmt: skip
        return transformers.Phi3ForCausalLM(cfg).eval()

    model = make()
    with torch.no_grad():
        for layer in model.model.layers:  # neurons 24..47: up rows 48 + 24 … 95 zero
            layer.mlp.gate_up_proj.weight[48 + 24 :] = 0
    g = torch.Generator().manual_seed(0)
    batches = [{"input_ids": torch.randint(1, 60, (8, 12), generator=g)} for _ in range(4)]
    analysis = analyze_channels(model, batches[0])
    (ffn,) = [x for x in analysis.groups if x.producers == ["model.layers.0.mlp.gate_up_proj"]]
    assert ffn.pinned is None and ffn.width == 48
    assert ffn.producer_copies["model.layers.0.mlp.gate_up_proj"].tolist() == [
        list(range(48)), list(range(48, 96))
    ]  # fmt: skip
    w = model.model.layers[0].mlp.gate_up_proj.weight.detach().double()
    want = (w[:48].abs().sum(1) + w[48:].abs().sum(1)).numpy()
    np.testing.assert_allclose(filter_norms(ffn, model, 1.0), want)
    small, report = spectrim.compress(model, batches, "id", "width=0.5")
    mlp = small.model.layers[0].mlp
    assert mlp.gate_up_proj.out_features == 48 and mlp.down_proj.in_features == 24
    test = {"input_ids": torch.randint(1, 60, (4, 12), generator=g)}
    _exact_and_reloads(model, small, report, make, test, tmp_path)
    assert [b.heads for b in find_attention(small)] == [4, 4]  # heads are their own plan


def test_apertus_s_xielu_ffn_is_pruned_exactly(tmp_path: Any) -> None:
    """Apertus's FFN is ``down(xIELU(up x))``; xIELU compares ``x > 0`` and takes
    ``torch.min(x, eps)``, which pinned both FFNs ("passes through function 'gt'"; the
    held-out sweep of stop 50).  Neurons whose up rows repeat the others' give the same
    activations, so ``id`` at half width folds them back exactly, and the result reloads."""
    transformers = pytest.importorskip("transformers")

    def make() -> nn.Module:
        torch.manual_seed(0)
        cfg = transformers.ApertusConfig(
            vocab_size=60, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2,
        )  # fmt: skip
        return transformers.ApertusForCausalLM(cfg).eval()

    model = make()
    with torch.no_grad():
        for layer in model.model.layers:
            layer.mlp.up_proj.weight[24:] = layer.mlp.up_proj.weight[:24]
    g = torch.Generator().manual_seed(0)
    batches = [{"input_ids": torch.randint(1, 60, (8, 12), generator=g)} for _ in range(4)]
    small, report = spectrim.compress(model, batches, "id", "width=0.5")
    assert [small.model.layers[i].mlp.down_proj.in_features for i in range(2)] == [24, 24]
    test = {"input_ids": torch.randint(1, 60, (4, 12), generator=g)}
    _exact_and_reloads(model, small, report, make, test, tmp_path)
