"""Repair: a short knowledge-distillation fine-tune of a compressed model against its original.

Compression without fine-tuning keeps most of what a model computes; a short repair buys
the rest back. The compressed model (the student) is trained to reproduce the original
model's outputs (the teacher) on unlabelled inputs: no labels, so calibration images or
any unlabelled set of the same kind will do.

* loss ``"mse"`` (default): ``‖s − t‖² / ‖t‖²`` on the outputs (logits, embeddings, any
  tensor output), the relative output error the compression itself minimises;
* loss ``"kl"``: ``T²·KL(softmax(t/T) ‖ softmax(s/T))`` on class logits (Hinton et al.
  2015);

SGD with Nesterov momentum and a cosine learning rate to zero over the steps. BatchNorm
statistics are re-estimated on the repair data first and then kept
(``batch_norm="recalibrate"``): the teacher runs in evaluation mode, and batch statistics
in the student alone would start the repair further from it.
Image batches (4-D tensors) can be augmented with random flips and crops shifted by up to 4
pixels, each image its own (``augment="flip-crop"``, the usual CIFAR recipe).

Example::

    >>> import torch, torch.nn as nn
    >>> _ = torch.manual_seed(0)
    >>> teacher = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 4)).eval()
    >>> student = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4))
    >>> data = [torch.randn(64, 8) for _ in range(8)]
    >>> fixed, report = repair(student, teacher, data, RepairConfig(epochs=5, lr=0.05))
    >>> report.steps, report.loss_last < report.loss_first
    (40, True)
"""

from __future__ import annotations

import copy
import itertools
import math
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from functools import partial
from typing import Any
from warnings import warn as _warn

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from spectrim.calibration.batches import drop_padding, token_mask
from spectrim.calibration.blocks import find_chain
from spectrim.evaluation.metrics import split_batch
from spectrim.graph.trace import call_model

__all__ = ["RepairConfig", "RepairReport", "recalibrate_batch_norm", "repair"]

_LOSSES = ("mse", "kl")
_AUGMENTS = (None, "flip", "flip-crop")
_SHUFFLES = ("examples", "batches")


