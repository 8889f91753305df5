"""Fingerprints of channel-pruning results, to show that a change leaves them identical.

Runs ``id``, ``spectral``, ``l1`` and ``random`` on the pretrained ResNet-56 at
``macs=0.75``, ``macs=0.5`` and ``params=0.35`` (unreachable: the allocator stops) with
256 calibration images, and writes the sha256 of each pruned model's state dict, its MACs
ratio and its widths.  Run it on two code trees and compare the files::

    git worktree add /tmp/old <commit>
    SPECTRIM_DATA=../shared/data PYTHONPATH=/tmp/old/src .venv/bin/python \\
        benchmarks/channel_hashes.py --out /tmp/old.json
    SPECTRIM_DATA=../shared/data .venv/bin/python benchmarks/channel_hashes.py \\
        --out /tmp/new.json --compare /tmp/old.json

Compare files made on one machine: the fitted corrections' float rounding depends on the
CPU's BLAS kernels, so the same tree on another machine gives other hashes (the widths and
MACs stay the same).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
from pathlib import Path

import torch

from _results import compress
from spectrim.zoo import load_dataset, load_pretrained

# the few-second run of the test suite (tests/benchmarks/test_smoke.py; spectrim bench --smoke)
SMOKE = ["--calib", "64"]  # fmt: skip


RUNS = [
    (m, t)
    for m in ("id", "spectral", "l1", "random")
    for t in ("macs=0.75", "macs=0.5", "params=0.35")
]


def fingerprint(model: torch.nn.Module) -> str:
    h = hashlib.sha256()
    for k, v in model.state_dict().items():
        h.update(k.encode())
        h.update(v.detach().contiguous().numpy().tobytes())
    return h.hexdigest()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--calib", type=int, default=256)
    ap.add_argument("--out", required=True)
    ap.add_argument("--compare", help="a file from another code tree: exit 1 unless equal")
    args = ap.parse_args()
    os.environ.setdefault(
        "SPECTRIM_DATA", str(Path(__file__).resolve().parents[2] / "shared" / "data")
    )
    torch.set_num_threads(1)
    model = load_pretrained("resnet56-cifar10").eval()
    calib = load_dataset("cifar10", "calib", limit=args.calib).tensors[0]
    out = {}
    for method, target in RUNS:
        small, report = compress(model, calib, method, target)
        out[f"{method} {target}"] = {
            "sha256": fingerprint(small),
            "macs_ratio": report.macs_ratio,
            "widths": report.widths,
        }
        print(f"{method:9s} {target:12s} {out[f'{method} {target}']['sha256'][:16]} "
              f"MACs {report.macs_ratio:.4f}", flush=True)  # fmt: skip
    tmp = Path(args.out).with_suffix(".json.tmp")
    tmp.write_text(json.dumps(out, indent=2))
    tmp.replace(args.out)
    if args.compare:
        other = json.loads(Path(args.compare).read_text())
        diff = [k for k in out if other.get(k) != out[k]]
        print("identical" if not diff else f"different: {', '.join(diff)}")
        raise SystemExit(1 if diff else 0)


if __name__ == "__main__":
    main()
