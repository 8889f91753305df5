"""Block-by-block sequential corrections (spectrim.calibration.blocks): the same fits as
the whole-model pass, on real models, with the block inputs cached."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import spectrim
from spectrim.calibration.blocks import (
    PREFIX,
    SUFFIX,
    find_chain,
    find_ends,
    plan_blocks,
    suffix_reads_chain_only,
)
from spectrim.graph import analyze_channels


def _max_diff(a: nn.Module, b: nn.Module) -> float:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert sa[k].shape == sb[k].shape, k
    return max(float((sa[k].double() - sb[k].double()).abs().max()) for k in sa if sa[k].numel())


@pytest.mark.parametrize(
    ("select", "fit", "readers"),
    [
        (False, "inputs", False),
        (True, "inputs", False),
        (False, "residual", False),
        (False, "residual", True),
    ],
)
def test_resnet20_blockwise_gives_the_whole_model_passs_weights(
    data_root: Path, select: bool, fit: str, readers: bool
) -> None:
    """The pretrained CIFAR-10 ResNet-20: its nine residual blocks are the chain, every
    pruned group lies inside one, and the fits equal the whole-model pass's (also with
    the kept sets chosen in the pass, ``sequential_select``, with the residual output
    fit, whose original operands come from each block's copy, and with the stream's
    readers refitted, whose original outputs do too)."""
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
        "refit_readers": readers,
    }
    whole, r1 = spectrim.compress(model, batches, "id", "macs=0.5", blockwise=False, **kw)
    block, r2 = spectrim.compress(model, batches, "id", "macs=0.5", blockwise=True, **kw)
    assert not any("blockwise" in w for w in r2.warnings), r2.warnings
    assert not any("interpolation" in w for w in r1.warnings + r2.warnings), r1.warnings
    # nine blocks, and the classifier's own for its reader fit
    assert (r1.blocks, r2.blocks) == (0, 10 if readers else 9)
    assert [g.width_after for g in r1.groups] == [g.width_after for g in r2.groups]
    assert r2.fitted_examples == r1.fitted_examples == 128
    assert _max_diff(whole, block) < 1e-4
    errs1 = {(g.name, c): e for g in r1.groups for c, e in g.consumer_errors.items()}
    errs2 = {(g.name, c): e for g in r2.groups for c, e in g.consumer_errors.items()}
    assert errs1.keys() == errs2.keys() and errs1
    assert all(abs(errs1[k] - errs2[k]) < 1e-4 for k in errs1)
    with torch.no_grad():
        torch.testing.assert_close(block(x[:64]), whole(x[:64]), atol=1e-3, rtol=1e-3)
    if readers:  # every block's first convolution but the first block's (nothing drifted)
        assert r1.readers is not None and r2.readers is not None
        fits1, fits2 = r1.readers["refitted"], r2.readers["refitted"]
        assert (
            sorted(fits1)
            == sorted(fits2)
            == sorted(
                f"layer{s}.{b}.conv1" for s in (1, 2, 3) for b in range(3) if (s, b) != (1, 0)
            )
        )
        assert all(abs(fits1[n][1] - fits2[n][1]) < 1e-5 for n in fits1)
        assert all(after < before for before, after in fits1.values())
        # the classifier, after the chain, too (a block of its own in the block pass):
        # 128 rows for 65 unknowns, left; the whole-model pass also saw the stem's input
        for r in (r1, r2):
            assert "fewer than 8 per unknown" in r.readers["skipped"].pop("linear")
        assert r1.readers["skipped"].pop("conv1") == "its input did not drift"
        assert (
            r1.readers["skipped"]
            == r2.readers["skipped"]
            == {"layer1.0.conv1": "its input did not drift"}
        )


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


def test_groups_across_blocks_span_them_and_outside_the_chain_fall_back() -> None:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 3))
    x = torch.randn(64, 4)
    chain = find_chain(net, x)
    assert chain == ["0", "1", "2", "3", "4"]
    a = analyze_channels(net, x)
    everything = {g.index: None for g in a.prunable}
    plan = plan_blocks(chain, a, everything)
    assert not isinstance(plan, str)
    # each group spans three layers (producer, ReLU, consumer): one block per layer,
    # each group listed in every block it touches
    assert plan.blocks == [["0"], ["1"], ["2"], ["3"], ["4"]]
    assert sum(len(g) for g in plan.groups) > len(everything)
    assert plan.member(2)("2") and not plan.member(2)("0")
    # a group chosen in the pass must lie in one block: its span merges
    merged = plan_blocks(chain, a, everything, whole=everything)
    assert not isinstance(merged, str) and merged.blocks == [chain]
    # a chain that leaves the first Linear outside: its group reaches outside
    why = plan_blocks(chain[1:], a, everything)
    assert isinstance(why, str) and "'0'" in why
    # compress: five blocks, each slicing and fitting its share, the same fits
    whole, _ = spectrim.compress(net, [x], "id", "width=0.5", blockwise=False)
    block, rep = spectrim.compress(net, [x], "id", "width=0.5", blockwise=True)
    assert not any("blockwise" in w for w in rep.warnings), rep.warnings
    assert rep.blocks == 5
    assert _max_diff(whole, block) < 1e-5
    for fit in ("inputs", "residual"):  # with the pass's own selection: one block
        kw: dict[str, Any] = {"sequential_select": True, "sequential_fit": fit}
        w2, _ = spectrim.compress(net, [x], "id", "width=0.5", blockwise=False, **kw)
        b2, r2 = spectrim.compress(net, [x], "id", "width=0.5", blockwise=True, **kw)
        assert r2.blocks == 1 and _max_diff(w2, b2) < 1e-5
        assert _max_diff(block, b2) > 1e-4  # the selection did choose other channels

    _, rep = spectrim.compress(_Flat(4, 16, 3).eval(), [x], "id", "width=0.5", blockwise=True)
    assert any("no chain of blocks" in w for w in rep.warnings), rep.warnings
    assert rep.blocks == 0
    # the default falls back silently: it was not asked for
    _, rep = spectrim.compress(
        _Flat(4, 16, 3).eval(), [x], "id", "width=0.5", sequential_fit="residual"
    )
    assert rep.blocks == 0 and not any("blockwise" in w for w in rep.warnings), rep.warnings


class _Flat(nn.Module):
    """Two linears called by ``forward`` (no ModuleList / Sequential): no chain."""

    def __init__(self, n_in: int, hidden: int, n_out: int) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(n_in, hidden), nn.Linear(hidden, n_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(torch.relu(self.a(x)))


class _Block(nn.Module):
    """A residual block of two 3×3 convolutions, with a 1×1 projection when it widens."""

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout)
        self.conv2, self.bn2 = nn.Conv2d(cout, cout, 3, padding=1), nn.BatchNorm2d(cout)
        self.proj = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x)))))
        return torch.relu(y + self.proj(x))


class _StemNet(nn.Module):
    """A stem, a chain of residual blocks and a classifier: the streams' unit groups reach
    the stem (before the chain) and the classifier (after it)."""

    def __init__(self) -> None:
        super().__init__()
        self.stem, self.bn = nn.Conv2d(3, 12, 3, padding=1), nn.BatchNorm2d(12)
        self.blocks = nn.Sequential(_Block(12, 12), _Block(12, 24), _Block(24, 24))
        self.fc = nn.Linear(24, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.blocks(torch.relu(self.bn(self.stem(x))))
        return self.fc(x.mean((2, 3)))


class _BranchNet(nn.Module):
    """An Inception-like model: the chain is one branch, and the modules after it also
    read the stem's output (the other branch), not only the chain's."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 12, 3, padding=1)
        self.branch = nn.Sequential(nn.Conv2d(12, 16, 3, padding=1), nn.Conv2d(16, 8, 3, padding=1))
        self.side = nn.Conv2d(12, 8, 3, padding=1)
        self.head = nn.Conv2d(16, 10, 3, padding=1)
        self.fc = nn.Linear(10, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.stem(x))
        y = torch.cat([self.branch(x), self.side(x)], 1)
        return self.fc(torch.relu(self.head(y)).mean((2, 3)))


