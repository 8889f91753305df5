"""Sequential calibration: corrections that undo the error of the compressed prefix.

In one-shot mode every consumer's correction ``B`` is fitted on the original model's
activations, so errors of earlier layers accumulate.  Here the calibration batches run
in lock-step through the model *while it is being compressed*: at each consumer (in
execution order) the inputs ``Z'`` produced by the already-compressed prefix are paired
with the original model's inputs ``Z`` at the same point, and the correction solves

    min_B ‖Z − Z'[:, S] Bᵀ‖²  (cross-covariance least squares),

so the consumer reconstructs the *original* activations from the compressed ones.  (The
naive variant, fitting ``Z'`` from ``Z'[:, S]``, reproduces the compressed model's own
drift; issue #2 reports it losing about nine points of accuracy on ResNet-56.)

Cost: one forward pass of the original model and one of the *compressed* model over the
fitted share, plus the Gram products; memory holds the original consumer inputs of the
pruned groups and the live activations of all batches at once.  Plain tensor batches of
one shape are run as larger batches (up to :data:`MERGED_BATCH_BYTES` for the largest
consumer input), which amortises per-call costs; the caller may also run the pass in
``channels_last`` (see :mod:`spectrim.graph.layout`).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from greenlet import getcurrent, greenlet
from torch import nn

from spectrim._threads import blas_threads_for
from spectrim.calibration.batches import drop_padding, token_mask
from spectrim.calibration.collect import Collected, group_view, whole_axis
from spectrim.calibration.gram import GramAccumulator
from spectrim.calibration.outputs import (
    FITS,
    MIN_ROWS_PER_UNKNOWN,
    Partner,
    consumer_rows,
    output_rows,
    residual_partners,
    rows_of,
    set_unfolded_weight,
    supports_output_fit,
)
from spectrim.distributed import SOLO, Team
from spectrim.graph.channels import Analysis
from spectrim.graph.layout import channels_last_batch, make_channels_last
from spectrim.graph.modules import input_channel_axis, module_kind
from spectrim.graph.surgery import (
    GroupPlan,
    apply_plan,
    fold_consumer,
    gather_index,
    new_positions,
)
from spectrim.graph.trace import batch_len, call_model
from spectrim.linalg.reconstruction import F32_RTOL, fit_cross_reconstruction
from spectrim.linalg.selection import cross_greedy

#: ``refit(keep, consumer, gram, cross, rows) -> B``: a group's correction at one consumer,
#: from the Gram of its kept channels (sorted ``keep``) in the compressed prefix and their
#: cross Gram with the original inputs (the solver's
#: :meth:`~spectrim.methods.GroupSolver.refit`).
Refit = Callable[[np.ndarray, str, np.ndarray, np.ndarray, int], np.ndarray]

#: ``select(gram, cross, k) -> keep``: a group's ``k`` kept channels (sorted) from its
#: full-width Gram in the compressed prefix and the cross Gram with the original inputs
#: (the solver's :meth:`~spectrim.methods.GroupSolver.reselect`).
Select = Callable[[np.ndarray, np.ndarray, int], np.ndarray]

__all__ = [
    "MERGED_BATCH_BYTES",
    "ReaderFits",
    "find_readers",
    "merge_batches",
    "reader_candidates",
    "sequential_correct",
]

Key = tuple[int, str]

#: Tensor batches are merged for the compressed pass while the largest consumer input of
#: the merged batch stays under this many bytes (and at most 256 examples).
MERGED_BATCH_BYTES = 64 << 20
_MERGED_MAX_EXAMPLES = 256


def merge_batches(batches: Sequence[Any], bytes_per_example: float) -> list[list[int]]:
    """Groups of consecutive batch indices to run as one batch.

    Only plain tensors with the same trailing shape are merged (anything else, e.g.
    Hugging Face dicts of ragged length, stays one batch per group), each group up to
    :data:`MERGED_BATCH_BYTES` of ``bytes_per_example`` (the largest stored consumer
    input per example) and 256 examples.

    Example::

        >>> import torch
        >>> merge_batches([torch.zeros(64, 3)] * 5, bytes_per_example=1e6)
        [[0], [1], [2], [3], [4]]
        >>> merge_batches([torch.zeros(64, 3)] * 5, bytes_per_example=1e3)
        [[0, 1, 2, 3], [4]]
    """
    limit = min(_MERGED_MAX_EXAMPLES, int(MERGED_BATCH_BYTES // max(bytes_per_example, 1.0)))
    groups: list[list[int]] = []
    size = 0
    for i, b in enumerate(batches):
        mergeable = (
            isinstance(b, torch.Tensor)
            and groups
            and isinstance(batches[groups[-1][0]], torch.Tensor)
            and b.shape[1:] == batches[groups[-1][0]].shape[1:]
            and b.dtype == batches[groups[-1][0]].dtype
            and size + batch_len(b) <= limit
        )
        if mergeable:
            groups[-1].append(i)
            size += batch_len(b)
        else:
            groups.append([i])
            size = batch_len(b)
    return groups


#: a reader whose output is closer than this (relative) to the original's has nothing to
#: correct: its input did not drift (float32 rounding of the same computation is ~1e-7)
READER_DRIFT = 1e-5


@dataclass
class ReaderFits:
    """What ``refit_readers`` did in a sequential pass.

    A *reader* is a module whose input drifted (it runs after pruned layers) but that
    reads no pruned group, so the pass has no correction for it: a residual block's first
    convolution reading the stream, a classifier.  Refitted, it is fitted by least squares
    on its own original outputs (its kept output channels) over its unfolded inputs in the
    compressed prefix, as an output-fitted consumer is.

    Attributes:
        errors: per reader refitted, the relative error of its output to the original's
            on the fitted rows, ``(before, after)`` its fit.
        skipped: per reader left as it was, why.
        extra_blocks: blocks a block-by-block pass ran for the readers alone (the modules
            after the chain, when no pruned group reaches them).
    """

    errors: dict[str, tuple[float, float]] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)
    extra_blocks: int = 0


def reader_candidates(
    modules: Iterable[tuple[str, nn.Module]], consumers: Collection[str]
) -> dict[str, nn.Module]:
    """The modules (by qualified name) that could be refitted as readers: a registered
    output fit (:func:`~spectrim.calibration.outputs.supports_output_fit`), not a consumer
    of a pruned group (those get the pass's own corrections), not the root.

    Example::

        >>> net = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 2))
        >>> sorted(reader_candidates(net.named_modules(), {"2"}))
        ['0']
    """
    return {n: m for n, m in modules if n and n not in consumers and supports_output_fit(m)}


def find_readers(
    candidates: Mapping[str, nn.Module],
    call: Callable[[Any], Any],
    item: Any,
    fit: str,
    why: dict[str, str] | None = None,
) -> list[str]:
    """Those of ``candidates`` (name -> the module ``call`` runs) that run exactly once on
    ``item`` (a module called twice shares its weight between the calls) and, with
    ``fit="residual"``, whose output reaches no residual addition: there the consumer on
    the other side of the addition cancels the drift, and a later refit of this operand
    would undo what that fit assumed.  ``why`` receives the reason each candidate that ran
    was left out."""
    counts = dict.fromkeys(candidates, 0)

    def count(name: str) -> Callable[..., None]:
        def h(module: nn.Module, args: tuple[Any, ...]) -> None:
            counts[name] += 1

        return h

    def counted(x: Any) -> Any:
        hooks = [m.register_forward_pre_hook(count(n)) for n, m in candidates.items()]
        try:
            with torch.no_grad():
                return call(x)
        finally:
            for hd in hooks:
                hd.remove()

    added: Collection[str] = ()
    if fit == "residual":
        added = residual_partners(candidates, [item], counted)
    else:
        counted(item)
    if why is not None:
        for n in candidates:
            if counts[n] > 1:
                why[n] = f"it runs {counts[n]} times per batch (one weight for all calls)"
            elif counts[n] == 1 and n in added:
                why[n] = (
                    "its output reaches a residual addition (the consumer there fits the drift)"
                )
    return [n for n in candidates if counts[n] == 1 and n not in added]


class _Stop(BaseException):
    """Raised to stop the original model once a reader's output is in hand."""