@dataclass(frozen=True)
class RepairConfig:
    """How long and how to repair (JSON round-trips via :meth:`to_dict`).

    Attributes:
        epochs: passes over the data (fractions allowed); ignored when ``steps`` is set.
        steps: optimiser steps (one per batch).
        lr: peak learning rate, cosine to zero.
        warmup: the fraction of the steps over which the learning rate rises linearly
            to ``lr`` (``lr/n`` at the first of those ``n`` steps) before the cosine
            (``0``, default: none).
        average: the decay of an exponential moving average of the student's weights,
            updated after every step and returned instead of the last weights (``0``,
            default: the last weights; ``0.99``–``0.999`` is the usual range).  Buffers
            (BatchNorm statistics) are the last ones.
        optimizer: ``"sgd"`` (default; Nesterov momentum) or ``"adamw"`` (``momentum``
            is its ``β₁``; the usual choice for transformers, at ``lr`` about 1e-4).
        momentum: SGD momentum.
        weight_decay: L2 penalty.
        loss: ``"mse"`` (relative output error) or ``"kl"`` (softened class
            probabilities at ``temperature``).
        temperature: for ``"kl"``.
        augment: ``None``, ``"flip"`` or ``"flip-crop"`` (4-D image batches only).
        mix: mixup on the inputs (``0``, default: off): each example of a floating-point
            tensor batch (after ``augment``) is blended with another of the same batch,
            ``λ·x + (1 − λ)·x'``, ``λ ~ Beta(mix, mix)`` per example, and the teacher and
            the student see the same blend.  With no labels to mix, this is "function
            matching" (Beyer et al. 2022): the student learns the teacher's outputs
            between the examples too, not only on them.  Other batches (token ids,
            dicts) are not mixed (the report's ``warnings`` say so).
        batch_norm: ``"recalibrate"``: every BatchNorm's running statistics
            are first re-estimated on up to 32 batches of the repair data, then kept
            (normalising as in evaluation; the affine weights still train);
            ``"freeze"``: kept as they are; ``"train"``: normalise by batch statistics and
            re-estimate them as training goes; ``"auto"`` (default): ``"recalibrate"`` or
            ``"freeze"``, whichever starts with the lower distillation loss on up to
            :data:`PROBE_BATCHES` batches of the data (the report's ``batch_norm`` says
            which).  Neither wins everywhere (docs/results.md): on ResNet-56 at half
            width, 100 steps (``benchmarks/repair_cifar.py --train 12800``), ``id``
            keeps 87.9% recalibrated and 88.4% frozen, and ``l1`` 88.1% recalibrated
            and 41.0% frozen (its statistics no longer fit its narrower layers); a
            model whose consumers were refitted to the shipped statistics
            (``sequential_fit="residual"``) starts at half the loss frozen and ends one
            epoch 0.4 points higher.
        dropout: train with the student's dropout (and other training-mode behaviour,
            e.g. stochastic depth) switched on; default off: the student runs in
            evaluation mode but for BatchNorm, and matches the teacher's outputs as
            they are.  On all-MiniLM-L6-v2 at half its FFN the first step's relative
            error was 0.29 with the dropout on and 0.11 without (docs/results.md).
        features: weight of a second term, the relative MSE of the outputs of the
            model's chain of blocks (``calibration.blocks.find_chain``: a ResNet's
            residual blocks, a transformer's layers) averaged over the blocks whose
            outputs keep their shape; ``0`` (default): the outputs alone.  The blocks
            give every stage of the student its own target, not only what reaches the
            logits.
        shuffle: ``"examples"`` (default): every epoch draws the examples of all the
            batches in a new random order and cuts them into as many batches, so a list
            made in file order (an image folder sorted by class) does not train one
            class per step, and the BatchNorm statistics see every class at once;
            text padded per batch is re-padded to each new batch's longest sentence;
            batches that differ otherwise keep their examples together (the report's
            ``shuffle`` says which ran);
            ``"batches"``: the batches as given, in a random order.
        seed: the order of the examples and the augmentation.
    """

    epochs: float = 1.0
    steps: int | None = None
    lr: float = 0.01
    warmup: float = 0.0
    average: float = 0.0
    optimizer: str = "sgd"
    momentum: float = 0.9
    weight_decay: float = 0.0
    loss: str = "mse"
    temperature: float = 4.0
    augment: str | None = None
    mix: float = 0.0
    batch_norm: str = "auto"
    dropout: bool = False
    features: float = 0.0
    shuffle: str = "examples"
    seed: int = 0

    def __post_init__(self) -> None:
        if self.steps is None and not (math.isfinite(self.epochs) and self.epochs > 0):
            raise ValueError(f"repair: epochs={self.epochs!r} must be a positive number")
        if self.steps is not None and (isinstance(self.steps, bool) or int(self.steps) < 1):
            raise ValueError(f"repair: steps={self.steps!r} must be a positive integer")
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise ValueError(f"repair: lr={self.lr!r} must be a positive number")
        if not (math.isfinite(self.warmup) and 0 <= self.warmup < 1):
            raise ValueError(f"repair: warmup={self.warmup!r} must be in [0, 1)")
        if not (math.isfinite(self.average) and 0 <= self.average < 1):
            raise ValueError(f"repair: average={self.average!r} must be in [0, 1)")
        if self.optimizer not in ("sgd", "adamw"):
            raise ValueError(f"repair: optimizer={self.optimizer!r} must be 'sgd' or 'adamw'")
        if self.loss not in _LOSSES:
            raise ValueError(f"repair: loss={self.loss!r} must be one of {', '.join(_LOSSES)}")
        if self.augment not in _AUGMENTS:
            raise ValueError(
                f"repair: augment={self.augment!r} must be None, 'flip' or 'flip-crop'"
            )
        if not (math.isfinite(self.mix) and self.mix >= 0):
            raise ValueError(f"repair: mix={self.mix!r} must be a number >= 0")
        if self.batch_norm not in _BATCH_NORM:
            raise ValueError(
                f"repair: batch_norm={self.batch_norm!r} must be one of {', '.join(_BATCH_NORM)}"
            )
        if not self.temperature > 0:
            raise ValueError(f"repair: temperature={self.temperature!r} must be positive")
        if not isinstance(self.dropout, bool):
            raise ValueError(f"repair: dropout={self.dropout!r} must be True or False")
        if not (math.isfinite(self.features) and self.features >= 0):
            raise ValueError(f"repair: features={self.features!r} must be a number >= 0")
        if self.shuffle not in _SHUFFLES:
            raise ValueError(
                f"repair: shuffle={self.shuffle!r} must be one of {', '.join(_SHUFFLES)}"
            )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def parse(cls, value: RepairConfig | Mapping[str, Any] | None) -> RepairConfig | None:
        """A config from itself, a dict of its fields, or ``None``."""
        if value is None or isinstance(value, RepairConfig):
            return value
        if isinstance(value, Mapping):
            unknown = set(value) - set(cls.__dataclass_fields__)
            if unknown:
                raise ValueError(f"repair: unknown option(s) {', '.join(sorted(unknown))}")
            return cls(**value)
        raise TypeError(
            f"repair must be a RepairConfig, a dict or None, got {type(value).__name__}"
        )


