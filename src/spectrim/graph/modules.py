"""One registry of what a module type means to spectrim.

A :class:`ModuleKind` says, for one module type, what role its channels play in the
channel analysis (consumer, producer, per-channel passenger, pass-through, opaque), the
axes of its weight and input, which size attributes describe it (what the manifest
records and reloads), how channel surgery slices its channels and which attribute holds
the input width a fold changes, the constructor arguments its weight's shape implies, and,
for weight-carrying types, how to read the weight as a matrix with one row per output unit
(``out × cols``), how to write such a matrix back and how to turn the module's input into
the rows ``X`` whose Gram ``XᵀX`` matches those columns (a conv's unfolded patches).  The
tracer (every registered type is one op), the channel analysis, calibration, surgery, the
sequential pass, the methods, the cost model, weight sparsification, ``analyze``, the
manifest and the TorchScript import read this table instead of testing types, so
supporting a new layer is one registration::

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
``nn.PReLU``, ``nn.LayerNorm``, ``nn.RMSNorm``, ``nn.GroupNorm``, activations, pooling,
softmax, ``nn.Flatten``, a few opaque layers (attention, RNNs, shuffles) and Hugging Face
``transformers.pytorch_utils.Conv1D`` (GPT-2's transposed linear: channel-pruned and
sparsified) once transformers is imported, and timm's weight-standardised convolutions
(``StdConv2d``, ``ScaledStdConv2d``: made plain ``Conv2d`` before the trace, see
:func:`make_plain`) once timm is imported.
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Protocol

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "ChannelRoles",
    "PLAIN_MARK",
    "ModuleKind",
    "StandardisedConv2d",
    "StandardisedConv2dSame",
    "WeightKind",
    "input_channel_axis",
    "linear_channels",
    "make_plain",
    "module_kind",
    "pad_same",
    "register_module_kind",
    "register_swap_class",
    "register_weight_kind",
    "size_attribute_names",
    "slice_outputs",
    "store_computed",
    "swap_classes",
    "type_kind",
    "weight_kind",
    "weight_modules",
]


class ChannelRoles(Protocol):
    """The channel analysis's primitives (:mod:`spectrim.graph.channels`) that a module's
    channel rule calls.  ``lab`` is the label of the module's first input (``None`` when
    it carries no channels); ``dim`` is the channel axis (negative counts from the end)."""

    def consumer(self, op: Any, lab: Any, dim: int) -> None:
        """The module contracts its input's channel axis ``dim`` (a Linear, a conv)."""

    def producer(self, op: Any, n: int, dim: int, pinned: str | None = None) -> None:
        """The module's output has ``n`` new channels on ``dim``."""

    def passenger(self, op: Any, lab: Any, dim: int = 1) -> None:
        """The module has per-channel parameters on ``dim`` (BatchNorm, depthwise)."""

    def passthrough(self, op: Any, lab: Any) -> None:
        """Channels pass through unchanged."""

    def opaque(self, op: Any, reason: str | None = None) -> None:
        """The module mixes channels in a way spectrim cannot follow: pin them."""

    def pin_inputs(self, op: Any, reason: str | None = None) -> None:
        """Pin the channels of the module's inputs."""

    def softmax_like(self, op: Any, lab: Any, d: int) -> None:
        """The module normalises over axis ``d``."""

    def flatten(self, op: Any, lab: Any, start: int, end: int) -> None:
        """The module flattens axes ``start`` … ``end``."""


