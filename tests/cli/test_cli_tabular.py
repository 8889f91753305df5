"""``spectrim compress`` on tabular features: the real California housing data as a ``.csv``
(a ``target`` column) and as an ``N × F`` ``.npz``, an MLP regressor trained on it."""

from __future__ import annotations

import csv
import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from spectrim.cli import main
from spectrim.zoo.datasets import load_image_folder


@pytest.fixture(scope="module")
def housing(data_root: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    src = data_root / "california-housing" / "housing.csv"
    if not src.is_file():
        pytest.skip(f"{src} not found")
    cols = ["median_income", "housing_median_age", "total_rooms", "population", "households",
            "latitude", "longitude"]  # fmt: skip
    rows = []
    with src.open(encoding="utf-8") as f:
        for r in csv.DictReader(f):
            rows.append([float(r[c]) for c in cols] + [float(r["median_house_value"]) / 1e5])
    data = np.asarray(rows[:1200])
    x = (data[:, :-1] - data[:, :-1].mean(0)) / data[:, :-1].std(0)
    y = data[:, -1]
    folder = tmp_path_factory.mktemp("tabular")
    with (folder / "housing.csv").open("w", encoding="utf-8") as f:
        f.write(",".join([*cols, "target"]) + "\n")
        for xi, yi in zip(x, y, strict=True):
            f.write(",".join(f"{v:.6f}" for v in [*xi, yi]) + "\n")
    np.savez(folder / "housing.npz", x=x.astype(np.float32))
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(7, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 1))
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    xt, yt = torch.tensor(x, dtype=torch.float32), torch.tensor(y, dtype=torch.float32)
    for _ in range(300):
        loss = nn.functional.mse_loss(net(xt).squeeze(-1), yt)
        opt.zero_grad()
        loss.backward()
        opt.step()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.jit.save(torch.jit.script(net.eval()), str(folder / "mlp.pt"))
    return {
        "csv": folder / "housing.csv",
        "npz": folder / "housing.npz",
        "model": folder / "mlp.pt",
    }


def test_csv_features_with_a_target_column(housing: dict[str, Path]) -> None:
    ds = load_image_folder(housing["csv"])
    x, y = ds.tensors
    assert x.shape == (1200, 7) and bool((y == -1).all())  # regression: no classes


@pytest.mark.parametrize("fmt", ["csv", "npz"])
def test_compress_tabular_mlp(fmt: str, housing: dict[str, Path], tmp_path: Path) -> None:
    report = tmp_path / "r.json"
    argv = ["compress", "--model", str(housing["model"]), "--data", str(housing[fmt]),
            "--calib", "800", "--target", "width=0.5", "--json", str(report), "--quiet"]  # fmt: skip
    assert main(argv) == 0
    r = json.loads(report.read_text())
    assert r["eval_examples"] == 400 and r["accuracy_after"] is None
    assert r["params_ratio"] < 0.6
    assert r["fidelity"]["rel_l2"] < 0.2  # half of each hidden layer, corrected: outputs kept


