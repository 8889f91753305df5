"""Where all-MiniLM-L6-v2's residual stream keeps its energy, and what the magnitude
baseline (``l1`` on ``hidden=F``) drops.

The Gram of the normalised stream (every LayerNorm's output, padded tokens left out) on
``--calib`` sts-train sentences; per coordinate its share of the energy, and its rank in
``l1``'s order (the summed magnitude of every weight touching it).

    SPECTRIM_DATA=../shared/data .venv/bin/python benchmarks/minilm_stream_energy.py \\
        --out benchmarks/results/minilm_stream_energy.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch

from sparsify_minilm import data_root, load_minilm, pick_sentences
from spectrim._hidden import stream_grams
from spectrim.calibration.text import text_batches
from spectrim.graph.stream import find_stream
from spectrim.methods.stream import stream_weight_scores

# the few-second run of the test suite (tests/benchmarks/test_smoke.py; spectrim bench --smoke)
SMOKE = ["--calib", "16"]  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--calib", type=int, default=512)
    ap.add_argument("--drop", type=float, default=0.1, help="share of coordinates l1 drops")
    ap.add_argument(
        "--out", default=str(Path(__file__).parent / "results" / "minilm_stream_energy.json")
    )
    args = ap.parse_args()
    root = data_root()
    model, tok, train = load_minilm(root)
    sents = pick_sentences(train, args.calib, "random")
    calib = text_batches(sents, tok)
    stream = find_stream(model)
    assert stream is not None
    with torch.no_grad():
        gram, _ = stream_grams(model, stream, calib)
    share = np.diag(gram) / np.trace(gram)
    order = np.argsort(-stream_weight_scores(stream, model, 1.0), kind="stable")
    rank = np.empty_like(order)
    rank[order] = np.arange(len(order))
    n_drop = round(args.drop * stream.width)
    dropped = order[len(order) - n_drop :]
    top = np.argsort(-share)[:5]
    out = {
        "benchmark": "minilm-stream-energy",
        "settings": vars(args),
        "l1_dropped_energy_share": float(share[dropped].sum()),
        "top_coordinates": [
            {"coordinate": int(c), "energy_share": float(share[c]), "l1_rank": int(rank[c])}
            for c in top
        ],
    }
    print(
        f"l1 drops {n_drop} of {stream.width} coordinates holding "
        f"{100 * out['l1_dropped_energy_share']:.1f}% of the stream's energy; the top "
        "coordinates (energy share, rank in l1's order of "
        f"{stream.width}): "
        + ", ".join(
            f"{c['coordinate']} ({100 * c['energy_share']:.1f}%, {c['l1_rank']})"
            for c in out["top_coordinates"]
        ),
        flush=True,
    )
    tmp = Path(args.out).with_suffix(".json.tmp")
    tmp.write_text(json.dumps(out, indent=2))
    tmp.replace(args.out)


if __name__ == "__main__":
    main()
