"""Wall-clock latency of a model's forward pass.

Times are seconds per forward pass on the whole batch of ``example_inputs`` (``time.perf_counter``,
under ``torch.no_grad()`` in eval mode, with each submodule's ``training`` flag restored
afterwards). Inputs are moved to the model's device once, before timing; on CUDA/MPS the device
is synchronised around every call. Latency is noisy: compare two models with
:func:`compare_latency`, which interleaves their calls in one run so that machine-load drifts
affect both alike.

Example::

    >>> import torch
    >>> from torch import nn
    >>> from spectrim.evaluation.latency import measure_latency
    >>> result = measure_latency(nn.Linear(64, 64), torch.randn(8, 64), repeats=5)
    >>> result.p10 <= result.median <= result.p90, result.batch_size
    (True, 8)
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from spectrim.evaluation._common import (
    batch_size_of,
    call_model,
    check_inputs,
    eval_mode,
    first_tensor,
    model_device,
    to_device,
)

__all__ = ["LatencyResult", "compare_latency", "measure_latency", "module_latencies"]


@dataclass(frozen=True)
class LatencyResult:
    """Latency statistics of a forward pass, in seconds per call on the whole batch.

    Attributes:
        median: median time of one forward pass.
        p10: 10th percentile.
        p90: 90th percentile.
        batch_size: batch size of the inputs (first dimension of the first tensor).
        repeats: number of timed calls.

    Example::

        >>> LatencyResult(median=0.02, p10=0.01, p90=0.03, batch_size=4, repeats=20).per_example
        0.005
    """

    median: float
    p10: float
    p90: float
    batch_size: int
    repeats: int

    @property
    def per_example(self) -> float:
        """Median seconds per example (``median / batch_size``)."""
        return self.median / self.batch_size

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable view of the result (with ``per_example``)."""
        return {**asdict(self), "per_example": self.per_example}


def _check_counts(warmup: int, repeats: int, threads: int | None) -> None:
    if isinstance(warmup, bool) or not isinstance(warmup, int) or warmup < 0:
        raise ValueError(f"warmup must be a non-negative integer, got {warmup!r}")
    if isinstance(repeats, bool) or not isinstance(repeats, int) or repeats < 1:
        raise ValueError(f"repeats must be a positive integer, got {repeats!r}")
    if threads is not None and (
        isinstance(threads, bool) or not isinstance(threads, int) or threads < 1
    ):
        raise ValueError(f"threads must be None or a positive integer, got {threads!r}")


@contextmanager
def _num_threads(threads: int | None) -> Iterator[None]:
    if threads is None:
        yield
        return
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def _synchroniser(device: torch.device | None) -> Callable[[], None] | None:
    if device is None:
        return None
    if device.type == "cuda":
        return lambda: torch.cuda.synchronize(device)
    if device.type == "mps":
        return torch.mps.synchronize
    return None


class _Timer:
    """Times forward passes of one model on inputs already on its device."""

    def __init__(self, model: nn.Module, example_inputs: Any) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"expected an nn.Module, got {type(model).__name__!r}")
        self.model = model
        device = model_device(model)
        if device is None:
            tensor = first_tensor(example_inputs)
            device = tensor.device if tensor is not None else None
        self.inputs = to_device(example_inputs, device)
        self.sync = _synchroniser(device)
        self.times: list[float] = []

    def __call__(self, record: bool = True) -> None:
        if self.sync is not None:
            self.sync()
        start = time.perf_counter()
        output = call_model(self.model, self.inputs)
        if self.sync is not None:
            self.sync()
        elapsed = time.perf_counter() - start
        del output
        if record:
            self.times.append(elapsed)

    def result(self, batch_size: int) -> LatencyResult:
        p10, median, p90 = np.percentile(np.asarray(self.times, dtype=np.float64), [10, 50, 90])
        return LatencyResult(
            median=float(median),
            p10=float(p10),
            p90=float(p90),
            batch_size=batch_size,
            repeats=len(self.times),
        )


def measure_latency(
    model: nn.Module,
    example_inputs: Any,
    warmup: int = 3,
    repeats: int = 20,
    threads: int | None = None,
) -> LatencyResult:
    """Median, 10th and 90th percentile seconds per forward pass of *model* on *example_inputs*.

    Args:
        model: the model to time (left unmodified; training flags restored).
        example_inputs: a tensor, a tuple/list of positional arguments or a dict of keyword
            arguments; the first dimension of the first tensor is the reported batch size.
        warmup: untimed calls made first.
        repeats: timed calls.
        threads: if given, ``torch.set_num_threads(threads)`` while timing (restored after).

    Example::

        >>> measure_latency(nn.Linear(8, 8), torch.randn(2, 8), warmup=1, repeats=3).repeats
        3
    """
    _check_counts(warmup, repeats, threads)
    check_inputs(example_inputs)
    batch = batch_size_of(example_inputs)
    timer = _Timer(model, example_inputs)
    with _num_threads(threads), eval_mode(model), torch.no_grad():
        for _ in range(warmup):
            timer(record=False)
        for _ in range(repeats):
            timer()
    return timer.result(batch)


