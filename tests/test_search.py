"""``search=N`` and ``group_weights``: the allocation chosen by the compressed model's outputs.

The pretrained ResNet-20 for the property that matters (the searched widths keep the
outputs closer to the original's on images neither the search nor the fits saw, and the
report's config rebuilds the same model without searching); small MLPs for the factors'
effect on the allocator, the brute-force output error and the refusals.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import spectrim
from spectrim._search import output_error


def _mlp() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 4)
    ).eval()


def _data(n: int = 512) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    return torch.randn(n, 8, generator=g) @ torch.randn(8, 8, generator=g)


def test_a_large_factor_keeps_its_group_and_the_others_pay() -> None:
    model, x = _mlp(), _data()
    _, plain = spectrim.compress(model, x, "id", "params=0.6")
    name = plain.groups[0].name
    assert plain.groups[0].width_after < plain.groups[0].width_before
    _, weighted = spectrim.compress(model, x, "id", "params=0.6", group_weights={name: 1e9})
    assert weighted.groups[0].width_after == weighted.groups[0].width_before
    assert weighted.groups[1].width_after < plain.groups[1].width_after
    assert weighted.config["group_weights"] == {name: 1e9}
    # a factor below 1 makes the allocator cut the group harder
    _, cheap = spectrim.compress(model, x, "id", "params=0.6", group_weights={name: 1e-3})
    assert cheap.groups[0].width_after < plain.groups[0].width_after


def test_group_weights_name_a_group_of_the_model() -> None:
    with pytest.raises(ValueError, match=r"'fc9'.*no group.*e\.g\. 0"):
        spectrim.compress(_mlp(), _data(), "id", "params=0.6", group_weights={"fc9": 2.0})
    for bad in ({"0": 0.0}, {"0": -1.0}, {"0": float("nan")}, {"0": True}, {1: 2.0}):
        with pytest.raises(ValueError, match="group_weights"):
            spectrim.CompressConfig(group_weights=bad)  # type: ignore[arg-type]


def test_output_error_against_brute_force_and_without_padding() -> None:
    class Tokens(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.emb = nn.Embedding(10, 3)

        def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
            return self.emb(input_ids)

    torch.manual_seed(0)
    model, other = Tokens(), Tokens()
    ids = torch.randint(0, 10, (2, 5))
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    batch = {"input_ids": ids, "attention_mask": mask}
    with torch.no_grad():
        ref, out = model(ids, mask), other(ids, mask)
    keep, out, ref = mask.bool(), out.double(), ref.double()
    want = float(((out - ref)[keep] ** 2).sum() / (ref[keep] ** 2).sum())
    assert output_error(other, [batch], [ref.float()]) == pytest.approx(want, rel=1e-12)
    everything = float(((out - ref) ** 2).sum() / (ref**2).sum())
    assert want != pytest.approx(everything)  # the padded positions were left out


def test_the_search_is_refused_where_it_cannot_run() -> None:
    for target in ("width=0.5", "sparsity=0.5", "latency=0.5"):
        with pytest.raises(ValueError, match="search=2"):
            spectrim.CompressConfig(target=target, search=2)
    for bad in (-1, 1.5, True):
        with pytest.raises(ValueError, match="search"):
            spectrim.CompressConfig(search=bad)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="not a channel method alone"):
        spectrim.compress(_mlp(), _data(), "id+obs", "params=0.5", search=1)
    with pytest.raises(ValueError, match=r"sequential_fraction=1.*search_data="):
        spectrim.compress(_mlp(), _data(), "id", "params=0.6", search=1, sequential_fraction=1.0)
    with pytest.raises(ValueError, match="set search="):
        spectrim.compress(_mlp(), _data(), "id", "params=0.6", search_data=_data(64))


def test_search_data_is_what_the_candidates_are_scored_on() -> None:
    model, x = _mlp(), _data()  # the fits take all 512 examples: only search_data is left
    other = _data(256) + 1.0
    small, report = spectrim.compress(
        model, x, "id", "params=0.5", search=1, search_data=other, sequential_fraction=1.0
    )
    s = report.search
    assert s is not None and s["held_out_examples"] == 256
    batches = list(other.split(64))
    with torch.no_grad():
        refs = [model(b) for b in batches]
    assert output_error(small, batches, refs) == pytest.approx(s["error"], rel=1e-9)


def test_search_score_is_what_the_search_minimises() -> None:
    """A user's score that rewards a wide first layer: the search follows it, against the
    outputs' error, and needs no held-out examples (the fits take all 512)."""
    model, x = _mlp(), _data()
    kw = {"sequential_fraction": 1.0}
    _, plain = spectrim.compress(model, x, "id", "params=0.5", **kw)
    seen: list[bool] = []

    def wide_first(small: nn.Module) -> float:
        seen.append(small.training or torch.is_grad_enabled())
        return -float(small[0].out_features)

    _, report = spectrim.compress(
        model, x, "id", "params=0.5", search=2, search_score=wide_first, **kw
    )
    s = report.search
    assert s is not None and s["score"] == "search_score" and s["held_out_examples"] == 0
    assert s["error"] == -report.groups[0].width_after < -plain.groups[0].width_after
    assert s["group_weights"][report.groups[0].name] > 1.0
    assert len(seen) == s["candidates"] and not any(seen)  # eval mode, no gradients
    for bad in (float("nan"), "low", None):
        with pytest.raises(ValueError, match=f"search_score returned {bad!r}.*finite"):
            spectrim.compress(
                model, x, "id", "params=0.5", search=1, search_score=lambda m, b=bad: b, **kw
            )
    with pytest.raises(ValueError, match="give one"):
        spectrim.compress(
            model, x, "id", "params=0.5", search=1, search_score=wide_first, search_data=x
        )
    with pytest.raises(ValueError, match="search_score= is what search=N"):
        spectrim.compress(model, x, "id", "params=0.5", search_score=wide_first)


