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
  all 10000 JPEG test images (needs ``SPECTRIM_DATA``).

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


PARTS = {
    "digits": digits_cases,
    "tied": tied_case,
    "unreachable": unreachable_cases,
    "heldout": heldout_cases,
    "class_order": class_order_cases,
}


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--parts", nargs="+", choices=list(PARTS), default=list(PARTS))
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "reliability.json"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    result: dict[str, Any] = {
        "machine": {"platform": platform.platform(), "torch": torch.__version__},
        **{part: PARTS[part]() for part in args.parts},
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
