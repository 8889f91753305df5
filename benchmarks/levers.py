"""Levers for the no-fine-tuning accuracy of a compressed CNN, each against the plain run.

Issue 13 asks what each lever buys at a given MACs budget.  This measures several, on the
pretrained option-A ResNet-56 (1000 lossless CIFAR-10 training images calibrate, the 1000
lossless test images score), each against ``spectrim.compress`` as it is:

* ``bn``: every BatchNorm's running statistics re-estimated on the calibration images
  after compression (``spectrim.repair.recalibrate_batch_norm``: a plain average over the
  batches, no training).  The corrections fit each consumer to the original's
  activations, BatchNorm included, so the shipped statistics should still fit.
* ``sensitivity``: an output-aware allocation.  Each channel group's error curve is
  multiplied by its measured effect on the logits: the relative change of the logits over
  256 calibration images when the group's consumer inputs get a random channel-mixing
  perturbation of ``--eta`` of their energy, divided by ``--eta`` (normalised to mean 1).
  The factors go to ``CompressConfig(group_weights=...)`` by group name (the library
  measures no sensitivity itself: this lever is how to compute one).
* ``outputs`` / ``residual``: ``CompressConfig(sequential_fit=...)``: each block
  consumer refitted by least squares on its own original outputs over its unfolded kept
  inputs (every kernel tap free) instead of the channel interpolation, and with
  ``residual`` also cancelling the drift of the residual stream at the addition its
  output reaches (:mod:`spectrim.calibration.outputs`).
* ``select``: ``CompressConfig(sequential_select=True)``: each group's kept channels
  chosen again in the sequential pass, from the compressed prefix's activations, as the
  ones from which the original's activations are best reconstructed
  (``spectrim.linalg.cross_greedy``), instead of the method's selection on the original
  model's statistics (same widths).

* ``readers``: ``CompressConfig(refit_readers=True)``: the modules whose input drifted
  but that read no pruned group (each block's first convolution, reading the residual
  stream, whose kept output channels the pass would only slice) are refitted in the
  sequential pass by least squares on their own original outputs, in order with the
  consumers (so each block's second convolution is fitted on the refitted first one's
  outputs).  Stop 37 measured it as a script here; it is now the library's option.

``--fit`` sets ``sequential_fit`` for every run but the ``outputs`` / ``residual`` levers.
``--fraction`` sets ``sequential_fraction`` for every run (the share of the calibration
images the sequential pass fits on, and with ``select`` selects on).

    SPECTRIM_DATA=../shared/data .venv/bin/python benchmarks/levers.py     # ~6 min

Prints a table and writes ``benchmarks/results/levers.json``.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))

import spectrim
from _results import save_result
from spectrim.evaluation import evaluate
from spectrim.graph import analyze_channels
from spectrim.repair import recalibrate_batch_norm
from spectrim.zoo import load_dataset, load_pretrained

# the few-second run of the test suite (tests/test_bench.py; spectrim bench --smoke)
SMOKE = ["--model", "resnet20-cifar10", "--methods", "id", "--targets", "macs=0.5", "--calib", "64", "--test", "64", "--probe", "32", "--fit", "residual", "--levers", "bn", "sensitivity", "select", "readers"]  # fmt: skip


def sensitivities(model: nn.Module, probe: torch.Tensor, eta: float) -> dict[str, float]:
    """Per prunable channel group (by its name, as ``group_weights`` takes it), the
    relative squared logit change per relative squared perturbation of its consumers'
    inputs (a random channel mixing of the inputs, seeded), over the groups' mean."""
    modules = dict(model.named_modules())
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        base = model(probe)
    out: dict[str, float] = {}
    for group in analyze_channels(model, probe[:2]).groups:
        if group.pinned:
            continue
        hooks = []
        for name in sorted({c.module for c in group.consumers}):
            mod = modules[name]
            width = getattr(mod, "in_channels", None) or mod.in_features
            mix = torch.randn(width, width, generator=g) / width**0.5

            def perturb(_: nn.Module, args: tuple[Any, ...], mix: torch.Tensor = mix) -> Any:
                x = args[0]
                d = torch.einsum("oc,nc...->no...", mix, x)
                return (x + d * (eta**0.5) * x.norm() / d.norm().clamp_min(1e-12), *args[1:])

            hooks.append(mod.register_forward_pre_hook(perturb))
        try:
            with torch.no_grad():
                moved = model(probe)
        finally:
            for h in hooks:
                h.remove()
        out[group.name] = float((moved - base).norm() ** 2 / base.norm() ** 2) / eta
    mean = float(np.mean(list(out.values())))
    return {name: value / mean for name, value in out.items()}


def jpeg_scores(small: nn.Module, model: nn.Module, jpeg: Any) -> dict[str, Any]:
    """Top-1 and agreement on the JPEG test images (nothing when not asked)."""
    if jpeg is None:
        return {}
    res = evaluate(small, jpeg, reference=model)
    return {"jpeg_accuracy": res.accuracy, "jpeg_agreement": res.agreement}


