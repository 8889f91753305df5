"""Yang et al. 2022, Table 2, reproduced on California housing: ABP-L, ABP-M and magnitude.

Data: ``$SPECTRIM_DATA/california-housing/housing.csv`` (sha256-checked), scikit-learn's 8
derived features (MedInc, HouseAge, AveRooms, AveBedrms, Population, AveOccup, Latitude,
Longitude; rows with a missing ``total_bedrooms`` dropped), target = value / 1e5.  Features
standardised on the training split.  Per seed: a random 80/20 split and a fresh MLP
8-64-64-1 (ReLU), trained with Adam (lr 1e-3, batch 256, 150 epochs, MSE).  The paper's
architecture and training were not retrieved (papers §4.3): this one is ours.

Then, one-shot and without retraining, on the training inputs (unlabelled; the fits
reconstruct the trained network's own outputs, not the labels):

* ABP-L (λ): ``spectrim.compress(mlp, x, "lq-lasso", lam=λ)``;
* ABP-M (η, q): ``spectrim.compress(mlp, x, "lq", q=q, eta=η)``;
* Mag (p): ``spectrim.compress(mlp, x, "magnitude", f"sparsity={p}", structured=False)``
  (exactly p of the weights, as the paper's Mag; ABP removes the units it no longer reads).

Compression ratio = all parameters of the dense MLP / its non-zero parameters after
compression (weights and biases, after removing the units no kept weight reads); pruning
ratio = 1 − remaining / original; MSE increase ratio = (MSE_pruned − MSE_dense) / MSE_dense
on the test split.  Mean and standard error over the seeds.

    SPECTRIM_DATA=../shared/data .venv/bin/python benchmarks/california_abp.py --seeds 5
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

import spectrim

# the few-second run of the test suite (tests/benchmarks/test_smoke.py; spectrim bench --smoke)
SMOKE = ["--seeds", "1", "--epochs", "2", "--only", "Mag (p=0.5)", "ABP-M (η=0, q=0.5)"]  # fmt: skip


PAPER = {  # Table 2: (compression ratio, pruning ratio, MSE increase ratio), with s.e.
    "ABP-L (λ=1e-3)": ((12.97, 0.22), (0.92, 0.00), (0.30, 0.02)),
    "ABP-L (λ=1e-4)": ((4.68, 0.07), (0.79, 0.00), (0.05, 0.00)),
    "ABP-L (λ=1e-5)": ((2.33, 0.04), (0.57, 0.01), (0.03, 0.00)),
    "ABP-M (η=0, q=0.3)": ((1.52, 0.01), (0.34, 0.00), (0.01, 0.00)),
    "ABP-M (η=0, q=0.5)": ((1.80, 0.02), (0.44, 0.01), (0.01, 0.00)),
    "ABP-M (η=0, q=0.7)": ((2.10, 0.02), (0.52, 0.01), (0.02, 0.00)),
    "ABP-M (η=0.1, q=0.5)": ((2.46, 0.03), (0.59, 0.01), (0.04, 0.01)),
    "ABP-M (η=0.2, q=0.5)": ((3.12, 0.06), (0.68, 0.01), (0.17, 0.06)),
    "ABP-M (η=0.3, q=0.5)": ((3.88, 0.08), (0.74, 0.01), (0.31, 0.09)),
    "Mag (p=0.3)": ((1.55, 0.00), (0.35, 0.00), (0.07, 0.01)),
    "Mag (p=0.5)": ((2.32, 0.01), (0.57, 0.00), (0.41, 0.06)),
    "Mag (p=0.7)": ((4.71, 0.10), (0.79, 0.00), (0.85, 0.10)),
}


def _variants() -> dict[str, tuple[str, str | None, dict]]:
    out: dict[str, tuple[str, str | None, dict]] = {}
    for lam in ("1e-2", "3e-3", "1e-3", "1e-4", "1e-5"):  # 1e-2, 3e-3: beyond the paper's grid
        out[f"ABP-L (λ={lam})"] = ("lq-lasso", None, {"lam": float(lam)})
    for eta, q in ((0, 0.3), (0, 0.5), (0, 0.7), (0.1, 0.5), (0.2, 0.5), (0.3, 0.5)):
        out[f"ABP-M (η={eta}, q={q})"] = ("lq", None, {"q": q, "eta": float(eta)})
    for p in (0.3, 0.5, 0.7):
        out[f"Mag (p={p})"] = ("magnitude", f"sparsity={p}", {"structured": False})
    return out


def load_housing(root: Path) -> tuple[np.ndarray, np.ndarray]:
    from spectrim.zoo.download import verify_file

    path = verify_file(
        "california-housing/housing.csv", root / "california-housing" / "housing.csv"
    )
    X, y = [], []
    with path.open(encoding="utf-8") as f:
        for r in csv.DictReader(f):
            if not r["total_bedrooms"]:
                continue
            hh = float(r["households"])
            X.append(
                [
                    float(r["median_income"]),
                    float(r["housing_median_age"]),
                    float(r["total_rooms"]) / hh,
                    float(r["total_bedrooms"]) / hh,
                    float(r["population"]),
                    float(r["population"]) / hh,
                    float(r["latitude"]),
                    float(r["longitude"]),
                ]
            )
            y.append(float(r["median_house_value"]) / 1e5)
    return np.asarray(X), np.asarray(y)


def train_mlp(x: torch.Tensor, y: torch.Tensor, seed: int, epochs: int) -> nn.Module:
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Linear(8, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 1))
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        perm = torch.randperm(len(x), generator=g)
        for i in range(0, len(x), 256):
            idx = perm[i : i + 256]
            opt.zero_grad()
            loss = ((net(x[idx]).squeeze(1) - y[idx]) ** 2).mean()
            loss.backward()
            opt.step()
    return net.eval()


def nonzero_params(model: nn.Module) -> int:
    return sum(int((p != 0).sum()) for p in model.parameters())


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--epochs", type=int, default=150)
    ap.add_argument("--only", nargs="+", metavar="NAME", help="run only these variants")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "california_abp.json"))
    args = ap.parse_args()
    root = Path(
        os.environ.get("SPECTRIM_DATA", Path(__file__).resolve().parents[2] / "shared" / "data")
    )
    torch.set_num_threads(2)
    X, y = load_housing(root)
    variants = _variants()
    if args.only:
        unknown = sorted(set(args.only) - set(variants))
        if unknown:
            ap.error(f"--only: unknown variants {unknown}; known: {list(variants)}")
        variants = {k: v for k, v in variants.items() if k in args.only}
    per: dict[str, list[tuple[float, float, float]]] = {k: [] for k in variants}
    dense_mse = []
    t0 = time.perf_counter()
    for seed in range(args.seeds):
        rng = np.random.default_rng(seed)
        idx = rng.permutation(len(X))
        cut = int(0.8 * len(X))
        tr, te = idx[:cut], idx[cut:]
        mu, sd = X[tr].mean(0), X[tr].std(0)
        xtr = torch.tensor((X[tr] - mu) / sd, dtype=torch.float32)
        xte = torch.tensor((X[te] - mu) / sd, dtype=torch.float32)
        ytr = torch.tensor(y[tr], dtype=torch.float32)
        yte = torch.tensor(y[te], dtype=torch.float32)
        net = train_mlp(xtr, ytr, seed, args.epochs)
        with torch.no_grad():
            mse0 = float(((net(xte).squeeze(1) - yte) ** 2).mean())
        dense_mse.append(mse0)
        total = sum(p.numel() for p in net.parameters())
        for name, (method, target, options) in variants.items():
            small, _ = spectrim.compress(net, xtr, method, target, **options)
            with torch.no_grad():
                mse = float(((small(xte).squeeze(1) - yte) ** 2).mean())
            kept = nonzero_params(small)
            per[name].append((total / kept, 1 - kept / total, (mse - mse0) / mse0))
        print(
            f"seed {seed}: dense test MSE {mse0:.4f} ({time.perf_counter() - t0:.0f} s)", flush=True
        )

    def stat(vals: list[float]) -> tuple[float, float]:
        a = np.asarray(vals)
        return float(a.mean()), float(a.std(ddof=1) / math.sqrt(len(a))) if len(a) > 1 else 0.0

    rows = []
    print(f"\n{'method':22s} {'compression':>14s} {'pruning':>12s} {'MSE incr.':>12s}   paper")
    for name, vals in per.items():
        cr, pr, mi = (stat([v[i] for v in vals]) for i in range(3))
        paper = PAPER.get(name)
        rows.append(
            {
                "method": name,
                "compression_ratio": cr,
                "pruning_ratio": pr,
                "mse_increase_ratio": mi,
                "paper": paper,
            }
        )
        print(
            f"{name:22s} {cr[0]:6.2f} ({cr[1]:.2f}) {pr[0]:5.2f} ({pr[1]:.2f}) {mi[0]:6.3f} ({mi[1]:.3f})"
            + (f"   {paper[0][0]:.2f} / {paper[1][0]:.2f} / {paper[2][0]:.2f}" if paper else "   –")
        )
    out = {
        "benchmark": "california-housing-abp",
        "architecture": "MLP 8-64-64-1 ReLU, Adam 1e-3, batch 256",
        "epochs": args.epochs,
        "seeds": args.seeds,
        "dense_test_mse": stat(dense_mse),
        "rows": rows,
        "seconds": time.perf_counter() - t0,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2, ensure_ascii=False))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
