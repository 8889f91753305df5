"""``spectrim bench``: list the benchmarks, run one with its arguments or its smoke size."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from spectrim.cli import main

SCRIPT = '''"""Echo: writes its arguments to --out."""
import argparse, json, sys
SMOKE = ["--n", "3"]
ap = argparse.ArgumentParser()
ap.add_argument("--n", type=int, default=1)
ap.add_argument("--out", required=True)
args = ap.parse_args()
open(args.out, "w").write(json.dumps({"n": args.n, "argv": sys.argv[1:]}))
print("echo ran")
sys.exit(3 if args.n == 13 else 0)
'''


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    (tmp_path / "benchmarks").mkdir()
    (tmp_path / "benchmarks" / "echo.py").write_text(SCRIPT)
    (tmp_path / "benchmarks" / "_shared.py").write_text("X = 1\n")
    return tmp_path / "benchmarks"


def test_list_as_json(folder: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["bench", "--benchmarks", str(folder), "--json", "-"]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert list(listed) == ["echo"]
    assert listed["echo"]["summary"] == "Echo: writes its arguments to --out."
    assert listed["echo"]["smoke"] == ["--n", "3"]


def test_run_passes_the_arguments_after_the_dashes(folder: Path, tmp_path: Path) -> None:
    out = tmp_path / "o.json"
    assert (
        main(["bench", "echo", "--benchmarks", str(folder), "--", "--n", "7", "--out", str(out)])
        == 0
    )
    assert json.loads(out.read_text())["n"] == 7


def test_smoke_puts_its_output_in_a_temporary_folder(
    folder: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    assert main(["bench", "echo", "--smoke", "--benchmarks", str(folder), "--json", "-"]) == 0
    captured = capfd.readouterr()
    record = json.loads(captured.out)  # the child's own output went to stderr
    assert "echo ran" in captured.err
    assert record["exit_code"] == 0 and record["args"][0] == "--out"
    assert not Path(record["args"][1]).exists()  # the temporary folder is gone


def test_the_benchmark_exit_code_is_returned(folder: Path, tmp_path: Path) -> None:
    out = str(tmp_path / "o.json")
    assert (
        main(["bench", "echo", "--benchmarks", str(folder), "--", "--n", "13", "--out", out]) == 3
    )


def test_unknown_name_is_one_line(folder: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["bench", "nope", "--benchmarks", str(folder)]) == 2
    err = capsys.readouterr().err
    assert "no benchmark 'nope'; known: echo" in err and "Traceback" not in err


def test_the_checkouts_benchmarks_are_found(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["bench", "--json", "-", "-q"]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert "side_by_side" in listed and "resnet56" in listed


def test_benchmark_arguments_without_the_dashes_are_refused(
    folder: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["bench", "echo", "--benchmarks", str(folder), "--n", "7"]) == 2
    assert "the benchmark's own arguments go after --" in capsys.readouterr().err


def test_threads_go_to_a_benchmark_that_takes_them(
    folder: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "o.json"
    assert (
        main(
            [
                "bench",
                "echo",
                "--threads",
                "1",
                "--benchmarks",
                str(folder),
                "--",
                "--out",
                str(out),
            ]
        )
        == 2
    )
    assert "takes no --threads" in capsys.readouterr().err
    script = (
        (folder / "echo.py")
        .read_text()
        .replace(
            'ap.add_argument("--n"', 'ap.add_argument("--threads", type=int)\nap.add_argument("--n"'
        )
    )
    (folder / "echo.py").write_text(script)
    assert (
        main(
            [
                "bench",
                "echo",
                "--threads",
                "1",
                "--benchmarks",
                str(folder),
                "--",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    assert json.loads(out.read_text())["argv"][-2:] == ["--threads", "1"]
