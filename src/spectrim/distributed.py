"""Data-parallel statistics on ``torch.distributed``: the processes of one run as a team.

Under ``torchrun --nproc_per_node N -m spectrim compress ...``, or in the Python API once
the caller has initialised a process group, every process (rank) runs
:func:`spectrim.compress` on the same arguments.  The run is then split as follows:

* **data**: each rank runs its forward passes on its share of the calibration batches
  (batches ``rank, rank + N, ...``: :meth:`Team.shard`);
* **statistics**: every Gram accumulator is summed over the ranks in float64
  (:meth:`Team.reduce`: one ``all_reduce`` of the accumulators' flat states, in buckets of
  :data:`BUCKET_BYTES`), so each rank holds the statistics of the whole calibration set;
  the sequential pass reduces the products of every fit the same way;
* **decisions**: the example the graph is traced on, the kept sets, the widths and the
  sparsity masks are taken from rank 0 (:meth:`Team.broadcast`), so ranks cannot
  disagree even where floating point could;
* **failures**: every collective is preceded by a one-integer status exchange
  (:meth:`Team.sync`), and :meth:`Team.guard` turns an exception on one rank into that
  rank's exception there and a :class:`DistributedError` with its message on every other
  rank, at their next collective: never a hang.

What crosses the network per reduction is ``Σ (m² + m·c)`` doubles over the accumulators
(``m`` a group's width at a consumer, ``c`` a cross term's width), independent of the
number of calibration rows; see docs/design.md §7e.  With the ``nccl`` backend the
reductions run on the GPU (the accumulators live there when the run does); with ``gloo``
they go through host memory.

A single process is a team of one (:data:`SOLO`): every method is then a no-op, so the
pipeline calls them unconditionally.

Example::

    >>> team = Team()  # no process group: a team of one
    >>> team.size, team.rank, team.shard([1, 2, 3])
    (1, 0, [1, 2, 3])
    >>> team.broadcast({"keep": [0, 2]})
    {'keep': [0, 2]}
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any, Protocol, TypeVar

import torch
import torch.distributed as dist

__all__ = ["BUCKET_BYTES", "SOLO", "DistributedError", "Team", "init_from_env"]

T = TypeVar("T")

#: float64 state reduced per ``all_reduce`` call (bounds the temporary copy).
BUCKET_BYTES = 64 << 20


class DistributedError(RuntimeError):
    """Another rank of the run failed; the message names it and says why."""


class Reducible(Protocol):
    """What :meth:`Team.reduce` sums: a state readable and writable as one float64 vector
    (:class:`~spectrim.calibration.GramAccumulator`)."""

    def flat(self) -> torch.Tensor: ...

    def set_flat(self, flat: torch.Tensor) -> None: ...


class Team:
    """The processes computing one compression: rank, size and the collectives the
    pipeline needs (a team of one when no process group is initialised).

    Args:
        group: the process group (default: the world group, when initialised).
    """

    def __init__(self, group: Any = None) -> None:
        self.group = group
        active = dist.is_available() and dist.is_initialized()
        self.rank = dist.get_rank(group) if active else 0
        self.size = dist.get_world_size(group) if active else 1
        self.device = torch.device("cpu")
        if self.size > 1 and dist.get_backend(group) == "nccl":
            self.device = torch.device("cuda", torch.cuda.current_device())
        self._root = dist.get_global_rank(group, 0) if active and group is not None else 0

    def __repr__(self) -> str:
        return f"Team(rank={self.rank}, size={self.size}, device='{self.device}')"

    @property
    def solo(self) -> bool:
        """One process: nothing to exchange."""
        return self.size == 1

    @property
    def is_root(self) -> bool:
        """Rank 0: the rank whose decisions count and which writes results."""
        return self.rank == 0

    def shard(self, batches: Sequence[T]) -> list[T]:
        """This rank's calibration batches: ``batches[rank::size]``.

        Raises:
            ValueError: fewer batches than ranks (every rank needs one); raised on every
                rank alike, so no rank waits for the others.
        """
        if self.solo:
            return list(batches)
        if len(batches) < self.size:
            raise ValueError(
                f"the calibration set has {len(batches)} batch(es) for {self.size} processes: "
                "each process needs at least one (use smaller batches)"
            )
        return list(batches[self.rank :: self.size])

    # ------------------------------------------------------------------ failures

    def sync(self, failure: BaseException | None = None) -> None:
        """Exchange every rank's status; if any rank failed, raise on all of them.

        The failing rank gets its own exception back; the others a
        :class:`DistributedError` naming the failed rank(s) and their messages.
        """
        if self.solo:
            if failure is not None:
                raise failure
            return
        flag = torch.tensor([0 if failure is None else 1], dtype=torch.int64, device=self.device)
        dist.all_reduce(flag, group=self.group)
        if int(flag.item()) == 0:
            return
        text = None if failure is None else f"{type(failure).__name__}: {failure}"
        messages: list[Any] = [None] * self.size
        dist.all_gather_object(messages, text, group=self.group)
        if failure is not None:
            raise failure
        failed = "; ".join(f"rank {r}: {m}" for r, m in enumerate(messages) if m is not None)
        raise DistributedError(f"compression failed on another process ({failed})")

    @contextmanager
    def guard(self) -> Iterator[None]:
        """Run a block on every rank; a failure on any rank fails all of them (the
        failing rank's exception reaches the others' next collective as a
        :class:`DistributedError`), and the block ends with a status exchange, so every
        rank returns or raises together."""
        try:
            yield
        except DistributedError:
            raise
        except Exception as exc:
            self.sync(exc)
            raise
        self.sync()

    # ------------------------------------------------------------------ collectives

    def sum_(self, tensors: Sequence[torch.Tensor]) -> None:
        """Sum float64 ``tensors`` over the ranks, in place."""
        if self.solo or not tensors:
            return
        self.sync()
        pending: list[torch.Tensor] = []
        size = 0
        for t in tensors:
            pending.append(t)
            size += t.numel() * 8
            if size >= BUCKET_BYTES:
                self._all_reduce(pending)
                pending, size = [], 0
        if pending:
            self._all_reduce(pending)

    def _all_reduce(self, tensors: list[torch.Tensor]) -> None:
        flat = torch.cat([t.reshape(-1).to(self.device, torch.float64) for t in tensors])
        dist.all_reduce(flat, group=self.group)
        start = 0
        for t in tensors:
            t.copy_(flat[start : start + t.numel()].view_as(t))
            start += t.numel()

    def reduce(self, items: Mapping[Any, Reducible]) -> None:
        """Sum every item's state over the ranks, in place, in the order of their keys.

        Raises:
            DistributedError: the ranks hold different keys (their models took different
                paths), on every rank.
        """
        if self.solo:
            return
        keys = sorted(items, key=repr)
        digest = hashlib.sha256(repr(keys).encode()).hexdigest()
        self.sync()
        digests: list[Any] = [None] * self.size
        dist.all_gather_object(digests, digest, group=self.group)
        if len(set(digests)) != 1:
            raise DistributedError(
                "the processes measured different statistics (their calibration batches took "
                "different paths through the model); run on one process or use batches of "
                "one shape"
            )
        flats = [items[k].flat() for k in keys]
        self.sum_(flats)
        for k, f in zip(keys, flats):
            items[k].set_flat(f)

    def total(self, value: float) -> float:
        """The sum of a number over the ranks."""
        if self.solo:
            return value
        t = torch.tensor([float(value)], dtype=torch.float64)
        self.sum_([t])
        return float(t.item())

    def gather(self, obj: T) -> list[T]:
        """Every rank's ``obj``, in rank order (pickled; small objects)."""
        if self.solo:
            return [obj]
        self.sync()
        out: list[Any] = [None] * self.size
        dist.all_gather_object(out, obj, group=self.group)
        return out

    def positions(self, lengths: Sequence[int]) -> tuple[list[int], list[int]]:
        """``(global, mine)`` for a shard of :meth:`shard` whose batches have ``lengths``:
        every batch's length in the order of the whole calibration set, and the global
        index of each of this rank's batches.

        Example::

            >>> SOLO.positions([64, 64, 22])
            ([64, 64, 22], [0, 1, 2])
        """
        mine = [self.rank + i * self.size for i in range(len(lengths))]
        if self.solo:
            return list(lengths), mine
        shards = self.gather(list(lengths))
        total = sum(len(s) for s in shards)
        full = [int(shards[i % self.size][i // self.size]) for i in range(total)]
        return full, mine

    def broadcast(self, obj: T) -> T:
        """Rank 0's ``obj`` on every rank (pickled; for decisions, not bulk data)."""
        if self.solo:
            return obj
        self.sync()
        box = [obj if self.is_root else None]
        dist.broadcast_object_list(box, src=self._root, group=self.group)
        return box[0]  # type: ignore[return-value]


#: The team of one process.
SOLO = Team.__new__(Team)
SOLO.group, SOLO.rank, SOLO.size, SOLO.device, SOLO._root = None, 0, 1, torch.device("cpu"), 0


def init_from_env() -> bool:
    """Initialise the default process group from ``torchrun``'s environment
    (``WORLD_SIZE > 1``) if no group exists yet: NCCL when CUDA is available, else gloo.
    Returns whether this call initialised it (the caller then destroys it)."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or not dist.is_available():
        return False
    if dist.is_initialized():
        return False
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("nccl")
    else:
        dist.init_process_group("gloo")
    return True
