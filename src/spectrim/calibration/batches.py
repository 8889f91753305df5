"""Calibration batches: what :func:`spectrim.compress` accepts as calibration data.

Example::

    >>> import torch
    >>> from spectrim.calibration.batches import as_batches, head_examples
    >>> batches = as_batches(torch.randn(150, 3), batch_size=64)
    >>> [len(b) for b in batches], len(head_examples(batches[0]))
    ([64, 64, 22], 2)
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset

from spectrim.graph.trace import batch_len

__all__ = [
    "as_batches",
    "check_batch",
    "drop_padding",
    "head_examples",
    "inputs_only",
    "stack_examples",
    "to_device",
    "token_mask",
]


def inputs_only(batches: Iterable[Any]) -> Iterator[Any]:
    """Drop labels from ``(x, y)`` batches (e.g. a labelled DataLoader)."""
    for b in batches:
        yield b[0] if isinstance(b, (tuple, list)) else b


def as_batches(data: Any, batch_size: int = 64) -> list[Any]:
    """Materialise calibration data as a list of batches.

    Accepts a tensor of inputs (split into batches), a :class:`~torch.utils.data.Dataset`
    whose items are inputs or ``(input, label)`` pairs (labels are dropped), or any
    iterable of batches (tensor, tuple of positional args, or dict of keyword args).
    """
    if isinstance(data, torch.Tensor):
        if data.dim() == 0 or data.shape[0] == 0:
            raise ValueError("calibration tensor is empty")
        return list(data.split(batch_size))
    if isinstance(data, Dataset) and not isinstance(data, Iterable):
        loader = DataLoader(data, batch_size=batch_size, shuffle=False)
        return list(inputs_only(loader))
    if isinstance(data, Iterable):
        batches = list(data)
        if not batches:
            raise ValueError("calibration data yielded no batches")
        return batches
    raise TypeError(
        f"calibration data of type {type(data).__name__} is not supported: pass a tensor, "
        "a Dataset or an iterable of batches"
    )


def to_device(batch: Any, device: torch.device) -> Any:
    """``batch`` with every tensor on ``device`` (tuples, lists and mappings rebuilt, other
    values as they are).

    Example::

        >>> b = to_device({"input_ids": torch.ones(2, 3), "flag": True}, torch.device("cpu"))
        >>> b["input_ids"].device.type, b["flag"]
        ('cpu', True)
    """
    if isinstance(batch, torch.Tensor):
        return batch.to(device)
    if isinstance(batch, Mapping):
        return {k: to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, (tuple, list)):
        return type(batch)(to_device(v, device) for v in batch)
    return batch


def token_mask(batch: Any) -> torch.Tensor | None:
    """The real (non-padding) token positions of a text batch: its ``attention_mask`` as
    a ``(batch, tokens)`` bool tensor, or ``None`` when the batch has no mask or no padding.

    Example::

        >>> token_mask({"input_ids": torch.zeros(2, 3), "attention_mask": torch.tensor([[1, 1, 0], [1, 1, 1]])})
        tensor([[ True,  True, False],
                [ True,  True,  True]])
        >>> token_mask(torch.zeros(2, 3)) is None
        True
    """
    if not isinstance(batch, Mapping):
        return None
    mask = batch.get("attention_mask")
    if not isinstance(mask, torch.Tensor) or mask.dim() != 2:
        return None
    mask = mask != 0
    return None if bool(mask.all()) else mask


def drop_padding(
    x: torch.Tensor, mask: torch.Tensor | None, channel_dim: int
) -> tuple[torch.Tensor, int]:
    """``x`` without its padded token positions, and its channel axis after that.

    ``x`` is an activation of the batch whose :func:`token_mask` is ``mask``: when its
    leading axes are ``(batch, tokens)`` and its channels come after them (the layout of
    every Linear input in a transformer), the padded positions are removed, ``(B, T, C)``
    becoming ``(N, C)`` with ``N`` the real tokens; anything else passes unchanged (images,
    pooled outputs, a conv's ``(B, C, T)``).

    Example::

        >>> m = torch.tensor([[True, False], [True, True]])
        >>> y, cd = drop_padding(torch.arange(12.0).reshape(2, 2, 3), m, 2)
        >>> tuple(y.shape), cd
        ((3, 3), 1)
    """
    if mask is None or x.dim() < 3 or tuple(x.shape[:2]) != tuple(mask.shape):
        return x, channel_dim
    if channel_dim < 0:
        channel_dim += x.dim()
    if channel_dim < 2:  # the channels are one of the leading axes: not token rows
        return x, channel_dim
    return x[mask.to(x.device)], channel_dim - 1


def head_examples(batch: Any, n: int = 2) -> Any:
    """The first ``n`` examples of a batch (cheap tracing and self-checks).

    Only tensors whose first dimension is the batch size (that of the batch's first
    tensor) are cut; scalars and other arguments pass unchanged.
    """
    size = batch_len(batch)

    def cut(v: Any) -> Any:
        if isinstance(v, torch.Tensor):
            return v[:n] if v.dim() > 0 and v.shape[0] == size else v
        if isinstance(v, dict):
            return {k: cut(x) for k, x in v.items()}
        if isinstance(v, (tuple, list)):
            return type(v)(cut(x) for x in v)
        return v

    return cut(batch)


def stack_examples(batches: list[Any], n: int) -> Any:
    """One batch of ``n`` examples: ``batches`` concatenated along the batch dimension,
    repeated when they hold fewer (a latency measured at a chosen batch size).

    Example::

        >>> stack_examples([torch.zeros(3, 2), torch.ones(2, 2)], 7)[:, 0].tolist()
        [0.0, 0.0, 0.0, 1.0, 1.0, 0.0, 0.0]
    """
    got, count = [], 0
    while count < n:
        for b in batches:
            got.append(b)
            count += batch_len(b)
            if count >= n:
                break

    def cat(items: list[Any]) -> Any:
        first = items[0]
        if isinstance(first, torch.Tensor):
            return torch.cat(items)[:n]
        if isinstance(first, dict):
            return {k: cat([b[k] for b in items]) for k in first}
        if isinstance(first, (tuple, list)):
            return type(first)(cat([b[i] for b in items]) for i in range(len(first)))
        return first

    return cat(got)


def check_batch(batch: Any) -> None:
    """Raise ``TypeError`` unless ``batch`` is a tensor or holds one (tuple/list or dict)."""
    if isinstance(batch, torch.Tensor):
        return
    if isinstance(batch, dict) and any(isinstance(v, torch.Tensor) for v in batch.values()):
        return
    if isinstance(batch, (tuple, list)) and any(isinstance(v, torch.Tensor) for v in batch):
        return
    raise TypeError(
        f"calibration batch of type {type(batch).__name__} holds no tensor: use a tensor, a "
        "tuple of tensors (positional args) or a dict of tensors (keyword args)"
    )