#: ``(roles, op, module, lab)``: declare the module's channel role through ``roles``
ChannelRule = Callable[[ChannelRoles, Any, Any, Any], None]


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
        channels: the channel rule the channel analysis applies at the module (``None``:
            opaque, its channels are pinned).  Every registered type is traced as one op.
        weight_dims: ``(out, in)`` axes of the ``weight`` tensor (``(1, 0)`` for a
            transposed linear such as HF ``Conv1D``; an embedding's outputs are axis 1).
        input_axis: the channel axis of the module's input (``-1``: the last, as Linear).
        shape_args: ``(weight shape, known constructor args) -> constructor args`` the
            weight's shape implies (rebuilding a module from TorchScript).
        plain: ``module -> module``: an equivalent module of a plainer registered type,
            which :func:`make_plain` puts in its place before anything is traced (a
            weight-standardised convolution becomes a ``Conv2d`` holding the weight its
            forward computes).  ``None``: the module stays.
    """

    name: str
    matrix: Callable[[nn.Module], torch.Tensor] | None = None
    set_matrix: Callable[[nn.Module, torch.Tensor], None] | None = None
    input_rows: Callable[[nn.Module, torch.Tensor], torch.Tensor | None] | None = None
    size_attributes: tuple[str, ...] = ()
    slice: Callable[[nn.Module, np.ndarray, str], None] | None = None
    in_size: str | None = None
    channels: ChannelRule | None = None
    weight_dims: tuple[int, int] = (0, 1)
    input_axis: int = 1
    shape_args: Callable[[tuple[int, ...], Mapping[str, Any]], dict[str, Any]] | None = None
    plain: Callable[[nn.Module], nn.Module] | None = None


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


#: modules spectrim puts in place of the user's (rebuilt from a manifest by class name)
_SWAP_CLASSES: dict[str, type[nn.Module]] = {}


def register_swap_class(cls: type[nn.Module]) -> type[nn.Module]:
    """Class decorator: a module type compression may put into a model (it must have a
    ``spectrim_kwargs()`` method returning its JSON-able constructor arguments), so that
    :func:`spectrim.io.load_compressed` may rebuild it by name without running other code."""
    if not callable(getattr(cls, "spectrim_kwargs", None)):
        raise TypeError(f"{cls.__name__} has no spectrim_kwargs() method")
    _SWAP_CLASSES[f"{cls.__module__}.{cls.__qualname__}"] = cls
    return cls


def swap_classes() -> dict[str, type[nn.Module]]:
    """Registered swap classes by import path (:func:`register_swap_class`; importing
    :mod:`spectrim.graph` registers spectrim's own)."""
    return dict(_SWAP_CLASSES)


def register_module_kind(module_type: type[nn.Module], kind: ModuleKind) -> None:
    """Register (or replace) what ``module_type`` (and its subclasses) means."""
    _KINDS[module_type] = kind


register_weight_kind = register_module_kind


def type_kind(module_type: type) -> ModuleKind | None:
    """The registered kind of ``module_type`` (nearest registered base class), or ``None``."""
    _register_optional()
    for cls in module_type.__mro__:
        kind = _KINDS.get(cls)
        if kind is not None:
            return kind
    return None


def module_kind(module: nn.Module) -> ModuleKind | None:
    """The registered kind of ``module`` (nearest registered base class), or ``None``."""
    return type_kind(type(module))


def weight_kind(module: nn.Module) -> WeightKind | None:
    """The kind of ``module`` if it carries a weight matrix spectrim can read, else ``None``."""
    kind = module_kind(module)
    return kind if isinstance(kind, WeightKind) else None


def make_plain(model: nn.Module) -> list[str]:
    """Store every weight ``model`` computes in its forward, in place, so surgery can
    slice and fold it: a module whose type has a plain equivalent
    (:attr:`ModuleKind.plain`, e.g. a weight-standardised conv) is replaced by it, and
    parametrizations (``torch.nn.utils.parametrizations.weight_norm``, ``spectral_norm``,
    ...) and the older weight-norm / spectral-norm hooks are removed, leaving the tensor
    they computed (in eval mode: no power iteration).  Returns the paths changed.

    Example::

        >>> net = nn.Sequential(nn.utils.parametrizations.weight_norm(nn.Linear(3, 4)))
        >>> make_plain(net), type(net[0]).__name__
        (['0'], 'Linear')
    """
    training = model.training
    model.eval()
    done = [path for path, module in list(model.named_modules()) if store_computed(module)]
    for path, module in list(model.named_modules()):
        for name, child in list(module.named_children()):
            kind = module_kind(child)
            if kind is not None and kind.plain is not None:
                setattr(module, name, kind.plain(child))
                done.append(f"{path}.{name}" if path else name)
    model.train(training)
    return sorted(set(done), key=done.index)


#: set (``True``) on a module whose parametrizations or norm hooks
#: :func:`store_computed` removed: a saved manifest lists it, and loading makes the same
#: module of a fresh model plain before its weights are read
PLAIN_MARK = "_spectrim_stored_computed"


def store_computed(module: nn.Module) -> bool:
    """Remove ``module``'s own parametrizations and weight-/spectral-norm hooks, leaving
    the tensors they computed (marked :data:`PLAIN_MARK`); whether there were any."""
    from torch.nn.utils import parametrize
    from torch.nn.utils.spectral_norm import SpectralNorm, SpectralNormLoadStateDictPreHook
    from torch.nn.utils.weight_norm import WeightNorm

    found = False
    if parametrize.is_parametrized(module):
        # not parametrize.remove_parametrizations: it deletes the property from the class,
        # which a deep copy shares with the user's model (that would lose its weight)
        lists: Any = module.parametrizations
        with torch.no_grad():
            values = {name: getattr(module, name).detach().clone() for name in lists}
        trained = {
            name: any(isinstance(p, nn.Parameter) for p in lists[name].parameters(recurse=False))
            for name in lists
        }
        module.__class__ = parametrize.type_before_parametrizations(module)
        del module._modules["parametrizations"]
        for name, value in values.items():
            if trained[name]:
                module.register_parameter(name, nn.Parameter(value))
            else:
                module.register_buffer(name, value)
        found = True
    for hook in list(module._forward_pre_hooks.values()):
        if isinstance(hook, WeightNorm):
            torch.nn.utils.remove_weight_norm(module, hook.name)
            found = True
        elif isinstance(hook, SpectralNorm):
            torch.nn.utils.remove_spectral_norm(module, hook.name)
            # it leaves its load hook when torch wrapped it (_WrappedHook): that hook would
            # then ask a saved state for ``weight_orig``
            for key, h in list(module._load_state_dict_pre_hooks.items()):
                if isinstance(getattr(h, "hook", h), SpectralNormLoadStateDictPreHook):
                    del module._load_state_dict_pre_hooks[key]
            found = True
    if found:
        setattr(module, PLAIN_MARK, True)
    return found


def size_attribute_names() -> frozenset[str]:
    """Every size attribute a registered type records (what a manifest may name)."""
    return frozenset(a for k in _KINDS.values() for a in k.size_attributes) | _LAZY_SIZE_NAMES


def weight_modules(model: nn.Module) -> Iterator[tuple[str, nn.Module, WeightKind]]:
    """``(name, module, kind)`` for every module with a registered weight kind."""
    for name, module in model.named_modules():
        kind = weight_kind(module)
        if kind is not None and isinstance(getattr(module, "weight", None), torch.Tensor):
            yield name, module, kind


def input_channel_axis(module: nn.Module, x: torch.Tensor) -> int:
    """The (non-negative) channel axis of ``x`` as an input of ``module`` (its kind's
    ``input_axis``; 1 for unregistered types).

    Example::

        >>> input_channel_axis(nn.Linear(4, 2), torch.zeros(3, 5, 4))
        2
    """
    kind = module_kind(module)
    axis = kind.input_axis if kind is not None else 1
    return axis % x.dim()


def set_param(module: nn.Module, name: str, value: torch.Tensor) -> None:
    """Replace a parameter or buffer by ``value`` (a parameter stays a parameter, on the
    device it was on)."""
    old = getattr(module, name)
    if isinstance(old, torch.Tensor):
        value = value.to(old.device)
    if isinstance(old, nn.Parameter):
        setattr(module, name, nn.Parameter(value.contiguous(), requires_grad=old.requires_grad))
    else:
        setattr(module, name, value.contiguous())


def index_along(t: torch.Tensor, dim: int, idx: np.ndarray) -> torch.Tensor:
    """``t`` restricted to the positions ``idx`` along ``dim``."""
    return t.index_select(dim, torch.as_tensor(idx, device=t.device))


def _set_size(module: nn.Module, attr: str, value: int) -> None:
    setattr(module, attr, value)  # nn.Module types its attributes as Tensor | Module


def _slice_rows(module: nn.Module, idx: np.ndarray, dim: int = 0) -> None:
    set_param(module, "weight", index_along(_weight(module).data, dim, idx))
    bias = getattr(module, "bias", None)
    if isinstance(bias, torch.Tensor):
        set_param(module, "bias", index_along(bias.data, 0, idx))


def slice_outputs(size: str, dim: int = 0) -> Callable[[nn.Module, np.ndarray, str], None]:
    """A ``slice`` for a producer whose ``weight`` has its outputs on axis ``dim`` (and a
    1-D ``bias``), the output width recorded in the attribute ``size``."""

    def slice_(module: nn.Module, idx: np.ndarray, role: str) -> None:
        _slice_rows(module, idx, dim=dim)
        _set_size(module, size, len(idx))

    return slice_


_slice_linear = slice_outputs("out_features")


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


# ------------------------------------------------------------------- channel rules


def _rule_conv(a: ChannelRoles, op: Any, m: Any, lab: Any) -> None:
    if m.groups == 1:
        a.consumer(op, lab, 1)
        a.producer(op, m.out_channels, 1)
    elif m.groups == m.in_channels == m.out_channels:
        a.passenger(op, lab, 1)
    else:
        why = f"grouped convolution {op.describe()} (groups={m.groups})"
        a.pin_inputs(op, why)
        a.producer(op, m.out_channels, 1, pinned=why)


def linear_channels(width: str) -> ChannelRule:
    """The channel rule of a linear map on the last axis whose output width is the
    attribute ``width`` (``"out_features"``; ``"nf"`` for HF ``Conv1D``)."""

    def rule(a: ChannelRoles, op: Any, m: Any, lab: Any) -> None:
        a.consumer(op, lab, -1)
        a.producer(op, int(getattr(m, width)), -1)

    return rule


def _rule_embedding(a: ChannelRoles, op: Any, m: Any, lab: Any) -> None:
    a.producer(op, m.embedding_dim, -1)


def _rule_passenger(a: ChannelRoles, op: Any, m: Any, lab: Any) -> None:
    a.passenger(op, lab, 1)


def _rule_prelu(a: ChannelRoles, op: Any, m: Any, lab: Any) -> None:
    if m.num_parameters == 1:
        a.passthrough(op, lab)
    else:
        a.passenger(op, lab, 1)


def _rule_last_axes_norm(a: ChannelRoles, op: Any, m: Any, lab: Any) -> None:
    """LayerNorm / RMSNorm: normalise over the trailing ``normalized_shape`` axes."""
    nd = len(m.normalized_shape)
    x = op.inputs[0] if op.inputs else None
    if lab is not None and x is not None and lab.dim >= len(x.shape) - nd:
        a.opaque(op, f"normalised over channels by {op.describe()}")
    else:
        a.passthrough(op, lab)


def _rule_groupnorm(a: ChannelRoles, op: Any, m: Any, lab: Any) -> None:
    if lab is not None and lab.dim == 1:
        a.opaque(op, f"normalised over channel groups by {op.describe()}")
    else:
        a.passthrough(op, lab)


def _rule_pointwise(a: ChannelRoles, op: Any, m: Any, lab: Any) -> None:
    a.passthrough(op, lab)


def _rule_spatial(a: ChannelRoles, op: Any, m: Any, lab: Any) -> None:
    if lab is not None and lab.dim != 1:
        a.opaque(op, f"{op.describe()} pools over the channel axis")
    else:
        a.passthrough(op, lab)


def _rule_softmax(a: ChannelRoles, op: Any, m: Any, lab: Any) -> None:
    a.softmax_like(op, lab, m.dim if m.dim is not None else -1)


def _rule_flatten(a: ChannelRoles, op: Any, m: Any, lab: Any) -> None:
    a.flatten(op, lab, m.start_dim, m.end_dim)


# ------------------------------------------------------------ constructor arguments


def _conv_args(shape: tuple[int, ...], hints: Mapping[str, Any]) -> dict[str, Any]:
    groups = int(hints.get("groups", 1))
    return {
        "in_channels": shape[1] * groups,
        "out_channels": shape[0],
        "kernel_size": tuple(shape[2:]),
    }


def _conv_t_args(shape: tuple[int, ...], hints: Mapping[str, Any]) -> dict[str, Any]:
    groups = int(hints.get("groups", 1))
    return {
        "in_channels": shape[0],
        "out_channels": shape[1] * groups,
        "kernel_size": tuple(shape[2:]),
    }


# ------------------------------------------------------------------- registrations

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
        channels=linear_channels("out_features"),
        input_axis=-1,
        shape_args=lambda s, h: {"in_features": s[1], "out_features": s[0]},
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
            channels=_rule_conv,
            shape_args=_conv_args,
        ),
    )
