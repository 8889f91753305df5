"""Find and run the benchmark scripts of a spectrim checkout (``spectrim bench NAME``).

The benchmarks are scripts under ``benchmarks/`` in the source tree, not part of the
installed package: each prints its table and writes one JSON file (``--out``).  Every
script declares ``SMOKE``, a literal list of arguments for a run of a few seconds that
the test suite makes on every commit so none of them rots; ``run(name, smoke=True)``
uses it.  Scripts are read with :mod:`ast` (their docstring and ``SMOKE``), never
imported, until one is run in a child Python process.

Example:
    >>> import pathlib, tempfile
    >>> folder = pathlib.Path(tempfile.mkdtemp())
    >>> _ = (folder / "tiny.py").write_text("'''A tiny benchmark.'''\\nSMOKE = ['--n', '2']\\n")
    >>> found = find(folder)
    >>> found["tiny"].summary, found["tiny"].smoke
    ('A tiny benchmark.', ['--n', '2'])
"""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import IO

__all__ = ["Benchmark", "benchmarks_dir", "child_env", "find", "invocation", "run"]


@dataclass(frozen=True)
class Benchmark:
    """One benchmark script: its name (the file stem), path, first docstring line, smoke
    arguments (``None`` when the script declares none) and the command-line options it
    declares (every ``--name`` literal given to an ``add_argument`` call)."""

    name: str
    path: Path
    summary: str
    smoke: list[str] | None
    options: frozenset[str] = frozenset()


def benchmarks_dir(folder: str | os.PathLike[str] | None = None) -> Path:
    """The benchmarks folder: ``folder``, else ``$SPECTRIM_BENCHMARKS``, else
    ``./benchmarks``, else the one next to this package's source tree (an editable
    install of a checkout).  Raises ``FileNotFoundError`` naming where it looked."""
    tried: list[Path] = []
    candidates: list[str | os.PathLike[str]] = []
    if folder is not None:
        candidates = [folder]
    else:
        if os.environ.get("SPECTRIM_BENCHMARKS"):
            candidates.append(os.environ["SPECTRIM_BENCHMARKS"])
        candidates += [
            Path.cwd() / "benchmarks",
            Path(__file__).resolve().parents[2] / "benchmarks",
        ]
    for candidate in candidates:
        path = Path(candidate).expanduser()
        tried.append(path)
        if path.is_dir():
            return path.resolve()
    raise FileNotFoundError(
        "no benchmarks folder (the scripts ship with the source checkout, not the wheel); "
        f"looked in {', '.join(map(str, tried))}; pass --benchmarks DIR or set SPECTRIM_BENCHMARKS"
    )


def _read(path: Path) -> Benchmark:
    try:
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    except (SyntaxError, UnicodeDecodeError) as exc:
        raise ValueError(f"benchmark {path}: cannot be parsed: {exc}") from exc
    doc = ast.get_docstring(tree) or ""
    smoke: list[str] | None = None
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(
            isinstance(t, ast.Name) and t.id == "SMOKE" for t in node.targets
        ):
            try:
                value = ast.literal_eval(node.value)
            except ValueError as exc:
                raise ValueError(f"benchmark {path}: SMOKE must be a literal list") from exc
            if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                raise ValueError(f"benchmark {path}: SMOKE must be a list of strings")
            smoke = value
    summary = doc.strip().splitlines()[0] if doc.strip() else ""
    options = frozenset(
        arg.value
        for node in ast.walk(tree)
        if isinstance(node, ast.Call)
        and isinstance(node.func, ast.Attribute)
        and node.func.attr == "add_argument"
        for arg in node.args
        if isinstance(arg, ast.Constant)
        and isinstance(arg.value, str)
        and arg.value.startswith("--")
    )
    return Benchmark(path.stem, path, summary, smoke, options)


def find(folder: str | os.PathLike[str] | None = None) -> dict[str, Benchmark]:
    """Every benchmark script in the folder (see :func:`benchmarks_dir`), by name.
    Files starting with ``_`` are shared helpers, not benchmarks."""
    root = benchmarks_dir(folder)
    return {p.stem: _read(p) for p in sorted(root.glob("*.py")) if not p.name.startswith("_")}


def child_env() -> dict[str, str]:
    """The environment a benchmark runs in: this process's, with ``SPECTRIM_DATA`` made
    absolute (the script runs in the benchmarks' parent folder)."""
    env = dict(os.environ)
    if "SPECTRIM_DATA" in env:
        env["SPECTRIM_DATA"] = str(Path(env["SPECTRIM_DATA"]).resolve())
    return env


def invocation(
    name: str | Benchmark,
    args: list[str] | None = None,
    *,
    smoke: bool = False,
    folder: str | os.PathLike[str] | None = None,
) -> tuple[Benchmark, list[str], Path]:
    """What :func:`run` runs: the benchmark, its arguments (after its ``SMOKE`` ones when
    ``smoke``) and the folder it runs in (the benchmarks' parent).  Raises ``KeyError``
    naming the known benchmarks for an unknown name, ``ValueError`` for ``smoke`` on a
    script that declares no ``SMOKE``."""
    if isinstance(name, Benchmark):
        bench = name
    else:
        found = find(folder)
        if name not in found:
            raise KeyError(f"no benchmark {name!r}; known: {', '.join(found) or 'none'}")
        bench = found[name]
    argv = list(args or [])
    if smoke:
        if bench.smoke is None:
            raise ValueError(f"benchmark {bench.name!r} declares no SMOKE arguments ({bench.path})")
        argv = bench.smoke + argv
    return bench, argv, bench.path.parent.parent


def run(
    name: str | Benchmark,
    args: list[str] | None = None,
    *,
    smoke: bool = False,
    folder: str | os.PathLike[str] | None = None,
    timeout: float | None = None,
    stdout: IO[str] | None = None,
) -> int:
    """Run benchmark ``name`` (or an already found :class:`Benchmark`) in a child Python process with ``args`` (after its ``SMOKE``
    arguments when ``smoke``); its output goes to this process's stdout/stderr.  Returns
    the exit code.  ``stdout``: where the child's standard output goes instead (e.g.
    ``sys.stderr`` when this process's stdout carries JSON).  Raises ``KeyError`` naming
    the known benchmarks for an unknown name."""
    bench, argv, cwd = invocation(name, args, smoke=smoke, folder=folder)
    proc = subprocess.run(
        [sys.executable, str(bench.path), *argv],
        cwd=cwd,
        env=child_env(),
        timeout=timeout,
        stdout=stdout,
        check=False,
    )
    return proc.returncode
