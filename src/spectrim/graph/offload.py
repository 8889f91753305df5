"""Models offloaded layer by layer (accelerate's hooks), loaded into memory to compress.

A model dispatched by accelerate (``from_pretrained(device_map=..., offload_folder=...)``,
``accelerate.cpu_offload``, ``disk_offload``, ``dispatch_model``) keeps some weights on
the meta device; an ``AlignDevicesHook`` on the module (or an ancestor) fetches them from
its ``weights_map`` (a dict in CPU memory or files on disk) for each forward call and
drops them after.  Compressing needs the values themselves (statistics, factorisations,
surgery), so :func:`onload` builds a plain model: the same modules without the hooks,
every offloaded tensor read once from its ``weights_map`` onto the CPU.  The model is held
in memory once; with ``copy=True`` (the default of ``compress``) the user's dispatched
model is untouched and its disk files are only read.

Examples:
    >>> import torch.nn as nn
    >>> is_offloaded(nn.Linear(2, 2))
    False
"""

from __future__ import annotations

import copy as _copy
from typing import Any

import torch
from torch import nn

__all__ = ["is_offloaded", "onload"]

_HOOK = "_hf_hook"
# instance attributes accelerate's add_hook_to_module / dispatch_model add to a module
_ADDED = ("_old_forward", "forward", "to", "cuda", "npu", "xpu", "mlu", "sdaa", "musa")


def is_offloaded(model: nn.Module) -> bool:
    """Whether any module of ``model`` carries an accelerate hook."""
    return any(hasattr(m, _HOOK) for m in model.modules())


def _hooks(module: nn.Module) -> list[Any]:
    """The hooks on ``module`` (a ``SequentialHook`` holds several)."""
    hook = getattr(module, _HOOK, None)
    if hook is None:
        return []
    return list(getattr(hook, "hooks", None) or [hook])


def _weights_maps(model: nn.Module) -> dict[str, Any]:
    """Module name → the ``weights_map`` of its offloading hook."""
    found = {}
    for name, module in model.named_modules():
        for hook in _hooks(module):
            if getattr(hook, "offload", False) and getattr(hook, "weights_map", None) is not None:
                found[name] = hook.weights_map
    return found


def _value(name: str, maps: dict[str, Any]) -> torch.Tensor:
    """The stored value of tensor ``name``, from the nearest hook at or above its module."""
    parts = name.split(".")
    for cut in range(len(parts) - 1, -1, -1):
        owner = ".".join(parts[:cut])
        if owner in maps:
            rel = ".".join(parts[cut:])
            try:
                value = maps[owner][rel]
            except KeyError:
                break
            if not isinstance(value, torch.Tensor):
                value = torch.as_tensor(value)
            return value
    raise ValueError(
        f"'{name}' of the model is on the meta device and no accelerate hook holds its "
        "values (checked the weights_map of every offloading hook above it): load the "
        "weights first (load_state_dict, or from_pretrained)"
    )


def _strip(module: nn.Module) -> None:
    """Remove accelerate's hook and forward wrappers from one module (not its children)."""
    if not hasattr(module, _HOOK):
        return
    for attr in (_HOOK, *_ADDED):
        module.__dict__.pop(attr, None)


def onload(model: nn.Module, *, copy: bool = True) -> nn.Module:
    """``model`` without accelerate's hooks and with every offloaded tensor in memory.

    Every tensor ends on the CPU.  With ``copy=True`` the result is a new model and
    ``model`` keeps its hooks and files (its stored tensors are copied, never shared);
    with ``copy=False`` ``model`` itself is stripped and filled, without copies.

    Raises:
        ValueError: a meta tensor that no hook holds a value for, named.
    """
    maps = _weights_maps(model)
    if copy:
        # the hooks (and their weights_maps, which may hold every offloaded tensor)
        # are shared with the copy, not copied: the copy drops them at once
        memo: dict[int, Any] = {}
        for module in model.modules():
            for hook in (getattr(module, _HOOK, None), *_hooks(module)):
                if hook is not None:
                    memo[id(hook)] = hook
        out = _copy.deepcopy(model, memo)
    else:
        out = model
    for module in out.modules():
        _strip(module)
    filled: dict[int, torch.Tensor] = {}  # tied tensors stay tied
    for mname, module in out.named_modules():
        for kind in ("_parameters", "_buffers"):
            table: dict[str, Any] = getattr(module, kind)
            for leaf, t in list(table.items()):
                if t is None:
                    continue
                if t.device.type == "cpu":
                    continue
                if id(t) not in filled:
                    if t.device.type == "meta":
                        full = f"{mname}.{leaf}" if mname else leaf
                        value = _value(full, maps).to("cpu", t.dtype)
                        value = value.clone() if copy else value
                    else:  # a dispatched part on an accelerator
                        value = t.detach().to("cpu")
                    filled[id(t)] = _retype(t, value)
                table[leaf] = filled[id(t)]
    return out


def _retype(old: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """``value`` as a parameter when ``old`` was one (same ``requires_grad``)."""
    if isinstance(old, nn.Parameter):
        return nn.Parameter(value, requires_grad=old.requires_grad)
    return value
