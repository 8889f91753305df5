"""Does a full-width refit of every reader of the residual stream repair a compressed
all-MiniLM-L6-v2?  (Issue 11: the embedding fidelity after half of every FFN.)

Compress (``--target``, ``--method``, as ``benchmarks/minilm_structures.py``), then, keeping
the stream's full width, refit each reader of every LayerNorm's output (queries, keys,
values, FFN inputs, a final expansion) by least squares, in order, so that it sees what the
original model's reader saw (``spectrim._hidden.refit_site`` with the identity basis,
sequential).  Reports Spearman and cosine before and after.

    SPECTRIM_DATA=../shared/data .venv/bin/python benchmarks/minilm_stream_refit.py \\
        --out benchmarks/results/minilm_stream_refit.json
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

import torch

import spectrim
from sparsify_minilm import (
    data_root,
    embed,
    fidelity,
    load_minilm,
    pick_sentences,
    read_genres,
    read_sts,
)
from spectrim._hidden import convert_stream, refit_site, with_tied_embeddings
from spectrim.calibration.text import text_batches
from spectrim.graph.stream import find_stream

# the few-second run of the test suite (tests/benchmarks/test_smoke.py; spectrim bench --smoke)
SMOKE = ["--calib", "16", "--targets", "width=0.5", "--test-limit", "32"]  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--calib", type=int, default=512)
    ap.add_argument("--targets", default="width=0.5,macs=0.5")
    ap.add_argument("--method", default="id")
    ap.add_argument("--ridge", type=float, default=1e-6)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument(
        "--out", default=str(Path(__file__).parent / "results" / "minilm_stream_refit.json")
    )
    ap.add_argument("--test-limit", type=int, help="score on N STS-B test pairs (spread)")
    args = ap.parse_args()
    root = data_root()
    torch.set_num_threads(args.threads)
    model, tok, train_sents = load_minilm(root)
    sentences = pick_sentences(train_sents, args.calib, "random")
    calib = text_batches(sentences, tok)
    test_csv = root / "stsbenchmark" / "sts-test.csv"
    pairs, gold = read_sts(test_csv, args.test_limit)
    genres = read_genres(test_csv, args.test_limit)
    ref = embed(model, tok, [a for a, _ in pairs]), embed(model, tok, [b for _, b in pairs])
    runs = []
    for target in args.targets.split(","):
        extra = {"heads": True} if target.startswith(("macs", "params")) else {}
        small, report = spectrim.compress(model, calib, args.method, target, **extra)
        before = fidelity(small, tok, pairs, gold, genres, ref)
        t = time.perf_counter()
        original = copy.deepcopy(model)
        found = find_stream(original)
        assert found is not None
        convert_stream(original, with_tied_embeddings(original, found)[0])
        work = copy.deepcopy(small)
        found = find_stream(work)
        assert found is not None
        stream = convert_stream(work, with_tied_embeddings(work, found)[0])
        readers = {r: copy.deepcopy(work.get_submodule(r)) for s in stream.sites for r in s.readers}
        eye = torch.eye(stream.width, dtype=torch.float64)
        for site in stream.sites:
            refit_site(work, original, readers, site, eye, calib, args.ridge, True)
        seconds = time.perf_counter() - t
        after = fidelity(work, tok, pairs, gold, genres, ref)
        row = {"target": target, "method": args.method, "macs_ratio": report.macs_ratio,
               "before": before, "after": after, "refit_seconds": seconds}  # fmt: skip
        runs.append(row)
        print(
            f"{target:9s} {args.method}: Spearman {before['spearman']:.2f} -> "
            f"{after['spearman']:.2f}, cosine {before['cosine_mean']:.4f} -> "
            f"{after['cosine_mean']:.4f} (forums {before['cosine_by_genre']['main-forums']:.3f}"
            f" -> {after['cosine_by_genre']['main-forums']:.3f}), refit {seconds:.1f} s",
            flush=True,
        )
    out = {"benchmark": "minilm-stream-refit", "settings": vars(args), "runs": runs}
    tmp = Path(args.out).with_suffix(".json.tmp")
    tmp.write_text(json.dumps(out, indent=2))
    tmp.replace(args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
