"""Models dispatched by accelerate (weights on the meta device, fetched by hooks from CPU
memory or disk files): compressed to the very model the plain one gives, the user's
dispatched model left as it was."""

from __future__ import annotations

import copy
import hashlib
from pathlib import Path
from typing import Any

import pytest
import torch

import spectrim
from spectrim.graph import is_offloaded, onload

accelerate = pytest.importorskip("accelerate")
transformers = pytest.importorskip("transformers")


def _bert() -> Any:
    torch.manual_seed(0)
    cfg = transformers.BertConfig(
        vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=64,
    )  # fmt: skip
    return transformers.BertModel(cfg).eval()


def _batches(seq: int = 9) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    return [{"input_ids": torch.randint(0, 100, (8, seq), generator=g)} for _ in range(4)]


def _same(a: torch.nn.Module, b: torch.nn.Module) -> float:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    return max((sa[k] - sb[k]).abs().max().item() for k in sa)


def _digest(folder: Path) -> str:
    h = hashlib.sha256()
    for f in sorted(folder.rglob("*")):
        if f.is_file():
            h.update(f.name.encode() + f.read_bytes())
    return h.hexdigest()


def test_a_disk_offloaded_model_compresses_like_the_plain_one_and_stays_offloaded(
    tmp_path: Path,
) -> None:
    plain = _bert()
    data = _batches()
    want, _ = spectrim.compress(plain, data, "id", "width=0.5")
    held = copy.deepcopy(plain)
    accelerate.disk_offload(held, tmp_path / "off", execution_device="cpu")
    before = _digest(tmp_path / "off")
    assert is_offloaded(held) and {p.device.type for p in held.parameters()} == {"meta"}

    got, report = spectrim.compress(held, data, "id", "width=0.5")
    assert not is_offloaded(got) and {p.device.type for p in got.parameters()} == {"cpu"}
    assert _same(got, want) == 0.0 and report.macs_ratio < 0.9
    # the user's model: still dispatched, its files untouched, computing what it did
    assert is_offloaded(held) and {p.device.type for p in held.parameters()} == {"meta"}
    assert _digest(tmp_path / "off") == before
    with torch.no_grad():
        torch.testing.assert_close(
            held(**data[0]).last_hidden_state, plain(**data[0]).last_hidden_state
        )


def test_a_device_map_with_disk_and_tied_weights_compresses_block_by_block(
    tmp_path: Path,
) -> None:
    """from_pretrained with a device_map over CPU and disk: a GPT-2 whose output layer is
    tied to its token embedding (both offloaded), fitted one block at a time."""
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(vocab_size=100, n_embd=32, n_layer=2, n_head=4, n_positions=16)
    cfg.bos_token_id = cfg.eos_token_id = 0
    plain = transformers.GPT2LMHeadModel(cfg).eval()
    plain.save_pretrained(tmp_path / "gpt")
    where = {"transformer.wte": "disk", "transformer.wpe": "cpu", "transformer.h.0": "disk",
             "transformer.h.1": "cpu", "transformer.ln_f": "disk", "lm_head": "disk"}  # fmt: skip
    held = transformers.GPT2LMHeadModel.from_pretrained(
        tmp_path / "gpt", device_map=where, offload_folder=tmp_path / "off"
    ).eval()
    data = _batches(12)
    want, _ = spectrim.compress(plain, data, "id", "width=0.5", blockwise=True)
    got, report = spectrim.compress(held, data, "id", "width=0.5", blockwise=True)
    assert report.blocks == 2 and _same(got, want) == 0.0
    assert got.lm_head.weight is got.transformer.wte.weight  # still tied
    prompt = data[0]["input_ids"][:1, :4]
    assert torch.equal(
        got.generate(prompt, max_new_tokens=4, do_sample=False),
        want.generate(prompt, max_new_tokens=4, do_sample=False),
    )


def test_inplace_strips_the_hooks_and_reuses_the_offloaded_tensors() -> None:
    """``inplace=True``: the model itself becomes the plain, pruned model, its offloaded
    CPU tensors taken over without a copy."""
    plain = _bert()
    data = _batches()
    want, _ = spectrim.compress(plain, data, "id", "width=0.5")
    held = copy.deepcopy(plain)
    accelerate.cpu_offload(held, execution_device="cpu")
    stored = held.embeddings.word_embeddings._hf_hook.weights_map["weight"]
    got, _ = spectrim.compress(held, data, "id", "width=0.5", inplace=True)
    assert got is held and not is_offloaded(held)
    assert held.embeddings.word_embeddings.weight.data_ptr() == stored.data_ptr()
    assert _same(got, want) == 0.0


def test_onload_copies_never_share_the_stored_tensors() -> None:
    plain = _bert()
    held = copy.deepcopy(plain)
    accelerate.cpu_offload(held, execution_device="cpu")
    stored = held.encoder.layer[0].output.dense._hf_hook.weights_map["weight"]
    mine = onload(held)
    w = mine.encoder.layer[0].output.dense.weight
    assert w.data_ptr() != stored.data_ptr() and torch.equal(w, stored)
    with torch.no_grad():
        w.zero_()  # writing the copy leaves the user's model as it was
    x = _batches()[0]
    with torch.no_grad():
        torch.testing.assert_close(held(**x).last_hidden_state, plain(**x).last_hidden_state)
    assert is_offloaded(held) and not is_offloaded(mine)


def test_a_meta_tensor_no_hook_holds_is_named() -> None:
    held = _bert()
    accelerate.cpu_offload(held, execution_device="cpu")
    held.pooler.dense._hf_hook.weights_map.dataset.pop("pooler.dense.bias")
    with pytest.raises(ValueError, match=r"'pooler.dense.bias' of the model is on the meta"):
        spectrim.compress(held, _batches(), "id", "width=0.5")
