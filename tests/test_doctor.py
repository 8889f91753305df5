"""``spectrim doctor``: versions, threads, data files and their checksums."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from spectrim.cli import main
from spectrim.doctor import doctor, render
from spectrim.zoo.download import FILES

RESNET20 = "cifar10-resnet-akamaster/resnet20-12fca82f.th"


def test_doctor_reports_versions_threads_and_verified_files(data_root: Path) -> None:
    info = doctor()
    assert info["packages"]["torch"] and info["packages"]["safetensors"]
    assert info["threads"]["torch_intra_op"] >= 1
    files = info["data"]["files"]
    assert set(files) == set(FILES)
    present = [f for f in files.values() if f["path"] is not None]
    assert present and all(f["verified"] for f in present)
    text = render(info)
    assert "verified" in text and "threads:" in text and "chromium" in text


def test_doctor_finds_a_corrupt_file(
    data_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    (tmp_path / RESNET20).parent.mkdir(parents=True)
    shutil.copyfile(data_root / RESNET20, tmp_path / RESNET20)
    with open(tmp_path / RESNET20, "r+b") as fh:
        fh.seek(1000)
        byte = fh.read(1)
        fh.seek(1000)
        fh.write(bytes([byte[0] ^ 1]))
    monkeypatch.setenv("SPECTRIM_DATA", str(tmp_path))
    monkeypatch.setenv("SPECTRIM_CACHE", str(tmp_path / "cache"))
    code = main(["doctor", "--json", "-"])
    out = capsys.readouterr()
    assert code == 1
    info = json.loads(out.out)
    entry = info["data"]["files"][RESNET20]
    assert entry["verified"] is False and "sha256" in entry["error"]
    assert info["data"]["files"]["mnist/t10k-labels-idx1-ubyte.gz"]["path"] is None
    assert "CORRUPT" in out.err
    assert main(["doctor", "--no-verify", "-q"]) == 0
