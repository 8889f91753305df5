"""spectrim against Torch-Pruning at the same MACs, no fine-tuning, in one run (issue 13).

Pretrained option-A CIFAR-10 ResNets (akamaster), unlabelled calibration images from the
lossless training set, evaluated on the 1000 lossless test images and on all 10000 test
images as JPEG (quality ~75, about 10 points below lossless for every model):

* spectrim ``id``, ``spectral``, ``l1``, ``random`` at ``macs=F`` (its global allocator);
  ``--spectrim spectral+residual`` adds ``sequential_fit="residual"`` to a method;
* Torch-Pruning's importances ``l1`` / ``l2`` (group magnitude), ``bnscale``, ``taylor``
  and ``lamp``, with TP's own global allocation (``global_pruning=True``), its pruning
  ratio bisected until its MACs match ``F`` (within 0.5%).  TP's graph treats the option-A
  shortcut's ``F.pad`` as element-wise and breaks the model when it prunes the residual
  streams (``anchor_torch_pruning.py``), so TP prunes the block-internal channels only, the
  ones spectrim prunes in these models too.  ``taylor`` needs gradients: the cross-entropy
  of the calibration images against the original model's own predictions (the images are
  unlabelled for every method).

Accuracy, agreement with the dense model (on both test sets), MACs, params and the
measured CPU speed-up at batch 64 (interleaved timings) per cell; a PNG of accuracy
against MACs per model and test set.

    SPECTRIM_DATA=../shared/data .venv/bin/python benchmarks/side_by_side.py        # ~30 min

Writes ``benchmarks/results/side_by_side.json`` and ``side_by_side.png``.
"""

from __future__ import annotations

import argparse
import copy
import importlib.metadata
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))

import spectrim
from _results import save_result
from spectrim.evaluation import compare_latency
from spectrim.evaluation.flops import profile
from spectrim.zoo import load_dataset, load_pretrained

# the smoke-sized run of the test suite (tests/benchmarks/test_smoke.py)
SMOKE = [
    "--models", "resnet20", "--macs", "0.5", "--spectrim", "id+residual,l1", "--tp", "l1,taylor",
    "--calib", "64", "--test-limit", "64", "--jpeg-limit", "64", "--no-latency",
]  # fmt: skip

SPECTRIM_METHODS = ("id", "spectral", "l1", "random")
TP_METHODS = ("l1", "l2", "bnscale", "taylor", "lamp")


def _predict(model: nn.Module, x: torch.Tensor, batch: int = 500) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat([model(b).argmax(1) for b in x.split(batch)])


def _tp_importance(name: str) -> Any:
    import torch_pruning as tp

    return {
        "l1": lambda: tp.importance.GroupMagnitudeImportance(p=1),
        "l2": lambda: tp.importance.GroupMagnitudeImportance(p=2),
        "bnscale": lambda: tp.importance.BNScaleImportance(),
        "taylor": lambda: tp.importance.GroupTaylorImportance(),
        "lamp": lambda: tp.importance.LAMPImportance(p=2),
    }[name]()


_GRADS: dict[tuple[int, int], dict[str, torch.Tensor]] = {}


def _taylor_grads(model: nn.Module, calib: torch.Tensor) -> dict[str, torch.Tensor]:
    """Gradients of the cross-entropy against the original's own predictions (the images
    are unlabelled), summed over the calibration set; computed once per model."""
    key = (id(model), len(calib))
    if key not in _GRADS:
        net = copy.deepcopy(model).eval()
        labels = _predict(model, calib)
        for xb, yb in zip(calib.split(128), labels.split(128)):
            nn.functional.cross_entropy(net(xb), yb, reduction="sum").backward()
        _GRADS[key] = {k: p.grad.detach().clone() for k, p in net.named_parameters()}
    return _GRADS[key]


