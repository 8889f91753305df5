"""spectrim.demo.run_demo and ``spectrim demo``: offline, digits bundled with scikit-learn."""

from __future__ import annotations

import functools
import io
import json
from pathlib import Path

import pytest

import spectrim.zoo
from spectrim.cli import main
from spectrim.demo import run_demo
from spectrim.methods import available

_train_once = functools.lru_cache(maxsize=None)(spectrim.zoo.train_digits_cnn)


@pytest.fixture(autouse=True)
def _train_digits_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """Train the (deterministic) digits CNN once for this module's tests."""
    monkeypatch.setattr(spectrim.zoo, "train_digits_cnn", _train_once)


def test_run_demo_every_method(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SPECTRIM_DATA", raising=False)  # needs no data root and no network
    out = io.StringIO()
    rows = run_demo(targets=("macs=0.5",), file=out)
    assert [r["method"] for r in rows] == available("channel")
    by_method = {r["method"]: r for r in rows}
    for row in rows:
        assert row["target"] == "macs=0.5"
        assert row["macs_after"] < row["macs_before"]
        assert row["macs_ratio"] <= 0.52
        assert 0.0 <= row["accuracy_after"] <= 1.0 and 0.0 <= row["agreement"] <= 1.0
        assert row["seconds"] > 0
    assert by_method["id"]["accuracy_before"] >= 0.9
    assert by_method["id"]["accuracy_after"] >= 0.8
    assert by_method["id"]["accuracy_after"] >= by_method["l1"]["accuracy_after"] - 0.02
    text = out.getvalue()
    assert "acc after" in text and "DigitsCNN" in text
    assert all(m in text for m in available("channel"))


def test_run_demo_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError, match="unknown method 'svd'"):
        run_demo(methods=["svd"])
    with pytest.raises(ValueError, match="macs=7"):
        run_demo(targets=("macs=7",))


def test_demo_command(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = main(
        [
            "demo",
            "--methods",
            "l1,random",
            "--targets",
            "macs=0.6",
            "--json",
            str(tmp_path / "d.json"),
        ]
    )
    captured = capsys.readouterr()
    assert code == 0, captured.err
    data = json.loads((tmp_path / "d.json").read_text())
    assert [r["method"] for r in data["rows"]] == ["l1", "random"]
    assert "macs=0.6" in captured.out
    code = main(["demo", "--methods", "id,svd"])
    assert code == 2 and "svd" in capsys.readouterr().err
