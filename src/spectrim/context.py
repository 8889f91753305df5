"""The run context: what every stage of a run shares (seed, device, team, progress).

Example::

    >>> ctx = RunContext(seed=3)
    >>> float(ctx.rng().random()) == float(RunContext(seed=3).rng().random())
    True
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from spectrim.distributed import SOLO, Team

__all__ = ["RunContext"]

_CPU = torch.device("cpu")

Progress = bool | Callable[[Iterable[Any]], Iterable[Any]]


@dataclass(frozen=True)
class RunContext:
    """Seed, device and progress reporting of one run.

    Attributes:
        seed: seeds every random choice of the run (``rng()``).
        device: where the forward passes and the statistics run.
        team: the processes sharing the run (:mod:`spectrim.distributed`; one by default).
        progress: ``True`` for tqdm bars, a wrapper around an iterable, or ``False``.
    """

    seed: int = 0
    device: torch.device = _CPU
    team: Team = SOLO
    progress: Progress = False

    def rng(self) -> np.random.Generator:
        """A fresh generator from the run's seed (the same draws on every call)."""
        return np.random.default_rng(self.seed)

    def wrap(
        self, total: int, desc: str = "calibration", unit: str = "item"
    ) -> Callable[[Iterable[Any]], Iterable[Any]]:
        """A wrapper showing progress over ``total`` items (identity without progress)."""
        if self.progress is True:
            from tqdm.auto import tqdm

            def bar(it: Iterable[Any]) -> Iterable[Any]:
                return tqdm(it, total=total, desc=desc, unit=unit)

            return bar
        if callable(self.progress):
            return self.progress
        return lambda it: it
