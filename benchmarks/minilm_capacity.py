"""How much of each all-MiniLM-L6-v2 FFN a subset of its neurons can carry, with and
without a linear bypass from the FFN's input, at equal parameters.

Issue 11 asks for a mean embedding cosine of 0.95 with half of every FFN removed and no
fine-tuning; the corrected methods reach 0.90–0.92 (docs/results.md).  This asks whether
a different *form* of the half-width FFN would hold more: per layer, on the dense model's
own FFN inputs ``x`` (real tokens of ``--calib`` seeded sts-train sentences; padding left
out), the FFN output ``y = W₂ GELU(W₁x + b₁)`` is regressed by least squares on

* ``k`` neurons chosen by the interpolative decomposition (``id_from_rows``, column-pivoted
  QR of the activations) and a constant: ID pruning with its fold and bias, for several
  ``k``;
* the same neurons plus ``x`` itself (a full ``d × d`` linear bypass around the FFN, the
  parameters of ``d/2`` neurons): can a linear path stand in for the removed neurons?
* the same neurons with a ridge on the fold (``--ridges``, each a fraction of the mean
  diagonal of the kept neurons' Gram; the constant is not shrunk): is the gap between
  the calibration and the held-out error the fit's variance?

Each row reports the relative squared error of ``y`` (to its centred energy) on the
calibration tokens and on the tokens of ``--calib`` other sentences, and the parameters
of the FFN in that form (a neuron costs ``2d + 1``, the bypass ``d²``).  A bypass is
worth keeping only where it beats the neurons it costs at the same parameters.

    SPECTRIM_DATA=../shared/data .venv/bin/python benchmarks/minilm_capacity.py \\
        --out benchmarks/results/minilm_capacity.json
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from _results import save_result
from sparsify_minilm import data_root, load_minilm, pick_sentences
from spectrim.calibration.text import text_batches
from spectrim.linalg import id_from_rows

# the few-second run of the test suite (tests/benchmarks/test_smoke.py; spectrim bench --smoke)
SMOKE = ["--calib", "16", "--layers", "0", "--keep", "192,384"]  # fmt: skip


def ffn_inputs(model: Any, tok: Any, sentences: list[str], layers: list[int]) -> dict[int, Any]:
    """Per layer, the inputs of its FFN's first linear on the real tokens (float64)."""
    seen: dict[int, list[torch.Tensor]] = {i: [] for i in layers}
    hooks = [
        model.encoder.layer[i].intermediate.dense.register_forward_hook(
            lambda m, inp, out, i=i: seen[i].append(inp[0].detach())
        )
        for i in layers
    ]
    masks = []
    try:
        with torch.no_grad():
            for batch in text_batches(sentences, tok):
                model(**batch)
                masks.append(batch["attention_mask"].bool())
    finally:
        for h in hooks:
            h.remove()
    return {i: torch.cat([x[m] for x, m in zip(seen[i], masks)]).double() for i in layers}


def relative_error(F: np.ndarray, C: np.ndarray, Y: np.ndarray) -> float:
    """``‖FC − Y‖² / ‖Y − mean(Y)‖²``."""
    return float(np.linalg.norm(F @ C - Y) ** 2 / np.linalg.norm(Y - Y.mean(0)) ** 2)


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--calib", type=int, default=512)
    ap.add_argument("--layers", default="0,1,2,3,4,5")
    ap.add_argument("--keep", default="384,576,768,960", help="neuron counts k")
    ap.add_argument("--ridges", default="0.001,0.01,0.1", help="fractions for the ridge rows")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument(
        "--out", default=str(Path(__file__).parent / "results" / "minilm_capacity.json")
    )
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model, tok, train = load_minilm(data_root())
    both = pick_sentences(train, 2 * args.calib, "random")
    layers = [int(v) for v in args.layers.split(",")]
    keeps = [int(v) for v in args.keep.split(",")]
    width = model.config.intermediate_size
    if not all(0 < k <= width for k in keeps):
        ap.error(f"--keep {args.keep}: each count must be in 1..{width} (the FFN's width)")
    ridges = [float(v) for v in args.ridges.split(",") if v]
    t = time.perf_counter()
    xs = ffn_inputs(model, tok, both[: args.calib], layers)
    xs_held = ffn_inputs(model, tok, both[args.calib :], layers)
    rows = []
    for i in layers:
        layer = model.encoder.layer[i]
        W1 = layer.intermediate.dense.weight.detach().double()
        b1 = layer.intermediate.dense.bias.detach().double()
        W2 = layer.output.dense.weight.detach().double()
        d = W2.shape[0]
        x, x_held = xs[i].numpy(), xs_held[i].numpy()
        acts = torch.nn.functional.gelu(xs[i] @ W1.T + b1).numpy()
        acts_held = torch.nn.functional.gelu(xs_held[i] @ W1.T + b1).numpy()
        y, y_held = acts @ W2.numpy().T, acts_held @ W2.numpy().T
        perm = id_from_rows(acts).perm
        for k in keeps:
            kept = perm[:k]
            # the plain fold's normal equations, shared by its ridge rows
            plain = np.hstack([acts[:, kept], np.ones((len(acts), 1))])
            G, rhs = plain.T @ plain, plain.T @ y
            for bypass, ridge in [(False, 0.0), (True, 0.0)] + [(False, r) for r in ridges]:
                fit = [acts[:, kept], np.ones((len(acts), 1))] + ([x] if bypass else [])
                held = [acts_held[:, kept], np.ones((len(acts_held), 1))]
                held += [x_held] if bypass else []
                F, F_held = np.hstack(fit), np.hstack(held)
                if ridge:
                    shrink = np.r_[np.full(k, ridge * np.trace(G[:k, :k]) / k), 0.0]
                    C = np.linalg.solve(G + np.diag(shrink), rhs)
                else:
                    C = np.linalg.lstsq(F, y, rcond=None)[0]
                params = k * (2 * d + 1) + d + (d * d if bypass else 0)
                rows.append(
                    {
                        "layer": i,
                        "neurons": k,
                        "bypass": bypass,
                        "ridge": ridge,
                        "params": params,
                        "neuron_equivalents": params / (2 * d + 1),
                        "error_calibration": relative_error(F, C, y),
                        "error_held_out": relative_error(F_held, C, y_held),
                    }
                )
                r = rows[-1]
                print(
                    f"layer {i} k {k:4d} bypass {bypass!s:5s} ridge {ridge:g} "
                    f"≈{r['neuron_equivalents']:6.0f} neurons: error "
                    f"{r['error_calibration']:.4f} / held-out {r['error_held_out']:.4f}",
                    flush=True,
                )
    out = {
        "benchmark": "minilm-capacity",
        "settings": vars(args),
        "tokens": {"calibration": sum(len(v) for v in xs.values()) // len(layers)},
        "seconds": time.perf_counter() - t,
        "rows": rows,
    }
    save_result(args.out, out, args.threads)


if __name__ == "__main__":
    main()
