"""Schedules at equal MACs: one global allocation, the ID paper's iterative greedy, uniform.

The pretrained option-A CIFAR-10 ResNet-56, ``id`` to half its MACs, no fine-tuning,
1000 lossless calibration images, 1000 lossless test images:

* ``one-pass``: ``macs=0.5`` in one call (every group's error curve from one calibration
  pass, the global greedy, sequential corrections);
* ``iterative``: Chee et al.'s schedule, approximated with spectrim's allocator: remove
  ``--step`` of the current MACs, re-collect the statistics on the pruned model, repeat
  until half of the original's MACs are left (each step a full ``compress`` call whose
  allocator picks the layers);
* ``uniform``: ``width=F``, with ``F`` found by bisection so that the MACs are half.

Accuracy, agreement with the dense model and wall time of each.

    SPECTRIM_DATA=../shared/data .venv/bin/python benchmarks/schedules.py

Writes ``benchmarks/results/schedules.json`` (``--out``).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from spectrim.evaluation import evaluate
from spectrim.evaluation.flops import profile
from spectrim.zoo import load_dataset, load_pretrained

# the few-second run of the test suite (tests/benchmarks/test_smoke.py; spectrim bench --smoke)
SMOKE = ["--model", "resnet20-cifar10", "--calib", "64", "--test", "64", "--step", "0.2"]  # fmt: skip


HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from _results import compress, save_result  # noqa: E402


def _macs(model: nn.Module, x: torch.Tensor) -> int:
    return int(profile(model, x[:1]).macs)


def iterative(dense: nn.Module, x: torch.Tensor, goal: float, step: float) -> tuple[nn.Module, int]:
    full = _macs(dense, x)
    model, steps = dense, 0
    current = full
    while current > goal * full * (1 + 1e-3):
        want = max(current * (1 - step), goal * full)
        model, _ = compress(model, x, "id", f"macs={want / current:.6f}")
        now = _macs(model, x)
        steps += 1
        if now >= current:  # nothing left the allocator may take
            break
        current = now
    return model, steps


def uniform(dense: nn.Module, x: torch.Tensor, goal: float) -> tuple[nn.Module, float]:
    full = _macs(dense, x)
    lo, hi = 0.05, 1.0
    for _ in range(12):  # the widths, found with l1 (no statistics: the same shapes)
        mid = (lo + hi) / 2
        small, _ = compress(dense, x, "l1", f"width={mid:.4f}")
        if _macs(small, x) > goal * full:
            hi = mid
        else:
            lo = mid
    small, _ = compress(dense, x, "id", f"width={lo:.4f}")
    return small, lo


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--model", default="resnet56-cifar10")
    ap.add_argument("--calib", type=int, default=1000)
    ap.add_argument("--test", type=int, default=1000)
    ap.add_argument("--macs", type=float, default=0.5)
    ap.add_argument("--step", type=float, default=0.05, help="share of MACs per iteration")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=str(HERE / "results" / "schedules.json"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    dense = load_pretrained(args.model).eval()
    x, _ = load_dataset("cifar10", "calib", limit=args.calib).tensors
    test = load_dataset("cifar10", "test", limit=args.test)
    full = _macs(dense, x)
    rows: list[dict[str, Any]] = []
    runs = {
        "one-pass": lambda: (compress(dense, x, "id", f"macs={args.macs}")[0], {}),
        "iterative": lambda: (lambda m, n: (m, {"steps": n}))(
            *iterative(dense, x, args.macs, args.step)
        ),
        "uniform": lambda: (lambda m, f: (m, {"width": f}))(*uniform(dense, x, args.macs)),
    }
    for name, fn in runs.items():
        t = time.perf_counter()
        small, extra = fn()
        seconds = time.perf_counter() - t
        ev = evaluate(small, test, reference=dense)
        row = {
            "schedule": name,
            "macs_ratio": _macs(small, x) / full,
            "accuracy": ev.accuracy,
            "agreement": ev.agreement,
            "seconds": seconds,
            **extra,
        }
        rows.append(row)
        print(
            f"{name:10s} MACs {row['macs_ratio']:.3f} accuracy {ev.accuracy:.3f} agreement "
            f"{ev.agreement:.3f} in {seconds:.1f} s {extra}",
            flush=True,
        )
    save_result(args.out, {"dense_accuracy": ev.reference_accuracy, "rows": rows}, args.threads)


if __name__ == "__main__":
    main()
