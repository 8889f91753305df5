"""Spectral pruning vs id vs l1 at equal MACs, without fine-tuning (issue #3).

Three models and real data:

* ``resnet56``: the pretrained option-A CIFAR-10 ResNet-56, 1000 lossless training images
  for calibration, the 1000 lossless test images for evaluation;
* ``mnist``: LeNet-300-100 (784-300-100-10 MLP) trained here for 2 epochs on MNIST
  (seeded), 1000 training images for calibration, the 10000 test images for evaluation;
* ``digits``: the demo's small CNN trained on scikit-learn's digits.

For each: ``id``, ``l1`` and ``spectral`` with θ ∈ {0, 0.5, 1} (and any ``--thetas``) at
macs 0.75 / 0.5 / 0.35, top-1 and agreement with the original.

    SPECTRIM_DATA=../shared/data .venv/bin/python benchmarks/spectral.py
    SPECTRIM_DATA=../shared/data .venv/bin/python benchmarks/spectral.py --models digits

Prints a table per model and writes ``benchmarks/results/spectral.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from _results import compress
from spectrim.evaluation import evaluate
from spectrim.zoo import load_dataset, load_pretrained, train_digits_cnn

# the few-second run of the test suite (tests/benchmarks/test_smoke.py; spectrim bench --smoke)
SMOKE = ["--models", "digits", "--targets", "macs=0.5", "--thetas", "0.5", "--calib", "64"]  # fmt: skip


def lenet_300_100(seed: int = 0, epochs: int = 2) -> tuple[nn.Module, Any, Any]:
    """The classic pruning MLP, trained on the MNIST training set (Adam, batch 128)."""
    train = load_dataset("mnist", "train")
    test = load_dataset("mnist", "eval")
    torch.manual_seed(seed)
    model = nn.Sequential(
        nn.Flatten(),
        nn.Linear(784, 300),
        nn.ReLU(),
        nn.Linear(300, 100),
        nn.ReLU(),
        nn.Linear(100, 10),
    )
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    x, y = train.tensors
    gen = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        for idx in torch.randperm(len(x), generator=gen).split(128):
            opt.zero_grad()
            nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()
    return model.eval(), train, test


def setup(name: str, calib_n: int) -> tuple[nn.Module, torch.Tensor, Any]:
    if name == "resnet56":
        model = load_pretrained("resnet56-cifar10")
        return (
            model,
            load_dataset("cifar10", "calib", limit=calib_n).tensors[0],
            load_dataset("cifar10", "eval"),
        )
    if name == "mnist":
        model, train, test = lenet_300_100()
        return model, train.tensors[0][:calib_n], test
    if name == "digits":
        model, train, test = train_digits_cnn(seed=0)
        return model, train.tensors[0][:calib_n], test
    raise ValueError(f"unknown model {name!r}")


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--models", default="resnet56,mnist,digits")
    ap.add_argument("--targets", default="macs=0.75,macs=0.5,macs=0.35")
    ap.add_argument("--thetas", default="0,0.5,1")
    ap.add_argument("--calib", type=int, default=1000)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "spectral.json"))
    args = ap.parse_args()
    os.environ.setdefault(
        "SPECTRIM_DATA", str(Path(__file__).resolve().parents[2] / "shared" / "data")
    )
    torch.set_num_threads(args.threads)
    variants: list[tuple[str, dict[str, Any]]] = [("id", {"method": "id"})]
    variants.append(("l1", {"method": "l1"}))
    for t in args.thetas.split(","):
        variants.append((f"spectral θ={float(t):g}", {"method": "spectral", "theta": float(t)}))
    results: dict[str, Any] = {
        "machine": platform.platform(),
        "torch": torch.__version__,
        "threads": args.threads,
        "models": {},
    }
    for name in args.models.split(","):
        model, calib, test = setup(name, args.calib)
        dense = evaluate(model, test).accuracy
        print(f"\n{name}: dense top-1 {dense:.4f}, {len(calib)} calibration examples")
        rows = []
        for target in args.targets.split(","):
            for label, kw in variants:
                t = time.perf_counter()
                small, rep = compress(model, calib, target=target, **kw)
                seconds = time.perf_counter() - t
                ev = evaluate(small, test, reference=model)
                row = {
                    "variant": label,
                    **kw,
                    "target": target,
                    "accuracy": ev.accuracy,
                    "agreement": ev.agreement,
                    "macs_ratio": rep.macs_after / rep.macs_before,
                    "params_ratio": rep.params_after / rep.params_before,
                    "seconds": seconds,
                    "widths": rep.widths,
                }
                rows.append(row)
                print(
                    f"  {label:16s} {target:10s} acc {ev.accuracy:.4f} agree "
                    f"{ev.agreement:.4f} MACs {row['macs_ratio']:.3f} {seconds:6.1f} s",
                    flush=True,
                )
        results["models"][name] = {"dense_accuracy": dense, "calib": len(calib), "rows": rows}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
