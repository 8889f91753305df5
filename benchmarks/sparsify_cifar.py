"""Weight sparsification of pretrained CIFAR-10 ResNets, no fine-tuning: every method.

Pretrained option-A ResNet-20 / ResNet-56 (akamaster), ``--calib`` lossless CIFAR-10
training images for calibration, the 1000 lossless test images for evaluation.  Every
conv and Linear weight is sparsified (first and last layers included) to each sparsity;
accuracy, agreement with the dense model, the mean per-matrix spectral / Frobenius /
output errors (``report.matrices``) and the compression time over one plain forward pass
over the calibration set (same run) are recorded.

Anchor: CHITA (Benbaki et al. 2023), Table 1, ResNet-20, one-shot, full CIFAR-10 test
(dense 91.36): at 50/70/90% magnitude 88.44 / 78.79 / 11.79, WoodFisher 90.23 / 81.05 /
11.49, CBS 90.58 / 81.84 / 13.68, CHITA++ 91.04 / 90.38 / 79.32.

    SPECTRIM_DATA=../shared/data .venv/bin/python benchmarks/sparsify_cifar.py
    SPECTRIM_DATA=../shared/data .venv/bin/python benchmarks/sparsify_cifar.py \\
        --model resnet56-cifar10 --methods obs,obs+refit,magnitude

Prints a table and writes ``benchmarks/results/sparsify_<model>.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import numpy as np
import torch

import spectrim
from _results import compress
from spectrim.evaluation import evaluate
from spectrim.zoo import load_dataset, load_pretrained

# name -> (method, options)
# the few-second run of the test suite (tests/benchmarks/test_smoke.py; spectrim bench --smoke)
SMOKE = ["--methods", "magnitude,wanda", "--sparsities", "0.5", "--calib", "64", "--test", "64"]  # fmt: skip


VARIANTS: dict[str, tuple[str, dict]] = {
    "magnitude": ("magnitude", {}),
    "magnitude-global": ("magnitude", {"scope": "global"}),
    "magnitude+refit": ("magnitude", {"refit": True}),
    "random": ("random", {}),
    "wanda": ("wanda", {}),
    "wanda+refit": ("wanda", {"refit": True}),
    "obs": ("obs", {}),
    "obs+refit": ("obs", {"refit": True}),
    "obc": ("obc", {}),
    "obc+refit": ("obc", {"refit": True}),
    "obc+refit-r4": ("obc", {"refit": True, "rounds": 4}),
    "obc+refit-r8": ("obc", {"refit": True, "rounds": 8}),
    "obc+refit-r16": ("obc", {"refit": True, "rounds": 16}),
    "obc+refit-curves": ("obc", {"refit": True, "allocation": "curves"}),
    "obc+refit-curves-r8": ("obc", {"refit": True, "allocation": "curves", "rounds": 8}),
    "lq": ("lq", {}),
    "pqi": ("pqi", {}),
    "pqi-global": ("pqi", {"scope": "global"}),
    "spectrum": ("spectrum", {}),
    "spectrum-det0.9": ("spectrum", {"det_fraction": 0.9}),
    "spectrum-norescale": ("spectrum", {"rescale": False}),
    "spectrum-l2": ("spectrum", {"distribution": "l2"}),
    "magnitude+refit-curves": ("magnitude", {"refit": True, "allocation": "curves"}),
    "obs+refit-curves": ("obs", {"refit": True, "allocation": "curves"}),
    "obs+refit-output": ("obs", {"refit": True, "allocation": "output"}),
    "obs+refit-curves-r4": ("obs", {"refit": True, "allocation": "curves", "rounds": 4}),
    "obs+refit-curves-r8": ("obs", {"refit": True, "allocation": "curves", "rounds": 8}),
    "wanda+refit-output": ("wanda", {"refit": True, "allocation": "output"}),
    "magnitude+refit-output": ("magnitude", {"refit": True, "allocation": "output"}),
    "obs+refit-r4-orig": ("obs", {"refit": True, "rounds": 4, "refit_to": "original"}),
    "obs+refit-r8-orig": ("obs", {"refit": True, "rounds": 8, "refit_to": "original"}),
    "obs+refit-r4-prev": ("obs", {"refit": True, "rounds": 4, "refit_to": "previous"}),
    "obs+refit-r8-prev": ("obs", {"refit": True, "rounds": 8, "refit_to": "previous"}),
    "obs+refit-r16-prev": ("obs", {"refit": True, "rounds": 16, "refit_to": "previous"}),
    "wanda+refit-r4": ("wanda", {"refit": True, "rounds": 4}),
    "magnitude+refit-r4": ("magnitude", {"refit": True, "rounds": 4}),
    # one budget over channels and weights (the joint allocator)
    "id+obs+refit": ("id+obs", {"refit": True}),
    "id+obs+refit-r4": ("id+obs", {"refit": True, "rounds": 4}),
    "id+obs+refit-r8": ("id+obs", {"refit": True, "rounds": 8}),
    "id+obs+refit-r16": ("id+obs", {"refit": True, "rounds": 16}),
    "id+wanda+refit": ("id+wanda", {"refit": True}),
    "id+obc+refit": ("id+obc", {"refit": True}),
    "id+obc+refit-r8": ("id+obc", {"refit": True, "rounds": 8}),
    # a fixed split for comparison: id to macs=F, then obs+refit to the same non-zeros
    "split-id-macs0.8+obs+refit": ("split", {"macs": 0.8, "refit": True}),
    "split-id-macs0.6+obs+refit": ("split", {"macs": 0.6, "refit": True}),
}

CHITA_TABLE1_RESNET20 = {
    "dense": 91.36,
    "magnitude": {"0.5": 88.44, "0.7": 78.79, "0.9": 11.79},
    "woodfisher": {"0.5": 90.23, "0.7": 81.05, "0.9": 11.49},
    "cbs": {"0.5": 90.58, "0.7": 81.84, "0.9": 13.68},
    "chita++": {"0.5": 91.04, "0.7": 90.38, "0.9": 79.32},
}


def forward_seconds(model: torch.nn.Module, x: torch.Tensor) -> float:
    with torch.no_grad():
        t = time.perf_counter()
        for b in x.split(64):
            model(b)
        return time.perf_counter() - t


def fixed_split(
    model: torch.nn.Module, calib: torch.Tensor, sparsity: float, options: dict
) -> tuple[torch.nn.Module, spectrim.CompressionReport]:
    """``id`` to ``macs=options["macs"]``, then ``obs`` to the non-zeros ``1 − sparsity``
    of the original's: the split fixed in advance, where the joint allocator chooses it."""
    from spectrim._sparsify import weight_nonzeros
    from spectrim.report import merge_reports

    opts = {k: v for k, v in options.items() if k != "macs"}
    t = time.perf_counter()
    small, r1 = compress(model, calib, "id", f"macs={options['macs']}")
    rho = weight_nonzeros(small) / weight_nonzeros(model)
    s2 = 1.0 - (1.0 - sparsity) / rho
    if s2 < 0:
        raise ValueError(f"macs={options['macs']} keeps {rho:.3f} of the weights: too few")
    small, r2 = compress(small, calib, "obs", f"sparsity={s2:.12g}", structured=False, **opts)
    report = merge_reports(r1, r2, nonzeros_before=weight_nonzeros(model))
    report.seconds = time.perf_counter() - t
    return small, report


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--model", default="resnet20-cifar10")
    ap.add_argument("--methods", default=",".join(VARIANTS))
    ap.add_argument("--sparsities", default="0.5,0.7,0.9")
    ap.add_argument("--calib", type=int, default=512)
    ap.add_argument("--test", type=int, help="evaluate on the first N lossless test images")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=None)
    ap.add_argument(
        "--jpeg",
        action="store_true",
        help="also evaluate on the 10000 lossy JPEG test images (a larger sample)",
    )
    args = ap.parse_args()
    os.environ.setdefault(
        "SPECTRIM_DATA", str(Path(__file__).resolve().parents[2] / "shared" / "data")
    )
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    out_path = Path(
        args.out or Path(__file__).parent / "results" / f"sparsify_{args.model.split('-')[0]}.json"
    )
    model = load_pretrained(args.model).eval()
    calib = load_dataset("cifar10", "calib", limit=args.calib).tensors[0]
    test = load_dataset("cifar10", "eval", limit=args.test)
    dense = evaluate(model, test)
    jpeg = load_dataset("cifar10-jpeg", "test") if args.jpeg else None
    dense_jpeg = evaluate(model, jpeg) if jpeg is not None else None
    forward_seconds(model, calib[:128])
    print(f"{args.model}: dense top-1 {dense.accuracy:.4f} on {len(test)} lossless test images")
    runs = []
    for s in args.sparsities.split(","):
        for name in args.methods.split(","):
            method, options = VARIANTS[name]
            fwd = forward_seconds(model, calib)
            if method == "split":
                small, report = fixed_split(model, calib, float(s), options)
            else:
                small, report = compress(
                    model, calib, method, f"sparsity={s}", structured=False, **options
                )
            res = evaluate(small, test, reference=model)
            res_jpeg = evaluate(small, jpeg, reference=model) if jpeg is not None else None
            mats = [m for m in report.matrices if m.spectral_error is not None]

            def mean(key: str, mats=mats) -> float:  # type: ignore[no-untyped-def]
                return float(np.mean([getattr(m, key) for m in mats]))

            row = {
                "variant": name,
                "method": method,
                "options": options,
                "target_sparsity": float(s),
                "sparsity": 1.0 - report.nonzero_ratio,  # of the original's weights
                "macs_ratio": report.macs_ratio,
                "joint": report.config.get("joint"),
                "accuracy": res.accuracy,
                "agreement": res.agreement,
                "drop_from_dense": (dense.accuracy or 0) - (res.accuracy or 0),
                "accuracy_jpeg": res_jpeg.accuracy if res_jpeg else None,
                "agreement_jpeg": res_jpeg.agreement if res_jpeg else None,
                "mean_spectral_error": mean("spectral_error"),
                "mean_frobenius_error": mean("frobenius_error"),
                "mean_output_error": mean("output_error"),
                "mean_top_sv_change": mean("top_sv_change"),
                "mean_left_angle": mean("left_angle"),
                "seconds": report.seconds,
                "forward_seconds": fwd,
                "seconds_over_forward": report.seconds / fwd,
                "timings": report.timings,
                "solved": report.config.get("solved"),
            }
            runs.append(row)
            print(
                f"{name:17s} s={s:4s} acc {res.accuracy:.4f} agree {res.agreement:.4f} "
                f"sparsity {1 - report.nonzero_ratio:.3f} MACs {report.macs_ratio:.3f} ‖ΔW‖₂ {row['mean_spectral_error']:.3f} "
                f"out.err {row['mean_output_error']:.4f} {report.seconds:6.1f} s "
                f"({row['seconds_over_forward']:.1f}x forward)"
                + (f" jpeg acc {res_jpeg.accuracy:.4f}" if res_jpeg else ""),
                flush=True,
            )
            out = {
                "benchmark": f"sparsify-{args.model}",
                "dense_accuracy": dense.accuracy,
                "dense_accuracy_jpeg": dense_jpeg.accuracy if dense_jpeg else None,
                "jpeg_eval_images": len(jpeg) if jpeg is not None else 0,
                "calibration_images": len(calib),
                "eval_images": len(test),
                "threads": args.threads,
                "torch": torch.__version__,
                "machine": platform.machine(),
                "anchor_chita_table1_resnet20": CHITA_TABLE1_RESNET20,
                "runs": runs,
            }
            out_path.parent.mkdir(parents=True, exist_ok=True)
            tmp = out_path.with_suffix(".json.tmp")
            tmp.write_text(json.dumps(out, indent=2))
            tmp.replace(out_path)  # atomic: an interrupted run leaves the last complete file
    print(f"wrote {out_path}")


if __name__ == "__main__":
    main()
