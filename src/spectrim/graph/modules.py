"""One registry of what a weight-carrying module type means to spectrim.

A :class:`WeightKind` says, for one module type, how to read its weight as a matrix with
one row per output unit (``out × cols``), how to write such a matrix back, how to turn the
module's input into the rows ``X`` whose Gram ``XᵀX`` matches those columns (a conv's
unfolded patches), and which size attributes describe it.  Weight sparsification, its
statistics, the report and the saved manifest read this table instead of testing types,
so supporting a new layer is one registration::

    >>> import torch, torch.nn as nn
    >>> from spectrim.graph.modules import weight_kind
    >>> conv = nn.Conv2d(3, 8, 3, padding=1)
    >>> kind = weight_kind(conv)
    >>> kind.matrix(conv).shape
    torch.Size([8, 27])
    >>> kind.input_rows(conv, torch.randn(2, 3, 5, 5)).shape  # 2·5·5 patches of 3·3·3
    torch.Size([50, 27])

Registered here: ``nn.Linear``, ``nn.Conv1d``, ``nn.Conv2d`` (any groups, zero padding
for the Gram), ``nn.Conv3d`` (no Gram: data-free methods only) and Hugging Face
``transformers.pytorch_utils.Conv1D`` (GPT-2's transposed linear), when transformers is
installed.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "WeightKind",
    "register_weight_kind",
    "weight_kind",
    "weight_modules",
]


@dataclass(frozen=True)
class WeightKind:
    """How spectrim reads and writes one module type's weight.

    Attributes:
        name: short name for reports (``"linear"``, ``"conv2d"``, ...).
        matrix: the weight as an ``out × cols`` matrix (a view where possible).
        set_matrix: write such a matrix back into the weight, in place.
        input_rows: ``(module, input) -> X`` with ``X @ matrix(module).T`` equal to the
            module's output without bias (rows: examples × positions); ``None`` when the
            module's inputs cannot be read that way (grouped convs): data-aware methods
            then skip it.
        size_attributes: the attributes that record its sizes (for the manifest).
    """

    name: str
    matrix: Callable[[nn.Module], torch.Tensor]
    set_matrix: Callable[[nn.Module, torch.Tensor], None]
    input_rows: Callable[[nn.Module, torch.Tensor], torch.Tensor | None]
    size_attributes: tuple[str, ...] = ()


_KINDS: dict[type[nn.Module], WeightKind] = {}


def register_weight_kind(module_type: type[nn.Module], kind: WeightKind) -> None:
    """Register (or replace) what ``module_type`` (and its subclasses) means."""
    _KINDS[module_type] = kind


def weight_kind(module: nn.Module) -> WeightKind | None:
    """The registered kind of ``module`` (nearest registered base class), or ``None``."""
    _register_optional()
    for cls in type(module).__mro__:
        kind = _KINDS.get(cls)
        if kind is not None:
            return kind
    return None


def weight_modules(model: nn.Module) -> Iterator[tuple[str, nn.Module, WeightKind]]:
    """``(name, module, kind)`` for every module with a registered weight kind."""
    for name, module in model.named_modules():
        kind = weight_kind(module)
        if kind is not None and isinstance(getattr(module, "weight", None), torch.Tensor):
            yield name, module, kind


def _weight(module: nn.Module) -> torch.Tensor:
    w = module.weight
    assert isinstance(w, torch.Tensor)
    return w


def _set_flat(module: nn.Module, m: torch.Tensor) -> None:
    w = _weight(module)
    with torch.no_grad():
        w.copy_(m.reshape(w.shape).to(dtype=w.dtype, device=w.device))


def _linear_rows(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return x.reshape(-1, x.shape[-1])


def _conv_rows(module: nn.Module, x: torch.Tensor) -> torch.Tensor | None:
    conv = module
    assert isinstance(conv, (nn.Conv1d, nn.Conv2d))
    if conv.groups != 1 or conv.padding_mode != "zeros":
        return None
    one_d = isinstance(conv, nn.Conv1d)
    kernel = (1, *conv.kernel_size) if one_d else conv.kernel_size
    stride = (1, *conv.stride) if one_d else conv.stride
    dilation = (1, *conv.dilation) if one_d else conv.dilation
    padding = conv.padding
    if isinstance(padding, str):
        if padding == "valid":
            padding = (0,) * len(conv.kernel_size)
        else:  # "same": symmetric only for odd dilated kernels
            total = [d * (k - 1) for d, k in zip(conv.dilation, conv.kernel_size, strict=True)]
            if any(t % 2 for t in total):
                return None
            padding = tuple(t // 2 for t in total)
    pad = (0, *padding) if one_d else padding
    xx = x.unsqueeze(-2) if one_d else x
    if xx.dim() == 3:  # unbatched
        xx = xx.unsqueeze(0)
    patches = F.unfold(xx, kernel, dilation=dilation, padding=pad, stride=stride)
    return patches.transpose(1, 2).reshape(-1, patches.shape[1])


def _no_rows(module: nn.Module, x: torch.Tensor) -> torch.Tensor | None:
    return None


_CONV_SIZES = ("in_channels", "out_channels", "groups")
register_weight_kind(
    nn.Linear,
    WeightKind(
        "linear",
        _weight,
        _set_flat,
        _linear_rows,
        ("in_features", "out_features"),
    ),
)
for _cls, _name, _rows in (
    (nn.Conv1d, "conv1d", _conv_rows),
    (nn.Conv2d, "conv2d", _conv_rows),
    (nn.Conv3d, "conv3d", _no_rows),
):
    register_weight_kind(
        _cls,
        WeightKind(_name, lambda m: _weight(m).flatten(1), _set_flat, _rows, _CONV_SIZES),
    )

_optional_done = [False]


def _register_optional() -> None:
    """Types from optional packages, registered once their package is imported (a model
    of that package cannot exist before), so spectrim never imports them itself."""
    if _optional_done[0]:
        return
    utils = sys.modules.get("transformers.pytorch_utils")
    if utils is None:
        return
    _optional_done[0] = True
    conv1d = getattr(utils, "Conv1D", None)
    if conv1d is None:
        return

    def set_t(module: nn.Module, m: torch.Tensor) -> None:
        with torch.no_grad():
            _weight(module).copy_(m.t().to(dtype=_weight(module).dtype))

    register_weight_kind(
        conv1d,
        WeightKind("hf-conv1d", lambda m: _weight(m).t(), set_t, _linear_rows, ("nf", "nx")),
    )