@dataclass
class RepairReport:
    """What a repair did: steps, seconds and the distillation loss along the way."""

    steps: int
    examples: int
    seconds: float
    loss_first: float
    loss_last: float
    #: mean loss of every tenth of the run, in order
    loss_curve: list[float] = field(default_factory=list)
    config: dict[str, Any] = field(default_factory=dict)
    #: what was done with the BatchNorm statistics (``"auto"`` resolved; "" for none)
    batch_norm: str = ""
    #: ``batch_norm="auto"``: the probe batches' loss with the statistics kept and
    #: re-estimated
    batch_norm_losses: dict[str, float] = field(default_factory=dict)
    #: the distillation loss on the probe batches (up to :data:`PROBE_BATCHES` of the
    #: data, no augmentation, every module in evaluation mode) where the training began
    #: (after the BatchNorm step) and where it ended (NaN: data without a length)
    probe_loss_start: float = math.nan
    probe_loss_end: float = math.nan
    #: ``"repaired"``, or ``"given"`` when the repair ended at a higher probe loss than it
    #: began and the model was put back as given (see ``warnings``)
    kept: str = "repaired"
    #: how the data was shuffled: ``"examples"`` (mixed across batches every epoch) or
    #: ``"batches"`` (their order only; with the reason when ``"examples"`` was asked)
    shuffle: str = ""
    warnings: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class _Pool:
    """The examples of a sequence of batches, drawn into new batches in a seeded order.

    A list of batches made in file order is often sorted (an image folder by class, an
    archive by label, a text file by source): shuffling only the order of the batches
    leaves each step one class's, and BatchNorm statistics averaged over such batches
    miss the variance between them.  So every epoch draws a random permutation of all the
    examples and cuts it into as many batches as were given.  Tensor batches, ``(x, y)``
    pairs (the labels are not used) and dicts of tensors mix when every batch has the
    same shape but for its length.  Text padded to each batch's longest sentence mixes
    too (:class:`_Padding`): each new batch is what the tokenizer gives for its
    sentences.  Batches that differ otherwise keep their examples together, and only
    their order is shuffled (:attr:`mixed` is ``False``).
    """

    def __init__(self, batches: Sequence[Any], shuffle: str) -> None:
        self.xs = [split_batch(b)[0] for b in batches]
        self.padding = _Padding.of(self.xs) if shuffle == "examples" else None
        if self.padding is not None:
            self.xs = [self.padding.extend(x) for x in self.xs]
        #: why examples asked to mix do not (``None``: they do, or were not asked to)
        self.reason = _unmixable(self.xs) if shuffle == "examples" else None
        self.mixed = shuffle == "examples" and self.reason is None
        sizes = [_length(x) for x in self.xs] if self.mixed else []
        self.offsets = torch.tensor([0, *itertools.accumulate(sizes)])

    def __len__(self) -> int:
        return len(self.xs)

    def epoch(self, g: torch.Generator) -> Iterator[Any]:
        """One pass: every example once, in ``len(self)`` batches (seeded by ``g``)."""
        if not self.mixed:
            for i in torch.randperm(len(self.xs), generator=g).tolist():
                yield self.xs[i]
            return
        perm = torch.randperm(int(self.offsets[-1]), generator=g)
        for chunk in perm.tensor_split(len(self.xs)):
            if len(chunk):
                yield self._gather(chunk)

    def draw(self, n: int, seed: int) -> list[Any]:
        """The first ``n`` batches of a pass seeded by ``seed``."""
        return list(itertools.islice(self.epoch(torch.Generator().manual_seed(seed)), n))

    def _gather(self, idx: torch.Tensor) -> Any:
        """The examples ``idx`` (global positions) as one batch."""
        which = torch.searchsorted(self.offsets, idx, right=True) - 1
        parts = []
        for b in which.unique().tolist():
            rows = idx[which == b] - self.offsets[b]
            parts.append(_rows(self.xs[b], rows))
        batch = _cat(parts)
        return self.padding.trim(batch) if self.padding is not None else batch


