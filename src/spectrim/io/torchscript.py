"""Turn a TorchScript module back into an editable eager ``nn.Module``.

Channel surgery edits Python modules (replaces parameters, changes ``out_channels``), which a
compiled TorchScript module does not allow. :func:`script_to_module` rebuilds the eager module
tree from the classes recorded in the TorchScript archive:

* ``torch.nn`` layers (``Conv2d``, ``Linear``, ``BatchNorm2d``, pooling, activations, ...)
  are constructed again from their constants (scripted modules) or, for traced modules, from
  the weight shapes and the constant arguments of the ops in their graph;
* every other module (``nn.Sequential``, the user's own classes) is re-created from its Python
  class, which must be importable, with its submodules, parameters, buffers, attributes and
  constants copied over.

The result is checked against the TorchScript module on example inputs when they are given
(:func:`check_equivalent`); a model that cannot be rebuilt faithfully raises
:class:`TorchScriptConversionError` with a message saying what to do instead.

Example::

    >>> import torch
    >>> from torch import nn
    >>> scripted = torch.jit.script(nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU()))  # doctest: +SKIP
    >>> eager = script_to_module(scripted, torch.randn(2, 3, 16, 16))  # doctest: +SKIP
    >>> type(eager[0]).__name__  # doctest: +SKIP
    'Conv2d'
"""

from __future__ import annotations

import importlib
import inspect
import re
import typing
from typing import Any

import torch
from torch import nn

from spectrim.evaluation._common import call_model, eval_mode
from spectrim.graph.modules import type_kind

__all__ = ["TorchScriptConversionError", "check_equivalent", "script_to_module"]

_MANGLE = re.compile(r"___torch_mangle_\d+\.")
_MISSING = object()
_SKIP_ATTRIBUTES = frozenset({"training", "_is_full_backward_hook"})
_CONTAINERS = (nn.Sequential, nn.ModuleList, nn.ModuleDict, nn.ParameterList, nn.ParameterDict)


class TorchScriptConversionError(ValueError):
    """A TorchScript module could not be rebuilt as an eager module."""


def _qualified_name(sm: torch.jit.ScriptModule) -> str:
    name = sm._c._type().qualified_name()
    return _MANGLE.sub("", name).removeprefix("__torch__.")


def _python_class(qualified: str) -> type[nn.Module] | None:
    parts = qualified.split(".")
    if len(parts) == 1:  # a class of the __main__ script
        parts = ["__main__", *parts]
    for i in range(len(parts) - 1, 0, -1):
        try:
            obj: Any = importlib.import_module(".".join(parts[:i]))
        except ImportError:
            continue
        try:
            for attr in parts[i:]:
                obj = getattr(obj, attr)
        except AttributeError:
            return None
        return obj if isinstance(obj, type) and issubclass(obj, nn.Module) else None
    return None


# ------------------------------------------------------------------------------ graph constants


def _constant(value: Any) -> Any:
    """The Python value of a graph input if it is a constant (or a list of constants)."""
    node = value.node()
    kind = node.kind()
    if kind == "prim::Constant":
        return value.toIValue()
    if kind in ("prim::ListConstruct", "prim::TupleConstruct"):
        items = [_constant(v) for v in node.inputs()]
        if any(item is _MISSING for item in items):
            return _MISSING
        return items
    return _MISSING


