"""A small GPT-2-style decoder trained on WikiText-2 ``valid``, compressed without fine-tuning,
perplexity on WikiText-2 ``test``.

No pretrained causal LM is available offline here, so this trains one: a word-level
vocabulary (words seen at least twice in ``valid``, the rest ``<unk>``), a
``transformers.GPT2LMHeadModel`` (``--layers`` × ``--width``, ``--heads`` heads, tied
embeddings), AdamW with a cosine schedule, seeded; the weights are cached under
``benchmarks/.cache/`` keyed by the settings and the data's sha256, so later runs only load
them.  Then, per route and target, ``spectrim.compress`` with ``--calib`` sequences of
``--seq`` tokens from ``valid`` (the training text; SliceGPT calibrates on its training set
too), and the test perplexity over non-overlapping windows of ``--seq`` tokens.

Routes (``--targets``, comma-separated): ``width=F`` (FFN neurons), ``heads=F``
(attention heads), ``hidden=F`` (the residual width: every block matrix has one side on
the stream, so ``hidden=F`` removes ``1 − F`` of the blocks' parameters; ``spectral`` is
SliceGPT's PCA rotation), ``A;B`` (both, in order), ``macs=F+heads`` / ``params=F+heads``
(the allocator trades heads against FFN neurons on one budget; ``+heads+hidden``: the hidden
size too), ``experts=F`` (the neurons of every expert of a MoE model).  ``--arch llama
--kv-heads K`` trains a LLaMA-style model (RMSNorm, rotary, SwiGLU, grouped-query
attention) instead, ``--arch mixtral`` the same with a mixture of experts in each block;
``--query-heads`` chooses how grouped-query heads go.
Reported: perplexity, its increase
relative to dense, the share of the parameters removed from the transformer blocks
(embeddings excluded) and from the whole model (``hidden`` unties the LM head from the
embedding, so with this model's large vocabulary the whole model can grow), MACs,
compression seconds.

    SPECTRIM_DATA=../shared/data .venv/bin/python benchmarks/gpt_wikitext.py \\
        --out benchmarks/results/gpt_wikitext.json
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import time
from collections import Counter
from pathlib import Path
from typing import Any

import torch

import spectrim

# the few-second run of the test suite (tests/benchmarks/test_smoke.py; spectrim bench --smoke)
SMOKE = ["--arch", "llama", "--kv-heads", "2", "--layers", "1", "--width", "32", "--heads", "4", "--seq", "32", "--epochs", "1", "--train-limit", "64", "--test-limit", "32", "--calib", "16", "--methods", "id", "--targets", "width=0.5,heads=0.5", "--query-heads", "both"]  # fmt: skip


CACHE = Path(__file__).parent / ".cache"


def read_tokens(path: Path) -> list[str]:
    lines = path.read_text(encoding="utf-8").splitlines()
    return [w for line in lines for w in [*line.split(), "<eos>"]]


def build_model(vocab: int, args: argparse.Namespace) -> Any:
    import transformers

    torch.manual_seed(args.seed)
    if args.arch == "llama":  # RMSNorm, rotary positions, SwiGLU, grouped-query attention
        llama = transformers.LlamaConfig(
            vocab_size=vocab, hidden_size=args.width, intermediate_size=4 * args.width,
            num_hidden_layers=args.layers, num_attention_heads=args.heads,
            num_key_value_heads=args.kv_heads or args.heads, max_position_embeddings=args.seq,
            tie_word_embeddings=True, bos_token_id=None, eos_token_id=None,
            pad_token_id=None,
        )  # fmt: skip
        return transformers.LlamaForCausalLM(llama)
    if args.arch == "mixtral":  # the same with a mixture of experts in place of each FFN
        moe = transformers.MixtralConfig(
            vocab_size=vocab, hidden_size=args.width, intermediate_size=2 * args.width,
            num_hidden_layers=args.layers, num_attention_heads=args.heads,
            num_key_value_heads=args.kv_heads or args.heads, max_position_embeddings=args.seq,
            num_local_experts=args.experts, num_experts_per_tok=2, output_router_logits=True,
            router_aux_loss_coef=0.01, tie_word_embeddings=True, bos_token_id=None,
            eos_token_id=None, pad_token_id=None,
        )  # fmt: skip
        return transformers.MixtralForCausalLM(moe)
    cfg = transformers.GPT2Config(
        vocab_size=vocab, n_positions=args.seq, n_embd=args.width, n_layer=args.layers,
        n_head=args.heads, n_inner=4 * args.width, resid_pdrop=0.1, embd_pdrop=0.1,
        attn_pdrop=0.1, bos_token_id=None, eos_token_id=None, loss_type="ForCausalLM",
    )  # fmt: skip
    return transformers.GPT2LMHeadModel(cfg)


def windows(ids: torch.Tensor, seq: int) -> torch.Tensor:
    n = (len(ids) // seq) * seq
    return ids[:n].reshape(-1, seq)


def perplexity(model: Any, test: torch.Tensor, batch: int = 32) -> float:
    model.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for i in range(0, len(test), batch):
            x = test[i : i + batch]
            logits = model(input_ids=x).logits[:, :-1]
            loss = torch.nn.functional.cross_entropy(
                logits.reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1), reduction="sum"
            )
            total += float(loss)
            count += x[:, 1:].numel()
    return math.exp(total / count)


def train(model: Any, data: torch.Tensor, args: argparse.Namespace) -> None:
    g = torch.Generator().manual_seed(args.seed)
    steps = args.epochs * math.ceil(len(data) / args.train_batch)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.1)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=args.lr, total_steps=steps)
    model.train()
    step = 0
    for epoch in range(args.epochs):
        order = torch.randperm(len(data), generator=g)
        for i in range(0, len(data), args.train_batch):
            x = data[order[i : i + args.train_batch]]
            loss = model(input_ids=x, labels=x).loss
            opt.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
            step += 1
        print(f"epoch {epoch + 1}/{args.epochs}: loss {float(loss):.3f}", flush=True)
    model.eval()


def block_params(model: Any) -> int:
    blocks = model.model.layers if hasattr(model, "model") else model.transformer.h
    return sum(p.numel() for p in blocks.parameters())


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--width", type=int, default=128)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument(
        "--arch",
        choices=["gpt2", "llama", "mixtral"],
        help="gpt2 (default), llama (RMSNorm, rotary, SwiGLU; with --kv-heads, GQA) or "
        "mixtral (the same with --experts SwiGLU experts of 2·width neurons, 2 per token, "
        "the router's load-balancing loss in training)",
    )
    ap.add_argument("--experts", type=int, default=4, help="mixtral: experts per layer")
    ap.add_argument("--kv-heads", type=int, help="llama: key/value heads (default: --heads)")
    ap.add_argument(
        "--query-heads",
        choices=["off", "on", "both"],
        default="off",
        help="heads targets: remove whole KV groups (off), query heads inside the groups "
        "(on, CompressConfig.query_heads), or run each heads target both ways",
    )
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--epochs", type=int, default=6)
    ap.add_argument("--train-batch", type=int, default=32)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--calib", type=int, default=128, help="calibration sequences from valid")
    ap.add_argument(
        "--targets",
        default="width=0.7,width=0.5,heads=0.75,heads=0.5,width=0.7;heads=0.75,width=0.5;heads=0.5",
    )
    ap.add_argument("--methods", default="id,spectral,l1,random")
    ap.add_argument("--train-limit", type=int, help="train on the first N sequences of valid")
    ap.add_argument("--test-limit", type=int, help="perplexity on the first N test sequences")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "gpt_wikitext.json"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    root = (
        Path(
            os.environ.get("SPECTRIM_DATA", Path(__file__).resolve().parents[2] / "shared" / "data")
        )
        / "wikitext-2"
    )
    valid, test = read_tokens(root / "valid.txt"), read_tokens(root / "test.txt")
    counts = Counter(valid)
    words = ["<unk>", *sorted(w for w, c in counts.items() if c >= 2 and w != "<unk>")]
    index = {w: i for i, w in enumerate(words)}
    encode = lambda ts: torch.tensor([index.get(w, 0) for w in ts])  # noqa: E731
    train_ids, test_ids = windows(encode(valid), args.seq), windows(encode(test), args.seq)
    train_ids, test_ids = train_ids[: args.train_limit], test_ids[: args.test_limit]
    model = build_model(len(words), args)
    digest = hashlib.sha256(
        json.dumps({k: v for k, v in vars(args).items() if k in (
            "layers", "width", "heads", "seq", "epochs", "train_batch", "lr", "seed",
            "train_limit", "arch", "kv_heads")
            and v is not None} | ({"experts": args.experts} if args.arch == "mixtral" else {}),
            sort_keys=True).encode()
        + (root / "valid.txt").read_bytes()
    ).hexdigest()[:16]  # fmt: skip
    cached = CACHE / f"gpt_wikitext_{digest}.safetensors"
    t = time.perf_counter()
    if cached.is_file():
        from safetensors.torch import load_file

        model.load_state_dict(load_file(cached), strict=False)
        model.tie_weights()
        train_seconds = None
    else:
        train(model, train_ids, args)
        train_seconds = time.perf_counter() - t
        from safetensors.torch import save_file

        CACHE.mkdir(exist_ok=True)
        state = {k: v.contiguous() for k, v in model.state_dict().items() if k != "lm_head.weight"}
        tmp = cached.with_suffix(".tmp")
        save_file(state, str(tmp))
        tmp.replace(cached)
    model.eval()
    dense = perplexity(model, test_ids)
    calib = [train_ids[i : i + 16] for i in range(0, min(args.calib, len(train_ids)), 16)]
    t = time.perf_counter()
    with torch.no_grad():
        for b in calib:
            model(input_ids=b)
    forward_seconds = time.perf_counter() - t
    p_all, p_blocks = sum(p.numel() for p in model.parameters()), block_params(model)
    print(
        f"dense: vocabulary {len(words)}, {p_all:,} parameters ({p_blocks:,} in the blocks), "
        f"test perplexity {dense:.2f}; one forward pass over the calibration set "
        f"{forward_seconds:.2f} s",
        flush=True,
    )
    runs = []
    modes = {"off": [False], "on": [True], "both": [False, True]}[args.query_heads]
    for target, method, query in [
        (t, m, q)
        for t in args.targets.split(",")
        for m in args.methods.split(",")
        for q in (modes if "heads" in t else [False])
    ]:
        first, _, second = target.partition(";")
        first, *joint = first.split("+")
        extra: dict[str, bool] = {"query_heads": True} if query else {}
        extra.update({name: True for name in joint})  # heads / hidden on the budget
        then = {"method": method, "target": second, **extra} if second else None
        t = time.perf_counter()
        small, report = spectrim.compress(model, calib, method, first, then=then, **extra)
        seconds = time.perf_counter() - t
        ppl = perplexity(small, test_ids)
        row = {
            "target": target,
            "method": method,
            "query_heads": query,
            "perplexity": ppl,
            "relative_increase": ppl / dense - 1.0,
            "blocks_removed": 1.0 - block_params(small) / p_blocks,
            "params_removed": 1.0 - sum(p.numel() for p in small.parameters()) / p_all,
            "macs_ratio": report.macs_ratio,
            "seconds": seconds,
            "seconds_per_forward_pass": seconds / forward_seconds,
            # what the allocation chose for the units that are no channel group
            "widths": {g.name: g.width_after for g in report.groups if g.name.endswith(")")},
        }
        runs.append(row)
        print(
            f"{target:22s} {method:9s}{' query' if query else ''} perplexity {ppl:8.2f} (+{100 * row['relative_increase']:.1f}%) "
            f"blocks -{100 * row['blocks_removed']:.1f}% params -{100 * row['params_removed']:.1f}% "
            f"MACs {report.macs_ratio:.3f} {seconds:.1f} s",
            flush=True,
        )
    out = {
        "benchmark": "gpt-wikitext",
        "settings": vars(args),
        "vocabulary": len(words),
        "params": p_all,
        "block_params": p_blocks,
        "dense_perplexity": dense,
        "train_seconds": train_seconds,
        "forward_seconds": forward_seconds,
        "calibration_sequences": sum(len(b) for b in calib),
        "runs": runs,
    }
    tmp = Path(args.out).with_suffix(".json.tmp")
    tmp.write_text(json.dumps(out, indent=2))
    tmp.replace(args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