@dataclass(frozen=True)
class _Padding:
    """How padded text batches become one length and back.

    Dict batches whose ``attention_mask`` is ``(batch, tokens)`` with a different number of
    tokens per batch (text padded to each batch's longest sentence) cannot be
    concatenated.  :meth:`extend` pads each key of that shape to the longest batch's
    length, on the side the batches were padded on, with the value each key holds at
    padded positions (the tokenizer's pad id, mask 0); :meth:`trim` removes the columns
    that are padding in every row of a new batch.  A batch of mixed examples is then the
    one the tokenizer gives for its sentences, to the token.  ``None`` (from :meth:`of`)
    when the batches are not such text: no mask, a mask with gaps, padding on both sides,
    pad values that differ, or other tensors of the mask's shape past two axes.
    """

    length: int
    left: bool
    keys: tuple[str, ...]
    values: tuple[int | float, ...]

    @staticmethod
    def of(xs: Sequence[Any]) -> _Padding | None:
        """The padding of ``xs``, when they are padded text of different lengths."""
        if not xs or not all(isinstance(x, Mapping) for x in xs):
            return None
        masks = [x.get("attention_mask") for x in xs]
        if not all(isinstance(m, torch.Tensor) and m.dim() == 2 for m in masks):
            return None
        if len({int(m.shape[1]) for m in masks}) == 1:
            return None  # one length: the batches mix as they are
        keys = tuple(
            sorted(
                k
                for k, v in xs[0].items()
                if isinstance(v, torch.Tensor) and tuple(v.shape[:2]) == tuple(masks[0].shape)
            )
        )
        real = [m != 0 for m in masks]
        steps = [r.int().diff(dim=1) for r in real]
        right = all(bool((d <= 0).all()) for d in steps)  # 1…1 0…0 in every row
        left = all(bool((d >= 0).all()) for d in steps)  # 0…0 1…1
        if right == left and not right:
            return None
        values: list[int | float] = []
        for k in keys:
            found: set[int | float] = set()
            for x, r in zip(xs, real, strict=True):
                v = x.get(k)
                if not isinstance(v, torch.Tensor) or v.dim() != 2 or v.shape != r.shape:
                    return None
                found.update(v[~r].unique().tolist())
            if len(found) > 1:
                return None
            values.append(found.pop() if found else 0)
        length = max(int(m.shape[1]) for m in masks)
        return _Padding(length, left and not right, keys, tuple(values))

    def extend(self, x: Mapping[str, Any]) -> dict[str, Any]:
        """``x`` padded to :attr:`length`."""
        out = dict(x)
        for k, value in zip(self.keys, self.values, strict=True):
            v = x[k]
            n = self.length - int(v.shape[1])
            out[k] = F.pad(v, (n, 0) if self.left else (0, n), value=value) if n else v
        return out

    def trim(self, x: Mapping[str, Any]) -> dict[str, Any]:
        """``x`` without the columns that are padding in every row."""
        used = (x["attention_mask"] != 0).any(0).nonzero().flatten()
        if not len(used):
            return dict(x)
        cols = slice(int(used[0]), None) if self.left else slice(None, int(used[-1]) + 1)
        return {k: v[:, cols] if k in self.keys else v for k, v in x.items()}


def _shuffle_note(pool: _Pool | None) -> str:
    """The report's ``shuffle``."""
    if pool is None:
        return ""
    if pool.mixed:
        return "examples"
    return f"batches ({pool.reason})" if pool.reason else "batches"


def _length(x: Any) -> int:
    if isinstance(x, torch.Tensor):
        return int(x.shape[0])
    return next(int(v.shape[0]) for v in x.values() if isinstance(v, torch.Tensor))


def _signature(x: Any) -> Any:
    """What must agree between batches for their examples to mix: the tensors' shapes
    past the batch axis, dtypes and devices, and a dict's other values."""
    if isinstance(x, torch.Tensor):
        return ("tensor", tuple(x.shape[1:]), x.dtype, x.device) if x.dim() else None
    if isinstance(x, Mapping):
        tensors = {k: v for k, v in x.items() if isinstance(v, torch.Tensor)}
        if not tensors or len({int(v.shape[0]) for v in tensors.values() if v.dim()}) != 1:
            return None
        if any(v.dim() == 0 for v in tensors.values()):
            return None
        sig = tuple(sorted((k, tuple(v.shape[1:]), v.dtype, v.device) for k, v in tensors.items()))
        others = tuple(sorted((k, repr(v)) for k, v in x.items() if k not in tensors))
        return ("dict", sig, others)
    return None


def _unmixable(xs: Sequence[Any]) -> str | None:
    """Why the examples of ``xs`` cannot be mixed across batches; ``None`` when they can."""
    first = _signature(xs[0]) if xs else None
    if first is None:
        return "the batches are not tensors or dicts of tensors"
    for i, x in enumerate(xs[1:], 1):
        if _signature(x) != first:
            return f"batch {i} differs from batch 0 in shape, dtype or keys"
    return None