for _tcls in (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d):
    register_module_kind(
        _tcls, ModuleKind("conv-transpose", size_attributes=_CONV_SIZES, shape_args=_conv_t_args)
    )
register_module_kind(
    nn.modules.batchnorm._NormBase,  # BatchNorm*, InstanceNorm*
    ModuleKind(
        "norm",
        size_attributes=("num_features",),
        slice=_slice_norm,
        channels=_rule_passenger,
        shape_args=lambda s, h: {"num_features": s[0]},
    ),
)
register_module_kind(
    nn.Embedding,
    ModuleKind(
        "embedding",
        size_attributes=("embedding_dim",),
        slice=_slice_embedding,
        channels=_rule_embedding,
        weight_dims=(1, 0),
        shape_args=lambda s, h: {"num_embeddings": s[0], "embedding_dim": s[1]},
    ),
)
register_module_kind(
    nn.PReLU,
    ModuleKind(
        "prelu",
        size_attributes=("num_parameters",),
        slice=_slice_prelu,
        channels=_rule_prelu,
        shape_args=lambda s, h: {"num_parameters": int(np.prod(s))},
    ),
)
for _norm, _norm_name in ((nn.LayerNorm, "layernorm"), (getattr(nn, "RMSNorm", None), "rmsnorm")):
    if _norm is not None:  # nn.RMSNorm: torch >= 2.4
        register_module_kind(
            _norm,
            ModuleKind(
                _norm_name,
                size_attributes=("normalized_shape",),
                channels=_rule_last_axes_norm,
                shape_args=lambda s, h: {"normalized_shape": tuple(s)},
            ),
        )
