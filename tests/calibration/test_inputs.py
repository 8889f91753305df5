"""Input Grams for weight sparsification, against Grams of the captured rows."""

from __future__ import annotations

import copy

import torch
from torch import nn

from spectrim.calibration.inputs import (
    calls_per_module,
    execution_order,
    input_gram_at,
    input_grams,
)


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(4, 4, 3, groups=2),
        nn.Flatten(),
        nn.Linear(4 * 4 * 4, 5),
    ).eval()


def test_input_grams_match_the_unfolded_rows() -> None:
    net = _net()
    batches = [torch.randn(3, 3, 6, 6) for _ in range(2)]
    grams = input_grams(net, batches, ["0", "2", "4"])
    assert "2" not in grams  # grouped conv: no rows
    x = torch.cat(batches).double()
    rows = torch.nn.functional.unfold(x, 3, padding=1).transpose(1, 2).reshape(-1, 27)
    torch.testing.assert_close(grams["0"].gram, rows.T @ rows, rtol=1e-5, atol=1e-4)
    h = net[:4](torch.cat(batches)).double()
    torch.testing.assert_close(grams["4"].gram, h.T @ h, rtol=1e-5, atol=1e-4)
    assert grams["0"].count == 6 * 36


def test_input_gram_at_cross_term_and_order() -> None:
    net = _net()
    sparse = copy.deepcopy(net)
    with torch.no_grad():
        sparse[0].weight[:, :, 0] = 0.0
    batches = [torch.randn(4, 3, 6, 6)]
    acc = input_gram_at(sparse, "4", batches, original=net)
    assert acc is not None
    xs = sparse[:4](batches[0]).double()
    xo = net[:4](batches[0]).double()
    torch.testing.assert_close(acc.gram, xs.T @ xs, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(acc.cross, xs.T @ xo, rtol=1e-5, atol=1e-4)
    assert execution_order(net, batches[0], ["4", "0", "2"]) == ["0", "2", "4"]
    assert calls_per_module(net, batches[0], ["0"]) == {"0": 1}