def tp_prune(model: nn.Module, name: str, ratio: float, calib: torch.Tensor) -> nn.Module:
    """TP on the block-internal channels with global allocation at ``ratio``."""
    import torch_pruning as tp

    net = copy.deepcopy(model).eval()
    keep = {f"{n}.conv1" for n, m in net.named_modules() if hasattr(m, "conv2")}
    ignored = [
        m
        for n, m in net.named_modules()
        if isinstance(m, nn.Linear) or (isinstance(m, nn.Conv2d) and n not in keep)
    ]
    pruner = tp.pruner.BasePruner(
        net,
        calib[:1],
        importance=_tp_importance(name),
        global_pruning=True,
        pruning_ratio=ratio,
        max_pruning_ratio=0.95,
        ignored_layers=ignored,
    )
    if name == "taylor":
        for key, param in net.named_parameters():
            param.grad = _taylor_grads(model, calib)[key].clone()
    pruner.step()
    net.zero_grad(set_to_none=True)
    return net.eval()


def tp_at_macs(
    model: nn.Module, name: str, target: float, calib: torch.Tensor, example: torch.Tensor
) -> tuple[nn.Module, float, int]:
    """Bisect TP's pruning ratio until its MACs ratio is within 0.5% of ``target``."""
    dense = profile(model, example).macs
    lo, hi = 0.0, 0.95
    best: tuple[float, nn.Module, float] | None = None
    for step in range(1, 16):
        ratio = (lo + hi) / 2
        net = tp_prune(model, name, ratio, calib)
        macs = profile(net, example).macs / dense
        if best is None or abs(macs - target) < abs(best[2] - target):
            best = (ratio, net, macs)
        if abs(macs - target) <= 0.005 * target:
            return net, macs, step
        lo, hi = (ratio, hi) if macs > target else (lo, ratio)
    assert best is not None
    return best[1], best[2], step


