"""The allocation search (``search=N``) against the allocation of the error curves alone.

Issue 13 asks what each lever buys without fine-tuning.  The allocator trades each
group's error curve (the predicted error at its own consumers) against its cost; after
the sequential corrections the groups' errors do not reach the logits as the curves
assume.  ``search=N`` scales the curves group by group and keeps a factor when the
compressed model's outputs come closer to the original's on the calibration images the
sequential fits did not use (``spectrim._search``).

Pretrained option-A CIFAR-10 ResNets, the first ``--calib`` lossless training images
calibrate (unlabelled), the library's defaults otherwise (the residual output fit on
these convolutional networks).  Each model, method and target is compressed with
``search=0`` and with ``search=--rounds``; both are scored on the 1000 lossless test
images and on ``--jpeg`` class-balanced CIFAR-10 JPEG test images (top-1, agreement with
the dense model, relative L2 of the logits), with the compression time.  ``--search-data
N`` scores the search's candidates on the N lossless training images after the
calibration ones instead (none of them test images).

    SPECTRIM_DATA=../shared/data .venv/bin/python benchmarks/search.py     # ~15 min

Prints a table and writes ``benchmarks/results/search.json``.
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

import spectrim
from _results import save_result
from spectrim.evaluation import evaluate
from spectrim.zoo import load_dataset, load_pretrained

# the few-second run of the test suite (tests/test_bench.py; spectrim bench --smoke)
SMOKE = ["--models", "resnet20-cifar10", "--calib", "128", "--test", "64", "--jpeg", "0", "--rounds", "1", "--fraction", "0.5"]  # fmt: skip


def scores(small: torch.nn.Module, model: torch.nn.Module, data: Any) -> dict[str, float]:
    res = evaluate(small, data, reference=model)
    return {
        "accuracy": res.accuracy,
        "agreement": res.agreement,
        "logit_rel_l2": res.fidelity["rel_l2"],
    }


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--models", default="resnet20-cifar10,resnet56-cifar10")
    ap.add_argument("--methods", default="spectral")
    ap.add_argument("--targets", default="macs=0.5")
    ap.add_argument("--rounds", type=int, default=4, help="search= rounds")
    ap.add_argument("--calib", type=int, default=1000)
    ap.add_argument("--fraction", type=float, default=0.2, help="sequential_fraction")
    ap.add_argument("--test", type=int, help="the first N lossless test images (default: all)")
    ap.add_argument(
        "--jpeg", type=int, default=10000, metavar="N", help="class-balanced JPEG test images"
    )
    ap.add_argument(
        "--search-data",
        type=int,
        default=0,
        metavar="N",
        help="score the candidates on the N lossless training images after the calibration "
        "ones (search_data=) instead of the calibration images the fits did not use",
    )
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "search.json"))
    args = ap.parse_args()
    os.environ.setdefault(
        "SPECTRIM_DATA", str(Path(__file__).resolve().parents[2] / "shared" / "data")
    )
    torch.set_num_threads(args.threads)
    images = load_dataset("cifar10", "calib", limit=args.calib + args.search_data).tensors[0]
    calib, held = images[: args.calib], images[args.calib :]
    if args.search_data and len(held) < args.search_data:
        raise SystemExit(f"--search-data {args.search_data}: only {len(held)} more images")
    test = load_dataset("cifar10", "eval", limit=args.test)
    jpeg = None
    if args.jpeg:  # a prefix holds every class in turn
        jpeg = load_dataset("cifar10-jpeg", "test", limit=args.jpeg)
    rows = []
    for name in args.models.split(","):
        model = load_pretrained(name).eval()
        dense = evaluate(model, test).accuracy
        for target in args.targets.split(","):
            for method in args.methods.split(","):
                row: dict[str, Any] = {"model": name, "method": method, "target": target}
                row["dense_accuracy"] = dense
                for label, rounds in (("plain", 0), ("search", args.rounds)):
                    t = time.perf_counter()
                    small, rep = spectrim.compress(
                        model,
                        calib,
                        method,
                        target,
                        search=rounds,
                        sequential_fraction=args.fraction,
                        search_data=held if rounds and args.search_data else None,
                    )
                    seconds = time.perf_counter() - t
                    run: dict[str, Any] = {
                        "seconds": seconds,
                        "macs_ratio": rep.macs_ratio,
                        "params_ratio": rep.params_ratio,
                        "widths": rep.widths,
                        **scores(small, model, test),
                    }
                    if jpeg is not None:
                        run["jpeg"] = scores(small, model, jpeg)
                    if rep.search is not None:
                        run["search"] = rep.search
                    row[label] = run
                rows.append(row)
                p, s = row["plain"], row["search"]
                jp = (
                    f"  jpeg {p['jpeg']['accuracy']:.3f} -> {s['jpeg']['accuracy']:.3f}"
                    if jpeg is not None
                    else ""
                )
                print(
                    f"{name} {method} {target}: top-1 {p['accuracy']:.3f} -> {s['accuracy']:.3f}"
                    f"  agreement {p['agreement']:.3f} -> {s['agreement']:.3f}{jp}"
                    f"  {p['seconds']:.1f} s -> {s['seconds']:.1f} s"
                    f" ({s['search']['candidates']} candidates)",
                    flush=True,
                )
    save_result(
        args.out,
        {
            "benchmark": "allocation search (search=N) against the curves' allocation",
            "calibration_images": len(calib),
            "search_images": args.search_data,
            "test_images": len(test),
            "jpeg_images": 0 if jpeg is None else len(jpeg),
            "rounds": args.rounds,
            "sequential_fraction": args.fraction,
            "rows": rows,
        },
        args.threads,
    )


if __name__ == "__main__":
    main()
