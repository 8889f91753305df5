"""More calibration images, and corrections fitted on all of them: a lever for CNNs?

Compresses pretrained option-A CIFAR ResNets to ``--target`` (no fine-tuning) from the
first 1000 or all 4000 lossless CIFAR-10 training images, with the sequential corrections
fitted on the default fifth of them or on all (``sequential_fraction=1.0``), and scores
top-1 on the 1000 lossless test images and top-1 / agreement on the 10000 JPEG ones (the
larger set: about 0.4 points of standard error at 80%, against 1.3 for 1000 images).

    SPECTRIM_DATA=../shared/data .venv/bin/python benchmarks/calibration_size.py   # ~20 min

Prints one line per run and writes ``benchmarks/results/calibration_size.json``.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _results import compress, save_result
from spectrim.evaluation import evaluate
from spectrim.zoo import load_dataset, load_pretrained

# the few-second run of the test suite (tests/test_bench.py; spectrim bench --smoke)
SMOKE = ["--models", "resnet20-cifar10", "--methods", "id", "--sizes", "64", "--fractions", "1.0", "--test", "64", "--jpeg", "64"]  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--models", default="resnet56-cifar10,resnet20-cifar10")
    ap.add_argument("--methods", default="spectral,id")
    ap.add_argument("--target", default="macs=0.5")
    ap.add_argument("--sizes", default="1000,4000", help="calibration images")
    ap.add_argument("--fractions", default="0.2,1.0", help="sequential_fraction values")
    ap.add_argument("--test", type=int, help="the first N lossless test images")
    ap.add_argument("--jpeg", type=int, help="N class-balanced JPEG test images")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument(
        "--out", default=str(Path(__file__).parent / "results" / "calibration_size.json")
    )
    args = ap.parse_args()
    os.environ.setdefault(
        "SPECTRIM_DATA", str(Path(__file__).resolve().parents[2] / "shared" / "data")
    )
    torch.set_num_threads(args.threads)
    lossless = load_dataset("cifar10", "eval", limit=args.test)
    jpeg = load_dataset("cifar10-jpeg", "test")
    if args.jpeg:  # a class-balanced subset: the archive is sorted by class
        step = max(len(jpeg.tensors[0]) // args.jpeg, 1)
        jpeg = torch.utils.data.TensorDataset(jpeg.tensors[0][::step], jpeg.tensors[1][::step])
    runs: list[dict[str, Any]] = []
    for name in args.models.split(","):
        model = load_pretrained(name).eval()
        for size in (int(s) for s in args.sizes.split(",")):
            calib = load_dataset("cifar10", "calib", limit=size).tensors[0]
            for method in args.methods.split(","):
                for fraction in (float(f) for f in args.fractions.split(",")):
                    t = time.perf_counter()
                    small, report = compress(
                        model, calib, method, args.target, sequential_fraction=fraction
                    )
                    seconds = time.perf_counter() - t
                    a = evaluate(small, lossless, reference=model)
                    b = evaluate(small, jpeg, reference=model)
                    run = {
                        "model": name,
                        "calibration_images": size,
                        "method": method,
                        "sequential_fraction": fraction,
                        "fitted_examples": report.fitted_examples,
                        "macs_ratio": report.macs_ratio,
                        "seconds": seconds,
                        "lossless_accuracy": a.accuracy,
                        "jpeg_accuracy": b.accuracy,
                        "jpeg_agreement": b.agreement,
                    }
                    runs.append(run)
                    print(
                        f"{name:18s} {size:5d} {method:9s} fraction {fraction:.2f}: "
                        f"lossless {a.accuracy:.3f}  JPEG {b.accuracy:.4f} / {b.agreement:.4f}",
                        flush=True,
                    )
    save_result(
        args.out,
        {
            "benchmark": f"calibration size and fitted share at {args.target}, no fine-tuning",
            "lossless_test_images": len(lossless),
            "jpeg_test_images": len(jpeg),
            "runs": runs,
        },
        args.threads,
    )


if __name__ == "__main__":
    main()
