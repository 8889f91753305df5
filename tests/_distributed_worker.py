"""One process of a data-parallel compression, for tests/test_distributed.py.

``python tests/_distributed_worker.py SCENARIOS RANK WORLD INIT_FILE OUT_DIR``: joins a gloo
process group of ``WORLD`` processes through ``INIT_FILE`` (no group when ``WORLD`` is 1),
and for each of the comma-separated ``SCENARIOS`` in turn runs ``spectrim.compress`` (on
the pretrained CIFAR-10 ResNet-20 and 128 CIFAR-10 images unless the scenario says
otherwise) and writes ``OUT_DIR/{SCENARIO}-rank{RANK}.pt`` (the state_dict and the report)
or ``OUT_DIR/{SCENARIO}-rank{RANK}.err`` (the exception's type and message).  One process
runs them all: the imports and the process group are paid for once.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

import spectrim
from spectrim.zoo import load_dataset, load_pretrained

SCENARIOS = {
    # a channel method with its sequential correction fitted on the first fifth of the
    # batches (the default): 2 of 8, one on each rank
    "id": {"method": "id", "target": "macs=0.5"},
    # a weight-sparsification method, matrix by matrix on the compressed prefix
    "obs": {"method": "obs", "target": "sparsity=0.5"},
    "fail": {"method": "id", "target": "macs=0.5"},
    # channels and weights on one budget: the weight curves' Grams summed over ranks,
    # rank 0's widths and densities, then both stages as above (at params=0.4 the
    # allocation depends on those Grams: without the sum, rank 0 alone chooses otherwise)
    "joint": {"method": "id+obs", "target": "params=0.4"},
    # the three 64-wide groups selected from randomized sketches of 32 rows (the sketch
    # thresholds lowered to ResNet-20's widths below)
    "sketch": {"method": "id", "target": "macs=0.5", "stats_memory": 90000},
    # the kept channels chosen again in the sequential pass from Grams summed over ranks
    "select": {"method": "spectral", "target": "macs=0.5", "sequential_select": True},
    # block consumers refitted on their outputs plus the residual drift (products summed
    # over ranks; each rank reads the original's operands of its own batches), and the
    # stream's readers refitted on their outputs
    "residual": {
        "method": "id",
        "target": "macs=0.5",
        "sequential_fit": "residual",
        "refit_readers": True,
    },
    # the sequential fits block by block (ResNet-20's nine residual blocks)
    "blocks": {"method": "id", "target": "macs=0.5", "blockwise": True},
    # a torchvision ResNet-18 with the defaults: the residual fit block by block, its
    # stream groups spanning the residual blocks of a stage (and the stem, a block)
    "blocks-span": {"method": "id", "target": "macs=0.5"},
    # the same with the statistics measured block by block, each reduced when its block
    # is done
    "blocks-stats": {"method": "id", "target": "macs=0.5", "block_statistics": True},
    # attention heads of a small BERT (padded text batches): alone, and on a MACs budget
    "heads": {"method": "id", "target": "heads=0.5"},
    "heads-budget": {"method": "id", "target": "macs=0.6", "heads": True},
    # query heads inside the KV groups of a small LLaMA with grouped-query attention
    "heads-query": {"method": "id", "target": "heads=0.5", "query_heads": True},
    # the neurons of a small Mixtral's experts (per-expert Grams summed over the ranks)
    "experts": {"method": "id", "target": "experts=0.5"},
    # ... with 16 experts and 16 sequences: most experts get fewer tokens than neurons
    # and are topped up by a sample of the layer's tokens, drawn the same on any sharding
    "experts-few": {"method": "id", "target": "experts=0.5"},
    # ... and on a MACs budget with the heads and the residual width
    "experts-budget": {
        "method": "id",
        "target": "macs=0.6",
        "experts": True,
        "heads": True,
        "hidden": True,
    },
    # the residual width of a small GPT-2 (pre-LN, tied LM head), readers refitted
    "hidden": {"method": "spectral", "target": "hidden=0.75"},
}


def _gpt2() -> tuple[nn.Module, list[dict[str, torch.Tensor]]]:
    """A seeded 2-layer GPT-2 and 8 batches of 16 token sequences."""
    import transformers

    torch.manual_seed(0)
    cfg = transformers.GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=101, n_positions=32)
    model = transformers.GPT2LMHeadModel(cfg).eval()
    ids = torch.randint(0, 101, (128, 12), generator=torch.Generator().manual_seed(1))
    return model, [{"input_ids": b} for b in ids.split(16)]


def _llama() -> tuple[nn.Module, list[dict[str, torch.Tensor]]]:
    """A seeded 2-layer LLaMA (8 query heads, 2 KV heads) and 8 batches of 16 sequences."""
    import transformers

    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        vocab_size=101, hidden_size=64, num_hidden_layers=2, num_attention_heads=8,
        num_key_value_heads=2, intermediate_size=96, max_position_embeddings=32,
    )  # fmt: skip
    model = transformers.LlamaForCausalLM(cfg).eval()
    ids = torch.randint(0, 101, (128, 12), generator=torch.Generator().manual_seed(1))
    return model, [{"input_ids": b} for b in ids.split(16)]


def _mixtral(
    experts: int = 4, sequences: int = 128
) -> tuple[nn.Module, list[dict[str, torch.Tensor]]]:
    """A seeded 2-layer Mixtral (``experts`` experts of 32 neurons, 2 per token) and 8
    batches of ``sequences / 8`` token sequences."""
    import transformers

    torch.manual_seed(0)
    cfg = transformers.MixtralConfig(
        vocab_size=101, hidden_size=32, intermediate_size=32, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, num_local_experts=experts,
        num_experts_per_tok=2, max_position_embeddings=32,
    )  # fmt: skip
    model = transformers.MixtralForCausalLM(cfg).eval()
    ids = torch.randint(0, 101, (sequences, 12), generator=torch.Generator().manual_seed(1))
    return model, [{"input_ids": b} for b in ids.split(sequences // 8)]


def _bert() -> tuple[nn.Module, list[dict[str, torch.Tensor]]]:
    """A seeded 2-layer BERT and 8 batches of 16 token sequences, a third of them padded."""
    import transformers

    torch.manual_seed(0)
    cfg = transformers.BertConfig(
        vocab_size=100, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=128, max_position_embeddings=32,
    )  # fmt: skip
    model = transformers.BertModel(cfg).eval()
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1, 100, (128, 12), generator=g)
    mask = torch.ones_like(ids)
    mask[::3, 8:] = 0
    return model, [
        {"input_ids": i, "attention_mask": m} for i, m in zip(ids.split(16), mask.split(16))
    ]


class FailOnRank1(nn.Module):
    """The model, but its forward pass raises on rank 1 once statistics are collected."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net
        self.calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        if dist.get_rank() == 1 and self.calls > 3:
            raise ValueError("a planted failure on rank 1")
        return self.net(x)


