"""How many calibration images the sequential corrections need (ResNet-56, CIFAR-10).

For several draws of 1000 calibration images from the 4000 lossless CIFAR-10 training
images (draw 0: the first 1000), compresses the pretrained option-A ResNet-56 with ``id``
at ``macs=0.5`` for each ``sequential_fraction`` and evaluates top-1 on the 1000 lossless
test images.  The fraction is rounded to whole batches of 64 (0.125 -> 128 images,
0.19 -> 192, 0.25 -> 256, 0.32 -> 320).

    SPECTRIM_DATA=../shared/data .venv/bin/python benchmarks/sequential_fraction.py

Prints one line per draw and the means; writes ``benchmarks/results/sequential_fraction.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
from pathlib import Path

import torch

from _results import compress
from spectrim.evaluation import evaluate
from spectrim.zoo import load_dataset, load_pretrained

# the few-second run of the test suite (tests/benchmarks/test_smoke.py; spectrim bench --smoke)
SMOKE = ["--model", "resnet20-cifar10", "--fractions", "0.25", "--draws", "1", "--calib", "128", "--test", "64"]  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--fractions", default="0.125,0.19,0.25,0.32")
    ap.add_argument("--draws", type=int, default=4)
    ap.add_argument("--method", default="id")
    ap.add_argument("--target", default="macs=0.5")
    ap.add_argument("--model", default="resnet56-cifar10")
    ap.add_argument("--calib", type=int, default=1000, help="calibration images per draw")
    ap.add_argument("--test", type=int, help="evaluate on the first N lossless test images")
    ap.add_argument(
        "--out", default=str(Path(__file__).parent / "results" / "sequential_fraction.json")
    )
    args = ap.parse_args()
    os.environ.setdefault(
        "SPECTRIM_DATA", str(Path(__file__).resolve().parents[2] / "shared" / "data")
    )
    torch.set_num_threads(2)
    model = load_pretrained(args.model)
    pool = load_dataset("cifar10", "calib", limit=4000).tensors[0]
    test = load_dataset("cifar10", "eval", limit=args.test)
    fractions = [float(f) for f in args.fractions.split(",")]
    acc: dict[float, list[float]] = {f: [] for f in fractions}
    images: dict[float, int] = {}
    for draw in range(args.draws):
        gen = torch.Generator().manual_seed(draw)
        calib = (
            pool[torch.randperm(len(pool), generator=gen)[: args.calib]]
            if draw
            else pool[: args.calib]
        )
        for f in fractions:
            small, report = compress(
                model, calib, method=args.method, target=args.target, sequential_fraction=f
            )
            acc[f].append(evaluate(small, test).accuracy)
            images[f] = report.fitted_examples
        print(f"draw {draw}: " + ", ".join(f"{f:g}: {acc[f][-1]:.3f}" for f in fractions))
    means = {f: statistics.mean(v) for f, v in acc.items()}
    print("mean: " + ", ".join(f"{f:g} ({images[f]} images): {m:.4f}" for f, m in means.items()))
    out = {
        "benchmark": f"sequential_fraction, {args.model}",
        "method": args.method,
        "target": args.target,
        "draws": args.draws,
        "runs": [
            {"fraction": f, "fitted_images": images[f], "accuracy": acc[f], "mean": means[f]}
            for f in fractions
        ],
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