class _StemIntoChain(nn.Module):
    """A stem whose group's consumer is the chain's first module itself (not a module
    inside it): the lock-step parks each batch at that module's pre-hooks."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 12, 3, padding=1)
        self.body = nn.Sequential(
            nn.Conv2d(12, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 8, 3, padding=1)
        )
        self.fc = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.body(torch.relu(self.stem(x))).mean((2, 3)))


def test_the_prefix_stops_in_its_own_batch_when_the_chain_starts_with_a_consumer() -> None:
    """With ``sequential_select`` the stem's group merges the prefix into the chain's
    block, and its consumer is the chain's first module: every batch parks there before
    the prefix's stop hook runs.  Each batch's stop hook must stop that batch only (the
    lock-step runs them in greenlets), or a batch running on would be stopped by another's
    hook; the weights are the whole-model pass's."""
    torch.manual_seed(0)
    net = _StemIntoChain().eval()
    batches = list(torch.randn(64, 3, 8, 8).split(16))
    chain = find_chain(net, batches[0])
    assert chain == ["body.0", "body.1", "body.2"]
    assert find_ends(net, batches[0], chain) == (["stem"], ["fc"])
    kw: dict[str, Any] = {"sequential_fraction": 1.0, "sequential_select": True}
    whole, _ = spectrim.compress(net, batches, "id", "width=0.5", blockwise=False, **kw)
    block, rep = spectrim.compress(net, batches, "id", "width=0.5", blockwise=True, **kw)
    assert rep.blocks >= 1 and not any("blockwise" in w for w in rep.warnings), rep.warnings
    assert _max_diff(whole, block) < 1e-5