# op kind -> {argument index: constructor parameter}
_OP_ARGUMENTS: dict[str, dict[int, str]] = {
    "aten::_convolution": {
        3: "stride",
        4: "padding",
        5: "dilation",
        7: "output_padding",
        8: "groups",
    },
    "aten::conv1d": {3: "stride", 4: "padding", 5: "dilation", 6: "groups"},
    "aten::conv2d": {3: "stride", 4: "padding", 5: "dilation", 6: "groups"},
    "aten::conv3d": {3: "stride", 4: "padding", 5: "dilation", 6: "groups"},
    "aten::conv_transpose1d": {
        3: "stride",
        4: "padding",
        5: "output_padding",
        6: "groups",
        7: "dilation",
    },
    "aten::conv_transpose2d": {
        3: "stride",
        4: "padding",
        5: "output_padding",
        6: "groups",
        7: "dilation",
    },
    "aten::conv_transpose3d": {
        3: "stride",
        4: "padding",
        5: "output_padding",
        6: "groups",
        7: "dilation",
    },
    "aten::batch_norm": {6: "momentum", 7: "eps"},
    "aten::instance_norm": {6: "momentum", 7: "eps"},
    "aten::layer_norm": {1: "normalized_shape", 4: "eps"},
    "aten::group_norm": {1: "num_groups", 4: "eps"},
    "aten::embedding": {2: "padding_idx"},
    "aten::flatten": {1: "start_dim", 2: "end_dim"},
    "aten::dropout": {1: "p"},
    "aten::feature_dropout": {1: "p"},
    "aten::leaky_relu": {1: "negative_slope"},
    "aten::elu": {1: "alpha"},
    "aten::gelu": {1: "approximate"},
    "aten::softmax": {1: "dim"},
    "aten::log_softmax": {1: "dim"},
    "aten::hardtanh": {1: "min_val", 2: "max_val"},
}
for _n in (1, 2, 3):
    _OP_ARGUMENTS[f"aten::max_pool{_n}d"] = {
        1: "kernel_size",
        2: "stride",
        3: "padding",
        4: "dilation",
        5: "ceil_mode",
    }
    _OP_ARGUMENTS[f"aten::max_pool{_n}d_with_indices"] = _OP_ARGUMENTS[f"aten::max_pool{_n}d"]
    _OP_ARGUMENTS[f"aten::avg_pool{_n}d"] = {
        1: "kernel_size",
        2: "stride",
        3: "padding",
        4: "ceil_mode",
        5: "count_include_pad",
        6: "divisor_override",
    }
    _OP_ARGUMENTS[f"aten::adaptive_avg_pool{_n}d"] = {1: "output_size"}
    _OP_ARGUMENTS[f"aten::adaptive_max_pool{_n}d"] = {1: "output_size"}


def _graph_hints(sm: torch.jit.ScriptModule) -> dict[str, Any]:
    """Constructor arguments read from the constant op arguments of ``sm.forward``'s graph."""
    hints: dict[str, Any] = {}
    try:
        nodes = list(sm.graph.nodes())
    except (AttributeError, RuntimeError):
        return hints
    for node in nodes:
        kind = node.kind()
        inputs = list(node.inputs())
        if kind in ("aten::pad", "aten::reflection_pad2d", "aten::replicate_pad2d"):
            if kind == "aten::pad" and len(inputs) > 2:
                mode = _constant(inputs[2])
                pads = _constant(inputs[1])
                if isinstance(mode, str) and isinstance(pads, list):
                    hints["padding_mode"] = mode
                    hints["_explicit_padding"] = tuple(reversed(pads[::2]))
            continue
        spec = _OP_ARGUMENTS.get(kind)
        if spec is None:
            continue
        for index, name in spec.items():
            if index < len(inputs) and name not in hints:
                value = _constant(inputs[index])
                if value is not _MISSING:
                    hints[name] = value
        if kind == "aten::_convolution" and len(inputs) > 6:
            transposed = _constant(inputs[6])
            if transposed is not _MISSING:
                hints["_transposed"] = bool(transposed)
        if kind == "aten::embedding" and hints.get("padding_idx") == -1:
            hints["padding_idx"] = None
    if "_explicit_padding" in hints and hints.get("padding_mode", "zeros") != "zeros":
        hints["padding"] = hints.pop("_explicit_padding")
    hints.pop("_explicit_padding", None)
    return hints


def _shape_hints(
    cls: type[nn.Module], params: dict[str, torch.Tensor | None], hints: dict[str, Any]
) -> dict[str, Any]:
    """Constructor arguments implied by the weight shapes."""
    w = params.get("weight")
    kind = type_kind(cls)
    if w is None or kind is None or kind.shape_args is None:
        return {}
    out = kind.shape_args(tuple(int(d) for d in w.shape), hints)
    return {k: int(v) if isinstance(v, torch.SymInt | int) else v for k, v in out.items()}


def _tuplify(value: Any) -> Any:
    return tuple(_tuplify(v) for v in value) if isinstance(value, list) else value


# --------------------------------------------------------------------------------- rebuilding