def test_too_few_rows_for_every_layer_is_said_once(
    housing: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """20 rows for 64-wide layers: nothing is compressed, and the command says so first
    among its warnings (not again as a Python RuntimeWarning on stderr)."""
    argv = ["compress", "--model", str(housing["model"]), "--data", str(housing["npz"]),
            "--calib", "20", "--target", "width=0.5", "--out", str(tmp_path / "small")]  # fmt: skip
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        assert main(argv) == 0
    out, err = capsys.readouterr()
    assert not [w for w in seen if "came back unchanged" in str(w.message)]
    lines = [line for line in out.splitlines() if line.startswith("warning: ")]
    assert lines[0].startswith(
        "warning: compress: target width=0.5 asked for a smaller model, but the model came "
        "back unchanged: "
    ), out
    assert "too few calibration rows" in lines[0]
    # once: on stdout, not again on stderr (the Python copy is checked on `seen` above:
    # pytest records warnings, so they never reach stderr here)
    assert sum("came back unchanged" in line for line in out.splitlines()) == 1
    assert "came back unchanged" not in err


def test_a_bad_csv_value_is_named(tmp_path: Path) -> None:
    (tmp_path / "bad.csv").write_text("a,b,y\n1,2,0\n3,x,1\n")
    with pytest.raises(ValueError, match=r"line 3: 'x' is not a number"):
        load_image_folder(tmp_path / "bad.csv")


def test_one_sorted_file_is_cut_into_uniform_samples(housing: dict[str, Path]) -> None:
    """The housing rows come sorted by region: the first 200 span a quarter of the
    latitudes.  The CLI's split draws the rows in a random order from --seed, so the
    calibration and evaluation parts both span the file; --file-order keeps the prefix."""
    from argparse import Namespace

    from spectrim.cli._common import load_data

    whole = load_image_folder(housing["csv"]).tensors[0]
    lat = 5  # the normalised latitude column

    def span(x: torch.Tensor) -> float:
        return float(x[:, lat].max() - x[:, lat].min())

    drawn = load_data(str(housing["csv"]), 200, None, Namespace(seed=0, file_order=False))
    first = load_data(str(housing["csv"]), 200, None, Namespace(seed=0, file_order=True))
    assert drawn.order == "random, seed 0" and first.order == "file order"
    assert torch.equal(first.calib.tensors[0], whole[:200])  # type: ignore[union-attr]
    order = torch.randperm(len(whole), generator=torch.Generator().manual_seed(0))
    assert torch.equal(drawn.calib.tensors[0], whole[order[:200]])  # type: ignore[union-attr]
    assert torch.equal(drawn.eval.tensors[0], whole[order[200:]])
    assert span(first.calib.tensors[0]) < 0.5 * span(whole)  # type: ignore[union-attr]
    assert span(drawn.calib.tensors[0]) > 0.9 * span(whole)  # type: ignore[union-attr]
    other = load_data(str(housing["csv"]), 200, None, Namespace(seed=1, file_order=False))
    assert not torch.equal(other.calib.tensors[0], drawn.calib.tensors[0])  # type: ignore[union-attr]


def test_eval_leaves_out_the_rows_that_calibrated_the_model(
    housing: dict[str, Path], tmp_path: Path
) -> None:
    """``eval`` of a compressed folder on the file it was calibrated on scores the rows
    ``compress`` held out, in the compression's order even under ``--file-order``; a changed
    file or ``--include-calibration`` scores every row."""
    out_dir, report = tmp_path / "small", tmp_path / "r.json"
    data = tmp_path / "housing.csv"
    data.write_bytes(housing["csv"].read_bytes())
    argv = ["compress", "--model", str(housing["model"]), "--data", str(data), "--calib",
            "800", "--target", "width=0.5", "--out", str(out_dir), "--json", str(report),
            "--quiet"]  # fmt: skip
    assert main(argv) == 0
    compressed = json.loads(report.read_text())

    def evaluate(*flags: str) -> dict:
        got = tmp_path / "e.json"
        argv = ["eval", "--model", str(out_dir), "--data", str(data), "--json", str(got)]
        assert main([*argv, "--quiet", *flags]) == 0
        return json.loads(got.read_text())

    for flags in ([], ["--file-order"]):
        held_out = evaluate(*flags)
        assert held_out["n"] == 400 and held_out["calibration_left_out"] == 800
        rel = held_out["fidelity"]["rel_l2"]
        assert rel == pytest.approx(compressed["fidelity"]["rel_l2"], rel=1e-6)
    everything = evaluate("--include-calibration")
    assert everything["n"] == 1200 and everything["calibration_left_out"] == 0
    lines = data.read_text().splitlines()
    data.write_text("\n".join([*lines[:-1], lines[1]]) + "\n")  # the same length, changed
    changed = evaluate()
    assert changed["n"] == 1200 and changed["calibration_left_out"] == 0