@pytest.mark.parametrize("fit", ["inputs", "residual"])
def test_a_suffix_that_reads_the_prefix_leaves_the_whole_model_pass(fit: str) -> None:
    """Where the modules after the chain read what the modules before it computed (not
    only the chain's output), the original side of the suffix cannot run on a pruned
    prefix: a plan that prunes both ends leaves the whole-model pass in charge (silently
    by default, with a warning that says why for ``blockwise=True``).  The
    stem-and-classifier model's suffix reads the chain alone."""
    torch.manual_seed(0)
    net = _BranchNet().eval()
    x = torch.randn(64, 3, 8, 8)
    batches = list(x.split(32))
    chain = find_chain(net, batches[0])
    assert chain == ["branch.0", "branch.1"]
    prefix, suffix = find_ends(net, batches[0], chain)
    assert prefix == ["stem"] and suffix == ["side", "head", "fc"]
    assert not suffix_reads_chain_only(net, batches[0], chain)
    assert not suffix_reads_chain_only(net, batches[0][:1], chain)  # one example: noise
    same = batches[0][:1].expand(4, -1, -1, -1).contiguous()  # identical examples: noise
    assert not suffix_reads_chain_only(net, same, chain)
    a = analyze_channels(net, batches[0])
    plan = plan_blocks(chain, a, {g.index: None for g in a.prunable}, prefix, suffix)
    assert not isinstance(plan, str) and plan.blocks[0] == [PREFIX] and plan.blocks[-1] == [SUFFIX]
    kw: dict[str, Any] = {"sequential_fraction": 1.0, "sequential_fit": fit}
    whole, _ = spectrim.compress(net, batches, "id", "width=0.5", blockwise=False, **kw)
    block, rep = spectrim.compress(net, batches, "id", "width=0.5", blockwise=True, **kw)
    assert rep.blocks == 0
    assert any("blockwise" in w and "read what the modules before" in w for w in rep.warnings)
    _, quiet = spectrim.compress(net, batches, "id", "width=0.5", **kw)
    assert quiet.blocks == 0 and not any("blockwise" in w for w in quiet.warnings)
    assert _max_diff(whole, block) == 0.0
    stem_net = _StemNet().eval()
    assert suffix_reads_chain_only(stem_net, batches[0], find_chain(stem_net, batches[0]))


