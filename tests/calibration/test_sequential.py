"""Sequential calibration: corrections reconstruct the ORIGINAL activations from the
compressed prefix (cross-covariance least squares), checked against brute force."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn

import spectrim
from spectrim.calibration import collect
from spectrim.calibration.sequential import sequential_correct
from spectrim.evaluation import evaluate
from spectrim.graph import analyze_channels
from spectrim.linalg import id_factorize


def _chain() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 12, 3, padding=1),
        nn.BatchNorm2d(12),
        nn.ReLU(),
        nn.Conv2d(12, 10, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(10, 4, 3, padding=1),
    ).eval()


def _input_of(model: nn.Module, layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    got: list[torch.Tensor] = []
    h = layer.register_forward_pre_hook(lambda m, a: got.append(a[0].detach()))
    with torch.no_grad():
        model(x)
    h.remove()
    return got[0]


def _keep_half(col, a) -> dict[int, np.ndarray]:  # type: ignore[no-untyped-def]
    keep = {}
    for g in a.prunable:
        fac = id_factorize(sum(acc.gram_numpy() for k, acc in col.stats.items() if k[0] == g.index))
        keep[g.index] = np.sort(fac.selected(g.width // 2))
    return keep


def test_second_consumer_fits_original_from_compressed_prefix() -> None:
    model = _chain()
    x = torch.randn(16, 3, 8, 8)
    a = analyze_channels(model, x[:2])
    groups = a.prunable
    assert [g.name for g in groups] == ["0", "3"]
    col = collect(model, a, [x[:8], x[8:]], groups, store_fraction=1.0)
    keep = _keep_half(col, a)
    work = copy.deepcopy(model)
    folds, errors, _ = sequential_correct(work, a, [x[:8], x[8:]], keep, col)

    # brute force for the second group (consumer '5'): its inputs in the compressed
    # model, restricted to the kept channels, must reconstruct the original inputs
    g2 = groups[1]
    z_orig = _input_of(model, model[5], x).permute(0, 2, 3, 1).reshape(-1, 10).double()
    z_comp = _input_of(work, work[5], x)  # already sliced to the kept channels
    # rebuild the compressed prefix input exactly: run the compressed model up to '5'
    z_comp = z_comp.permute(0, 2, 3, 1).reshape(-1, len(keep[g2.index])).double()
    b_ref = torch.linalg.lstsq(z_comp, z_orig).solution.T.numpy()  # (m, k)
    np.testing.assert_allclose(folds[g2.index]["5"], b_ref, rtol=1e-4, atol=1e-6)
    # and the reported error is the relative residual of that fit
    res = (z_orig - z_comp @ torch.as_tensor(b_ref).T).norm() / z_orig.norm()
    assert errors[(g2.index, "5")] == pytest.approx(float(res), rel=1e-3, abs=1e-6)
    # the compressed prefix really differs from the original (otherwise trivial)
    z_naive = z_orig[:, torch.as_tensor(keep[g2.index])]
    assert not torch.allclose(z_naive, z_comp, atol=1e-3)


def test_sequential_beats_one_shot_on_pretrained_resnet20() -> None:
    from spectrim.zoo import load_dataset, load_pretrained

    model = load_pretrained("resnet20-cifar10")
    calib = load_dataset("cifar10", "calib", limit=256).tensors[0]
    test = load_dataset("cifar10", "eval", limit=300)
    seq, r_seq = spectrim.compress(model, calib, target="macs=0.5", sequential=True)
    one, r_one = spectrim.compress(model, calib, target="macs=0.5", sequential=False)
    assert r_seq.widths == r_one.widths  # same allocation and kept sets, other corrections
    # a fifth of 256 examples, to the nearest whole batch of 64
    assert (r_seq.fitted_examples, r_one.fitted_examples) == (64, 0)
    e_seq = evaluate(seq, test, reference=model)
    e_one = evaluate(one, test, reference=model)
    assert e_seq.agreement is not None and e_one.agreement is not None
    assert e_seq.agreement > e_one.agreement
    assert e_seq.fidelity is not None and e_one.fidelity is not None
    assert e_seq.fidelity["rel_l2"] < e_one.fidelity["rel_l2"]


def test_lockstep_batches_equal_one_concatenated_batch() -> None:
    """Mini-batches run in lock-step give the same corrections as one big batch."""
    model = _chain()
    x = torch.randn(24, 3, 8, 8)
    batches = [x[:8], x[8:16], x[16:]]
    a = analyze_channels(model, x[:2])
    col = collect(model, a, batches, a.prunable, store_fraction=1.0)
    keep = _keep_half(col, a)
    lock, big = copy.deepcopy(model), copy.deepcopy(model)
    folds_l, _, _ = sequential_correct(lock, a, batches, keep, col)
    folds_b, _, _ = sequential_correct(big, a, [x], keep, col)
    for gi in folds_l:
        for name in folds_l[gi]:
            np.testing.assert_allclose(folds_l[gi][name], folds_b[gi][name], rtol=1e-6, atol=1e-8)
    with torch.no_grad():
        torch.testing.assert_close(lock(x), big(x))


class _TokenMLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(50, 16)
        self.up = nn.Linear(16, 32)
        self.down = nn.Linear(32, 16)
        self.head = nn.Linear(16, 3)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.emb(ids)
        h = h + self.down(torch.nn.functional.gelu(self.up(h)))
        return self.head(h.mean(1))


def test_sequential_accepts_ragged_dict_batches() -> None:
    torch.manual_seed(0)
    model = _TokenMLP().eval()
    batches = [{"ids": torch.randint(0, 50, (4, t))} for t in (5, 9, 7)]
    small, report = spectrim.compress(model, batches, target="width=0.5")
    assert small.up.out_features == 16 and small.down.in_features == 16
    assert report.calibration_rows == 12
    errs = [e for g in report.groups for e in g.consumer_errors.values()]
    assert errs and all(0.0 <= e < 1.0 for e in errs)
    with torch.no_grad():
        assert small(**batches[1]).shape == model(**batches[1]).shape


def test_sequential_fraction_validated_and_used() -> None:
    model = _chain()
    x = torch.randn(64, 3, 8, 8)
    with pytest.raises(ValueError, match="sequential_fraction"):
        spectrim.compress(model, x, target="width=0.5", sequential_fraction=0.0)
    batches = list(x.split(16))
    full, _ = spectrim.compress(model, batches, target="width=0.5", sequential_fraction=1.0)
    part, _ = spectrim.compress(model, batches, target="width=0.5", sequential_fraction=0.25)
    same, _ = spectrim.compress(model, batches[:1] * 4, target="width=0.5")
    with torch.no_grad():
        # a quarter of the examples is the first batch: a different fit than all four
        assert not torch.allclose(full(x), part(x))
    # identical calibration batches: fitting on one of them equals fitting on all
    with torch.no_grad():
        same_full, _ = spectrim.compress(
            model, batches[:1] * 4, target="width=0.5", sequential_fraction=1.0
        )
        torch.testing.assert_close(same(x), same_full(x), rtol=1e-4, atol=1e-5)


def test_wide_layers_keep_enough_rows_for_the_fits() -> None:
    """A quarter of the examples is not used when it would give fewer than 32 rows per
    channel (transformer FFNs): then every batch is kept."""
    torch.manual_seed(0)
    model = _TokenMLP().eval()
    batches = [{"ids": torch.randint(0, 50, (4, 5))} for _ in range(8)]
    a = analyze_channels(model, {"ids": batches[0]["ids"][:2]})
    n_keep = collect(model, a, batches, a.prunable, store_fraction=0.25).n_stored
    assert n_keep == len(batches)  # 32 rows x 32 channels > 8 batches x 4 x 5 tokens
    conv = _chain()
    x = torch.randn(64, 3, 8, 8)
    a2 = analyze_channels(conv, x[:2])
    n_keep2 = collect(conv, a2, list(x.split(8)), a2.prunable, store_fraction=0.25).n_stored
    assert n_keep2 == 2  # 64 positions per image: a quarter (16 images) is plenty


def test_float32_fits_match_float64_fits_when_pruning_error_dominates(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Groups fitted with float32 products (predicted error >= 1e-2) get the same
    corrections and reported errors as float64 ones, to well below the pruning error."""
    import spectrim.calibration.sequential as seq_module
    from spectrim.calibration.gram import GramAccumulator
    from spectrim.zoo import load_dataset, load_pretrained

    modes: list[bool] = []

    def spy(*args, **kwargs):  # type: ignore[no-untyped-def]
        acc = GramAccumulator(*args, **kwargs)
        modes.append(acc.exact)
        return acc

    monkeypatch.setattr(seq_module, "GramAccumulator", spy)

    model = load_pretrained("resnet20-cifar10")
    x = load_dataset("cifar10", "calib", limit=128).tensors[0]
    a = analyze_channels(model, x[:2])
    batches = list(x.split(64))
    col = collect(model, a, batches, a.prunable, store_fraction=1.0)
    keep = {}
    for g in a.prunable:
        fac = id_factorize(sum(acc.gram_numpy() for k, acc in col.stats.items() if k[0] == g.index))
        keep[g.index] = np.sort(fac.selected(g.width // 2))
    out = {}
    for precise in (True, False):
        work = copy.deepcopy(model)
        exact = dict.fromkeys(keep, precise)
        folds, errors, _ = sequential_correct(work, a, batches, keep, col, exact=exact)
        with torch.no_grad():
            out[precise] = (folds, errors, work(x))
    assert modes == [True] * len(keep) + [False] * len(keep)
    (f64, e64, y64), (f32, e32, y32) = out[True], out[False]
    assert min(e64.values()) > 1e-2  # the regime the float32 fits are used in
    for key, err in e64.items():
        assert e32[key] == pytest.approx(err, rel=1e-2)
    for gi, per in f64.items():
        for name, b in per.items():
            np.testing.assert_allclose(f32[gi][name], b, rtol=1e-3, atol=1e-4 * np.abs(b).max())
    assert float((y32 - y64).norm() / y64.norm()) < 1e-4


class _Kwargs(nn.Module):
    """The chain called with a keyword argument: dict batches, which are never merged."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.inner(pixels)


@pytest.mark.parametrize("channels_last", [False, True])
def test_greenlet_lockstep_merged_batches_and_channels_last_agree(channels_last: bool) -> None:
    """Dict batches run as greenlets in lock-step; tensor batches of one shape are merged
    into one batch (and cut back to the stored batches at every consumer); either may run
    in channels_last.  All give the same corrections."""
    model = _Kwargs(_chain()).eval()
    x = torch.randn(24, 3, 8, 8)
    dicts = [{"pixels": x[:8]}, {"pixels": x[8:16]}, {"pixels": x[16:]}]
    a = analyze_channels(model, {"pixels": x[:2]})
    col = collect(model, a, dicts, a.prunable, store_fraction=1.0)
    keep = _keep_half(col, a)
    lock = copy.deepcopy(model)
    folds_l, errors_l, _ = sequential_correct(lock, a, dicts, keep, col)

    plain = _chain()
    a2 = analyze_channels(plain, x[:2])
    col2 = collect(plain, a2, [x[:8], x[8:16], x[16:]], a2.prunable, store_fraction=1.0)
    merged = copy.deepcopy(plain)
    if channels_last:
        merged.to(memory_format=torch.channels_last)
    folds_m, errors_m, _ = sequential_correct(
        merged, a2, [x[:8], x[8:16], x[16:]], _keep_half(col2, a2), col2,
        channels_last=channels_last,
    )  # fmt: skip
    name_of = {g.name: g.index for g in a2.prunable}
    for g in a.prunable:
        g2 = name_of[g.name.removeprefix("inner.")]
        for consumer, b in folds_l[g.index].items():
            np.testing.assert_allclose(
                b, folds_m[g2][consumer.removeprefix("inner.")], rtol=1e-4, atol=1e-6
            )
            assert errors_l[(g.index, consumer)] == pytest.approx(
                errors_m[(g2, consumer.removeprefix("inner."))], rel=1e-3, abs=1e-6
            )
    if channels_last:
        assert merged[3].weight.is_contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        torch.testing.assert_close(lock(x), merged(x), rtol=1e-4, atol=1e-5)


def test_merge_batches_only_same_shape_tensors_within_the_limit() -> None:
    from spectrim.calibration.sequential import MERGED_BATCH_BYTES, merge_batches

    t = [torch.zeros(64, 3, 8, 8)] * 3
    assert merge_batches(t, 1.0) == [[0, 1, 2]]
    assert merge_batches(t, MERGED_BATCH_BYTES / 100) == [[0], [1], [2]]  # 100 examples fit
    assert merge_batches(t, MERGED_BATCH_BYTES / 128) == [[0, 1], [2]]
    ragged = [torch.zeros(8, 3, 8, 8), torch.zeros(8, 3, 10, 10), torch.zeros(8, 3, 10, 10)]
    assert merge_batches(ragged, 1.0) == [[0], [1, 2]]
    assert merge_batches([{"x": torch.zeros(8, 3)}] * 2, 1.0) == [[0], [1]]
    assert merge_batches([torch.zeros(8, 3), torch.zeros(8, 3, dtype=torch.float64)], 1.0) == [
        [0],
        [1],
    ]


def test_reselect_chooses_and_fits_on_the_compressed_prefix_like_brute_force() -> None:
    """``reselect``: each group's kept set is cross_greedy on its consumer's full-width
    input in the compressed prefix against the original's input, the fold is the least
    squares on it, and the final model is exactly the one-shot surgery with those sets
    and folds (the zero columns of the pass leave no trace)."""
    from spectrim.graph.surgery import GroupPlan, apply_plan
    from spectrim.linalg import cross_greedy

    model = _chain()
    x = torch.randn(24, 3, 8, 8)
    batches = [x[:8], x[8:16], x[16:]]
    a = analyze_channels(model, x[:2])
    g1, g2 = a.prunable
    col = collect(model, a, batches, a.prunable, store_fraction=1.0)
    keep = _keep_half(col, a)
    work = copy.deepcopy(model)
    folds, errors, kept = sequential_correct(
        work, a, batches, keep, col, reselect=[g1.index, g2.index]
    )
    assert {gi: len(k) for gi, k in kept.items()} == {gi: len(k) for gi, k in keep.items()}

    def rows(t: torch.Tensor) -> np.ndarray:
        return t.permute(0, 2, 3, 1).reshape(-1, t.shape[1]).double().numpy()

    for gi, consumer, prefix in ((g1.index, "3", {}), (g2.index, "5", {g1.index})):
        # the prefix as the pass ran it: earlier groups pruned and corrected, this one whole
        pre = copy.deepcopy(model)
        plans = {p: GroupPlan(keep=kept[p], folds=folds[p]) for p in prefix}
        apply_plan(pre, a, plans)
        zc = rows(_input_of(pre, pre[int(consumer)], x))
        z = rows(_input_of(model, model[int(consumer)], x))
        k = len(keep[gi])
        sel = cross_greedy(zc.T @ zc, zc.T @ z, float(np.sum(z * z)), k=k)
        assert kept[gi].tolist() == sorted(sel.order.tolist())
        ref = np.linalg.lstsq(zc[:, kept[gi]], z, rcond=None)[0].T
        np.testing.assert_allclose(folds[gi][consumer], ref, rtol=1e-4, atol=1e-6)
        res = np.linalg.norm(z - zc[:, kept[gi]] @ ref.T) / np.linalg.norm(z)
        assert errors[(gi, consumer)] == pytest.approx(res, rel=1e-3, abs=1e-6)
    # the selection really moved (otherwise the test shows nothing)
    assert any(kept[gi].tolist() != keep[gi].tolist() for gi in keep)
    one = copy.deepcopy(model)
    apply_plan(one, a, {gi: GroupPlan(keep=kept[gi], folds=folds[gi]) for gi in kept})
    assert [m.weight.shape for m in work if hasattr(m, "weight")] == [
        m.weight.shape for m in one if hasattr(m, "weight")
    ]
    with torch.no_grad():
        torch.testing.assert_close(work(x), one(x), atol=1e-5, rtol=1e-5)


def test_sequential_select_on_pretrained_resnet20_keeps_the_widths() -> None:
    """``sequential_select=True`` on a real model: the allocation's widths, other channels
    in some groups, a model that runs and agrees with the original about as well."""
    from spectrim.zoo import load_dataset, load_pretrained

    model = load_pretrained("resnet20-cifar10")
    calib = load_dataset("cifar10", "calib", limit=256).tensors[0]
    test = load_dataset("cifar10", "eval", limit=300)
    plain, r0 = spectrim.compress(model, calib, target="macs=0.5")
    sel, r1 = spectrim.compress(model, calib, target="macs=0.5", sequential_select=True)
    assert r1.widths == r0.widths and r1.macs_ratio == pytest.approx(r0.macs_ratio)
    moved = [
        n for n, (p, q) in enumerate(zip(plain.modules(), sel.modules()))
        if isinstance(p, nn.Conv2d)
        and float((p.weight - q.weight).detach().abs().max()) > 1e-3 * float(p.weight.detach().abs().max())
    ]  # fmt: skip
    assert moved  # other kept channels somewhere, not float noise
    e0, e1 = evaluate(plain, test, reference=model), evaluate(sel, test, reference=model)
    assert e1.agreement is not None and e0.agreement is not None
    assert e1.agreement > 0.5 and abs(e1.agreement - e0.agreement) < 0.1


class _TwoReaders(nn.Module):
    """One hidden group read by two consumers (the second runs after the first)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.up, self.a, self.b = nn.Linear(6, 16), nn.Linear(16, 5), nn.Linear(16, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.up(x))
        return self.a(h) + torch.tanh(self.b(h))


def test_reselect_with_two_consumers_equals_one_surgery() -> None:
    """The second consumer of a reselected group fits on the set the first one chose,
    and the final model is the one-shot surgery with those sets and folds."""
    from spectrim.graph.surgery import GroupPlan, apply_plan

    model = _TwoReaders().eval()
    x = torch.randn(96, 6)
    a = analyze_channels(model, x[:2])
    (g,) = a.prunable
    assert {c.module for c in g.consumers} == {"a", "b"}
    col = collect(model, a, [x[:48], x[48:]], a.prunable, store_fraction=1.0)
    keep = _keep_half(col, a)
    work = copy.deepcopy(model)
    folds, _, kept = sequential_correct(work, a, [x[:48], x[48:]], keep, col, reselect=[g.index])
    assert set(folds[g.index]) == {"a", "b"} and len(kept[g.index]) == len(keep[g.index])
    z = _input_of(model, model.b, x).double().numpy()
    ref = np.linalg.lstsq(z[:, kept[g.index]], z, rcond=None)[0].T  # prefix = original here
    np.testing.assert_allclose(folds[g.index]["b"], ref, rtol=1e-4, atol=1e-6)
    one = copy.deepcopy(model)
    apply_plan(one, a, {g.index: GroupPlan(keep=kept[g.index], folds=folds[g.index])})
    with torch.no_grad():
        torch.testing.assert_close(work(x), one(x), atol=1e-5, rtol=1e-5)


# --------------------------------------------------------------------------- readers


class _Res(nn.Module):
    """A residual block: ``relu(bn(c2(relu(bn(c1(x))))) + shortcut(x))``."""

    def __init__(self, c: int, proj: bool = False) -> None:
        super().__init__()
        self.c1, self.b1 = nn.Conv2d(c, 12, 3, padding=1), nn.BatchNorm2d(12)
        self.c2, self.b2 = nn.Conv2d(12, c, 3, padding=1), nn.BatchNorm2d(c)
        self.proj = nn.Conv2d(c, c, 1) if proj else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        short = x if self.proj is None else self.proj(x)
        return torch.relu(self.b2(self.c2(torch.relu(self.b1(self.c1(x))))) + short)


class _ResNet(nn.Module):
    """A stem, two residual blocks (the second with a projection shortcut) and a head;
    the stream's pooled channels are also an output, so the stream is pinned and the
    blocks' first convolutions and the projection are its readers."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.blocks = nn.Sequential(_Res(8), _Res(8, proj=True))
        self.head = nn.Linear(8, 4)
        for m in self.modules():  # BatchNorms with statistics of their own
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.data.uniform_(0.5, 1.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p = self.blocks(torch.relu(self.stem(x))).mean((2, 3))
        return torch.cat([self.head(p), p], 1)


def test_find_readers_leaves_out_shared_modules_and_residual_operands() -> None:
    from spectrim.calibration.sequential import find_readers, reader_candidates

    net = _ResNet().eval()
    x = torch.randn(4, 3, 8, 8)
    candidates = reader_candidates(net.named_modules(), {"blocks.0.c2", "blocks.1.c2"})
    assert sorted(candidates) == [
        "blocks.0.c1", "blocks.1.c1", "blocks.1.proj", "head", "stem",
    ]  # fmt: skip
    why: dict[str, str] = {}
    found = find_readers(candidates, net, x, "residual", why)
    assert found == ["stem", "blocks.0.c1", "blocks.1.c1", "head"]
    assert (
        why == {"blocks.1.proj": why["blocks.1.proj"]}
        and "residual addition" in why["blocks.1.proj"]
    )
    # fitted on its outputs alone, no consumer fits the drift at that addition: refitted
    assert "blocks.1.proj" in find_readers(candidates, net, x, "outputs")
    shared = nn.Linear(3, 3)
    twice = nn.Sequential(shared, nn.ReLU(), shared)
    why = {}
    assert find_readers({"0": shared}, twice, torch.randn(2, 3), "outputs", why) == []
    assert why == {"0": "it runs 2 times per batch (one weight for all calls)"}


@pytest.mark.parametrize("fit", ["residual", "outputs"])
def test_refit_readers_solves_each_readers_least_squares(fit: str) -> None:
    """The second block's first convolution reads the stream after the first block's
    pruning: with ``refit_readers`` its weight and bias are the least-squares fit, over
    its unfolded inputs in the compressed model, of the original's outputs at its kept
    channels; its error before the fit is the plain run's, and it falls."""
    net = _ResNet().eval()
    x = torch.randn(64, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    kw = {
        "sequential_fraction": 1.0,
        "sequential_fit": fit,
        "blockwise": False,
        "channels_last": False,
        "group_weights": {},
    }
    plain, r0 = spectrim.compress(net, list(x.split(32)), "id", "macs=0.6", **kw)
    small, rep = spectrim.compress(
        net, list(x.split(32)), "id", "macs=0.6", refit_readers=True, **kw
    )
    assert r0.readers is None and rep.readers is not None
    assert [g.width_after for g in rep.groups] == [g.width_after for g in r0.groups]
    refitted, skipped = rep.readers["refitted"], rep.readers["skipped"]
    assert skipped["blocks.0.c1"] == "its input did not drift"  # nothing before it is pruned
    assert skipped["stem"] == "its input did not drift"
    assert skipped["head"].startswith("64 calibration rows for 9 unknowns per output")
    assert ("blocks.1.proj" in refitted) == (fit == "outputs")
    assert "blocks.1.c1" in refitted
    # the kept output channels of blocks.1.c1: its BatchNorm was sliced with it
    rm_o, rm = net.blocks[1].b1.running_mean, small.blocks[1].b1.running_mean
    idx = torch.cdist(rm[:, None], rm_o[:, None]).argmin(1)
    assert torch.equal(rm_o[idx], rm) and 0 < len(idx) < 12
    c1, c1_o = small.blocks[1].c1, net.blocks[1].c1
    z = _input_of(small, c1, x)  # what it read in the pass: only earlier modules changed
    with torch.no_grad():
        y = c1_o(_input_of(net, c1_o, x))[:, idx].movedim(1, -1).reshape(-1, len(idx))
        before = plain.blocks[1].c1(_input_of(plain, plain.blocks[1].c1, x))
    before = before.movedim(1, -1).reshape(-1, len(idx))
    a = torch.nn.functional.unfold(z, 3, padding=1).transpose(1, 2).reshape(-1, 8 * 9)
    a = torch.cat([a, torch.ones(len(a), 1)], 1).double()
    w = torch.linalg.lstsq(a, y.double()).solution.T  # brute force: (k, 8·9 + 1)
    got = torch.cat([c1.weight.reshape(len(idx), -1), c1.bias[:, None]], 1).detach().double()
    assert float((got - w).norm() / w.norm()) < 1e-4
    err_b, err_a = refitted["blocks.1.c1"]
    rel = float((before.double() - y.double()).norm() / y.norm())
    assert abs(err_b - rel) < 1e-4 * rel
    best = float((a @ w.T - y.double()).norm() / y.norm())
    assert abs(err_a - best) < 1e-3 * best and err_a < err_b


def test_refit_readers_needs_the_sequential_pass() -> None:
    from spectrim.config import CompressConfig

    with pytest.raises(ValueError, match=r"refit_readers.*sequential=True"):
        CompressConfig(refit_readers=True, sequential=False)
    with pytest.raises(ValueError, match=r"refit_readers='yes' must be True or False"):
        CompressConfig(refit_readers="yes")  # type: ignore[arg-type]


def test_refit_readers_block_by_block_equals_the_whole_model_pass() -> None:
    """Block by block the readers are the same and get the same weights; the classifier
    after the chain, which no pruned group reaches, is refitted in a block of its own."""
    net = _ResNet().eval()
    x = torch.randn(96, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    kw = {"sequential_fraction": 1.0, "sequential_fit": "residual", "refit_readers": True}
    whole, r1 = spectrim.compress(net, list(x.split(32)), "id", "macs=0.6", blockwise=False, **kw)
    block, r2 = spectrim.compress(net, list(x.split(32)), "id", "macs=0.6", blockwise=True, **kw)
    # the two residual blocks, and the head's block of its own
    assert r2.blocks == 3 and not any("blockwise" in w for w in r2.warnings), r2.warnings
    # with blockwise unset the readers ask for the block pass, under the inputs fit too
    kw_in = {**kw, "sequential_fit": "inputs"}
    _, r3 = spectrim.compress(net, list(x.split(32)), "id", "macs=0.6", **kw_in)
    _, r4 = spectrim.compress(net, list(x.split(32)), "id", "macs=0.6", **kw_in, blockwise=False)
    assert (r3.blocks, r4.blocks) == (3, 0) and r3.readers and r4.readers
    assert (
        sorted(r3.readers["refitted"])
        == sorted(r4.readers["refitted"])
        == ["blocks.1.c1", "blocks.1.proj", "head"]  # the projection too, under "inputs"
    )
    assert r1.readers is not None and r2.readers is not None
    fits1, fits2 = r1.readers["refitted"], r2.readers["refitted"]
    assert sorted(fits1) == sorted(fits2) == ["blocks.1.c1", "head"]  # 96 rows for 9 unknowns
    assert all(abs(fits1[n][0] - fits2[n][0]) < 1e-5 for n in fits1)
    for name in ("blocks.1.c1", "head"):
        a, b = whole.get_submodule(name), block.get_submodule(name)
        torch.testing.assert_close(a.weight, b.weight, atol=1e-5, rtol=1e-4)
    with torch.no_grad():
        torch.testing.assert_close(block(x), whole(x), atol=1e-4, rtol=1e-4)
        plain, _ = spectrim.compress(
            net, list(x.split(32)), "id", "macs=0.6", **{**kw, "refit_readers": False}
        )
        y = net(x)
        assert float((block(x) - y).norm()) < float((plain(x) - y).norm())


def _switch() -> nn.Module:
    """A tiny SwitchTransformers: one MoE layer of two expert FFNs (modules) in the
    encoder and one in the decoder, top-1 routing."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.SwitchTransformersConfig(
        vocab_size=50, d_model=32, d_ff=16, num_layers=2, num_decoder_layers=2, num_heads=4,
        d_kv=8, num_experts=2, num_sparse_encoder_layers=1, num_sparse_decoder_layers=1,
        pad_token_id=0, eos_token_id=1, decoder_start_token_id=0, expert_capacity=1000,
    )  # fmt: skip
    return transformers.SwitchTransformersForConditionalGeneration(cfg).eval()


def _text_batches(n: int, seed: int) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(3, 50, (8, 10), generator=g)
        mask = torch.ones_like(ids)
        mask[:3, 7:] = 0
        dec = torch.randint(3, 50, (8, 5), generator=g)
        out.append({"input_ids": ids, "attention_mask": mask, "decoder_input_ids": dec})
    return out


def test_experts_the_model_routes_keep_the_original_fit_in_the_sequential_pass() -> None:
    """The pruned layers before an MoE layer send some tokens to other experts, so an
    expert's rows in the sequential pass are not those of the original pass: it crashed
    ("got 19 rows where the original pass had 20") or, where the counts agreed, paired
    other tokens' rows.  Its correction is now the original model's, as without the pass;
    the dense layers are still fitted on the compressed prefix."""
    model, calib = _switch(), _text_batches(6, 0)
    seq, report = spectrim.compress(model, calib, "id", "width=0.5")
    one, _ = spectrim.compress(model, calib, "id", "width=0.5", sequential=False)
    a, b = seq.state_dict(), one.state_dict()
    experts = [k for k in a if ".experts.expert_" in k and k.endswith("wo.weight")]
    assert len(experts) == 4 and all(a[k].shape == (32, 8) for k in experts)
    for k in experts:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0)
    dense = "decoder.block.0.layer.2.mlp.wo.weight"  # after pruned layers: refitted
    assert a[dense].shape == b[dense].shape and not torch.allclose(a[dense], b[dense])
    assert any("route" in w and "experts.expert_" in w for w in report.warnings)


def test_routed_experts_with_repeated_neurons_fold_exactly_in_the_sequential_pass() -> None:
    model, calib = _switch(), _text_batches(6, 0)
    with torch.no_grad():  # each FFN's second half of neurons copies its first
        for name, mod in model.named_modules():
            if name.endswith(".wi") and isinstance(mod, nn.Linear):
                half = mod.weight.shape[0] // 2
                mod.weight[half:] = mod.weight[:half]
    small, _ = spectrim.compress(model, calib, "id", "width=0.5")
    test = _text_batches(1, 1)[0]
    with torch.no_grad():
        y, y0 = small(**test).logits, model(**test).logits
    assert float((y - y0).norm() / y0.norm()) < 1e-5
    assert sum(p.numel() for p in small.parameters()) < sum(p.numel() for p in model.parameters())