register_module_kind(
    nn.GroupNorm,
    ModuleKind(
        "groupnorm",
        size_attributes=("num_groups", "num_channels"),
        channels=_rule_groupnorm,
        shape_args=lambda s, h: {"num_channels": s[0]},
    ),
)
register_module_kind(
    nn.Bilinear,
    ModuleKind(
        "bilinear",
        shape_args=lambda s, h: {"out_features": s[0], "in1_features": s[1], "in2_features": s[2]},
    ),
)

POINTWISE_TYPES: tuple[type[nn.Module], ...] = (
    nn.ReLU, nn.ReLU6, nn.GELU, nn.SiLU, nn.Sigmoid, nn.Tanh, nn.Hardswish, nn.Hardsigmoid,
    nn.Hardtanh, nn.LeakyReLU, nn.ELU, nn.SELU, nn.CELU, nn.Mish, nn.Softplus, nn.Identity,
    nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout,
)  # fmt: skip
"""Modules that act on every element alone (channels pass through unchanged)."""

SPATIAL_TYPES: tuple[type[nn.Module], ...] = (
    nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d,
    nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d, nn.AdaptiveMaxPool1d,
    nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d, nn.Upsample, nn.ZeroPad2d, nn.ConstantPad2d,
)  # fmt: skip
"""Modules that act on spatial axes only, channel by channel (pooling, padding, resize)."""

