"""Issue 9's defects, exercised through the API that the landed code and this one share.

Run it against any checkout to see how that version behaves, e.g. the commit before the
fixes (4b0076f) beside the current one:

    git worktree add /tmp/landed 4b0076f
    SPECTRIM_DATA=../shared/data PYTHONPATH=/tmp/landed/src .venv/bin/python benchmarks/issue9_before_after.py --out /tmp/landed.json
    SPECTRIM_DATA=../shared/data .venv/bin/python benchmarks/issue9_before_after.py

Prints one line per defect and writes ``benchmarks/results/issue9_before_after.json``
(the current code's answers).
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from _results import compress
from spectrim.io import load_compressed, save_compressed
from spectrim.zoo import CifarResNet, get_model, train_digits_cnn

# the few-second run of the test suite (tests/benchmarks/test_smoke.py; spectrim bench --smoke)
SMOKE = []  # fmt: skip


RESNET20 = "cifar10-resnet-akamaster/resnet20-12fca82f.th"


class Shared(nn.Module):
    """Two hidden layers holding one weight matrix."""

    def __init__(self) -> None:
        super().__init__()
        self.l1, self.l2, self.l3 = nn.Linear(8, 16), nn.Linear(16, 16), nn.Linear(16, 16)
        self.l4 = nn.Linear(16, 3)
        self.l3.weight = self.l2.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.l4(torch.relu(self.l3(torch.relu(self.l2(torch.relu(self.l1(x)))))))


def _error(exc: Exception) -> str:
    return f"{type(exc).__name__}: {str(exc)[:100]}"


def run() -> dict[str, Any]:
    out: dict[str, Any] = {}
    torch.manual_seed(0)
    net = Shared().eval()
    small, rep = compress(net, torch.randn(256, 8), target="error=0")
    out["1 tied weights: params before, after, still tied"] = [
        rep.params_before,
        rep.params_after,
        small.l3.weight is small.l2.weight,
    ]

    root = Path(tempfile.mkdtemp())
    src = Path(os.environ.get("SPECTRIM_DATA", "../shared/data")) / RESNET20
    (root / RESNET20).parent.mkdir(parents=True)
    data = bytearray(src.read_bytes())
    data[500_000] ^= 0xFF
    (root / RESNET20).write_bytes(bytes(data))
    saved = os.environ.get("SPECTRIM_DATA")
    os.environ["SPECTRIM_DATA"] = str(root)
    try:
        get_model("resnet20-cifar10")
        out["2 bit-flipped offline weights"] = "loaded silently"
    except Exception as exc:
        out["2 bit-flipped offline weights"] = _error(exc)
    finally:
        if saved is not None:
            os.environ["SPECTRIM_DATA"] = saved

    model, train, test = train_digits_cnn(seed=0)
    xt, yt = test.tensors
    for n in (3, 1):
        s, r = compress(model, train.tensors[0][:n], target="error=0")
        with torch.no_grad():
            acc = float((s(xt).argmax(1) == yt).float().mean())
        out[f"6 digits, calib {n}, error=0: accuracy, warnings"] = [round(acc, 3), len(r.warnings)]

    x = train.tensors[0][:300].clone()
    x[0, 0, 3, 3] = float("nan")
    try:
        _, r = compress(model, x)
        pinned = sum(1 for g in r.groups if g.pinned)
        out["7 NaN in example 0"] = f"returned, {pinned} groups pinned, NaN named: " + str(
            any("NaN" in w for w in r.warnings)
        )
    except Exception as exc:
        out["7 NaN in example 0"] = _error(exc)

    torch.manual_seed(0)
    resnet = CifarResNet(8, width=8).eval()
    _, r = compress(resnet, torch.randn(64, 3, 16, 16), target="macs=0.01")
    out["8 unreachable macs=0.01: prunable widths, unreachable warned"] = [
        [g.width_after for g in r.groups if g.pinned is None],
        any("unreachable" in w for w in r.warnings),
    ]

    try:
        compress(model, train.tensors[0][:300], ridge="abc")
        out["9 ridge='abc'"] = "ran"
    except Exception as exc:
        out["9 ridge='abc'"] = _error(exc)

    folder = Path(tempfile.mkdtemp())
    (folder / "report.json").write_text('{"stale": true}')
    try:
        save_compressed(s, folder)
        stale = (folder / "report.json").read_text() == '{"stale": true}'
        out["4 save into a non-empty folder"] = f"overwritten in place, stale report kept: {stale}"
    except Exception as exc:
        out["4 save into a non-empty folder"] = _error(exc)
    fresh = Path(tempfile.mkdtemp()) / "o"
    save_compressed(s, fresh)
    out["5 files of a saved folder"] = sorted(p.name for p in fresh.iterdir())

    marker = Path(tempfile.mkdtemp()) / "pwned"
    manifest = json.loads((fresh / "manifest.json").read_text())
    manifest["arch"] = {"class": "os.system", "kwargs": {"command": f"touch {marker}"}}
    (fresh / "manifest.json").write_text(json.dumps(manifest))
    try:
        load_compressed(fresh)
    except Exception:
        pass
    out["3 manifest arch os.system ran the command"] = marker.exists()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    default = Path(__file__).parent / "results" / "issue9_before_after.json"
    ap.add_argument("--out", default=str(default))
    args = ap.parse_args()
    torch.set_num_threads(2)
    result = run()
    for key, value in result.items():
        print(f"{key}: {value}")
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
