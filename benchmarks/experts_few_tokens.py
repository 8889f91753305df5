"""Experts the router sends fewer calibration tokens than they have neurons: the top-up.

``target="experts=F"`` folds each expert's removed neurons into its kept ones by least
squares on the tokens the router sent it.  With fewer tokens than neurons that fit is
underdetermined: any ``n`` neurons reproduce the others on those ``n`` rows.  Since stop
50 such an expert's Gram is topped up to as many rows as neurons by its activations on a
sample of the layer's tokens (``spectrim._experts.top_up``, docs/design.md §7c′).  This
measures what the top-up changes, by running each compression twice: as the library does,
and with ``top_up`` replaced by a no-op in this script.

Tiny random-weight Hugging Face MoE decoders with many experts (``--families``: PhiMoE and
Mixtral with 16 experts of 48 neurons, 2 per token), ``id`` at ``experts=0.5``, calibrated
on ``--batches`` batches of 8 × 12 random tokens (a quarter of the rows padded), one-shot
(``sequential=False``, so both runs see the same routing).  Per run: the fewest and the
median tokens an expert got in the first layer, and the relative error of the logits

* on 8 other batches (``held_out_error``): how well the folds carry to new tokens;
* with the second half of every expert's neurons made copies of the first
  (``copies_error``): exact removal gives float rounding.

    SPECTRIM_DATA=../shared/data .venv/bin/python benchmarks/experts_few_tokens.py \\
        --out benchmarks/results/experts_few_tokens.json                     # ~1 min
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

import spectrim
import spectrim._experts as experts_run
from _results import save_result
from held_out import relative, repeat_half_the_neurons
from spectrim.graph.experts import find_experts

# the few-second run of the test suite (tests/test_bench.py; spectrim bench --smoke)
SMOKE = ["--families", "phimoe", "--batches", "2"]

VOCAB = 100


def make(family: str) -> nn.Module:
    """A seeded tiny MoE decoder of ``family`` with 16 experts of 48 neurons, 2 per token."""
    import transformers as t

    torch.manual_seed(0)
    small = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, num_local_experts=16,
                 num_experts_per_tok=2)  # fmt: skip
    return t.AutoModelForCausalLM.from_config(t.AutoConfig.for_model(family, **small)).eval()


def batches(n: int, seed: int) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(3, VOCAB, (8, 12), generator=g)
        mask = torch.ones_like(ids)
        mask[:2, 8:] = 0
        out.append({"input_ids": ids, "attention_mask": mask})
    return out


def logits(model: nn.Module, data: list[dict[str, torch.Tensor]]) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat([model(**b).logits[b["attention_mask"].bool()] for b in data])


def tokens_per_expert(model: nn.Module, calib: list[Any]) -> list[int]:
    first = find_experts(model)[0]
    accs = experts_run.expert_grams(model, [first], calib, stop=True)
    return [a.count for a in accs[first.name]]


def run(family: str, n: int, top_up: bool, test: list[Any]) -> dict[str, Any]:
    """One family and calibration size, with the library's top-up or without it."""
    calib = batches(n, 0)
    saved: Callable[..., None] = experts_run.top_up
    if not top_up:
        experts_run.top_up = lambda *a, **k: None  # type: ignore[assignment]
    try:
        counts = tokens_per_expert(make(family), calib)
        model = make(family)
        t0 = time.perf_counter()
        small, _ = spectrim.compress(model, calib, "id", "experts=0.5", sequential=False)
        seconds = time.perf_counter() - t0
        held_out = relative(logits(small, test), logits(model, test))
        twice = make(family)
        repeat_half_the_neurons(twice)
        cut, _ = spectrim.compress(twice, calib, "id", "experts=0.5", sequential=False)
        copies = relative(logits(cut, test), logits(twice, test))
    finally:
        experts_run.top_up = saved  # type: ignore[assignment]
    return {
        "family": family,
        "batches": n,
        "top_up": top_up,
        "fewest_tokens": min(counts),
        "median_tokens": statistics.median(counts),
        "experts_below_width": sum(c < 48 for c in counts),
        "held_out_error": held_out,
        "copies_error": copies,
        "seconds": round(seconds, 2),
    }


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--families", default="phimoe,mixtral")
    ap.add_argument("--batches", default="1,2,4,8,32", help="calibration batches of 8 × 12")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument(
        "--out", default=str(Path(__file__).parent / "results" / "experts_few_tokens.json")
    )
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    test = batches(8, 1)
    rows = []
    for family in args.families.split(","):
        for n in (int(x) for x in args.batches.split(",")):
            for on in (False, True):
                row = run(family, n, on, test)
                print(
                    f"{family} {n} batches, top-up {'on ' if on else 'off'}: tokens min "
                    f"{row['fewest_tokens']} median {row['median_tokens']}, held-out "
                    f"{row['held_out_error']:.4f}, copies {row['copies_error']:.2e}"
                )
                rows.append(row)
    save_result(args.out, {"benchmark": "experts-few-tokens", "settings": vars(args),
                           "rows": rows}, args.threads)  # fmt: skip


if __name__ == "__main__":
    main()
