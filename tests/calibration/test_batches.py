"""Text calibration: padded token positions never reach the statistics, the stored
inputs or the fits; the real all-MiniLM-L6-v2 on real STS-B sentences gives the same
Grams padded as unpadded, and a pruned BERT is the same whether its calibration batches
were padded or not."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

import spectrim
from spectrim.calibration import collect
from spectrim.calibration.batches import drop_padding, stack_examples, token_mask
from spectrim.calibration.inputs import input_grams
from spectrim.graph import analyze_channels


def _padded(tok: Any, sentences: list[str], length: int) -> dict[str, torch.Tensor]:
    return dict(tok(sentences, padding="max_length", truncation=True, max_length=length,
                    return_tensors="pt"))  # fmt: skip


def _alone(tok: Any, sentences: list[str], length: int) -> list[dict[str, torch.Tensor]]:
    return [dict(tok([s], truncation=True, max_length=length, return_tensors="pt"))
            for s in sentences]  # fmt: skip


def test_token_mask_and_drop_padding_leave_other_inputs_alone() -> None:
    mask = torch.tensor([[True, True, False], [True, False, False]])
    x = torch.randn(2, 3, 5)
    y, cd = drop_padding(x, mask, 2)
    assert cd == 1 and torch.equal(y, torch.cat([x[0, :2], x[1, :1]]))
    assert drop_padding(x, mask, -1)[0].shape == (3, 5)
    conv_input = torch.randn(2, 3, 3)  # (B, C, T): the channels lead, nothing is dropped
    assert drop_padding(conv_input, mask, 1)[0] is conv_input
    images = torch.randn(2, 3, 4, 4)
    assert drop_padding(images, mask, 1)[0] is images
    assert token_mask({"attention_mask": torch.ones(2, 3)}) is None  # no padding: no cost
    assert token_mask((torch.ones(2, 3),)) is None


def test_padded_statistics_equal_unpadded_ones_on_minilm(
    minilm: tuple[nn.Module, Any], sts_train_sentences: list[str]
) -> None:
    model, tok = minilm
    sentences = sts_train_sentences[:12]
    padded = [_padded(tok, sentences[:6], 40), _padded(tok, sentences[6:], 40)]
    assert bool((padded[0]["attention_mask"] == 0).any())  # there is padding to drop
    alone = _alone(tok, sentences, 40)
    analysis = analyze_channels(model, alone[0])
    groups = analysis.prunable
    assert groups  # the FFN widths
    a = collect(model, analysis, padded, groups).stats
    b = collect(model, analysis, alone, groups).stats
    real_tokens = int(sum(int(p["attention_mask"].sum()) for p in padded))
    for key in a:
        assert a[key].count == b[key].count == real_tokens
        np.testing.assert_allclose(a[key].gram_numpy(), b[key].gram_numpy(), rtol=1e-4,
                                   atol=1e-4 * float(np.abs(b[key].gram_numpy()).max()))  # fmt: skip
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)][:4]
    ga, gb = input_grams(model, padded, names), input_grams(model, alone, names)
    for n in names:
        assert ga[n].count == gb[n].count == real_tokens
        scale = float(np.abs(gb[n].gram_numpy()).max())
        np.testing.assert_allclose(ga[n].gram_numpy(), gb[n].gram_numpy(), atol=1e-4 * scale)


@pytest.mark.parametrize("method,target", [("id", "width=0.5"), ("obs", "sparsity=0.5")])
def test_compressing_on_padded_batches_equals_unpadded(
    method: str, target: str, sts_train_sentences: list[str], minilm: tuple[nn.Module, Any]
) -> None:
    """A small BERT (random weights, MiniLM's tokenizer): channel pruning with its
    sequential fits, and obs with its per-matrix statistics, give the same model from
    padded batches (mixed with unpadded ones) as from one unpadded sentence per batch."""
    transformers = pytest.importorskip("transformers")
    _, tok = minilm
    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=tok.vocab_size, hidden_size=32,
                                  num_hidden_layers=2, num_attention_heads=4,
                                  intermediate_size=48, max_position_embeddings=64)  # fmt: skip
    model = transformers.BertModel(cfg, add_pooling_layer=False).eval()
    sentences = sts_train_sentences[:24]
    alone = _alone(tok, sentences, 48)
    # padded batches next to batches without padding (which keep their (B, T, C) layout)
    padded = [_padded(tok, sentences[i : i + 8], 48) for i in (0, 8)] + alone[16:]
    kw = {"refit": True} if method == "obs" else {}
    a, ra = spectrim.compress(model, padded, method, target, **kw)
    b, rb = spectrim.compress(model, alone, method, target, **kw)
    assert ra.widths == rb.widths
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        # the same weights removed, and the kept ones equal to float32 noise amplified by
        # the sequential refits (0.3% of the largest weight; padded statistics: 77%)
        assert torch.equal(sa[k] == 0, sb[k] == 0), k
        scale = float(sb[k].abs().max())
        np.testing.assert_allclose(sa[k].numpy(), sb[k].numpy(), atol=1e-2 * scale, err_msg=k)
    if method == "id":
        assert any(w[1] < w[0] for w in ra.widths.values())


def test_stack_examples_fills_a_batch_of_dicts_and_tuples() -> None:
    ids = [{"input_ids": torch.arange(3 * 4).view(3, 4), "mask": torch.ones(3, 4)}]
    out = stack_examples(ids, 5)  # 3 examples repeated to fill 5
    assert out["input_ids"].shape == (5, 4) and torch.equal(
        out["input_ids"][3], ids[0]["input_ids"][0]
    )
    pairs = [(torch.zeros(2, 3), torch.ones(2)), (torch.ones(2, 3), torch.zeros(2))]
    x, y = stack_examples(pairs, 3)
    assert x.shape == (3, 3) and x[2].sum() == 3 and y.tolist() == [1.0, 1.0, 0.0]
