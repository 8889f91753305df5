"""``target="heads=F"``: attention heads removed through ``spectrim.compress``.

Tiny random-weight Hugging Face models for the mechanics (every layer, every method,
grouped-query attention, the user's model untouched, the correction never worse than plain
removal on the calibration data) and the real all-MiniLM-L6-v2 for the property that
matters: the corrected heads keep the embeddings closer to the original's than the
baselines do.
"""

from __future__ import annotations

import copy
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

import spectrim
from spectrim.graph.attention import find_attention

transformers = pytest.importorskip("transformers")


def _bert(layers: int = 2) -> nn.Module:
    torch.manual_seed(0)
    cfg = transformers.BertConfig(
        vocab_size=80, hidden_size=48, num_hidden_layers=layers, num_attention_heads=6,
        intermediate_size=64,
    )  # fmt: skip
    return transformers.BertModel(cfg).eval()


def _batches(n: int = 4, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(3, 80, (8, 12), generator=g)
        mask = torch.ones_like(ids)
        mask[:, 9:] = (torch.rand(8, 3, generator=g) > 0.5).long()
        mask[:, 9:] = mask[:, 9:].cummin(dim=1).values
        out.append({"input_ids": ids, "attention_mask": mask})
    return out


@pytest.mark.parametrize("method", ["id", "spectral", "l1", "l2", "random"])
def test_half_the_heads_of_every_layer(method: str) -> None:
    model = _bert()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    small, report = spectrim.compress(model, _batches(), method, "heads=0.5")
    assert [b.heads for b in find_attention(small)] == [3, 3]
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())  # untouched
    assert [g.width_after for g in report.groups] == [3, 3]
    assert report.params_ratio < 1.0 and report.macs_ratio < 1.0
    with torch.no_grad():
        out = small(**_batches(1, seed=5)[0]).last_hidden_state
    assert torch.isfinite(out).all()
    assert spectrim.CompressionReport.from_dict(report.to_dict()).target == "heads=0.5"


def test_keeping_every_head_changes_nothing() -> None:
    model = _bert()
    small, _ = spectrim.compress(model, _batches(), "id", "heads=1.0")
    batch = _batches(1, seed=3)[0]
    with torch.no_grad():
        torch.testing.assert_close(
            small(**batch).last_hidden_state, model(**batch).last_hidden_state
        )


def _attention_output(model: nn.Module, batches: list[dict[str, torch.Tensor]]) -> torch.Tensor:
    """The first layer's output projection output on the real tokens."""
    got: list[torch.Tensor] = []
    mod = model.encoder.layer[0].attention.output.dense
    h = mod.register_forward_hook(lambda m, a, o: got.append(o.detach()))
    with torch.no_grad():
        for b in batches:
            model(**b)
    h.remove()
    return torch.cat([o[b["attention_mask"].bool()] for o, b in zip(got, batches, strict=True)])


def test_correction_is_never_worse_than_plain_removal_on_the_calibration_data() -> None:
    """Least squares on the per-head outputs is optimal for every output weighting, so the
    first layer's output projection, with the fold, is at least as close to the original
    as the same heads removed without it."""
    model, batches = _bert(), _batches()
    small, _ = spectrim.compress(model, batches, "id", "heads=0.5", sequential=False)
    kept = find_attention(small)[0]
    plain = copy.deepcopy(model)
    block = find_attention(plain)[0]
    # the same heads as id chose, without the correction
    keep = [h for h in range(6) if _same_head(model, small, h)]
    assert len(keep) == kept.heads
    block.prune(plain, keep, None)
    ref = _attention_output(model, batches)
    err_fold = float((_attention_output(small, batches) - ref).norm())
    err_plain = float((_attention_output(plain, batches) - ref).norm())
    assert err_fold < 0.9 * err_plain


