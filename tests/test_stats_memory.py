"""compress(..., stats_memory=...): groups too wide for their Grams are selected from
randomized sketches, and the result stays as good as the exact selection."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import nn

import spectrim


def _wide_mlp() -> tuple[nn.Module, list[torch.Tensor], torch.Tensor]:
    torch.manual_seed(0)
    d, m = 128, 1024
    net = nn.Sequential(nn.Linear(d, m), nn.GELU(), nn.Linear(m, m), nn.GELU(), nn.Linear(m, d))
    A = torch.randn(d, d) * (torch.arange(d) + 1.0) ** -0.7

    def data(n: int) -> torch.Tensor:
        return torch.randn(n, d) @ A

    return net.eval(), [data(256) for _ in range(8)], data(1024)


def _error(net: nn.Module, small: nn.Module, x: torch.Tensor) -> float:
    with torch.no_grad():
        y0 = net(x)
        return float((small(x) - y0).norm() / y0.norm())


def test_sketched_groups_compress_as_well_as_exact_ones() -> None:
    net, calib, test = _wide_mlp()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    exact, rep0 = spectrim.compress(net, calib, "id", "macs=0.5")
    # the two 1024-wide groups' Grams are 8 MiB each: 10 MiB sketches both at 512 rows
    small, rep = spectrim.compress(net, calib, "id", "macs=0.5", stats_memory="10MiB")
    wide = [g.sketch_rows for g in rep.groups if g.width_before == 1024]
    assert wide == [512, 512] and all(g.sketch_rows is None for g in rep0.groups)
    assert any("randomized sketch" in w for w in rep.warnings)
    assert rep.macs_ratio == pytest.approx(0.5, abs=0.01)
    e0, e1 = _error(net, exact, test), _error(net, small, test)
    rand, _ = spectrim.compress(net, calib, "random", "macs=0.5")
    assert e1 < 1.1 * e0 and e1 < 0.5 * _error(net, rand, test), (e0, e1)
    # a tighter budget shrinks both sketches by one factor: 5 MiB / (2 · 8 · 1024) rows
    _, rep2 = spectrim.compress(net, calib, "id", "width=0.25", stats_memory="5MiB")
    assert [g.sketch_rows for g in rep2.groups if g.width_before == 1024] == [320, 320]
    assert all(torch.equal(v, before[k]) for k, v in net.state_dict().items())


def test_methods_without_a_sketch_refuse_an_explicit_budget_and_warn_under_the_default(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    net, calib, _ = _wide_mlp()
    with pytest.raises(ValueError, match=r"'spectral' has no sketched path"):
        spectrim.compress(net, calib, "spectral", "width=0.5", stats_memory="10MiB")
    with pytest.raises(ValueError, match=r"stats_memory=.*too small.*\(1024 units\)"):
        spectrim.compress(net, calib, "id", "width=0.5", stats_memory="1MiB")
    # the default budget is a guess at the machine: exact Grams, and a warning
    monkeypatch.setattr("spectrim._prune.default_stats_memory", lambda device=None: 1 << 20)
    _, rep = spectrim.compress(net, calib, "spectral", "width=0.5")
    assert any("exact Grams were used" in w for w in rep.warnings)
    assert all(g.sketch_rows is None for g in rep.groups)


def test_minilm_ffn_selected_from_sketches_keeps_its_embeddings(
    minilm: tuple[nn.Module, Any], sts_train_sentences: list[str], sts_sentences: list[str]
) -> None:
    """The real all-MiniLM-L6-v2, half of every 1536-wide FFN: its six FFN Grams (108 MiB
    together) over a 56 MiB budget are sketched at 768 rows, and the held-out embeddings
    stay as close to the original's as with the exact Grams."""
    from tests.test_heads import _embed, sts_split

    model, tok = minilm
    calib, held_out = sts_split(tok, sts_train_sentences, sts_sentences)
    ref = _embed(model, tok, held_out)
    cos = {}
    for name, kw in (("exact", {}), ("sketch", {"stats_memory": "56MiB"}), ("random", {})):
        method = "random" if name == "random" else "id"
        small, rep = spectrim.compress(model, calib, method, "width=0.5", **kw)
        if name == "sketch":
            assert [g.sketch_rows for g in rep.groups if g.width_after < g.width_before] == [
                768
            ] * 6
        cos[name] = float((_embed(small, tok, held_out) * ref).sum(-1).mean())
    assert cos["sketch"] > cos["exact"] - 0.02 and cos["sketch"] > cos["random"] + 0.1, cos
