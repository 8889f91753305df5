"""Mixture-of-experts layers as sets of expert FFNs: where they are, how to narrow them.

Hugging Face's MoE families (Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE, DeepSeek-V3, GraniteMoE,
PhiMoE) hold all experts of a layer in one module with two 3-D parameters,
``gate_up_proj`` (``experts × 2·inter × hidden``: each expert's gate rows, then its up
rows) and ``down_proj`` (``experts × hidden × inter``), and run expert ``e`` on the tokens
routed to it as ``down[e] · (act(gate[e] x) ⊙ up[e] x)``, scaled by the router's weight.
The channel analysis cannot see through that (the experts are indexed inside one module),
so the neurons of the experts are their own kind of unit: an expert's neuron ``j`` is
row ``j`` of its gate, row ``inter + j`` of its up projection and column ``j`` of its down
projection, and removing it (or folding its output into the kept ones through ``down``)
is exact where the kept neurons reproduce it.  Every expert of a layer must keep the same
number of neurons (the parameters are 3-D); each keeps its own.

Example::

    >>> import torch
    >>> from transformers import MixtralConfig, MixtralForCausalLM
    >>> cfg = MixtralConfig(vocab_size=50, hidden_size=16, intermediate_size=12,
    ...                     num_hidden_layers=1, num_attention_heads=2,
    ...                     num_key_value_heads=1, num_local_experts=4)
    >>> block, = find_experts(MixtralForCausalLM(cfg))
    >>> block.name, block.experts, block.width, block.hidden
    ('model.layers.0.mlp.experts', 4, 12, 16)
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from spectrim.graph.modules import set_param

__all__ = ["ExpertBlock", "find_experts", "is_experts_module", "row_step"]


@dataclass
class ExpertBlock:
    """The experts of one MoE layer.

    Attributes:
        name: module path of the experts module (``….mlp.experts``).
        experts: how many experts it holds.
        width: neurons per expert (``intermediate_dim``), as the layer holds them now.
        hidden: the model's width, the experts' input and output.
    """

    name: str
    experts: int
    width: int
    hidden: int

    def module(self, model: nn.Module) -> nn.Module:
        """The experts module in ``model``."""
        return model.get_submodule(self.name)

    def weights(self, model: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
        """``gate_up_proj`` (``experts × 2·width × hidden``) and ``down_proj``
        (``experts × hidden × width``)."""
        mod = self.module(model)
        gate_up, down = mod.gate_up_proj, mod.down_proj
        assert isinstance(gate_up, torch.Tensor) and isinstance(down, torch.Tensor)
        return gate_up, down

    def prune(self, model: nn.Module, keep: np.ndarray, folds: Sequence[np.ndarray | None]) -> None:
        """Keep neurons ``keep[e]`` (sorted, the same count ``k`` for every expert) of each
        expert ``e``; ``folds[e]``, if given, is the correction ``B`` (``width × k``) with
        ``h ≈ B h_kept``, folded into the expert's down projection (``down ← down·B``).
        In place."""
        keep = np.asarray(keep, dtype=np.int64)
        if keep.ndim != 2 or keep.shape[0] != self.experts or len(folds) != self.experts:
            raise ValueError(
                f"experts '{self.name}': expected {self.experts} rows of kept neurons and "
                f"as many folds, got {keep.shape} and {len(folds)}"
            )
        k = keep.shape[1]
        if k < 1 or keep.min() < 0 or keep.max() >= self.width:
            raise ValueError(f"experts '{self.name}': kept neurons out of [0, {self.width})")
        mod = self.module(model)
        gate_up, down = (t.data for t in self.weights(model))
        new_gate_up, new_down = [], []
        for e in range(self.experts):
            idx = torch.as_tensor(keep[e], device=gate_up.device)
            new_gate_up.append(torch.cat([gate_up[e, idx], gate_up[e, self.width + idx]]))
            fold = folds[e]
            if fold is None:
                new_down.append(down[e][:, idx])
            else:
                b = torch.as_tensor(fold, dtype=torch.float64, device=down.device)
                if b.shape != (self.width, k):
                    raise ValueError(
                        f"experts '{self.name}': expert {e}'s correction has shape "
                        f"{tuple(b.shape)}, expected {(self.width, k)}"
                    )
                new_down.append((down[e].double() @ b).to(down.dtype))
        set_param(mod, "gate_up_proj", torch.stack(new_gate_up))
        set_param(mod, "down_proj", torch.stack(new_down))
        self.width = k
        self.sync(model)

    def sync(self, model: nn.Module) -> None:
        """Write the width into the attribute the layer holds it in (``intermediate_dim``),
        e.g. after its weights were loaded at a pruned size."""
        mod = self.module(model)
        if isinstance(getattr(mod, "intermediate_dim", None), int):
            setattr(mod, "intermediate_dim", self.width)  # noqa: B010 (typed as a Tensor)


def is_experts_module(module: nn.Module) -> bool:
    """Whether ``module`` holds a MoE layer's experts in the layout above: exactly the two
    3-D parameters, an ``act_fn``; the width they read and the one they write may differ
    (their residual stream half narrowed)."""
    params = dict(module.named_parameters(recurse=False))
    gate_up, down = params.get("gate_up_proj"), params.get("down_proj")
    if set(params) != {"gate_up_proj", "down_proj"} or gate_up is None or down is None:
        return False
    return (
        gate_up.dim() == down.dim() == 3
        and callable(getattr(module, "act_fn", None))
        and gate_up.shape[0] == down.shape[0]
        and gate_up.shape[1] == 2 * down.shape[2]
    )


def row_step(module: nn.Module) -> int:
    """Elements per 16 bytes of an experts module's weights (4 float32, 8 bfloat16): Hugging
    Face's default experts kernel (``torch._grouped_mm``) needs every row of them to be a
    multiple of 16 bytes, so every width they hold (neurons, stream coordinates) must be a
    multiple of this, or the model no longer runs."""
    down: Any = module.down_proj
    size = int(down.element_size())
    return 16 // size if 16 % size == 0 else 1


def _block(path: str, module: nn.Module) -> ExpertBlock | None:
    """The layout above with one width in and out, or ``None``."""
    if not is_experts_module(module):
        return None
    gate_up: Any = module.gate_up_proj
    down: Any = module.down_proj
    experts, inter2, hidden = gate_up.shape
    if down.shape[1] != hidden:
        return None  # e.g. gpt-oss: transposed, with biases and a clamped activation
    return ExpertBlock(path, int(experts), int(inter2 // 2), int(hidden))


def find_experts(model: nn.Module) -> list[ExpertBlock]:
    """Every MoE experts module of ``model`` in the layout above, in module order."""
    out = []
    for path, module in model.named_modules():
        block = _block(path, module)
        if block is not None:
            out.append(block)
    return out