def _same_head(model: nn.Module, small: nn.Module, h: int) -> bool:
    """Whether head ``h``'s query rows of layer 0 survive in ``small``."""
    q = model.encoder.layer[0].attention.self.query.weight[h * 8 : (h + 1) * 8]
    q2 = small.encoder.layer[0].attention.self.query.weight
    return any(torch.equal(q, q2[i * 8 : (i + 1) * 8]) for i in range(q2.shape[0] // 8))


def test_grouped_query_attention_keeps_query_heads_with_their_kv_head() -> None:
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        vocab_size=80, hidden_size=48, num_hidden_layers=2, num_attention_heads=6,
        num_key_value_heads=3, intermediate_size=64,
    )  # fmt: skip
    model = transformers.LlamaForCausalLM(cfg).eval()
    batches = [{"input_ids": b["input_ids"]} for b in _batches()]
    small, _report = spectrim.compress(model, batches, "id", "heads=0.34")
    blocks = find_attention(small)
    assert [(b.heads, b.kv_heads) for b in blocks] == [(2, 1), (2, 1)]
    attn = small.model.layers[0].self_attn
    assert attn.q_proj.out_features == 16 and attn.k_proj.out_features == 8
    out = small.generate(batches[0]["input_ids"][:1, :5], max_new_tokens=3, do_sample=False)
    assert out.shape == (1, 8)


def _multi_query(family: str) -> nn.Module:
    """A tiny causal LM with one KV head for its 6 query heads; query heads 4 and 5 copy
    heads 1 and 2 (their outputs are the same), so 4 heads hold everything the 6 do."""
    torch.manual_seed(0)
    d = 8
    if family == "llama":
        cfg: Any = transformers.LlamaConfig(
            vocab_size=80, hidden_size=48, num_hidden_layers=2, num_attention_heads=6,
            num_key_value_heads=1, intermediate_size=64,
        )  # fmt: skip
        model = transformers.LlamaForCausalLM(cfg).eval()
        qs = [(layer.self_attn.q_proj.weight, None) for layer in model.model.layers]
    else:
        cfg = transformers.GPTBigCodeConfig(
            vocab_size=80, n_embd=48, n_layer=2, n_head=6, multi_query=True
        )
        model = transformers.GPTBigCodeForCausalLM(cfg).eval()
        qs = [(layer.attn.c_attn.weight, layer.attn.c_attn.bias) for layer in model.transformer.h]
    with torch.no_grad():
        for w, b in qs:
            for dst, src in ((4, 1), (5, 2)):
                for t in (w, b) if b is not None else (w,):
                    t[dst * d : (dst + 1) * d] = t[src * d : (src + 1) * d]
    return model


def _grouped(layers: int = 2) -> nn.Module:
    """A tiny LLaMA with grouped-query attention (8 query heads, 2 KV heads of 4 query
    heads each) where, in every layer, query head 3 copies head 1 and head 6 copies head
    5: each group holds one head the other three reproduce."""
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        vocab_size=80, hidden_size=64, num_hidden_layers=layers, num_attention_heads=8,
        num_key_value_heads=2, intermediate_size=64,
    )  # fmt: skip
    model = transformers.LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        for layer in model.model.layers:
            w = layer.self_attn.q_proj.weight
            for dst, src in ((3, 1), (6, 5)):
                w[dst * 8 : (dst + 1) * 8] = w[src * 8 : (src + 1) * 8]
    return model


@pytest.mark.parametrize("method", ["id", "spectral"])
def test_query_heads_are_removed_inside_the_kv_groups_exactly(method: str, tmp_path: Any) -> None:
    """``query_heads=True``: a quarter of the query heads go, one from each KV group (the
    copies, which the kept heads reproduce), every key and value stays, and the model is
    the original's; it generates and reloads with its head counts."""
    model = _grouped()
    batches = [{"input_ids": b["input_ids"]} for b in _batches()]
    options = {"theta": 0.0, "tau": "none"} if method == "spectral" else {}
    small, report = spectrim.compress(
        model, batches, method, "heads=0.75", query_heads=True, sequential=False, **options
    )
    assert [(b.heads, b.kv_heads) for b in find_attention(small)] == [(6, 2), (6, 2)]
    attn = small.model.layers[0].self_attn
    assert attn.k_proj.out_features == 16 and attn.num_key_value_groups == 3
    assert [g.width_after for g in report.groups] == [3, 3]  # query heads per group
    back = _same_logits_and_shipped(model, small, report, _grouped(), tmp_path)
    assert [(b.heads, b.kv_heads) for b in find_attention(back)] == [(6, 2), (6, 2)]
    assert back.model.layers[1].self_attn.num_key_value_groups == 3


