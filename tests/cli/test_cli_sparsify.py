"""Weight sparsification from the CLI: compress, save compactly, eval the folder."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from spectrim.cli import main


def _run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_compress_obs_sparsity_and_eval(
    data_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out_dir = tmp_path / "sparse"
    code, out, err = _run(
        capsys,
        "compress",
        "--model", "resnet20-cifar10", "--data", "cifar10",
        "--method", "obs", "--target", "sparsity=0.6", "--option", "refit=true",
        "--calib", "64", "--eval-limit", "128",
        "--out", str(out_dir), "--json", str(tmp_path / "r.json"),
    )  # fmt: skip
    assert code == 0, err
    assert "non-zero weights" in out and "sparsity 0.600" in out
    data = json.loads((tmp_path / "r.json").read_text())
    assert abs(data["report"]["sparsity"] - 0.6) < 0.005
    assert data["report"]["matrices"][0]["output_error"] is not None
    manifest = json.loads((out_dir / "manifest.json").read_text())
    assert manifest["packed"]  # saved as bitmask + values
    code, out, err = _run(
        capsys, "eval", "--model", str(out_dir), "--data", "cifar10", "--limit", "128",
        "--json", str(tmp_path / "e.json"),
    )  # fmt: skip
    assert code == 0, err
    assert json.loads((tmp_path / "e.json").read_text())["accuracy"] > 0.7


def test_weight_method_with_a_channel_target_is_a_clear_error(
    data_root: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, _, err = _run(
        capsys, "compress", "--model", "resnet20-cifar10", "--data", "cifar10", "--method", "obs"
    )
    assert code == 2
    assert "weight method" in err and "sparsity=S" in err


def test_compress_then_weights(
    data_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, _out, err = _run(
        capsys,
        "compress", "--model", "resnet20-cifar10", "--data", "cifar10",
        "--target", "macs=0.6", "--then", "magnitude:sparsity=0.5",
        "--calib", "64", "--eval-limit", "64", "--json", str(tmp_path / "r.json"),
    )  # fmt: skip
    assert code == 0, err
    report = json.loads((tmp_path / "r.json").read_text())["report"]
    assert report["method"] == "id+magnitude" and report["macs_ratio"] < 0.65
    assert abs(report["sparsity"] - 0.5) < 0.01
    code, _, err = _run(capsys, "compress", "--model", "resnet20-cifar10", "--data", "cifar10",
                        "--then", "obs")  # fmt: skip
    assert code == 2 and "METHOD:TARGET" in err