for _p in POINTWISE_TYPES:
    register_module_kind(_p, ModuleKind("pointwise", channels=_rule_pointwise))
for _s in SPATIAL_TYPES:
    register_module_kind(_s, ModuleKind("spatial", channels=_rule_spatial))
for _sm in (nn.Softmax, nn.LogSoftmax):
    register_module_kind(_sm, ModuleKind("softmax", channels=_rule_softmax))
register_module_kind(nn.Flatten, ModuleKind("flatten", channels=_rule_flatten))
# traced as one op whose channels spectrim does not follow (pinned, with the op's name)
for _o in (
    nn.LocalResponseNorm,
    nn.EmbeddingBag,
    nn.MultiheadAttention,
    nn.RNNBase,
    nn.ChannelShuffle,
    nn.PixelShuffle,
):
    register_module_kind(_o, ModuleKind("opaque"))


@register_swap_class
class StandardisedConv2d(nn.Conv2d):
    """A plain ``Conv2d`` holding the weight a weight-standardised convolution computes in
    its forward (timm's ``StdConv2d`` and ``ScaledStdConv2d``, in NF-ResNets, NFNets and
    BiT): the same outputs, to the bit, and a conv whose channels can be sliced and folded.
    Training it trains the standardised weight itself (no re-standardisation).

    Example::

        >>> conv = StandardisedConv2d(3, 4, [3, 3], padding=[1, 1])
        >>> conv.spectrim_kwargs()["kernel_size"], conv(torch.randn(1, 3, 5, 5)).shape
        ([3, 3], torch.Size([1, 4, 5, 5]))
    """

    def spectrim_kwargs(self) -> dict[str, Any]:
        """Constructor arguments (recorded in a saved manifest)."""
        pad = self.padding
        return {
            "in_channels": self.in_channels,
            "out_channels": self.out_channels,
            "kernel_size": list(self.kernel_size),
            "stride": list(self.stride),
            "padding": pad if isinstance(pad, str) else list(pad),
            "dilation": list(self.dilation),
            "groups": self.groups,
            "bias": self.bias is not None,
            "padding_mode": self.padding_mode,
        }