def _relative_residual(total: float, g_c: np.ndarray, cross: np.ndarray, b: np.ndarray) -> float:
    """``‖Z − Z'_S Bᵀ‖ / ‖Z‖`` from the fit's Grams (``total = ‖Z‖²``).

    Exact to float64 when the products are float64 (``exact`` groups).  With float32
    products the trace formula cancels at about ``sqrt(float32 eps) ≈ 3e-4``, so an
    error of 1e-2 or more (the only kind fitted in float32) is off by at most about 1%.
    """
    if total <= 0:
        return 0.0
    res = total - 2.0 * float(np.sum(cross.T * b)) + float(np.sum((b @ g_c) * b))
    return float(np.sqrt(max(res, 0.0) / total))


def _run_lockstep(
    model: nn.Module,
    batches: list[Any],
    names: list[str],
    fold: Callable[[str, nn.Module, list[torch.Tensor]], None],
    runner: Callable[[Any], Any] | None = None,
    masks: Sequence[torch.Tensor | None] | None = None,
    quiet: list[bool] | None = None,
) -> None:
    """Run every batch's forward pass, pausing all of them at each consumer in ``names``.

    Each batch runs in its own greenlet (one OS thread, normal intra-op parallelism); at a
    consumer's first call every greenlet parks its input, ``fold`` sees all inputs at
    once and updates the module, then all resume.  This is the whole calibration set
    flowing as one batch, but computed in the original mini-batches.  While
    ``quiet[0]`` is true the hooks do nothing (``fold`` runs side passes of the model).
    """
    quiet = quiet if quiet is not None else [False]
    modules = dict(model.named_modules())
    masks = list(masks) if masks is not None else [token_mask(b) for b in batches]
    call = runner if runner is not None else functools.partial(call_model, model)

    def real(i: int, module: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """Batch ``i``'s input without its padded positions, as the statistics saw it."""
        return drop_padding(x, masks[i], input_channel_axis(module, x))[0]

    if len(batches) == 1:
        seen: set[str] = set()

        def hook1(name: str) -> Callable[..., None]:
            def h(module: nn.Module, args: tuple[Any, ...]) -> None:
                if name not in seen and not quiet[0]:
                    seen.add(name)
                    fold(name, module, [real(0, module, args[0].detach())])

            return h

        handles = [modules[n].register_forward_pre_hook(hook1(n)) for n in names]
        try:
            with torch.no_grad():
                call(batches[0])
        finally:
            for hd in handles:
                hd.remove()
        return

    parent = getcurrent()
    seen_by: dict[Any, set[str]] = {}

    def hook(name: str) -> Callable[..., None]:
        def h(module: nn.Module, args: tuple[Any, ...]) -> None:
            if quiet[0]:
                return
            me = getcurrent()
            seen = seen_by.setdefault(me, set())
            if name not in seen:
                seen.add(name)
                parent.switch(("park", name, module, args[0].detach()))

        return h

    def task(batch: Any) -> Callable[[], tuple[str]]:
        def run() -> tuple[str]:
            call(batch)
            return ("done",)

        return run

    handles = [modules[n].register_forward_pre_hook(hook(n)) for n in names]
    grad = torch.is_grad_enabled()
    torch.set_grad_enabled(False)  # greenlet-safe: no nested context managers
    try:
        lets = [greenlet(task(b)) for b in batches]
        states = [g.switch() for g in lets]
        while True:
            parked = [i for i, st in enumerate(states) if st[0] == "park"]
            if not parked:
                break
            if len(parked) != len(lets) or len({states[i][1] for i in parked}) != 1:
                raise RuntimeError(
                    "sequential calibration: the calibration batches take different paths "
                    "through the model; use sequential=False"
                )
            name, module = states[0][1], states[0][2]
            fold(name, module, [real(i, module, states[i][3]) for i in parked])
            states = [lets[i].switch() for i in parked]
    finally:
        torch.set_grad_enabled(grad)
        for hd in handles:
            hd.remove()


def sequential_correct(
    model: nn.Module,
    analysis: Analysis,
    batches: Sequence[Any],
    keep: Mapping[int, np.ndarray],
    collected: Collected,
    ridge: float = 0.0,
    row_ridge: Mapping[int, np.ndarray] | None = None,
    exact: Mapping[int, bool] | None = None,
    channels_last: bool = False,
    refit: Mapping[int, Refit] | None = None,
    team: Team = SOLO,
    runner: Callable[[Any], Any] | None = None,
    masks: Sequence[torch.Tensor | None] | None = None,
    reselect: Collection[int] | Mapping[int, Select] = (),
    fit: str = "inputs",
    original: nn.Module | None = None,
    partners: Mapping[str, Sequence[Partner]] | None = None,
    side_runner: Callable[[str], Callable[[Any], Any]] | None = None,
    warn: Callable[[str], None] | None = None,
    within: Callable[[str], bool] | None = None,
    fetch: Callable[[Any], Any] | None = None,
    readers: ReaderFits | None = None,
    reader_outputs: Mapping[str, Sequence[Any]] | None = None,
    routed: Collection[str] = (),
    fixed: Mapping[int, Mapping[str, np.ndarray | None]] | None = None,
) -> tuple[dict[int, dict[str, np.ndarray]], dict[Key, float], dict[int, np.ndarray]]:
    """Prune ``model`` in place, fitting every consumer's correction sequentially.

    The producers and passengers of every pruned group are sliced first, so the pass
    runs the *compressed* network (about ``macs_ratio`` of a forward pass).  At each
    consumer, in execution order, the kept inputs ``Z'_S`` of the compressed prefix are
    paired with the original inputs ``Z`` and ``B = argmin ‖Z − Z'_S Bᵀ‖`` is folded
    into the consumer's original weights before it runs.

    A group in ``reselect`` keeps its width (``len(keep[gi])``) but not its channels: it
    runs at full width, and at its first consumer the kept set is chosen anew from the
    compressed prefix's full-width Gram and its cross Gram with the original inputs
    (by default :func:`~spectrim.linalg.cross_greedy`: the channels whose corrected fit
    is best, not those that best reconstruct the original's own channels).  Until the end of the
    pass its consumers read the dropped channels through zero columns; then its
    producers, passengers and consumers are sliced.

    Args:
        model: the model to prune (in place).
        analysis: its channel analysis.
        batches: the calibration batches whose original consumer inputs were stored.
        keep: group index -> kept channel indices for every pruned group.
        collected: the original pass (:func:`~spectrim.calibration.collect.collect`
            with ``store_fraction > 0``).
        ridge: relative ridge ``τ = ridge·tr(G'_SS)/k``.
        row_ridge: per group, a penalty per kept channel (sorted order) and per
            calibration row, added to the fit as ``row_ridge·rows`` (spectral's ``I_τ``).
        exact: per group, whether the fit's products are float64 (default: all).  Only
            fits that can be (nearly) exact need them: float32 products leave a relative
            error of about 1e-5 in the outputs, invisible next to a pruning error of 1e-2.
        channels_last: the model is in ``channels_last`` (the caller checked that it
            computes the same there); the batches are converted to it for this pass.
        refit: per group, the solver's own fit (a method with a constrained correction
            keeps its constraint); groups without one get the unconstrained least squares
            with ``ridge`` / ``row_ridge``.
        team: the processes sharing the run: each runs its own stored batches and every
            fit's products are summed over them before the fit (:mod:`spectrim.distributed`).
            A rank that stored none passes ``batches`` of one batch and ``collected``
            without inputs: it runs the pass for its order of fits and adds no rows.
        runner: runs one item of ``batches`` through the (compressed) model; default
            :func:`~spectrim.graph.trace.call_model`.  The block-by-block pass
            (:mod:`spectrim.calibration.blocks`) runs one block on cached inputs with it.
        masks: each batch's real token positions (default: from the batches themselves).
        reselect: groups whose kept channels are chosen in the pass (above), or a mapping
            from them to their own selection rule (:data:`Select`).
        fit: ``"inputs"`` (the channel interpolation above), ``"outputs"`` or
            ``"residual"`` (:mod:`spectrim.calibration.outputs`): a consumer that reads
            one whole group (a reselected one once chosen), with a registered unfolding
            (``Linear``, ``Conv1d``/``Conv2d``) gets its weight and bias refitted by
            least squares on its own outputs over its unfolded kept inputs (``refit``,
            ``ridge`` and ``row_ridge`` do not apply to it; its ``folds`` entry is
            absent); the others keep the interpolation.
        original: the unpruned model (a copy), for ``fit="residual"``: the original
            operand of each residual addition is read from it.
        partners: instead of ``original``, those operands already found, per consumer
            and per item of ``batches`` (:func:`~spectrim.calibration.outputs.residual_partners`;
            the block-by-block pass finds them on its copy of each original block).
        side_runner: for ``fit="residual"``, the runner of the side pass that finds a
            consumer's compressed operand at its addition: ``side_runner(name)`` runs one
            item from as close before consumer ``name`` as the caller can start (the
            block-by-block pass: the chain module holding it, from its input in this
            pass); default ``runner`` (the whole block or model, from the start).
        warn: receives a line for each consumer that keeps the interpolation because its
            output fit would have fewer than
            :data:`~spectrim.calibration.outputs.MIN_ROWS_PER_UNKNOWN` rows per unknown.
        within: the modules (by qualified name) this call slices and fits; the groups'
            producers, passengers and consumers elsewhere are left as they are (the
            block-by-block pass: one block's, a group that spans blocks is handled in each
            of them).  Default: all.
        fetch: reads a partner's operand or a stored input when they are handles (the
            block pass's :meth:`~spectrim.calibration.spill.Spill.get`); default: they
            are the tensors.
        readers: refit the readers too (:class:`ReaderFits`, which records what was
            done): in execution order with the consumers, each module that runs after
            pruned layers but reads no pruned group gets its weight and bias fitted on its
            own original outputs (its kept output channels) over its unfolded inputs in
            the compressed prefix, unless its input did not drift, its fit would have
            fewer than :data:`~spectrim.calibration.outputs.MIN_ROWS_PER_UNKNOWN` rows per
            unknown, it runs more than once, or (``fit="residual"``) its output reaches a
            residual addition (:func:`find_readers`).  ``None`` (default): not.
        reader_outputs: the readers to refit and their original outputs per item of
            ``batches`` (padding dropped; the block pass keeps them on its copy of each
            original block); default: every candidate of ``model``
            (:func:`reader_candidates`), their outputs read from ``original``.
        routed: modules whose input rows the model picks by its own activations
            (:func:`~spectrim.graph.trace.routed_modules`: the experts of an MoE layer).
            Their rows in this pass are not those of the original pass (the pruned prefix
            routes some tokens elsewhere), so none is fitted or refitted here: a consumer
            among them needs its correction in ``fixed``, and its groups are not reselected.
        fixed: per group, the corrections of its ``routed`` consumers (consumer -> ``B``,
            or ``None`` to slice without one), folded before the pass as
            :func:`~spectrim.graph.surgery.apply_plan` folds a plan's.

    Returns:
        ``folds[group][consumer] = B``, the relative error of each fit, and the kept
        channels of every group (``keep``, with the reselected groups' new sets).
    """
    if fit not in FITS or fit == "auto":
        raise ValueError(
            f"fit={fit!r} must be one of {', '.join(f for f in FITS if f != 'auto')} "
            "(resolve 'auto' with calibration.outputs.resolve_fit)"
        )
    if fit == "residual" and original is None and partners is None:
        raise ValueError("fit='residual' needs the original model (original=) or its partners")
    if fit == "residual" and partners is None and runner is not None:
        raise ValueError("fit='residual' with a block runner needs the partners (partners=)")
    modules = dict(model.named_modules())
    keep = {gi: np.sort(np.asarray(k, dtype=np.int64)) for gi, k in keep.items()}
    fixed = {gi: dict(f) for gi, f in (fixed or {}).items() if gi in keep and f}
    missing_fix = sorted(
        slot.module
        for gi in keep
        for slot in analysis.groups[gi].consumers
        if slot.module in routed and slot.module not in fixed.get(gi, {})
    )
    if missing_fix:
        raise ValueError(
            f"sequential calibration: consumer(s) {missing_fix} run on routed rows and need "
            "their corrections in fixed="
        )
    chosen = {gi for gi in reselect if gi in keep and gi not in fixed}  # groups still to select
    rules: Mapping[int, Select] = reselect if isinstance(reselect, Mapping) else {}
    width = {gi: len(keep[gi]) for gi in chosen}
    dropped: set[int] = set()  # classes sliced before the pass (groups not reselected)
    for gi, kept in keep.items():
        if gi in chosen:
            continue
        g = analysis.groups[gi]
        mask = np.ones(g.width, dtype=bool)
        mask[kept] = False
        dropped.update(int(c) for c in g.classes[mask])
    per_module: dict[str, list[tuple[int, np.ndarray]]] = {}
    for gi in keep:
        for slot in analysis.groups[gi].consumers:
            if (within is None or within(slot.module)) and slot.module not in routed:
                per_module.setdefault(slot.module, []).append((gi, slot.positions))
    newpos = {name: new_positions(analysis.in_labels[name], dropped) for name in per_module}
    orig_w: dict[str, torch.Tensor] = {}
    for name in per_module:
        w = modules[name].weight
        assert isinstance(w, torch.Tensor)
        orig_w[name] = w.data
    # consumers fitted on their own outputs (fit="outputs"/"residual")
    eligible = {
        name
        for name, slots in per_module.items()
        if fit != "inputs"
        and len(slots) == 1
        and supports_output_fit(modules[name])
        and whole_axis(torch.as_tensor(slots[0][1]))
        and orig_w[name].shape[1] == len(slots[0][1])
    }
    given = {gi: {c: b for c, b in f.items() if b is not None} for gi, f in fixed.items()}
    apply_plan(
        model,
        analysis,
        {
            gi: GroupPlan(keep=k, folds=given.get(gi, {}))
            for gi, k in keep.items()
            if gi not in chosen
        },
        only=within,
    )
    if channels_last:  # surgery leaves contiguous weights
        make_channels_last(model)
    modules = dict(model.named_modules())
    folds: dict[int, dict[str, np.ndarray]] = {
        gi: {c: b for c, b in given.get(gi, {}).items() if within is None or within(c)}
        for gi in keep
    }
    errors: dict[Key, float] = {}
    done: set[str] = set()

    contributes = collected.n_stored > 0
    fetch = fetch if fetch is not None else (lambda x: x)

    def original_weight(name: str, module: nn.Module) -> torch.Tensor:
        """The consumer's original weight, its dropped output channels sliced off."""
        w = orig_w[name]
        if name in analysis.out_labels:  # also a producer: keep its sliced outputs
            idx = gather_index(analysis.out_labels[name], dropped, {})
            kind = module_kind(module)
            out_dim = kind.weight_dims[0] if kind is not None else 0
            w = w.index_select(out_dim, torch.as_tensor(idx, device=w.device))
        return w

    def fit_outputs(
        name: str, module: nn.Module, xs: list[torch.Tensor]
    ) -> tuple[np.ndarray, torch.Tensor | None]:
        """Consumer ``name``'s weight (and bias column) fitted on its own outputs, and the
        input channels it is for (``None``: all; a reselected group runs at full width)."""
        ((gi, positions),) = per_module[name]
        bias = getattr(module, "bias", None)
        w_o = original_weight(name, module)
        b_o = None if bias is None else bias.detach().clone()  # sliced, never refitted
        params = {"weight": w_o} if b_o is None else {"weight": w_o, "bias": b_o}
        linear = isinstance(module, nn.Linear)
        sel = None
        if gi in width:  # the kept channels of a group still at full width
            sel = torch.as_tensor(newpos[name][positions[keep[gi]]].reshape(-1))
        cols = len(keep[gi]) * int(w_o[0, 0].numel()) + (bias is not None)
        precise = True if exact is None else bool(exact.get(gi, True))
        acc = GramAccumulator(cols, cross_dim=int(w_o.shape[0]), exact=precise, sums=False)
        parts = list(collected.inputs.get((gi, name), [])) if contributes else []
        if len(xs) == 1 and run_sizes[0] is None and len(parts) > 1:
            parts = [torch.cat([fetch(p) for p in parts])]  # one concatenated batch passed
        theirs = found.get(name)
        side = call if side_runner is None else side_runner(name)

        def mine(j: int) -> Partner:
            """The compressed model's operand at the same addition, batch ``j`` (one side
            pass each, so that one batch's operand is held at a time)."""
            got = residual_partners({name: module}, [run[j]], side, first=True).get(name)
            if got is None:
                raise RuntimeError(
                    f"sequential calibration: the output of consumer '{name}' no longer "
                    "reaches the residual addition it reached in the original model"
                )
            return got[0]

        at = 0
        for j, x in enumerate(xs if parts else []):
            n = run_sizes[j]
            pieces = (x,) if n is None else x.split(n)
            zs, at = parts[at : at + len(pieces)], at + len(pieces)
            if len(zs) != len(pieces):
                raise RuntimeError(
                    f"sequential calibration: consumer '{name}' ran on more batches in the "
                    "compressed pass than in the original pass"
                )
            if sel is not None:
                pieces = tuple(p.index_select(-1 if linear else 1, sel) for p in pieces)
            a_parts = [consumer_rows(module, p) for p in pieces]
            y = torch.cat(
                [
                    output_rows(module, torch.func.functional_call(module, params, (fetch(z),)))
                    for z in zs
                ]
            ).double()
            if theirs is not None:
                ours = mine(j)
                r, rc, scale = fetch(theirs[j].other), ours.other, ours.scale
                axis = r.dim() - 1 if linear else 1
                if name in analysis.out_labels:
                    idx = gather_index(analysis.out_labels[name], dropped, {})
                    r = r.index_select(axis, torch.as_tensor(idx, device=r.device))
                if linear:
                    r = drop_padding(r, run_masks[j], axis)[0]
                    rc = drop_padding(rc, run_masks[j], axis)[0]
                d = output_rows(module, r).double() - output_rows(module, rc).double()
                if scale is not None:  # (r − r')/s; a channel whose s vanishes cannot help
                    tiny = scale.abs() <= 1e-8 * float(scale.abs().max().clamp_min(1e-300))
                    d = torch.where(tiny, 0.0, d / torch.where(tiny, 1.0, scale).to(d.device))
                if d.shape != y.shape:
                    raise RuntimeError(
                        f"sequential calibration: consumer '{name}' has {tuple(y.shape)} output "
                        f"rows but its residual addition {tuple(d.shape)}"
                    )
                y = y + d
            rows = sum(int(a.shape[0]) for a in a_parts)
            if rows != y.shape[0]:
                raise RuntimeError(
                    f"sequential calibration: consumer '{name}' got {rows} rows where "
                    f"the original pass had {y.shape[0]}"
                )
            # one update per stored batch: the float32 products are then grouped the same
            # whatever the batches were merged into (or spread over processes)
            for a, y_p in zip(a_parts, y.split([int(a.shape[0]) for a in a_parts])):
                if bias is not None:
                    a = torch.cat([a, a.new_ones(a.shape[0], 1)], 1)
                acc.update(a, y_p)
        team.reduce({0: acc})
        g, cross = acc.gram_numpy(), acc.cross_numpy()
        with blas_threads_for(cols):
            b = fit_cross_reconstruction(g, cross, np.arange(cols), rtol=F32_RTOL)
        errors[(gi, name)] = _relative_residual(float(acc.y_sq_sums.sum()), g, cross, b)
        folds[gi].pop(name, None)  # no channel interpolation at this consumer
        return b, sel

    def enough_rows(name: str, module: nn.Module, xs: list[torch.Tensor]) -> bool:
        """Whether consumer ``name``'s output fit has enough rows (over all processes)
        for its unknowns; else it keeps the interpolation (and ``warn`` hears why)."""
        ((gi, _),) = per_module[name]
        k = width[gi] if gi in width else len(keep[gi])
        weight = orig_w[name]
        unknowns = k * int(weight[0, 0].numel()) + (getattr(module, "bias", None) is not None)
        rows = int(team.total(sum(rows_of(module, x) for x in xs) if contributes else 0))
        if rows >= MIN_ROWS_PER_UNKNOWN * unknowns:
            return True
        if warn is not None:
            warn(
                f"'{name}' keeps the channel interpolation: its output fit would have "
                f"{rows} calibration rows for {unknowns} unknowns per output (fewer than "
                f"{MIN_ROWS_PER_UNKNOWN} per unknown; more calibration data or a larger "
                "sequential_fraction lifts it)"
            )
        return False

    def reader_target(name: str, module: nn.Module, j: int) -> torch.Tensor:
        """The original output of reader ``name`` on run item ``j``, padding dropped."""
        if reader_outputs is not None:
            return fetch(reader_outputs[name][j])
        assert original is not None
        got: list[torch.Tensor] = []

        def stop(_: nn.Module, args: tuple[Any, ...], out: Any) -> None:
            got.append(out.detach())
            raise _Stop

        hd = in_original[name].register_forward_hook(stop)
        try:
            call_model(original, run[j])
        except _Stop:
            pass
        finally:
            hd.remove()
        if not got:
            raise RuntimeError(f"sequential calibration: reader '{name}' did not run")
        y = got[0]
        return drop_padding(y, run_masks[j], input_channel_axis(module, y))[0]

    def fit_reader(name: str, module: nn.Module, xs: list[torch.Tensor]) -> None:
        """Reader ``name``'s weight and bias fitted on its own original outputs (kept
        channels) over its unfolded inputs ``xs`` in the compressed prefix."""
        weight = module.weight
        assert isinstance(weight, torch.Tensor)
        bias = getattr(module, "bias", None)
        cols = int(weight[0].numel()) + (bias is not None)
        idx = None
        if name in analysis.out_labels:  # a producer: its kept output channels
            idx = torch.as_tensor(gather_index(analysis.out_labels[name], dropped, {}))
        assert readers is not None
        # the rows floor first: below it, neither the original's targets nor the Gram are built
        rows = int(team.total(sum(rows_of(module, x) for x in xs) if contributes else 0))
        if rows < MIN_ROWS_PER_UNKNOWN * cols:
            readers.skipped[name] = (
                f"{rows} calibration rows for {cols} unknowns per output (fewer than "
                f"{MIN_ROWS_PER_UNKNOWN} per unknown)"
            )
            return
        acc = GramAccumulator(cols, cross_dim=int(weight.shape[0]), exact=False, sums=False)
        drift, energy = 0.0, 0.0
        for j, x in enumerate(xs if contributes else []):
            y = reader_target(name, module, j)
            if idx is not None:
                y = y.index_select(input_channel_axis(module, y), idx.to(y.device))
            n = run_sizes[j]
            for x_p, y_p in zip(*(([x], [y]) if n is None else (x.split(n), y.split(n)))):
                target = output_rows(module, y_p).double()
                now = output_rows(module, module(x_p)).double()
                if now.shape != target.shape:
                    raise RuntimeError(
                        f"sequential calibration: reader '{name}' has {tuple(now.shape)} "
                        f"output rows where the original had {tuple(target.shape)}"
                    )
                drift += float((now - target).square().sum())
                energy += float(target.square().sum())
                a = consumer_rows(module, x_p)
                if bias is not None:
                    a = torch.cat([a, a.new_ones(a.shape[0], 1)], 1)
                acc.update(a, target)
        drift, energy = team.total(drift), team.total(energy)
        before = float(np.sqrt(drift / energy)) if energy > 0 else 0.0
        if before < READER_DRIFT:
            readers.skipped[name] = "its input did not drift"
            return
        team.reduce({0: acc})
        g, cross = acc.gram_numpy(), acc.cross_numpy()
        with blas_threads_for(cols):
            b = fit_cross_reconstruction(g, cross, np.arange(cols), rtol=F32_RTOL)
        after = _relative_residual(float(acc.y_sq_sums.sum()), g, cross, b)
        set_unfolded_weight(module, b)
        readers.errors[name] = (before, after)

    def fold(name: str, module: nn.Module, xs: list[torch.Tensor]) -> None:
        """Fit and fold the corrections of consumer ``name`` from all its inputs ``xs``."""
        if name in reader_set:
            quiet[0] = True  # the fit runs the reader (and the original model) on the side
            try:
                fit_reader(name, module, xs)
            finally:
                quiet[0] = False
            if channels_last:
                make_channels_last(module)
            return
        done.add(name)
        applied = []
        zeroed: list[np.ndarray] = []  # columns of reselected groups' dropped channels
        # a consumer refitted on its outputs needs the channel pass only to select
        own_fit = name in eligible and enough_rows(name, module, xs)
        selects = any(gi in chosen for gi, _ in per_module[name])
        for gi, positions in per_module[name] if not own_fit or selects else []:
            m = analysis.groups[gi].width
            selecting = gi in chosen  # its first consumer: all m channels are candidates
            candidates = np.arange(m) if selecting else keep[gi]
            kept_at = newpos[name][positions[candidates]]
            parts = collected.inputs.get((gi, name), []) if contributes else []
            pos_t = torch.as_tensor(kept_at, dtype=torch.long)
            precise = True if exact is None else bool(exact.get(gi, True))
            acc = GramAccumulator(len(kept_at), cross_dim=m, exact=precise, sums=False)
            # a merged batch's input, cut back into the stored batches (views)
            pieces = [p for x, n in zip(xs, run_sizes) for p in ((x,) if n is None else x.split(n))]
            if not contributes:  # this rank stored no batch: the others' rows alone
                pieces = []
            if len(pieces) == 1 and len(parts) > 1:  # the caller passed one concatenated batch
                parts = [torch.cat([fetch(p) for p in parts])]
            if len(pieces) != len(parts):
                raise RuntimeError(
                    f"sequential calibration: consumer '{name}' ran on {len(pieces)} batches "
                    f"in the compressed pass but {len(parts)} in the original pass"
                )
            for x, z_o in zip(pieces, parts):
                z_o = fetch(z_o)  # a stored input written to disk, or the value itself
                # per piece: a batch without padding keeps its (B, T, C) layout where
                # a padded one became (N, C)
                z_c, vcd = group_view(x, input_channel_axis(module, x), pos_t)
                if z_c.numel() // len(kept_at) != z_o.numel() // m:
                    raise RuntimeError(
                        f"sequential calibration: consumer '{name}' got "
                        f"{z_c.numel() // len(kept_at)} rows where the original pass "
                        f"had {z_o.numel() // m}"
                    )
                acc.update_activation(z_c, vcd, y=z_o)
            team.reduce({0: acc})
            g_c, cross = acc.gram_numpy(), acc.cross_numpy()
            total = float(acc.y_sq_sums.sum())
            if selecting:
                with blas_threads_for(m):
                    if gi in rules:
                        new = rules[gi](g_c, cross, width[gi])
                    else:
                        new = cross_greedy(g_c, cross, k=width[gi]).order
                keep[gi] = np.sort(np.asarray(team.broadcast(new), dtype=np.int64))
                if len(keep[gi]) != width[gi] or len(np.unique(keep[gi])) != width[gi]:
                    raise RuntimeError(
                        f"sequential calibration: the selection of group "
                        f"'{analysis.groups[gi].name}' returned {len(keep[gi])} distinct "
                        f"channels, not {width[gi]}"
                    )
                chosen.discard(gi)
                g_c, cross = g_c[np.ix_(keep[gi], keep[gi])], cross[keep[gi]]
            if gi in width:  # a reselected group runs at full width: zero its dropped columns
                off = np.setdiff1d(np.arange(m), keep[gi])
                zeroed.append(newpos[name][positions[off]].reshape(-1))
            own = refit.get(gi) if refit is not None else None
            with blas_threads_for(m):
                if own is not None:
                    b = own(keep[gi], name, g_c, cross, acc.count)
                else:
                    s = np.arange(g_c.shape[0])
                    tau: float | np.ndarray = ridge * float(np.trace(g_c)) / max(len(g_c), 1)
                    if row_ridge is not None and gi in row_ridge:
                        tau = tau + np.asarray(row_ridge[gi], dtype=np.float64) * acc.count
                    # activations are float32: directions below ~float32 precision are noise
                    b = fit_cross_reconstruction(g_c, cross, s, ridge=tau, rtol=F32_RTOL)
            folds[gi][name] = b
            errors[(gi, name)] = _relative_residual(total, g_c, cross, b)
            applied.append((positions, keep[gi], b))
        w = original_weight(name, module)
        weight = module.weight
        assert isinstance(weight, torch.Tensor)
        module.weight = nn.Parameter(w, requires_grad=weight.requires_grad)
        fold_consumer(module, analysis.in_labels[name], dropped, {}, applied)
        if zeroed:  # the full-width input of a reselected group reads its kept channels only
            kind = module_kind(module)
            assert kind is not None and isinstance(module.weight, torch.Tensor)
            cols = torch.as_tensor(np.concatenate(zeroed), device=module.weight.device)
            module.weight.data.index_fill_(kind.weight_dims[1], cols, 0.0)
        if own_fit:
            quiet[0] = True  # the fit runs the consumer (and the model) on the side
            try:
                refitted, channels = fit_outputs(name, module, xs)
            finally:
                quiet[0] = False
            set_unfolded_weight(module, refitted, channels)
        if channels_last:
            make_channels_last(module)

    batches = list(batches)
    # merged batches are cut back along the first axis: only when every stored consumer
    # input has the batch there (not, e.g., a (T, B, H) attention input); a runner (the
    # block pass, whose stored inputs may be handles to files) runs the batches as they are
    batch_major = runner is None and all(
        [int(p.shape[0]) for p in parts] == [batch_len(b) for b in batches[: len(parts)]]
        for parts in collected.inputs.values()
    )
    if batch_major:
        per_example = max(
            (
                parts[0].numel() * parts[0].element_size() / max(batch_len(batches[0]), 1)
                for parts in collected.inputs.values()
                if parts
            ),
            default=1.0,
        )
        groups = merge_batches(batches, per_example)
    else:
        groups = [[i] for i in range(len(batches))]
    run = [batches[g[0]] if len(g) == 1 else torch.cat([batches[i] for i in g]) for g in groups]
    if channels_last:
        run = [channels_last_batch(b) for b in run]
    # how each consumer input splits into the stored batches: a single batch whole (its
    # first axis need not be the batch), a merged one along the batch axis
    run_sizes = [None if len(g) == 1 else [batch_len(batches[i]) for i in g] for g in groups]
    run_masks = list(masks) if masks is not None else [token_mask(b) for b in run]
    call = runner if runner is not None else functools.partial(call_model, model)
    quiet = [False]
    # the original operand of every residual addition a refitted consumer's output reaches
    found: dict[str, list[Partner]] = {}
    if fit == "residual" and partners is not None:
        found = {n: list(p) for n, p in partners.items() if n in eligible}
    elif fit == "residual" and eligible and contributes:
        assert original is not None
        originals = dict(original.named_modules())
        found = residual_partners(
            {n: originals[n] for n in sorted(eligible)},
            run,
            functools.partial(call_model, original),
        )
    reading: list[str] = []
    in_original: dict[str, nn.Module] = {}  # the original's modules, where it gives the targets
    if readers is not None and reader_outputs is not None:
        reading = [n for n in reader_outputs if n in modules and n not in per_module]
    elif readers is not None:
        if original is None:
            raise ValueError("readers= needs the original model (original=) or reader_outputs=")
        consumers = {s.module for gi in keep for s in analysis.groups[gi].consumers}
        in_original.update(original.named_modules())
        candidates = reader_candidates(in_original.items(), consumers)
        on_original = functools.partial(call_model, original)
        reading = team.broadcast(
            find_readers(candidates, on_original, run[0], fit, readers.skipped)
        )
    reading = [n for n in reading if (within is None or within(n)) and n not in routed]
    reader_set = set(reading)
    names = list(per_module) + [n for n in reading if n not in per_module]
    _run_lockstep(model, run, names, fold, runner, run_masks, quiet)
    missing = sorted(set(per_module) - done)
    if missing:
        raise RuntimeError(
            f"sequential calibration: consumer(s) {missing} did not run on the calibration batch"
        )
    if width:  # the reselected groups' channels leave the model only now
        apply_plan(
            model,
            analysis,
            {gi: GroupPlan(keep=keep[gi]) for gi in width},
            already=dropped,
            only=within,
        )
        if channels_last:
            make_channels_last(model)
    return folds, errors, keep
