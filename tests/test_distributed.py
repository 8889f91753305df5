"""Data-parallel statistics on torch.distributed: two gloo processes against one.

Each run is a set of fresh processes (tests/_distributed_worker.py) with one thread each,
so the single-process reference computes every batch's activations exactly as the ranks
do; the processes' results must then agree to float64 rounding of the reduction.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

import spectrim
from spectrim.distributed import SOLO, DistributedError, Team

WORKER = Path(__file__).with_name("_distributed_worker.py")


def _start(
    scenarios: list[str], world: int, tmp: Path
) -> tuple[list[subprocess.Popen[bytes]], Path]:
    """Start ``world`` worker processes that run through ``scenarios`` in turn."""
    name = "+".join(scenarios)
    out = tmp / f"{name}-{world}"
    out.mkdir()
    init = tmp / f"init-{name}-{world}"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, str(WORKER), ",".join(scenarios)]
    procs = [
        subprocess.Popen(
            [*cmd, str(r), str(world), str(init), str(out)],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        for r in range(world)
    ]
    return procs, out


def _finish(
    started: tuple[list[subprocess.Popen[bytes]], Path], scenarios: list[str], timeout: float
) -> dict[str, list[Any]]:
    """Wait for the processes of :func:`_start`; per scenario, each rank's result dict or
    its error text."""
    procs, out = started
    logs = []
    try:
        for p in procs:
            logs.append(p.communicate(timeout=timeout)[0].decode(errors="replace"))
    finally:
        for p in procs:
            p.kill()
    results: dict[str, list[Any]] = {}
    for scenario in scenarios:
        for r in range(len(procs)):
            err, pt = out / f"{scenario}-rank{r}.err", out / f"{scenario}-rank{r}.pt"
            if err.exists():
                results.setdefault(scenario, []).append(err.read_text())
            elif pt.exists():
                results.setdefault(scenario, []).append(torch.load(pt, weights_only=False))
            else:
                raise AssertionError(f"rank {r} wrote nothing for {scenario}:\n{logs[r][-3000:]}")
    return results


def _launch(
    scenarios: list[str], world: int, tmp: Path, timeout: float = 240
) -> dict[str, list[Any]]:
    """Run ``world`` worker processes through ``scenarios`` in turn; per scenario, each
    rank's result dict or its error text."""
    return _finish(_start(scenarios, world, tmp), scenarios, timeout)