def compare_latency(
    original: nn.Module,
    compressed: nn.Module,
    example_inputs: Any,
    warmup: int = 3,
    repeats: int = 20,
    threads: int | None = None,
) -> dict[str, Any]:
    """Time two models in one interleaved run and report the speedup of *compressed*.

    Calls alternate between the models in the counterbalanced order AB BA AB BA …, so that
    slow drifts of the machine's load and any advantage of running first or second are shared
    equally. Both models get ``warmup`` untimed and ``repeats`` timed calls.

    Returns a JSON-serialisable dict with ``original_median`` and ``compressed_median`` (seconds
    per forward pass), ``speedup`` (``original_median / compressed_median``; > 1 means the
    compressed model is faster), the full statistics under ``original`` and ``compressed``
    (see :class:`LatencyResult`), and ``batch_size``, ``repeats``, ``threads``.

    Example::

        >>> big, small = nn.Linear(256, 256), nn.Linear(256, 16)
        >>> report = compare_latency(big, small, torch.randn(4, 256), repeats=5)
        >>> sorted(report)[:4]
        ['batch_size', 'compressed', 'compressed_median', 'original']
    """
    _check_counts(warmup, repeats, threads)
    check_inputs(example_inputs)
    batch = batch_size_of(example_inputs)
    timer_a = _Timer(original, example_inputs)
    timer_b = _Timer(compressed, example_inputs)
    with _num_threads(threads), eval_mode(original, compressed), torch.no_grad():
        for step in range(warmup + repeats):
            record = step >= warmup
            first, second = (timer_a, timer_b) if step % 2 == 0 else (timer_b, timer_a)
            first(record)
            second(record)
    result_a, result_b = timer_a.result(batch), timer_b.result(batch)
    speedup = result_a.median / result_b.median if result_b.median > 0 else float("inf")
    return {
        "original_median": result_a.median,
        "compressed_median": result_b.median,
        "speedup": speedup,
        "original": result_a.to_dict(),
        "compressed": result_b.to_dict(),
        "batch_size": batch,
        "repeats": repeats,
        "threads": threads,
    }


def module_latencies(
    model: nn.Module,
    example_inputs: Any,
    warmup: int = 3,
    repeats: int = 10,
    threads: int | None = None,
) -> tuple[dict[str, float], float]:
    """Median seconds per forward pass spent in each leaf module, and in the whole model.

    Every leaf module (one without children) is timed between its forward pre-hook and
    its forward hook (summed when it is called several times in one pass), on the device
    the model is on (synchronised on CUDA); the whole pass is timed around the call.  The
    difference between the whole and the sum is what functional ops (``F.relu``, ``+``,
    reshapes) and Python cost.

    Example::

        >>> net = nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 8))
        >>> per, total = module_latencies(net, torch.randn(32, 64), warmup=1, repeats=3)
        >>> sorted(per), 0 < sum(per.values()) <= total
        (['0', '1', '2'], True)
    """
    _check_counts(warmup, repeats, threads)
    check_inputs(example_inputs)
    timer = _Timer(model, example_inputs)
    sync = timer.sync
    leaves = {n: m for n, m in model.named_modules() if n and not any(True for _ in m.children())}
    spent: dict[str, float] = {}
    started: dict[str, list[float]] = {n: [] for n in leaves}

    def pre(name: str) -> Callable[..., None]:
        def hook(*_: Any) -> None:
            if sync is not None:
                sync()
            started[name].append(time.perf_counter())

        return hook

    def post(name: str) -> Callable[..., None]:
        def hook(*_: Any) -> None:
            if sync is not None:
                sync()
            spent[name] = spent.get(name, 0.0) + time.perf_counter() - started[name].pop()

        return hook

    handles = []
    for name, module in leaves.items():
        handles.append(module.register_forward_pre_hook(pre(name)))
        handles.append(module.register_forward_hook(post(name)))
    per_call: list[dict[str, float]] = []
    try:
        with _num_threads(threads), eval_mode(model), torch.no_grad():
            for step in range(warmup + repeats):
                spent.clear()
                timer(record=step >= warmup)
                if step >= warmup:
                    per_call.append(dict(spent))
    finally:
        for h in handles:
            h.remove()
    names = sorted({n for call in per_call for n in call})
    per = {n: float(np.median([call.get(n, 0.0) for call in per_call])) for n in names}
    return per, timer.result(batch_size_of(example_inputs)).median
