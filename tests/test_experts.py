"""``target="experts=F"``: the neurons of mixture-of-experts layers through ``spectrim.compress``.

Tiny random-weight Hugging Face MoE models (Mixtral, Qwen3-MoE, OLMoE, Qwen2-MoE with its
shared expert, GraniteMoE, PhiMoE, DeepSeek-V3 with its latent attention): exactness where the kept neurons reproduce the removed ones, the profiler's
MACs, the correction never worse than plain removal, padded tokens left out, save and
reload, every method, and the errors that name the culprit.
"""

from __future__ import annotations

import copy
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

import spectrim
from spectrim.graph.experts import find_experts

transformers = pytest.importorskip("transformers")

SMALL = dict(vocab_size=80, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2)  # fmt: skip


def _moe(family: str = "mixtral", duplicate: bool = True) -> nn.Module:
    """A tiny MoE causal LM: 4 experts of 24 neurons, 2 per token.  With ``duplicate``, the
    gate and up rows of neurons 12–23 of every expert copy those of neurons 0–11, so half of
    each expert's hidden units repeat the other half."""
    torch.manual_seed(0)
    t = transformers
    configs: dict[str, Any] = {
        "mixtral": lambda: t.MixtralConfig(intermediate_size=24, num_local_experts=4,
                                           num_experts_per_tok=2, **SMALL),
        "qwen3_moe": lambda: t.Qwen3MoeConfig(moe_intermediate_size=24, num_experts=4,
                                              num_experts_per_tok=2, head_dim=8,
                                              intermediate_size=48, **SMALL),
        "olmoe": lambda: t.OlmoeConfig(intermediate_size=24, num_experts=4,
                                       num_experts_per_tok=2, **SMALL),
        "qwen2_moe": lambda: t.Qwen2MoeConfig(moe_intermediate_size=24, num_experts=4,
                                              num_experts_per_tok=2,
                                              shared_expert_intermediate_size=40,
                                              intermediate_size=48, **SMALL),
        "granitemoe": lambda: t.GraniteMoeConfig(intermediate_size=24, num_local_experts=4,
                                                 num_experts_per_tok=2, **SMALL),
        "phimoe": lambda: t.PhimoeConfig(intermediate_size=24, num_local_experts=4,
                                         num_experts_per_tok=2, **SMALL),
        "deepseek_v3": lambda: t.DeepseekV3Config(
            moe_intermediate_size=24, n_routed_experts=4, num_experts_per_tok=2,
            intermediate_size=48, first_k_dense_replace=0, n_group=1, topk_group=1,
            kv_lora_rank=16, q_lora_rank=None, qk_rope_head_dim=8, qk_nope_head_dim=8,
            v_head_dim=8, n_shared_experts=1, **{**SMALL, "num_key_value_heads": 4}),
    }  # fmt: skip
    model = t.AutoModelForCausalLM.from_config(configs[family]()).eval()
    if duplicate:
        with torch.no_grad():
            for block in find_experts(model):
                gu = block.module(model).gate_up_proj
                gu[:, 12:24] = gu[:, 0:12]
                gu[:, 36:48] = gu[:, 24:36]
    return model


def _batches(n: int = 3, seed: int = 0, pad: bool = False) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        batch = {"input_ids": torch.randint(3, 80, (8, 12), generator=g)}
        if pad:
            mask = torch.ones(8, 12, dtype=torch.long)
            mask[::2, 7:] = 0
            batch["attention_mask"] = mask
        out.append(batch)
    return out