@pytest.mark.parametrize("fit", ["inputs", "residual"])
def test_groups_reaching_the_stem_and_the_classifier_run_block_by_block(fit: str) -> None:
    """The stem's group and the last stream's (read by the classifier) put the model's
    prefix and suffix into the blocks: no fallback, and the whole-model pass's weights."""
    torch.manual_seed(0)
    net = _StemNet()
    with torch.no_grad():  # BatchNorm statistics that are not the identity
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 2.0)
    net.eval()
    x = torch.randn(96, 3, 8, 8)
    batches = list(x.split(32))
    chain = find_chain(net, batches[0])
    assert chain == ["blocks.0", "blocks.1", "blocks.2"]
    prefix, suffix = find_ends(net, batches[0], chain)
    assert prefix == ["stem", "bn"] and suffix == ["fc"]
    a = analyze_channels(net, batches[0])
    everything = {g.index: None for g in a.prunable}
    assert isinstance(plan_blocks(chain, a, everything), str)  # without the ends: outside
    plan = plan_blocks(chain, a, everything, prefix, suffix)
    assert not isinstance(plan, str)
    assert plan.blocks[0][0] == PREFIX and plan.blocks[-1][-1] == SUFFIX
    kw: dict[str, Any] = {"sequential_fraction": 1.0, "sequential_fit": fit}
    whole, r1 = spectrim.compress(net, batches, "id", "width=0.5", blockwise=False, **kw)
    block, r2 = spectrim.compress(net, batches, "id", "width=0.5", blockwise=True, **kw)
    # the default runs the residual fit block by block, the interpolation whole
    _, r3 = spectrim.compress(net, batches, "id", "width=0.5", **kw)
    assert r3.blocks == (r2.blocks if fit == "residual" else 0)
    assert not any("blockwise" in w for w in r2.warnings), r2.warnings
    assert r2.blocks >= 1 and r1.blocks == 0
    narrowed = {g.name for g in r2.groups if g.width_after < g.width_before}
    assert {"stem", "blocks.1.conv2"} <= narrowed, narrowed  # the two streams
    assert _max_diff(whole, block) < 1e-5
    with torch.no_grad():
        torch.testing.assert_close(block(x), whole(x), atol=1e-5, rtol=1e-5)
    # the fits are real: the prefix's and the suffix's consumers were refitted
    with torch.no_grad():
        plain, _ = spectrim.compress(net, batches, "id", "width=0.5", sequential=False)
        assert _max_diff(plain, block) > 1e-3


def test_torchvision_resnet_runs_one_residual_block_at_a_time() -> None:
    """A torchvision ResNet-18: its stem (``conv1``, ``bn1``) produces the first stage's
    stream, so it runs as a block of its own, and each stage's stream group spans the
    stage's residual blocks without merging them; the residual fit block by block (the
    default) gives the whole-model pass's weights; a ``blockwise`` that is not a bool or
    ``None`` is refused by name."""
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    net = torchvision.models.resnet18().eval()
    x = torch.randn(48, 3, 64, 64)
    batches = list(x.split(16))
    chain = find_chain(net, batches[0])
    assert chain[0] == "layer1.0" and chain[-1] == "layer4.1"
    assert find_ends(net, batches[0], chain) == (
        ["conv1", "bn1", "relu", "maxpool"],
        ["avgpool", "fc"],
    )
    kw: dict[str, Any] = {"sequential_fraction": 1.0, "sequential_fit": "residual"}
    whole, r1 = spectrim.compress(net, batches, "id", "macs=0.6", blockwise=False, **kw)
    block, r2 = spectrim.compress(net, batches, "id", "macs=0.6", **kw)
    assert r1.blocks == 0 and r2.blocks == len(chain) + 1  # the stem, then one per module
    # the report's table says how the corrections were fitted
    assert "corrections: the residual fit on 48 examples, whole model" in r1.table()
    assert f"residual fit on 48 examples, block by block ({r2.blocks} blocks)" in r2.table()
    assert not any("blockwise" in w for w in r2.warnings), r2.warnings
    narrowed = {g.name for g in r2.groups if g.width_after < g.width_before}
    # the stem's group (the first stage's stream, read by both of its blocks and the
    # next stage's first) and a later stage's stream were pruned and fitted
    assert {"conv1", "layer2.0.conv2"} <= narrowed, narrowed
    assert _max_diff(whole, block) < 1e-5
    with pytest.raises(ValueError, match="blockwise='yes'"):
        spectrim.compress(net, batches, "id", "macs=0.6", blockwise="yes")