def _same_logits_and_shipped(
    model: nn.Module, small: nn.Module, report: Any, fresh: nn.Module, tmp_path: Any
) -> nn.Module:
    """``small`` computes ``model``'s logits, its report's MACs are the profiler's, it
    generates, and it reloads onto ``fresh`` with the same logits; the reloaded model."""
    from spectrim.evaluation import profile
    from spectrim.io.manifest import load_compressed, save_compressed

    test = {"input_ids": _batches(1, seed=5)[0]["input_ids"]}
    with torch.no_grad():
        want, got = model(**test).logits, small(**test).logits
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    assert report.macs_ratio == pytest.approx(
        profile(small, test).macs / profile(model, test).macs, rel=1e-6
    )
    out = small.generate(test["input_ids"][:1, :5], max_new_tokens=3, do_sample=False)
    assert out.shape == (1, 8)
    save_compressed(small, tmp_path / "m", report)
    back = load_compressed(tmp_path / "m", fresh)
    with torch.no_grad():
        torch.testing.assert_close(back(**test).logits, got)
    return back


def test_without_query_heads_grouped_attention_loses_whole_groups() -> None:
    """The default on the same model: a unit is a KV group, so ``heads=0.75`` of two groups
    keeps both (round(1.5) = 2), and ``heads=0.5`` loses one with its four query heads."""
    model = _grouped()
    batches = [{"input_ids": b["input_ids"]} for b in _batches()]
    small, _ = spectrim.compress(model, batches, "id", "heads=0.5", sequential=False)
    assert [(b.heads, b.kv_heads) for b in find_attention(small)] == [(4, 1), (4, 1)]


def test_query_heads_inside_groups_are_the_ones_a_block_ranking_chooses() -> None:
    """The slots follow the ranking: group ``i``'s heads in the order the single-head
    ranking lists them; a unit holds one head of every group, in head order."""
    from spectrim.graph.attention import AttentionBlock, Projection

    block = AttentionBlock(
        "a", [Projection("q", "q"), Projection("k", "k"), Projection("v", "v")], "o",
        heads=6, kv_heads=2, head_dim=2,
    )  # fmt: skip
    assert block.units == 2 and not block.per_query
    block.set_slots([4, 1, 3, 0, 5, 2])
    assert block.per_query and block.units == 3 and block.unit_heads == 2
    assert block.slots is not None and block.slots.tolist() == [[1, 0, 2], [1, 0, 2]]
    assert block.query_heads([0]).tolist() == [1, 4]
    assert block.query_heads([0, 1]).tolist() == [0, 1, 3, 4]
    assert block.columns([0]).tolist() == [2, 3, 8, 9]
    assert block.rows("k", [0]).tolist() == [0, 1, 2, 3]  # every KV head stays
    assert block.role_rows("q") == 4 and block.role_rows("v") == 0
    with pytest.raises(ValueError, match="each of 6 heads once"):
        block.set_slots([0, 1, 2])


@pytest.mark.parametrize("method", ["l1", "random"])
def test_query_heads_inside_groups_with_a_method_without_statistics(method: str) -> None:
    model = _grouped()
    batches = [{"input_ids": b["input_ids"]} for b in _batches()]
    small, _ = spectrim.compress(model, batches, method, "heads=0.5", query_heads=True)
    assert [(b.heads, b.kv_heads) for b in find_attention(small)] == [(4, 2), (4, 2)]
    with torch.no_grad():
        assert torch.isfinite(small(**batches[0]).logits).all()


