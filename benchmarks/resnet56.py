"""ResNet-56 on CIFAR-10 without fine-tuning: id vs l1 vs random at several MACs budgets.

Uses the pretrained option-A ResNet-56 (akamaster), 1000 lossless CIFAR-10 training
images for calibration and the 1000 lossless test images for evaluation.  Compression
time is reported as a ratio to one plain forward pass over the calibration set measured
in the same run (the model as it ships, NCHW, batch 64), and to one of the same model in
``channels_last``, the layout spectrim's own passes use.

    SPECTRIM_DATA=../shared/data .venv/bin/python benchmarks/resnet56.py
    SPECTRIM_DATA=../shared/data .venv/bin/python benchmarks/resnet56.py --targets macs=0.5 --methods id

Prints a table and writes ``benchmarks/results/resnet56.json``.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch

from _results import compress
from spectrim.evaluation import compare_latency, evaluate
from spectrim.zoo import load_dataset, load_pretrained

# the few-second run of the test suite (tests/benchmarks/test_smoke.py; spectrim bench --smoke)
SMOKE = ["--methods", "id", "--targets", "macs=0.5", "--calib", "64", "--test", "64", "--repeats", "1"]  # fmt: skip


def plain_forward_seconds(model: torch.nn.Module, x: torch.Tensor, batch: int) -> float:
    with torch.no_grad():
        t = time.perf_counter()
        for b in x.split(batch):
            model(b)
        return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--methods", default="id,l1,random")
    ap.add_argument("--targets", default="macs=0.75,macs=0.5,macs=0.35")
    ap.add_argument("--calib", type=int, default=1000)
    ap.add_argument("--test", type=int, help="evaluate on the first N lossless test images")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--one-shot", action="store_true", help="also run id with sequential=False")
    ap.add_argument(
        "--sequential-fraction",
        type=float,
        help="share of the calibration set for the sequential fits (default: the library's)",
    )
    ap.add_argument(
        "--repeats",
        type=int,
        default=3,
        help="timed runs per variant, each paired with a plain forward; the ratio is "
        "min(compress)/min(forward) (this machine's timings vary by 20-30%% run to run)",
    )
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "resnet56.json"))
    args = ap.parse_args()
    os.environ.setdefault(
        "SPECTRIM_DATA", str(Path(__file__).resolve().parents[2] / "shared" / "data")
    )
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    model = load_pretrained("resnet56-cifar10")
    calib = load_dataset("cifar10", "calib", limit=args.calib).tensors[0]
    test = load_dataset("cifar10", "eval", limit=args.test)
    dense = evaluate(model, test)
    # spectrim runs its calibration passes in channels_last (faster on this CPU), so the
    # ratios are also given against a plain forward pass of the model in that layout
    model_cl = copy.deepcopy(model).to(memory_format=torch.channels_last)
    calib_cl = calib.contiguous(memory_format=torch.channels_last)
    plain_forward_seconds(model_cl, calib_cl[:128], 64)
    plain_forward_seconds(model, calib[:128], 64)  # warm-up
    fwd = min(plain_forward_seconds(model, calib, 64) for _ in range(2))
    print(
        f"dense top-1 {dense.accuracy:.4f}; one forward over {len(calib)} calibration images: {fwd:.2f} s"
    )

    runs = []
    common = {}
    if args.sequential_fraction is not None:
        common["sequential_fraction"] = args.sequential_fraction
    variants: list[tuple[str, dict]] = [(m, dict(common)) for m in args.methods.split(",")]
    if args.one_shot:
        variants.append(("id", {"sequential": False}))
    for target in args.targets.split(","):
        for method, extra in variants:
            fwd_runs, cl_runs, compress_runs = [], [], []
            for _ in range(max(args.repeats, 1)):  # interleaved: same machine state for both
                fwd_runs.append(plain_forward_seconds(model, calib, 64))
                cl_runs.append(plain_forward_seconds(model_cl, calib_cl, 64))
                small, report = compress(model, calib, method=method, target=target, **extra)
                compress_runs.append(report.seconds)
            fwd_now, seconds = min(fwd_runs), min(compress_runs)
            res = evaluate(small, test, reference=model)
            lat = compare_latency(model, small, calib[:64], warmup=2, repeats=10)
            row = {
                "method": method + ("-oneshot" if extra.get("sequential") is False else ""),
                "options": extra,
                "target": target,
                "accuracy": res.accuracy,
                "agreement": res.agreement,
                "macs_ratio": report.macs_ratio,
                "params_ratio": report.params_ratio,
                "seconds": seconds,
                "seconds_runs": compress_runs,
                "forward_seconds": fwd_now,
                "forward_runs": fwd_runs,
                "seconds_over_forward": seconds / fwd_now,
                # each compression over the forward pass run just before it
                "seconds_over_forward_median": statistics.median(
                    c / f for c, f in zip(compress_runs, fwd_runs)
                ),
                "forward_channels_last_runs": cl_runs,
                "seconds_over_forward_channels_last": seconds / min(cl_runs),
                "timings": report.timings,
                "latency_batch64_original_s": lat["original_median"],
                "latency_batch64_compressed_s": lat["compressed_median"],
                "speedup": lat["speedup"],
            }
            runs.append(row)
            print(
                f"{row['method']:11s} {target:10s} acc {res.accuracy:.4f} agree {res.agreement:.4f} "
                f"MACs {report.macs_ratio:.3f} params {report.params_ratio:.3f} "
                f"{seconds:6.1f} s ({row['seconds_over_forward']:.2f}x forward, median "
                f"{row['seconds_over_forward_median']:.2f}x; "
                f"{row['seconds_over_forward_channels_last']:.2f}x a channels_last forward) "
                f"speed-up {lat['speedup']:.2f}x"
            )
    out = {
        "benchmark": "resnet56-cifar10",
        "dense_accuracy": dense.accuracy,
        "calibration_images": len(calib),
        "eval_images": len(test),
        "forward_seconds": fwd,
        "threads": args.threads,
        "torch": torch.__version__,
        "machine": platform.machine(),
        "runs": runs,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
