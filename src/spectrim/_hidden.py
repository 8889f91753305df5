"""The residual-width run behind ``spectrim.compress(..., target="hidden=F")``.

``find → convert → collect → solve → narrow → refit → report``:

* find: the model's residual stream (:func:`spectrim.graph.stream.find_stream`);
* convert (exact): a norm whose output is the model's output becomes a
  :class:`~spectrim.graph.stream.NormExpand` (the output keeps its width).  In a pre-LN
  model every writer is centred (``W ← (I − 11ᵀ/d)W``: the stream's mean is then zero, so
  a LayerNorm equals an RMSNorm), and every norm's affine is folded into its readers
  (``W ← W diag γ``, ``b ← b + Wβ``), leaving parameter-free RMSNorms, which commute with
  rotations (SliceGPT, Ashkboos et al. 2024).  With a tied LM head nothing is centred:
  the norms centre along a mean direction the basis keeps, and the last norm's affine
  becomes a map before the head, so the head stays tied (docs/design.md §7d);
* collect: the Gram of the normalised stream (every norm's output; padded positions left
  out), float64, summed over the norms;
* solve: the method's :meth:`~spectrim.methods.Method.stream_solver` gives the basis ``E``
  (``d × k``): a selection of coordinates or a rotation;
* narrow: writers and embeddings write ``Eᵀ·``; pre-LN norms normalise the ``k`` kept
  coordinates by the original width (exact for a stream in the kept span); post-LN
  LayerNorms are sliced to the kept coordinates; readers read ``W E``;
* refit (methods with a correction): at every norm, in execution order, each reader gets
  the least-squares map ``M`` (``d × k``, plus an intercept where the readers have biases)
  from what the narrowed model's norm now outputs to what the original's did, fitted on
  the narrowed prefix (``sequential=True``, the default: each fit sees the earlier
  refits) or on the original model's own stream put through the narrowed norm (one
  shot); the readers' new weights are ``W M``.

Exact: the conversion (to float rounding), the narrowing at ``F = 1``.  Approximate: the
directions dropped, a sliced post-LN LayerNorm's statistics (mean and variance over the
kept coordinates only), and an RMSNorm's scale when the stream leaves the kept span; the
refit minimises their effect on what every reader sees.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from spectrim.calibration.batches import drop_padding, token_mask
from spectrim.calibration.checks import CalibrationInfo
from spectrim.config import CompressConfig
from spectrim.context import RunContext
from spectrim.distributed import SOLO, Team
from spectrim.graph.channels import shared_tensors
from spectrim.graph.modules import set_param
from spectrim.graph.stream import (
    NormExpand,
    NormSite,
    ResidualStream,
    StreamRMSNorm,
    find_stream,
    has_bias,
    norm_affine,
    read_columns,
    set_module,
    sync_stream_views,
    width_step,
    write_rows,
)
from spectrim.graph.trace import StopPass, call_until_stopped, model_outputs
from spectrim.graph.verify import output_change
from spectrim.linalg import fit_cross_reconstruction
from spectrim.methods import Method
from spectrim.methods.stream import StreamPlan, StreamSolver
from spectrim.report import CompressionReport, GroupReport
from spectrim.stages import begin_run, end_run, example_cost

__all__ = [
    "HIDDEN_SUFFIX",
    "apply_hidden",
    "convert_stream",
    "hidden_group_report",
    "hidden_run",
    "narrow_stream",
    "one_of_two_streams",
    "refit_site",
    "stream_grams",
    "tied_head",
    "with_tied_embeddings",
]

#: the report names the residual stream's group "<stream> (hidden)" (``group_weights`` too)
HIDDEN_SUFFIX = " (hidden)"


def _rows(x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    x, _ = drop_padding(x.detach(), mask, x.dim() - 1)
    return x.reshape(-1, x.shape[-1]).double()


def _expand(model: nn.Module, path: str, width: int) -> None:
    """Put :class:`NormExpand` (the norm at ``path``, then an identity ``width × width``
    map) in place of the norm.  Exact."""
    norm = model.get_submodule(path)
    wrapped = NormExpand(norm, width)
    p = next(iter(norm.parameters()), None)
    dtype = p.dtype if p is not None else torch.float32
    with torch.no_grad():
        wrapped.expand.weight.copy_(torch.eye(width, dtype=dtype))
        wrapped.expand.bias.zero_()
    wrapped.to(dtype)
    set_module(model, path, wrapped)


def _wrap_outputs(model: nn.Module, stream: ResidualStream) -> ResidualStream:
    """Every site without readers (its output is the model's output) becomes a
    :class:`NormExpand` whose identity ``expand`` is its reader, and every embedding norm
    one whose ``expand`` writes the stream.  Exact."""
    sites = []
    for s in stream.sites:
        if s.readers:
            sites.append(s)
            continue
        _expand(model, s.norm, stream.width)
        sites.append(NormSite(f"{s.norm}.norm", [f"{s.norm}.expand"]))
    writers = list(stream.writers)
    for path in stream.embedding_norms:
        _expand(model, path, stream.width)
        writers.insert(0, f"{path}.expand")
    return dataclasses.replace(stream, sites=sites, writers=writers, embedding_norms=[])


def with_tied_embeddings(
    model: nn.Module, stream: ResidualStream
) -> tuple[ResidualStream, list[list[str]]]:
    """The stream with every other ``nn.Embedding`` that shares an embedding's weight
    (T5's ``shared`` and ``encoder.embed_tokens``) among its embeddings, so all are
    narrowed alike; and the model's groups of shared tensors, to tie again afterwards."""
    groups = shared_tensors(model)
    extra = [
        o for owners in _weight_sharers(groups)
        if any(e in owners for e in stream.embeddings)
        for o in owners
        if o not in stream.embeddings and isinstance(model.get_submodule(o), nn.Embedding)
    ]  # fmt: skip
    return dataclasses.replace(stream, embeddings=[*stream.embeddings, *extra]), groups


def _weight_sharers(groups: list[list[str]]) -> list[list[str]]:
    """Per group of shared tensors (:func:`shared_tensors`), the modules whose ``weight``
    it is."""
    return [[n.rpartition(".")[0] for n in g if n.endswith(".weight")] for g in groups]


def _retie(model: nn.Module, groups: list[list[str]]) -> None:
    """Tie again the tensors of each group that surgery left equal (the same values in
    the same shape); the others stay untied (a head folded with a norm's scale)."""
    for group in groups:
        owners = [(n.rpartition(".")[0], n.rpartition(".")[2]) for n in group]
        first = getattr(model.get_submodule(owners[0][0]), owners[0][1])
        for mod, leaf in owners[1:]:
            m = model.get_submodule(mod)
            t = getattr(m, leaf)
            if t is not first and t.shape == first.shape and torch.equal(t, first):
                setattr(m, leaf, first)


def tied_head(model: nn.Module, stream: ResidualStream) -> tuple[str, str] | None:
    """``(head, embedding)`` when a reader of the stream's last norm holds the weight of
    one of its embeddings (a tied LM head), else ``None``."""
    holders = {o: owners for owners in _weight_sharers(shared_tensors(model)) for o in owners}
    for r in stream.sites[-1].readers:
        for e in stream.embeddings:
            if e in holders.get(r, ()):
                return r, e
    return None


def convert_stream(model: nn.Module, stream: ResidualStream) -> ResidualStream:
    """The exact rewrite of ``model`` (in place) that lets its stream be narrowed; returns
    the stream of the rewritten model (see the module docstring)."""
    tied = tied_head(model, stream) if stream.kind == "pre" else None
    if tied is not None:  # the head keeps its tie: the last norm's affine goes elsewhere
        sites = [*stream.sites[:-1], NormSite(stream.sites[-1].norm, [])]
        stream = dataclasses.replace(stream, sites=sites)
    stream = _wrap_outputs(model, stream)
    if stream.kind == "post":
        return stream
    d = stream.width
    affines = {s.norm: norm_affine(model.get_submodule(s.norm), d, s.norm) for s in stream.sites}
    kinds = {a[0] for a in affines.values()}
    # a LayerNorm = an RMSNorm of the centred stream: centre every writer, or (with a tied
    # head, whose embedding must stay as it is) let each norm centre along the mean direction
    centred = "layer" in kinds and tied is not None
    if "layer" in kinds and tied is None:
        C = torch.eye(d, dtype=torch.float64) - 1.0 / d
        for name in stream.embeddings + stream.writers:
            write_rows(model.get_submodule(name), C, name)
    for s in stream.sites:
        _, gamma, beta, eps = affines[s.norm]
        shift = beta if bool(beta.abs().max() > 0) else None
        for r in s.readers:
            read_columns(model.get_submodule(r), torch.diag(gamma), r, shift)
        set_module(model, s.norm, StreamRMSNorm(d, eps, centred=centred))
    if tied is not None:  # the expansion after the last norm writes stream coordinates
        stream.writers = [*stream.writers, stream.sites[-1].readers[0]]
        stream.tied = tied
    return stream


def _site_outputs(
    model: nn.Module,
    sites: list[NormSite],
    batches: list[Any],
    fn: Callable[[str, torch.Tensor], None],
    *,
    stop: bool = False,
    progress: Any = None,
    inputs: dict[str, Callable[[torch.Tensor], torch.Tensor]] | None = None,
) -> None:
    """Call ``fn(site norm, rows)`` with every site norm's output rows (padding dropped)
    over ``batches`` (or, for the norms in ``inputs``, that function of its input rows);
    with ``stop``, each pass ends after the last of ``sites``."""
    mask: list[torch.Tensor | None] = [None]
    last = sites[-1].norm if stop else None
    inputs = inputs or {}

    def hook(name: str) -> Any:
        def f(module: nn.Module, args: Any, out: torch.Tensor) -> None:
            fn(name, _rows(out, mask[0]))
            if name == last:
                raise StopPass

        return f

    def pre_hook(name: str) -> Any:
        def f(module: nn.Module, args: Any) -> None:
            fn(name, inputs[name](_rows(args[0], mask[0])))
            if name == last:
                raise StopPass

        return f

    handles = [
        model.get_submodule(s.norm).register_forward_pre_hook(pre_hook(s.norm))
        if s.norm in inputs
        else model.get_submodule(s.norm).register_forward_hook(hook(s.norm))
        for s in sites
    ]
    try:
        with torch.no_grad():
            for batch in progress(batches) if progress is not None else batches:
                mask[0] = token_mask(batch)
                call_until_stopped(model, batch)
    finally:
        for h in handles:
            h.remove()


def _device_of(model: nn.Module) -> torch.device:
    """Where ``model``'s first parameter lives (its activations' device)."""
    return next((p.device for p in model.parameters()), torch.device("cpu"))


def _normaliser(norm: nn.Module, d: int, path: str) -> Callable[[torch.Tensor], torch.Tensor]:
    """What a pre-LN norm's input becomes in the converted model, as a function of the
    unconverted input: centred (a LayerNorm) and divided by its RMS."""
    kind, _, _, eps = (
        ("rms", None, None, norm.eps)
        if isinstance(norm, StreamRMSNorm)
        else norm_affine(norm, d, path)
    )

    def f(x: torch.Tensor) -> torch.Tensor:
        if kind == "layer":
            x = x - x.mean(-1, keepdim=True)
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)

    return f


def stream_grams(
    model: nn.Module,
    stream: ResidualStream,
    batches: list[Any],
    progress: Any = None,
    team: Team = SOLO,
) -> tuple[np.ndarray, int]:
    """The Gram of the normalised stream (what every reader sees once the model is
    converted) summed over every site, and the rows per site.  ``model`` may be
    converted or not."""
    d = stream.width
    total = torch.zeros(d, d, dtype=torch.float64, device=_device_of(model))
    rows = [0]
    first = stream.sites[0].norm
    inputs = {}
    if stream.kind == "pre":
        inputs = {s.norm: _normaliser(model.get_submodule(s.norm), d, s.norm) for s in stream.sites}

    def add(name: str, x: torch.Tensor) -> None:
        total.add_(x.T @ x)
        if name == first:
            rows[0] += x.shape[0]

    _site_outputs(model, stream.sites, batches, add, progress=progress, inputs=inputs)
    team.sum_([total])  # a team's ranks: the whole calibration set's Gram on each
    return total.cpu().numpy(), int(team.total(rows[0]))


def _with_mean_direction(E: torch.Tensor) -> torch.Tensor:
    """A basis of ``k`` orthonormal columns whose span holds the mean direction ``1/√d``
    (first column) and the first ``k − 1`` columns of ``E``: where a centring norm
    finds the stream's mean."""
    d, k = E.shape
    m = torch.full((d, 1), d**-0.5, dtype=torch.float64)
    if float((E.T @ m).norm()) > 1 - 1e-9:
        return E  # already there
    q, r = torch.linalg.qr(torch.cat([m, E[:, : k - 1]], dim=1))
    return q * torch.sign(torch.diagonal(r)).where(
        torch.diagonal(r) != 0, torch.ones(1, dtype=r.dtype)
    )


def _head_basis(model: nn.Module, stream: ResidualStream, E: torch.Tensor) -> torch.Tensor | None:
    """With a tied head, the map ``P`` (``d × k``) that writes the last norm's output
    ``v`` into stream coordinates as ``Pᵀv``: the head computes ``(W_e E)(Pᵀv)`` for
    ``W_e v``, so ``Pᵀ = (EᵀGE)⁻¹EᵀG``, ``G = W_eᵀW_e`` (least squares in the logits,
    not in ``v``); ``None`` without a tied head."""
    if stream.tied is None:
        return None
    W = model.get_submodule(stream.tied[1]).weight
    assert isinstance(W, torch.Tensor)
    Wd = W.detach().double()
    G = (Wd.T @ Wd).cpu()
    A = E.T @ G @ E
    A = A + 1e-9 * float(torch.trace(A)) / A.shape[0] * torch.eye(A.shape[0], dtype=A.dtype)
    return torch.linalg.solve(A, E.T @ G).T


def apply_hidden(
    work: nn.Module,
    stream: ResidualStream,
    plan: StreamPlan,
    batches: list[Any],
    original: nn.Module | None,
    *,
    sequential: bool = True,
    team: Team = SOLO,
) -> None:
    """Narrow ``work``'s stream (found on the unconverted ``work``) to ``plan``'s basis, in
    place: convert, narrow and, with ``plan.correct``, refit every reader towards
    ``original`` (an unconverted model with the same module names whose norms' outputs are
    the targets: the model before any compression; it is converted here, so pass a
    copy)."""
    found, ties = with_tied_embeddings(work, stream)
    converted = convert_stream(work, found)
    E = torch.as_tensor(plan.basis)
    if any(getattr(work.get_submodule(s.norm), "mean", None) is not None for s in converted.sites):
        E = _with_mean_direction(E)
    if E.shape[1] < stream.width:
        if plan.correct and original is None:
            raise ValueError("a refitted stream needs the original model")
        # the readers as converted, before narrowing: the refits start from them
        readers = {r: copy.deepcopy(work.get_submodule(r))
                   for s in converted.sites for r in s.readers} if plan.correct else {}  # fmt: skip
        out = _head_basis(work, converted, E) if plan.correct else None
        narrow_stream(work, converted, E)
        if plan.correct and original is not None:
            found_t = find_stream(original)
            assert found_t is not None
            convert_stream(original, with_tied_embeddings(original, found_t)[0])
            for site in converted.sites:  # a tied head reads the last norm alone
                head = out if site is converted.sites[-1] else None
                refit_site(work, original, readers, site, E, batches, plan.ridge,
                           sequential, converted.writers, head, team)  # fmt: skip
    _retie(work, ties)


def narrow_stream(model: nn.Module, stream: ResidualStream, E: torch.Tensor) -> None:
    """Narrow ``model``'s (converted) stream to the basis ``E`` (``d × k``), readers
    restricted (``W ← W E``), no refit.  In place."""
    k = E.shape[1]
    keep = None
    if stream.kind == "post":
        keep = StreamPlan(E.cpu().numpy(), False, 0.0).keep
        if keep is None:
            raise ValueError("a post-LN stream can keep a selection of its coordinates only")
    for name in stream.embeddings + stream.writers:
        write_rows(model.get_submodule(name), E, name)
    if stream.tied is not None:  # the head reads stream coordinates with its embedding
        head: Any = model.get_submodule(stream.tied[0])
        head.weight = model.get_submodule(stream.tied[1]).weight
        head.in_features = k
    for s in stream.sites:
        norm = model.get_submodule(s.norm)
        if isinstance(norm, StreamRMSNorm):
            norm.width = k
            if norm.mean is not None:
                mean = norm.mean
                norm.mean = (E.to(mean.device).T @ mean.double()).to(mean.dtype)
        elif s.norm not in stream.writers:  # a writer's site was narrowed as a writer
            assert keep is not None
            idx = torch.as_tensor(keep)
            for attr in ("weight", "bias"):
                t = getattr(norm, attr, None)
                if isinstance(t, torch.Tensor):
                    set_param(norm, attr, t.detach()[idx])
            norm.normalized_shape = (k,)  # type: ignore[assignment]
        for r in s.readers:
            read_columns(model.get_submodule(r), E, r)
    sync_stream_views(model)  # widths held outside the modules read and written


def refit_site(
    work: nn.Module,
    original: nn.Module,
    readers: Mapping[str, nn.Module],
    site: NormSite,
    E: torch.Tensor,
    batches: list[Any],
    ridge: float,
    sequential: bool,
    writers: Sequence[str] = (),
    out_basis: torch.Tensor | None = None,
    team: Team = SOLO,
) -> None:
    """Refit the readers of ``site`` in ``work``: least squares from its norm's output to
    the one of ``original`` at the same place; the new readers are ``readers[name]`` (as
    they were before the narrowing) times the fit (see the module docstring)."""
    k = E.shape[1]
    intercept = all(has_bias(work, r) for r in site.readers)
    kk = k + int(intercept)
    d = E.shape[0]
    # the fit's products, on the device of the rows
    V = torch.zeros(kk, kk, dtype=torch.float64, device=_device_of(work))
    C = torch.zeros(kk, d, dtype=torch.float64, device=V.device)
    seen: dict[str, torch.Tensor] = {}

    def aug(v: torch.Tensor) -> torch.Tensor:
        if not intercept:
            return v
        return torch.cat([v, torch.ones(v.shape[0], 1, dtype=v.dtype, device=v.device)], 1)

    def on_original(name: str, n: torch.Tensor) -> None:
        seen["n"] = n

    narrowed, full = work.get_submodule(site.norm), original.get_submodule(site.norm)

    def one_shot(name: str, x: torch.Tensor) -> None:
        # the original's stream at this norm, normalised by the original and by the
        # narrowed norm (forward: no hooks); padded rows are already gone.  A writer's
        # site (ELECTRA's projection) reads what it read before
        narrow_in = x if site.norm in writers else x @ E.to(x.device, x.dtype)
        v = aug(narrowed.forward(narrow_in.float()).double())
        V.add_(v.T @ v)
        C.add_(v.T @ full.forward(x.float()).double())

    def on_work(name: str, v: torch.Tensor) -> None:
        v = aug(v)
        V.add_(v.T @ v)
        C.add_(v.T @ seen.pop("n"))

    if sequential:
        for batch in batches:  # original first, then the narrowed model, batch by batch
            _site_outputs(original, [site], [batch], on_original, stop=True)
            _site_outputs(work, [site], [batch], on_work, stop=True)
    else:  # the norm's input rows, as they are
        _site_outputs(original, [site], batches, one_shot, stop=True,
                      inputs={site.norm: lambda x: x})  # fmt: skip
    team.sum_([V, C])  # every rank's rows
    V, C = V.cpu(), C.cpu()
    tau = ridge * float(torch.trace(V[:k, :k])) / max(k, 1)
    tau_vec = np.full(kk, tau)
    if intercept:
        tau_vec[-1] = 0.0
    B = fit_cross_reconstruction(V.numpy(), C.numpy(), np.arange(kk), tau_vec)  # d × kk
    B = team.broadcast(B)  # rank 0's fit on every rank
    M = torch.as_tensor(B[:, :k])
    shift = torch.as_tensor(B[:, k]) if intercept else None
    for r in site.readers:
        fresh = copy.deepcopy(readers[r])
        read_columns(fresh, M, r, shift)
        if r in writers:  # a reader that writes the stream too: a MoE layer's experts,
            write_rows(fresh, E if out_basis is None else out_basis, r)  # a tied head
        set_module(work, r, fresh)


def hidden_group_report(
    stream: ResidualStream, solver: StreamSolver, k: int, rows: int | None = None
) -> GroupReport:
    """The report line of the residual stream keeping ``k`` of its coordinates."""
    return GroupReport(
        name=f"{stream.name}{HIDDEN_SUFFIX}",
        width_before=stream.width,
        width_after=k,
        producers=stream.embeddings + stream.writers,
        consumers=[r for s in stream.sites for r in s.readers],
        predicted_error=float(np.sqrt(max(solver.error_curve()[k], 0.0))),
        rows=rows,
    )


#: the largest relative output change :func:`stream_self_check` takes for float rounding
#: (float32 rounding through a dozen layers is about 1e-6; a misread norm or a per-coordinate
#: scale the layout does not know gives 1e-2 and more)
STREAM_CHECK_RTOL = 1e-4


def _reshaped(want: list[torch.Tensor], got: list[torch.Tensor]) -> bool:
    return len(got) != len(want) or any(a.shape != b.shape for a, b in zip(want, got))


def stream_self_check(model: nn.Module, stream: ResidualStream, batch: Any) -> str | None:
    """Whether ``stream`` is all there is to ``model``'s residual stream: on a copy, the
    exact rewrite and a change of basis of all ``d`` coordinates (a random rotation of a
    pre-LN stream, the reversed order of a post-LN one's) must give the model's outputs on
    ``batch`` to float rounding.  ``None`` when they do, else what went wrong.

    A module that reads or writes the stream outside the layout (GLM-4's norms of each
    sublayer's output before it is added, Doge's per-coordinate residual scales) does not
    follow the change of basis, so the outputs change (or the model stops running) here,
    before anything is narrowed.  The copy runs in float32 at least."""
    trial = copy.deepcopy(model)
    if any(p.dtype in (torch.float16, torch.bfloat16) for p in trial.parameters()):
        trial.float()
    d = stream.width
    if stream.kind == "pre":
        g = torch.Generator().manual_seed(0)
        q, _ = torch.linalg.qr(torch.randn(d, d, dtype=torch.float64, generator=g))
    else:
        q = torch.eye(d, dtype=torch.float64).flip(1)
    step = width_step(model, stream)
    what = "the change of basis"
    try:
        want = model_outputs(trial, batch)
        found, ties = with_tied_embeddings(trial, stream)
        converted = convert_stream(trial, found)
        narrow_stream(trial, converted, q)
        _retie(trial, ties)
        got = model_outputs(trial, batch)
        if _reshaped(want, got):
            return "the model's outputs change shape after the change of basis"
        change = output_change(want, got)
        if change > STREAM_CHECK_RTOL:
            return (
                f"a change of basis of the stream changes the model's outputs by {change:.2g} "
                "of their largest value"
            )
        if d > step:  # and a narrower stream must still run (a norm it does not know
            what = f"narrowing it to {d - step}"  # of the full width would not)
            narrow_stream(trial, converted, torch.eye(d, d - step, dtype=torch.float64))
            _retie(trial, ties)
            got = model_outputs(trial, batch)
            if _reshaped(want, got):
                return f"the model's outputs change shape after {what}"
    except Exception as e:  # the surgery or the model's own code: a probe, not the run
        return f"{what} failed on a copy ({type(e).__name__}: {str(e)[:200]})"
    return None


def one_of_two_streams(model: nn.Module, found: ResidualStream, what: str) -> str | None:
    """The warning for ``what`` (a target) when ``model`` is an encoder-decoder: only the
    stream ``found`` (one stack's) is narrowed, the other stack's keeps its width."""
    if not getattr(getattr(model, "config", None), "is_encoder_decoder", False):
        return None
    return (
        f"{what}: {type(model).__name__} is an encoder-decoder; only the residual stream of "
        f"'{found.name}' is narrowed, the other stack's keeps its width"
    )


def stream_refusal(
    model: nn.Module, found: ResidualStream, batch: Any, team: Team = SOLO
) -> str | None:
    """Why the stream ``found`` in ``model`` cannot be narrowed, from
    :func:`stream_self_check` on ``batch`` (the root process's, its verdict given to every
    process; the reason names the model and the layout that was read), or ``None``."""
    why = team.broadcast(stream_self_check(model, found, batch) if team.is_root else None)
    if why is None:
        return None
    return (
        f"the residual stream spectrim read in {type(model).__name__} ({found.name!r}: "
        f"{len(found.sites)} norms, {len(found.writers)} writers) is not all of it: {why}; "
        "a module outside that layout reads or writes the stream (e.g. a norm of a "
        "sublayer's output, a per-coordinate residual scale), so its width is not narrowed"
    )


def hidden_run(
    work: nn.Module,
    batches: list[Any],
    info: CalibrationInfo,
    cfg: CompressConfig,
    method: Method,
    ctx: RunContext,
    t0: float,
) -> tuple[nn.Module, CompressionReport]:
    """Narrow the residual stream of ``work`` in place as ``cfg`` (``hidden=F``) says."""
    tgt = cfg.parsed_target
    method, report = begin_run(work, cfg, method, info, ctx)
    timings: dict[str, float] = {}
    t = time.perf_counter()
    found = find_stream(work)
    if found is None:
        raise ValueError(
            f"target {tgt}: no residual stream in {type(work).__name__} that spectrim "
            "recognises (Hugging Face GPT-2, LLaMA/Mistral/Qwen2/Gemma/Phi-3 and the decoders "
            "built alike (Arcee, Nemotron, StarCoder2, ...), GPT-NeoX, GPT-J, "
            "CodeGen, Phi, Falcon, BLOOM, OPT, Mixtral/Qwen2-MoE/Qwen3-MoE/OLMoE, T5 encoders, "
            "BERT-family (ELECTRA included), MPNet and DistilBERT models; register others with "
            "spectrim.graph.stream.register_stream)"
        )
    team = ctx.team
    example, cost0 = example_cost(work, batches, team)  # a model failing by itself says so
    why = stream_refusal(work, found, batches[0], team)
    if why is not None:
        raise ValueError(f"target {tgt}: {why}")
    d = found.width
    k = min(d, max(1, round(tgt.value * d)))
    step = math.lcm(cfg.round_to, width_step(work, found))  # MoE experts: 16-byte rows
    if step > 1 and k < d:
        k = min(d, max(step, round(k / step) * step))
    timings["find"] = time.perf_counter() - t

    t = time.perf_counter()
    # every method gets the Gram: the report's predicted error needs it
    gram, rows = stream_grams(work, found, batches, progress=ctx.wrap(len(batches)), team=team)
    timings["collect"] = time.perf_counter() - t

    t = time.perf_counter()
    solver = method.stream_solver(found, gram, work)
    plan = team.broadcast(solver.plan(k))  # rank 0's basis
    timings["solve"] = time.perf_counter() - t

    t = time.perf_counter()
    original = copy.deepcopy(work) if plan.correct and k < d else None
    apply_hidden(work, found, plan, batches, original, sequential=cfg.sequential, team=team)
    timings["apply"] = time.perf_counter() - t

    report.groups.append(hidden_group_report(found, solver, k, rows or None))
    other = one_of_two_streams(work, found, str(tgt))
    if other:
        report.warnings.append(other)
    end_run(report, work, example, cost0, info, timings, t0)
    return work, report
