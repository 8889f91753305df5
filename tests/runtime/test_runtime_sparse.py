"""The CSR execution path: same outputs, swapped only where measured faster."""

from __future__ import annotations

import math

import torch
from torch import nn

from spectrim.runtime import SparseLinear, to_sparse_execution


def _sparse_mlp(density: float) -> nn.Module:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 8)).eval()
    with torch.no_grad():
        for lin in (net[0], net[2]):
            lin.weight[torch.rand(lin.weight.shape) >= density] = 0.0
    return net


def test_sparse_linear_matches_dense_on_3d_inputs() -> None:
    net = _sparse_mlp(0.1)
    sp = SparseLinear.from_linear(net[0])
    x = torch.randn(2, 5, 64)
    torch.testing.assert_close(sp(x), net[0](x), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(sp.weight, net[0].weight)
    assert "density=0.1" in repr(sp)


def test_to_sparse_execution_swaps_by_measurement() -> None:
    net = _sparse_mlp(0.1)
    x = torch.randn(16, 64)
    ref = net(x)
    none = to_sparse_execution(net, x, min_speedup=math.inf, min_run_time=0.01)
    assert all(r["swapped"] == 0.0 for r in none.values())
    assert all(isinstance(m, nn.Linear) for m in (net[0], net[2]))
    rows = to_sparse_execution(net, x, min_speedup=0.0, min_run_time=0.01)
    assert set(rows) == {"0", "2"} and all(r["speedup"] > 0 for r in rows.values())
    assert isinstance(net[0], SparseLinear) and isinstance(net[2], SparseLinear)
    torch.testing.assert_close(net(x), ref, rtol=1e-5, atol=1e-5)
    dense = _sparse_mlp(0.9)
    rows = to_sparse_execution(dense, x, min_speedup=0.0, min_run_time=0.01)
    assert rows["0"]["swapped"] == 0.0 and "speedup" not in rows["0"]  # too dense to try
