"""The Torch-Pruning anchor on the pretrained option-A ResNet-56, next to spectrim.

Torch-Pruning (TP) 1.6.1 with its L1 filter-norm criterion, no fine-tuning:

* ``tp-global``: TP's own graph on the whole model (``pruning_ratio``, classifier
  ignored).  Option-A shortcuts zero-pad channels with ``F.pad``; TP maps the padded
  channels as if the pad were element-wise, so the result may not even run.
* ``tp-internal``: TP restricted to the block-internal channels (every conv but the
  blocks' first is ignored), the only ones spectrim may prune in this model, so both
  prune the same channels at the same width.

and spectrim at the same widths (``width=F``: every prunable group keeps ``F`` of its
channels) with ``id`` and ``l1``.  Needs ``pip install torch-pruning==1.6.1`` (the
``anchors`` extra); 1000 lossless CIFAR-10 train images calibrate, the 1000 lossless test
images evaluate.

    SPECTRIM_DATA=../shared/data .venv/bin/python benchmarks/anchor_torch_pruning.py

Prints a table and writes ``benchmarks/results/torch_pruning.json``.
"""

from __future__ import annotations

import argparse
import copy
import importlib.metadata
import json
import os
import sys
import traceback
from pathlib import Path
from typing import Any

import torch
from torch import nn

from _results import compress
from spectrim.evaluation import evaluate
from spectrim.evaluation.flops import profile
from spectrim.zoo import load_dataset, load_pretrained

# the few-second run of the test suite (tests/benchmarks/test_smoke.py; spectrim bench --smoke)
SMOKE = ["--model", "resnet20-cifar10", "--widths", "0.5", "--calib", "64", "--test", "64"]  # fmt: skip


def _tp_prune(model: nn.Module, ratio: float, internal_only: bool) -> nn.Module:
    import torch_pruning as tp

    net = copy.deepcopy(model).eval()
    ignored: list[nn.Module] = [m for m in net.modules() if isinstance(m, nn.Linear)]
    if internal_only:
        keep = {f"{name}.conv1" for name, m in net.named_modules() if hasattr(m, "conv2")}
        ignored += [m for n, m in net.named_modules() if isinstance(m, nn.Conv2d) and n not in keep]
    pruner = tp.pruner.MagnitudePruner(
        net,
        torch.randn(1, 3, 32, 32),
        importance=tp.importance.MagnitudeImportance(p=1),
        pruning_ratio=ratio,
        ignored_layers=ignored,
    )
    pruner.step()
    return net


def _run(name: str, build: Any, model: nn.Module, test: Any) -> dict[str, Any]:
    row: dict[str, Any] = {"variant": name}
    try:
        small = build()
    except Exception as exc:  # the anchor's failure is the result
        row.update(error=f"pruning failed: {type(exc).__name__}: {exc}")
        return row
    x = test.tensors[0][:2]
    try:
        with torch.no_grad():
            small(x)
    except Exception as exc:
        row.update(
            error=f"forward failed: {type(exc).__name__}: {str(exc).splitlines()[0]}",
            where=traceback.extract_tb(exc.__traceback__)[-1].line,
        )
        return row
    res = evaluate(small, test, reference=model)
    before, after = profile(model, x), profile(small, x)
    row.update(
        accuracy=res.accuracy,
        agreement=res.agreement,
        macs_ratio=after.macs / before.macs,
        params_ratio=after.params / before.params,
    )
    return row


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--widths", default="0.5", help="kept fractions, comma separated")
    ap.add_argument("--calib", type=int, default=1000)
    ap.add_argument("--model", default="resnet56-cifar10", help="an option-A CIFAR ResNet")
    ap.add_argument("--test", type=int, help="evaluate on the first N lossless test images")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "torch_pruning.json"))
    args = ap.parse_args()
    os.environ.setdefault(
        "SPECTRIM_DATA", str(Path(__file__).resolve().parents[2] / "shared" / "data")
    )
    try:
        import torch_pruning  # noqa: F401
    except ImportError:
        sys.exit("torch-pruning is not installed: pip install torch-pruning==1.6.1")
    tp_version = importlib.metadata.version("torch-pruning")
    torch.set_num_threads(2)
    torch.manual_seed(0)
    model = load_pretrained(args.model).eval()
    calib = load_dataset("cifar10", "calib", limit=args.calib).tensors[0]
    test = load_dataset("cifar10", "eval", limit=args.test)
    dense = evaluate(model, test).accuracy
    print(f"torch-pruning {tp_version}; dense top-1 {dense:.4f}")
    rows = []
    for width in (float(w) for w in args.widths.split(",")):
        variants = [
            ("tp-global l1", lambda w=width: _tp_prune(model, 1 - w, internal_only=False)),
            ("tp-internal l1", lambda w=width: _tp_prune(model, 1 - w, internal_only=True)),
            ("spectrim l1", lambda w=width: compress(model, calib, "l1", f"width={w}")[0]),
            ("spectrim id", lambda w=width: compress(model, calib, "id", f"width={w}")[0]),
        ]
        for name, build in variants:
            row = {"width": width, **_run(name, build, model, test)}
            rows.append(row)
            if "error" in row:
                print(f"{name:15s} width={width:g}  {row['error']}")
            else:
                print(
                    f"{name:15s} width={width:g}  acc {row['accuracy']:.4f} "
                    f"agree {row['agreement']:.4f} MACs {row['macs_ratio']:.3f} "
                    f"params {row['params_ratio']:.3f}"
                )
    out = {
        "benchmark": f"torch-pruning anchor, {args.model} (option A)",
        "torch_pruning": tp_version,
        "dense_accuracy": dense,
        "calibration_images": len(calib),
        "eval_images": len(test),
        "runs": rows,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
