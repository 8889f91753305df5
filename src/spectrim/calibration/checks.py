"""Checks of calibration data, before anything is measured with it.

Bad calibration data must fail loudly and name its culprit, never turn into pinned groups,
zero errors or a silently wrong model:

* :func:`check_calibration`: every batch holds a tensor, every floating tensor is finite
  (the first NaN/inf is named by batch, example and argument), and the examples are not
  all the same (all zeros, one constant image); it counts the distinct examples;
* :func:`trace_checked`: the trace and self-checks of
  :func:`spectrim.graph.verify.trace_and_check`, with a hint when the batches look like
  ``(inputs, labels)`` pairs;
* :func:`first_bad_example`: where in a batch the first non-finite example is.

Example::

    >>> import torch
    >>> from spectrim.calibration.batches import as_batches
    >>> x = torch.randn(10, 3); x[7, 1] = float("nan")
    >>> check_calibration(as_batches(x, batch_size=4))
    Traceback (most recent call last):
    ...
    spectrim.calibration.checks.CalibrationError: calibration batch 1 (examples 4-7): the input of example 7 (index 3 in the batch) contains NaN or inf
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from spectrim.calibration.batches import check_batch
from spectrim.graph.channels import Analysis, UnitGroup
from spectrim.graph.trace import batch_len
from spectrim.graph.verify import trace_and_check

__all__ = [
    "CalibrationError",
    "CalibrationInfo",
    "check_calibration",
    "first_bad_example",
    "label_pair_hint",
    "rows_per_group",
    "trace_checked",
]


class CalibrationError(ValueError):
    """Calibration data that cannot give meaningful statistics; the message names the
    batch and example (and the argument of a tuple or dict batch)."""


def _named_tensors(batch: Any, path: str = "") -> list[tuple[str, torch.Tensor]]:
    """The tensors of a batch with where they are (``""``, ``"[1]"``, ``"['input_ids']"``)."""
    if isinstance(batch, torch.Tensor):
        return [(path, batch)]
    if isinstance(batch, dict):
        return [t for k, v in batch.items() for t in _named_tensors(v, f"{path}[{k!r}]")]
    if isinstance(batch, (tuple, list)):
        return [t for i, v in enumerate(batch) for t in _named_tensors(v, f"{path}[{i}]")]
    return []


def first_bad_example(t: torch.Tensor, size: int) -> int | None:
    """Index along the batch axis of the first example of ``t`` holding NaN or inf
    (``None`` when all are finite; ``-1`` when ``t`` has no batch axis of ``size``).

    Example::

        >>> first_bad_example(torch.tensor([[0.0], [float("inf")]]), 2)
        1
    """
    if not t.is_floating_point() and not t.is_complex():
        return None
    bad = ~torch.isfinite(t)
    if not bool(bad.any()):
        return None
    if t.dim() == 0 or t.shape[0] != size:
        return -1
    return int(bad.reshape(t.shape[0], -1).any(1).nonzero()[0, 0])


def _what(path: str) -> str:
    return "the input" if not path else f"input {path}"


@dataclass
class CalibrationInfo:
    """What :func:`check_calibration` found.

    Attributes:
        examples: number of examples (sum of the batch sizes).
        distinct: how many of them differ from each other (byte for byte).
        warnings: what the report should say about the data.
    """

    examples: int
    distinct: int
    warnings: list[str] = field(default_factory=list)

    @property
    def distinct_share(self) -> float:
        """``distinct / examples``: the share of the rows that carry new information."""
        return self.distinct / self.examples if self.examples else 1.0


def _example_digests(named: list[tuple[str, torch.Tensor]], size: int) -> list[bytes]:
    hashes = [hashlib.blake2b(digest_size=16) for _ in range(size)]
    for path, t in named:
        if t.dim() == 0 or t.shape[0] != size:
            continue
        rows = t.detach().cpu().contiguous().reshape(size, -1)
        if rows.dtype == torch.bfloat16:
            rows = rows.float()
        data = rows.numpy()
        for j in range(size):
            hashes[j].update(path.encode())
            hashes[j].update(data[j].tobytes())
    return [h.digest() for h in hashes]


def check_calibration(batches: Sequence[Any]) -> CalibrationInfo:
    """Validate calibration batches before anything runs.

    Every batch must hold a tensor and every floating tensor must be finite (the first NaN
    or inf is reported with its batch, its example and, for tuple or dict batches, the
    argument). Examples that are all the same (all zeros, one constant image) are refused;
    repeated examples and a single example give warnings, and :attr:`CalibrationInfo.distinct`
    tells the statistics how many rows are new.

    Raises:
        CalibrationError: non-finite values, or all examples identical.
        TypeError: a batch holds no tensor.
    """
    offset = 0
    seen: set[bytes] = set()
    for i, batch in enumerate(batches):
        check_batch(batch)
        size = batch_len(batch)
        named = _named_tensors(batch)
        for path, t in named:
            j = first_bad_example(t, size)
            if j is None:
                continue
            span = f"calibration batch {i} (examples {offset}-{offset + size - 1})"
            if j < 0:
                raise CalibrationError(f"{span}: {_what(path)} contains NaN or inf")
            raise CalibrationError(
                f"{span}: {_what(path)} of example {offset + j} (index {j} in the batch) "
                "contains NaN or inf"
            )
        seen.update(_example_digests(named, size))
        offset += size
    distinct = max(min(len(seen), offset), 1 if offset else 0)
    info = CalibrationInfo(offset, distinct)
    if offset >= 2 and distinct == 1:
        raise CalibrationError(
            f"calibration data: all {offset} examples are identical (all zeros or a "
            "constant?): their statistics cannot tell one channel from another, so every "
            "selection and correction would be fitted to a single input; pass real, varied "
            "inputs"
        )
    if offset == 1:
        info.warnings.append(
            "calibration: a single example; statistics of one input describe that input "
            "only (use a few hundred representative examples)"
        )
    elif distinct < offset:
        info.warnings.append(
            f"calibration: only {distinct} of the {offset} examples are distinct; the "
            "repeats add no information (row counts are scaled by "
            f"{distinct}/{offset} when judging whether the data suffice)"
        )
    return info


def rows_per_group(
    groups: Sequence[UnitGroup], stats: Mapping[tuple[int, str], Any], info: CalibrationInfo
) -> dict[int, float]:
    """Per group, the calibration rows of its least-fed consumer (among those that saw
    any), repeated examples counted once: how much data its fits have."""
    rows: dict[int, float] = {}
    for g in groups:
        counts = [
            acc.count
            for s in g.consumers
            if (acc := stats.get((g.index, s.module))) is not None and acc.count > 0
        ]
        if counts:
            rows[g.index] = min(counts) * info.distinct_share
    return rows


def label_pair_hint(batch: Any) -> str | None:
    """A hint when a batch looks like an ``(inputs, labels)`` pair of a labelled loader.

    Example::

        >>> label_pair_hint((torch.randn(4, 3), torch.tensor([0, 1, 1, 0]))) is not None
        True
    """
    if not isinstance(batch, (tuple, list)) or len(batch) != 2:
        return None
    x, y = batch
    if (
        isinstance(x, torch.Tensor)
        and isinstance(y, torch.Tensor)
        and not y.is_floating_point()
        and y.dim() == 1
        and x.dim() >= 1
        and y.shape[0] == x.shape[0]
    ):
        return (
            "The calibration batches look like (inputs, labels) pairs of a labelled "
            "DataLoader, and a tuple is passed as positional arguments: strip the labels "
            "with spectrim.inputs_only(loader)"
        )
    return None


def trace_checked(
    model: nn.Module, example: Any, *, verify: bool = True, seed: int = 0
) -> tuple[Analysis, list[str]]:
    """:func:`~spectrim.graph.verify.trace_and_check`, with the ``inputs_only`` hint when
    the model cannot run on a batch that looks like an ``(inputs, labels)`` pair."""
    try:
        return trace_and_check(model, example, verify=verify, seed=seed)
    except (RuntimeError, ValueError) as exc:  # ValueError: the model fails by itself
        hint = label_pair_hint(example)
        if hint is None:
            raise
        raise type(exc)(f"{exc}. {hint}") from exc.__cause__
