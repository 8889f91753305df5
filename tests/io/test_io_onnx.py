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


@pytest.mark.parametrize("family", ["t5", "mpnet", "bloom"])
def test_heads_of_a_shared_position_bias_export(family: str, tmp_path: Path) -> None:
    """T5, MPNet and BLOOM layers add their kept heads' rows of one shared bias (a
    forward pre-hook; BLOOM's flattened with the batch): the exported graph must hold
    the slicing, for other batch sizes and token counts too.  (Falcon-RW's ALiBi does
    not export even dense: onnxruntime has no bfloat16 Mul for its slopes.)"""
    t = pytest.importorskip("transformers")
    torch.manual_seed(0)
    model = {
        "t5": lambda: t.T5EncoderModel(t.T5Config(vocab_size=60, d_model=32, d_kv=8,
                                                  num_heads=4, d_ff=40, num_layers=2)),
        "mpnet": lambda: t.MPNetModel(t.MPNetConfig(vocab_size=60, hidden_size=32,
                                                    num_hidden_layers=2, num_attention_heads=4,
                                                    intermediate_size=40)),
        "bloom": lambda: t.BloomForCausalLM(t.BloomConfig(vocab_size=60, hidden_size=32,
                                                          n_layer=2, n_head=4)),
    }[family]().eval()  # fmt: skip
    calib = [{"input_ids": torch.randint(3, 60, (8, 10))} for _ in range(4)]
    small, _ = spectrim.compress(model, calib, "id", "heads=0.5")

    def batch(n: int, length: int) -> dict[str, torch.Tensor]:
        ids = torch.randint(3, 60, (n, length))
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}

    result = export_onnx(small, batch(2, 6), tmp_path / "m.onnx", check_inputs=batch(3, 9))
    assert result["max_abs_diff"] < 1e-4


def test_bloom_with_a_narrowed_stream_exports(tmp_path: Path) -> None:
    """BLOOM's narrowed stream starts at a map after its embedding LayerNorm and ends at
    one after its last norm (``NormExpand``), around blocks that read and write ``k``
    coordinates: the exported graph computes the same logits for other shapes too.
    (Mixture-of-experts models do not export even dense: transformers' experts op has no
    ONNX function.)"""
    t = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = t.BloomConfig(vocab_size=60, hidden_size=32, n_layer=2, n_head=4)
    model = t.BloomForCausalLM(cfg).eval()
    calib = [{"input_ids": torch.randint(3, 60, (8, 10))} for _ in range(4)]
    small, report = spectrim.compress(model, calib, "spectral", "hidden=0.75")
    assert report.groups[0].width_after == 24

    def batch(n: int, length: int) -> dict[str, torch.Tensor]:
        ids = torch.randint(3, 60, (n, length))
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}

    result = export_onnx(small, batch(2, 6), tmp_path / "m.onnx", check_inputs=batch(3, 9))
    assert result["max_abs_diff"] < 1e-4


def test_a_head_pruned_causal_lm_exports_its_next_token_logits(tmp_path: Path) -> None:
    """A causal LM returns a key/value cache the exporter cannot write (it failed on
    ``DynamicCache``): it is exported as its next-token logits without the cache.  Where
    the exporter also fails on the dynamic axes (Hugging Face decoders with torch 2.14),
    the file has the example's shapes and says so.  The model's mode is left as it was."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.GPTBigCodeConfig(vocab_size=60, n_embd=32, n_layer=2, n_head=4)
    lm = transformers.GPTBigCodeForCausalLM(cfg).eval()
    calib = [{"input_ids": torch.randint(0, 60, (8, 10))} for _ in range(4)]
    small, _ = spectrim.compress(lm, calib, "id", "heads=0.5", sequential=False)
    example = {"input_ids": torch.randint(0, 60, (2, 6)),
               "attention_mask": torch.ones(2, 6, dtype=torch.long)}  # fmt: skip
    result = export_onnx(small, example, tmp_path / "lm.onnx")
    assert result["outputs"] == 1 and result["max_abs_diff"] < 1e-4
    assert result["dynamic"] or "fixed shapes" in result["note"]
    assert not small.training and not list(tmp_path.glob(".*.tmp"))


def test_a_file_that_computes_otherwise_is_not_written(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The onnxruntime check runs before the file replaces anything: outputs further from
    PyTorch's than ``rtol`` allows leave the old file as it was and raise."""
    import spectrim.io.onnx as onnx_io

    target = tmp_path / "net.onnx"
    target.write_bytes(b"old")
    monkeypatch.setattr(onnx_io, "_check", lambda *a: (0.5, 1.0, ["x"], 1))
    with pytest.raises(RuntimeError, match=r"differ from PyTorch's by up to 0\.5.*not written"):
        export_onnx(nn.Linear(2, 2).eval(), torch.randn(1, 2), target)
    assert target.read_bytes() == b"old" and not list(tmp_path.glob(".*.tmp"))
    result = export_onnx(nn.Linear(2, 2).eval(), torch.randn(1, 2), target, rtol=None)
    assert result["max_abs_diff"] == 0.5  # reported, not refused


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