@pytest.mark.parametrize(
    "family", ["mixtral", "qwen3_moe", "olmoe", "qwen2_moe", "granitemoe", "phimoe", "deepseek_v3"]
)
def test_half_of_every_expert_is_removed_exactly(family: str) -> None:
    """Every expert keeps 12 of its 24 neurons; where the other 12 repeat them, ``id``'s
    folds give back the original logits, the model generates, and the first layer's
    experts (which see the same tokens and routing as the original's) cost half their
    MACs, measured by the profiler (Hugging Face runs them through ``_grouped_mm``)."""
    from spectrim.evaluation import profile

    model = _moe(family)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    small, report = spectrim.compress(model, _batches(), "id", "experts=0.5")
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())  # untouched
    assert [b.width for b in find_experts(small)] == [12, 12]
    assert [g.width_after for g in report.groups] == [12, 12]
    assert all(g.predicted_error < 1e-4 for g in report.groups)  # float rounding
    test = _batches(1, seed=5)[0]
    with torch.no_grad():
        want, got = model(**test).logits, small(**test).logits
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4 * float(want.abs().max()))
    first = find_experts(model)[0].name
    ratio = profile(small, test).per_module[first] / profile(model, test).per_module[first]
    assert ratio == pytest.approx(0.5)
    assert report.macs_ratio < 1.0 and report.params_ratio < 1.0
    out = small.generate(test["input_ids"][:1, :5], max_new_tokens=3, do_sample=False)
    assert out.shape == (1, 8)


@pytest.mark.parametrize("method", ["spectral", "l1", "l2", "random"])
def test_every_method_narrows_the_experts(method: str) -> None:
    model = _moe(duplicate=False)
    small, report = spectrim.compress(model, _batches(), method, "experts=0.3")
    # 0.3 · 24 = 7.2 neurons: 8, the nearest multiple of the 4 float32 values of 16 bytes
    # that the default experts kernel (torch._grouped_mm) needs per row
    assert [b.width for b in find_experts(small)] == [8, 8]
    assert small.model.layers[0].mlp.experts.intermediate_dim == 8
    with torch.no_grad():
        assert torch.isfinite(small(**_batches(1, seed=3)[0]).logits).all()
    assert spectrim.CompressionReport.from_dict(report.to_dict()).target == "experts=0.3"


def _expert_outputs(model: nn.Module, batches: list[dict[str, torch.Tensor]]) -> torch.Tensor:
    """The first MoE layer's output (all its experts, router-weighted)."""
    got: list[torch.Tensor] = []
    mod = model.model.layers[0].mlp.experts
    h = mod.register_forward_hook(lambda m, a, o: got.append(o.detach()))
    with torch.no_grad():
        for b in batches:
            model(**b)
    h.remove()
    return torch.cat(got)


def test_the_fold_is_never_worse_than_plain_removal_on_the_calibration_data() -> None:
    """Least squares on each expert's router-weighted hidden units minimises the first
    layer's output error over those tokens, so with the folds it is below the same
    neurons sliced without them."""
    model, batches = _moe(duplicate=False), _batches()
    small, _ = spectrim.compress(model, batches, "id", "experts=0.5", sequential=False)
    plain = copy.deepcopy(model)
    block = find_experts(plain)[0]
    mod, kept = block.module(plain), small.model.layers[0].mlp.experts
    keep = []
    for e in range(block.experts):  # the neurons id kept, found by their gate rows
        rows = mod.gate_up_proj[e, :24]
        keep.append(
            [
                j
                for j in range(24)
                if any(torch.equal(rows[j], r) for r in kept.gate_up_proj[e, :12])
            ]
        )
    block.prune(plain, torch.tensor(keep).numpy(), [None] * block.experts)
    ref = _expert_outputs(model, batches)
    err_fold = float((_expert_outputs(small, batches) - ref).norm())
    err_plain = float((_expert_outputs(plain, batches) - ref).norm())
    assert err_fold < 0.9 * err_plain


def test_padded_tokens_do_not_reach_the_statistics() -> None:
    """The first layer's rows are the real tokens times the experts each is sent to."""
    batches = _batches(pad=True)
    _, report = spectrim.compress(_moe(), batches, "id", "experts=0.5")
    real = sum(int(b["attention_mask"].sum()) for b in batches)
    assert report.groups[0].rows == real * 2


def test_saved_and_reloaded_with_the_narrowed_experts(tmp_path: Any) -> None:
    from spectrim.io.manifest import load_compressed, save_compressed

    small, report = spectrim.compress(_moe(duplicate=False), _batches(), "id", "experts=0.5")
    save_compressed(small, tmp_path / "m", report)
    back = load_compressed(tmp_path / "m", _moe(duplicate=False))
    assert [b.width for b in find_experts(back)] == [12, 12]
    assert back.model.layers[1].mlp.experts.intermediate_dim == 12
    test = _batches(1, seed=5)[0]
    with torch.no_grad():
        torch.testing.assert_close(back(**test).logits, small(**test).logits)