def _run(scenario: str, rank: str, path: Path) -> None:
    """One scenario on this rank: its result or its error, written under ``path``."""
    torch.manual_seed(0)
    batches: list
    if scenario == "heads-query":
        model, batches = _llama()
    elif scenario == "experts-few":
        model, batches = _mixtral(experts=16, sequences=16)
    elif scenario.startswith("experts"):
        model, batches = _mixtral()
    elif scenario.startswith("heads"):
        model, batches = _bert()
    elif scenario == "hidden":
        model, batches = _gpt2()
    elif scenario in ("blocks-span", "blocks-stats"):
        import torchvision

        model = torchvision.models.resnet18().eval()
        g = torch.Generator().manual_seed(1)
        batches = list(torch.randn(128, 3, 32, 32, generator=g).split(16))
    else:
        x, _ = load_dataset("cifar10", "calib", limit=128).tensors
        batches = list(x.split(16))
        model = load_pretrained("resnet20-cifar10").eval()
    if scenario == "fail":
        model = FailOnRank1(model)
    from spectrim.calibration import sketch

    saved = sketch.SKETCH_FROM, sketch.MIN_SKETCH_ROWS
    if scenario == "sketch":
        sketch.SKETCH_FROM, sketch.MIN_SKETCH_ROWS = 32, 4
    try:
        small, report = spectrim.compress(model, batches, **SCENARIOS[scenario])  # type: ignore[arg-type]
        if scenario.startswith(("heads", "hidden", "experts")):  # it runs through its own code
            small(**batches[0])
    except Exception as exc:
        (path / f"{scenario}-rank{rank}.err").write_text(f"{type(exc).__name__}: {exc}")
    else:
        torch.save(
            {"state": small.state_dict(), "report": report.to_dict()},
            path / f"{scenario}-rank{rank}.pt",
        )
    finally:
        sketch.SKETCH_FROM, sketch.MIN_SKETCH_ROWS = saved


def main() -> None:
    scenarios, rank, world, init, out = sys.argv[1:6]
    world_i = int(world)
    torch.set_num_threads(1)
    if world_i > 1:
        dist.init_process_group(
            "gloo", init_method=f"file://{init}", rank=int(rank), world_size=world_i
        )
    try:
        for scenario in scenarios.split(","):
            _run(scenario, rank, Path(out))
    finally:
        if world_i > 1:
            dist.destroy_process_group()


if __name__ == "__main__":
    main()
