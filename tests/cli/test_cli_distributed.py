"""``torchrun --nproc_per_node 2 -m spectrim compress``: two processes, one result."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ARGS = ["compress", "--model", "resnet20-cifar10", "--data", "cifar10", "--calib", "256",
        "--eval-limit", "300", "--target", "macs=0.5", "--threads", "1"]  # fmt: skip


def _env(data_root: Path) -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1",
            "SPECTRIM_DATA": str(data_root.resolve())}  # fmt: skip


def test_torchrun_two_processes_match_one(data_root: Path, tmp_path: Path) -> None:
    """Rank 0 alone saves and writes the JSON; the model equals one process's (same
    accuracy, agreement and costs on the held-out images)."""
    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent))
    if torchrun is None:
        pytest.skip("torchrun is not installed next to this Python")
    one = subprocess.run(
        [sys.executable, "-m", "spectrim", *ARGS, "--json", str(tmp_path / "one.json")],
        env=_env(data_root), capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    assert one.returncode == 0, one.stderr
    two = subprocess.run(
        [torchrun, "--standalone", "--nproc_per_node", "2", "-m", "spectrim", *ARGS,
         "--json", str(tmp_path / "two.json"), "--out", str(tmp_path / "small")],
        env=_env(data_root), capture_output=True, text=True, timeout=300, check=False, cwd=tmp_path,
    )  # fmt: skip
    assert two.returncode == 0, two.stderr[-3000:]
    assert two.stdout.count("saved to") == 1  # rank 0 alone reports
    a, b = (
        json.loads((tmp_path / "one.json").read_text()),
        json.loads((tmp_path / "two.json").read_text()),
    )
    for key in (
        "accuracy_after",
        "agreement",
        "macs_after",
        "params_after",
        "calibration_examples",
    ):
        assert a[key] == b[key], key
    assert (tmp_path / "small" / "model.safetensors").is_file()