def test_widths_the_default_experts_kernel_cannot_run_are_rounded() -> None:
    """``torch._grouped_mm`` refuses rows that are not a multiple of 16 bytes ("strides
    should be multiple of 16 bytes"): 6 float32 neurons would leave a model that no longer
    runs, so ``experts=0.25`` of 24 keeps 8 (bfloat16: 8 as well, its step)."""
    from spectrim._experts import expert_width

    model = _moe(duplicate=False)
    block = find_experts(model)[0]
    assert expert_width(block, model, 0.25) == 8 and expert_width(block, model, 0.1) == 4
    assert expert_width(block, model, 0.25, round_to=3) == 12  # lcm(3, 4)
    assert expert_width(block, model.to(torch.bfloat16), 0.4) == 8
    model.float()
    block.prune(model, np.tile(np.arange(6), (4, 1)), [None] * 4)  # what it would do at 6
    with pytest.raises(RuntimeError, match="16 bytes"):  # the kernel's own refusal
        model(**_batches(1)[0])


def test_a_model_without_experts_is_named() -> None:
    net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    with pytest.raises(ValueError, match="no mixture-of-experts layer in Sequential"):
        spectrim.compress(net, torch.randn(32, 4), "id", "experts=0.5")


def test_a_weight_method_cannot_select_expert_neurons() -> None:
    with pytest.raises(ValueError, match="weight method"):
        spectrim.compress(_moe(), _batches(), "obs", "experts=0.5")


def test_gpt_oss_experts_are_not_read_in_the_wrong_layout() -> None:
    """gpt-oss stores its experts transposed, with biases and a clamped activation: not
    this layout, so it is not matched (and ``experts=F`` says so) rather than cut wrong."""
    cfg = transformers.GptOssConfig(vocab_size=80, hidden_size=32, intermediate_size=24,
                                    num_hidden_layers=1, num_attention_heads=4,
                                    num_key_value_heads=2, num_local_experts=4, head_dim=8,
                                    num_experts_per_tok=2)  # fmt: skip
    model = transformers.AutoModelForCausalLM.from_config(cfg).eval()
    assert find_experts(model) == []


def test_a_channel_target_on_a_moe_model_says_where_the_experts_go() -> None:
    """The experts are no channel groups: ``width=0.5`` leaves them whole and its report
    says which target narrows them, rather than returning the model silently unchanged."""
    _, report = spectrim.compress(_moe(), _batches(), "id", "width=0.5")
    assert any("target='experts=F'" in w for w in report.warnings), report.warnings


@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe"])
def test_experts_on_a_budget_take_the_free_neurons_first(family: str) -> None:
    """``experts=True`` puts every MoE layer's width on the ``macs=`` budget.  Half of
    every expert repeats the other half, so down to 12 neurons the error curve is zero:
    at the MACs of ``experts=0.5`` the allocator must keep exactly the 12 that reproduce
    the rest, and the logits stay the original's."""
    model = _moe(family)
    _, half = spectrim.compress(model, _batches(), "id", "experts=0.5")
    small, report = spectrim.compress(
        model, _batches(), "id", f"macs={half.macs_ratio + 1e-3:.4f}", experts=True
    )
    lines = [g for g in report.groups if g.name.endswith("(experts)")]
    assert [g.width_after for g in lines] == [12, 12], [g.width_after for g in lines]
    assert [b.width for b in find_experts(small)] == [12, 12]
    assert report.macs_ratio == pytest.approx(half.macs_ratio, abs=2e-3)
    test = _batches(1, seed=5)[0]
    with torch.no_grad():
        want, got = model(**test).logits, small(**test).logits
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4 * float(want.abs().max()))
    assert not any("keep their experts" in w for w in report.warnings)