def test_search_on_an_mlp_reproduces_its_best_candidate() -> None:
    model, x = _mlp(), _data(2048)  # the fits take 1024 (32 rows per channel)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    small, report = spectrim.compress(model, x, "id", "params=0.5", search=2)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    s = report.search
    assert s is not None and len(s["rounds"]) == 2
    assert s["candidates"] <= 1 + 2 * 2 * len(report.groups)
    held = x[s["held_out_examples"] * -1 :].split(64)
    with torch.no_grad():
        refs = [model(b) for b in held]
    assert output_error(small, list(held), refs) == pytest.approx(s["error"], rel=1e-9)
    assert s["error"] <= s["error_before"]
    assert report.config["search"] == 0
    assert report.config["group_weights"] == s["group_weights"]


def test_search_on_resnet20_generalises_and_rebuilds(data_root: object) -> None:
    from spectrim.zoo import load_dataset, load_pretrained

    model = load_pretrained("resnet20-cifar10").eval()
    images = load_dataset("cifar10", "calib", limit=512).tensors[0]
    calib, unseen = images[:256], images[256:]
    kw = {"sequential_fraction": 0.25}
    plain, _ = spectrim.compress(model, calib, "spectral", "macs=0.5", **kw)
    small, report = spectrim.compress(model, calib, "spectral", "macs=0.5", search=1, **kw)
    s = report.search
    assert s is not None and s["held_out_examples"] == 192  # the fits used one batch of 64
    assert s["kept"] >= 1 and s["error"] < s["error_before"]
    assert report.macs_ratio == pytest.approx(0.5, abs=0.01)
    # closer to the original on 256 images neither the search nor the fits saw
    refs = [model(b).detach() for b in unseen.split(64)]
    batches = list(unseen.split(64))
    assert output_error(small, batches, refs) < 0.95 * output_error(plain, batches, refs)
    # the report's config (the factors found, search=0) rebuilds the same model
    again, rep2 = spectrim.compress(
        model, calib, config=spectrim.CompressConfig.from_dict(report.config)
    )
    assert rep2.search is None
    a, b = small.state_dict(), again.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _fork_equals_fresh(model: nn.Module, calib: object, **kw: object) -> None:
    """Every candidate finished from one prepared run (the search's shared statistics)
    is, bit for bit, the model and report a fresh run with its factors gives; and the
    prepared run is left as it was (a later fork is the same as an earlier)."""
    import copy
    import dataclasses

    from spectrim._prune import finish_run, fork_run, prepare_run, prune_run
    from spectrim.api import _method_for
    from spectrim.calibration.batches import as_batches
    from spectrim.calibration.checks import check_calibration
    from spectrim.context import RunContext
    from spectrim.methods import Method

    cfg = spectrim.CompressConfig(**kw)  # type: ignore[arg-type]
    batches = as_batches(calib)
    info = check_calibration(batches)
    ctx = RunContext(seed=cfg.seed)
    method = _method_for(cfg)
    assert isinstance(method, Method)
    base = prepare_run(copy.deepcopy(model), batches, info, cfg, method, ctx)
    _, plain = prune_run(copy.deepcopy(model), batches, info, cfg, method, ctx, 0.0)
    names = [g.name for g in plain.groups if g.width_after < g.width_before][:2]
    trials = [{names[0]: 4.0}, {names[1]: 0.25, names[0]: 0.5}, {names[0]: 4.0}]
    for w in trials:
        trial = dataclasses.replace(cfg, group_weights=w)
        small, rep = finish_run(fork_run(base, trial), 0.0)
        fresh, frep = prune_run(copy.deepcopy(model), batches, info, trial, method, ctx, 0.0)
        a, b = small.state_dict(), fresh.state_dict()
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), w
        assert [g.width_after for g in rep.groups] == [g.width_after for g in frep.groups]
        assert rep.config == frep.config and rep.macs_ratio == frep.macs_ratio
    assert any(g.width_after != p.width_after for g, p in zip(rep.groups, plain.groups))


def test_forked_candidates_are_fresh_runs_on_resnet20(data_root: object) -> None:
    """The default residual fit, block by block (stored block inputs, the original's
    operands), on the pretrained ResNet-20."""
    from spectrim.zoo import load_dataset, load_pretrained

    model = load_pretrained("resnet20-cifar10").eval()
    calib = load_dataset("cifar10", "calib", limit=256).tensors[0]
    _fork_equals_fresh(model, calib, method="spectral", target="macs=0.5")


def test_forked_candidates_are_fresh_runs_with_heads_and_the_stream() -> None:
    """Heads and the residual stream on one budget (the refits use a copy of the
    original), a tiny GPT-2 on padded text."""
    from tests.test_hidden import _batches, _model

    _fork_equals_fresh(
        _model("gpt2"), _batches(4), method="id", target="macs=0.5", heads=True, hidden=True
    )
