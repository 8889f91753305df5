"""Small random networks for property tests: MLPs and CNNs with random widths, residual
adds, concatenations, BatchNorm and tied weights, described by JSON-able specs (so a saved
folder can rebuild them from ``{"class": ..., "kwargs": spec}``)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

__all__ = ["RandomNet", "random_spec"]


class RandomNet(nn.Module):
    """``kind`` "mlp" (inputs ``(N, in_dim)``) or "cnn" (inputs ``(N, in_dim, 6, 6)``).

    ``blocks`` is a list of ``{"op": "dense" | "residual" | "concat" | "tied", ...}``.
    """

    def __init__(self, kind: str, in_dim: int, blocks: list[dict[str, Any]], classes: int) -> None:
        super().__init__()
        self.kind = kind
        self.blocks = nn.ModuleList()
        self.ops = [b["op"] for b in blocks]
        width = in_dim
        for b in blocks:
            block = nn.Module()
            if b["op"] == "dense":
                block.a = self._layer(width, b["width"])
                block.bn = self._bn(b["width"]) if b.get("bn") else nn.Identity()
                width = b["width"]
            elif b["op"] == "residual":
                block.a = self._layer(width, b["width"])
                block.bn = self._bn(b["width"]) if b.get("bn") else nn.Identity()
                block.b = self._layer(b["width"], width)
            elif b["op"] == "concat":
                block.a = self._layer(width, b["width"])
                block.b = self._layer(width, b["width2"])
                width = b["width"] + b["width2"]
            elif b["op"] == "tied":
                block.a = self._layer(width, width)
                block.b = self._layer(width, width)
                block.b.weight = block.a.weight
            else:  # pragma: no cover - specs come from random_spec
                raise ValueError(f"unknown block {b}")
            self.blocks.append(block)
        self.head = nn.Linear(width, classes)

    def _layer(self, cin: int, cout: int) -> nn.Module:
        if self.kind == "mlp":
            return nn.Linear(cin, cout)
        return nn.Conv2d(cin, cout, 3, padding=1)

    def _bn(self, c: int) -> nn.Module:
        bn = nn.BatchNorm1d(c) if self.kind == "mlp" else nn.BatchNorm2d(c)
        with torch.no_grad():  # non-trivial eval statistics
            bn.running_mean.uniform_(-0.2, 0.2)
            bn.running_var.uniform_(0.5, 1.5)
        return bn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for op, block in zip(self.ops, self.blocks):
            if op == "dense":
                x = torch.relu(block.bn(block.a(x)))
            elif op == "residual":
                x = x + block.b(torch.relu(block.bn(block.a(x))))
            elif op == "concat":
                x = torch.cat([torch.relu(block.a(x)), torch.tanh(block.b(x))], dim=1)
            else:
                x = torch.relu(block.b(torch.relu(block.a(x))))
        if self.kind == "cnn":
            x = torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1)
        return self.head(x)

    def example(self, n: int, generator: torch.Generator) -> torch.Tensor:
        width = self.blocks[0].a.in_features if self.kind == "mlp" else self.blocks[0].a.in_channels
        shape = (n, width) if self.kind == "mlp" else (n, width, 6, 6)
        return torch.randn(*shape, generator=generator)


def random_spec(rng: Any) -> dict[str, Any]:
    """A random spec from ``rng`` (``random.Random`` or hypothesis' ``st.randoms()``)."""
    kind = rng.choice(["mlp", "cnn"])
    blocks = []
    for _ in range(rng.randint(1, 4)):
        op = rng.choice(["dense", "dense", "residual", "concat", "tied"])
        b: dict[str, Any] = {"op": op}
        if op in ("dense", "residual", "concat"):
            b["width"] = rng.randint(2, 24)
        if op == "concat":
            b["width2"] = rng.randint(2, 12)
        if op in ("dense", "residual"):
            b["bn"] = rng.random() < 0.5
        blocks.append(b)
    return {
        "kind": kind,
        "in_dim": rng.randint(2, 8) if kind == "mlp" else rng.randint(1, 3),
        "blocks": blocks,
        "classes": rng.randint(2, 5),
    }
