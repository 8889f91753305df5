"""One budget over channel groups and weight matrices (``method="CHANNEL+WEIGHT"``), on
the pretrained ResNet-20 and small models: the budget is met as the compressed model
measures it, the allocator narrows widths and sparsifies matrices, the result is better
than the weight method alone at high sparsity, and bad requests fail clearly."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import spectrim
from spectrim._joint import sparse_macs
from spectrim.config import UnreachableTargetError
from spectrim.report import CompressionReport


@pytest.fixture(scope="module")
def resnet20(data_root):  # type: ignore[no-untyped-def]
    from spectrim.zoo import load_pretrained

    return load_pretrained("resnet20-cifar10").eval()


@pytest.fixture(scope="module")
def held_out(data_root):  # type: ignore[no-untyped-def]
    from spectrim.zoo import load_dataset

    return load_dataset("cifar10", "test", limit=256).tensors[0]


def _logit_error(model: nn.Module, small: nn.Module, x: torch.Tensor) -> float:
    with torch.no_grad():
        y0, y1 = model(x), small(x)
    return float((y1 - y0).norm() / y0.norm())


def test_joint_beats_the_weight_method_alone_at_90_percent(
    resnet20, cifar_calib, held_out, state_hash
) -> None:  # type: ignore[no-untyped-def]
    before = state_hash(resnet20)
    # one-shot (sequential=False) keeps the default suite fast; the benchmark runs both
    small, report = spectrim.compress(
        resnet20, cifar_calib, "id+obs", "sparsity=0.9", refit=True, sequential=False
    )
    assert state_hash(resnet20) == before  # the user's model is untouched
    joint = report.config["joint"]
    # the budget, as the compressed model counts it: 10% of the original non-zeros
    nz = sum(int((m.weight != 0).sum()) for m in small.modules()
             if isinstance(m, (nn.Conv2d, nn.Linear)))  # fmt: skip
    assert report.nonzeros_after == nz
    assert report.nonzero_ratio == pytest.approx(0.1, abs=2e-3)
    assert joint["measured"] == pytest.approx(report.nonzero_ratio)
    # both kinds of unit were used: some widths narrowed, matrices at different densities
    assert joint["groups_narrowed"] >= 1 and report.macs_ratio < 1.0
    assert len({round(d, 3) for d in joint["densities"].values()}) > 3
    alone, rep_alone = spectrim.compress(
        resnet20,
        cifar_calib,
        "obs",
        "sparsity=0.9",
        refit=True,
        structured=False,
        sequential=False,
    )
    assert rep_alone.nonzero_ratio == pytest.approx(0.1, abs=2e-3)
    # on held-out images the shared budget keeps the logits closer to the original's
    assert _logit_error(resnet20, small, held_out) < _logit_error(resnet20, alone, held_out)
    assert spectrim.CompressionReport.from_dict(report.to_dict()).config["joint"] == joint


def test_macs_and_params_budgets_are_met_as_measured() -> None:
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 48), nn.ReLU(), nn.Linear(48, 4)
    )
    x = torch.randn(400, 16)
    for target, kind in (("macs=0.3", "macs"), ("params=0.4", "params")):
        small, report = spectrim.compress(net, x, "id+wanda", target)
        joint = report.config["joint"]
        assert joint["kind"] == kind
        if kind == "macs":
            measured = sparse_macs(small, x[:1]) / report.macs_before
        else:
            measured = sum(int((p != 0).sum()) for p in small.parameters()) / report.params_before
        assert measured == pytest.approx(joint["measured"], abs=1e-9)
        assert measured == pytest.approx(float(target.split("=")[1]), abs=0.01)
        assert joint["modelled"] == pytest.approx(float(target.split("=")[1]), abs=0.01)


def test_options_go_to_the_method_that_takes_them() -> None:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 3))
    x = torch.randn(300, 8)
    _, report = spectrim.compress(net, x, "id+obs", "sparsity=0.5", ridge=1e-4, refit=True)
    stage1, stage2 = report.config["stages"]
    assert stage1["method"] == "id+obs" and stage2["method"] == "obs"
    np.testing.assert_allclose(report.nonzero_ratio, 0.5, atol=0.02)


@pytest.mark.parametrize(
    "method,target,options,match",
    [
        ("obs+id", "sparsity=0.5", {}, "first method must be a channel method"),
        ("id+obs+wanda", "sparsity=0.5", {}, "CHANNEL\\+WEIGHT"),
        ("id+nope", "sparsity=0.5", {}, "unknown method 'nope'"),
        ("id+obs", "width=0.5", {}, "one budget of 'sparsity=S'"),
        ("id+obs", "sparsity=2:4", {}, "n:m pattern"),
        ("id+lq", "sparsity=0.5", {}, "per-layer method that takes a density"),
        ("id+obs", "sparsity=0.5", {"scope": "global"}, "scope='global'"),
        ("id+obs", "sparsity=0.5", {"bogus": 1}, "unknown option bogus"),
    ],
)
def test_clear_errors(method: str, target: str, options: dict, match: str) -> None:  # type: ignore[type-arg]
    net = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3))
    with pytest.raises((ValueError, TypeError), match=match):
        spectrim.compress(net, torch.randn(64, 8), method, target, **options)


def test_an_unreachable_budget_is_said_or_raised() -> None:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3))
    x = torch.randn(128, 8)
    small, report = spectrim.compress(
        net, x, "id+magnitude", "sparsity=0.9999", on_unreachable="force"
    )
    assert any("unreachable" in w and "non-zero weights" in w for w in report.warnings)
    assert report.config["joint"]["modelled"] > 0.0001  # the floor, not the target
    alloc = report.allocation  # the same as data, through the report's JSON
    assert alloc == CompressionReport.from_dict(json.loads(report.to_json())).allocation
    assert alloc is not None and alloc["kind"] == "nonzeros" and not alloc["reachable"]
    assert alloc["floor"] > alloc["target"] == pytest.approx(0.0001)
    assert small(x).shape == (128, 3)
    with pytest.raises(UnreachableTargetError, match="lowest density"):
        spectrim.compress(net, x, "id+magnitude", "sparsity=0.9999", on_unreachable="raise")


def test_a_pair_takes_no_then() -> None:
    net = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3))
    with pytest.raises(ValueError, match="then="):
        spectrim.compress(net, torch.randn(64, 8), "id+obs", "sparsity=0.5", then={"method": "obs"})


def test_cli_runs_a_pair(
    data_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from spectrim.cli import main

    code = main([
        "compress", "--model", "resnet20-cifar10", "--data", "cifar10", "--method", "id+wanda",
        "--target", "sparsity=0.7", "--calib", "64", "--eval-limit", "64",
        "--json", str(tmp_path / "r.json"),
    ])  # fmt: skip
    out, err = capsys.readouterr()
    assert code == 0, err
    report = json.loads((tmp_path / "r.json").read_text())["report"]
    assert report["method"] == "id+wanda" and abs(report["nonzero_ratio"] - 0.3) < 0.005
    assert "non-zero weights" in out
    code = main(["compress", "--model", "resnet20-cifar10", "--data", "cifar10",
                 "--method", "id+obs", "--target", "width=0.5"])  # fmt: skip
    assert code == 2 and "one budget" in capsys.readouterr().err