def _rows(x: Any, rows: torch.Tensor) -> Any:
    if isinstance(x, torch.Tensor):
        return x.index_select(0, rows.to(x.device))
    return {k: _rows(v, rows) if isinstance(v, torch.Tensor) else v for k, v in x.items()}


def _cat(parts: list[Any]) -> Any:
    if isinstance(parts[0], torch.Tensor):
        return torch.cat(parts) if len(parts) > 1 else parts[0]
    return {
        k: _cat([p[k] for p in parts]) if isinstance(v, torch.Tensor) else v
        for k, v in parts[0].items()
    }


class _Steps:
    """The first ``total`` batches of a stream, with a length (for progress bars)."""

    def __init__(self, total: int, stream: Iterable[Any]) -> None:
        self.total, self.stream = total, stream

    def __len__(self) -> int:
        return self.total

    def __iter__(self) -> Iterator[Any]:
        return iter(b for _, b in zip(range(self.total), self.stream))


def _output(out: Any) -> torch.Tensor:
    """The tensor a model's output stands for: itself, ``logits``, ``last_hidden_state``
    or the first item of a tuple."""
    if isinstance(out, torch.Tensor):
        return out
    for key in ("logits", "last_hidden_state"):
        value = getattr(out, key, None)
        if isinstance(value, torch.Tensor):
            return value
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        return out[0]
    raise TypeError(f"repair: cannot find a tensor in the model's output ({type(out).__name__})")


def _augment(x: Any, how: str | None, g: torch.Generator) -> Any:
    if how is None or not isinstance(x, torch.Tensor) or x.dim() != 4:
        return x
    flip = torch.rand(x.shape[0], generator=g) < 0.5
    x = torch.where(flip[:, None, None, None].to(x.device), x.flip(3), x)
    if how == "flip-crop":  # every image its own shift of up to 4 pixels each way
        n, c, h, w = x.shape
        pad = F.pad(x, (4, 4, 4, 4))
        dy, dx = torch.randint(0, 9, (2, n), generator=g).to(x.device)
        rows = (dy[:, None] + torch.arange(h, device=x.device))[:, None, :, None]
        cols = (dx[:, None] + torch.arange(w, device=x.device))[:, None, None, :]
        batch = torch.arange(n, device=x.device)[:, None, None, None]
        x = pad[batch, torch.arange(c, device=x.device)[None, :, None, None], rows, cols]
    return x


def _mix(x: Any, alpha: float, g: torch.Generator) -> tuple[Any, bool]:
    """``x`` with each example blended with another of the batch (``λ ~ Beta(alpha,
    alpha)`` per example, seeded by ``g``), and whether it was (floating-point tensors
    only).

    >>> x = torch.stack([torch.zeros(3), torch.ones(3)])
    >>> y, done = _mix(x, 1.0, torch.Generator().manual_seed(0))
    >>> done, bool(((y >= 0) & (y <= 1)).all()), bool((y[:, 0:1] == y).all())
    (True, True, True)
    """
    if alpha <= 0 or not isinstance(x, torch.Tensor) or not x.is_floating_point() or not x.dim():
        return x, False
    n = int(x.shape[0])
    seed = int(torch.randint(0, 2**62, (1,), generator=g))
    lam = torch.from_numpy(np.random.default_rng(seed).beta(alpha, alpha, size=n))
    lam = lam.to(device=x.device, dtype=x.dtype).reshape(n, *([1] * (x.dim() - 1)))
    other = x[torch.randperm(n, generator=g).to(x.device)]
    return lam * x + (1 - lam) * other, True


#: batches whose statistics ``batch_norm="recalibrate"`` averages
RECALIBRATION_BATCHES = 32
#: batches on which ``batch_norm="auto"`` compares the statistics kept and re-estimated
PROBE_BATCHES = 4
_BATCH_NORM = ("auto", "recalibrate", "freeze", "train")