def test_experts_share_one_budget_with_heads_and_the_stream(tmp_path: Any) -> None:
    """``experts=True`` with ``heads=True`` and ``hidden=True``: one allocation over the
    experts' neurons, the heads and the residual width lands at the target, every width
    the experts kernel runs (multiples of 4 float32 neurons), and the result reloads and
    generates alike."""
    from spectrim.io.manifest import load_compressed, save_compressed

    model = _moe("mixtral", duplicate=False)
    small, report = spectrim.compress(
        model, _batches(4), "id", "macs=0.6", experts=True, heads=True, hidden=True
    )
    assert report.macs_ratio <= 0.6 + 1e-3, report.macs_ratio
    widths = [b.width for b in find_experts(small)]
    assert all(k % 4 == 0 for k in widths) and min(widths) < 24, widths
    kinds = {g.name.rpartition(" ")[2] for g in report.groups if g.name.endswith(")")}
    assert kinds == {"(experts)", "(heads)", "(hidden)"}
    save_compressed(small, tmp_path / "m", report)
    back = load_compressed(tmp_path / "m", base_model=_moe("mixtral", duplicate=False))
    test = _batches(1, seed=5)[0]
    with torch.no_grad():
        torch.testing.assert_close(back(**test).logits, small(**test).logits, atol=0, rtol=0)
    ids = test["input_ids"][:1, :5]
    a = small.generate(ids, max_new_tokens=3, do_sample=False)
    assert torch.equal(a, back.generate(ids, max_new_tokens=3, do_sample=False))


def test_experts_true_needs_a_budget_and_names_its_groups() -> None:
    """``experts=True`` outside a ``macs``/``params`` target is refused with the target
    that would do it; a ``group_weights`` name that is no MoE layer lists the naming."""
    with pytest.raises(ValueError, match="experts=True puts the neurons of mixture-of-experts"):
        spectrim.compress(_moe(), _batches(), "id", "width=0.5", experts=True)
    model = _moe(duplicate=False)
    name = f"{find_experts(model)[0].name} (experts)"
    widths = []
    for weights in ({}, {name: 100.0}):
        _, report = spectrim.compress(
            model, _batches(), "id", "macs=0.8", experts=True, group_weights=weights
        )
        widths.append([g.width_after for g in report.groups if g.name.endswith("(experts)")])
    assert widths[0] == [12, 12] and widths[1][0] > 12 > widths[1][1], widths  # [20, 4]
    with pytest.raises(ValueError, match=r"'model\.layers\.9\.mlp\.experts \(experts\)'.*"
                       r"'<experts module> \(experts\)'"):  # fmt: skip
        spectrim.compress(
            _moe(), _batches(), "id", "macs=0.8", experts=True,
            group_weights={"model.layers.9.mlp.experts (experts)": 2.0},
        )  # fmt: skip


def test_one_shot_experts_keep_what_the_original_model_s_statistics_chose() -> None:
    """One-shot (``sequential=False``) with ``experts=True`` and ``heads=True``: the
    experts' neurons are chosen from the Grams of the original model, the ones the
    budget's curves were made from, though the heads cut before them change what the
    experts read.  So each narrowed expert's gate and up rows are those the solver of the
    original model's Grams keeps, and the report counts the rows those Grams saw."""
    from spectrim._experts import expert_grams, gram_arrays
    from spectrim.methods import get_method

    model, batches = _moe("mixtral", duplicate=False), _batches(4)
    small, report = spectrim.compress(
        model, batches, "id", "macs=0.6", experts=True, heads=True, sequential=False
    )
    assert any(g.name.endswith("(heads)") and g.width_after < g.width_before
               for g in report.groups)  # fmt: skip
    blocks, narrowed = find_experts(model), find_experts(small)
    accs = expert_grams(model, blocks, batches)
    method = get_method("id")
    lines = {g.name: g for g in report.groups if g.name.endswith("(experts)")}
    checked = 0
    for b, nb in zip(blocks, narrowed):
        k = nb.width
        if k == b.width:
            continue
        keep, _ = method.expert_solver(b, gram_arrays(accs[b.name]), model).plan(k)
        gu0, gu1 = b.module(model).gate_up_proj, nb.module(small).gate_up_proj
        for e in range(b.experts):
            idx = torch.as_tensor(keep[e])
            want = torch.cat([gu0[e, idx], gu0[e, b.width + idx]])
            assert torch.equal(gu1[e], want), (b.name, e)
        assert lines[f"{b.name} (experts)"].rows == sum(a.count for a in accs[b.name])
        checked += 1
    assert checked >= 1


