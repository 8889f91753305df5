"""The spectrim CLI, run in-process through ``main([...])``."""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from spectrim.cli import main
from spectrim.io import MANIFEST_FILE, ORIGINAL_FILE, WEIGHTS_FILE, load_compressed
from spectrim.zoo import DigitsCNN, train_digits_cnn

COMMANDS = ["compress", "eval", "export", "demo", "list", "doctor"]
SHARED_DATA = Path("/work/shared/data")


@pytest.fixture(scope="module")
def digits_model() -> nn.Module:
    return train_digits_cnn(seed=0, epochs=3)[0].eval()


@pytest.fixture(scope="module")
def model_files(digits_model: nn.Module, tmp_path_factory: pytest.TempPathFactory) -> dict:
    folder = tmp_path_factory.mktemp("models")
    pickled = folder / "digits_full.pt"
    torch.save(digits_model, pickled)
    scripted = folder / "digits_script.pt"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.jit.save(torch.jit.script(digits_model), str(scripted))
    return {"pickle": pickled, "torchscript": scripted}


def _run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text())


# ------------------------------------------------------------------------------------- help


@pytest.mark.parametrize("command", COMMANDS)
def test_help_has_examples(command: str, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = _run(capsys, command, "--help")
    assert code == 0
    assert "Example" in out and f"spectrim {command}" in out


def test_top_level_help_and_version(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = _run(capsys, "--help")
    assert code == 0 and "Example" in out and "compress" in out
    code, out, _ = _run(capsys, "--version")
    assert code == 0 and "spectrim" in out


def test_list(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    code, out, _ = _run(capsys, "list", "--json", str(tmp_path / "l.json"))
    assert code == 0
    assert "resnet56-cifar10" in out and "digits" in out
    data = _json(tmp_path / "l.json")
    assert {"id", "l1", "l2", "random"} <= set(data["methods"])
    assert "resnet20-cifar10" in data["models"] and "cifar10" in data["datasets"]


# --------------------------------------------------------------------------------- compress


def _check_compress_json(data: dict[str, Any], target: str = "macs=0.5") -> None:
    for key in (
        "method",
        "target",
        "params_before",
        "params_after",
        "macs_before",
        "macs_after",
        "accuracy_before",
        "accuracy_after",
        "agreement",
        "seconds",
        "widths",
        "report",
    ):
        assert key in data, key
    assert data["target"] == target
    assert isinstance(data["accuracy_after"], float) and 0.0 <= data["accuracy_after"] <= 1.0
    assert 0.0 <= data["agreement"] <= 1.0
    assert data["macs_after"] < data["macs_before"]
    assert data["params_after"] < data["params_before"]
    assert data["seconds"] > 0
    assert all(len(v) == 2 and v[1] <= v[0] for v in data["widths"].values())
    assert data["report"]["macs_after"] == data["macs_after"]


@pytest.mark.parametrize("kind", ["pickle", "torchscript"])
def test_compress_model_file_on_digits(
    kind: str, model_files: dict, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out_dir = tmp_path / "small"
    json_path = tmp_path / "result.json"
    trust = ["--trust-pickle"] if kind == "pickle" else []
    code, out, err = _run(
        capsys,
        "compress",
        *trust,
        "--model",
        str(model_files[kind]),
        "--data",
        "digits",
        "--method",
        "id",
        "--target",
        "macs=0.5",
        "--calib",
        "300",
        "--out",
        str(out_dir),
        "--json",
        str(json_path),
    )
    assert code == 0, err
    data = _json(json_path)
    _check_compress_json(data)
    assert data["method"] == "id"
    assert data["calibration_examples"] == 300 and data["eval_examples"] == 500
    assert data["accuracy_after"] >= 0.8
    assert "agreement" in out and "saved to" in out
    assert (out_dir / WEIGHTS_FILE).is_file() and (out_dir / MANIFEST_FILE).is_file()
    assert (out_dir / ORIGINAL_FILE).read_bytes() == model_files[kind].read_bytes()
    manifest = _json(out_dir / MANIFEST_FILE)
    assert manifest["arch"] == {"file": ORIGINAL_FILE}
    assert set(manifest["files"]) == {WEIGHTS_FILE, ORIGINAL_FILE, "report.json"}
    # rebuilt from the copy of the original file + manifest (a pickle only when trusted)
    reloaded = load_compressed(out_dir, trust_code=kind == "pickle")
    assert sum(p.numel() for p in reloaded.parameters()) == data["params_after"]


def test_compress_json_to_stdout_and_latency(
    model_files: dict, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, err = _run(
        capsys,
        "compress",
        "--model",
        str(model_files["pickle"]),
        "--trust-pickle",
        "--data",
        "digits",
        "--method",
        "l1",
        "--target",
        "params=0.5",
        "--calib",
        "200",
        "--eval-limit",
        "100",
        "--round-to",
        "4",
        "--latency",
        "--latency-repeats",
        "3",
        "--json",
        "-",
    )
    assert code == 0, err
    data = json.loads(out)  # stdout holds only the JSON; text went to stderr
    _check_compress_json(data, "params=0.5")
    assert data["method"] == "l1" and data["eval_examples"] == 100
    assert all(v[1] % 4 == 0 or v[1] == v[0] for v in data["widths"].values())
    lat = data["latency"]
    assert lat["original_median"] > 0 and lat["compressed_median"] > 0 and lat["speedup"] > 0
    assert "accuracy" in err


def test_eval_compressed_folder(
    model_files: dict, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out_dir = tmp_path / "small"
    code, _, err = _run(
        capsys,
        "compress",
        "--model",
        str(model_files["pickle"]),
        "--trust-pickle",
        "--data",
        "digits",
        "--target",
        "macs=0.6",
        "--calib",
        "200",
        "--out",
        str(out_dir),
        "--json",
        str(tmp_path / "c.json"),
        "--quiet",
    )
    assert code == 0, err
    compressed = _json(tmp_path / "c.json")
    code, out, err = _run(
        capsys,
        "eval",
        "--model",
        str(out_dir),
        "--trust-pickle",
        "--data",
        "digits",
        "--json",
        str(tmp_path / "e.json"),
    )
    assert code == 0, err
    data = _json(tmp_path / "e.json")
    assert data["n"] == 500
    assert data["accuracy"] == pytest.approx(compressed["accuracy_after"])
    assert data["agreement"] == pytest.approx(compressed["agreement"])
    assert data["reference_accuracy"] == pytest.approx(compressed["accuracy_before"])
    assert data["params"] == compressed["params_after"]
    assert data["macs"] == compressed["macs_after"]
    assert data["macs_reference"] == compressed["macs_before"]
    assert "accuracy" in out and "MACs" in out

    # a plain model file, limited, without reference
    code, out, err = _run(
        capsys,
        "eval",
        "--model",
        str(model_files["torchscript"]),
        "--data",
        "digits",
        "--limit",
        "50",
        "--json",
        "-",
    )
    assert code == 0, err
    data = json.loads(out)
    assert data["n"] == 50 and data["agreement"] is None and 0 <= data["accuracy"] <= 1


def test_compress_user_tensor_file(
    model_files: dict, digits_model: nn.Module, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from spectrim.zoo import load_dataset

    x, y = load_dataset("digits", "test").tensors
    torch.save({"x": x[:300], "y": y[:300]}, tmp_path / "data.pt")
    code, _, err = _run(
        capsys,
        "compress",
        "--model",
        str(model_files["pickle"]),
        "--trust-pickle",
        "--data",
        str(tmp_path / "data.pt"),
        "--method",
        "l1",
        "--calib",
        "200",
        "--target",
        "width=0.5",
        "--json",
        str(tmp_path / "r.json"),
    )
    assert code == 0, err
    data = _json(tmp_path / "r.json")
    assert data["calibration_examples"] == 200 and data["eval_examples"] == 100
    assert 0.0 <= data["accuracy_after"] <= 1.0


@pytest.mark.skipif(not SHARED_DATA.is_dir(), reason="offline data not found")
def test_compress_pretrained_resnet20_cifar10(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SPECTRIM_DATA", os.environ.get("SPECTRIM_DATA") or str(SHARED_DATA))
    json_path = tmp_path / "r20.json"
    code, _, err = _run(
        capsys,
        "compress",
        "--model",
        "resnet20-cifar10",
        "--data",
        "cifar10",
        "--method",
        "id",
        "--target",
        "macs=0.7",
        "--calib",
        "200",
        "--eval-limit",
        "200",
        "--no-verify",
        "--out",
        str(tmp_path / "r20"),
        "--json",
        str(json_path),
    )
    assert code == 0, err
    data = _json(json_path)
    _check_compress_json(data, "macs=0.7")
    assert data["accuracy_before"] >= 0.85
    assert data["accuracy_after"] >= 0.5
    assert isinstance(data["agreement"], float) and data["agreement"] >= 0.5
    assert data["macs_after"] <= 0.72 * data["macs_before"]
    assert _json(tmp_path / "r20" / MANIFEST_FILE)["arch"] == {"zoo": "resnet20-cifar10"}


# ----------------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    ("argv", "culprit"),
    [
        (["--target", "macs=abc"], "macs=abc"),
        (["--target", "flops=0.5"], "flops=0.5"),
        (["--target", "macs=1.5"], "macs=1.5"),
        (["--method", "svd"], "'svd'"),
        (["--model", "resnet99-cifar10"], "resnet99-cifar10"),
        (["--model", "/nonexistent/model.pt"], "/nonexistent/model.pt"),
        (["--data", "imagenet"], "imagenet"),
        (["--calib", "0"], "--calib"),
        (["--option", "theta"], "theta"),
        (["--option", "thetaa=0.3"], "thetaa"),
        (["--method", "spectral", "--option", "theta=2"], "theta=2"),
        (["--option", "seed=3"], "--seed"),
        (["--method", "id", "--target", "dof=1e-3"], "dof"),
    ],
)
def test_compress_errors_exit_2(
    argv: list[str], culprit: str, model_files: dict, capsys: pytest.CaptureFixture[str]
) -> None:
    base = {"--model": str(model_files["pickle"]), "--data": "digits", "--target": "macs=0.5"}
    for flag, value in zip(argv[::2], argv[1::2]):
        base[flag] = value
    args = ["compress", "--trust-pickle"] + [item for pair in base.items() for item in pair]
    code, _, err = _run(capsys, *args)
    assert code == 2
    assert culprit in err
    assert "Traceback" not in err
    assert len(err.strip().splitlines()) == 1, err


def test_bad_model_file_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "weights.pt"
    torch.save(DigitsCNN().state_dict(), bad)
    code, _, err = _run(capsys, "compress", "--model", str(bad), "--data", "digits")
    assert code == 2
    assert "weights.pt" in err and "state dict" in err
    code, _, err = _run(capsys, "eval", "--model", str(tmp_path), "--data", "digits")
    assert code == 2 and "manifest.json" in err


def test_debug_shows_traceback(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(Exception, match="imagenet"):
        main(["compress", "--model", "resnet20-cifar10", "--data", "imagenet", "--debug"])


def test_missing_required_and_unknown_command(capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = _run(capsys, "compress", "--data", "digits")
    assert code == 2 and "--model" in err
    code, _, err = _run(capsys, "shrink")
    assert code == 2 and "shrink" in err


def test_compress_unlabelled_image_folder(
    model_files: dict, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import numpy as np
    from PIL import Image

    from spectrim.zoo import load_dataset

    x, _ = load_dataset("digits", "test", limit=60).tensors
    folder = tmp_path / "images"
    folder.mkdir()
    for i, img in enumerate(x[:, 0]):
        Image.fromarray((img.numpy() * 255).round().astype(np.uint8)).save(folder / f"{i:03d}.png")
    code, out, err = _run(
        capsys,
        "compress",
        "--model",
        str(model_files["pickle"]),
        "--trust-pickle",
        "--data",
        str(folder),
        "--grayscale",
        "--calib",
        "40",
        "--method",
        "l1",
        "--target",
        "macs=0.5",
        "--json",
        "-",
    )
    assert code == 0, err
    data = json.loads(out)
    assert data["calibration_examples"] == 40 and data["eval_examples"] == 20
    assert data["accuracy_after"] is None  # no labels: agreement only
    assert 0.0 <= data["agreement"] <= 1.0
    assert data["macs_after"] < data["macs_before"]


def test_an_eval_split_alone_is_cut_like_one_set(tmp_path: Path) -> None:
    """A folder with only ``test/`` calibrates on its first examples and evaluates on the
    rest, not on all of them (the calibration examples were scored too)."""
    from argparse import Namespace

    import numpy as np
    from PIL import Image

    from spectrim.cli._common import load_data

    (tmp_path / "test").mkdir()
    rng = np.random.default_rng(0)
    for i in range(12):
        img = rng.integers(0, 256, size=(5, 5), dtype=np.uint8)
        Image.fromarray(img).save(tmp_path / "test" / f"{i:02d}.png")
    args = Namespace(seed=0, file_order=False, grayscale=True)
    cut = load_data(str(tmp_path), 8, None, args)
    assert cut.calib is not None and cut.shared and "eval split" in cut.note
    calib, rest = cut.calib.tensors[0], cut.eval.tensors[0]
    assert len(calib) == 8 and len(rest) == 4
    every = load_data(str(tmp_path), None, None, args).eval.tensors[0]
    assert torch.equal(torch.cat([calib, rest]), every)  # disjoint, the same order
    nothing_left = load_data(str(tmp_path), 12, None, args)
    assert not nothing_left.shared and "no examples left" in nothing_left.note


def test_eval_leaves_out_the_eval_splits_calibration_images(
    model_files: dict, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A folder with only ``test/``: ``eval`` of the compressed folder scores the 20
    images ``compress`` scored, not the 40 it calibrated on as well."""
    import numpy as np
    from PIL import Image

    from spectrim.zoo import load_dataset

    x, _ = load_dataset("digits", "test", limit=60).tensors
    (tmp_path / "images" / "test").mkdir(parents=True)
    for i, img in enumerate(x[:, 0]):
        pixels = (img.numpy() * 255).round().astype(np.uint8)
        Image.fromarray(pixels).save(tmp_path / "images" / "test" / f"{i:03d}.png")
    data, out_dir = str(tmp_path / "images"), str(tmp_path / "small")
    code, out, err = _run(capsys, "compress", "--model", str(model_files["pickle"]),
                          "--trust-pickle", "--data", data, "--grayscale", "--calib", "40",
                          "--target", "macs=0.6", "--out", out_dir, "--json", "-", "--quiet")  # fmt: skip
    assert code == 0, err
    compressed = json.loads(out)
    code, out, err = _run(capsys, "eval", "--model", out_dir, "--trust-pickle", "--data", data,
                          "--grayscale", "--json", "-", "--quiet")  # fmt: skip
    assert code == 0, err
    evaluated = json.loads(out)
    assert compressed["eval_examples"] == evaluated["n"] == 20
    assert evaluated["calibration_left_out"] == 40
    assert evaluated["agreement"] == pytest.approx(compressed["agreement"])


def test_compress_one_shot_and_fraction_flags(
    model_files: dict, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    reports, warned, searched, readers = {}, {}, {}, {}
    for flags in (
        ["--one-shot"],
        ["--sequential-fraction", "0.5"],
        ["--sequential-select"],
        ["--sequential-fit", "residual"],
        ["--refit-readers"],
        ["--stats-memory", "3MiB"],
        ["--blockwise"],
        ["--block-cache", str(tmp_path / "blocks")],
        ["--block-statistics"],
    ):
        json_path = tmp_path / "r.json"
        code, _, err = _run(
            capsys,
            "compress",
            "--model",
            str(model_files["pickle"]),
            "--trust-pickle",
            "--overwrite",
            "--data",
            "digits",
            "--target",
            "macs=0.5",
            "--calib",
            "200",
            "--out",
            str(tmp_path / "o"),
            "--json",
            str(json_path),
            *flags,
        )
        assert code == 0, err
        reports[flags[0]] = _json(json_path)["report"]["config"]
        warned[flags[0]] = _json(json_path)["report"]["warnings"]
        searched[flags[0]] = _json(json_path)["report"]["search"]
        readers[flags[0]] = _json(json_path)["report"]["readers"]
    assert reports["--one-shot"]["sequential"] is False
    assert reports["--sequential-fraction"]["sequential"] is True
    assert reports["--sequential-fraction"]["sequential_fraction"] == 0.5
    assert reports["--sequential-select"]["sequential_select"] is True
    assert reports["--one-shot"]["sequential_select"] is False
    assert reports["--sequential-fit"]["sequential_fit"] == "residual"
    assert reports["--one-shot"]["sequential_fit"] == "auto"
    assert reports["--refit-readers"]["refit_readers"] is True
    assert readers["--refit-readers"] is not None and readers["--one-shot"] is None
    assert reports["--stats-memory"]["stats_memory"] == "3MiB"
    assert reports["--blockwise"]["blockwise"] is True
    assert reports["--block-cache"]["block_cache"] == str(tmp_path / "blocks")
    # the digits CNN has no chain of blocks: the flag reached the pass, which says so
    assert any(w.startswith("block_cache: ") for w in warned["--block-cache"])
    assert not any(w.startswith("block_cache: ") for w in warned["--blockwise"])
    assert reports["--block-statistics"]["block_statistics"] is True
    assert reports["--blockwise"]["block_statistics"] is False
    assert any(w.startswith("block_statistics: ") for w in warned["--block-statistics"])
    assert searched["--blockwise"] is None
    # --search reaches the run, which says why it cannot score here: the digits CNN's fits
    # take all 200 examples (32 rows per channel), so none are left to score candidates on
    code, _, err = _run(
        capsys, "compress", "--model", str(model_files["pickle"]), "--trust-pickle",
        "--data", "digits", "--calib", "200", "--out", str(tmp_path / "s"), "--search", "1",
    )  # fmt: skip
    assert code != 0 and "search=1 scores each candidate" in err and "fitted all 200" in err
    code, _, err = _run(
        capsys, "compress", "--model", str(model_files["pickle"]), "--trust-pickle",
        "--data", "digits", "--calib", "64", "--out", str(tmp_path / "bad"),
        "--stats-memory", "lots",
    )  # fmt: skip
    assert code == 2 and "memory size 'lots'" in err


def test_compress_repair_flags(
    model_files: dict, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    json_path = tmp_path / "r.json"
    code, _, err = _run(
        capsys, "compress", "--model", str(model_files["pickle"]), "--trust-pickle",
        "--data", "digits", "--target", "macs=0.5", "--calib", "256", "--out",
        str(tmp_path / "o"), "--json", str(json_path), "--repair-epochs", "2",
        "--repair-data", "digits", "--repair-limit", "512", "--repair-augment", "flip",
        "--repair-optimizer", "adamw", "--repair-lr", "1e-4", "--repair-features", "0.5",
        "--repair-warmup", "0.25", "--repair-average", "0.9", "--repair-mix", "0.4",
    )  # fmt: skip
    assert code == 0, err
    rep = _json(json_path)["report"]["repair"]
    assert rep["steps"] == 8 and rep["examples"] == 1024  # 512 images in batches of 128
    assert rep["config"]["augment"] == "flip" and rep["config"]["epochs"] == 2.0
    assert rep["config"]["optimizer"] == "adamw" and rep["config"]["features"] == 0.5
    assert rep["config"]["warmup"] == 0.25 and rep["config"]["average"] == 0.9
    assert rep["config"]["mix"] == 0.4 and not rep["warnings"]  # digit images: all blended
    code, _, err = _run(
        capsys, "compress", "--model", str(model_files["pickle"]), "--trust-pickle",
        "--data", "digits", "--calib", "64", "--out", str(tmp_path / "p"),
        "--repair-data", "digits",
    )  # fmt: skip
    assert code == 2 and "--repair-data needs --repair-epochs" in err


def test_compress_method_options_reach_the_method(
    digits_model: nn.Module, model_files: dict, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``-o KEY=VALUE`` gives the same model as the same options passed to the Python API."""
    import spectrim
    from spectrim.zoo import load_dataset

    argv = ["--model", str(model_files["pickle"]), "--trust-pickle", "--data", "digits"]
    argv += ["--calib", "200"]
    argv += ["--method", "spectral", "--target", "macs=0.5", "--out", str(tmp_path / "o")]
    argv += ["-o", "theta=0", "--option", "tau=none", "-o", "alpha=1e-3"]
    code, _, err = _run(capsys, "compress", *argv, "--json", str(tmp_path / "r.json"))
    assert code == 0, err
    data = _json(tmp_path / "r.json")
    assert data["options"] == {"theta": 0, "tau": "none", "alpha": 1e-3}
    assert data["report"]["config"]["options"] == data["options"]

    calib = load_dataset("digits", "train", limit=200).tensors[0]
    ref, _ = spectrim.compress(
        digits_model, calib, method="spectral", target="macs=0.5", theta=0.0, tau="none", alpha=1e-3
    )
    other, _ = spectrim.compress(digits_model, calib, method="spectral", target="macs=0.5")
    small = load_compressed(tmp_path / "o", trust_code=True)
    x = load_dataset("digits", "test", limit=64).tensors[0]
    with torch.no_grad():
        got, want, default = small(x), ref(x), other(x)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(got, default, atol=1e-4)  # the options changed the model


def test_compress_to_a_latency_target(
    model_files: dict, capsys: pytest.CaptureFixture[str]
) -> None:
    """``--target latency=F``: measured at ``--latency-batch``, every round in the JSON."""
    code, out, err = _run(
        capsys, "compress", "--model", str(model_files["pickle"]), "--trust-pickle",
        "--data", "digits", "--method", "l1", "--target", "latency=0.7", "--calib", "200",
        "--eval-limit", "100", "--latency-batch", "64", "--json", "-", "--quiet",
    )  # fmt: skip
    assert code == 0, err
    lat = json.loads(out)["report"]["latency"]
    assert lat["target"] == 0.7 and lat["batch"] == 64 and lat["rounds"]
    assert lat["measured"] == min(
        (r["measured"] for r in lat["rounds"]), key=lambda m: abs(m - 0.7)
    )