def test_query_heads_and_channels_on_one_macs_budget() -> None:
    """``heads=True`` with ``query_heads``: the allocator's units are query heads per group,
    and the profiler confirms the modelled MACs."""
    model = _grouped()
    batches = [{"input_ids": b["input_ids"]} for b in _batches()]
    small, report = spectrim.compress(
        model, batches, "id", "macs=0.7", heads=True, query_heads=True
    )
    assert report.macs_ratio <= 0.7 + 0.01
    blocks = find_attention(small)
    assert all(b.kv_heads == 2 for b in blocks)
    heads = [g for g in report.groups if g.name.endswith("(heads)")]
    assert [g.width_after for g in heads] == [b.group_size for b in blocks]
    with torch.no_grad():
        assert torch.isfinite(small(**batches[0]).logits).all()


@pytest.mark.parametrize("family", ["llama", "gpt_bigcode"])
def test_multi_query_attention_loses_query_heads_exactly(family: str, tmp_path: Any) -> None:
    """One KV head (Falcon-, Gemma-2B-, StarCoder-style multi-query attention): the units
    are the query heads, not the one KV group (which could only be kept whole).  With two
    heads duplicated, keeping 4 of 6 loses nothing; the model generates, the modelled
    costs are the profiler's, and it saves and reloads with its head counts."""
    model = _multi_query(family)
    batches = [{"input_ids": b["input_ids"]} for b in _batches()]
    small, report = spectrim.compress(model, batches, "id", "heads=0.67", sequential=False)
    assert [(b.heads, b.kv_heads) for b in find_attention(small)] == [(4, 1), (4, 1)]
    back = _same_logits_and_shipped(model, small, report, _multi_query(family), tmp_path)
    assert [b.heads for b in find_attention(back)] == [4, 4]


def test_a_model_without_attention_is_named() -> None:
    net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    with pytest.raises(ValueError, match="no attention layer in Sequential"):
        spectrim.compress(net, torch.randn(32, 4), "id", "heads=0.5")


def test_a_weight_method_cannot_select_heads() -> None:
    with pytest.raises(ValueError, match="weight method"):
        spectrim.compress(_bert(), _batches(), "obs", "heads=0.5")


def _embed(model: nn.Module, tok: Any, sentences: list[str]) -> torch.Tensor:
    enc = tok(sentences, padding=True, return_tensors="pt")
    with torch.no_grad():
        h = model(**enc).last_hidden_state
    m = enc["attention_mask"].unsqueeze(-1).to(h.dtype)
    return torch.nn.functional.normalize((h * m).sum(1) / m.sum(1), dim=-1)


def sts_split(
    tok: Any, train: list[str], test: list[str]
) -> tuple[list[dict[str, torch.Tensor]], list[str]]:
    """128 seeded sts-train sentences in 4 padded batches, and 96 held-out test sentences."""
    rng = np.random.default_rng(0)
    pool = [train[i] for i in rng.permutation(len(train))[:128]]
    calib = [
        dict(tok(pool[i : i + 32], padding=True, return_tensors="pt")) for i in range(0, 128, 32)
    ]
    return calib, test[::20][:96]


def test_minilm_corrected_heads_stay_closest_to_the_original(
    minilm: tuple[nn.Module, Any], sts_train_sentences: list[str], sts_sentences: list[str]
) -> None:
    model, tok = minilm
    calib, held_out = sts_split(tok, sts_train_sentences, sts_sentences)
    ref = _embed(model, tok, held_out)
    cos = {}
    for method in ("id", "l1", "random"):
        small, _ = spectrim.compress(model, calib, method, "heads=0.5", sequential=False)
        assert [b.heads for b in find_attention(small)] == [6] * 6
        cos[method] = float((_embed(small, tok, held_out) * ref).sum(-1).mean())
    assert cos["id"] > cos["l1"] + 0.05 and cos["id"] > cos["random"] + 0.05, cos


