"""The one entry point: :func:`compress`.

Example::

    >>> import torch, torch.nn as nn, spectrim
    >>> net = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 3))
    >>> small, report = spectrim.compress(net, torch.randn(256, 8), target="width=0.5")
    >>> small[0].out_features, net[0].out_features
    (16, 32)
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import os
import sys
import time
import warnings
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
from torch import nn

from spectrim._experts import experts_run
from spectrim._heads import heads_run
from spectrim._hidden import hidden_run
from spectrim._joint import joint_budget, joint_run
from spectrim._prune import prune_run
from spectrim._search import search_run
from spectrim._sparsify import sparsify_run, weight_nonzeros
from spectrim._threads import single_threaded_blas
from spectrim.calibration.batches import as_batches, inputs_only, to_device
from spectrim.calibration.checks import (
    CalibrationInfo,
    check_calibration,
)
from spectrim.config import (
    RUN_FIELDS,
    WEIGHT_TARGETS,
    CompressConfig,
    Target,
)
from spectrim.context import RunContext
from spectrim.distributed import Team
from spectrim.graph import ModuleSnapshot, is_offloaded, onload
from spectrim.graph.modules import make_plain
from spectrim.methods import Method, WeightMethod, get_method, method_kinds, method_pair
from spectrim.repair import RepairConfig
from spectrim.repair import repair as run_repair
from spectrim.report import CompressionReport, merge_reports

__all__ = ["compress", "inputs_only", "as_batches"]


@single_threaded_blas()
def compress(
    model: nn.Module,
    calibration: Any,
    method: str | CompressConfig | None = None,
    target: str | Target | None = None,
    *,
    config: CompressConfig | None = None,
    inplace: bool = False,
    progress: bool | Callable[[Iterable[Any]], Iterable[Any]] = False,
    then: CompressConfig | Mapping[str, Any] | None = None,
    device: str | torch.device | None = None,
    process_group: Any = None,
    repair: RepairConfig | Mapping[str, Any] | None = None,
    repair_data: Any = None,
    search_data: Any = None,
    search_score: Callable[[nn.Module], float] | None = None,
    **options: Any,
) -> tuple[nn.Module, CompressionReport]:
    """Compress ``model`` with ``method`` to ``target``; return ``(new_model, report)``.

    Args:
        model: a trained model.  Not modified unless ``inplace=True``.  A model
            dispatched by accelerate (``device_map`` with offloading, ``cpu_offload``,
            ``disk_offload``) is read into CPU memory once, without its hooks
            (:func:`spectrim.graph.onload`), and the result is a plain model on the CPU;
            with ``inplace=True`` the model itself is stripped and filled, no copy.
        calibration: unlabelled inputs (see :func:`as_batches`); a few hundred examples
            are enough for most CNNs.
        method: registered method name (default ``"id"``); overrides ``config.method``.
            A :class:`~spectrim.config.CompressConfig` here is taken as ``config``.
        target: ``"macs=F"``, ``"params=F"``, ``"latency=F"`` (measured here, at
            ``latency_batch=``), ``"width=F"`` or ``"error=E"`` (channel methods),
            ``"sparsity=S"``, ``"sparsity=n:m"`` or ``"auto"`` (weight methods:
            ``obs``, ``wanda``, ``lq``, ...), or a :class:`~spectrim.config.Target`;
            overrides ``config.target``.
        config: a full :class:`~spectrim.config.CompressConfig`.
        inplace: prune ``model`` itself instead of a deep copy.  If the run fails midway,
            the model is put back as it was (from references to its tensors, no copy).
        progress: show a progress bar over calibration batches (or pass a wrapper).
        then: a second stage run on the result, in the same call and one report, e.g.
            ``then={"method": "obs", "target": "sparsity=0.5"}`` after ``"id"`` to
            ``macs=0.5``: channels first, then 50% of the remaining weights (a
            :class:`~spectrim.config.CompressConfig` or its dict; its statistics are
            collected on the already-pruned model, whose activations they must describe).
        device: where the forward passes and the statistics run (``"cuda"``,
            ``"cuda:1"``, ``"cpu"``); default: where the model's parameters are.  The
            calibration batches are moved there once, the Gram matrices accumulate there
            in float64 (of true float32 products: TF32 off), the factorisations run on the
            host (LAPACK; docs/design.md §7e).  The compressed model is returned on the
            model's own device.
        process_group: the ``torch.distributed`` group of processes sharing the run
            (default: the world, when a process group is initialised with more than one
            process).  Every process calls ``compress`` with the same arguments and the
            same calibration set; each runs the forward passes on its share of the batches,
            the statistics are summed over all of them and every decision is rank 0's
            (:mod:`spectrim.distributed`), a joint ``CHANNEL+WEIGHT`` budget included.
        repair: after compressing, distil ``model`` into the result for a few epochs
            (:func:`spectrim.repair.repair`; a :class:`~spectrim.repair.RepairConfig` or
            its dict, e.g. ``{"epochs": 1}``), on ``repair_data`` (unlabelled batches;
            default: the calibration set).  Its report is ``report.repair``.  Not with
            ``inplace=True`` (the original is the teacher) or several processes.
        repair_data: the batches the repair trains on.
        search_data: with ``search=N``, the unlabelled batches each candidate's outputs
            are scored on (default: the calibration examples the sequential pass did not
            fit; a transformer's FFNs fit all of them, 32 token rows per neuron).
        search_score: with ``search=N``, what the search minimises instead of the
            outputs' relative squared error: called with each candidate model (in eval
            mode, on the run's device), it returns a float, lower is better, e.g. one
            minus the mean cosine of pooled sentence embeddings to the original's, or a
            validation loss.  Not with ``search_data``.
        **options: extra :class:`~spectrim.config.CompressConfig` fields
            (``round_to``, ``min_width``, ``verify``, ``seed``, ``sequential``,
            ``latency_batch``, ``on_unreachable``, ``max_error``) or method options
            (e.g. ``ridge`` for ``id``), checked against the method's option types.

    Raises:
        CalibrationError: NaN/inf in the calibration data (named by batch and example) or
            in the model's activations, or all examples identical.
        UnreachableTargetError: the target cannot be reached and
            ``on_unreachable="raise"``.
    """
    t0 = time.perf_counter()
    if isinstance(method, CompressConfig):  # compress(model, data, CompressConfig(...))
        if config is not None:
            raise TypeError("compress() got a CompressConfig both as method and as config=")
        method, config = None, method
    if method is not None and not isinstance(method, str):
        raise TypeError(
            f"method must be a method name such as 'id' (or a CompressConfig), "
            f"got {type(method).__name__}"
        )
    base = config or CompressConfig()
    if not isinstance(base, CompressConfig):
        raise TypeError(f"config must be a CompressConfig, got {type(base).__name__}")
    d = base.to_dict()
    if method is not None:
        d["method"] = method
    if target is not None:
        d["target"] = str(target)
    for key in list(options):
        if key in RUN_FIELDS:
            d[key] = options.pop(key)
    d["options"] = {**d.get("options", {}), **options}
    if target is None and config is None and method_kinds(d["method"]) == ["weight"]:
        # a weight method alone: its own rule where it has one, else say what it needs
        d["target"] = "auto"
    cfg = CompressConfig.from_dict(d)
    if "+" in cfg.method and then is not None:
        raise ValueError(
            f"method '{cfg.method}' already runs two stages on one budget; then= is for "
            "one method followed by another"
        )
    algo = _method_for(cfg)
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")

    for given, what in ((search_data, "search_data"), (search_score, "search_score")):
        if given is not None and not cfg.search:
            raise ValueError(f"{what}= is what search=N scores its candidates on; set search=")
    if search_data is not None and search_score is not None:
        raise ValueError(
            "search_data= and search_score= are two ways to score the search's candidates; "
            "give one (search_score can evaluate the data itself)"
        )
    rcfg = RepairConfig.parse(repair)
    team = Team(process_group)
    if rcfg is not None and (inplace or not team.solo):
        raise ValueError(
            "repair= distils the original model into the result: it needs the original "
            "untouched (not inplace=True) and one process; call spectrim.repair() yourself"
        )
    batches = as_batches(calibration)
    info = check_calibration(batches)  # on the whole set, alike on every rank
    source = model  # accelerate's hooks: the model in memory once, on the CPU
    if is_offloaded(model):
        source = onload(model, copy=not inplace)
    home, run_on = _devices(source, device)
    batches = team.shard(batches)
    if run_on is not None:
        batches = [to_device(b, run_on) for b in batches]
    ctx = RunContext(
        seed=cfg.seed,
        device=run_on or torch.device("cpu"),
        team=team,
        progress=progress if team.is_root else False,
    )
    work = source if inplace or source is not model else copy.deepcopy(model)
    snapshot = ModuleSnapshot(work) if inplace else None
    try:
        with team.guard():
            plain = make_plain(work)  # weights computed in forward: stored instead
            if run_on is not None and run_on != home:
                work.to(run_on)
            nonzeros0 = weight_nonzeros(work) if then is not None else 0
            held = None
            if search_data is not None:
                held = as_batches(search_data)
                if run_on is not None:
                    held = [to_device(b, run_on) for b in held]
            scoring = search_score if search_score is not None else held
            result = _run_stage(work, batches, info, cfg, algo, ctx, t0, scoring=scoring)
            if then is not None:
                result = _then(result, batches, info, then, ctx, nonzeros0)
            if run_on is not None and home is not None and run_on != home:
                result[0].to(home)
        if plain:
            result[1].warnings.append(_plain_note(plain))
        _say_if_unchanged(result[1], cfg, loud=team.is_root)
        if rcfg is not None:
            data = as_batches(calibration if repair_data is None else repair_data)
            _, rrep = run_repair(result[0], model, data, rcfg, inplace=True, progress=progress)
            result[1].repair = rrep.to_dict()
            result[1].warnings.extend(rrep.warnings)
        return result
    except BaseException:
        if snapshot is not None:
            snapshot.restore()  # never leave the user's model half-pruned
            if run_on is not None and home is not None and run_on != home:
                model.to(home)
        raise


def _plain_note(paths: list[str]) -> str:
    more = f", ... ({len(paths)} in all)" if len(paths) > 3 else ""
    return (
        f"{', '.join(paths[:3])}{more}: weights computed in forward (weight "
        "standardisation, parametrizations such as weight_norm, weight-norm hooks) are now "
        "stored as computed, to prune them (weight-standardised convs became "
        "StandardisedConv2d); the outputs are the same, and training the result trains "
        "those weights directly"
    )


#: target kinds that keep a fraction ``F`` of something: ``F < 1`` asks for a smaller model
_SHRINKING = frozenset({"macs", "params", "latency", "width", "heads", "hidden", "experts"})


def _say_if_unchanged(report: CompressionReport, cfg: CompressConfig, loud: bool = True) -> None:
    """Warn (in Python, and first in ``report.warnings``) when a target that asked for a
    smaller model got the model back whole: the reasons (pins, too few calibration rows)
    are in the report, which a caller may never read.  ``loud=False`` (every rank of a
    team but rank 0) puts it in the report only: one process says it, not every one."""
    tgt = cfg.parsed_target
    if tgt.kind == "sparsity":
        asked = tgt.value > 0 and report.nonzeros_before > 0
    else:
        asked = tgt.kind in _SHRINKING and tgt.value < 1
    changed = (
        report.params_after < report.params_before
        or report.macs_after < report.macs_before
        or report.nonzeros_after < report.nonzeros_before
    )
    if not asked or changed:
        return
    free = [g for g in report.groups if g.pinned is None]
    alloc = report.allocation
    if alloc is not None and alloc["held"] and not alloc["reachable"]:
        # the allocator stopped at the start: max_error held every group it could narrow
        held = alloc["held"]
        which = ", ".join(repr(h) for h in held[:3]) + (", ..." if len(held) > 3 else "")
        why = (
            f"the target is unreachable, and narrowing any of the {len(held)} group(s) that "
            f"could shrink ({which}) would exceed max_error={cfg.max_error:g} "
            "(on_unreachable='stop'; report.allocation and the allocator's message below "
            "say how far the target can go)"
        )
    elif free:  # e.g. width=0.96 of a 5-wide layer rounds back up to 5
        why = (
            f"the {len(free)} unit group(s) not pinned kept every channel at this target (a "
            "fraction of a narrow width rounds up to all of it; round_to and min_width too)"
        )
    else:
        why = report.warnings[0] if report.warnings else "no unit group could be narrowed"
    message = (
        f"compress: target {tgt} asked for a smaller model, but the model came back "
        f"unchanged: {why}; report.warnings and report.groups[i].pinned give every reason"
    )
    report.warnings.insert(0, message)
    if loud:
        warnings.warn(message, RuntimeWarning, stacklevel=_outside_stacklevel())


def _outside_stacklevel() -> int:
    """The ``stacklevel`` that points a warning at the user's line: the first frame outside
    this package and the decorators (contextlib) wrapped around its entry points."""
    inside = (os.path.dirname(os.path.abspath(__file__)) + os.sep, contextlib.__file__)
    frame, level = sys._getframe(1), 1  # level 1: the frame that calls warnings.warn
    while frame.f_back is not None and frame.f_code.co_filename.startswith(inside):
        frame, level = frame.f_back, level + 1
    return level


def _devices(
    model: nn.Module, device: str | torch.device | None
) -> tuple[torch.device | None, torch.device | None]:
    """``(home, run_on)``: the model's own device (``None``: spread over several) and
    where the run goes (``None``: leave the model and the batches where they are)."""
    for name, t in (*model.named_parameters(), *model.named_buffers()):
        if t.device.type == "meta":
            raise ValueError(
                f"'{name}' of the model is on the meta device, so it has no values to "
                "measure or fold: load the weights first (e.g. model.to_empty(device='cpu') "
                "and load_state_dict, or from_pretrained)"
            )
    found = {t.device for t in (*model.parameters(), *model.buffers())}
    home = found.pop() if len(found) == 1 else (torch.device("cpu") if not found else None)
    if device is None:
        return home, home
    try:
        run_on = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(
            f"device={device!r} is not a torch device ('cpu', 'cuda', 'cuda:1')"
        ) from None
    if run_on.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device={device!r}: CUDA is not available on this machine")
        if run_on.index is None:
            run_on = torch.device("cuda", torch.cuda.current_device())
    if home is None:
        raise ValueError(
            f"device={device!r}: the model's tensors are on several devices "
            f"({', '.join(sorted(str(d) for d in found))}); spectrim runs such a model where "
            "it is: leave device unset"
        )
    return home, run_on


def _method_for(cfg: CompressConfig) -> Method | tuple[Method, Method]:
    """The method ``cfg`` names, of the kind its target asks for (a weight target:
    the weight method); a ``CHANNEL+WEIGHT`` pair for a joint budget."""
    if "+" in cfg.method:
        joint_budget(cfg.parsed_target)  # a target the pair can share, before any work
        return method_pair(cfg.method, **cfg.options)
    kind = "weight" if cfg.parsed_target.kind in WEIGHT_TARGETS else "channel"
    return get_method(cfg.method, kind, **cfg.options)


def _run_stage(
    work: nn.Module,
    batches: list[Any],
    info: CalibrationInfo,
    cfg: CompressConfig,
    algo: Method | tuple[Method, Method],
    ctx: RunContext,
    t0: float,
    scoring: list[Any] | Callable[[nn.Module], float] | None = None,
) -> tuple[nn.Module, CompressionReport]:
    ctx = dataclasses.replace(ctx, seed=cfg.seed)
    if cfg.search and isinstance(algo, tuple | WeightMethod):
        raise ValueError(
            f"search={cfg.search} chooses channel widths; method {cfg.method!r} is not a "
            "channel method alone"
        )
    if isinstance(algo, tuple):
        return joint_run(work, batches, info, cfg, *algo, ctx, t0)
    if isinstance(algo, WeightMethod):
        return sparsify_run(work, batches, info, cfg, algo, ctx, t0)
    if cfg.parsed_target.kind == "heads":
        return heads_run(work, batches, info, cfg, algo, ctx, t0)
    if cfg.parsed_target.kind == "hidden":
        return hidden_run(work, batches, info, cfg, algo, ctx, t0)
    if cfg.parsed_target.kind == "experts":
        return experts_run(work, batches, info, cfg, algo, ctx, t0)
    if cfg.search:
        return search_run(work, batches, info, cfg, algo, ctx, t0, scoring)
    return prune_run(work, batches, info, cfg, algo, ctx, t0)


def _then(
    first: tuple[nn.Module, CompressionReport],
    batches: list[Any],
    info: CalibrationInfo,
    then: CompressConfig | Mapping[str, Any],
    ctx: RunContext,
    nonzeros0: int,
) -> tuple[nn.Module, CompressionReport]:
    """Run the second stage on the first's result and merge the two reports."""
    if isinstance(then, CompressConfig):
        cfg2 = then
    elif isinstance(then, Mapping):
        cfg2 = CompressConfig.from_dict(dict(then))
    else:
        raise TypeError(f"then= must be a CompressConfig or a dict, got {type(then).__name__}")
    algo2 = _method_for(cfg2)
    model, r1 = first
    t0 = time.perf_counter()
    model, r2 = _run_stage(model, batches, info, cfg2, algo2, ctx, t0)
    merged = merge_reports(r1, r2, nonzeros_before=nonzeros0)
    return model, merged