def _plot(rows: list[dict[str, Any]], dense: dict[str, dict[str, float]], path: Path) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    models = list(dense)
    fig = Figure(figsize=(11, 4.2 * len(models)))
    FigureCanvasAgg(fig)
    sets = (("lossless", "1000 lossless test images"), ("jpeg", "10000 JPEG test images"))
    for i, model in enumerate(models):
        for j, (key, title) in enumerate(sets):
            ax = fig.add_subplot(len(models), 2, 2 * i + j + 1)
            for variant in dict.fromkeys(r["variant"] for r in rows):
                pts = sorted(
                    (r["macs_ratio"], 100 * r[f"accuracy_{key}"])
                    for r in rows
                    if r["model"] == model and r["variant"] == variant and f"accuracy_{key}" in r
                )
                if pts:
                    style = "-o" if variant.startswith("spectrim") else "--s"
                    ax.plot(*zip(*pts), style, label=variant, markersize=4)
            ax.axhline(100 * dense[model][key], color="k", lw=0.8, ls=":", label="dense")
            ax.set(title=f"{model}: {title}", xlabel="MACs kept", ylabel="top-1 %")
            ax.set_ylim(0, 100)
            ax.grid(alpha=0.3)
            if i == 0 and j == 0:
                ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=110)
    os.replace(tmp, path)
    print("wrote", path)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--models", default="resnet20,resnet56")
    ap.add_argument("--macs", default="0.75,0.5,0.35", help="MACs fractions to keep")
    ap.add_argument(
        "--spectrim",
        default=",".join(SPECTRIM_METHODS),
        help="spectrim methods, each optionally with its sequential fit: id,spectral+residual",
    )
    ap.add_argument("--tp", default=",".join(TP_METHODS), help="Torch-Pruning importances")
    ap.add_argument("--calib", type=int, default=1000)
    ap.add_argument("--test-limit", type=int, default=None, help="lossless test images")
    ap.add_argument("--jpeg-limit", type=int, default=None, help="JPEG test images")
    ap.add_argument("--no-latency", action="store_true")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "side_by_side.json"))
    args = ap.parse_args(argv)
    os.environ.setdefault(
        "SPECTRIM_DATA", str(Path(__file__).resolve().parents[2] / "shared" / "data")
    )
    tp_names = [n for n in args.tp.split(",") if n]
    if tp_names:
        try:
            import torch_pruning  # noqa: F401
        except ImportError:
            sys.exit("torch-pruning is not installed: pip install -e '.[anchors]'")
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    calib = load_dataset("cifar10", "calib", limit=args.calib).tensors[0]
    lossless = load_dataset("cifar10", "eval", limit=args.test_limit)
    # a prefix holds every class in turn
    jpeg_x, jpeg_y = load_dataset("cifar10-jpeg", "test", limit=args.jpeg_limit or None).tensors
    tests = {"lossless": lossless.tensors, "jpeg": (jpeg_x, jpeg_y)}
    example = calib[:2]

    rows: list[dict[str, Any]] = []
    dense_acc: dict[str, dict[str, float]] = {}
    for model_name in args.models.split(","):
        model = load_pretrained(f"{model_name}-cifar10").eval()
        dense_pred = {k: _predict(model, x) for k, (x, _) in tests.items()}
        dense_acc[model_name] = {
            k: (dense_pred[k] == y).float().mean().item() for k, (_, y) in tests.items()
        }
        print(
            f"{model_name}: dense {dense_acc[model_name]['lossless']:.4f} lossless, "
            f"{dense_acc[model_name]['jpeg']:.4f} JPEG"
        )
        for target in (float(f) for f in args.macs.split(",")):
            builds: list[tuple[str, Callable[[], tuple[nn.Module, dict[str, Any]]]]] = []
            for method in (m for m in args.spectrim.split(",") if m):

                def run_spectrim(
                    method: str = method, model: nn.Module = model, target: float = target
                ) -> tuple[nn.Module, dict[str, Any]]:
                    name, _, fit = method.partition("+")  # e.g. "spectral+residual"
                    small, report = spectrim.compress(
                        model, calib, name, f"macs={target}", sequential_fit=fit or "inputs"
                    )
                    return small, {"macs_ratio": report.macs_ratio}

                builds.append((f"spectrim {method}", run_spectrim))
            for name in tp_names:

                def run_tp(
                    name: str = name, model: nn.Module = model, target: float = target
                ) -> tuple[nn.Module, dict[str, Any]]:
                    small, macs, steps = tp_at_macs(model, name, target, calib, example)
                    return small, {"macs_ratio": macs, "bisection_steps": steps}

                builds.append((f"tp {name}", run_tp))
            for variant, build in builds:
                t0 = time.perf_counter()
                small, extra = build()
                seconds = time.perf_counter() - t0
                cost, base = profile(small, example), profile(model, example)
                row: dict[str, Any] = {
                    "model": model_name,
                    "target_macs": target,
                    "variant": variant,
                    "seconds": seconds,
                    **extra,
                    "params_ratio": cost.params / base.params,
                }
                for key, (x, y) in tests.items():
                    pred = _predict(small, x)
                    row[f"accuracy_{key}"] = (pred == y).float().mean().item()
                    row[f"agreement_{key}"] = (pred == dense_pred[key]).float().mean().item()
                if not args.no_latency:
                    lat = compare_latency(model, small, calib[:64], warmup=2, repeats=10)
                    row["speedup_batch64"] = lat["speedup"]
                rows.append(row)
                print(
                    f"{model_name} macs={target:g} {variant:16s} MACs {row['macs_ratio']:.3f} "
                    f"params {row['params_ratio']:.3f} lossless {row['accuracy_lossless']:.4f} "
                    f"/ {row['agreement_lossless']:.4f}  JPEG {row['accuracy_jpeg']:.4f} "
                    f"/ {row['agreement_jpeg']:.4f}  {seconds:5.1f} s"
                    + (
                        f"  speed-up {row['speedup_batch64']:.2f}x"
                        if "speedup_batch64" in row
                        else ""
                    )
                )
    tp_version = importlib.metadata.version("torch-pruning") if tp_names else None
    path = save_result(
        args.out,
        {
            "benchmark": "spectrim vs Torch-Pruning at equal MACs, CIFAR-10 ResNets (option A)",
            "torch_pruning": tp_version,
            "calibration_images": len(calib),
            "test_images": {k: len(x) for k, (x, _) in tests.items()},
            "dense_accuracy": dense_acc,
            "runs": rows,
        },
        args.threads,
    )
    _plot(rows, dense_acc, path.with_suffix(".png"))


if __name__ == "__main__":
    main()
