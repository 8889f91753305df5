"""A short repair after compression: knowledge distillation from the original model on the
CIFAR-10 JPEG train set, spectrim's models against Torch-Pruning's at the same widths.

The pretrained option-A ResNet-56 (``--model``), 1000 lossless train images calibrate;
each variant is compressed, then repaired with ``spectrim.repair`` (the same recipe for
all, by default: relative MSE to the original's logits, SGD lr 0.01 with a cosine
schedule, batch 128, BatchNorm statistics re-estimated then kept, random flips and
shifted crops; the
``--loss``, ``--lr``, ``--batch-norm``, ``--augment``, ``--mix`` and ``--features`` options
change it) for ``--epochs`` passes over ``--train`` unlabelled JPEG train
images. Accuracy and agreement with the dense model are measured on the 1000 lossless
test images before and after, with the wall time of compression and of repair.

Variants:

* ``spectrim id macs=0.5``: the allocator at half the MACs (issue 13's headline);
* ``spectrim id width=0.5`` / ``spectrim l1 width=0.5``: half of every prunable group,
  with and without the correction;
* ``spectrim spectral macs=0.5 residual``: ``spectral`` at half the MACs with the
  residual-aware output fit (``sequential_fit="residual"``, the best no-fine-tuning start);
* ``spectrim spectral macs=0.5 residual readers``: the same with ``refit_readers=True``,
  every calibration image fitted (``sequential_fraction=1.0``), block by block;
* ``tp l1 width=0.5``: Torch-Pruning's L1 filter norms on the same block-internal channels
  (its own graph breaks on the option-A shortcut; ``benchmarks/anchor_torch_pruning.py``),
  installed with ``pip install torch-pruning==1.6.1``.

    SPECTRIM_DATA=../shared/data .venv/bin/python benchmarks/repair_cifar.py --epochs 1

Writes ``benchmarks/results/repair_cifar.json`` (``--out``).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

import spectrim
from _results import compress
from spectrim.evaluation import evaluate
from spectrim.evaluation.flops import profile
from spectrim.io import load_compressed, save_compressed
from spectrim.zoo import load_dataset, load_pretrained

# the few-second run of the test suite (tests/benchmarks/test_smoke.py; spectrim bench --smoke)
SMOKE = ["--model", "resnet20-cifar10", "--train", "256", "--calib", "64", "--test", "64", "--jpeg-test", "64", "--variants", "spectrim id width=0.5", "--mix", "0.5"]  # fmt: skip


HERE = Path(__file__).resolve().parent


def _variants(model: nn.Module, calib: torch.Tensor, which: list[str]) -> dict[str, Any]:
    sys.path.insert(0, str(HERE))
    from anchor_torch_pruning import _tp_prune

    table = {
        "spectrim id macs=0.5": lambda: compress(model, calib, "id", "macs=0.5")[0],
        "spectrim id width=0.5": lambda: compress(model, calib, "id", "width=0.5")[0],
        "spectrim l1 width=0.5": lambda: compress(model, calib, "l1", "width=0.5")[0],
        "spectrim spectral macs=0.5 residual": lambda: compress(
            model, calib, "spectral", "macs=0.5", sequential_fit="residual"
        )[0],
        # the readers refitted too, every calibration image fitted, block by block (stop 38's
        # best no-fine-tuning ResNet-20 start)
        "spectrim spectral macs=0.5 residual readers": lambda: compress(
            model,
            calib,
            "spectral",
            "macs=0.5",
            sequential_fit="residual",
            refit_readers=True,
            sequential_fraction=1.0,
            blockwise=True,
        )[0],
        # the allocation search's model (benchmarks/search.py): 2 rounds, about 10 minutes
        "spectrim spectral macs=0.5 residual search=2": lambda: compress(
            model, calib, "spectral", "macs=0.5", sequential_fit="residual", search=2
        )[0],
        "tp l1 width=0.5": lambda: _tp_prune(model, 0.5, internal_only=True),
    }
    return {k: table[k] for k in which}


def _start(
    args: argparse.Namespace, name: str, model: nn.Module, build: Any
) -> tuple[nn.Module, float, str]:
    """The variant's compressed model, its compression seconds and where it came from:
    ``"compressed"``, or the ``--start`` folder it was read from (its seconds are those of
    the run that compressed it)."""
    key = {"model": args.model, "calib": args.calib, "variant": name}
    folder = Path(args.start) if args.start else None
    if folder is not None and (folder / "manifest.json").exists():
        small = load_compressed(folder)  # checks every file's sha256, report.json's too
        saved = json.loads((folder / "report.json").read_text())
        found = {k: saved.get(k) for k in key}
        if found != key:
            raise SystemExit(f"--start {folder}: it holds {found}, not {key}")
        print(f"{name}: read from {folder} (compressed in {saved['compress_s']:.0f} s)")
        return small, float(saved["compress_s"]), str(folder)
    t = time.perf_counter()
    small = build()
    compress_s = time.perf_counter() - t
    if folder is not None:
        report = key | {"compress_s": compress_s}
        save_compressed(small, folder, report, arch={"zoo": args.model})
    return small, compress_s, "compressed"


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--model", default="resnet56-cifar10")
    ap.add_argument("--epochs", type=float, default=1.0)
    ap.add_argument(
        "--train",
        type=int,
        default=50000,
        help="JPEG train images to repair on (0: none, with --lossless N: those alone)",
    )
    ap.add_argument(
        "--lossless",
        type=int,
        default=0,
        metavar="N",
        help="also repair on the first N lossless training images (the calibration split, "
        "the same kind as the lossless test images; at most 4000)",
    )
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--lr", type=float, default=0.01)
    ap.add_argument(
        "--warmup", type=float, default=0.0, help="RepairConfig.warmup (fraction of the steps)"
    )
    ap.add_argument(
        "--average", type=float, default=0.0, help="RepairConfig.average (EMA decay per step)"
    )
    ap.add_argument(
        "--seed", type=int, default=0, help="RepairConfig.seed (batch order, crops, flips)"
    )
    ap.add_argument("--loss", default="mse", choices=("mse", "kl"))
    ap.add_argument("--optimizer", default="sgd", choices=("sgd", "adamw"))
    ap.add_argument("--weight-decay", type=float, default=0.0)
    ap.add_argument(
        "--batch-norm",
        default="recalibrate",
        choices=("auto", "recalibrate", "freeze", "train"),
        help="RepairConfig.batch_norm (recalibrate: the recipe of the runs in docs/results.md; "
        "the library's default is auto)",
    )
    ap.add_argument("--augment", default="flip-crop", choices=("none", "flip", "flip-crop"))
    ap.add_argument(
        "--mix", type=float, default=0.0, help="RepairConfig.mix (mixup's Beta parameter)"
    )
    ap.add_argument(
        "--features", type=float, default=0.0, help="weight of the block outputs' term (repair)"
    )
    ap.add_argument("--calib", type=int, default=1000)
    ap.add_argument("--test", type=int, help="evaluate on the first N lossless test images")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument(
        "--variants",
        default="spectrim id macs=0.5,spectrim id width=0.5,spectrim l1 width=0.5,tp l1 width=0.5",
    )
    ap.add_argument(
        "--jpeg-test", type=int, default=0, help="also score on N JPEG test images (10000: all)"
    )
    ap.add_argument(
        "--start",
        metavar="DIR",
        help="one variant's compressed model kept in DIR (spectrim.io.save_compressed): read "
        "from there when an earlier run with the same --model, --calib and variant saved it, "
        "else compressed and saved there (a repair sweep then skips the search's minutes)",
    )
    ap.add_argument("--out", default=str(HERE / "results" / "repair_cifar.json"))
    args = ap.parse_args()
    if args.start and len(args.variants.split(",")) != 1:
        ap.error("--start keeps one variant's model: name one in --variants")
    if not args.train and not args.lossless:
        ap.error("--train 0 needs --lossless N: there is nothing to repair on")
    os.environ.setdefault("SPECTRIM_DATA", str(HERE.parents[1] / "shared" / "data"))
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = load_pretrained(args.model).eval()
    calib = load_dataset("cifar10", "calib", limit=args.calib).tensors[0]
    test = load_dataset("cifar10", "eval", limit=args.test)
    t = time.perf_counter()
    parts = []
    if args.train:
        parts.append(load_dataset("cifar10-jpeg", "train", limit=args.train).tensors[0])
    if args.lossless:
        parts.append(load_dataset("cifar10", "calib", limit=args.lossless).tensors[0])
    train = torch.cat(parts)
    load_s = time.perf_counter() - t
    batches = list(train.split(args.batch))  # spectrim.repair mixes them every epoch
    dense = evaluate(model, test).accuracy
    jpeg = None
    if args.jpeg_test:
        # a prefix holds every class in turn
        jpeg = load_dataset("cifar10-jpeg", "test", limit=args.jpeg_test)
    print(
        f"{args.model}: dense {dense:.4f}; {len(train)} train images ({args.lossless} lossless; "
        f"{load_s:.0f} s to load)"
    )
    x = test.tensors[0][:2]
    cost0 = profile(model, x)
    rows = []
    recipe = spectrim.RepairConfig(
        epochs=args.epochs,
        lr=args.lr,
        warmup=args.warmup,
        average=args.average,
        optimizer=args.optimizer,
        weight_decay=args.weight_decay,
        loss=args.loss,
        batch_norm=args.batch_norm,
        augment=None if args.augment == "none" else args.augment,
        mix=args.mix,
        features=args.features,
        seed=args.seed,
    )
    for name, build in _variants(model, calib, args.variants.split(",")).items():
        small, compress_s, started = _start(args, name, model, build)
        before = evaluate(small, test, reference=model)
        try:
            fixed, rep = spectrim.repair(small, model, batches, recipe)
        except FloatingPointError as exc:  # a recipe that diverges is a result too
            rows.append({"variant": name, "accuracy_before": before.accuracy, "error": str(exc)})
            print(f"{name:24s} {before.accuracy:.4f} -> {exc}", flush=True)
            continue
        after = evaluate(fixed, test, reference=model)
        if jpeg is not None:
            jb, ja = evaluate(small, jpeg, reference=model), evaluate(fixed, jpeg, reference=model)
            jpeg_row = {
                "jpeg_accuracy_before": jb.accuracy,
                "jpeg_agreement_before": jb.agreement,
                "jpeg_accuracy_after": ja.accuracy,
                "jpeg_agreement_after": ja.agreement,
            }
            print(f"  JPEG test: {jb.accuracy:.4f} -> {ja.accuracy:.4f}", flush=True)
        cost = profile(small, x)
        row = {
            "variant": name,
            "macs_ratio": cost.macs / cost0.macs,
            "params_ratio": cost.params / cost0.params,
            "compress_s": compress_s,
            "start": started,
            "accuracy_before": before.accuracy,
            "agreement_before": before.agreement,
            "accuracy_after": after.accuracy,
            "agreement_after": after.agreement,
            "repair": rep.to_dict(),
            **(jpeg_row if jpeg is not None else {}),
        }
        rows.append(row)
        print(
            f"{name:24s} MACs {row['macs_ratio']:.3f}: {before.accuracy:.4f} -> "
            f"{after.accuracy:.4f} after {args.epochs:g} epoch(s) (agreement "
            f"{before.agreement:.4f} -> {after.agreement:.4f}); compress {compress_s:.1f} s, "
            f"repair {rep.seconds:.0f} s, loss {rep.loss_first:.4f} -> {rep.loss_last:.4f}",
            flush=True,
        )
    out = {
        "benchmark": "repair (distillation) after compression, CIFAR-10",
        "model": args.model,
        "dense_accuracy": dense,
        "train_images": len(train),
        "lossless_train_images": args.lossless,
        "eval_images": len(test),
        "jpeg_eval_images": len(jpeg) if jpeg is not None else 0,
        "dense_jpeg_accuracy": evaluate(model, jpeg).accuracy if jpeg is not None else None,
        "recipe": recipe.to_dict() | {"batch": args.batch},
        "threads": args.threads,
        "command": " ".join(sys.argv),
        "runs": rows,
    }
    path = Path(args.out)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(out, indent=2))
    tmp.replace(path)
    print("wrote", path)


if __name__ == "__main__":
    main()
