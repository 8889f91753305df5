"""Memory layout of spectrim's internal passes over a model.

spectrim runs its calibration passes (statistics, then the compressed network over the
fitted share) on its own copy of the model, so it may pick the memory layout that runs
fastest.  On CPU, oneDNN convolutions on ``channels_last`` (NHWC) tensors skip the
reorders that NCHW tensors pay at every layer: ResNet-56 runs 1000 CIFAR images in about
0.8 of its NCHW time, the half-width one 256 images in 0.21 s against 0.30 s.  A model is
only switched after it has reproduced its NCHW outputs in NHWC on the calibration example
(some models ``view`` activations in ways only a contiguous tensor allows), and the
returned model has the layout of the user's, stride for stride.

Example::

    >>> import torch, torch.nn as nn
    >>> net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 2))
    >>> x = torch.randn(2, 3, 8, 8)
    >>> formats = memory_formats(net)
    >>> to_channels_last(net, x)  # reproduces the outputs, so switched
    True
    >>> net[0].weight.is_contiguous(memory_format=torch.channels_last)
    True
    >>> restore_formats(net, formats)
    >>> net[0].weight.is_contiguous()
    True
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from spectrim.graph.trace import model_outputs
from spectrim.graph.verify import same_outputs

__all__ = [
    "channels_last_batch",
    "make_channels_last",
    "memory_formats",
    "restore_formats",
    "suits_channels_last",
    "to_channels_last",
]


def suits_channels_last(model: nn.Module, batches: Sequence[Any]) -> bool:
    """Whether ``model`` has 2-D convolutions and every batch is one 4-D float tensor."""
    if not any(isinstance(m, nn.Conv2d) for m in model.modules()):
        return False
    return all(
        isinstance(b, torch.Tensor) and b.dim() == 4 and b.is_floating_point() for b in batches
    )


def memory_formats(model: nn.Module) -> dict[str, bool]:
    """For every 4-D parameter and buffer: whether it is stored ``channels_last``."""
    out: dict[str, bool] = {}
    for name, t in [*model.named_parameters(), *model.named_buffers()]:
        if t.dim() == 4:
            out[name] = _is_channels_last(t)
    return out


def _strides(t: torch.Tensor, fmt: torch.memory_format) -> tuple[int, ...]:
    """The strides ``t`` would have in layout ``fmt`` (exact: a ``(C_out, 1, k, k)`` weight
    is contiguous in both layouts, but the kernels oneDNN picks, so the rounding, follow
    its strides)."""
    return torch.empty(t.shape, dtype=t.dtype, device="meta", memory_format=fmt).stride()


def _is_channels_last(t: torch.Tensor) -> bool:
    cl = _strides(t, torch.channels_last)
    return t.stride() == cl and cl != _strides(t, torch.contiguous_format)


def restore_formats(model: nn.Module, formats: dict[str, bool]) -> None:
    """Give every 4-D tensor of ``model`` the layout :func:`memory_formats` recorded for
    its name (contiguous for names it did not record), in place."""
    for name, t in [*model.named_parameters(), *model.named_buffers()]:
        if t.dim() != 4:
            continue
        fmt = torch.channels_last if formats.get(name, False) else torch.contiguous_format
        if t.stride() != _strides(t, fmt):
            t.data = t.data.clone(memory_format=fmt)


def make_channels_last(model: nn.Module) -> None:
    """Give every 4-D parameter and buffer of ``model`` the ``channels_last`` layout, in
    place.  ``model.to(memory_format=torch.channels_last)`` also converts the 5-D ones and
    fails on them (timm's ``LambdaLayer`` holds a 5-D position table); these stay as
    they are."""
    for t in [*model.parameters(), *model.buffers()]:
        if t.dim() == 4 and t.stride() != _strides(t, torch.channels_last):
            t.data = t.data.clone(memory_format=torch.channels_last)


def channels_last_batch(batch: Any) -> Any:
    """A ``channels_last`` copy of a 4-D tensor batch; any other batch unchanged."""
    if isinstance(batch, torch.Tensor) and batch.dim() == 4:
        return batch.contiguous(memory_format=torch.channels_last)
    return batch


def to_channels_last(
    model: nn.Module,
    example: torch.Tensor,
    rtol: float = 1e-4,
    ref: list[torch.Tensor] | None = None,
) -> bool:
    """Switch ``model`` (in place, eval mode) to ``channels_last`` if it then reproduces
    its outputs on ``example`` (to ``rtol`` of their largest magnitude, same shapes, no
    error); otherwise leave its layout as it was.  Returns whether it switched.

    ``ref``: the model's outputs on ``example`` if the caller has them (e.g. from the
    trace), else they are computed.
    """
    formats = memory_formats(model)
    if not ref:
        ref = model_outputs(model, example)
    make_channels_last(model)
    try:
        out = model_outputs(model, example.contiguous(memory_format=torch.channels_last))
        same = same_outputs(ref, out, rtol)
    except Exception:
        same = False
    if not same:
        restore_formats(model, formats)
    return same
