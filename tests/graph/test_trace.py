"""The trace's reading of rows the model routes by its own activations (MoE experts)."""

from __future__ import annotations

import torch
from torch import nn

from spectrim.graph.trace import routed_modules, trace


class _TopOne(nn.Module):
    """Top-1 routing of each row to one of two expert FFNs held as modules, written back
    in place with ``index_add``, added to the stream, then a dense layer on the stream."""

    def __init__(self) -> None:
        super().__init__()
        self.router = nn.Linear(6, 2)
        self.experts = nn.ModuleList(
            nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 6)) for _ in range(2)
        )
        self.after = nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        choice = self.router(x).argmax(-1)
        out = torch.zeros_like(x)
        for e, expert in enumerate(self.experts):
            rows = (choice == e).nonzero().squeeze(1)
            out = out.index_add(0, rows, expert(x[rows]))
        return self.after(x + out)


class _Sorted(nn.Module):
    """Rows sorted by a score, a layer on the sorted rows, then put back in order with the
    inverse permutation and added to the stream (Hugging Face's grouped experts)."""

    def __init__(self) -> None:
        super().__init__()
        self.score, self.mix, self.after = nn.Linear(6, 1), nn.Linear(6, 6), nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        order = self.score(x).squeeze(-1).argsort()
        back = order.argsort()
        return self.after(x + self.mix(x[order])[back])


class _Masked(nn.Module):
    """Rows picked by the input's own mask (padding dropped), as the model is given it."""

    def __init__(self) -> None:
        super().__init__()
        self.ffn = nn.Linear(6, 3)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.ffn(x[mask.bool()])


def test_the_experts_a_router_feeds_are_routed_and_the_stream_after_them_is_not() -> None:
    torch.manual_seed(0)
    got = routed_modules(trace(_TopOne().eval(), torch.randn(32, 6)))
    experts = {f"experts.{e}.{i}" for e in range(2) for i in range(3)}
    assert set(got) == experts  # not the router, not the dense layer after the addition
    assert all(why == "function '__getitem__'" for why in got.values())


def test_rows_put_back_in_order_and_added_to_the_stream_are_not_routed() -> None:
    torch.manual_seed(0)
    assert routed_modules(trace(_Sorted().eval(), torch.randn(16, 6))) == {
        "mix": "function '__getitem__'"
    }


def test_rows_picked_by_the_inputs_alone_are_not_routed() -> None:
    mask = torch.tensor([1, 1, 0, 1, 0, 1, 1, 1])
    assert routed_modules(trace(_Masked().eval(), (torch.randn(8, 6), mask))) == {}
