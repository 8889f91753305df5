"""The benchmark scripts: found, described, and each run at its smoke size so none rots."""

from __future__ import annotations

import importlib.util
import json
import math
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from spectrim import bench

ROOT = Path(__file__).resolve().parents[1]
FOUND = bench.find(ROOT / "benchmarks")

#: optional packages a benchmark needs beyond the test extras
NEEDS = {
    "anchor_torch_pruning": ["torch_pruning"],
    "side_by_side": ["torch_pruning"],
}


def _numbers(obj: Any) -> list[float]:
    if isinstance(obj, bool):
        return []
    if isinstance(obj, int | float):
        return [float(obj)]
    if isinstance(obj, dict):
        return [x for v in obj.values() for x in _numbers(v)]
    if isinstance(obj, list):
        return [x for v in obj for x in _numbers(v)]
    return []


def test_every_benchmark_declares_a_smoke_run_and_an_out_file() -> None:
    assert len(FOUND) >= 20
    for name, b in FOUND.items():
        assert b.smoke is not None, f"{name}: no SMOKE"
        assert b.summary, f"{name}: no docstring"
        assert "--out" in b.options, f"{name}: no --out"
    assert "_results" not in FOUND  # helpers are not benchmarks


@pytest.fixture(scope="module")
def zygote() -> Iterator[subprocess.Popen[str]]:
    """One process with torch, transformers and spectrim imported, which forks a child per
    smoke run (tests/_bench_zygote.py): each script still runs in a fresh process of its
    own, without paying 4-9 s of imports every time."""
    proc = subprocess.Popen(
        [sys.executable, str(Path(__file__).with_name("_bench_zygote.py"))],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env=bench.child_env(),
        cwd=ROOT,
    )
    yield proc
    assert proc.stdin is not None
    proc.stdin.close()
    proc.wait(timeout=60)


def _smoke(zygote: subprocess.Popen[str], b: bench.Benchmark, argv: list[str], log: Path) -> int:
    """Run ``b`` at its smoke size in a child of ``zygote``, as ``bench.run(b, argv,
    smoke=True)`` runs it in a fresh Python; its exit status."""
    assert zygote.stdin is not None and zygote.stdout is not None
    b, args, cwd = bench.invocation(b, argv, smoke=True)
    req = {"path": str(b.path), "argv": args, "cwd": str(cwd), "log": str(log), "timeout": 600}
    zygote.stdin.write(json.dumps(req) + "\n")
    zygote.stdin.flush()
    line = zygote.stdout.readline()
    assert line, f"the smoke-run parent died (exit {zygote.poll()})"
    code: int = json.loads(line)["code"]
    return code


@pytest.mark.benchmark  # about 3 minutes in all: CI runs them (-m "not slow"), plain pytest not
@pytest.mark.parametrize("name", sorted(FOUND))
def test_smoke_run(name: str, tmp_path: Path, zygote: subprocess.Popen[str]) -> None:
    for module in NEEDS.get(name, []):
        if importlib.util.find_spec(module) is None:
            pytest.skip(f"{name} needs {module}")
    out, log = tmp_path / f"{name}.json", tmp_path / f"{name}.log"
    code = _smoke(zygote, FOUND[name], ["--out", str(out)], log)
    assert code == 0, log.read_text(errors="replace")[-4000:]
    result = json.loads(out.read_text(encoding="utf-8"))
    numbers = _numbers(result)
    assert numbers, f"{name}: no numbers in {out}"
    assert all(math.isfinite(x) or math.isnan(x) for x in numbers)
    if name == "side_by_side":
        assert out.with_suffix(".png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        variants = {r["variant"] for r in result["runs"]}
        assert {"spectrim id+residual", "spectrim l1", "tp l1"} <= variants
        for r in result["runs"]:  # every variant lands on the asked MACs
            assert abs(r["macs_ratio"] - r["target_macs"]) < 0.02, r


def test_unknown_benchmark_is_named_with_the_known_ones() -> None:
    with pytest.raises(KeyError, match=r"no benchmark .nope.; known: .*side_by_side"):
        bench.run("nope", folder=ROOT / "benchmarks")


def test_smoke_of_a_script_without_smoke_is_refused(tmp_path: Path) -> None:
    (tmp_path / "plain.py").write_text('"""Plain."""\nprint("hi")\n')
    assert bench.find(tmp_path)["plain"].smoke is None
    with pytest.raises(ValueError, match="declares no SMOKE"):
        bench.run("plain", smoke=True, folder=tmp_path)


def test_a_smoke_that_is_not_a_literal_list_of_strings_is_refused(tmp_path: Path) -> None:
    (tmp_path / "bad.py").write_text('"""Bad."""\nSMOKE = ["--n", 2]\n')
    with pytest.raises(ValueError, match="list of strings"):
        bench.find(tmp_path)
    (tmp_path / "bad.py").write_text('"""Bad."""\nSMOKE = list("ab")\n')
    with pytest.raises(ValueError, match="literal list"):
        bench.find(tmp_path)


def test_missing_folder_says_where_it_looked(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"no benchmarks folder.*--benchmarks DIR"):
        bench.benchmarks_dir(tmp_path / "absent")


def test_options_are_the_add_argument_literals_only(tmp_path: Path) -> None:
    """A ``--threads`` in a docstring, comment or help text is not an option the script
    takes (the CLI passes ``--threads`` on only to scripts that declare it)."""
    (tmp_path / "b.py").write_text(
        '"""Runs with "--threads" in its prose."""\n'
        "import argparse\n"
        'SMOKE = ["--n", "1"]\n'
        'HELP = "--threads is not taken"  # "--threads"\n'
        "ap = argparse.ArgumentParser()\n"
        'ap.add_argument("--n", "-n", type=int, help="not --threads")\n'
        'ap.add_argument("--out")\n'
    )
    assert bench.find(tmp_path)["b"].options == frozenset({"--n", "--out"})
