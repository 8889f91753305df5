"""``spectrim analyze``, run in-process through ``main([...])``."""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch

from spectrim.cli import main
from spectrim.diagnostics import PLOT_TITLES, CompressibilityReport
from spectrim.zoo import DigitsCNN

R20_LAYERS = [f"layer{s}.{b}.conv1" for s in (1, 2, 3) for b in range(3)]


def _run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.fixture(scope="module")
def digits_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An (untrained, seeded) DigitsCNN saved as TorchScript (loads without --trust-pickle)."""
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("models") / "digits.pt"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.jit.save(torch.jit.script(DigitsCNN().eval()), str(path))
    return path


def test_help_has_examples(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = _run(capsys, "analyze", "--help")
    assert code == 0
    assert "Example" in out and "spectrim analyze --model resnet56-cifar10" in out
    for flag in ("--calib", "--heldout", "--error", "--sensitivity-fraction", "--json", "--out"):
        assert flag in out
    code, out, _ = _run(capsys, "--help")
    assert code == 0 and "analyze" in out


def test_analyze_pretrained_resnet20(
    data_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out_dir = tmp_path / "r20"
    json_path = tmp_path / "r20.json"
    argv = "analyze --model resnet20-cifar10 --data cifar10 --calib 128 --heldout 64"
    argv += " --max-sensitivity-groups 3"
    code, out, err = _run(capsys, *argv.split(), "--out", str(out_dir), "--json", str(json_path))
    assert code == 0, err
    table = out.split("\n\n")[0].splitlines()
    assert table[0].split()[:2] == ["layer", "width"]
    assert [line.split()[0] for line in table[2:11]] == R20_LAYERS
    assert "128 calibration / 64 held-out examples" in out
    assert "Spearman" in out and "report.html" in out
    for name in ("report.html", "report.md", "report.json", *(f"{p}.png" for p in PLOT_TITLES)):
        assert (out_dir / name).is_file(), name

    data: dict[str, Any] = json.loads(json_path.read_text())
    assert data["model"] == "resnet20-cifar10" and data["data"] == "cifar10"
    assert data["summary"]["groups"] == 9 and data["summary"]["sensitivity_groups"] == 3
    assert set(data["files"]) >= {"json", "markdown", "html"}
    report = CompressibilityReport.from_dict(data["report"])
    assert report.heldout_source == "the first 64 evaluation examples of cifar10"
    assert report.sensitivity_metric == "accuracy" and report.baseline_accuracy is not None
    assert [g.name for g in report.groups] == R20_LAYERS
    saved = CompressibilityReport.from_json((out_dir / "report.json").read_text())
    assert saved == report


def test_analyze_model_file_heldout_split_json_stdout(
    digits_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    options = "--data digits --calib 200 --heldout 0 --error 0.2 --alphas 1e-3,1e-2"
    options += " --sensitivity-fraction 0.5 --json -"
    code, out, err = _run(
        capsys,
        "analyze",
        "--model",
        str(digits_file),
        "--out",
        str(tmp_path / "report"),
        *options.split(),
    )
    assert code == 0, err
    data = json.loads(out)  # stdout holds only the JSON, the table went to stderr
    assert "conv3" in err and "Spearman" in err
    report = CompressibilityReport.from_dict(data["report"])
    assert (report.n_calibration, report.n_heldout) == (150, 50)
    assert "last 50 of 200" in report.heldout_source
    assert report.alphas == [1e-3, 1e-2] and report.error == 0.2
    assert [g.name for g in report.groups] == ["conv1", "conv2", "conv3", "fc1"]
    assert report.sensitivity_metric == "accuracy"  # the digits split carries labels
    for g in report.groups:
        assert g.sensitivity is not None and g.sensitivity.width == round(0.5 * g.width)


def test_analyze_unlabelled_tensor_file_uses_agreement(
    digits_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from spectrim.zoo import load_dataset

    images = tmp_path / "images.pt"
    torch.save(load_dataset("digits", "test", limit=48).tensors[0].clone(), images)
    json_path = tmp_path / "r.json"
    paths = ["--model", str(digits_file), "--data", str(images), "--out", str(tmp_path / "o")]
    code, out, err = _run(
        capsys, "analyze", *paths, *"--heldout 0 --no-verify --quiet --json".split(), str(json_path)
    )
    assert code == 0, err
    assert out == ""  # --quiet
    report = CompressibilityReport.from_dict(json.loads(json_path.read_text())["report"])
    assert (report.n_calibration, report.n_heldout) == (36, 12)
    assert report.sensitivity_metric == "agreement"
    assert "no labels" in report.sensitivity_meaning


@pytest.mark.parametrize(
    ("argv", "culprit"),
    [
        (["--sensitivity-fraction", "1.5"], "--sensitivity-fraction"),
        (["--error", "-1"], "--error"),
        (["--alphas", "0,1e-3"], "--alphas"),
        (["--heldout", "x"], "--heldout"),
        (["--model", "resnet99-cifar10"], "resnet99-cifar10"),
        (["--data", "imagenet"], "imagenet"),
        (["--out", "FILE"], "is not a directory"),
    ],
)
def test_analyze_errors_exit_2(
    argv: list[str],
    culprit: str,
    digits_file: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    a_file = tmp_path / "file.txt"
    a_file.write_text("x")
    base = {"--model": str(digits_file), "--data": "digits", "--out": str(tmp_path / "o")}
    for flag, value in zip(argv[::2], argv[1::2]):
        base[flag] = str(a_file) if value == "FILE" else value
    args = ["analyze"] + [item for pair in base.items() for item in pair]
    code, _, err = _run(capsys, *args)
    assert code == 2
    assert culprit in err
    assert "Traceback" not in err
    assert len(err.strip().splitlines()) == 1, err


def test_analyze_requires_out(capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = _run(capsys, "analyze", "--model", "resnet20-cifar10", "--data", "cifar10")
    assert code == 2 and "--out" in err