def _local_tensors(
    sm: torch.jit.ScriptModule,
) -> tuple[dict[str, torch.Tensor | None], dict[str, torch.Tensor | None], set[str]]:
    params: dict[str, torch.Tensor | None] = dict(sm.named_parameters(recurse=False))
    buffers: dict[str, torch.Tensor | None] = dict(sm.named_buffers(recurse=False))
    persistent = {k for k in sm.state_dict(keep_vars=True) if "." not in k}
    return params, buffers, persistent


def _build_torch_layer(cls: type[nn.Module], sm: torch.jit.ScriptModule, path: str) -> nn.Module:
    """Call the constructor of a ``torch.nn`` layer with arguments recovered from ``sm``."""
    params, buffers, _ = _local_tensors(sm)
    hints = _graph_hints(sm)
    hints.update({k: v for k, v in _shape_hints(cls, params, hints).items() if k not in hints})
    kwargs: dict[str, Any] = {}
    for p in list(inspect.signature(cls.__init__).parameters.values())[1:]:
        if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD) or p.name in ("device", "dtype"):
            continue
        value: Any = _MISSING
        if p.name == "bias" and isinstance(p.default, bool):
            value = params.get("bias") is not None
        elif p.name in ("affine", "elementwise_affine"):
            value = params.get("weight") is not None
        elif p.name == "track_running_stats":
            value = buffers.get("running_mean") is not None
        else:
            try:
                value = getattr(sm, p.name)
            except (AttributeError, RuntimeError):
                value = _MISSING
            if isinstance(value, torch.Tensor) or callable(value):
                value = _MISSING
            if value is _MISSING:
                value = hints.get(p.name, _MISSING)
        if value is _MISSING:
            if p.default is p.empty:
                raise TorchScriptConversionError(
                    f"cannot recover argument {p.name!r} of {cls.__name__} at {path or '<root>'}"
                )
            continue
        kwargs[p.name] = _tuplify(value)
    try:
        module = cls(**kwargs)
    except Exception as exc:
        raise TorchScriptConversionError(
            f"cannot rebuild {cls.__name__}({kwargs}) at {path or '<root>'}: {exc}"
        ) from None
    state = {k: v.detach().clone() for k, v in sm.state_dict().items()}
    try:
        module.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise TorchScriptConversionError(
            f"rebuilt {cls.__name__} at {path or '<root>'} does not fit its weights: {exc}"
        ) from None
    module.train(sm.training)
    return module


def _attribute_names(sm: torch.jit.ScriptModule, cls: type[nn.Module]) -> list[str]:
    names: list[str] = []
    try:
        info = torch._C._jit_debug_module_iterators(sm._c)  # type: ignore[attr-defined]
        names += [str(n[0] if isinstance(n, tuple) else n) for n in info["named_attributes"]]
    except Exception:  # private API; constants below still apply
        pass
    for klass in cls.__mro__:
        names += list(getattr(klass, "__constants__", ()) or ())
        for name, annotation in vars(klass).get("__annotations__", {}).items():
            if "Final" in str(annotation) or typing.get_origin(annotation) is typing.Final:
                names.append(name)
    seen: set[str] = set()
    return [n for n in names if not (n in seen or seen.add(n))]  # type: ignore[func-returns-value]


def _build_from_class(cls: type[nn.Module], sm: torch.jit.ScriptModule, path: str) -> nn.Module:
    """Re-create an instance of ``cls`` without calling its ``__init__`` and fill its state."""
    module = cls.__new__(cls)
    nn.Module.__init__(module)
    children = dict(sm.named_children())
    for name, child in children.items():
        module.add_module(name, _convert(child, f"{path}.{name}" if path else name))
    params, buffers, persistent = _local_tensors(sm)
    for name, p in params.items():
        module.register_parameter(
            name, None if p is None else nn.Parameter(p.detach().clone(), p.requires_grad)
        )
    for name, b in buffers.items():
        module.register_buffer(
            name, None if b is None else b.detach().clone(), persistent=name in persistent
        )
    taken = set(children) | set(params) | set(buffers) | _SKIP_ATTRIBUTES
    for name in _attribute_names(sm, cls):
        if name in taken:
            continue
        try:
            value = getattr(sm, name)
        except (AttributeError, RuntimeError):
            continue
        if isinstance(value, torch.jit.ScriptModule) or callable(value):
            continue
        if isinstance(value, torch.Tensor):
            value = value.detach().clone()
        try:
            setattr(module, name, value)
        except (AttributeError, TypeError):  # read-only property of the class
            continue
    module.training = sm.training
    return module


