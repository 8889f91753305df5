"""One calibration pass: Grams at every consumer, and stored inputs for the fits."""

from __future__ import annotations

import torch
from torch import nn

from spectrim.calibration import collect, collect_statistics
from spectrim.calibration.collect import group_rows, group_view
from spectrim.graph import analyze_channels


class _InplaceAfterConsumer(nn.Module):
    """The consumer's input is modified in place after the consumer ran."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 6, 1)
        self.b = nn.Conv2d(6, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.a(x))
        out = self.b(h)
        h.mul_(0.0)
        return out


def test_stored_inputs_are_copies_and_stats_match_brute_force() -> None:
    torch.manual_seed(0)
    model = _InplaceAfterConsumer().eval()
    x = torch.randn(10, 3, 5, 5)
    a = analyze_channels(model, x[:2])
    (g,) = [g for g in a.prunable if g.name == "a"]
    col = collect(model, a, list(x.split(4)), [g], store_fraction=1.0)
    ref = torch.relu(model.a(x)).detach()
    stored = torch.cat(col.inputs[(g.index, "b")])
    assert col.n_stored == 3
    torch.testing.assert_close(stored, ref)  # not zeroed by the in-place op
    rows = ref.permute(0, 2, 3, 1).reshape(-1, 6).double()
    acc = col.stats[(g.index, "b")]
    assert acc.count == 250
    torch.testing.assert_close(acc.gram, rows.T @ rows, rtol=1e-5, atol=1e-5)


def test_statistics_only_stores_nothing() -> None:
    model = _InplaceAfterConsumer().eval()
    x = torch.randn(6, 3, 5, 5)
    a = analyze_channels(model, x[:2])
    col = collect(model, a, [x], a.prunable)
    assert col.inputs == {} and col.n_stored == 0
    stats = collect_statistics(model, a, [x], a.prunable)
    assert stats.keys() == col.stats.keys()


def test_group_view_matches_group_rows() -> None:
    x = torch.randn(3, 8, 4, 4)
    for pos in ([[1], [5], [2]], [[0], [1], [2], [3], [4], [5], [6], [7]]):
        p = torch.tensor(pos)
        view, cd = group_view(x, 1, p)
        rows = view.movedim(cd, -1).reshape(-1, len(pos))
        torch.testing.assert_close(rows, group_rows(x, 1, p))
    flat = torch.randn(5, 12)  # flatten of 3 channels x 4 positions
    p = torch.arange(12).reshape(3, 4)
    view, cd = group_view(flat, 1, p)
    assert cd == 1 and view.shape == (20, 3)
    torch.testing.assert_close(view, group_rows(flat, 1, p))


class _Branches(nn.Module):
    """Three branches read the same tensor (an inception block), one reads a slice."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 6, 3, padding=1)
        self.b1, self.b2, self.b3 = (
            nn.Conv2d(6, 4, 1),
            nn.Conv2d(6, 4, 3, padding=1),
            nn.Conv2d(6, 2, 1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.stem(x))
        return torch.cat([self.b1(h), self.b2(h), self.b3(h)], 1)


def test_consumers_of_one_tensor_share_the_products(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """Branches reading the same tensor compute its Gram once, and every branch gets it."""
    from spectrim.calibration.gram import GramAccumulator

    torch.manual_seed(0)
    model = _Branches().eval()
    x = torch.randn(8, 3, 6, 6)
    a = analyze_channels(model, x[:2])
    (g,) = [g for g in a.prunable if g.name == "stem"]
    assert sorted(c.module for c in g.consumers) == ["b1", "b2", "b3"]
    calls = []
    original = GramAccumulator.update_activation

    def counting(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        calls.append(1)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(GramAccumulator, "update_activation", counting)
    col = collect(model, a, list(x.split(4)), [g])
    assert len(calls) == 2  # one per batch, not one per (batch, branch)
    rows = torch.relu(model.stem(x)).detach().permute(0, 2, 3, 1).reshape(-1, 6).double()
    for name in ("b1", "b2", "b3"):
        acc = col.stats[(g.index, name)]
        assert acc.count == 8 * 36
        torch.testing.assert_close(acc.gram, rows.T @ rows, rtol=1e-5, atol=1e-5)


def test_channels_last_pass_gives_the_same_statistics_and_inputs() -> None:
    """The pass in channels_last (model converted, each batch converted on the way in)
    measures what the NCHW pass measures; its stored inputs are channels_last rows."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 12, 3, padding=1), nn.BatchNorm2d(12), nn.ReLU(),
        nn.Conv2d(12, 10, 3, padding=1), nn.ReLU(), nn.Conv2d(10, 4, 3, padding=1),
    ).eval()  # fmt: skip
    x = torch.randn(20, 3, 9, 9)
    a = analyze_channels(model, x[:2])
    batches = list(x.split(8))
    ref = collect(model, a, batches, a.prunable, store_fraction=1.0)
    cl = model.to(memory_format=torch.channels_last)
    got = collect(cl, a, batches, a.prunable, store_fraction=1.0, channels_last=True)
    assert set(got.stats) == set(ref.stats)
    for key, acc in ref.stats.items():
        assert got.stats[key].count == acc.count
        torch.testing.assert_close(got.stats[key].gram, acc.gram, rtol=1e-5, atol=1e-4)
        for mine, theirs in zip(got.inputs[key], ref.inputs[key]):
            torch.testing.assert_close(mine, theirs, rtol=1e-5, atol=1e-5)
            assert mine.is_contiguous(memory_format=torch.channels_last)


def test_without_keep_inputs_the_stored_share_is_the_same_and_nothing_is_copied(
    monkeypatch,  # type: ignore[no-untyped-def]
) -> None:
    """The block-by-block pass asks only for the number of stored batches: it is the one
    the storing pass decides (the fraction, and the floor of rows per channel), and no
    consumer input is copied, not even the first batch's."""
    import sys

    collect_module = sys.modules["spectrim.calibration.collect"]  # the package exports
    # the function under the module's name
    torch.manual_seed(0)
    model = _Branches().eval()
    x = torch.randn(40, 3, 6, 6)
    a = analyze_channels(model, x[:2])
    batches = list(x.split(4))
    for fraction, floor in [(0.25, 1), (0.5, 1), (0.05, 1), (0.05, 300)]:
        kw = {"store_fraction": fraction, "min_rows_per_unit": floor}
        full = collect(model, a, batches, a.prunable, **kw)
        lean = collect(model, a, batches, a.prunable, keep_inputs=False, **kw)
        assert full.inputs and full.n_stored == lean.n_stored > 0, (fraction, floor)
        assert lean.inputs == {}
    # the floor raised the share: 300 rows per channel need 300·6/36 = 50 > 40 examples
    assert lean.n_stored == len(batches)
    appended: list[object] = []

    class Recording(dict):  # type: ignore[type-arg]
        def setdefault(self, key, default=None):  # type: ignore[no-untyped-def]
            appended.append(key)
            return super().setdefault(key, default)

    real = collect_module.Collected

    def recording(*args, **kwargs):  # type: ignore[no-untyped-def]
        out = real(*args, **kwargs)
        out.inputs = Recording()
        return out

    monkeypatch.setattr(collect_module, "Collected", recording)
    collect(model, a, batches, a.prunable, store_fraction=0.5, keep_inputs=False)
    assert appended == []
    collect(model, a, batches, a.prunable, store_fraction=0.5)
    assert appended  # the recording sees the storing pass's copies
