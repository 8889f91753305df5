"""Where the time of a compressed ResNet-56 goes, and why half the MACs is not twice as fast.

The pretrained option-A CIFAR-10 ResNet-56, dense and compressed by ``id`` to
``macs=0.5`` (1000 calibration images) with ``round_to`` 1, 8 and 16, each timed at batch
1 and 64 in PyTorch's default layout and in ``channels_last``: the whole forward pass
against the dense model in the default layout (interleaved, ``compare_latency``), and the
time of every module by kind (``module_latencies``):

* ``conv1``: each block's first conv (its output width is pruned), ``bn1`` after it;
* ``conv2``: each block's second conv (its input width is pruned; its output is the
  residual stream, pinned by the option-A shortcut), ``bn2`` after it;
* ``stem`` (the first conv and BatchNorm), ``fc``;
* ``other``: what no module explains: the functional ReLUs, the residual additions, the
  shortcut's strided slice and channel padding, pooling, Python.

    SPECTRIM_DATA=../shared/data .venv/bin/python benchmarks/latency_breakdown.py

Writes ``benchmarks/results/latency_breakdown.json`` (``--out``).
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path
from typing import Any

import torch
from torch import nn

from spectrim.evaluation import compare_latency
from spectrim.evaluation.latency import module_latencies
from spectrim.zoo import load_dataset, load_pretrained

# the few-second run of the test suite (tests/benchmarks/test_smoke.py; spectrim bench --smoke)
SMOKE = ["--model", "resnet20-cifar10", "--calib", "64", "--round-to", "8", "--batches", "1", "--repeats", "2"]  # fmt: skip


HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from _results import compress, save_result  # noqa: E402

KINDS = ("conv1", "bn1", "conv2", "bn2", "stem", "fc", "other")


def _kind(name: str) -> str:
    leaf = name.rpartition(".")[2]
    if name.startswith("layer"):
        return leaf if leaf in KINDS else "other"
    return "fc" if leaf in ("fc", "linear") else "stem"


def _breakdown(model: nn.Module, x: torch.Tensor, repeats: int) -> dict[str, float]:
    per, total = module_latencies(model, x, warmup=3, repeats=repeats)
    out = dict.fromkeys(KINDS, 0.0)
    for name, t in per.items():
        out[_kind(name)] += t
    out["other"] += max(total - sum(per.values()), 0.0)
    out["total"] = total
    return out


def _widths(model: nn.Module) -> list[int]:
    return [
        m.out_channels for n, m in model.named_modules() if n.endswith("conv1") and "layer" in n
    ]


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--model", default="resnet56-cifar10")
    ap.add_argument("--calib", type=int, default=1000)
    ap.add_argument("--round-to", type=int, nargs="+", default=[1, 8, 16])
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 64])
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=str(HERE / "results" / "latency_breakdown.json"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    dense = load_pretrained(args.model).eval()
    x, _ = load_dataset("cifar10", "calib", limit=args.calib).tensors
    models: dict[str, nn.Module] = {"dense": dense}
    macs: dict[str, float] = {"dense": 1.0}
    for r in args.round_to:
        small, report = compress(dense, x, "id", "macs=0.5", round_to=r)
        models[f"id macs=0.5 round_to={r}"] = small
        macs[f"id macs=0.5 round_to={r}"] = report.macs_ratio
    rows: list[dict[str, Any]] = []
    for batch in args.batches:
        example = x[:batch]
        for layout in ("contiguous", "channels_last"):
            for label, model in models.items():
                m, ex = model, example
                if layout == "channels_last":
                    m = copy.deepcopy(model).to(memory_format=torch.channels_last)
                    ex = example.contiguous(memory_format=torch.channels_last)
                timed = compare_latency(dense, m, ex, warmup=3, repeats=args.repeats)
                parts = _breakdown(m, ex, args.repeats)
                row = {
                    "model": label,
                    "batch": batch,
                    "layout": layout,
                    "macs_ratio": macs[label],
                    "ratio_to_dense": timed["compressed_median"] / timed["original_median"],
                    "seconds": parts,
                    "conv1_widths": _widths(m),
                }
                rows.append(row)
                share = {k: v / parts["total"] for k, v in parts.items() if k != "total"}
                print(
                    f"batch {batch:3d} {layout:13s} {label:24s} MACs {macs[label]:.2f} "
                    f"time {row['ratio_to_dense']:.3f} of dense | "
                    + " ".join(f"{k} {v:.0%}" for k, v in share.items()),
                    flush=True,
                )
    save_result(args.out, {"rows": rows}, args.threads)


if __name__ == "__main__":
    main()