def _same_model(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    """The largest absolute difference of two state_dicts of identical names and shapes."""
    assert list(a) == list(b)
    worst = 0.0
    for name in a:
        assert a[name].shape == b[name].shape, name
        if a[name].is_floating_point():
            worst = max(worst, float((a[name].double() - b[name].double()).abs().max()))
        else:
            assert torch.equal(a[name], b[name]), name
    return worst


SCENARIOS = (
    "id select residual obs joint heads heads-budget heads-query experts experts-few "
    "experts-budget hidden "
    "sketch blocks "
    "blocks-span blocks-stats"
).split()


def _needs(scenario: str) -> str | None:
    """The optional package a scenario needs, if it is missing."""
    import importlib.util

    need = (
        "transformers"
        if scenario.startswith(("heads", "hidden", "experts"))
        else "torchvision"
        if scenario.startswith("blocks-")
        else None
    )
    return need if need is not None and importlib.util.find_spec(need) is None else None


@pytest.fixture(scope="module")
def launched(data_root: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Every scenario, run by one process and by two (one launch each, all scenarios in
    turn: a process pays for its imports and its process group once).  The two launches
    run at the same time: each process has one thread, and the results do not depend on
    what else the machine runs."""
    runnable = [s for s in SCENARIOS if _needs(s) is None]
    tmp = tmp_path_factory.mktemp("distributed")
    started_one, started_two = _start(runnable, 1, tmp), _start(runnable, 2, tmp)
    try:
        two = _finish(started_two, runnable, timeout=900)
        one = _finish(started_one, runnable, timeout=900)
    finally:  # none left running when the other launch failed
        for p in started_one[0] + started_two[0]:
            p.kill()
    return {s: (one[s][0], two[s]) for s in runnable}


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_two_processes_equal_one(scenario: str, launched: dict[str, Any]) -> None:
    """Two gloo processes, each with half the batches, keep the same channels or heads
    (every shape equal) or the same non-zeros, with weights equal to 1e-10, as one process
    with all."""
    if _needs(scenario):
        pytest.skip(f"{scenario} needs {_needs(scenario)}")
    one, two = launched[scenario]
    assert isinstance(one, dict), one
    assert all(isinstance(r, dict) for r in two), two
    for rank in two:
        assert _same_model(one["state"], rank["state"]) <= 1e-10
    r1, r2 = one["report"], two[0]["report"]
    assert (
        r2["calibration_rows"]
        == r1["calibration_rows"]
        == (16 if scenario == "experts-few" else 128)
    )
    if scenario == "hidden":
        assert r1["params_after"] == r2["params_after"] < r1["params_before"]
        (g1,) = r1["groups"]
        assert g1["width_after"] == r2["groups"][0]["width_after"] == 48
    elif scenario.startswith("heads"):
        assert r1["params_after"] == r2["params_after"] < r1["params_before"]
        heads = [(g["name"], g["width_after"]) for g in r1["groups"] if "heads" in g["name"]]
        assert heads and heads == [
            (g["name"], g["width_after"]) for g in r2["groups"] if "heads" in g["name"]
        ]
        assert any(w < 4 for _, w in heads)
    elif scenario == "experts-budget":  # one allocation, made once: the same everywhere
        widths = [(g["name"], g["width_after"]) for g in r1["groups"] if "(" in g["name"]]
        assert widths == [(g["name"], g["width_after"]) for g in r2["groups"] if "(" in g["name"]]
        assert any(n.endswith("(experts)") and w < 32 for n, w in widths), widths
        assert r1["macs_after"] / r1["macs_before"] <= 0.6 + 1e-3
    elif scenario == "experts":
        widths = [(g["name"], g["width_after"]) for g in r1["groups"]]
        assert widths == [(g["name"], g["width_after"]) for g in r2["groups"]]
        assert [w for _, w in widths] == [16, 16]
        assert r2["groups"][0]["rows"] == r1["groups"][0]["rows"] == 128 * 12 * 2
    elif scenario == "experts-few":  # 16 · 12 tokens, 2 each, over 16 experts of 32
        assert [g["width_after"] for g in r1["groups"]] == [16, 16]
        assert r2["groups"][0]["rows"] == r1["groups"][0]["rows"] == 16 * 12 * 2
    elif scenario == "sketch":  # Ω follows the batch, not the rank: the same sketches
        rows = [g["sketch_rows"] for g in r1["groups"]]
        assert rows == [g["sketch_rows"] for g in r2["groups"]]
        assert rows.count(32) == 3 and rows.count(None) == len(rows) - 3
        assert r1["macs_after"] / r1["macs_before"] <= 0.51
    elif scenario == "blocks":
        assert r1["blocks"] == r2["blocks"] == 9
        assert r2["fitted_examples"] == r1["fitted_examples"] == 32
    elif scenario in ("blocks-span", "blocks-stats"):  # a block per residual block, the stem
        assert r1["sequential_fit"] == r2["sequential_fit"] == "residual"
        assert r1["blocks"] == r2["blocks"] >= 9
        widths = [(g["name"], g["width_after"]) for g in r1["groups"]]
        assert widths == [(g["name"], g["width_after"]) for g in r2["groups"]]
        narrowed = {g["name"] for g in r1["groups"] if g["width_after"] < g["width_before"]}
        assert narrowed & {"conv1", "layer2.0.conv2", "layer3.0.conv2"}, narrowed  # a stream
    elif scenario in ("id", "select", "residual"):
        assert r2["fitted_examples"] == r1["fitted_examples"] == 32
        widths = [(g["name"], g["width_after"]) for g in r1["groups"]]
        assert widths == [(g["name"], g["width_after"]) for g in r2["groups"]]
        assert r1["macs_after"] / r1["macs_before"] <= 0.51  # something was pruned
        if scenario == "residual":  # the stream's readers, on rows summed over the ranks
            fits1, fits2 = r1["readers"]["refitted"], r2["readers"]["refitted"]
            # of eight, layer3's three have 2048 rows for 577 unknowns (32 images): left
            assert len(fits1) == 5 and fits1.keys() == fits2.keys()
            assert r1["readers"]["skipped"] == r2["readers"]["skipped"]
            assert all(abs(fits1[n][1] - fits2[n][1]) < 1e-10 for n in fits1)
    elif scenario == "joint":  # both stages ran, with rank 0's allocation on every rank
        widths = [(g["name"], g["width_after"]) for g in r1["groups"]]
        assert widths == [(g["name"], g["width_after"]) for g in r2["groups"]]
        assert any(g["width_after"] < g["width_before"] for g in r1["groups"])
        j1, j2 = r1["config"]["joint"], r2["config"]["joint"]
        assert j1["densities"] == j2["densities"] and min(j1["densities"].values()) < 1
        assert r2["nonzeros_after"] == r1["nonzeros_after"] < r1["nonzeros_before"]
    else:
        assert r2["nonzeros_after"] == r1["nonzeros_after"] < 0.6 * r1["nonzeros_before"]


def test_failure_on_one_rank_fails_both(data_root: Path, tmp_path: Path) -> None:
    """A failure inside rank 1's forward pass reaches rank 0 as a DistributedError with
    rank 1's message (no hang: the launch has a timeout)."""
    r0, r1 = _launch(["fail"], 2, tmp_path, timeout=120)["fail"]
    assert r1 == "ValueError: a planted failure on rank 1"
    assert r0.startswith("DistributedError") and "rank 1" in r0 and "planted failure" in r0


def test_team_of_one_is_a_no_op() -> None:
    team = Team()
    assert team.solo and team.is_root and SOLO.solo
    acc = spectrim.calibration.GramAccumulator(2)
    acc.update(torch.ones(3, 2))
    team.reduce({"a": acc})
    assert acc.count == 3 and team.total(2.5) == 2.5
    with pytest.raises(ValueError, match="boom"):
        team.sync(ValueError("boom"))
    assert issubclass(DistributedError, RuntimeError)
