"""Typed, serialisable configuration: the compression target and the run options.

Example::

    >>> from spectrim.config import CompressConfig, Target
    >>> Target.parse("macs=0.5")
    Target(kind='macs', value=0.5)
    >>> cfg = CompressConfig(method="id", target="params=0.4", round_to=8)
    >>> CompressConfig.from_dict(cfg.to_dict()) == cfg
    True
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

__all__ = [
    "WEIGHT_TARGETS",
    "CompressConfig",
    "Target",
    "TargetKind",
    "UnreachableTargetError",
    "parse_bytes",
]

TargetKind = Literal[
    "macs", "params", "latency", "width", "error", "dof", "sparsity", "auto", "heads", "hidden",
    "experts",
]  # fmt: skip
_KINDS = (
    "macs", "params", "latency", "width", "error", "dof", "sparsity", "auto", "heads", "hidden",
    "experts",
)  # fmt: skip
#: Target kinds of weight sparsification (the others are channel targets).
WEIGHT_TARGETS = frozenset({"sparsity", "auto"})
_UNREACHABLE = ("stop", "raise", "force")
#: the consumer fits of the sequential pass (:mod:`spectrim.calibration.outputs`)
SEQUENTIAL_FITS = ("auto", "inputs", "outputs", "residual")


_UNITS = {"": 1, "b": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}


def parse_bytes(value: int | float | str) -> int:
    """Bytes from ``4096``, ``"512MiB"``, ``"8GB"`` or ``"1.5g"`` (binary units).

    Example::

        >>> parse_bytes("512MiB"), parse_bytes("2g"), parse_bytes(1000)
        (536870912, 2147483648, 1000)
    """
    if isinstance(value, bool):
        raise ValueError(f"a memory size must be a number of bytes or e.g. '8GiB', got {value!r}")
    if isinstance(value, (int, float)):
        if not (math.isfinite(value) and value > 0):
            raise ValueError(f"a memory size must be positive, got {value!r}")
        return int(value)
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([kmgt]?)(i?b)?\s*", str(value).lower())
    if m is None or float(m.group(1)) <= 0:
        raise ValueError(f"memory size {value!r} must look like '512MiB', '8GiB' or a byte count")
    return int(float(m.group(1)) * _UNITS[m.group(2)])


class UnreachableTargetError(ValueError):
    """A ``macs``/``params`` target no allocation can reach (``on_unreachable="raise"``)."""


@dataclass(frozen=True)
class Target:
    """What to reach.

    * ``macs=F`` / ``params=F``: keep a fraction ``F`` of the model's MACs / parameters,
      allocated across layers from their error curves (one pass, no re-pruning loop);
    * ``latency=F``: keep a fraction ``F`` of the model's latency on this machine at
      batch ``latency_batch``: the allocator trades channels by each layer's measured
      time, and the measured latency of the pruned shapes closes the loop (docs/design.md
      §8; not deterministic: it times this machine);
    * ``width=F``: keep a fraction ``F`` of every prunable layer's channels;
    * ``heads=F``: keep a fraction ``F`` of the attention heads of every attention layer
      (key/value groups with grouped-query attention), selected and corrected by a
      channel method (``id``, ``spectral``, ``l1``, ``l2``, ``random``);
    * ``hidden=F``: keep a fraction ``F`` of a transformer's residual width (hidden size),
      one basis for the whole stream: a selection of its coordinates or, with
      ``spectral`` on a pre-LN model, a rotation (SliceGPT); see :mod:`spectrim._hidden`;
    * ``experts=F``: keep a fraction ``F`` of the neurons of every expert of every
      mixture-of-experts layer (Hugging Face's 3-D experts modules: Mixtral, Qwen-MoE,
      OLMoE, DeepSeek-V3, ...), each expert its own, with ``id``, ``spectral``, ``l1``,
      ``l2`` or ``random``; see :mod:`spectrim._experts`;
    * ``error=E``: per layer, the fewest channels whose relative reconstruction error
      on the calibration data is at most ``E``;
    * ``dof=α``: per layer, ``⌈c·N(λ)⌉`` channels from the degrees of freedom
      ``N(λ) = Σ μ/(μ+λ)`` of its covariance at ``λ = α·tr Σ̂`` (methods with a spectrum,
      e.g. ``spectral``; ``c`` is the method's option);
    * ``sparsity=S``: weight sparsification, a share ``S`` in ``[0, 1)`` of the weights of
      every Linear / conv matrix set to zero (per layer or pooled, by the method's
      ``scope``); ``sparsity=n:m`` keeps at most ``n`` non-zeros in every ``m``
      consecutive inputs of each row (``2:4``: NVIDIA's semi-structured pattern);
    * ``auto``: a weight method that sizes itself decides (``lq``/``pqi`` from their ℓq
      bound with ``eta``, ``lq-lasso`` from its penalty).

    Example::

        >>> Target.parse("sparsity=2:4")
        Target(kind='sparsity', value=0.5, pattern=(2, 4))
        >>> str(Target.parse("sparsity=0.7")), str(Target.parse("auto"))
        ('sparsity=0.7', 'auto')
    """

    kind: TargetKind
    value: float
    pattern: tuple[int, int] | None = None

    def __post_init__(self) -> None:
        if self.kind not in _KINDS:
            raise ValueError(f"target kind {self.kind!r} is not one of {', '.join(_KINDS)}")
        v = float(self.value)
        if self.pattern is not None and self.kind != "sparsity":
            raise ValueError(f"an n:m pattern is a sparsity target, not {self.kind}")
        if self.kind == "sparsity":
            if not 0.0 <= v < 1.0:
                raise ValueError(f"target sparsity={v} must be in [0, 1)")
        elif self.kind == "auto":
            pass
        elif self.kind == "error":
            if not 0.0 <= v < 1.0:
                raise ValueError(f"target error={v} must be in [0, 1)")
        elif not 0.0 < v <= 1.0:
            raise ValueError(f"target {self.kind}={v} must be a fraction in (0, 1]")

    @classmethod
    def parse(cls, text: str | Target) -> Target:
        """Parse ``"macs=0.5"``-style text (also accepts a Target)."""
        if isinstance(text, Target):
            return text
        if isinstance(text, str) and text.strip().lower() == "auto":
            return cls("auto", 0.0)
        if not isinstance(text, str) or "=" not in text:
            raise ValueError(
                f"target {text!r} must look like 'macs=0.5', 'params=0.5', 'latency=0.5', 'width=0.5', "
                "'error=0.05', 'dof=0.001', 'heads=0.75', 'hidden=0.9', 'experts=0.5', 'sparsity=0.5', "
                "'sparsity=2:4' or 'auto'"
            )
        kind, _, value = text.partition("=")
        kind = kind.strip().lower()
        if kind == "sparsity" and ":" in value:
            from spectrim.linalg.masks import parse_nm

            n, m = parse_nm(value.strip())
            return cls("sparsity", 1.0 - n / m, (n, m))
        try:
            number = float(value)
        except ValueError:
            raise ValueError(f"target {text!r}: {value!r} is not a number") from None
        return cls(kind, number)  # type: ignore[arg-type]

    def __repr__(self) -> str:
        extra = f", pattern={self.pattern!r}" if self.pattern is not None else ""
        return f"Target(kind={self.kind!r}, value={self.value!r}{extra})"

    def __str__(self) -> str:
        if self.kind == "auto":
            return "auto"
        if self.pattern is not None:
            return f"sparsity={self.pattern[0]}:{self.pattern[1]}"
        return f"{self.kind}={self.value:g}"


@dataclass(frozen=True)
class CompressConfig:
    """Everything that defines a compression run (JSON round-trips via to/from_dict).

    Attributes:
        method: registered method name (``spectrim.methods.available()``).
        target: a :class:`Target` or its text form.
        round_to: kept widths are multiples of this (hardware friendliness).
        min_width: never keep fewer channels than this in a group.
        verify: run the graph self-checks (permutation and shrink tests) before
            pruning, pinning any group that fails them.
        seed: seed for randomised methods and self-checks.
        sequential: fit each consumer's correction on the activations of the already
            compressed prefix, reconstructing the original model's activations
            (cross-covariance least squares).
        sequential_fraction: share of the calibration examples the sequential
            corrections are fitted on, to the nearest whole batch: the first batches, in
            the order given, so data sorted by class or by source should be shuffled
            first (kept sets and widths always use all of them; spectrim's own loaders
            give every class in turn).  A fifth of 1000 CIFAR images (192) fits ResNet-56
            as well as a quarter or a third (87.0 / 86.9 / 86.9 % top-1 at macs=0.5,
            mean of four calibration draws) and better than an eighth (86.4 %).  More
            examples are used whenever the share would give fewer than 32 rows per
            channel (transformer FFNs).
        sequential_select: in the sequential pass, choose each group's kept channels
            anew (same widths) at its first consumer: the channels of the compressed
            prefix from which the original's activations are best reconstructed
            (:func:`spectrim.linalg.cross_greedy` on the pass's own Grams), instead of
            the method's selection on the original model's statistics.  The groups run
            at full width through the pass (about one forward pass of the fitted share
            instead of ``macs_ratio`` of one).
        sequential_fit: how the sequential pass corrects a consumer
            (:mod:`spectrim.calibration.outputs`): ``"inputs"`` reconstructs its
            original input channels from the kept ones (the papers' interpolation, one
            ``m×k`` matrix shared by a convolution's taps); ``"outputs"`` refits its weight
            and bias by least squares on its own original outputs over its unfolded kept
            inputs (every tap free); ``"residual"`` also makes it cancel the drift of the
            residual stream its output is added to (the compressed prefix's other operand
            against the original's), which holds a copy of the model during the pass (of
            one block with ``blockwise``).  Consumers that read more than one
            group, or no registered unfolding (``Linear``, ``Conv1d``, ``Conv2d``), or whose
            fit would have fewer than 8 calibration rows per unknown keep ``"inputs"``
            (the report's warnings list them).  On the pretrained CIFAR-10 ResNets
            ``"residual"`` gains 2–15 points of top-1 (docs/results.md,
            ``benchmarks/levers.py --levers residual``).  ``"auto"`` (default):
            ``"residual"`` when a consumer of a pruned group is a convolution with more
            than one kernel tap, where that fit is stronger than the interpolation, else
            ``"inputs"`` (a ``Linear``'s output fit *is* the interpolation, and the drift
            term alone moved all-MiniLM-L6-v2 by −0.3 Spearman / +0.002 cosine while
            costing a copy of the model); the report's ``sequential_fit`` says which ran.
        refit_readers: in the sequential pass, also refit the *readers*: the modules
            (``Linear``, ``Conv1d``/``Conv2d``) that run after pruned layers, so that their
            input drifted, but read no pruned group, so that the pass has no correction
            for them (a residual block's first convolution, reading the stream).  Each
            gets its weight and bias fitted by least squares on its own original outputs
            (its kept channels) over its unfolded inputs in the compressed prefix, in
            execution order with the consumers, so that the consumer after it is fitted
            on the refitted outputs.  Not refitted: readers whose fit would have fewer
            than 8 calibration rows per unknown, that run more than once, or whose
            output reaches a residual addition under ``"residual"`` (the consumer on the
            other side of it cancels the drift); the block-by-block pass refits the
            readers of its blocks, not of the model's stem or classifier.  The report's
            ``readers`` says what was done.  Costs one more fit per reader (and with the
            whole-model pass a copy of the model).  ``False`` (default).
        channels_last: run the calibration passes (on spectrim's own copy of the model,
            one batch converted at a time) in ``channels_last`` memory layout, which
            oneDNN's CPU convolutions run faster than NCHW; ``None`` (default): when the
            model has 2-D convolutions, the calibration batches are 4-D tensors and the
            model reproduces its outputs (to 1e-4) in that layout.  The returned model
            has the layout, stride for stride, of the given one either way.
        on_unreachable: what to do when a ``macs``/``params`` target cannot be reached
            even with every prunable group at its minimum width (pinned groups, costs no
            group can remove): ``"stop"`` (default) narrows no group past the width where
            its predicted relative error exceeds ``max_error`` and warns with the value
            reached and why; ``"raise"`` raises :class:`UnreachableTargetError` instead;
            ``"force"`` cuts every group to its minimum width (and warns).
        max_error: the predicted relative error no group may exceed when a target is
            unreachable (``on_unreachable="stop"``).
        heads: also remove whole attention heads (Hugging Face models: see
            ``target="heads=F"``) under a ``macs``/``params`` target, on the same budget as
            the channels: the allocator trades heads against FFN neurons and other widths.
        query_heads: with grouped-query attention (fewer key/value heads than query
            heads: LLaMA-3, Mistral, Qwen2), remove query heads inside the KV groups, the
            same number from every group, and keep every key and value head, instead of
            removing whole KV groups with their query heads (the default).  Finer
            (``heads=F`` counts query heads per group) and closer to the original, at a
            smaller saving per head: a head's ``q`` rows and output-projection columns,
            not its share of ``k`` and ``v``.  Under ``target="heads=F"`` and with
            ``heads=True``; no effect on multi-head or multi-query layers.
        hidden: also narrow a transformer's residual width (see ``target="hidden=F"``)
            under a ``macs``/``params`` target, on the same budget: the allocator trades
            the stream's width against heads and channels.
        experts: also narrow the neurons of every expert of mixture-of-experts layers
            (see ``target="experts=F"``) under a ``macs``/``params`` target, on the same
            budget: the allocator chooses each layer's width (one for all of its experts,
            a multiple of 16 bytes per row) against heads, channels and the stream.
        stats_memory: memory budget of the calibration statistics (bytes, or text such
            as ``"4GiB"``); ``None`` (default): a quarter of the machine's memory (the GPU's
            with ``device="cuda"``).  Exact Grams cost ``8·m²`` bytes per consumer of a
            group of ``m`` units; when they would not fit, ``id`` selects the widest groups
            from randomized sketches of their activations instead
            (:mod:`spectrim.calibration.sketch`, listed in the report's warnings).
        blockwise: run the sequential corrections block by block (transformer layers,
            residual blocks, with the model's stem and classifier where a pruned group
            reaches them) from a cache of each block's inputs, so their memory is one
            block's, not the whole model's, and a residual fit's side passes run one
            block, not the prefix of the model (:mod:`spectrim.calibration.blocks`; the
            same fits).  ``True``: models with no chain of blocks spectrim finds, or a
            pruned group that reaches elsewhere outside it, or ``heads``/``hidden``/
            ``experts`` on the budget, get the whole-model pass and a warning.  ``None``
            (default): block by block where the residual fit runs (``sequential_fit``) or
            ``refit_readers``
            is set, and the chain holds every group, silently the whole-model pass
            otherwise (torchvision ResNet-50: 34 s against 68 s,
            ``benchmarks/default_fit.py``; all-MiniLM-L6-v2 with its readers refitted:
            30 s against 72 s).  ``False``: the whole-model pass.
        block_cache: a folder where the block-by-block pass keeps each block's inputs
            and outputs between blocks (a private subfolder, deleted at the end) instead
            of in memory: the pass then holds one block's activations, not two or four
            copies of every fitted batch's at a block boundary
            (:mod:`spectrim.calibration.spill`).  Setting it asks for the block pass
            (as ``blockwise=True``).  ``None`` (default): in memory.
        block_statistics: measure the calibration statistics block by block as well
            (:func:`~spectrim.calibration.blocks.blockwise_statistics`): each block runs
            on every calibration batch from its cached inputs (with ``block_cache``: in
            files), and each group is solved (its error curve and channel order) as soon
            as its last block is done and its Grams dropped, so the statistics held at
            once are one block's, not every group's (a BERT-base's twelve FFN groups:
            about 1 GiB of Grams, as much again in their factorisations).  The same
            statistics, the same model; it costs one more forward pass, and holds every
            calibration batch's activation at a block boundary (or its file).  Asks for
            the block pass (as ``blockwise=True``) and needs ``sequential=True``, whose
            refits make the Grams unnecessary after the selection.
        group_weights: per group on the budget (by its name in the report: a channel
            group's, ``"<layer> (heads)"`` for an attention layer's heads with
            ``heads=True``, ``"<stream> (hidden)"`` with ``hidden=True``,
            ``"<experts module> (experts)"`` with ``experts=True``), a factor on its
            error curve before the allocation: above 1 the allocator keeps more of the
            group, below 1 less.  The factors :attr:`search` found are stored here in the
            report's config, so the same call with them (and ``search=0``) rebuilds the
            same model.  Names that are no group of the model are an error.
        search: rounds of an allocation search (a ``macs=`` or ``params=`` target of
            a channel method): the allocation is chosen by what the compressed model
            computes, not only by the error curves.  Each round tries, group by group, a
            factor ``e^±s`` on that group's curve (``s = 1``, halved after a round that
            finds nothing better), compresses with it and keeps it when the compressed
            model's outputs are closer to the original's (relative squared error) on the
            calibration examples the sequential pass did not fit (or on the
            ``search_data=`` of :func:`~spectrim.compress`).  A round costs up to
            two compressions per group: ResNet-20 at half the MACs, 4 rounds, about 70
            compressions (docs/results.md).  ``0`` (default): no search.
        latency_batch: the batch size a ``latency=F`` target is measured at (the
            calibration examples repeated to fill it).
        options: method-specific options (e.g. ``{"ridge": 1e-6}``).
    """

    method: str = "id"
    target: Target | str = "macs=0.5"
    round_to: int = 1
    min_width: int = 1
    verify: bool = True
    seed: int = 0
    sequential: bool = True
    sequential_fraction: float = 0.2
    sequential_select: bool = False
    sequential_fit: str = "auto"
    refit_readers: bool = False
    channels_last: bool | None = None
    on_unreachable: str = "stop"
    max_error: float = 0.5
    heads: bool = False
    query_heads: bool = False
    hidden: bool = False
    experts: bool = False
    stats_memory: int | str | None = None
    blockwise: bool | None = None
    block_cache: str | None = None
    block_statistics: bool = False
    latency_batch: int = 1
    group_weights: dict[str, float] = field(default_factory=dict)
    search: int = 0
    options: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        object.__setattr__(self, "target", Target.parse(self.target))
        if int(self.round_to) < 1:
            raise ValueError(f"round_to={self.round_to} must be a positive integer")
        if int(self.min_width) < 1:
            raise ValueError(f"min_width={self.min_width} must be a positive integer")
        if not 0.0 < float(self.sequential_fraction) <= 1.0:
            raise ValueError(f"sequential_fraction={self.sequential_fraction} must be in (0, 1]")
        if self.sequential_fit not in SEQUENTIAL_FITS:
            raise ValueError(
                f"sequential_fit={self.sequential_fit!r} must be one of "
                f"{', '.join(SEQUENTIAL_FITS)}"
            )
        if self.blockwise not in (True, False, None):
            raise ValueError(
                f"blockwise={self.blockwise!r} must be True, False or None (the default: "
                "block by block where the residual fit runs)"
            )
        if self.block_cache is not None:
            if isinstance(self.block_cache, os.PathLike):
                object.__setattr__(self, "block_cache", os.fspath(self.block_cache))
            if not isinstance(self.block_cache, str) or not self.block_cache:
                raise ValueError(
                    f"block_cache={self.block_cache!r} must be a folder (a path) or None"
                )
            if self.blockwise is False:
                raise ValueError(
                    "block_cache is where the block-by-block pass keeps its boundaries; "
                    "blockwise=False turns that pass off (leave blockwise unset)"
                )
        if self.block_statistics not in (True, False):
            raise ValueError(f"block_statistics={self.block_statistics!r} must be True or False")
        if self.block_statistics and self.blockwise is False:
            raise ValueError(
                "block_statistics measures the statistics block by block for the block pass; "
                "blockwise=False turns that pass off (leave blockwise unset)"
            )
        if self.block_statistics and not self.sequential:
            raise ValueError(
                "block_statistics drops each group's Grams once its channels are chosen, "
                "which only the sequential pass's refits allow; it needs sequential=True"
            )
        if self.query_heads not in (True, False):
            raise ValueError(f"query_heads={self.query_heads!r} must be True or False")
        if self.refit_readers not in (True, False):
            raise ValueError(f"refit_readers={self.refit_readers!r} must be True or False")
        if self.refit_readers and not self.sequential:
            raise ValueError(
                "refit_readers refits modules in the sequential pass; it needs sequential=True"
            )
        if self.on_unreachable not in _UNREACHABLE:
            raise ValueError(
                f"on_unreachable={self.on_unreachable!r} must be one of {', '.join(_UNREACHABLE)}"
            )
        if not (isinstance(self.max_error, (int, float)) and 0.0 < float(self.max_error)):
            raise ValueError(f"max_error={self.max_error!r} must be a positive number")
        if self.stats_memory is not None:
            parse_bytes(self.stats_memory)
        if isinstance(self.latency_batch, bool) or int(self.latency_batch) < 1:
            raise ValueError(f"latency_batch={self.latency_batch!r} must be a positive integer")
        if not isinstance(self.group_weights, dict) or not all(
            isinstance(k, str)
            and isinstance(v, (int, float))
            and not isinstance(v, bool)
            and math.isfinite(v)
            and v > 0
            for k, v in self.group_weights.items()
        ):
            raise ValueError(
                f"group_weights={self.group_weights!r} must map group names to positive "
                "finite factors"
            )
        if isinstance(self.search, bool) or not isinstance(self.search, int) or self.search < 0:
            raise ValueError(f"search={self.search!r} must be a whole number of rounds (0: none)")
        if self.search and self.parsed_target.kind not in ("macs", "params"):
            raise ValueError(
                f"search={self.search} chooses the channel widths of a macs= or params= "
                f"target, not of {self.parsed_target}"
            )
        if not isinstance(self.options, dict):
            raise TypeError(f"options must be a dict of method options, got {self.options!r}")

    @property
    def parsed_target(self) -> Target:
        assert isinstance(self.target, Target)
        return self.target

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["target"] = str(self.target)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> CompressConfig:
        unknown = set(d) - {f for f in cls.__dataclass_fields__}
        if unknown:
            raise ValueError(f"unknown CompressConfig field(s): {sorted(unknown)}")
        return cls(**d)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> CompressConfig:
        return cls.from_dict(json.loads(text))


#: :class:`CompressConfig` fields that configure the run, not the method (``round_to``, ...).
RUN_FIELDS: frozenset[str] = frozenset(CompressConfig.__dataclass_fields__) - {
    "method",
    "target",
    "options",
}