@pytest.mark.parametrize("family", ["bert", "gpt2"])
def test_saved_and_reloaded_with_the_pruned_head_counts(family: str, tmp_path: Any) -> None:
    from spectrim.io.manifest import load_compressed, save_compressed

    if family == "bert":
        make: Any = _bert
        batches = _batches()
    else:

        def make() -> nn.Module:
            torch.manual_seed(0)
            cfg = transformers.GPT2Config(vocab_size=80, n_embd=48, n_layer=2, n_head=6)
            return transformers.GPT2LMHeadModel(cfg).eval()

        batches = [{"input_ids": b["input_ids"]} for b in _batches()]
    small, report = spectrim.compress(make(), batches, "id", "heads=0.5")
    save_compressed(small, tmp_path / "m", report)
    back = load_compressed(tmp_path / "m", make())
    assert [b.heads for b in find_attention(back)] == [3, 3]
    with torch.no_grad():
        want, got = small(**batches[0])[0], back(**batches[0])[0]
    torch.testing.assert_close(got, want)
    if family == "gpt2":
        assert back.transformer.h[0].attn.split_size == 24


def test_heads_and_channels_on_one_macs_budget() -> None:
    """``heads=True`` under ``macs=F``: the allocator trades heads against FFN neurons, the
    profiler confirms the target, and the head counts agree with the report."""
    model = _bert(layers=2)
    small, report = spectrim.compress(model, _batches(), "id", "macs=0.6", heads=True)
    assert report.macs_ratio <= 0.6 + 0.01
    head_groups = [g for g in report.groups if g.name.endswith("(heads)")]
    assert [g.width_after for g in head_groups] == [b.heads for b in find_attention(small)]
    assert any(g.width_after < g.width_before for g in head_groups)
    ffn = [g for g in report.groups if "intermediate" in g.name]
    assert ffn and any(g.width_after < g.width_before for g in ffn)
    with torch.no_grad():
        assert torch.isfinite(small(**_batches(1, seed=4)[0]).last_hidden_state).all()


@pytest.mark.parametrize(
    "family",
    ["bert", "llama-mqa", "gpt_bigcode-mqa", "llama-gqa-query", "t5", "mpnet", "bloom", "codegen"],
)
def test_the_cost_model_counts_what_a_head_costs(family: str) -> None:
    """Removing one head of one layer: the modelled MACs and parameters equal the
    profiler's on the pruned model (under multi-query attention: a query head's rows and
    columns, the shared key and value kept)."""
    from spectrim._prune import HEAD_KEY, head_axes
    from spectrim.budget import CostModel
    from spectrim.evaluation import profile
    from spectrim.graph import analyze_channels

    batch = _batches(1)[0]
    if family == "bert":
        model = _bert(layers=1)
        example = {k: v[:2] for k, v in batch.items()}
    elif family == "llama-gqa-query":
        model, example = _grouped(layers=1), {"input_ids": batch["input_ids"][:2]}
    elif family == "codegen":  # a unit is one head of each of the 4 parts of qkv_proj
        torch.manual_seed(0)
        cfg = transformers.CodeGenConfig(vocab_size=80, n_embd=64, n_layer=1, n_head=8,
                                         rotary_dim=4)  # fmt: skip
        model = transformers.CodeGenForCausalLM(cfg).eval()
        example = {"input_ids": batch["input_ids"][:2]}
    elif family == "bloom":  # ALiBi slopes for all heads
        torch.manual_seed(0)
        cfg = transformers.BloomConfig(vocab_size=80, hidden_size=48, n_layer=1, n_head=6)
        model, example = (
            transformers.BloomForCausalLM(cfg).eval(),
            {"input_ids": batch["input_ids"][:2]},
        )
    elif family in ("t5", "mpnet"):  # a shared position bias (the first layer's, T5)
        t = transformers
        torch.manual_seed(0)
        model = (
            t.T5EncoderModel(t.T5Config(vocab_size=80, d_model=48, d_kv=8, num_heads=6,
                                        d_ff=64, num_layers=1))
            if family == "t5"
            else t.MPNetModel(t.MPNetConfig(vocab_size=80, hidden_size=48, num_hidden_layers=1,
                                            num_attention_heads=6, intermediate_size=64))
        ).eval()  # fmt: skip
        example = {"input_ids": batch["input_ids"][:2]}
    else:
        full = _multi_query(family.removesuffix("-mqa"))
        layers = full.model.layers if hasattr(full, "model") else full.transformer.h
        del layers[1:]
        model, example = full, {"input_ids": batch["input_ids"][:2]}
    cost0 = profile(model, example)
    cm = CostModel(model, analyze_channels(model, example), cost0.per_module,
                   other_macs=cost0.macs - sum(cost0.per_module.values()))  # fmt: skip
    (block,) = find_attention(model)
    pruned = copy.deepcopy(model)
    (target,) = find_attention(pruned)
    if family == "llama-gqa-query":  # 4 query heads per group: one goes from each
        for b in (block, target):
            b.set_slots(range(8))
    cm.add_unit_axes(HEAD_KEY, block.units, head_axes(model, block))
    keep = list(range(block.units - 1))
    target.prune(pruned, keep, None)
    cost1 = profile(pruned, example)
    assert cm.params({HEAD_KEY: len(keep)}) == pytest.approx(cost1.params)
    assert cm.macs({HEAD_KEY: len(keep)}) == pytest.approx(cost1.macs, rel=1e-6)


