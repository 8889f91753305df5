"""ONNX export of compressed models, checked with onnxruntime (a different batch size, and a
different number of tokens, from the traced example: the dynamic axes work)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import spectrim
from spectrim.cli import main
from spectrim.io.onnx import export_onnx

pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")


def test_a_channel_pruned_cnn_exports_and_matches(tmp_path: Path) -> None:
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
        nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        nn.Linear(16, 5),
    ).eval()  # fmt: skip
    small, _ = spectrim.compress(net, torch.randn(64, 3, 12, 12), "id", "width=0.5")
    result = export_onnx(small, torch.randn(2, 3, 12, 12), tmp_path / "cnn.onnx",
                         check_inputs=torch.randn(7, 3, 12, 12))  # fmt: skip
    assert result["max_abs_diff"] < 1e-4
    assert (tmp_path / "cnn.onnx").stat().st_size == result["bytes"]
    assert not list(tmp_path.glob(".*.tmp"))  # written atomically, nothing left behind


def test_a_head_pruned_encoder_exports_with_dynamic_tokens(tmp_path: Path) -> None:
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=60, hidden_size=32, num_hidden_layers=2,
                                  num_attention_heads=4, intermediate_size=40)  # fmt: skip
    bert = transformers.BertModel(cfg).eval()
    calib = [{"input_ids": torch.randint(0, 60, (8, 10))} for _ in range(4)]
    small, _ = spectrim.compress(bert, calib, "id", "heads=0.5", sequential=False)
    example = {
        "input_ids": torch.randint(0, 60, (2, 6)),
        "attention_mask": torch.ones(2, 6, dtype=torch.long),
    }
    check = {
        "input_ids": torch.randint(0, 60, (3, 9)),
        "attention_mask": torch.ones(3, 9, dtype=torch.long),
    }
    result = export_onnx(small, example, tmp_path / "bert.onnx", check_inputs=check)
    assert result["max_abs_diff"] < 1e-4 and result["inputs"] == ["input_ids", "attention_mask"]


def test_missing_onnxruntime_is_named(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    with pytest.raises(ImportError, match="onnxruntime"):
        export_onnx(nn.Linear(2, 2), torch.randn(1, 2), tmp_path / "x.onnx")


def test_cli_export_reports_the_difference(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], data_root: Path
) -> None:
    target, report = tmp_path / "r20.onnx", tmp_path / "r.json"
    argv = ["export", "--model", "resnet20-cifar10", "--data", "cifar10", "--onnx", str(target)]
    assert main([*argv, "--json", str(report), "--quiet"]) == 0
    result = json.loads(report.read_text())
    assert result["max_abs_diff"] < 1e-3 and target.is_file()
    assert main(argv) != 0  # exists: refused without --overwrite
    assert "--overwrite" in capsys.readouterr().err
