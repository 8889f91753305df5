"""Attention heads: found in each Hugging Face family, removed exactly.

Removing heads with no correction must give exactly the model whose output projection
ignores those heads (their columns zeroed): heads are independent until the output
projection.  Checked on tiny random-weight configs of every family the finders cover.
"""

from __future__ import annotations

import copy
from typing import Any

import numpy as np
import pytest
import torch

from spectrim.graph.attention import find_attention
from spectrim.graph.modules import module_kind

transformers = pytest.importorskip("transformers")


def _tiny(family: str) -> tuple[torch.nn.Module, dict[str, torch.Tensor]]:
    torch.manual_seed(0)
    common = dict(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4)
    if family == "bert":
        model = transformers.BertModel(transformers.BertConfig(intermediate_size=48, **common))
    elif family == "roberta":
        model = transformers.RobertaModel(
            transformers.RobertaConfig(intermediate_size=48, pad_token_id=1, **common)
        )
    elif family == "distilbert":
        model = transformers.DistilBertModel(
            transformers.DistilBertConfig(
                vocab_size=64, dim=32, n_layers=2, n_heads=4, hidden_dim=48
            )
        )
    elif family == "gpt2":
        model = transformers.GPT2LMHeadModel(
            transformers.GPT2Config(vocab_size=64, n_embd=32, n_layer=2, n_head=4, n_positions=32)
        )
    elif family == "llama":
        model = transformers.LlamaForCausalLM(
            transformers.LlamaConfig(intermediate_size=48, num_key_value_heads=2, **common)
        )
    elif family == "llama-mqa":  # one KV head: the units are the query heads
        model = transformers.LlamaForCausalLM(
            transformers.LlamaConfig(intermediate_size=48, num_key_value_heads=1, **common)
        )
    elif family in ("bigcode", "bigcode-mqa"):  # interleaved heads / one KV head
        model = transformers.GPTBigCodeForCausalLM(
            transformers.GPTBigCodeConfig(
                vocab_size=64, n_embd=32, n_layer=2, n_head=4, n_positions=32,
                multi_query=family == "bigcode-mqa",
            )
        )  # fmt: skip
    elif family == "opt":
        model = transformers.OPTForCausalLM(
            transformers.OPTConfig(
                vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                ffn_dim=48, word_embed_proj_dim=32, max_position_embeddings=64,
            )
        )  # fmt: skip
    else:  # pragma: no cover
        raise ValueError(family)
    ids = torch.randint(3, 64, (2, 7))
    mask = torch.ones_like(ids)
    mask[1, 5:] = 0
    return model.eval(), {"input_ids": ids, "attention_mask": mask}