def test_heads_true_needs_a_budget_target() -> None:
    with pytest.raises(ValueError, match="macs= or params= budget"):
        spectrim.compress(_bert(), _batches(), "id", "width=0.5", heads=True)


def test_sentence_transformers_pipeline_runs_a_compressed_minilm(
    minilm_dir: Any, sts_train_sentences: list[str], sts_sentences: list[str]
) -> None:
    """The sentence-transformers pipeline (its tokenizer, mean pooling, normalisation) on
    the real all-MiniLM-L6-v2 with half its heads and a quarter of its FFN removed."""
    st = pytest.importorskip("sentence_transformers")
    pipeline = st.SentenceTransformer(str(minilm_dir), device="cpu")
    tok = pipeline.tokenizer
    pool = sts_train_sentences[::40][:96]
    calib = [
        dict(tok(pool[i : i + 32], padding=True, return_tensors="pt")) for i in range(0, 96, 32)
    ]
    held_out = sts_sentences[::50][:40]
    before = pipeline.encode(held_out, convert_to_tensor=True, normalize_embeddings=True)
    small, _ = spectrim.compress(
        pipeline[0].auto_model, calib, "id", "width=0.75", sequential=False,
        then={"method": "id", "target": "heads=0.5", "sequential": False},
    )  # fmt: skip
    pipeline[0].auto_model = small
    after = pipeline.encode(held_out, convert_to_tensor=True, normalize_embeddings=True)
    assert after.shape == before.shape == (40, 384)
    assert float((after * before).sum(-1).mean()) > 0.75


def test_timm_vit_heads_through_compress() -> None:
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    model = timm.models.vision_transformer.VisionTransformer(
        img_size=32, patch_size=8, embed_dim=48, depth=2, num_heads=4, num_classes=5
    ).eval()
    x = torch.randn(128, 3, 32, 32)
    small, report = spectrim.compress(model, x, "id", "heads=0.5")
    assert [b.heads for b in find_attention(small)] == [2, 2]
    assert report.macs_ratio < 0.9
    joint, r2 = spectrim.compress(model, x, "id", "macs=0.7", heads=True)
    assert r2.macs_ratio <= 0.71
    with torch.no_grad():
        assert torch.isfinite(small(x[:4])).all() and torch.isfinite(joint(x[:4])).all()


def test_spectral_shares_one_scale_with_the_heads() -> None:
    """Under ``heads=True`` every curve is the least-squares error along the solver's
    order: for ``spectral`` this is not its ridge loss (which has a floor at all but one
    channel kept), so the greedy does not cut every head to buy FFN neurons."""
    from spectrim.graph import analyze_channels
    from spectrim.linalg import order_residual_curve
    from spectrim.methods import get_method
    from spectrim.stages import solve_stage

    model, batches = _bert(), _batches()
    a = analyze_channels(model, {k: v[:2] for k, v in batches[0].items()})
    stats = spectrim.calibration.collect(model, a, batches, a.prunable).stats
    solver = next(iter(solve_stage(get_method("spectral"), a.prunable, stats, model).values()))
    curve = solver.reconstruction_curve()
    g = sum(acc.gram_numpy() for (gi, _), acc in stats.items() if gi == solver.group.index)
    np.testing.assert_allclose(curve, order_residual_curve(g, solver.selection.order))
    assert curve[-2] < solver.error_curve()[-2]  # no ridge floor