def test_experts_with_fewer_tokens_than_neurons_still_fold_copies_exactly() -> None:
    """PhiMoE with 16 experts and 2 per token (found by the held-out sweep): on 4 batches
    some experts are sent fewer tokens than the 12 distinct neurons they hold, so on their
    rows any 12 neurons reproduce the others.  Fitted on those rows alone the folds gave
    the copies of kept neurons to unrelated ones (a relative logit error of 0.021 on new
    tokens); topped up by the layer's other tokens, ``id`` keeps one neuron of each pair
    and folds the copy back: float rounding."""
    from spectrim._experts import expert_grams

    torch.manual_seed(0)
    cfg = transformers.PhimoeConfig(intermediate_size=24, num_local_experts=16,
                                    num_experts_per_tok=2, **SMALL)  # fmt: skip
    model = transformers.AutoModelForCausalLM.from_config(cfg).eval()
    with torch.no_grad():
        for block in find_experts(model):
            gu = block.module(model).gate_up_proj
            gu[:, 12:24] = gu[:, 0:12]
            gu[:, 36:48] = gu[:, 24:36]
    batches = _batches(2)
    blocks = find_experts(model)
    counts = [a.count for per in expert_grams(model, blocks, batches).values() for a in per]
    assert min(counts) < 12  # the case: an expert with fewer rows than distinct neurons
    small, _ = spectrim.compress(model, batches, "id", "experts=0.5", sequential=False)
    test = _batches(1, seed=5)[0]
    with torch.no_grad():
        want, got = model(**test).logits, small(**test).logits
    assert float((got - want).norm() / want.norm()) < 1e-5


def test_top_up_adds_the_other_tokens_as_the_missing_rows() -> None:
    """Brute force: an expert with ``n < m`` rows gains ``(m − n) · w̄² / s`` times the Gram
    of its activations on the ``s`` sampled tokens (``w̄²``: its mean squared router weight,
    the layer's for an expert never reached); one with ``n ≥ m`` rows is left; the row
    counts stay."""
    from spectrim._experts import _hidden, top_up
    from spectrim.calibration.gram import GramAccumulator

    model = _moe(duplicate=False)
    mod = find_experts(model)[0].module(model)
    g = torch.Generator().manual_seed(0)
    sample = torch.randn(30, 32, generator=g)
    accs = [GramAccumulator(24, sums=False) for _ in range(4)]
    rows = [torch.randn(n, 24, dtype=torch.float64, generator=g) for n in (5, 40, 0, 23)]
    for a, r in zip(accs, rows):
        a.update(r)
    before = [a.gram.clone() for a in accs]
    weight2 = torch.tensor([5 * 0.25, 40 * 0.09, 0.0, 23 * 0.16], dtype=torch.float64)
    top_up(mod, accs, weight2, sample)
    mean_w2 = float(weight2.sum() / 68)
    for e, (n, w2) in enumerate([(5, 0.25), (40, None), (0, mean_w2), (23, 0.16)]):
        assert accs[e].count == n
        if w2 is None:
            assert torch.equal(accs[e].gram, before[e])
            continue
        with torch.no_grad():
            h = _hidden(mod, sample, e).double()
        want = before[e] + (h.T @ h) * ((24 - n) * w2 / 30)
        torch.testing.assert_close(accs[e].gram, want)


def test_the_top_up_sample_is_drawn_by_the_batch_s_place() -> None:
    """Each batch gives the same number of distinct rows, drawn by a generator seeded with
    the batch's place in the whole calibration set: so the sample does not depend on how
    processes share the batches (``tests/test_distributed.py``, scenario ``experts``)."""
    from spectrim._experts import _sample_rows

    x = torch.arange(60, dtype=torch.float32).reshape(30, 2)
    a, b, c = _sample_rows(x, 7, 3), _sample_rows(x, 7, 3), _sample_rows(x, 7, 4)
    assert a.shape == (7, 2) and len(set(a[:, 0].tolist())) == 7
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert set(a[:, 0].tolist()) <= set(x[:, 0].tolist())
    assert _sample_rows(x[:4], 7, 0).shape == (4, 2)  # fewer rows than asked: all of them