def _out(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    with torch.no_grad():
        o = model(**batch)
    t = o.logits if hasattr(o, "logits") else o.last_hidden_state
    return t * batch["attention_mask"].unsqueeze(-1)


FAMILIES = ["bert", "roberta", "distilbert", "gpt2", "llama", "llama-mqa", "bigcode",
            "bigcode-mqa", "opt"]  # fmt: skip


@pytest.mark.parametrize("family", FAMILIES)
def test_every_layer_is_found(family: str) -> None:
    model, _ = _tiny(family)
    blocks = find_attention(model)
    assert len(blocks) == 2
    expected_units = 2 if family == "llama" else 4  # llama: 4 query heads in 2 KV groups
    assert all(b.heads == 4 and b.units == expected_units for b in blocks)
    assert all(b.heads * b.head_dim == 32 for b in blocks)
    assert all(b.per_query == family.endswith("-mqa") for b in blocks)


@pytest.mark.parametrize("family", FAMILIES)
def test_removing_heads_equals_zeroing_them(family: str) -> None:
    model, batch = _tiny(family)
    blocks = find_attention(model)
    reference = copy.deepcopy(model)
    modules = dict(reference.named_modules())
    keeps = []
    for i, b in enumerate(blocks):
        keep = [u for u in range(b.units) if u != i % b.units]  # drop one unit per layer
        keeps.append(keep)
        dropped = np.setdiff1d(np.arange(b.heads * b.head_dim), b.columns(keep))
        out = modules[b.out]
        with torch.no_grad():
            in_dim = module_kind(out).weight_dims[1]  # Linear: 1; GPT-2's Conv1D: 0
            out.weight.index_fill_(in_dim, torch.as_tensor(dropped), 0.0)
    pruned = copy.deepcopy(model)
    for b, keep in zip(find_attention(pruned), keeps, strict=True):
        b.prune(pruned, keep, None)
    got, want = _out(pruned, batch), _out(reference, batch)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert sum(p.numel() for p in pruned.parameters()) < sum(p.numel() for p in model.parameters())
    after = find_attention(pruned)  # the counts are read back from the weights
    assert [b.heads for b in after] == [len(k) * b.unit_heads for k, b in zip(keeps, blocks)]


def test_causal_lm_still_generates_after_pruning() -> None:
    model, batch = _tiny("llama")
    for b in find_attention(model):
        b.prune(model, [1], None)
    out = model.generate(batch["input_ids"][:1], max_new_tokens=3, do_sample=False)
    assert out.shape == (1, 10)


def test_fold_applies_the_correction() -> None:
    model, batch = _tiny("bert")
    b = find_attention(model)[0]
    n = b.heads * b.head_dim
    keep = [0, 2, 3]
    cols = b.columns(keep)
    fold = np.zeros((n, len(cols)))
    fold[cols, np.arange(len(cols))] = 1.0  # identity on the kept columns: plain removal
    a, c = copy.deepcopy(model), copy.deepcopy(model)
    find_attention(a)[0].prune(a, keep, fold)
    find_attention(c)[0].prune(c, keep, None)
    torch.testing.assert_close(_out(a, batch), _out(c, batch))
    with pytest.raises(ValueError, match="cannot remove every head"):
        find_attention(a)[0].prune(a, [], None)


def test_hugging_face_vit_heads_are_found_and_removed_exactly() -> None:
    torch.manual_seed(0)
    cfg = transformers.ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                 intermediate_size=40, image_size=16, patch_size=4)  # fmt: skip
    model = transformers.ViTModel(cfg).eval()
    x = torch.randn(2, 3, 16, 16)
    reference = copy.deepcopy(model)
    modules = dict(reference.named_modules())
    for b in find_attention(reference):
        dropped = np.setdiff1d(np.arange(32), b.columns([0, 2, 3]))
        with torch.no_grad():
            modules[b.out].weight[:, torch.as_tensor(dropped)] = 0
    blocks = find_attention(model)
    assert [b.units for b in blocks] == [4, 4]
    for b in blocks:
        b.prune(model, [0, 2, 3], None)
    with torch.no_grad():
        got, want = (
            model(pixel_values=x).last_hidden_state,
            reference(pixel_values=x).last_hidden_state,
        )
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_timm_vit_heads_are_found_and_removed_exactly() -> None:
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    model = timm.models.vision_transformer.VisionTransformer(
        img_size=32, patch_size=8, embed_dim=48, depth=2, num_heads=4, num_classes=5
    ).eval()
    x = torch.randn(3, 3, 32, 32)
    reference = copy.deepcopy(model)
    modules = dict(reference.named_modules())
    blocks = find_attention(model)
    assert [(b.name, b.units, b.head_dim) for b in blocks] == [
        ("blocks.0.attn", 4, 12),
        ("blocks.1.attn", 4, 12),
    ]
    for b in find_attention(reference):
        dropped = np.setdiff1d(np.arange(48), b.columns([1, 3]))
        with torch.no_grad():
            modules[b.out].weight[:, torch.as_tensor(dropped)] = 0
    for b in blocks:
        b.prune(model, [1, 3], None)
    assert model.blocks[0].attn.attn_dim == 24 and model.blocks[0].attn.num_heads == 2
    with torch.no_grad():
        torch.testing.assert_close(model(x), reference(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize(
    "case", ["self", "cross", "padding", "float-mask", "bool-mask-per-head", "causal", "unbatched"]
)
def test_head_attention_computes_what_multihead_attention_does(
    batch_first: bool, case: str
) -> None:
    from spectrim.graph.attention import HeadAttention

    torch.manual_seed(0)
    mha = torch.nn.MultiheadAttention(12, 3, batch_first=batch_first).eval()
    ours = HeadAttention.from_mha(mha).eval()
    x, y = torch.randn(2, 5, 12), torch.randn(2, 7, 12)
    kw: dict[str, object] = {}
    q, k = x, y
    if case == "self":
        k = x
    if case == "padding":
        pad = torch.zeros(2, 7, dtype=torch.bool)
        pad[1, -3:] = True
        kw["key_padding_mask"] = pad
    if case == "float-mask":
        kw.update(attn_mask=torch.randn(5, 7), need_weights=False)
    if case == "bool-mask-per-head":
        kw.update(attn_mask=torch.rand(6, 5, 7) > 0.7, average_attn_weights=False)
    if case == "causal":
        k = x
        kw.update(attn_mask=torch.ones(5, 5, dtype=torch.bool).triu(1), is_causal=True)
    if case == "unbatched":
        q, k = x[0], y[0]
    if not batch_first and q.dim() == 3:
        q, k = q.transpose(0, 1), k.transpose(0, 1)
    with torch.no_grad():
        want, want_w = mha(q, k, k, **kw)
        got, got_w = ours(q, k, k, **kw)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert (got_w is None) == (want_w is None)
    if want_w is not None:
        torch.testing.assert_close(got_w, want_w, rtol=1e-5, atol=1e-6)


def test_torchvision_vit_attention_is_swapped_exactly_and_heads_removed_exactly() -> None:
    torchvision = pytest.importorskip("torchvision")
    from spectrim.graph.attention import HeadAttention, prepare_attention

    torch.manual_seed(0)
    model = torchvision.models.VisionTransformer(
        image_size=32, patch_size=8, num_layers=2, num_heads=4, hidden_dim=32, mlp_dim=48,
        num_classes=5,
    ).eval()  # fmt: skip
    torch.nn.init.normal_(model.heads.head.weight)  # torchvision initialises it to zero
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        ref = model(x)
    work = copy.deepcopy(model)
    paths = prepare_attention(work)
    assert paths == [f"encoder.layers.encoder_layer_{i}.self_attention" for i in (0, 1)]
    assert all(isinstance(work.get_submodule(p), HeadAttention) for p in paths)
    with torch.no_grad():
        torch.testing.assert_close(work(x), ref, rtol=1e-5, atol=1e-5)
    zeroed = copy.deepcopy(work)
    for b in find_attention(zeroed):
        dropped = np.setdiff1d(np.arange(32), b.columns([0, 2]))
        with torch.no_grad():
            zeroed.get_submodule(b.out).weight[:, torch.as_tensor(dropped)] = 0
    for b in find_attention(work):
        b.prune(work, [0, 2], None)
    assert [b.heads for b in find_attention(work)] == [2, 2]
    with torch.no_grad():
        torch.testing.assert_close(work(x), zeroed(x), rtol=1e-5, atol=1e-5)


def test_attention_with_a_fast_path_is_left_alone() -> None:
    from spectrim.graph.attention import prepare_attention

    layer = torch.nn.TransformerEncoderLayer(16, 2, 32, batch_first=True).eval()
    assert prepare_attention(layer) == []
    assert isinstance(layer.self_attn, torch.nn.MultiheadAttention)


@pytest.mark.parametrize("family", ["llama-mqa", "bigcode-mqa"])
def test_multi_query_heads_are_removed_with_the_shared_kv_head_kept(family: str) -> None:
    """Multi-query attention: query heads go one by one, the one KV head stays, and the
    layer's own code (``num_key_value_groups``, the fused split) runs with what is left."""
    model, batch = _tiny(family)
    blocks = find_attention(model)
    modules = dict(model.named_modules())
    kv_rows = {p.module: _outputs_of(modules[p.module]) for p in blocks[0].projections}
    for b in blocks:
        b.prune(model, [0, 2], None)
    after = find_attention(model)
    assert [(b.heads, b.kv_heads) for b in after] == [(2, 1), (2, 1)]
    for path, rows in kv_rows.items():  # q lost 2 heads' rows, k and v none
        lost = rows - _outputs_of(dict(model.named_modules())[path])
        assert lost in (0, 2 * 8)
    attn = dict(model.named_modules())[after[0].name]
    assert attn.num_key_value_groups == 2
    out = model.generate(batch["input_ids"][:1], max_new_tokens=3, do_sample=False)
    assert out.shape == (1, 10)


def _outputs_of(module: torch.nn.Module) -> int:
    kind = module_kind(module)
    assert kind is not None
    return int(module.weight.shape[kind.weight_dims[0]])


def test_gpt_bigcode_interleaved_heads_are_not_read_as_gpt2s_layout() -> None:
    """GPTBigCode without multi-query interleaves ``[q₀ k₀ v₀ q₁ …]`` in its ``c_attn``; read
    as GPT-2's ``[q | k | v]`` the wrong rows were removed and the model silently changed
    (a 0.13 logit error where heads with zero values are removed exactly).  Heads whose
    value rows are zero contribute nothing, so removing them must change nothing."""
    model, batch = _tiny("bigcode")
    d = 8
    with torch.no_grad():
        for layer in model.transformer.h:
            for h in (1, 3):  # v of head h: rows h·3d + 2d … h·3d + 3d
                layer.attn.c_attn.weight[h * 3 * d + 2 * d : (h + 1) * 3 * d] = 0
                layer.attn.c_attn.bias[h * 3 * d + 2 * d : (h + 1) * 3 * d] = 0
    want = _out(model, batch)
    for b in find_attention(model):
        assert b.projections[0].stride == 3 * d
        b.prune(model, [0, 2], None)
    torch.testing.assert_close(_out(model, batch), want, rtol=1e-5, atol=1e-5)


def _held_out(family: str) -> torch.nn.Module:
    """Tiny random-weight models of families the finders were not written for."""
    torch.manual_seed(0)
    t = transformers
    small = dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                 num_attention_heads=4)  # fmt: skip
    configs: dict[str, Any] = {
        "mistral": lambda: t.MistralConfig(num_key_value_heads=2, **small),
        "qwen3": lambda: t.Qwen3Config(num_key_value_heads=2, head_dim=8, **small),
        "gemma": lambda: t.GemmaConfig(num_key_value_heads=1, head_dim=8, **small),
        "stablelm": lambda: t.StableLmConfig(num_key_value_heads=2, **small),
        "olmo": lambda: t.OlmoConfig(pad_token_id=0, **small),
        "mixtral": lambda: t.MixtralConfig(num_key_value_heads=2, num_local_experts=4, **small),
        "gptj": lambda: t.GPTJConfig(vocab_size=64, n_embd=32, n_layer=2, n_head=4, rotary_dim=4),
        "gpt_bigcode": lambda: t.GPTBigCodeConfig(vocab_size=64, n_embd=32, n_layer=2, n_head=4),
        "phi": lambda: t.PhiConfig(**small),
        "phi3": lambda: t.Phi3Config(num_key_value_heads=2, pad_token_id=0, **small),
        "falcon": lambda: t.FalconConfig(
            vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4
        ),  # multi-query
        "falcon-mha": lambda: t.FalconConfig(
            vocab_size=64,
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=4,
            multi_query=False,
        ),
        "gpt_neox": lambda: t.GPTNeoXConfig(**small),
        # stop 50: XGLM reshapes the heads' output to ``embed_dim``; GPT-OSS has one
        # attention sink per head (``sinks``)
        "xglm": lambda: t.XGLMConfig(vocab_size=64, d_model=32, num_layers=2,
                                     attention_heads=4, ffn_dim=48),
        "gpt_oss": lambda: t.GptOssConfig(num_key_value_heads=2, head_dim=8,
                                          num_local_experts=4, **small),
        # stop 50: OpenAI GPT (``n_head``, no ``head_dim``), ModernBERT's fused ``Wqkv``
        # viewed with a -1 head count, and its decoder's ``Wo``
        "openai-gpt": lambda: t.OpenAIGPTConfig(vocab_size=64, n_embd=32, n_layer=2,
                                                n_head=4),
        "modernbert": lambda: t.ModernBertConfig(pad_token_id=0, **small),
        "modernbert-decoder": lambda: t.ModernBertDecoderConfig(pad_token_id=0, **small),
        # MPT: a fused ``Wqkv`` and the model's ALiBi slopes, ``(heads, 1, keys)``, handed
        # to every layer
        "mpt": lambda: t.MptConfig(vocab_size=64, d_model=32, n_heads=4, n_layers=2,
                                   expansion_ratio=2),
    }  # fmt: skip
    if family == "modernbert":  # an encoder: its masked-LM head gives the logits
        return t.AutoModelForMaskedLM.from_config(configs[family]()).eval()
    return t.AutoModelForCausalLM.from_config(configs[family]()).eval()


HELD_OUT = ["mistral", "qwen3", "gemma", "stablelm", "olmo", "mixtral", "gptj", "gpt_bigcode",
            "phi", "phi3", "gpt_neox", "falcon", "falcon-mha", "xglm", "gpt_oss", "openai-gpt",
            "modernbert", "modernbert-decoder", "mpt"]  # fmt: skip


@pytest.mark.parametrize("family", ["xglm", "gpt_oss", "openai-gpt", "modernbert-decoder", "mpt"])
def test_bart_style_widths_and_attention_sinks_follow_the_heads(family: str, tmp_path: Any) -> None:
    """XGLM's attention reshapes its heads' output to its ``embed_dim`` attribute and
    GPT-OSS adds one learned sink logit per head (``sinks``): with heads removed both
    stopped running ("shape '[8, 12, 32]' is invalid", "Sizes of tensors must match").
    ``embed_dim`` is now a width attribute (found again on the reloaded layer, where it
    still holds the model's width) and ``sinks`` a per-head table; the result reloads
    exactly and generates.  OpenAI GPT's, ModernBERT's decoder's and MPT's layers (new
    finders, stop 50; MPT's with its ALiBi slopes cut to the kept heads, generating with a
    cache) reload and generate too."""
    import spectrim
    from spectrim.io.manifest import load_compressed, save_compressed

    model = _held_out(family)
    g = torch.Generator().manual_seed(0)
    batches = [{"input_ids": torch.randint(3, 64, (8, 12), generator=g)} for _ in range(3)]
    small, report = spectrim.compress(model, batches, "id", "heads=0.5")
    assert [b.heads for b in find_attention(small)] == [2, 2]
    save_compressed(small, tmp_path / "m", report)
    back = load_compressed(tmp_path / "m", _held_out(family))
    with torch.no_grad():
        got = small(**batches[0]).logits
        torch.testing.assert_close(back(**batches[0]).logits, got)
    out = back.generate(batches[0]["input_ids"][:1, :5], max_new_tokens=3, do_sample=False)
    assert out.shape == (1, 8)


@pytest.mark.parametrize("family", HELD_OUT)
def test_heads_whose_values_are_zero_are_removed_exactly(family: str) -> None:
    """Found in held-out families as a new user would meet them: the second half of every
    layer's units get zero value rows (their heads output nothing), and ``id`` at half the
    heads must remove exactly those and leave the outputs as they were.  A finder that read
    the layout wrong (GPTBigCode as GPT-2 did) removes other rows and changes them."""
    import spectrim

    model = _held_out(family)
    modules = dict(model.named_modules())
    blocks = find_attention(model)
    assert len(blocks) == 2
    with torch.no_grad():
        for b in blocks:
            (v,) = [p for p in b.projections if p.role == "v"]
            rows = torch.as_tensor(b.projection_rows(v, range(b.units // 2, b.units)))
            mod = modules[v.module]
            mod.weight.index_fill_(module_kind(mod).weight_dims[0], rows, 0.0)
            if getattr(mod, "bias", None) is not None:
                mod.bias[rows] = 0.0
    g = torch.Generator().manual_seed(0)
    batches = [{"input_ids": torch.randint(3, 64, (8, 12), generator=g)} for _ in range(3)]
    small, _ = spectrim.compress(model, batches, "id", "heads=0.5", sequential=False)
    assert [b.heads for b in find_attention(small)] == [b.heads // 2 for b in blocks]
    with torch.no_grad():
        want, got = model(**batches[0]).logits, small(**batches[0]).logits
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * float(want.abs().max()))


GROUPED = ["mistral", "qwen3", "stablelm", "mixtral", "phi3"]


@pytest.mark.parametrize("family", GROUPED)
def test_query_heads_inside_kv_groups_are_removed_exactly(family: str) -> None:
    """Grouped-query families (4 query heads, 2 KV heads): in every group the second query
    head is made a copy of the first, so ``query_heads=True`` at half the heads must
    remove one head of each group, keep both KV heads, and leave the outputs as they were
    (the fused ``qkv_proj`` of Phi-3 and the per-head ``q_norm`` of Qwen3 included)."""
    import dataclasses

    import spectrim

    model = _held_out(family)
    modules = dict(model.named_modules())
    blocks = find_attention(model)
    with torch.no_grad():
        for b in blocks:
            assert (b.heads, b.kv_heads) == (4, 2)
            view = dataclasses.replace(b, kv_heads=1)  # one unit per query head
            (q,) = [p for p in b.projections if p.role == "q"]
            mod = modules[q.module]
            dim = module_kind(mod).weight_dims[0]
            for dst, src in ((1, 0), (3, 2)):
                to, frm = (torch.as_tensor(view.projection_rows(q, [h])) for h in (dst, src))
                mod.weight.index_copy_(dim, to, mod.weight.index_select(dim, frm))
                if getattr(mod, "bias", None) is not None:
                    mod.bias[to] = mod.bias[frm]
    g = torch.Generator().manual_seed(0)
    batches = [{"input_ids": torch.randint(3, 64, (8, 12), generator=g)} for _ in range(3)]
    small, _ = spectrim.compress(
        model, batches, "id", "heads=0.5", query_heads=True, sequential=False
    )
    assert [(b.heads, b.kv_heads) for b in find_attention(small)] == [(2, 2), (2, 2)]
    with torch.no_grad():
        want, got = model(**batches[0]).logits, small(**batches[0]).logits
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * float(want.abs().max()))
    out = small.generate(batches[0]["input_ids"][:1, :5], max_new_tokens=3, do_sample=False)
    assert out.shape == (1, 8)


def test_phi3_layers_keep_their_own_head_counts() -> None:
    """Phi-3 cuts its fused ``qkv_proj`` at ``config.num_attention_heads·head_dim``, one
    config for every layer: each pruned layer gets its own copy of the config with its
    count, so two layers can keep different numbers of heads, the model's config is left
    alone, and generate() runs.  The copies are views (``LayerConfig``): a later
    ``set_attn_implementation`` on the model reaches the pruned layers too, and a deep
    copy of the model keeps them views of its own config."""
    import copy

    model = _held_out("phi3")
    shared = model.config
    blocks = find_attention(model)
    blocks[0].prune(model, [1], None)  # one KV group (2 query heads) left
    blocks[1].prune(model, [0, 1], None)  # both kept
    layers = model.model.layers
    assert layers[0].self_attn.config.num_attention_heads == 2
    assert layers[1].self_attn.config.num_attention_heads == 4
    assert shared.num_attention_heads == 4 and model.config is shared
    assert [(b.heads, b.kv_heads) for b in find_attention(model)] == [(2, 1), (4, 2)]
    ids = torch.randint(3, 64, (1, 5))
    assert model.generate(ids, max_new_tokens=3, do_sample=False).shape == (1, 8)
    with torch.no_grad():
        before = model(ids).logits
    for impl in ("sdpa", "eager"):
        model.set_attn_implementation(impl)
        assert [layer.self_attn.config._attn_implementation for layer in layers] == [impl] * 2
        with torch.no_grad():
            torch.testing.assert_close(model(ids).logits, before, rtol=1e-5, atol=1e-5)
    twin = copy.deepcopy(model)
    twin.set_attn_implementation("sdpa")
    assert twin.model.layers[0].self_attn.config._attn_implementation == "sdpa"
    assert layers[0].self_attn.config._attn_implementation == "eager"
    assert twin.model.layers[0].self_attn.config.num_attention_heads == 2


def test_falcon_layouts_it_cannot_cut_are_left_alone() -> None:
    """Falcon-40B's grouped ``[q… k v]`` per KV group is not matched, so ``heads=F``
    refuses it by name rather than removing the wrong rows (ALiBi, refused until stop 42,
    is covered: ``test_heads_of_layers_sharing_a_position_bias_are_removed_exactly``)."""
    import spectrim

    t = transformers
    common = dict(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4)
    cfg = t.FalconConfig(new_decoder_architecture=True, num_kv_heads=2, **common)
    torch.manual_seed(0)
    model = t.FalconForCausalLM(cfg).eval()
    assert find_attention(model) == []
    with pytest.raises(ValueError, match="Falcon's grouped layout"):
        spectrim.compress(model, [{"input_ids": torch.randint(3, 64, (4, 8))}], "id",
                          "heads=0.5")  # fmt: skip


@pytest.mark.parametrize(
    "relative",
    [{}, {"relative_attention": True, "pos_att_type": ["p2c", "c2p"], "share_att_key": False},
     {"relative_attention": True, "pos_att_type": ["p2c", "c2p"], "share_att_key": True,
      "position_buckets": 8}],
    ids=["plain", "separate-position-projections", "shared-key"],
)  # fmt: skip
def test_deberta_heads_are_removed_exactly(relative: dict[str, Any]) -> None:
    """DeBERTa-v2/v3: the disentangled attention projects the relative positions per head,
    with the layer's own query and key (``share_att_key``) or with ``pos_key_proj`` /
    ``pos_query_proj``, which lose the same heads' rows.  Heads with zero values go
    exactly in each arrangement."""
    import spectrim

    torch.manual_seed(0)
    cfg = transformers.DebertaV2Config(vocab_size=64, hidden_size=32, intermediate_size=48,
                                       num_hidden_layers=2, num_attention_heads=4, **relative)  # fmt: skip
    model = transformers.DebertaV2Model(cfg).eval()
    modules = dict(model.named_modules())
    blocks = find_attention(model)
    expected = 5 if relative.get("share_att_key") is False else 3
    assert [len(b.projections) for b in blocks] == [expected, expected]
    with torch.no_grad():
        for b in blocks:
            (v,) = [p for p in b.projections if p.role == "v"]
            rows = torch.as_tensor(b.projection_rows(v, range(2, 4)))
            modules[v.module].weight[rows] = 0.0
            modules[v.module].bias[rows] = 0.0
    g = torch.Generator().manual_seed(0)
    batches = [{"input_ids": torch.randint(3, 64, (8, 12), generator=g)} for _ in range(3)]
    small, _ = spectrim.compress(model, batches, "id", "heads=0.5", sequential=False)
    assert [b.heads for b in find_attention(small)] == [2, 2]
    with torch.no_grad():
        want, got = model(**batches[0]).last_hidden_state, small(**batches[0]).last_hidden_state
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def _shared_bias(family: str, layers: int = 2) -> torch.nn.Module:
    """Families whose layers share one per-head position bias: T5 (computed by the first
    layer and handed on), MPNet (computed by the encoder), BLOOM (ALiBi slopes for every
    head, flattened with the batch)."""
    torch.manual_seed(0)
    t = transformers
    if family == "bloom":
        cfg = t.BloomConfig(vocab_size=64, hidden_size=32, n_layer=layers, n_head=4)
        return t.BloomForCausalLM(cfg).eval()
    if family == "falcon-alibi":  # Falcon-RW: the slopes are added into every layer's mask
        cfg = t.FalconConfig(vocab_size=64, hidden_size=32, num_hidden_layers=layers,
                             num_attention_heads=4, alibi=True, multi_query=False)  # fmt: skip
        return t.FalconForCausalLM(cfg).eval()
    t5 = dict(vocab_size=64, d_model=32, d_kv=8, num_heads=4, d_ff=48, num_layers=layers)
    if family == "t5":
        return t.T5EncoderModel(t.T5Config(**t5)).eval()
    cfg = t.MPNetConfig(vocab_size=64, hidden_size=32, num_hidden_layers=layers,
                        num_attention_heads=4, intermediate_size=48)  # fmt: skip
    return t.MPNetModel(cfg).eval()


def _bias_batches(family: str) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    out = []
    for _ in range(3):
        ids = torch.randint(3, 64, (8, 12), generator=g)
        mask = torch.ones_like(ids)
        mask[0, 9:] = 0
        out.append({"input_ids": ids, "attention_mask": mask})
    return out


def _first(output: Any) -> torch.Tensor:
    return output.logits if hasattr(output, "logits") else output.last_hidden_state


@pytest.mark.parametrize("family", ["t5", "mpnet", "bloom", "falcon-alibi"])
def test_heads_of_layers_sharing_a_position_bias_are_removed_exactly(
    family: str, tmp_path: Any
) -> None:
    """T5, MPNet, BLOOM and Falcon-RW add one per-head position bias, computed once, in
    every layer: a layer that lost heads must add its kept heads' rows of it (and T5's layers
    hand the whole bias on).  Each layer gets other dead heads (zero value rows), so
    ``id`` at half the heads keeps other heads per layer; the outputs must stay as they
    were, and so must a saved and reloaded copy.  Without the slicing the pruned model
    does not run (4 bias rows added to 2 heads' scores).  (T5's encoder-decoder, with its
    decoder's biases: ``test_encoder_decoder_heads_go_from_every_attention...``.)"""
    import spectrim
    from spectrim.graph.attention import BIAS_HEADS
    from spectrim.io.manifest import load_compressed, save_compressed

    model = _shared_bias(family)
    modules = dict(model.named_modules())
    blocks = find_attention(model)
    assert len(blocks) == 2 and all(b.bias is not None for b in blocks)
    dead = ([0, 3], [1, 2])
    with torch.no_grad():
        for b, heads in zip(blocks, dead, strict=True):
            (v,) = [p for p in b.projections if p.role == "v"]
            rows = torch.as_tensor(b.projection_rows(v, heads))
            modules[v.module].weight.index_fill_(0, rows, 0.0)
            if modules[v.module].bias is not None:
                modules[v.module].bias[rows] = 0.0
    batches = _bias_batches(family)
    small, report = spectrim.compress(model, batches, "id", "heads=0.5")
    layers = dict(small.named_modules())
    kept = [getattr(layers[b.name], BIAS_HEADS) for b in find_attention(small)]
    assert kept == [[1, 2], [0, 3]]
    assert not any(hasattr(m, BIAS_HEADS) for m in model.modules())  # the user's model
    mask = batches[0]["attention_mask"].unsqueeze(-1)
    with torch.no_grad():
        want, got = _first(model(**batches[0])), _first(small(**batches[0]))
    if family in ("t5", "mpnet"):
        want, got = want * mask, got * mask
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * float(want.abs().max()))
    save_compressed(small, tmp_path / "m", report)
    back = load_compressed(tmp_path / "m", _shared_bias(family))
    with torch.no_grad():
        torch.testing.assert_close(_first(back(**batches[0])), _first(small(**batches[0])))
    if family not in ("t5", "mpnet"):
        out = back.generate(batches[0]["input_ids"][:1], max_new_tokens=3, do_sample=False)
        assert out.shape[0] == 1 and out.shape[1] > 1


def test_heads_removed_twice_keep_the_right_rows_of_the_shared_bias() -> None:
    """A second removal composes with the first: the kept list still names the original
    heads (their rows of the bias every layer is handed)."""
    from spectrim.graph.attention import BIAS_HEADS

    model = _shared_bias("t5")
    reference = copy.deepcopy(model)
    out = dict(reference.named_modules())[find_attention(reference)[1].out]
    with torch.no_grad():  # heads 0 and 2 of the second layer ignored
        out.weight[:, 0:8] = 0.0
        out.weight[:, 16:24] = 0.0
    pruned = copy.deepcopy(model)
    find_attention(pruned)[1].prune(pruned, [1, 2, 3], None)  # head 0 goes
    block = find_attention(pruned)[1]
    block.prune(pruned, [0, 2], None)  # now heads 1, 2, 3: the middle one (2) goes
    assert getattr(dict(pruned.named_modules())[block.name], BIAS_HEADS) == [1, 3]
    batch = _bias_batches("t5")[0]
    with torch.no_grad():
        torch.testing.assert_close(
            _first(pruned(**batch)), _first(reference(**batch)), rtol=1e-5, atol=1e-6
        )


@pytest.mark.parametrize("family", ["olmo2", "olmoe"])
def test_a_norm_across_all_heads_is_not_matched(family: str) -> None:
    """OLMo-2 and OLMoE normalise the query (and key) projection over all heads at once
    (``q_norm`` of width heads·head_dim, unlike Qwen3's per-head one): a removed head
    changes the others' normalisation, so nothing can go exactly.  The first held-out run
    of OLMoE crashed with a shape error in that norm; it is now refused by name."""
    import spectrim

    t = transformers
    small = dict(vocab_size=64, hidden_size=32, intermediate_size=32, num_hidden_layers=1,
                 num_attention_heads=4, num_key_value_heads=2)  # fmt: skip
    cfg = (
        t.Olmo2Config(**small)
        if family == "olmo2"
        else t.OlmoeConfig(num_experts=2, num_experts_per_tok=1, **small)
    )
    torch.manual_seed(0)
    model = t.AutoModelForCausalLM.from_config(cfg).eval()
    assert find_attention(model) == []
    batches = [{"input_ids": torch.randint(3, 64, (4, 8))}]
    with pytest.raises(ValueError, match=r"self_attn' normalises all its heads' queries"):
        spectrim.compress(model, batches, "id", "heads=0.5")


def _albert(layers: int = 4) -> torch.nn.Module:
    torch.manual_seed(0)
    cfg = transformers.AlbertConfig(vocab_size=64, embedding_size=16, hidden_size=32,
                                    intermediate_size=48, num_hidden_layers=layers,
                                    num_attention_heads=8)  # fmt: skip
    return transformers.AlbertModel(cfg).eval()


def test_albert_s_shared_layer_loses_heads_fitted_on_all_its_calls(tmp_path: Any) -> None:
    """ALBERT runs one attention layer at every depth: its heads are chosen and corrected
    from all of its calls.  The sequential refit used to stop the pass at the layer's
    first call, so its correction fitted depth 1 alone (4.5 times the output error of
    the one-shot fit here); with the prefix unchanged the two fits must now agree.  Dead
    heads still go exactly, and the model saves and reloads."""
    import spectrim
    from spectrim.io.manifest import load_compressed, save_compressed

    model = _albert()
    (block,) = find_attention(model)
    assert block.heads == 8
    g = torch.Generator().manual_seed(0)
    batches = [{"input_ids": torch.randint(3, 64, (16, 12), generator=g)} for _ in range(6)]
    test = {"input_ids": torch.randint(3, 64, (16, 12), generator=g)}
    with torch.no_grad():
        want = model(**test).last_hidden_state
        outs = [
            spectrim.compress(model, batches, "id", "heads=0.5", sequential=s)[0]
            for s in (False, True)
        ]
        one, seq = (m(**test).last_hidden_state for m in outs)
    assert [b.heads for b in find_attention(outs[1])] == [4]
    err = float((one - want).norm() / want.norm())
    assert float((seq - want).norm() / want.norm()) == pytest.approx(err, rel=1e-3)
    save_compressed(outs[1], tmp_path / "m", None)
    back = load_compressed(tmp_path / "m", _albert())
    with torch.no_grad():
        torch.testing.assert_close(back(**test).last_hidden_state, seq)
    dead = _albert()
    (v,) = [p for p in block.projections if p.role == "v"]
    rows = torch.as_tensor(block.projection_rows(v, [1, 2, 5, 6]))
    with torch.no_grad():
        dead.get_submodule(v.module).weight[rows] = 0.0
        dead.get_submodule(v.module).bias[rows] = 0.0
        cut, _ = spectrim.compress(dead, batches, "id", "heads=0.5")
        torch.testing.assert_close(
            cut(**test).last_hidden_state, dead(**test).last_hidden_state, rtol=1e-5, atol=1e-5
        )


def _codegen() -> torch.nn.Module:
    torch.manual_seed(0)
    cfg = transformers.CodeGenConfig(vocab_size=64, n_embd=64, n_layer=2, n_head=8, rotary_dim=4)
    return transformers.CodeGenForCausalLM(cfg).eval()


def test_codegen_heads_go_from_every_part_of_its_fused_projection(tmp_path: Any) -> None:
    """CodeGen views ``qkv_proj`` as ``mp_num = 4`` parts ``[q_g | v_g | k_g]`` of 2 heads
    each here, so a unit is one head at the same place of every part.  Each layer gets
    other dead units (zero value rows); ``id`` at half the heads must remove exactly
    those, keep the parts equal (4 heads, ``embed_dim`` 32) and still generate, save and
    reload."""
    import spectrim
    from spectrim.io.manifest import load_compressed, save_compressed

    model = _codegen()
    blocks = find_attention(model)
    assert [(b.heads, b.units, b.blocks) for b in blocks] == [(8, 2, 4), (8, 2, 4)]
    (v,) = [p for p in blocks[0].projections if p.role == "v"]
    # unit 1 of layer 0: head 1 of every part, [q | v | k] parts of 3·16 rows
    want_rows = [g * 48 + 16 + 8 + i for g in range(4) for i in range(8)]
    assert blocks[0].projection_rows(v, [1]).tolist() == want_rows
    with torch.no_grad():
        for i, b in enumerate(blocks):
            (vi,) = [p for p in b.projections if p.role == "v"]
            model.get_submodule(vi.module).weight[
                torch.as_tensor(b.projection_rows(vi, [1 - i]))
            ] = 0.0
    g = torch.Generator().manual_seed(0)
    batches = [{"input_ids": torch.randint(3, 64, (8, 12), generator=g)} for _ in range(3)]
    small, report = spectrim.compress(model, batches, "id", "heads=0.5")
    after = find_attention(small)
    assert [(b.heads, b.units) for b in after] == [(4, 1), (4, 1)]
    assert small.transformer.h[0].attn.embed_dim == 32
    with torch.no_grad():
        want, got = model(**batches[0]).logits, small(**batches[0]).logits
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * float(want.abs().max()))
    save_compressed(small, tmp_path / "m", report)
    back = load_compressed(tmp_path / "m", _codegen())
    with torch.no_grad():
        torch.testing.assert_close(back(**batches[0]).logits, got)
    out = back.generate(batches[0]["input_ids"][:1, :4], max_new_tokens=3, do_sample=False)
    assert out.shape == (1, 7)


def _vision(family: str) -> torch.nn.Module:
    t = transformers
    torch.manual_seed(0)
    if family in ("swin", "swinv2"):
        cls, cfg_cls = (
            (t.SwinModel, t.SwinConfig) if family == "swin" else (t.Swinv2Model, t.Swinv2Config)
        )
        cfg = cfg_cls(image_size=32, patch_size=4, embed_dim=16, depths=[1, 1], num_heads=[2, 4],
                      window_size=4)  # fmt: skip
        return cls(cfg).eval()
    cfg = t.BeitConfig(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2,
                       num_attention_heads=4, intermediate_size=64,
                       use_relative_position_bias=family == "beit",
                       use_shared_relative_position_bias=family == "beit-shared")  # fmt: skip
    return t.BeitModel(cfg).eval()


@pytest.mark.parametrize("family", ["swin", "swinv2", "beit"])
def test_per_head_position_tables_go_with_their_heads(family: str, tmp_path: Any) -> None:
    """Swin's and BEiT's relative-position bias tables, and Swin-v2's logit scales and
    position-bias MLP, hold one slice per head beside the projections: removing heads
    crashed the next forward (stop 49's sweep of HF vision models).  They are now cut
    with their heads: heads whose value rows are zero go exactly, and the result reloads."""
    import spectrim
    from spectrim.io import load_compressed, save_compressed

    model = _vision(family)
    blocks = find_attention(model)
    assert blocks and all(b.head_tables for b in blocks)
    assert all(b.head_outputs for b in blocks) == (family == "swinv2")
    modules = dict(model.named_modules())
    with torch.no_grad():  # the second half of every layer's heads outputs zeros
        for b in blocks:
            (v,) = [p for p in b.projections if p.role == "v"]
            rows = torch.as_tensor(b.projection_rows(v, range(b.units // 2, b.units)))
            modules[v.module].weight[rows] = 0.0
            modules[v.module].bias[rows] = 0.0
    g = torch.Generator().manual_seed(0)
    calib = [{"pixel_values": torch.randn(16, 3, 32, 32, generator=g)} for _ in range(4)]
    test = {"pixel_values": torch.randn(4, 3, 32, 32, generator=g)}
    small, report = spectrim.compress(model, calib, "id", "heads=0.5", sequential=False)
    assert [(r.width_before, r.width_after) for r in report.groups][-1] in ((4, 2), (2, 1))
    with torch.no_grad():
        a, b = model(**test).last_hidden_state, small(**test).last_hidden_state
    assert float((a - b).norm() / a.norm()) < 1e-5
    save_compressed(small, tmp_path / "m", report)
    back = load_compressed(tmp_path / "m", _vision(family))
    with torch.no_grad():
        assert torch.equal(back(**test).last_hidden_state, b)


def test_a_bias_shared_by_every_layer_is_refused_by_name() -> None:
    """BEiT's shared relative-position bias (one table for every layer, added from
    outside the attention) cannot lose one layer's heads: the run stops with a message
    naming the layer, not with the model's shape error."""
    import spectrim

    model = _vision("beit-shared")
    calib = [{"pixel_values": torch.randn(8, 3, 32, 32)} for _ in range(2)]
    with pytest.raises(ValueError, match=r"after removing heads of 'layers.0.attention'"):
        spectrim.compress(model, calib, "id", "heads=0.5")


def test_an_error_of_the_model_s_own_code_after_heads_went_is_refused_by_name() -> None:
    """DiffLlama's differential attention splits its value heads into two halves in its
    own code; with heads removed that unpacking raised a bare ``ValueError: not enough
    values to unpack`` (the held-out sweep of stop 50), which a user cannot place.  Any
    error the model's own code raises after a layer lost heads (``ValueError``,
    ``IndexError``, ``TypeError`` as well as ``RuntimeError``) is refused naming the layer;
    spectrim's own errors pass through as they are, and the user's model is untouched."""
    import spectrim
    from spectrim._heads import _raised_by_the_model

    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.DiffLlamaConfig(vocab_size=60, hidden_size=32, intermediate_size=48,
                                       num_hidden_layers=2, num_attention_heads=4,
                                       num_key_value_heads=2)  # fmt: skip
    model = transformers.DiffLlamaForCausalLM(cfg).eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    calib = [{"input_ids": torch.randint(3, 60, (4, 10))} for _ in range(2)]
    with pytest.raises(ValueError, match=r"after removing heads of 'model.layers.0.self_attn' "
                       r"the model no longer runs \(ValueError: not enough values"):  # fmt: skip
        spectrim.compress(model, calib, "id", "heads=0.5")
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    with pytest.raises(ValueError) as own:  # spectrim's own refusal (a bad target)
        spectrim.compress(model, calib, "id", "heads=7")
    assert not _raised_by_the_model(own.value)


@pytest.mark.parametrize("family", ["convbert", "big_bird"])
def test_attention_whose_heads_are_not_all_of_it_is_refused_by_name(family: str) -> None:
    """Two BERT-named layers whose heads cannot go alone (the held-out sweep of stop 50):
    ConvBERT's output projection reads its convolution heads' outputs beside the attention
    heads' (the run failed inside a Gram with "x must have shape (n, 16), got (80, 32)"),
    and BigBird rebuilds its self-attention from the config whenever the sequence length
    changes the attention type (the compressed model ran, the reloaded one crashed on its
    first input).  Both are refused, naming the module and the reason."""
    import spectrim

    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    small = dict(vocab_size=60, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                 num_attention_heads=4)  # fmt: skip
    model = transformers.AutoModel.from_config(
        transformers.AutoConfig.for_model(family, **small)
    ).eval()
    assert not find_attention(model)
    want = {
        "convbert": r"'encoder.layer.0.attention.output.dense' reads 32 columns but the 2 "
        r"heads of 'encoder.layer.0.attention' write 16",
        "big_bird": r"'encoder.layer.0.attention' \(BigBirdAttention\) rebuilds its "
        r"self-attention from the model's config",
    }[family]
    calib = [{"input_ids": torch.randint(3, 60, (4, 10))} for _ in range(2)]
    with pytest.raises(ValueError, match=want):
        spectrim.compress(model, calib, "id", "heads=0.5")


def test_timm_swin_window_attention_loses_heads_exactly() -> None:
    """timm's Swin ``WindowAttention`` (fused ``qkv``, ``num_heads`` alone, a per-head
    relative-position table) was not recognised: ``heads=F`` refused the model.  It is a
    layer now, found from its table's columns (so a reloaded layer is found too); heads
    whose value rows are zero go exactly, and the result reloads."""
    timm = pytest.importorskip("timm")
    import tempfile
    from pathlib import Path

    import spectrim
    from spectrim.io import load_compressed, save_compressed

    def make() -> torch.nn.Module:
        torch.manual_seed(0)
        return timm.create_model(
            "swin_tiny_patch4_window7_224", img_size=56, embed_dim=16, depths=(1, 1),
            num_heads=(2, 4), window_size=7, num_classes=10,
        ).eval()  # fmt: skip

    model = make()
    blocks = find_attention(model)
    assert [(b.heads, b.head_dim, len(b.head_tables)) for b in blocks] == [(2, 8, 1), (4, 8, 1)]
    modules = dict(model.named_modules())
    with torch.no_grad():
        for b in blocks:
            (v,) = [p for p in b.projections if p.role == "v"]
            rows = torch.as_tensor(b.projection_rows(v, range(b.units // 2, b.units)))
            modules[v.module].weight[rows] = 0.0
            modules[v.module].bias[rows] = 0.0
    x = torch.randn(40, 3, 56, 56, generator=torch.Generator().manual_seed(1))
    small, report = spectrim.compress(model, list(x[:32].split(16)), "id", "heads=0.5",
                                      sequential=False)  # fmt: skip
    assert [(g.width_before, g.width_after) for g in report.groups] == [(2, 1), (4, 2)]
    with torch.no_grad():
        a, b = model(x[32:]), small(x[32:])
    assert float((a - b).norm() / a.norm()) < 1e-5
    with tempfile.TemporaryDirectory() as d:
        save_compressed(small, Path(d) / "m", report)
        back = load_compressed(Path(d) / "m", make())
        with torch.no_grad():
            assert torch.equal(back(x[32:]), b)


def _seq2seq(family: str) -> torch.nn.Module:
    """Tiny random-weight T5-family encoder-decoders (the seq2seq sweep of stop 51)."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    t5 = dict(vocab_size=64, d_model=32, d_ff=48, num_layers=2, num_decoder_layers=2,
              num_heads=4, d_kv=8, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)  # fmt: skip
    config = {"t5": transformers.T5Config, "umt5": transformers.UMT5Config,
              "longt5": transformers.LongT5Config}[family](**t5)  # fmt: skip
    return transformers.AutoModelForSeq2SeqLM.from_config(config).eval()


def _seq2seq_batches(n: int, seed: int) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [
        {"input_ids": torch.randint(3, 64, (8, 12), generator=g),
         "decoder_input_ids": torch.randint(3, 64, (8, 6), generator=g)}
        for _ in range(n)
    ]  # fmt: skip


def _kill_other_heads(model: torch.nn.Module, blocks: list[Any]) -> None:
    """Zero the value rows of heads 1, 2 in even layers and 0, 3 in odd ones (their heads
    output nothing), so ``id`` at half the heads keeps other heads in each layer."""
    modules = dict(model.named_modules())
    with torch.no_grad():
        for i, b in enumerate(blocks):
            (v,) = [p for p in b.projections if p.role == "v"]
            rows = torch.as_tensor(b.projection_rows(v, [0, 3] if i % 2 else [1, 2]))
            mod = modules[v.module]
            mod.weight.index_fill_(module_kind(mod).weight_dims[0], rows, 0.0)
            if getattr(mod, "bias", None) is not None:
                mod.bias[rows] = 0.0


def _half_the_heads_exactly(model: torch.nn.Module, batches: list[Any]) -> tuple[Any, Any]:
    """``id`` at half the heads of a model whose other heads are dead: every layer keeps 2
    of 4, none is left whole, and the logits stay as they were.  The model and report."""
    import spectrim

    small, report = spectrim.compress(model, batches, "id", "heads=0.5", sequential=False)
    assert [b.heads for b in find_attention(small)] == [2] * len(find_attention(model))
    assert not any("does not recognise" in w for w in report.warnings)
    with torch.no_grad():
        want, got = model(**batches[0]).logits, small(**batches[0]).logits
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * float(want.abs().max()))
    return small, report


@pytest.mark.parametrize("family", ["t5", "umt5"])
def test_encoder_decoder_heads_go_from_every_attention_and_generate_as_before(
    family: str, tmp_path: Any
) -> None:
    """The seq2seq sweep of stop 51: T5's decoder attention was left whole under
    ``heads=0.5`` without a word (its first layer's bias covers the tokens of the cache,
    its cross-attention hands on a bias of zeros made for its heads), and UMT5 stopped
    after the first layer lost heads (each of its layers computes its own bias from a
    table of its own; T5's hook that hands one bias on misread it).  Now every attention
    (the encoder's, the decoder's self- and cross-attention) loses its heads: with other
    dead heads (zero value rows) in each layer the outputs stay as they were, and greedy
    generation through the cache gives the same tokens and scores; the result reloads."""
    from spectrim.io.manifest import load_compressed, save_compressed

    model = _seq2seq(family)
    blocks = find_attention(model)
    assert len(blocks) == 6
    if family == "t5":  # one bias shared by each stack's layers; zeros for cross-attention
        assert all(b.bias is not None for b in blocks)
        assert [b.bias.zeros for b in blocks if b.bias] == [False] * 3 + [True, False, True]
    else:  # each layer's own table (cross-attention has none)
        assert all(b.bias is None for b in blocks)
        assert sum(1 for b in blocks if b.head_tables) == 4
    _kill_other_heads(model, blocks)
    batches = _seq2seq_batches(3, 0)
    small, report = _half_the_heads_exactly(model, batches)
    ids = batches[0]["input_ids"][:3]
    kw: dict[str, Any] = dict(max_new_tokens=5, min_new_tokens=5, do_sample=False,
                              output_scores=True, return_dict_in_generate=True)  # fmt: skip
    a, b = model.generate(ids, **kw), small.generate(ids, **kw)
    assert torch.equal(a.sequences, b.sequences)
    for x, y in zip(a.scores, b.scores, strict=True):  # -inf where min_new_tokens bans EOS
        torch.testing.assert_close(y.clamp_min(-1e4), x.clamp_min(-1e4), rtol=1e-5, atol=1e-4)
    save_compressed(small, tmp_path / "m", report)
    back = load_compressed(tmp_path / "m", _seq2seq(family))
    with torch.no_grad():
        torch.testing.assert_close(back(**batches[0]).logits, small(**batches[0]).logits)
    assert torch.equal(back.generate(ids, **kw).sequences, b.sequences)


def test_longt5_local_attention_is_not_read_as_t5_s_and_is_named() -> None:
    """LongT5's local attention has T5's projections but a bias per block: read as T5's, the
    run stopped inside spectrim with ``compute_bias() got an unexpected keyword argument
    'device'``.  It is not matched now: its decoder (T5's attention) loses heads and the
    report names the encoder's layers it left whole."""
    import spectrim

    model = _seq2seq("longt5")
    names = [b.name for b in find_attention(model)]
    assert len(names) == 4 and all(n.startswith("decoder.") for n in names)
    small, report = spectrim.compress(model, _seq2seq_batches(2, 0), "id", "heads=0.5")
    (line,) = [w for w in report.warnings if "does not recognise" in w]
    assert "2 attention layer(s)" in line and "'encoder.block.0.layer.0'" in line
    assert [b.heads for b in find_attention(small)] == [2] * 4


def test_gpt2_cross_attention_of_a_vision_encoder_decoder_loses_heads_exactly(
    tmp_path: Any,
) -> None:
    """A ViT encoder with a GPT-2 decoder (``VisionEncoderDecoderModel``, an image
    captioner): GPT-2's cross-attention (queries in ``q_attn``, ``[k | v]`` of the image
    in ``c_attn``) was left whole, and after the heads target's warning named it, it is
    read now.  With other dead heads in each layer, the ViT's, the decoder's self- and
    cross-attention lose theirs exactly, and greedy captions through the cache stay the
    same; the result reloads."""
    from spectrim.io.manifest import load_compressed, save_compressed

    transformers = pytest.importorskip("transformers")

    def make() -> torch.nn.Module:
        torch.manual_seed(0)
        enc = transformers.ViTConfig(image_size=32, patch_size=8, hidden_size=32,
                                     num_hidden_layers=2, num_attention_heads=4,
                                     intermediate_size=48)  # fmt: skip
        dec = transformers.GPT2Config(vocab_size=64, n_embd=32, n_layer=2, n_head=4,
                                      add_cross_attention=True, is_decoder=True)  # fmt: skip
        config = transformers.VisionEncoderDecoderConfig.from_encoder_decoder_configs(enc, dec)
        config.decoder_start_token_id, config.pad_token_id = 1, 0
        return transformers.VisionEncoderDecoderModel(config).eval()

    model = make()
    blocks = find_attention(model)
    cross = [b.name for b in blocks if b.name.endswith("crossattention")]
    assert len(blocks) == 6 and len(cross) == 2
    _kill_other_heads(model, blocks)
    g = torch.Generator().manual_seed(0)
    batches = [{"pixel_values": torch.randn(8, 3, 32, 32, generator=g),
                "decoder_input_ids": torch.randint(3, 64, (8, 6), generator=g)}
               for _ in range(3)]  # fmt: skip
    small, report = _half_the_heads_exactly(model, batches)
    pixels = batches[0]["pixel_values"][:3]
    kw: dict[str, Any] = dict(max_new_tokens=5, min_new_tokens=5, do_sample=False)
    captions = small.generate(pixels, **kw)
    assert torch.equal(model.generate(pixels, **kw), captions)
    save_compressed(small, tmp_path / "m", report)
    back = load_compressed(tmp_path / "m", make())
    assert torch.equal(back.generate(pixels, **kw), captions)