def pad_same(
    x: torch.Tensor, kernel: Sequence[int], stride: Sequence[int], dilation: Sequence[int]
) -> torch.Tensor:
    """TensorFlow's "same" padding of a 2-D conv's input (the output has ``⌈size /
    stride⌉`` positions; an odd total puts the extra row and column at the end), as
    timm's ``pad_same`` computes it.

    Example::

        >>> pad_same(torch.ones(1, 1, 9, 9), (3, 3), (2, 2), (1, 1)).shape
        torch.Size([1, 1, 11, 11])
        >>> pad_same(torch.ones(1, 1, 8, 8), (3, 3), (2, 2), (1, 1))[0, 0, :, 0].tolist()[-2:]
        [1.0, 0.0]
    """
    pads = []
    for size, k, s, d in zip(x.shape[-2:], kernel, stride, dilation, strict=True):
        total = max((-(-int(size) // s) - 1) * s + (k - 1) * d + 1 - int(size), 0)
        pads.append((total // 2, total - total // 2))
    (top, bottom), (left, right) = pads
    return F.pad(x, (left, right, top, bottom))


def _same_rows(module: nn.Module, x: torch.Tensor) -> torch.Tensor | None:
    """A "same"-padding conv's Gram rows: the patches of its padded input."""
    assert isinstance(module, nn.Conv2d)
    if module.groups != 1:
        return None
    padded = pad_same(x, module.kernel_size, module.stride, module.dilation)
    saved = module.padding
    module.padding = (0, 0)  # type: ignore[assignment]  # the padding is in ``padded``
    try:
        return _conv_rows(module, padded)
    finally:
        module.padding = saved


@register_swap_class
class StandardisedConv2dSame(StandardisedConv2d):
    """:class:`StandardisedConv2d` with TensorFlow's "same" padding computed from the
    input's size in forward (timm's ``StdConv2dSame`` / ``ScaledStdConv2dSame``, in the
    DeepMind NFNets); its ``padding`` is 0.

    Example::

        >>> StandardisedConv2dSame(3, 4, [3, 3], stride=[2, 2])(torch.randn(1, 3, 9, 9)).shape
        torch.Size([1, 4, 5, 5])
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = pad_same(x, self.kernel_size, self.stride, self.dilation)
        return F.conv2d(x, self.weight, self.bias, self.stride, 0, self.dilation, self.groups)


_CONV2D_KIND = _KINDS[nn.Conv2d]
assert isinstance(_CONV2D_KIND, WeightKind)
#: a conv with "same" padding computed in forward: a Conv2d whose rows are padded first
_SAME_KIND = replace(_CONV2D_KIND, name="conv2d-same", input_rows=_same_rows)
register_module_kind(StandardisedConv2dSame, _SAME_KIND)


def _standardised(conv: nn.Module, same: bool = False) -> nn.Module:
    """timm's ``StdConv2d`` / ``ScaledStdConv2d`` (``…Same``, ``same=True``: the class
    registered, so a subclass of any name keeps its padding) as a
    :class:`StandardisedConv2d` (``…Same``): the weight computed by the same expression
    as their forward (so the same bits)."""
    assert isinstance(conv, nn.Conv2d)
    w = conv.weight
    gain = getattr(conv, "gain", None)
    scale: Any = getattr(conv, "scale", 1.0)
    affine = (gain * scale).view(-1) if isinstance(gain, torch.Tensor) else None
    eps: Any = conv.eps
    with torch.no_grad():
        weight = F.batch_norm(
            w.reshape(1, conv.out_channels, -1), None, None, weight=affine,
            training=True, momentum=0.0, eps=float(eps),
        ).reshape_as(w)  # fmt: skip
    sizes: dict[str, Any] = {
        k: getattr(conv, k) for k in ("kernel_size", "stride", "padding", "dilation")
    }
    if same:
        sizes["padding"] = 0
    plain = (StandardisedConv2dSame if same else StandardisedConv2d)(
        conv.in_channels, conv.out_channels, **sizes, groups=conv.groups,
        bias=conv.bias is not None, padding_mode=conv.padding_mode, device=w.device,
        dtype=w.dtype,
    )  # fmt: skip
    with torch.no_grad():
        plain.weight.copy_(weight)
        if conv.bias is not None:
            plain.bias.copy_(conv.bias)  # type: ignore[union-attr]
    plain.train(conv.training)
    return plain


def _register_hf_conv1d(utils: Any) -> None:
    """Hugging Face ``Conv1D`` (GPT-2's transposed linear)."""
    conv1d = getattr(utils, "Conv1D", None)
    if conv1d is None:
        return

    def set_t(module: nn.Module, m: torch.Tensor) -> None:
        with torch.no_grad():
            _weight(module).copy_(m.t().to(dtype=_weight(module).dtype))

    register_module_kind(
        conv1d,
        WeightKind(
            "hf-conv1d",
            lambda m: _weight(m).t(),
            set_t,
            _linear_rows,
            ("nf", "nx"),
            slice_outputs("nf", dim=1),
            "nx",
            channels=linear_channels("nf"),
            weight_dims=(1, 0),
            input_axis=-1,
            shape_args=lambda s, h: {"nx": s[0], "nf": s[1]},
        ),
    )


def _register_timm_std_conv(std_conv: Any) -> None:
    """timm's weight-standardised convolutions: made plain before the trace
    (:class:`StandardisedConv2d`, :class:`StandardisedConv2dSame`)."""
    for name in ("StdConv2d", "ScaledStdConv2d", "StdConv2dSame", "ScaledStdConv2dSame"):
        cls = getattr(std_conv, name, None)
        if isinstance(cls, type) and issubclass(cls, nn.Conv2d):
            plain = functools.partial(_standardised, same=name.endswith("Same"))
            register_module_kind(
                cls, ModuleKind("std-conv", size_attributes=_CONV_SIZES, plain=plain)
            )


def _register_timm_conv2d_same(conv2d_same: Any) -> None:
    """timm's ``Conv2dSame`` (TensorFlow "same" padding, computed from the input's size in
    forward: its ``padding`` attribute is unused), a "same"-padding conv like
    :class:`StandardisedConv2dSame`.  Read as a plain conv, its rows missed the border
    patches (2·4·4 rows for 2·5·5 outputs on a 9² input at stride 2), and the statistics
    were made on other rows than the layer computes."""
    cls = getattr(conv2d_same, "Conv2dSame", None)
    if isinstance(cls, type) and issubclass(cls, nn.Conv2d):
        register_module_kind(cls, _SAME_KIND)


#: optional packages' module types: module path -> its registration (run once, when the
#: module is first seen imported)
_OPTIONAL: dict[str, Callable[[Any], None]] = {
    "transformers.pytorch_utils": _register_hf_conv1d,
    "timm.layers.std_conv": _register_timm_std_conv,
    "timm.layers.conv2d_same": _register_timm_conv2d_same,
}
_optional_done: set[str] = set()


def _register_optional() -> None:
    """Types from optional packages, registered once their package is imported (a model
    of that package cannot exist before), so spectrim never imports them itself."""
    if len(_optional_done) == len(_OPTIONAL):
        return
    for path, register in _OPTIONAL.items():
        found = sys.modules.get(path) if path not in _optional_done else None
        if found is not None:
            _optional_done.add(path)
            register(found)
