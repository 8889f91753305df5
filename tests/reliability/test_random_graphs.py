"""Property tests over random small graphs (MLPs and CNNs with random widths, residual
adds, concatenations, BatchNorm and tied weights) and random targets."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from _random_nets import RandomNet, random_spec  # tests/reliability is on sys.path
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import spectrim
from spectrim.io import save_compressed

ROWS = {"mlp": 300, "cnn": 48}


def _build(spec: dict, seed: int) -> tuple[RandomNet, torch.Tensor, torch.Tensor]:
    torch.manual_seed(seed)
    net = RandomNet(**spec).eval()
    g = torch.Generator().manual_seed(seed)
    return net, net.example(ROWS[spec["kind"]], g), net.example(16, g)


def _close(a: torch.Tensor, b: torch.Tensor, rtol: float) -> bool:
    return bool((a - b).abs().max() <= rtol * (a.abs().max() + 1e-12))


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    rng=st.randoms(use_true_random=False),
    kind=st.sampled_from(["macs", "params", "width"]),
    value=st.floats(0.15, 1.0),
    method=st.sampled_from(["id", "spectral", "l1"]),
    sequential=st.booleans(),
)
def test_random_graph_compresses_safely(
    rng: random.Random, kind: str, value: float, method: str, sequential: bool
) -> None:
    spec = random_spec(rng)
    net, calib, fresh = _build(spec, rng.randint(0, 10_000))
    with torch.no_grad():
        ref = net(fresh)
    small, report = spectrim.compress(
        net, calib, method=method, target=f"{kind}={value:.3f}", sequential=sequential
    )
    with torch.no_grad():
        out = small(fresh)
    assert out.shape == ref.shape
    assert bool(torch.isfinite(out).all())
    assert report.macs_after <= report.macs_before
    assert report.params_after <= report.params_before
    unreachable = any("unreachable" in w for w in report.warnings)
    if kind in ("macs", "params") and not unreachable:
        reached = report.macs_ratio if kind == "macs" else report.params_ratio
        assert reached <= float(f"{value:.3f}") * (1 + 1e-9), (spec, report.table())
    for i, op in enumerate(net.ops):
        if op == "tied":
            assert small.blocks[i].b.weight is small.blocks[i].a.weight
    # the user's model is untouched
    with torch.no_grad():
        assert torch.equal(net(fresh), ref)


@settings(max_examples=20, deadline=None)
@given(rng=st.randoms(use_true_random=False), target=st.sampled_from(["macs=1", "width=1"]))
def test_full_budget_reproduces_the_original(rng: random.Random, target: str) -> None:
    spec = random_spec(rng)
    net, calib, fresh = _build(spec, rng.randint(0, 10_000))
    small, report = spectrim.compress(net, calib, target=target)
    assert report.macs_after == report.macs_before
    with torch.no_grad():
        assert _close(net(fresh), small(fresh), 1e-5)


_CHECK = """
import json, sys, torch
sys.path.insert(0, sys.argv[1])
from _random_nets import RandomNet
from spectrim.io import load_compressed
results = []
for folder in json.loads(sys.argv[2]):
    model = load_compressed(folder, classes=[RandomNet])
    data = torch.load(folder + "/../io.pt", weights_only=True)
    with torch.no_grad():
        results.append(bool(torch.equal(model(data["x"]), data["y"])))
print(json.dumps(results))
"""


def test_save_load_in_a_fresh_process(tmp_path: Path) -> None:
    """Saved folders of random compressed graphs rebuild bit-identical models in another
    Python process (from the recorded class, given explicitly)."""
    rng = random.Random(1234)
    folders = []
    for i in range(12):
        spec = random_spec(rng)
        net, calib, fresh = _build(spec, i)
        target = rng.choice(["macs=0.5", "params=0.6", "width=0.7"])
        small, report = spectrim.compress(net, calib, target=target)
        root = tmp_path / f"net{i}"
        arch = {"class": f"{RandomNet.__module__}.RandomNet", "kwargs": spec}
        save_compressed(small, root / "model", report, arch=arch)
        with torch.no_grad():
            torch.save({"x": fresh, "y": small(fresh)}, root / "io.pt")
        folders.append(str(root / "model"))
    out = subprocess.run(
        [
            sys.executable,
            "-c",
            textwrap.dedent(_CHECK),
            str(Path(__file__).parent),
            json.dumps(folders),
        ],
        capture_output=True,
        text=True,
        check=False,
        env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)},
        timeout=300,
    )
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout.strip().splitlines()[-1]) == [True] * len(folders)


@pytest.mark.parametrize("seed", range(3))
def test_random_graph_spec_builds(seed: int) -> None:
    spec = random_spec(random.Random(seed))
    net, calib, _ = _build(spec, seed)
    assert net(calib).shape == (len(calib), spec["classes"])
