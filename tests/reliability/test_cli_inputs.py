"""Bad input to the command line: exit code 2, one line on stderr naming the culprit, no
traceback (without --debug), and nothing written."""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch

from spectrim.cli import main
from spectrim.io import MANIFEST_FILE, ORIGINAL_FILE, WEIGHTS_FILE
from spectrim.zoo import train_digits_cnn


def _run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Model, data and folder files, good and bad."""
    root = tmp_path_factory.mktemp("inputs")
    model = train_digits_cnn(seed=0, epochs=2)[0].eval()
    out: dict[str, Path] = {}
    out["script"] = root / "digits.ts"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.jit.save(torch.jit.script(model), str(out["script"]))
    out["pickle"] = root / "digits_full.pt"
    torch.save(model, out["pickle"])
    out["state"] = root / "weights.pt"
    torch.save(model.state_dict(), out["state"])
    out["truncated"] = root / "truncated.pt"
    out["truncated"].write_bytes(out["script"].read_bytes()[:3000])
    out["text"] = root / "notes.pt"
    out["text"].write_text("not a model at all")
    x = torch.rand(40, 1, 8, 8)
    out["nan"] = root / "nan.pt"
    bad = x.clone()
    bad[17, 0, 1, 1] = float("nan")
    torch.save({"x": bad}, out["nan"])
    out["zeros"] = root / "zeros.pt"
    torch.save({"x": torch.zeros(40, 1, 8, 8)}, out["zeros"])
    out["empty"] = root / "empty.pt"
    torch.save({"x": torch.zeros(0, 1, 8, 8)}, out["empty"])
    out["nonempty"] = root / "taken"
    out["nonempty"].mkdir()
    (out["nonempty"] / "keep.txt").write_text("mine")
    return out


# (id, argv with {placeholders} for the files, culprit in the message)
CASES: list[Any] = [
    ("unknown model", "compress --model resnet99 --data digits", "resnet99"),
    ("unknown dataset", "compress --model {script} --data imagenet", "imagenet"),
    ("missing model file", "compress --model /nope/model.pt --data digits", "/nope/model.pt"),
    ("truncated model file", "compress --model {truncated} --data digits", "truncated.pt"),
    ("non-model file", "compress --model {text} --data digits", "notes.pt"),
    ("bare state dict", "compress --model {state} --data digits", "state dict"),
    ("pickle without opt-in", "compress --model {pickle} --data digits", "--trust-pickle"),
    ("wrong input shape", "compress --model resnet20-cifar10 --data digits --calib 8", "by itself"),
    ("empty calibration", "compress --model {script} --data {empty}", "no calibration"),
    ("NaN in the data", "compress --model {script} --data {nan} --calib 30", "example 17"),
    ("all-zero data", "compress --model {script} --data {zeros} --calib 30", "identical"),
    ("malformed target", "compress --model {script} --data digits --target macs", "'macs'"),
    ("target out of range", "compress --model {script} --data digits --target width=0", "width=0"),
    ("unknown method", "compress --model {script} --data digits --method svd", "'svd'"),
    ("unknown option", "compress --model {script} --data digits -o rigde=1", "rigde"),
    ("option of wrong type", "compress --model {script} --data digits -o ridge=abc", "ridge='abc'"),
    ("non-empty --out", "compress --model {script} --data digits --out {nonempty}", "--overwrite"),
    ("--out on /proc", "compress --model {script} --data digits --out /proc/spectrim-x", "/proc"),
    ("--json into a folder", "compress --model {script} --data digits --json {nonempty}",
     "is a directory"),
    ("analyze into a non-empty folder", "analyze --model {script} --data digits --out {nonempty}",
     "--overwrite"),
    ("eval of a folder without manifest", "eval --model {nonempty} --data digits", "manifest.json"),
    ("bad --max-error", "compress --model {script} --data digits --max-error 0", "--max-error"),
]  # fmt: skip


@pytest.mark.parametrize(("argv", "culprit"), [pytest.param(*c[1:], id=c[0]) for c in CASES])
def test_cli_errors(
    argv: str, culprit: str, files: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    args = [a.format(**{k: str(v) for k, v in files.items()}) for a in argv.split()]
    code, _, err = _run(capsys, *args)
    assert code == 2, err
    assert culprit in err, err
    assert "Traceback" not in err
    assert len(err.strip().splitlines()) == 1, err
    assert sorted(p.name for p in files["nonempty"].iterdir()) == ["keep.txt"]  # untouched


def test_out_is_checked_before_the_run(
    files: dict[str, Path], capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    import spectrim.api

    def never(*a: Any, **k: Any) -> None:
        raise AssertionError("compress ran before --out was checked")

    monkeypatch.setattr(spectrim.api, "compress", never)
    code, _, err = _run(
        capsys, "compress", "--model", str(files["script"]), "--data", "digits",
        "--out", "/proc/spectrim-out",
    )  # fmt: skip
    assert code == 2 and "cannot write" in err


def _compress(
    capsys: pytest.CaptureFixture[str], files: dict[str, Path], out: Path, *extra: str
) -> dict:
    code, _, err = _run(
        capsys, "compress", "--model", str(files["script"]), "--data", "digits", "--calib", "300",
        "--target", "macs=0.6", "--out", str(out), "--json", str(out.parent / "r.json"), "-q",
        *extra,
    )  # fmt: skip
    assert code == 0, err
    return json.loads((out.parent / "r.json").read_text())


def test_overwrite_replaces_the_whole_folder(
    files: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "small"
    _compress(capsys, files, out)
    (out / "stale.txt").write_text("old")
    code, _, err = _run(capsys, "compress", "--model", str(files["script"]), "--data", "digits",
                        "--out", str(out))  # fmt: skip
    assert code == 2 and "--overwrite" in err and (out / "stale.txt").exists()
    _compress(capsys, files, out, "--overwrite")
    assert not (out / "stale.txt").exists()
    assert {p.name for p in out.iterdir()} == {WEIGHTS_FILE, MANIFEST_FILE, ORIGINAL_FILE,
                                               "report.json"}  # fmt: skip


def test_folder_is_self_contained_and_verified(
    files: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    model = tmp_path / "model.ts"
    shutil.copyfile(files["script"], model)
    out = tmp_path / "small"
    code, _, err = _run(capsys, "compress", "--model", str(model), "--data", "digits",
                        "--calib", "300", "--out", str(out), "-q")  # fmt: skip
    assert code == 0, err
    model.unlink()  # the original file is gone: the folder still loads and evaluates
    code, _, err = _run(capsys, "eval", "--model", str(out), "--data", "digits", "--json", "-")
    assert code == 0, err
    code, out_text, err = _run(
        capsys, "eval", "--model", str(out), "--data", "digits", "--no-reference", "--json", "-"
    )
    assert code == 0 and json.loads(out_text)["reference"] is None
    # a bit flip in the weights is refused with the file and the hashes
    data = bytearray((out / WEIGHTS_FILE).read_bytes())
    data[-7] ^= 0x20
    (out / WEIGHTS_FILE).write_bytes(bytes(data))
    code, _, err = _run(capsys, "eval", "--model", str(out), "--data", "digits")
    assert code == 2 and WEIGHTS_FILE in err and "sha256" in err and "Traceback" not in err


def test_manifest_that_would_run_code(
    files: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "small"
    _compress(capsys, files, out)
    marker = tmp_path / "pwned"
    manifest = json.loads((out / MANIFEST_FILE).read_text())
    manifest["arch"] = {"class": "os.system", "kwargs": {"command": f"touch {marker}"}}
    (out / MANIFEST_FILE).write_text(json.dumps(manifest))
    code, _, err = _run(capsys, "eval", "--model", str(out), "--data", "digits")
    assert code == 2 and "allow-list" in err and not marker.exists()


def test_pickled_model_with_opt_in(
    files: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "small"
    code, _, err = _run(capsys, "compress", "--model", str(files["pickle"]), "--trust-pickle",
                        "--data", "digits", "--calib", "300", "--out", str(out), "-q")  # fmt: skip
    assert code == 0, err
    code, _, err = _run(capsys, "eval", "--model", str(out), "--data", "digits")
    assert code == 2 and "--trust-pickle" in err  # the folder's original is a pickle
    code, _, err = _run(capsys, "eval", "--model", str(out), "--trust-pickle", "--data", "digits")
    assert code == 0, err


def test_corrupt_registry_file_on_the_cli(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    data_root: Path,
) -> None:
    rel = "cifar10-resnet-akamaster/resnet20-12fca82f.th"
    (tmp_path / rel).parent.mkdir(parents=True)
    data = bytearray((data_root / rel).read_bytes())
    data[400_000] ^= 0x01
    (tmp_path / rel).write_bytes(bytes(data))
    monkeypatch.setenv("SPECTRIM_DATA", str(tmp_path))
    code, _, err = _run(capsys, "eval", "--model", "resnet20-cifar10", "--data", "digits")
    assert code == 2 and "resnet20-12fca82f.th" in err and "expected" in err


def test_too_little_data_is_flagged_on_the_cli(
    files: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, err = _run(capsys, "compress", "--model", str(files["script"]), "--data", "digits",
                          "--calib", "3", "--target", "error=0", "-v")  # fmt: skip
    assert code == 0, err
    assert "warning: unit group 'fc1' (128 channels) kept whole" in out
    assert "3 calibration rows" in out
