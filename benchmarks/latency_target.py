"""``latency=F``: is the measured speed-up what the user asked for?

Each model is compressed to ``latency=F`` at a batch size (``latency_batch``) and, for
comparison, to ``macs=F``; the result is then timed against the original in a fresh
interleaved run (``compare_latency``, ``--repeats`` calls each), which is the number a
user would see.  Reported per row: the fresh latency ratio (compressed / original),
whether it is within 10% of ``F`` (issue 13's goal), the MACs and parameter ratios, the
rounds of the loop (modelled and measured ratios) and the compression time.

Models:

* ``resnet56``: the pretrained option-A CIFAR-10 ResNet-56 (its residual streams are
  pinned, so only block-internal widths shrink), ``id`` on 512 lossless images;
* ``resnet50``, ``mobilenet_v2``: torchvision's at 224 × 224 with random weights
  (latency does not depend on the values), ``l1`` (no statistics) on 16 random images.

    SPECTRIM_DATA=../shared/data .venv/bin/python benchmarks/latency_target.py

Writes ``benchmarks/results/latency_target.json`` (``--out``).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from spectrim.evaluation import compare_latency

# the few-second run of the test suite (tests/benchmarks/test_smoke.py; spectrim bench --smoke)
SMOKE = ["--models", "resnet56", "--batches", "1", "--fractions", "0.9", "--calib", "64", "--repeats", "2"]  # fmt: skip


HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from _results import compress, save_result  # noqa: E402

#: model -> (batch sizes, latency fractions)
PLAN: dict[str, tuple[list[int], list[float]]] = {
    "resnet56": ([1, 64], [0.75, 0.9]),
    "resnet50": ([1, 8], [0.5, 0.75]),
    "mobilenet_v2": ([1, 16], [0.5, 0.75]),
}


def _model(name: str, calib: int) -> tuple[nn.Module, torch.Tensor, str]:
    if name == "resnet56":
        from spectrim.zoo import load_dataset, load_pretrained

        x, _ = load_dataset("cifar10", "calib", limit=calib).tensors
        return load_pretrained("resnet56-cifar10").eval(), x, "id"
    import torchvision

    torch.manual_seed(0)
    return getattr(torchvision.models, name)().eval(), torch.randn(16, 3, 224, 224), "l1"


def _example(x: torch.Tensor, batch: int) -> torch.Tensor:
    reps = -(-batch // len(x))
    return x.repeat(reps, *([1] * (x.dim() - 1)))[:batch]


def run(
    names: list[str],
    repeats: int,
    round_to: int,
    calib: int = 512,
    batches: list[int] | None = None,
    fractions: list[float] | None = None,
) -> list[dict[str, Any]]:
    rows = []
    for name in names:
        model, x, method = _model(name, calib)
        for batch in batches or PLAN[name][0]:
            example = _example(x, batch)
            for f in fractions or PLAN[name][1]:
                for kind in ("latency", "macs"):
                    t = time.perf_counter()
                    small, report = compress(
                        model, x, method, f"{kind}={f}", latency_batch=batch, round_to=round_to
                    )
                    seconds = time.perf_counter() - t
                    timed = compare_latency(model, small, example, warmup=3, repeats=repeats)
                    ratio = timed["compressed_median"] / timed["original_median"]
                    row = {
                        "model": name,
                        "method": method,
                        "target": f"{kind}={f}",
                        "batch": batch,
                        "round_to": round_to,
                        "latency_ratio": ratio,
                        "within_10pct": abs(ratio - f) <= 0.1 * f,
                        "macs_ratio": report.macs_ratio,
                        "params_ratio": report.params_ratio,
                        "original_seconds": timed["original_median"],
                        "compress_s": seconds,
                        "loop": report.latency,
                    }
                    rows.append(row)
                    loop = report.latency or {}
                    rounds = " ".join(
                        f"{r['modelled']:.2f}->{r['measured']:.2f}" for r in loop.get("rounds", [])
                    )
                    print(
                        f"{name} batch {batch} {kind}={f}: latency ratio {ratio:.3f} "
                        f"({'within' if row['within_10pct'] else 'outside'} 10%), MACs "
                        f"{report.macs_ratio:.3f}, compressed in {seconds:.1f} s"
                        + (f"; rounds {rounds}" if rounds else ""),
                        flush=True,
                    )
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--models", nargs="+", choices=list(PLAN), default=list(PLAN))
    ap.add_argument("--repeats", type=int, default=20, help="timed calls per model")
    ap.add_argument("--round-to", type=int, default=8, help="kept widths multiple of this")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--calib", type=int, default=512, help="ResNet-56 calibration images")
    ap.add_argument("--batches", type=int, nargs="+", help="instead of each model's own")
    ap.add_argument("--fractions", type=float, nargs="+", help="instead of each model's own")
    ap.add_argument("--out", default=str(HERE / "results" / "latency_target.json"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    rows = run(args.models, args.repeats, args.round_to, args.calib, args.batches, args.fractions)
    save_result(args.out, {"rows": rows}, args.threads)


if __name__ == "__main__":
    main()
