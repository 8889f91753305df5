"""A sparse CPU execution path for sparsified Linear layers, used only where it is faster.

:class:`SparseLinear` holds its weight in CSR form (``torch.sparse_csr_tensor``) and
computes ``y = x Wᵀ + b`` as ``(W_csr @ xᵀ)ᵀ``.  Whether that beats the dense GEMM depends
on the density, the shape, the number of rows per call and the CPU: on this project's
2-core x86 machine dense wins at moderate sparsity (``benchmarks/sparse_latency.py``
measures the crossover).  :func:`to_sparse_execution` therefore *measures*, per layer, on the
inputs the layer really receives, and swaps only the layers where the sparse product is
faster by at least ``min_speedup``.

Example::

    >>> import torch, torch.nn as nn
    >>> lin = nn.Linear(64, 32)
    >>> with torch.no_grad():
    ...     lin.weight[torch.rand(32, 64) < 0.95] = 0.0
    >>> sp = SparseLinear.from_linear(lin)
    >>> x = torch.randn(5, 64)
    >>> bool(torch.allclose(sp(x), lin(x), atol=1e-5))
    True
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
import torch.utils.benchmark as tbench
from torch import nn

from spectrim.graph.trace import call_model

__all__ = ["SparseLinear", "to_sparse_execution"]


class SparseLinear(nn.Module):
    """``nn.Linear`` with a CSR weight (inference only; ``weight`` stays readable dense)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        super().__init__()
        self.in_features = int(weight.shape[1])
        self.out_features = int(weight.shape[0])
        with warnings.catch_warnings():  # "Sparse CSR tensor support is in beta state"
            warnings.simplefilter("ignore", UserWarning)
            csr = weight.detach().to_sparse_csr()
        self.register_buffer("weight_csr", csr, persistent=False)
        self.bias = (
            None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)
        )

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> SparseLinear:
        return cls(linear.weight, linear.bias)

    weight_csr: torch.Tensor

    @property
    def weight(self) -> torch.Tensor:
        return self.weight_csr.to_dense()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        rows = x.reshape(-1, shape[-1])
        y = torch.sparse.mm(self.weight_csr, rows.t()).t()
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        nnz = int(self.weight_csr.values().numel())
        dens = nnz / max(self.in_features * self.out_features, 1)
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, density={dens:.3f}"
        )


def _median_seconds(fn: Any, x: torch.Tensor, min_run_time: float) -> float:
    timer = tbench.Timer(
        stmt="fn(x)", globals={"fn": fn, "x": x}, num_threads=torch.get_num_threads()
    )
    return float(timer.blocked_autorange(min_run_time=min_run_time).median)


def to_sparse_execution(
    model: nn.Module,
    example: Any,
    *,
    min_speedup: float = 1.1,
    max_density: float = 0.5,
    min_run_time: float = 0.05,
) -> dict[str, dict[str, float]]:
    """Swap, in place, every ``nn.Linear`` whose measured CSR product on its own input (from
    one forward pass on ``example``) is at least ``min_speedup`` times faster than dense;
    return per Linear ``{density, dense_s, sparse_s, speedup, swapped}``.

    Layers denser than ``max_density`` are not tried (CSR stores an index per value).
    """
    inputs: dict[str, torch.Tensor] = {}
    handles = []
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear):

            def hook(mod: nn.Module, args: tuple[Any, ...], name: str = name) -> None:
                inputs.setdefault(name, args[0].detach())

            handles.append(module.register_forward_pre_hook(hook))
    try:
        with torch.no_grad():
            call_model(model, example)
    finally:
        for h in handles:
            h.remove()
    out: dict[str, dict[str, float]] = {}
    modules = dict(model.named_modules())
    for name, x in inputs.items():
        lin = modules[name]
        assert isinstance(lin, nn.Linear)
        density = float((lin.weight != 0).float().mean())
        row: dict[str, float] = {"density": density, "swapped": 0.0}
        if density <= max_density:
            sparse = SparseLinear.from_linear(lin)
            with torch.no_grad():
                dense_s = _median_seconds(lin, x, min_run_time)
                sparse_s = _median_seconds(sparse, x, min_run_time)
            row.update(dense_s=dense_s, sparse_s=sparse_s, speedup=dense_s / sparse_s)
            if dense_s / sparse_s >= min_speedup:
                parent_name, _, attr = name.rpartition(".")
                parent = modules[parent_name] if parent_name else model
                setattr(parent, attr, sparse)
                row["swapped"] = 1.0
        out[name] = row
    return out
