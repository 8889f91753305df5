"""One registry of what a module type means to spectrim.

A :class:`ModuleKind` says, for one module type, which size attributes describe it (what
the manifest records and reloads), how channel surgery slices its channels and which
attribute holds the input width a fold changes, and, for weight-carrying types, how to
read the weight as a matrix with one row per output unit (``out × cols``), how to write
such a matrix back and how to turn the module's input into the rows ``X`` whose Gram
``XᵀX`` matches those columns (a conv's unfolded patches).  Surgery, weight
sparsification, its statistics, ``analyze`` and the manifest read this table instead of
testing types, so supporting a new layer is one registration::

    >>> import torch, torch.nn as nn
    >>> from spectrim.graph.modules import weight_kind
    >>> conv = nn.Conv2d(3, 8, 3, padding=1)
    >>> kind = weight_kind(conv)
    >>> kind.matrix(conv).shape
    torch.Size([8, 27])
    >>> kind.input_rows(conv, torch.randn(2, 3, 5, 5)).shape  # 2·5·5 patches of 3·3·3
    torch.Size([50, 27])

Registered here: ``nn.Linear``, ``nn.Conv1d/2d/3d`` (the Gram for 1-D and 2-D ones with
zero padding and ``groups=1``), transposed convs, BatchNorm / InstanceNorm, ``nn.Embedding``,
``nn.PReLU``, ``nn.LayerNorm``, ``nn.GroupNorm`` and Hugging Face
``transformers.pytorch_utils.Conv1D`` (GPT-2's transposed linear) once transformers is
imported.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "ModuleKind",
    "WeightKind",
    "module_kind",
    "register_module_kind",
    "register_weight_kind",
    "size_attribute_names",
    "weight_kind",
    "weight_modules",
]


@dataclass(frozen=True)
class ModuleKind:
    """What one module type means to spectrim.

    Attributes:
        name: short name for reports (``"linear"``, ``"conv2d"``, ...).
        matrix: the weight as an ``out × cols`` matrix (a view where possible); ``None``
            for types without a weight matrix (norms, embeddings).
        set_matrix: write such a matrix back into the weight, in place.
        input_rows: ``(module, input) -> X`` with ``X @ matrix(module).T`` equal to the
            module's output without bias (rows: examples × positions); ``None`` (or a
            function returning ``None``) when the input cannot be read that way (grouped
            convs): data-aware methods then skip the module.
        size_attributes: the attributes that record its sizes (for the manifest).
        slice: ``(module, idx, role)`` keeps the channels ``idx`` of a producer's outputs
            (``role="out"``) or of a passenger (``"chan"``: BatchNorm, depthwise filters).
        in_size: the attribute holding the input width that a fold into the module
            changes (``"in_features"``, ``"in_channels"``), for consumers.
    """

    name: str
    matrix: Callable[[nn.Module], torch.Tensor] | None = None
    set_matrix: Callable[[nn.Module, torch.Tensor], None] | None = None
    input_rows: Callable[[nn.Module, torch.Tensor], torch.Tensor | None] | None = None
    size_attributes: tuple[str, ...] = ()
    slice: Callable[[nn.Module, np.ndarray, str], None] | None = None
    in_size: str | None = None


@dataclass(frozen=True)
class WeightKind(ModuleKind):
    """A :class:`ModuleKind` whose ``matrix``, ``set_matrix`` and ``input_rows`` are set."""

    matrix: Callable[[nn.Module], torch.Tensor] = field(default=lambda m: m.weight)  # type: ignore[assignment]
    set_matrix: Callable[[nn.Module, torch.Tensor], None] = field(default=lambda m, v: None)  # type: ignore[assignment]
    input_rows: Callable[[nn.Module, torch.Tensor], torch.Tensor | None] = field(  # type: ignore[assignment]
        default=lambda m, x: None
    )


_KINDS: dict[type[nn.Module], ModuleKind] = {}
#: size attributes of types registered only once their package is imported
_LAZY_SIZE_NAMES = frozenset({"nf", "nx"})


def register_module_kind(module_type: type[nn.Module], kind: ModuleKind) -> None:
    """Register (or replace) what ``module_type`` (and its subclasses) means."""
    _KINDS[module_type] = kind


register_weight_kind = register_module_kind


def module_kind(module: nn.Module) -> ModuleKind | None:
    """The registered kind of ``module`` (nearest registered base class), or ``None``."""
    _register_optional()
    for cls in type(module).__mro__:
        kind = _KINDS.get(cls)
        if kind is not None:
            return kind
    return None


def weight_kind(module: nn.Module) -> WeightKind | None:
    """The kind of ``module`` if it carries a weight matrix spectrim can read, else ``None``."""
    kind = module_kind(module)
    return kind if isinstance(kind, WeightKind) else None


def size_attribute_names() -> frozenset[str]:
    """Every size attribute a registered type records (what a manifest may name)."""
    return frozenset(a for k in _KINDS.values() for a in k.size_attributes) | _LAZY_SIZE_NAMES


def weight_modules(model: nn.Module) -> Iterator[tuple[str, nn.Module, WeightKind]]:
    """``(name, module, kind)`` for every module with a registered weight kind."""
    for name, module in model.named_modules():
        kind = weight_kind(module)
        if kind is not None and isinstance(getattr(module, "weight", None), torch.Tensor):
            yield name, module, kind


def set_param(module: nn.Module, name: str, value: torch.Tensor) -> None:
    """Replace a parameter or buffer by ``value`` (a parameter stays a parameter)."""
    old = getattr(module, name)
    if isinstance(old, nn.Parameter):
        setattr(module, name, nn.Parameter(value.contiguous(), requires_grad=old.requires_grad))
    else:
        setattr(module, name, value.contiguous())


def index_along(t: torch.Tensor, dim: int, idx: np.ndarray) -> torch.Tensor:
    """``t`` restricted to the positions ``idx`` along ``dim``."""
    return t.index_select(dim, torch.as_tensor(idx, device=t.device))


def _set_size(module: nn.Module, attr: str, value: int) -> None:
    setattr(module, attr, value)  # nn.Module types its attributes as Tensor | Module


def _slice_rows(module: nn.Module, idx: np.ndarray) -> None:
    set_param(module, "weight", index_along(_weight(module).data, 0, idx))
    bias = getattr(module, "bias", None)
    if isinstance(bias, torch.Tensor):
        set_param(module, "bias", index_along(bias.data, 0, idx))


def _slice_linear(module: nn.Module, idx: np.ndarray, role: str) -> None:
    _slice_rows(module, idx)
    _set_size(module, "out_features", len(idx))


def _slice_conv(module: nn.Module, idx: np.ndarray, role: str) -> None:
    _slice_rows(module, idx)
    _set_size(module, "out_channels", len(idx))
    if role == "chan":  # depthwise: one filter per channel
        _set_size(module, "in_channels", len(idx))
        _set_size(module, "groups", len(idx))


def _slice_norm(module: nn.Module, idx: np.ndarray, role: str) -> None:
    for name in ("weight", "bias", "running_mean", "running_var"):
        t = getattr(module, name, None)
        if isinstance(t, torch.Tensor):
            set_param(module, name, index_along(t.data, 0, idx))
    _set_size(module, "num_features", len(idx))


def _slice_embedding(module: nn.Module, idx: np.ndarray, role: str) -> None:
    set_param(module, "weight", index_along(_weight(module).data, 1, idx))
    _set_size(module, "embedding_dim", len(idx))


def _slice_prelu(module: nn.Module, idx: np.ndarray, role: str) -> None:
    set_param(module, "weight", index_along(_weight(module).data, 0, idx))
    _set_size(module, "num_parameters", len(idx))


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
register_module_kind(
    nn.Linear,
    WeightKind(
        "linear",
        _weight,
        _set_flat,
        _linear_rows,
        ("in_features", "out_features"),
        _slice_linear,
        "in_features",
    ),
)
for _cls, _name, _rows in (
    (nn.Conv1d, "conv1d", _conv_rows),
    (nn.Conv2d, "conv2d", _conv_rows),
    (nn.Conv3d, "conv3d", _no_rows),
):
    register_module_kind(
        _cls,
        WeightKind(
            _name,
            lambda m: _weight(m).flatten(1),
            _set_flat,
            _rows,
            _CONV_SIZES,
            _slice_conv,
            "in_channels",
        ),
    )
for _tcls in (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d):
    register_module_kind(_tcls, ModuleKind("conv-transpose", size_attributes=_CONV_SIZES))
register_module_kind(
    nn.modules.batchnorm._NormBase,  # BatchNorm*, InstanceNorm*
    ModuleKind("norm", size_attributes=("num_features",), slice=_slice_norm),
)
register_module_kind(
    nn.Embedding,
    ModuleKind("embedding", size_attributes=("embedding_dim",), slice=_slice_embedding),
)
register_module_kind(
    nn.PReLU, ModuleKind("prelu", size_attributes=("num_parameters",), slice=_slice_prelu)
)
register_module_kind(nn.LayerNorm, ModuleKind("layernorm", size_attributes=("normalized_shape",)))
register_module_kind(
    nn.GroupNorm, ModuleKind("groupnorm", size_attributes=("num_groups", "num_channels"))
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

    register_module_kind(
        conv1d,
        WeightKind("hf-conv1d", lambda m: _weight(m).t(), set_t, _linear_rows, ("nf", "nx")),
    )