@torch.no_grad()
def _recalibrate(
    model: nn.Module, norms: list[nn.modules.batchnorm._BatchNorm], xs: Sequence[Any]
) -> None:
    """Re-estimate every BatchNorm's running statistics as the plain average over the
    inputs ``xs`` (batches), in the model's current weights."""
    if not xs:
        return
    saved = [(m.momentum, m.training) for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # a cumulative average
        m.train()
    try:
        for x in xs:
            call_model(model, x)
    finally:
        for m, (momentum, training) in zip(norms, saved):
            m.momentum = momentum
            m.train(training)


def recalibrate_batch_norm(model: nn.Module, batches: Sequence[Any], seed: int = 0) -> int:
    """Re-estimate every BatchNorm's running statistics of ``model`` in place, as the plain
    average over up to :data:`RECALIBRATION_BATCHES` batches of the examples of
    ``batches`` drawn in a seeded random order (mixed across the batches as given, as
    :class:`RepairConfig`'s ``shuffle="examples"`` does: batches sorted by class would
    leave out the variance between classes), with no training; the model's train/eval
    mode is kept.  Returns the number of BatchNorms.

    After spectrim's corrections alone this is measured not to help
    (``benchmarks/levers.py``); it is what ``repair`` does first by default.

    Example:
        >>> net = nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2)).eval()
        >>> recalibrate_batch_norm(net, [torch.randn(4, 1, 5, 5) + 3])
        1
        >>> bool(net[1].running_mean.abs().sum() > 0), net.training
        (True, False)
    """
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    _recalibrate(model, norms, _Pool(batches, "examples").draw(RECALIBRATION_BATCHES, seed))
    return len(norms)


class _Probe:
    """Up to :data:`PROBE_BATCHES` seeded batches of the repair data (no augmentation)
    and the teacher's outputs on them: the distillation loss of a student, every module
    in evaluation mode."""

    def __init__(self, teacher: nn.Module, pool: _Pool, cfg: RepairConfig) -> None:
        self.cfg = cfg
        self.xs = pool.draw(PROBE_BATCHES, cfg.seed)
        with torch.no_grad():
            self.targets = [_output(call_model(teacher, x)).detach() for x in self.xs]

    @torch.no_grad()
    def loss(self, student: nn.Module) -> float:
        modes = [(m, m.training) for m in student.modules()]
        student.eval()
        try:
            total = 0.0
            for x, t in zip(self.xs, self.targets):
                s = _output(call_model(student, x))
                total += float(_loss(s, t.to(s.dtype), self.cfg, token_mask(x)))
        finally:
            for m, was in modes:
                m.train(was)
        return total / len(self.xs)


def _choose_batch_norm(
    student: nn.Module,
    norms: list[nn.modules.batchnorm._BatchNorm],
    xs: Sequence[Any],
    probe: _Probe,
    kept: float,
) -> tuple[str, dict[str, float]]:
    """``batch_norm="auto"``: ``"recalibrate"`` when re-estimating the statistics lowers
    the probe's loss below ``kept`` (the loss with them as they are), else ``"freeze"``;
    and the two losses.  The statistics are left as they were either way (the caller
    recalibrates on the same ``xs``)."""
    saved = [{k: v.clone() for k, v in m.state_dict().items()} for m in norms]
    try:
        _recalibrate(student, norms, xs)
        fresh = probe.loss(student)
    finally:
        for m, state in zip(norms, saved):
            m.load_state_dict(state)
    losses = {"freeze": kept, "recalibrate": fresh}
    return ("recalibrate" if fresh < kept else "freeze"), losses


def _real(x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """``x`` without the padded positions of a text batch (``(B, T, ...)`` outputs)."""
    if mask is None or x.dim() < 2:
        return x
    return drop_padding(x, mask.to(x.device), x.dim() - 1)[0]


def _relative(s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    return (s - t).pow(2).sum() / t.pow(2).sum().clamp_min(1e-12)


def _loss(
    s: torch.Tensor, t: torch.Tensor, cfg: RepairConfig, mask: torch.Tensor | None = None
) -> torch.Tensor:
    if s.shape != t.shape:
        raise ValueError(
            f"repair: the compressed model's output has shape {tuple(s.shape)}, the "
            f"original's {tuple(t.shape)}"
        )
    s, t = _real(s, mask), _real(t, mask)
    if cfg.loss == "kl":
        T = cfg.temperature
        logp = F.log_softmax(s.flatten(0, -2) / T, dim=-1)
        q = F.softmax(t.flatten(0, -2) / T, dim=-1)
        return F.kl_div(logp, q, reduction="batchmean") * T * T
    return _relative(s, t)


class _Blocks:
    """The outputs of the chain's blocks in the teacher and the student, per step."""

    def __init__(self, teacher: nn.Module, student: nn.Module, x: Any) -> None:
        with torch.no_grad():
            chain = find_chain(teacher, x)
        mods = dict(student.named_modules())
        tmods = dict(teacher.named_modules())
        self.names = [n for n in chain if n in mods]
        self.t: dict[str, torch.Tensor] = {}
        self.s: dict[str, torch.Tensor] = {}
        self.handles = [
            m.register_forward_hook(self._keep(n, out))
            for n in self.names
            for m, out in ((tmods[n], self.t), (mods[n], self.s))
        ]

    @staticmethod
    def _keep(name: str, out: dict[str, torch.Tensor]) -> Callable[..., None]:
        def hook(module: nn.Module, args: Any, y: Any) -> None:
            y = y[0] if isinstance(y, (tuple, list)) else y
            if isinstance(y, torch.Tensor):
                out[name] = y

        return hook

    def loss(self, mask: torch.Tensor | None) -> torch.Tensor | None:
        """Mean relative squared error over the blocks whose outputs match in shape
        (the real tokens' positions only)."""
        terms = [
            _relative(_real(s, mask), _real(self.t[n].detach(), mask))
            for n, s in self.s.items()
            if n in self.t and s.shape == self.t[n].shape
        ]
        self.t.clear()
        self.s.clear()
        return torch.stack(terms).mean() if terms else None

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def _schedule(total: int, warmup: float, step: int) -> float:
    """The learning rate's factor at ``step`` of ``total``: linear warmup, then cosine.

    >>> [round(_schedule(10, 0.2, s), 3) for s in (0, 1, 2, 6, 10)]
    [0.5, 1.0, 1.0, 0.5, 0.0]
    """
    rise = round(warmup * total)
    if step < rise:  # the first step already moves
        return (step + 1) / rise
    return 0.5 * (1.0 + math.cos(math.pi * min(step - rise, total - rise) / max(1, total - rise)))


def _trainable(model: nn.Module) -> list[nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def repair(
    model: nn.Module,
    original: nn.Module,
    data: Iterable[Any],
    config: RepairConfig | Mapping[str, Any] | None = None,
    *,
    inplace: bool = False,
    progress: bool | Callable[..., Iterable[Any]] = False,
) -> tuple[nn.Module, RepairReport]:
    """Distil ``original`` into ``model`` on ``data``; ``(repaired, report)``.

    Args:
        model: the compressed model (copied first unless ``inplace``).
        original: the model it was compressed from (never modified; run in eval mode).
        data: a sequence of batches (tensors, ``(x, y)`` pairs whose labels are ignored,
            or dicts), iterated ``epochs`` times in a seeded order; or any iterable when
            ``steps`` is set.
        config: a :class:`RepairConfig` or a dict of its fields (default: one epoch).
        inplace: train ``model`` itself.
        progress: ``True`` for a tqdm bar, or a wrapper of an iterable (which has a
            ``len``: the steps).

    If the training ends with a higher distillation loss on the probe batches (up to
    :data:`PROBE_BATCHES` of ``data``) than it began with, the model is put back as it
    was given (BatchNorm statistics as ``batch_norm`` left them), with a
    ``RuntimeWarning`` and the report's ``kept="given"``: a recipe that diverges
    without reaching NaN never returns a worse model silently.

    Raises:
        ValueError: the two models' outputs differ in shape; an empty ``data``.
        FloatingPointError: the loss became NaN or infinite.
    """
    cfg = RepairConfig.parse(config) or RepairConfig()
    student = model if inplace else copy.deepcopy(model)
    teacher = original
    batches: Sequence[Any] | None = data if isinstance(data, Sequence) else None
    if batches is not None and len(batches) == 0:
        raise ValueError("repair: no data")
    if cfg.steps is not None:
        total = int(cfg.steps)
    elif batches is not None:
        total = max(1, math.ceil(cfg.epochs * len(batches)))
    else:
        raise ValueError("repair: data without a length needs steps=, not epochs=")
    g = torch.Generator().manual_seed(cfg.seed)
    pool = _Pool(batches, cfg.shuffle) if batches is not None else None

    def stream() -> Iterable[Any]:
        while True:
            yield from (data if pool is None else pool.epoch(g))

    params = _trainable(student)
    opt: torch.optim.Optimizer
    if cfg.optimizer == "adamw":
        opt = torch.optim.AdamW(
            params, lr=cfg.lr, betas=(cfg.momentum, 0.999), weight_decay=cfg.weight_decay
        )
    else:
        opt = torch.optim.SGD(
            params, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.momentum > 0,
            weight_decay=cfg.weight_decay,
        )  # fmt: skip
    sched = torch.optim.lr_scheduler.LambdaLR(opt, partial(_schedule, total, cfg.warmup))
    it: Iterable[Any] = _Steps(total, stream())
    if progress is True:
        from tqdm.auto import tqdm

        it = tqdm(it, total=total, desc="repair", unit="step")
    elif callable(progress):
        it = progress(it)
    was_training, teacher_training = student.training, teacher.training
    teacher.eval()
    # without dropout (the default) the student computes what the teacher does: every
    # module in evaluation mode, BatchNorm as batch_norm says
    student.train(cfg.dropout)
    norms = [m for m in student.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    probe = _Probe(teacher, pool, cfg) if pool is not None else None
    # the statistics "recalibrate" averages (the same batches whether "auto" chose it)
    recal = pool.draw(RECALIBRATION_BATCHES, cfg.seed) if pool is not None and norms else []
    how, probe_losses = cfg.batch_norm, dict[str, float]()
    if how == "auto":
        how = "freeze"
        if norms and probe is not None:
            given = probe.loss(student)
            how, probe_losses = _choose_batch_norm(student, norms, recal, probe, given)
    if how == "recalibrate" and norms:
        _recalibrate(student, norms, recal)
    # where the training starts (the probe's loss of these statistics when it has one:
    # its re-estimation used other batches than the one above), to fall back on if the
    # training ends further from the teacher
    if how == "freeze" and probe_losses:
        start = probe_losses["freeze"]
    else:
        start = probe.loss(student) if probe is not None else math.nan
    initial = {k: v.detach().clone() for k, v in student.state_dict().items()}
    for m in norms:
        m.train(how == "train")
    losses: list[float] = []
    examples = unmixed = 0
    blocks: _Blocks | None = None
    # the average of the weights only (the buffers of the last step are used with it)
    ema = (
        torch.optim.swa_utils.AveragedModel(
            student, multi_avg_fn=torch.optim.swa_utils.get_ema_multi_avg_fn(cfg.average)
        )
        if cfg.average > 0
        else None
    )
    t0 = time.perf_counter()
    try:
        for batch in it:
            x = _augment(split_batch(batch)[0] if pool is None else batch, cfg.augment, g)
            if cfg.mix > 0:
                x, done = _mix(x, cfg.mix, g)
                unmixed += not done
            mask = token_mask(x)  # padded text positions stay out of the loss
            if cfg.features > 0 and blocks is None:
                blocks = _Blocks(teacher, student, x)
            with torch.no_grad():
                t = _output(call_model(teacher, x)).detach()
            s = _output(call_model(student, x))
            loss = _loss(s, t.to(s.dtype), cfg, mask)
            if blocks is not None:
                extra = blocks.loss(mask)
                if extra is not None:
                    loss = loss + cfg.features * extra
            if not torch.isfinite(loss.detach()):
                raise FloatingPointError(
                    f"repair: the loss became {float(loss.detach())} at step {len(losses)}; lower lr "
                    f"(now {cfg.lr})"
                )
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            if ema is not None:
                ema.update_parameters(student)
            losses.append(float(loss.detach()))
            examples += int(t.shape[0]) if t.dim() else 1
    finally:
        if blocks is not None:
            blocks.remove()
        student.train(was_training)
        teacher.train(teacher_training)
    if ema is not None and losses:
        with torch.no_grad():
            for p, q in zip(params, _trainable(ema.module), strict=True):
                p.copy_(q)
    student.eval()
    end = probe.loss(student) if probe is not None else math.nan
    warnings: list[str] = []
    if unmixed:
        warnings.append(
            f"repair: mix={cfg.mix:g} left {unmixed} of {len(losses)} batches unmixed: "
            "only floating-point tensor batches are blended"
        )
    if end > start:  # NaN (no probe) compares False
        student.load_state_dict(initial)
        warnings.append(
            f"repair: the distillation loss on {len(probe.xs) if probe else 0} probe batches "
            f"rose from {start:.4g} to {end:.4g} in training; the model is returned as it "
            f"was given (BatchNorm statistics as '{how}' left them; lower lr, now "
            f"{cfg.lr:g}, or check the data)"
        )
        _warn(warnings[-1], RuntimeWarning, stacklevel=2)
    tenth = max(1, len(losses) // 10)
    curve = [
        sum(losses[i : i + tenth]) / len(losses[i : i + tenth])
        for i in range(0, len(losses), tenth)
    ]
    return student, RepairReport(
        steps=len(losses),
        examples=examples,
        seconds=time.perf_counter() - t0,
        loss_first=curve[0],
        loss_last=curve[-1],
        loss_curve=curve,
        config=cfg.to_dict(),
        batch_norm=how if norms else "",
        batch_norm_losses=probe_losses,
        probe_loss_start=start,
        probe_loss_end=end,
        kept="given" if warnings else "repaired",
        shuffle=_shuffle_note(pool),
        warnings=warnings,
    )
