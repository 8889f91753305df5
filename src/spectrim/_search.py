"""``search=N``: the channel allocation chosen by what the compressed model computes.

The allocator trades the groups' error curves against their costs, each curve the
predicted error at the group's own consumers.  How an error there reaches the model's
output is not in the curves, and after the sequential corrections the groups' errors do
not add up as the curves assume.  The search closes that loop with the model itself: a
coordinate search over one factor per group on its curve (``cfg.group_weights``; with
``heads=True`` / ``hidden=True`` the attention layers' heads and the residual stream are
groups too), each candidate compressed in full and scored by the relative squared
error of its outputs against the original's on the calibration examples the sequential
pass did not fit (or on ``search_data``), or by the user's ``search_score(candidate)``.
The trace, the statistics and the error curves do not depend on the factors: they are
made once, and each candidate only allocates and applies (``_prune.fork_run``).

Each round tries every group in turn, its factor times ``e^s`` and then ``e^-s``, and
keeps the first that scores better; a round that keeps nothing halves ``s`` (from 1).
The result is the run with the best factors.  The report's config is that run's
(``group_weights`` the factors found, ``search=0``), so compressing with it rebuilds the
same model without the search; ``report.search`` has the rounds and the scores.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from spectrim._prune import finish_run, fork_run, prepare_run
from spectrim.calibration.batches import token_mask
from spectrim.calibration.checks import CalibrationInfo
from spectrim.config import CompressConfig
from spectrim.context import RunContext
from spectrim.evaluation._common import first_tensor
from spectrim.graph.trace import batch_len, call_model
from spectrim.methods import Method
from spectrim.report import CompressionReport

__all__ = ["output_error", "search_run"]

#: the first step of a factor's logarithm: the curve times e or 1/e
FIRST_STEP = 1.0


def output_error(model: nn.Module, batches: list[Any], references: list[torch.Tensor]) -> float:
    """``‖y − y₀‖² / ‖y₀‖²`` over ``batches``: ``y`` the first tensor of ``model``'s
    output, ``y₀`` the reference's (float64); a text batch's padded positions are left out
    (its ``attention_mask``) where the output has one row per token.

    Example::

        >>> net = nn.Linear(3, 2)
        >>> x = [torch.randn(4, 3)]
        >>> output_error(net, x, [net(x[0]).detach()])
        0.0
    """
    num = den = 0.0
    with torch.no_grad():
        for batch, ref in zip(batches, references, strict=True):
            y, y0 = _first_output(model, batch).double(), ref.double()
            mask = token_mask(batch)
            if mask is not None and y.dim() >= 2 and tuple(y.shape[:2]) == tuple(mask.shape):
                y, y0 = y[mask], y0[mask]
            num += float((y - y0).pow(2).sum())
            den += float(y0.pow(2).sum())
    return num / den if den > 0 else (0.0 if num == 0 else math.inf)


def search_run(
    work: nn.Module,
    batches: list[Any],
    info: CalibrationInfo,
    cfg: CompressConfig,
    method: Method,
    ctx: RunContext,
    t0: float,
    scoring: list[Any] | Callable[[nn.Module], float] | None = None,
) -> tuple[nn.Module, CompressionReport]:
    """``cfg.search`` rounds of the coordinate search around the channel run
    (:func:`~spectrim._prune.prune_run`), scored by ``scoring``: the user's score of a candidate (lower is better), or the
    outputs' relative squared error on held-out batches (default: the calibration batches
    the sequential pass did not fit); ``work`` is pruned in place with the best factors."""
    if not ctx.team.solo:
        raise ValueError(
            f"search={cfg.search} compresses many candidates and scores them in one "
            "process; run it without torch.distributed"
        )
    start = time.perf_counter()
    weights = dict(cfg.group_weights)
    quiet = dataclasses.replace(ctx, progress=False)  # one bar per round, not per candidate

    # the original's outputs, before the preparation converts ``work`` (channels_last):
    # on every calibration batch, as which of them the fits leave unused is known later
    scored = [] if callable(scoring) else batches if scoring is None else scoring
    with torch.no_grad():
        references = [_first_output(work, b).detach() for b in scored]
    # the trace, statistics and curves do not depend on the factors: made once, on
    # ``work``; every candidate allocates and applies on a copy, and the best factors
    # finish the run on ``work`` itself
    base = prepare_run(work, batches, info, dataclasses.replace(cfg, search=0), method, quiet)

    def candidate(w: dict[str, float]) -> tuple[nn.Module, CompressionReport]:
        trial = dataclasses.replace(cfg, search=0, group_weights=w)
        return finish_run(fork_run(base, trial), t0)

    small, report = candidate(weights)
    held: list[Any] = []
    if callable(scoring):
        score, what = _user_score(scoring), "search_score"
    else:
        skip = _held_out(batches, report.fitted_examples, cfg) if scoring is None else 0
        held, references = scored[skip:], references[skip:]

        def score(small: nn.Module) -> float:
            return output_error(small, held, references)

        what = "output error"
    best = score(small)
    first = best
    names = [g.name for g in report.groups if g.pinned is None and g.predicted_error is not None]
    tried, kept, step = 1, 0, FIRST_STEP
    rounds: list[dict[str, Any]] = []
    for r in range(cfg.search):
        found = 0
        for name in ctx.wrap(len(names), desc=f"search round {r + 1}", unit="group")(names):
            for sign in (1.0, -1.0):
                w = {**weights, name: weights.get(name, 1.0) * math.exp(sign * step)}
                small, _ = candidate(w)
                value = score(small)
                tried += 1
                if value < best:
                    best, weights, found = value, w, found + 1
                    break
        rounds.append({"step": step, "kept": found, "error": best})
        kept += found
        if not found:
            step /= 2
    del small
    final = dataclasses.replace(cfg, search=0, group_weights=weights)
    base.report.config = final.to_dict()
    work, report = finish_run(dataclasses.replace(base, cfg=final, ctx=ctx), t0)
    report.search = {
        "rounds": rounds,
        "groups": names,
        "candidates": tried,
        "kept": kept,
        "score": what,
        "held_out_examples": sum(batch_len(b) for b in held),
        "error_before": first,
        "error": best,
        "group_weights": weights,
        "seconds": time.perf_counter() - start,
    }
    return work, report


def _first_output(model: nn.Module, batch: Any) -> torch.Tensor:
    """The first tensor of ``model``'s output on ``batch``, which the score compares."""
    out = first_tensor(call_model(model, batch))
    if out is None:
        raise ValueError("search= needs a model whose output holds a tensor")
    return out


def _user_score(fn: Callable[[nn.Module], float]) -> Callable[[nn.Module], float]:
    """``search_score``, called without gradients on a candidate in eval mode; a value
    that is no finite number is an error that names it."""

    def score(small: nn.Module) -> float:
        small.eval()
        with torch.no_grad():
            value = fn(small)
        try:
            out = float(value)
        except (TypeError, ValueError):
            out = math.nan
        if not math.isfinite(out):
            raise ValueError(f"search_score returned {value!r}; it must return a finite number")
        return out

    return score


def _held_out(batches: list[Any], fitted: int, cfg: CompressConfig) -> int:
    """The index of the first calibration batch after the ``fitted`` examples the
    sequential pass used."""
    seen = 0
    for i, b in enumerate(batches):
        if seen >= fitted:
            return i
        seen += batch_len(b)
    raise ValueError(
        f"search={cfg.search} scores each candidate on calibration examples the sequential "
        f"pass did not fit, and it fitted all {fitted} (sequential_fraction="
        f"{cfg.sequential_fraction:g}, and at least 32 rows per channel of a group): give "
        "more examples, lower sequential_fraction, or pass search_data="
    )