def test_block_boundaries_on_disk_give_the_same_model(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``block_cache``: a torchvision ResNet-18 (stem, stream groups spanning blocks, the
    residual fit's side passes) compressed with every block boundary in files gives the
    in-memory block pass's weights bit for bit; only the current block's files live at a
    time, and nothing is left in the folder."""
    torchvision = pytest.importorskip("torchvision")
    from spectrim.calibration.spill import Spill

    torch.manual_seed(0)
    net = torchvision.models.resnet18().eval()
    batches = list(torch.randn(48, 3, 64, 64).split(16))
    kw: dict[str, Any] = {"sequential_fraction": 1.0, "sequential_fit": "residual"}
    mem, r1 = spectrim.compress(net, batches, "id", "macs=0.6", **kw)
    live: list[int] = []
    put = Spill.put

    def counting(self: Spill, x: Any) -> Any:
        h = put(self, x)
        live.append(len(self))
        return h

    monkeypatch.setattr(Spill, "put", counting)
    disk, r2 = spectrim.compress(net, batches, "id", "macs=0.6", block_cache=tmp_path, **kw)
    assert r1.blocks == r2.blocks == 9 and r2.warnings == r1.warnings
    assert _max_diff(mem, disk) == 0.0
    # every batch's boundary went to disk at every block: the chain's input, then each
    # block's original and compressed outputs
    assert len(live) >= len(batches) * (1 + 2 * r2.blocks) - len(batches)
    # live at once: per batch, the block's input and output on both sides, the original
    # operands of its (at most two) consumers' residual additions and its (at most
    # three) consumers' stored original inputs; the rest was deleted when its block was
    # done
    assert 0 < max(live) <= 9 * len(batches) < len(live) // 3
    assert list(tmp_path.iterdir()) == []


def _padded_bert(layers: int) -> tuple[nn.Module, list[dict[str, torch.Tensor]]]:
    """A seeded small BERT of ``layers`` layers and 4 batches of 16 padded sequences."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.BertConfig(
        vocab_size=100, hidden_size=64, num_hidden_layers=layers, num_attention_heads=4,
        intermediate_size=256, max_position_embeddings=32,
    )  # fmt: skip
    model = transformers.BertModel(cfg).eval()
    ids = torch.randint(1, 100, (64, 12), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[::3, 7:] = 0
    batches = [{"input_ids": i, "attention_mask": m} for i, m in zip(ids.split(16), mask.split(16))]
    return model, batches


def test_block_cache_with_padded_text_and_without_a_chain(tmp_path: Path) -> None:
    """A small BERT fed padded text (dict batches stay in memory, hidden states go to
    disk) gives the in-memory pass's weights; a model with no chain of blocks falls back
    to the whole-model pass with a warning naming ``block_cache``; ``blockwise=False``
    with a cache is refused, and a path object is kept as text."""
    model, batches = _padded_bert(2)
    kw: dict[str, Any] = {"sequential_fraction": 0.5}
    mem, r1 = spectrim.compress(model, batches, "id", "width=0.5", blockwise=True, **kw)
    disk, r2 = spectrim.compress(model, batches, "id", "width=0.5", block_cache=tmp_path, **kw)
    assert r1.blocks == r2.blocks == 2
    assert _max_diff(mem, disk) == 0.0 and list(tmp_path.iterdir()) == []

    x = list(torch.randn(128, 8).split(32))
    _, r3 = spectrim.compress(_Flat(8, 32, 4).eval(), x, "id", "width=0.5", block_cache=tmp_path)
    assert r3.blocks == 0
    assert any(w.startswith("block_cache: ") and "whole-model pass" in w for w in r3.warnings)
    with pytest.raises(ValueError, match=r"block_cache.*blockwise=False"):
        spectrim.CompressConfig(block_cache=str(tmp_path), blockwise=False)
    assert spectrim.CompressConfig(block_cache=tmp_path).block_cache == str(tmp_path)  # type: ignore[arg-type]


def _live_grams(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """After each Gram accumulator is made, how many are alive (``GramAccumulator``
    patched to count)."""
    import weakref

    from spectrim.calibration.gram import GramAccumulator

    alive: weakref.WeakSet[Any] = weakref.WeakSet()
    counts: list[int] = []
    init = GramAccumulator.__init__

    def counting(self: Any, *args: Any, **kwargs: Any) -> None:
        init(self, *args, **kwargs)
        alive.add(self)
        counts.append(len(alive))

    monkeypatch.setattr(GramAccumulator, "__init__", counting)
    return counts


@pytest.mark.parametrize("method", ["id", "spectral"])
def test_block_statistics_give_the_same_model_one_block_at_a_time(
    method: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``block_statistics``: a torchvision ResNet-18 (its stem in a block before the
    chain, stream groups spanning blocks, the residual fit) gives the weights, widths and
    report of the whole-model statistics bit for bit, in memory and with the boundaries
    in files, while holding far fewer Grams at once."""
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    net = torchvision.models.resnet18().eval()
    batches = list(torch.randn(48, 3, 64, 64).split(16))
    kw: dict[str, Any] = {"sequential_fit": "residual", "sequential_fraction": 0.5}
    whole_live = _live_grams(monkeypatch)
    whole, r1 = spectrim.compress(net, batches, method, "macs=0.6", **kw)
    monkeypatch.undo()
    block_live = _live_grams(monkeypatch)
    block, r2 = spectrim.compress(net, batches, method, "macs=0.6", block_statistics=True, **kw)
    monkeypatch.undo()
    disk, r3 = spectrim.compress(
        net, batches, method, "macs=0.6", block_statistics=True, block_cache=tmp_path, **kw
    )
    assert _max_diff(whole, block) == 0.0 and _max_diff(block, disk) == 0.0
    assert r1.blocks == r2.blocks == 9 and r1.fitted_examples == r2.fitted_examples
    assert r1.warnings == r2.warnings == r3.warnings  # the pins too, in group order
    assert [(g.name, g.width_after) for g in r1.groups] == [
        (g.name, g.width_after) for g in r2.groups
    ]
    assert [g.predicted_error for g in r1.groups] == [g.predicted_error for g in r2.groups]
    # the whole-model pass holds every (group, consumer) Gram at its end (20 here); the
    # block statistics one block's, and a stage's stream group's until its last block (5)
    assert max(block_live) <= max(whole_live) // 3
    assert list(tmp_path.iterdir()) == []
    if method == "id":  # the widest groups from sketches, each begun per batch as before
        kw["stats_memory"] = "6MiB"
        whole, r1 = spectrim.compress(net, batches, method, "macs=0.6", **kw)
        block, r2 = spectrim.compress(net, batches, method, "macs=0.6", block_statistics=True, **kw)
        rows = [g.sketch_rows for g in r1.groups]
        assert any(rows) and rows == [g.sketch_rows for g in r2.groups]
        assert _max_diff(whole, block) == 0.0


def test_block_statistics_on_padded_text_and_their_refusals(tmp_path: Path) -> None:
    """A small BERT fed padded text (the masks reach each block's statistics): the same
    weights as the whole-model statistics, also with a ``dof`` target (the spectral
    solvers' degrees of freedom after their Grams are gone); no chain falls back to the
    calibration pass with a warning naming ``block_statistics``; ``blockwise=False`` or
    ``sequential=False`` with it are refused."""
    model, batches = _padded_bert(3)
    for method, target in [("id", "width=0.5"), ("spectral", "dof=0.001")]:
        a, r1 = spectrim.compress(model, batches, method, target, blockwise=True)
        b, r2 = spectrim.compress(
            model, batches, method, target, block_statistics=True, block_cache=tmp_path
        )
        assert r1.blocks == r2.blocks == 3 and r1.fitted_examples == r2.fitted_examples
        assert _max_diff(a, b) == 0.0 and r1.warnings == r2.warnings
        assert [g.width_after for g in r1.groups] == [g.width_after for g in r2.groups]
    assert list(tmp_path.iterdir()) == []

    x = list(torch.randn(128, 8).split(32))
    _, r3 = spectrim.compress(_Flat(8, 32, 4).eval(), x, "id", "width=0.5", block_statistics=True)
    assert r3.blocks == 0
    assert any(w.startswith("block_statistics: ") for w in r3.warnings)
    with pytest.raises(ValueError, match=r"block_statistics.*blockwise=False"):
        spectrim.CompressConfig(block_statistics=True, blockwise=False)
    with pytest.raises(ValueError, match=r"block_statistics.*sequential=True"):
        spectrim.CompressConfig(block_statistics=True, sequential=False)


def test_a_hugging_face_cache_is_dropped_from_a_blocks_arguments() -> None:
    """A block run twice would append to a key/value cache: caches (by class, every
    kind transformers has) become None and ``use_cache`` False; other values stay."""
    cache_utils = pytest.importorskip("transformers.cache_utils")
    from spectrim.calibration.blocks import _scrub

    class NotACache:  # a name that ends in Cache is no longer enough
        def update(self) -> None: ...

    NotACache.__name__ = "MyCache"
    kept = NotACache()
    args = {"past_key_values": cache_utils.DynamicCache(), "use_cache": True, "x": kept}
    assert _scrub(args) == {"past_key_values": None, "use_cache": False, "x": kept}