def scored(
    model: nn.Module,
    calib: torch.Tensor,
    test: Any,
    method: str,
    target: str,
    jpeg: Any = None,
    **kw: Any,
) -> dict[str, Any]:
    """Compress with ``kw`` and score against the original."""
    t = time.perf_counter()
    other, rep = spectrim.compress(model, calib, method, target, **kw)
    seconds = time.perf_counter() - t
    res = evaluate(other, test, reference=model)
    return {
        "seconds": seconds,
        "accuracy": res.accuracy,
        "agreement": res.agreement,
        "logit_rel_l2": res.fidelity["rel_l2"],
        "macs_ratio": rep.macs_ratio,
        **jpeg_scores(other, model, jpeg),
    }


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--model", default="resnet56-cifar10")
    ap.add_argument("--methods", default="id,spectral")
    ap.add_argument("--targets", default="macs=0.5,macs=0.35")
    ap.add_argument(
        "--levers",
        nargs="+",
        choices=("bn", "sensitivity", "select", "outputs", "residual", "readers"),
        default=["bn", "sensitivity", "select"],
    )
    ap.add_argument("--fraction", type=float, default=0.2, help="sequential_fraction")
    ap.add_argument(
        "--blockwise", action="store_true", help="blockwise=True for every run (one block's memory)"
    )
    ap.add_argument(
        "--fit",
        default="inputs",
        choices=("inputs", "outputs", "residual"),
        help="sequential_fit of every run (the baseline and the other levers)",
    )
    ap.add_argument("--calib", type=int, default=1000)
    ap.add_argument("--test", type=int, help="evaluate on the first N lossless test images")
    ap.add_argument("--probe", type=int, default=256, help="images the sensitivities use")
    ap.add_argument("--eta", type=float, default=0.05, help="relative perturbation energy")
    ap.add_argument(
        "--jpeg",
        type=int,
        default=0,
        metavar="N",
        help="also score on N class-balanced JPEG test images (10000: all of them)",
    )
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "levers.json"))
    args = ap.parse_args()
    os.environ.setdefault(
        "SPECTRIM_DATA", str(Path(__file__).resolve().parents[2] / "shared" / "data")
    )
    torch.set_num_threads(args.threads)
    model = load_pretrained(args.model).eval()
    calib = load_dataset("cifar10", "calib", limit=args.calib).tensors[0]
    test = load_dataset("cifar10", "eval", limit=args.test)
    jpeg = None
    if args.jpeg:  # a prefix holds every class in turn
        jpeg = load_dataset("cifar10-jpeg", "test", limit=args.jpeg)
    rows = []
    for target in args.targets.split(","):
        for method in args.methods.split(","):
            run = {
                "sequential_fraction": args.fraction,
                "sequential_fit": args.fit,
                "blockwise": args.blockwise,
            }
            t = time.perf_counter()
            small, report = spectrim.compress(model, calib, method, target, **run)
            seconds = time.perf_counter() - t
            plain = evaluate(small, test, reference=model)
            row: dict[str, Any] = {
                "method": method,
                "target": target,
                "macs_ratio": report.macs_ratio,
                "seconds": seconds,
                "accuracy": plain.accuracy,
                "agreement": plain.agreement,
                "logit_rel_l2": plain.fidelity["rel_l2"],
                **jpeg_scores(small, model, jpeg),
            }
            if "bn" in args.levers:
                recalibrate_batch_norm(small, list(calib.split(64)))
                res = evaluate(small.eval(), test, reference=model)
                row["bn"] = {"accuracy": res.accuracy, "agreement": res.agreement}
            if "sensitivity" in args.levers:
                weights = sensitivities(model, calib[: args.probe], args.eta)
                row["sensitivity"] = scored(
                    model, calib, test, method, target, group_weights=weights, **run
                )
                row["sensitivity"]["weights"] = weights
            if "select" in args.levers:
                row["select"] = scored(
                    model, calib, test, method, target, sequential_select=True, **run
                )
            if "readers" in args.levers:
                row["readers"] = scored(
                    model, calib, test, method, target, jpeg, refit_readers=True, **run
                )
            for fit in ("outputs", "residual"):
                if fit in args.levers:
                    row[fit] = scored(
                        model, calib, test, method, target, jpeg, **{**run, "sequential_fit": fit}
                    )
            rows.append(row)
            print(
                f"{method:9s} {target:10s} as compressed {plain.accuracy:.3f} / {plain.agreement:.3f}"
                + "".join(
                    f"   {lever} {row[lever]['accuracy']:.3f} / {row[lever]['agreement']:.3f}"
                    for lever in args.levers
                ),
                flush=True,
            )
    save_result(
        args.out,
        {
            "benchmark": f"levers after compression, {args.model}",
            "calibration_images": len(calib),
            "test_images": len(test),
            "eta": args.eta,
            "sequential_fraction": args.fraction,
            "sequential_fit": args.fit,
            "blockwise": args.blockwise,
            "probe_images": args.probe,
            "jpeg_images": 0 if jpeg is None else len(jpeg),
            "runs": rows,
        },
        args.threads,
    )


if __name__ == "__main__":
    main()