def _convert(sm: Any, path: str) -> nn.Module:
    if not isinstance(sm, torch.jit.ScriptModule):
        if isinstance(sm, nn.Module):
            return sm
        raise TorchScriptConversionError(f"unexpected object of type {type(sm).__name__}")
    qualified = _qualified_name(sm)
    cls = _python_class(qualified)
    if cls is None:
        raise TorchScriptConversionError(
            f"module {path or '<root>'} was compiled from class {qualified!r}, which cannot be "
            "imported here; make its module importable (PYTHONPATH) or save the model with "
            "torch.save(model) instead of TorchScript"
        )
    is_torch_layer = (
        cls.__module__.startswith("torch.nn.")
        and not issubclass(cls, _CONTAINERS)
        and not list(sm.named_children())
    )
    if is_torch_layer:
        return _build_torch_layer(cls, sm, path)
    return _build_from_class(cls, sm, path)


def _max_diff(a: Any, b: Any, where: str = "output") -> float:
    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
        if a.shape != b.shape:
            raise TorchScriptConversionError(
                f"{where}: shape {tuple(b.shape)} of the rebuilt model differs from "
                f"{tuple(a.shape)} of the TorchScript model"
            )
        if not a.is_floating_point():
            return 0.0 if torch.equal(a, b) else float("inf")
        scale = float(a.abs().max()) if a.numel() else 0.0
        return float((a - b).abs().max()) / max(scale, 1.0) if a.numel() else 0.0
    if isinstance(a, (tuple, list)) and isinstance(b, (tuple, list)) and len(a) == len(b):
        return max(
            (_max_diff(x, y, f"{where}[{i}]") for i, (x, y) in enumerate(zip(a, b))), default=0.0
        )
    if isinstance(a, dict) and isinstance(b, dict) and a.keys() == b.keys():
        return max((_max_diff(a[k], b[k], f"{where}[{k!r}]") for k in a), default=0.0)
    return 0.0 if a == b else float("inf")


def check_equivalent(
    scripted: nn.Module, eager: nn.Module, example_inputs: Any, tol: float = 1e-4
) -> float:
    """Run both models on ``example_inputs`` (eval mode, no grad); raise if outputs differ.

    Returns the largest absolute difference relative to ``max(1, max |output|)``.
    """
    with eval_mode(scripted, eager), torch.no_grad():
        expected = call_model(scripted, example_inputs)
        try:
            got = call_model(eager, example_inputs)
        except Exception as exc:
            raise TorchScriptConversionError(
                f"the rebuilt eager model fails on the example inputs ({exc}); traced "
                "TorchScript keeps no Python attributes, so save the model with "
                "torch.jit.script or torch.save(model) instead"
            ) from None
    diff = _max_diff(expected, got)
    if not diff <= tol:
        raise TorchScriptConversionError(
            f"the rebuilt eager model's outputs differ from the TorchScript model's "
            f"(relative max difference {diff:.3g} > {tol:g})"
        )
    return diff


def script_to_module(
    scripted: torch.jit.ScriptModule, example_inputs: Any | None = None
) -> nn.Module:
    """An eager ``nn.Module`` equivalent to a TorchScript module (see the module docstring).

    Args:
        scripted: a ``torch.jit.script``/``torch.jit.trace`` module (e.g. from ``torch.jit.load``).
        example_inputs: when given, both models run on them and must agree
            (:func:`check_equivalent`).

    Raises:
        TorchScriptConversionError: a class cannot be imported, a layer's configuration cannot
            be recovered, or the rebuilt model computes something else.
    """
    if not isinstance(scripted, torch.jit.ScriptModule):
        raise TypeError(f"expected a TorchScript module, got {type(scripted).__name__}")
    eager = _convert(scripted, "")
    if example_inputs is not None:
        check_equivalent(scripted, eager, example_inputs)
    return eager
