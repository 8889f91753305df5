"""Block-by-block sequential corrections (spectrim.calibration.blocks): the same fits as
the whole-model pass, on real models, with the block inputs cached."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import spectrim
from spectrim.calibration.blocks import find_chain, plan_blocks
from spectrim.graph import analyze_channels


def _max_diff(a: nn.Module, b: nn.Module) -> float:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert sa[k].shape == sb[k].shape, k
    return max(float((sa[k].double() - sb[k].double()).abs().max()) for k in sa if sa[k].numel())


@pytest.mark.parametrize(
    ("select", "fit"), [(False, "inputs"), (True, "inputs"), (False, "residual")]
)
def test_resnet20_blockwise_gives_the_whole_model_passs_weights(
    data_root: Path, select: bool, fit: str
) -> None:
    """The pretrained CIFAR-10 ResNet-20: its nine residual blocks are the chain, every
    pruned group lies inside one, and the fits equal the whole-model pass's (also with
    the kept sets chosen in the pass, ``sequential_select``, and with the residual
    output fit, whose original operands come from each block's copy)."""
    from spectrim.zoo import load_dataset, load_pretrained

    model = load_pretrained("resnet20-cifar10").eval()
    x, _ = load_dataset("cifar10", "calib", limit=256).tensors
    batches = list(x.split(32))
    assert find_chain(model, batches[0][:2]) == [
        f"layer{s}.{b}" for s in (1, 2, 3) for b in range(3)
    ]
    kw: dict[str, Any] = {
        "sequential_fraction": 0.5,
        "sequential_select": select,
        "sequential_fit": fit,
    }
    whole, r1 = spectrim.compress(model, batches, "id", "macs=0.5", **kw)
    block, r2 = spectrim.compress(model, batches, "id", "macs=0.5", blockwise=True, **kw)
    assert not any("blockwise" in w for w in r2.warnings), r2.warnings
    assert not any("interpolation" in w for w in r1.warnings + r2.warnings), r1.warnings
    assert (r1.blocks, r2.blocks) == (0, 9)
    assert [g.width_after for g in r1.groups] == [g.width_after for g in r2.groups]
    assert r2.fitted_examples == r1.fitted_examples == 128
    assert _max_diff(whole, block) < 1e-4
    errs1 = {(g.name, c): e for g in r1.groups for c, e in g.consumer_errors.items()}
    errs2 = {(g.name, c): e for g in r2.groups for c, e in g.consumer_errors.items()}
    assert errs1.keys() == errs2.keys() and errs1
    assert all(abs(errs1[k] - errs2[k]) < 1e-4 for k in errs1)
    with torch.no_grad():
        torch.testing.assert_close(block(x[:64]), whole(x[:64]), atol=1e-3, rtol=1e-3)


@pytest.mark.parametrize(
    ("family", "fit"), [("bert", "inputs"), ("gpt2", "inputs"), ("bert", "residual")]
)
def test_transformer_layers_blockwise(family: str, fit: str) -> None:
    """A small BERT on padded text, and a GPT-2 whose layers get a key/value cache: each
    layer a block (its FFN group inside it), padding kept out of the fits as in the
    whole-model pass, the mask and cache handed to every layer as the model does."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1, 100, (96, 12), generator=g)
    if family == "bert":
        cfg: Any = transformers.BertConfig(
            vocab_size=100, hidden_size=64, num_hidden_layers=3, num_attention_heads=4,
            intermediate_size=256, max_position_embeddings=32,
        )  # fmt: skip
        model = transformers.BertModel(cfg).eval()
        mask = torch.ones_like(ids)
        mask[::3, 7:] = 0
        batches = [
            {"input_ids": i, "attention_mask": m} for i, m in zip(ids.split(16), mask.split(16))
        ]
    else:
        cfg = transformers.GPT2Config(
            n_layer=3, n_embd=64, n_head=4, vocab_size=100, n_positions=32
        )
        model = transformers.GPT2LMHeadModel(cfg).eval()
        batches = [{"input_ids": i} for i in ids.split(16)]
    # the residual fit needs 8 rows per unknown: all sentences, a quarter of each FFN
    kw: dict[str, Any] = {
        "sequential_fraction": 1.0 if fit == "residual" else 0.5,
        "sequential_fit": fit,
    }
    target = "width=0.25" if fit == "residual" else "width=0.5"
    whole, r1 = spectrim.compress(model, batches, "id", target, **kw)
    block, rep = spectrim.compress(model, batches, "id", target, blockwise=True, **kw)
    assert not any("interpolation" in w for w in r1.warnings + rep.warnings), r1.warnings
    assert not any("blockwise" in w for w in rep.warnings), rep.warnings
    assert rep.blocks == 3 and rep.fitted_examples == r1.fitted_examples > 0
    assert _max_diff(whole, block) < 1e-4
    with torch.no_grad():
        a, b = whole(**batches[0])[0], block(**batches[0])[0]
    torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


def test_groups_across_blocks_merge_them_and_outside_the_chain_fall_back() -> None:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 3))
    x = torch.randn(64, 4)
    chain = find_chain(net, x)
    assert chain == ["0", "1", "2", "3", "4"]
    a = analyze_channels(net, x)
    plan = plan_blocks(chain, a, {g.index: None for g in a.prunable})
    assert not isinstance(plan, str)
    assert plan.blocks == [["0", "1", "2", "3", "4"]]  # each group spans two layers
    # a chain that leaves the first Linear outside: its group reaches outside
    why = plan_blocks(chain[1:], a, {g.index: None for g in a.prunable})
    assert isinstance(why, str) and "'0'" in why
    # compress: one block of five layers is still the chain's pass, the same fits
    whole, _ = spectrim.compress(net, [x], "id", "width=0.5")
    block, rep = spectrim.compress(net, [x], "id", "width=0.5", blockwise=True)
    assert not any("blockwise" in w for w in rep.warnings), rep.warnings
    assert rep.blocks == 1
    assert _max_diff(whole, block) < 1e-5

    class Flat(nn.Module):  # no ModuleList / Sequential: no chain
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.Linear(4, 16), nn.Linear(16, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.b(torch.relu(self.a(x)))

    _, rep = spectrim.compress(Flat().eval(), [x], "id", "width=0.5", blockwise=True)
    assert any("no chain of blocks" in w for w in rep.warnings), rep.warnings
    assert rep.blocks == 0
