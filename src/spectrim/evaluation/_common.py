"""Private helpers shared by the evaluation modules.

They normalise the accepted forms of model inputs, call a model with them,
find the batch size, move inputs to a model's device, pull logits out of
model outputs and put models in eval mode temporarily.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from spectrim.graph.trace import call_model as graph_call_model

__all__ = [
    "batch_size_of",
    "call_model",
    "check_inputs",
    "eval_mode",
    "extract_logits",
    "first_tensor",
    "model_device",
    "to_device",
]


def check_inputs(example_inputs: Any, what: str = "example_inputs") -> None:
    """Raise ``TypeError`` unless *example_inputs* is a tensor, tuple/list or mapping."""
    if isinstance(example_inputs, torch.Tensor | tuple | list | Mapping):
        return
    raise TypeError(
        f"unsupported {what} type {type(example_inputs).__name__!r}: expected a torch.Tensor "
        "(single positional argument), a tuple/list (positional arguments) or a dict "
        "(keyword arguments)"
    )


def call_model(model: nn.Module, inputs: Any) -> Any:
    """Call *model* with *inputs*: a tensor, a tuple/list (``*args``) or a mapping
    (``**kwargs``), as :func:`spectrim.graph.trace.call_model` does, with the error of
    :func:`check_inputs` for anything else."""
    check_inputs(inputs, "model inputs")
    return graph_call_model(model, inputs)


def first_tensor(obj: Any) -> torch.Tensor | None:
    """Return the first tensor found depth-first in *obj* (tensor, sequence or mapping)."""
    if isinstance(obj, torch.Tensor):
        return obj
    if isinstance(obj, Mapping):
        values: Any = obj.values()
    elif isinstance(obj, tuple | list):
        values = obj
    else:
        return None
    for value in values:
        found = first_tensor(value)
        if found is not None:
            return found
    return None


def batch_size_of(example_inputs: Any) -> int:
    """Batch size of *example_inputs*: the first dimension of its first tensor."""
    tensor = first_tensor(example_inputs)
    if tensor is None:
        raise ValueError(
            "cannot infer the batch size: example_inputs contain no torch.Tensor "
            f"(got {type(example_inputs).__name__!r})"
        )
    if tensor.dim() == 0 or tensor.shape[0] == 0:
        raise ValueError(
            "cannot infer the batch size: the first tensor of example_inputs has shape "
            f"{tuple(tensor.shape)}; it needs a non-empty leading batch dimension"
        )
    return int(tensor.shape[0])


def model_device(model: nn.Module) -> torch.device | None:
    """Device of the model's first parameter (or buffer) not on the meta device; ``None``
    if it has none (a model offloaded by accelerate moves its inputs itself)."""
    for t in itertools.chain(model.parameters(), model.buffers()):
        if t.device.type != "meta":
            return t.device
    return None


def to_device(obj: Any, device: torch.device | None) -> Any:
    """Move every tensor inside *obj* (tensor, tuple, list, mapping) to *device*."""
    if device is None:
        return obj
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, Mapping):
        return {key: to_device(value, device) for key, value in obj.items()}
    if isinstance(obj, tuple):
        return tuple(to_device(value, device) for value in obj)
    if isinstance(obj, list):
        return [to_device(value, device) for value in obj]
    return obj


def extract_logits(output: Any) -> torch.Tensor:
    """Logits tensor of a model output.

    Accepts a tensor, an object with a ``logits`` attribute or key (Hugging Face
    ``ModelOutput``), or a tuple/list whose first element is one of those.
    """
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, Mapping) and "logits" in output:
        return extract_logits(output["logits"])
    logits = getattr(output, "logits", None)
    if isinstance(logits, torch.Tensor):
        return logits
    if isinstance(output, tuple | list) and output:
        return extract_logits(output[0])
    raise TypeError(
        f"cannot extract logits from a model output of type {type(output).__name__!r}: "
        "expected a tensor, an object with a 'logits' tensor, or a tuple/list starting with one"
    )


@contextmanager
def eval_mode(*models: nn.Module) -> Iterator[None]:
    """Put *models* in eval mode, restoring every submodule's own ``training`` flag on exit."""
    saved = [(module, module.training) for model in models for module in model.modules()]
    try:
        for model in models:
            model.eval()
        yield
    finally:
        for module, training in saved:
            module.training = training