def test_minilm_heads_and_ffn_on_one_budget(
    minilm: tuple[nn.Module, Any], sts_train_sentences: list[str], sts_sentences: list[str]
) -> None:
    """The real MiniLM at half its MACs with heads and FFN neurons on one budget: the
    profiler confirms the target, both kinds of unit are cut, and ``id``'s corrected model
    stays closer to the original than random units do."""
    model, tok = minilm
    rng = np.random.default_rng(1)
    pool = [sts_train_sentences[i] for i in rng.permutation(len(sts_train_sentences))[:128]]
    calib = [
        dict(tok(pool[i : i + 32], padding=True, return_tensors="pt")) for i in range(0, 128, 32)
    ]
    held_out = sts_sentences[::20][:96]
    ref = _embed(model, tok, held_out)
    cos = {}
    for method in ("id", "random"):
        small, report = spectrim.compress(
            model, calib, method, "macs=0.5", heads=True, sequential=False
        )
        assert report.macs_ratio <= 0.505
        cut = [g for g in report.groups if g.width_after < g.width_before]
        assert any(g.name.endswith("(heads)") for g in cut) or method == "random"
        assert any("intermediate" in g.name for g in cut)
        cos[method] = float((_embed(small, tok, held_out) * ref).sum(-1).mean())
    assert cos["id"] > cos["random"] + 0.1, cos


def test_torchvision_vit_heads_through_compress_save_and_reload(tmp_path: Any) -> None:
    torchvision = pytest.importorskip("torchvision")
    from spectrim.io.manifest import load_compressed, save_compressed

    def make() -> nn.Module:
        torch.manual_seed(0)
        m = torchvision.models.VisionTransformer(
            image_size=32, patch_size=8, num_layers=2, num_heads=4, hidden_dim=32, mlp_dim=48,
            num_classes=5,
        )  # fmt: skip
        torch.nn.init.normal_(m.heads.head.weight)
        return m.eval()

    model = make()
    x = torch.randn(128, 3, 32, 32)
    with torch.no_grad():
        ref = model(x)
    err = {}
    for method in ("id", "l1"):
        small, report = spectrim.compress(model, x, method, "heads=0.5")
        assert [b.heads for b in find_attention(small)] == [2, 2]
        assert isinstance(model.encoder.layers[0].self_attention, nn.MultiheadAttention)
        with torch.no_grad():
            err[method] = float((small(x) - ref).norm() / ref.norm())
    assert err["id"] < err["l1"], err
    save_compressed(small, tmp_path / "vit", report)
    back = load_compressed(tmp_path / "vit", base_model=make())
    with torch.no_grad():
        torch.testing.assert_close(back(x[:8]), small(x[:8]), rtol=0, atol=0)
    joint, r2 = spectrim.compress(model, x, "id", "macs=0.7", heads=True)
    assert r2.macs_ratio <= 0.71 and any(b.heads < 4 for b in find_attention(joint))


def test_layers_whose_units_are_too_coarse_for_the_target_are_named() -> None:
    """Two KV groups cannot lose a quarter of their heads: the model keeps them all, and
    the report says so and names the option that would remove single query heads (it
    used to return the model unchanged without a word)."""
    batches = [{"input_ids": b["input_ids"]} for b in _batches()]
    small, report = spectrim.compress(_grouped(), batches, "id", "heads=0.75")
    assert [b.heads for b in find_attention(small)] == [8, 8]
    (warning,) = [w for w in report.warnings if "keep every head" in w]
    assert "2 of 2 attention layers" in warning and "query_heads=True" in warning
    _, report = spectrim.compress(_grouped(), batches, "id", "heads=0.75", query_heads=True)
    assert not [w for w in report.warnings if "keep every head" in w]
