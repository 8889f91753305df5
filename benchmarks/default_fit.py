"""What the default consumer fit (``sequential_fit="auto"``) costs and buys against the
channel interpolation (``"inputs"``, the default before it), on the same calibration data.

* pretrained CIFAR-10 ResNets (``--cifar``): top-1 and agreement with the dense model on
  the lossless test images, the logits' relative error, and the compression time;
* torchvision models at 224 with random weights (``--torchvision``): compression time
  only (``auto`` picks the residual fit for a network of 3×3 convolutions, the
  interpolation where every pruned group feeds 1×1 or depthwise convolutions only).

Each model is compressed with every variant of ``--runs`` one after the other, so the
ratios of their times are from the same machine state: by default the interpolation
(``inputs/off``), the default fit on the whole-model pass (``auto/off``, the default of
stop 29) and the default fit with the default ``blockwise`` (``auto/default``: block by
block where the residual fit runs).  ``fit`` in each row is the fit that ran (the
report's ``sequential_fit``), ``blocks`` the blocks its pass ran through (0: the whole
model).

    SPECTRIM_DATA=../shared/data .venv/bin/python benchmarks/default_fit.py     # ~5 min

Prints a table and writes ``benchmarks/results/default_fit.json``.
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
SMOKE = ["--cifar", "resnet20-cifar10", "--torchvision", "resnet18", "--calib", "64", "--test", "64", "--images", "8", "--size", "64"]  # fmt: skip

#: ``--runs`` values: the ``blockwise`` argument each names
BLOCKWISE = {"off": False, "on": True, "default": None}


def run(
    model: torch.nn.Module,
    calib: Any,
    method: str,
    target: str,
    fit: str,
    blockwise: bool | None,
) -> tuple[Any, ...]:
    t = time.perf_counter()
    small, report = spectrim.compress(
        model, calib, method, target, sequential_fit=fit, blockwise=blockwise
    )
    return small, report, time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--cifar", default="resnet20-cifar10,resnet56-cifar10")
    ap.add_argument("--torchvision", default="resnet50,mobilenet_v2")
    ap.add_argument("--methods", default="id,spectral")
    ap.add_argument("--target", default="macs=0.5")
    ap.add_argument("--calib", type=int, default=1000, help="CIFAR calibration images")
    ap.add_argument("--test", type=int, help="score on the first N lossless test images")
    ap.add_argument("--images", type=int, default=64, help="random images for torchvision")
    ap.add_argument("--size", type=int, default=224, help="torchvision image size")
    ap.add_argument(
        "--runs",
        default="inputs/off,auto/off,auto/default",
        help="comma-separated FIT/BLOCKWISE variants (FIT: a sequential_fit; BLOCKWISE: "
        "off, on or default, for blockwise=False / True / None)",
    )
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "default_fit.json"))
    args = ap.parse_args()
    variants = [tuple(v.split("/")) for v in args.runs.split(",")]
    for v in variants:
        if len(v) != 2 or v[1] not in BLOCKWISE:
            ap.error(f"--runs: {'/'.join(v)!r} is not FIT/off|on|default")
    os.environ.setdefault(
        "SPECTRIM_DATA", str(Path(__file__).resolve().parents[2] / "shared" / "data")
    )
    torch.set_num_threads(args.threads)
    rows: list[dict[str, Any]] = []
    cifar = [m for m in args.cifar.split(",") if m]
    if cifar:
        calib = load_dataset("cifar10", "calib", limit=args.calib).tensors[0]
        test = load_dataset("cifar10", "eval", limit=args.test)
    for name in cifar:
        model = load_pretrained(name).eval()
        for method in args.methods.split(","):
            for fit, bw in variants:
                small, report, seconds = run(model, calib, method, args.target, fit, BLOCKWISE[bw])
                res = evaluate(small, test, reference=model)
                rows.append(
                    {
                        "model": name,
                        "method": method,
                        "asked": fit,
                        "fit": report.sequential_fit,
                        "blockwise": bw,
                        "blocks": report.blocks,
                        "seconds": seconds,
                        "macs_ratio": report.macs_ratio,
                        "accuracy": res.accuracy,
                        "agreement": res.agreement,
                        "logit_rel_l2": res.fidelity["rel_l2"],
                        "warnings": report.warnings,
                    }
                )
                print(
                    f"{name:18s} {method:9s} {fit:6s} -> {report.sequential_fit:8s} "
                    f"blocks {report.blocks:2d} top-1 {res.accuracy:.3f} "
                    f"agree {res.agreement:.3f} {seconds:6.1f} s",
                    flush=True,
                )
    import torchvision

    g = torch.Generator().manual_seed(0)
    images = torch.randn(args.images, 3, args.size, args.size, generator=g)
    for name in [m for m in args.torchvision.split(",") if m]:
        torch.manual_seed(0)
        model = getattr(torchvision.models, name)(weights=None).eval()
        t = time.perf_counter()
        with torch.no_grad():
            for batch in images.split(32):
                model(batch)
        forward = time.perf_counter() - t
        for fit, bw in variants:
            small, report, seconds = run(
                model, images.split(32), "id", args.target, fit, BLOCKWISE[bw]
            )
            rows.append(
                {
                    "model": f"torchvision {name}",
                    "method": "id",
                    "asked": fit,
                    "fit": report.sequential_fit,
                    "blockwise": bw,
                    "blocks": report.blocks,
                    "seconds": seconds,
                    "seconds_per_forward_pass": seconds / forward,
                    "macs_ratio": report.macs_ratio,
                    "warnings": report.warnings,
                }
            )
            print(
                f"{name:18s} id        {fit:6s} -> {report.sequential_fit:8s} "
                f"blocks {report.blocks:2d} {seconds:6.1f} s "
                f"({seconds / forward:.1f} forward passes)",
                flush=True,
            )
    save_result(
        args.out,
        {
            "benchmark": "default consumer fit (auto) against the interpolation",
            "target": args.target,
            "calibration_images": args.calib,
            "torchvision_images": args.images,
            "torchvision_size": args.size,
            "runs_asked": args.runs,
            "runs": rows,
        },
        args.threads,
    )


if __name__ == "__main__":
    main()
