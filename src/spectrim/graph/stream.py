"""The residual stream of a transformer: who writes it, where it is normalised, who reads it.

The channel analysis pins a transformer's hidden width: every LayerNorm / RMSNorm
normalises over it.  It can still be made narrower, but as one unit across the whole model
(the residual connections add every writer into the same coordinates), and only with the
norms handled explicitly.  A :class:`ResidualStream` records, for one model:

* ``embeddings``: the embedding tables whose rows enter the stream;
* ``writers``: the linears whose outputs are added into it (attention output
  projections, FFN down projections);
* ``sites``: every norm of the stream in execution order, with the linears that read its
  output (:class:`NormSite`);
* ``kind``: ``"pre"`` (pre-LN: the stream is the running sum, each block reads a
  normalised copy; GPT-2, LLaMA, OPT) or ``"post"`` (post-LN: the stream *is* each norm's
  output; BERT, RoBERTa, MiniLM).

Each architecture family is one finder registered with :func:`register_stream`; finders
match on attribute names, like :mod:`spectrim.graph.attention`.  Every norm a finder
returns is checked numerically (:func:`norm_affine`): it must compute a LayerNorm or
RMSNorm with an elementwise affine, or the stream is refused with the norm named; the
scale is its ``weight`` or, where that is what it computes, ``1 + weight`` (Gemma).

The surgery primitives are here too: :func:`write_rows` (a writer's outputs ``W ← EᵀW``),
:func:`read_columns` (a reader's inputs ``W ← W M``, plus a bias shift), and the two
modules a narrowed stream may need, :class:`StreamRMSNorm` and :class:`NormExpand`.

Example::

    >>> from transformers import GPT2Config, GPT2LMHeadModel
    >>> model = GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=50))
    >>> s = find_stream(model)
    >>> s.kind, s.width, len(s.sites), s.sites[-1].readers
    ('pre', 32, 5, ['lm_head'])
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import nn

from spectrim.graph.experts import is_experts_module, row_step
from spectrim.graph.modules import module_kind, register_swap_class, set_param

__all__ = [
    "NormExpand",
    "NormSite",
    "ResidualStream",
    "StreamRMSNorm",
    "StreamView",
    "find_stream",
    "norm_affine",
    "read_columns",
    "reads_matrix",
    "register_stream",
    "register_stream_view",
    "stream_matrix",
    "sync_stream_views",
    "width_step",
    "write_rows",
    "writes_matrix",
]


@register_swap_class
class StreamRMSNorm(nn.Module):
    """``x · rsqrt(mean(x²) + eps)`` over the last axis, computed in float32, no affine
    (the affine of the norm it replaces is folded into the readers).

    Example::

        >>> StreamRMSNorm(4, eps=0.0)(torch.tensor([[2.0, -2.0, 2.0, 2.0]])).tolist()
        [[1.0, -1.0, 1.0, 1.0]]
    """

    def __init__(
        self, width: int, eps: float = 1e-5, count: int = 0, centred: bool = False
    ) -> None:
        super().__init__()
        self.width, self.eps = int(width), float(eps)
        self.count = int(count) or self.width
        self.mean: torch.Tensor | None
        if centred:  # a LayerNorm's centring, along the mean direction in these coordinates
            self.register_buffer("mean", torch.full((self.width,), self.width**-0.5))
        else:
            self.mean = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.float()
        if self.mean is not None:
            m = self.mean.float()
            h = h - (h @ m).unsqueeze(-1) * m
        h = h * torch.rsqrt(h.pow(2).sum(-1, keepdim=True) / self.count + self.eps)
        return h.to(x.dtype)

    def extra_repr(self) -> str:
        extra = f", count={self.count}, centred" if self.mean is not None else ""
        return f"{self.width}, eps={self.eps}{extra}"

    def spectrim_kwargs(self) -> dict[str, float | int | bool]:
        """Constructor arguments (recorded in a saved manifest)."""
        return {"width": self.width, "eps": self.eps, "count": self.count,
                "centred": self.mean is not None}  # fmt: skip


@register_swap_class
class NormExpand(nn.Module):
    """A norm followed by a linear map back to the full width: the last norm of a narrowed
    stream whose output is the model's output (an encoder's embeddings keep their size).

    Example::

        >>> m = NormExpand(nn.LayerNorm(3), 5)
        >>> m(torch.randn(2, 3)).shape
        torch.Size([2, 5])
    """

    def __init__(
        self,
        norm: nn.Module | str,
        out_features: int,
        width: int = 0,
        eps: float = 1e-5,
        count: int = 0,
        centred: bool = False,
    ) -> None:
        super().__init__()
        if isinstance(norm, str):  # rebuilt from a manifest
            norm = (
                StreamRMSNorm(width, eps, count, centred)
                if norm == "rms"
                else nn.LayerNorm(width, eps)
            )
        self.norm = norm
        self.expand = nn.Linear(_norm_width(norm), out_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.expand(self.norm(x))  # type: ignore[no-any-return]

    def spectrim_kwargs(self) -> dict[str, str | int | float | bool]:
        """Constructor arguments (recorded in a saved manifest)."""
        out = self.expand.out_features
        if isinstance(self.norm, StreamRMSNorm):
            return {"norm": "rms", "out_features": out, **self.norm.spectrim_kwargs()}
        eps = float(getattr(self.norm, "eps", 1e-5))
        return {
            "norm": "layernorm",
            "out_features": out,
            "width": _norm_width(self.norm),
            "eps": eps,
        }


def _norm_width(norm: nn.Module) -> int:
    if isinstance(norm, StreamRMSNorm):
        return norm.width
    shape = getattr(norm, "normalized_shape", None)
    if isinstance(shape, int):  # I-BERT's IntLayerNorm keeps the int it was given
        return shape
    if shape is not None:
        return int(shape[-1])
    w = getattr(norm, "weight", None)
    if isinstance(w, torch.Tensor):
        return int(w.shape[-1])
    raise TypeError(f"cannot tell the width of {type(norm).__name__}")


@dataclass
class NormSite:
    """A norm of the stream and the linears reading its output (``[]``: its output is the
    model's output).  In a post-LN stream whose first value no norm follows (ELECTRA's
    projected embeddings), ``norm`` is that value's writer."""

    norm: str
    readers: list[str] = field(default_factory=list)


@dataclass
class ResidualStream:
    """One model's residual stream (see the module docstring)."""

    name: str
    kind: Literal["pre", "post"]
    width: int
    embeddings: list[str]
    writers: list[str]
    sites: list[NormSite]
    #: ``(head, embedding)``: an LM head that shares the embedding's weight and keeps it
    tied: tuple[str, str] | None = None
    #: norms between the embeddings and the stream (BLOOM's ``word_embeddings_layernorm``):
    #: their output is the stream's first value, so each is followed by a linear map that
    #: writes it in the stream's coordinates (added by the conversion)
    embedding_norms: list[str] = field(default_factory=list)

    def modules(self) -> list[str]:
        """Every module the stream's surgery changes."""
        out = list(self.embeddings) + list(self.embedding_norms) + list(self.writers)
        for s in self.sites:
            out += [s.norm, *s.readers]
        return out


Finder = Callable[[str, nn.Module, nn.Module], ResidualStream | None]
_FINDERS: list[tuple[str, Finder]] = []


def register_stream(name: str) -> Callable[[Finder], Finder]:
    """Register a finder ``(path, module, model) -> ResidualStream | None`` (tried on every
    module in order; the first match wins)."""

    def deco(fn: Finder) -> Finder:
        _FINDERS[:] = [(n, f) for n, f in _FINDERS if n != name] + [(name, fn)]
        return fn

    return deco


def find_stream(model: nn.Module) -> ResidualStream | None:
    """The residual stream of ``model`` a registered finder recognises, or ``None``.

    Raises:
        ValueError: a finder matched, but a module it names does not read or write the
            stream's width; the module is named.
    """
    for path, module in model.named_modules():
        for _, finder in _FINDERS:
            found = finder(path, module, model)
            if found is not None:
                _check_widths(model, found)
                return found
    return None


def _check_widths(model: nn.Module, stream: ResidualStream) -> None:
    """Every embedding and writer outputs ``stream.width`` coordinates, every norm has that
    width and every reader reads it, or the stream is refused with the module named."""
    d = stream.width
    named = dict(model.named_modules())

    def size(path: str, axis: str) -> int | None:
        module = named[path]
        try:  # a writer's rows, a reader's columns
            W = _matrix(module, path, "write" if axis == "out" else "read")[0]
        except TypeError:
            return None
        return int(W.shape[0 if axis == "out" else 1])

    checks = [(p, "out", "writes") for p in (*stream.embeddings, *stream.writers)]
    checks += [(r, "in", "reads") for site in stream.sites for r in site.readers]
    for path, axis, verb in checks:
        n = size(path, axis)
        if n is not None and n != d:
            raise ValueError(
                f"the residual stream of {type(model).__name__} is {d} wide, but "
                f"'{path}' ({type(named[path]).__name__}) {verb} {n} coordinates: the "
                "layout its names suggest is not the one it has, so its stream cannot be "
                "narrowed"
            )
    for site in stream.sites:
        if site.norm in stream.writers:  # a writer's site (checked as a writer)
            continue
        norm = named[site.norm]
        try:
            n = _norm_width(norm)
        except TypeError:
            continue
        if n != d:
            raise ValueError(
                f"the residual stream of {type(model).__name__} is {d} wide, but its norm "
                f"'{site.norm}' ({type(norm).__name__}) normalises {n}: it cannot be narrowed"
            )


def norm_affine(
    norm: nn.Module, width: int, path: str = ""
) -> tuple[str, torch.Tensor, torch.Tensor, float]:
    """``(kind, γ, β, eps)`` of a norm that computes ``γ ⊙ (x − mean)/σ + β`` (``"layer"``)
    or ``γ ⊙ x/rms(x)`` (``"rms"``, ``β = 0``) over the last axis, checked numerically on
    random inputs.  ``γ`` is the norm's ``weight``, or ``1 + weight`` where that is what
    it computes (Gemma's RMSNorm).

    Raises:
        ValueError: the norm computes something else (named by its type).
    """
    w = getattr(norm, "weight", None)
    gamma = (
        w.detach().double().cpu()
        if isinstance(w, torch.Tensor)
        else torch.ones(width, dtype=torch.float64)
    )
    b = getattr(norm, "bias", None)
    beta = (
        b.detach().double().cpu()
        if isinstance(b, torch.Tensor)
        else torch.zeros(width, dtype=torch.float64)
    )
    eps_attr = getattr(norm, "eps", None)
    if eps_attr is None:
        eps_attr = getattr(norm, "variance_epsilon", None)
    p = next(iter(norm.parameters()), None)
    dtype = p.dtype if p is not None else torch.float32
    device = p.device if p is not None else "cpu"
    tol = 1e-4 if dtype in (torch.float32, torch.float64) else 1e-2
    where = f"'{path}' ({type(norm).__name__})" if path else type(norm).__name__

    def run(x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return norm(x.to(dtype=dtype, device=device)).double().cpu()  # type: ignore[no-any-return]

    def unit(kind: str, x: torch.Tensor, eps: float) -> torch.Tensor:
        c = x - x.mean(-1, keepdim=True) if kind == "layer" else x
        return c / torch.sqrt(c.pow(2).mean(-1, keepdim=True) + eps)

    x = torch.randn(8, width, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    x = x * 3 + 1.5  # eps is negligible at this scale: the kind and the affine
    y = run(x)
    found = None
    for g in (gamma, 1.0 + gamma):  # the weight is the scale, or (Gemma) the scale minus 1
        if torch.allclose(y, g * unit("layer", x, 0.0) + beta, atol=tol, rtol=tol):
            found = "layer", g
            break
        rms_ok = torch.allclose(y, g * unit("rms", x, 0.0), atol=tol, rtol=tol)
        if rms_ok and not isinstance(b, torch.Tensor):
            found = "rms", g
            break
    if found is None:
        raise ValueError(
            f"{where}: not a LayerNorm or RMSNorm with an elementwise affine "
            "(checked on random inputs); its residual stream cannot be narrowed"
        )
    kind, g = found
    # eps, on inputs small enough that it matters: the attribute where the norm has one
    # and it holds, else measured (OLMo's LayerNorm hard-codes 1e-5 and stores none)
    small = x * 1e-4
    y_small = run(small)
    eps = None if eps_attr is None else float(eps_attr)  # type: ignore[arg-type]
    if eps is None or (
        tol < 1e-3
        and not torch.allclose(y_small, g * unit(kind, small, eps) + beta, atol=tol, rtol=tol)
    ):
        eps = _measured_eps(kind, small, y_small, g, beta)
        if not torch.allclose(y_small, g * unit(kind, small, eps) + beta, atol=tol, rtol=tol):
            raise ValueError(
                f"{where}: normalises like a {kind} norm on large inputs but not on small "
                "ones (no epsilon explains it); its residual stream cannot be narrowed"
            )
    return kind, g, beta, eps


def _measured_eps(
    kind: str, x: torch.Tensor, y: torch.Tensor, gamma: torch.Tensor, beta: torch.Tensor
) -> float:
    """The ``eps`` of ``y = γ ⊙ c / sqrt(mean(c²) + eps) + β`` (``c``: ``x`` centred for a
    LayerNorm), from each row's least-squares scale ``sqrt(mean(c²) + eps)``."""
    c = x - x.mean(-1, keepdim=True) if kind == "layer" else x
    live = gamma.abs() > 1e-6 * float(gamma.abs().max().clamp_min(1e-300))
    u = (y[:, live] - beta[live]) / gamma[live]  # c / sqrt(mean(c²) + eps)
    cl = c[:, live]
    scale = (cl * u).sum(-1) / (u * u).sum(-1).clamp_min(1e-300)
    eps = torch.median(scale.pow(2) - c.pow(2).mean(-1))
    return max(float(eps), 0.0)


# ------------------------------------------------------------------ surgery primitives


def stream_matrix(module: nn.Module, path: str) -> tuple[torch.Tensor, bool]:
    """The weight as an ``out × in`` matrix, and whether it is stored transposed."""
    kind = module_kind(module)
    w = getattr(module, "weight", None)
    if kind is None or not isinstance(w, torch.Tensor) or w.dim() != 2:
        raise TypeError(f"stream module '{path}' ({type(module).__name__}) has no weight matrix")
    transposed = kind.weight_dims == (1, 0)
    return (w.detach().t() if transposed else w.detach()), transposed


def _set_matrix(module: nn.Module, m: torch.Tensor, transposed: bool, dtype: torch.dtype) -> None:
    w = m.to(dtype)
    set_param(module, "weight", (w.t() if transposed else w).contiguous())


#: ``module -> (matrix, put)``: the stream-facing matrix of a module and how to store a new one
ViewFn = Callable[[nn.Module], tuple[torch.Tensor, Callable[[torch.Tensor], None]]]


@dataclass(frozen=True)
class StreamView:
    """How a module that holds the stream in something other than a 2-D ``weight`` of a
    registered kind reads and writes it (a MoE layer's experts, its router).

    Attributes:
        name: short name for messages.
        match: whether a module is of this kind.
        reads: its reading matrix as ``out × d`` and a setter of the new ``out × k`` one;
            ``None`` if it never reads the stream.
        writes: its writing matrix as ``d × in`` and a setter of the new ``k × in`` one;
            ``None`` if it never writes the stream.
        sync: set the attribute that holds the stream width from the weights (after
            surgery, and after weights of a narrowed model are loaded).
    """

    name: str
    match: Callable[[nn.Module], bool]
    reads: ViewFn | None = None
    writes: ViewFn | None = None
    sync: Callable[[nn.Module], None] | None = None


_VIEWS: list[StreamView] = []


def register_stream_view(view: StreamView) -> StreamView:
    """Register (or replace, by name) a :class:`StreamView`; the first match wins."""
    _VIEWS[:] = [v for v in _VIEWS if v.name != view.name] + [view]
    return view


def _view_of(module: nn.Module) -> StreamView | None:
    if module_kind(module) is not None:
        return None
    return next((v for v in _VIEWS if v.match(module)), None)


def _matrix(
    module: nn.Module, path: str, role: str
) -> tuple[torch.Tensor, Callable[[torch.Tensor], None]]:
    """``role="read"``: ``out × d`` and its setter; ``"write"``: ``d × in`` and its setter."""
    view = _view_of(module)
    if view is None:
        W, transposed = stream_matrix(module, path)
        dtype = W.dtype
        return W, lambda m: _set_matrix(module, m, transposed, dtype)
    fn = view.reads if role == "read" else view.writes
    if fn is None:
        raise TypeError(f"stream module '{path}' ({view.name}) does not {role} the stream")
    return fn(module)


def reads_matrix(module: nn.Module, path: str) -> torch.Tensor:
    """How ``module`` reads the stream, as an ``out × d`` matrix (a MoE layer's experts:
    every expert's gate and up rows)."""
    return _matrix(module, path, "read")[0]


def writes_matrix(module: nn.Module, path: str) -> torch.Tensor:
    """How ``module`` writes the stream, as a ``d × in`` matrix (a MoE layer's experts:
    every expert's down projection side by side)."""
    return _matrix(module, path, "write")[0]


def sync_stream_views(model: nn.Module) -> None:
    """Set every :class:`StreamView` module's width attribute from its weights (e.g. a
    router's ``hidden_dim``, which its forward reshapes by), after a narrowed model's
    weights were loaded."""
    for module in model.modules():
        view = _view_of(module)
        if view is not None and view.sync is not None:
            view.sync(module)
        experts = getattr(module, "experts", None)
        if (  # GraniteMoE's MoE block reshapes its output by the stream width it keeps
            isinstance(experts, nn.Module)
            and is_experts_module(experts)
            and isinstance(getattr(module, "input_size", None), int)
        ):
            gate_up: Any = experts.gate_up_proj
            setattr(module, "input_size", int(gate_up.shape[2]))  # noqa: B010 (typed as a Tensor)


_OUT_ATTR = {"linear": "out_features", "hf-conv1d": "nf", "embedding": "embedding_dim"}


def write_rows(module: nn.Module, E: torch.Tensor, path: str) -> None:
    """A writer's (or an embedding's) outputs in the stream's new coordinates:
    ``W ← EᵀW``, ``b ← Eᵀb`` (``E``: ``d × k`` float64).  In place."""
    W, put = _matrix(module, path, "write")
    dtype = W.dtype
    E = E.to(W.device)
    put((E.T @ W.double()).to(dtype))
    bias = getattr(module, "bias", None)
    if isinstance(bias, torch.Tensor):
        set_param(module, "bias", (E.T @ bias.detach().double()).to(bias.dtype))
    _sync_width(module, E.shape[1], _OUT_ATTR)


def _sync_width(module: nn.Module, k: int, attrs: dict[str, str]) -> None:
    view = _view_of(module)
    if view is not None:
        if view.sync is not None:
            view.sync(module)
        return
    kind = module_kind(module)
    attr = attrs.get(kind.name if kind is not None else "")
    if attr is not None:
        setattr(module, attr, k)


def read_columns(
    module: nn.Module, M: torch.Tensor, path: str, shift: torch.Tensor | None = None
) -> None:
    """A reader's inputs in the stream's new coordinates: ``W ← W M`` (``M``: ``d × k``
    float64) and ``b ← b + W shift`` (the original ``W``) when ``shift`` is given.  In place."""
    W, put = _matrix(module, path, "read")
    dtype = W.dtype
    Wd = W.double()
    put((Wd @ M.to(W.device)).to(dtype))
    if shift is not None:
        bias = getattr(module, "bias", None)
        value = Wd @ shift.to(W.device)
        if isinstance(bias, torch.Tensor):
            set_param(module, "bias", (bias.detach().double() + value).to(bias.dtype))
        elif "bias" in module._parameters:  # a Linear built with bias=False gains one
            module.bias = nn.Parameter(value.to(dtype))  # type: ignore[assignment]
        else:
            raise ValueError(f"stream reader '{path}' has no bias to take a shift")
    kind = module_kind(module)
    _sync_width(module, M.shape[1], {kind.name: kind.in_size} if kind and kind.in_size else {})


# MoE layers (Mixtral, Qwen2/3-MoE, OLMoE): the experts read the stream through every
# expert's gate and up rows and write it through every expert's down projection; the
# router reads it through its ``weight`` and reshapes its input by ``hidden_dim``.


def _experts_reads(m: nn.Module) -> tuple[torch.Tensor, Callable[[torch.Tensor], None]]:
    W: Any = m.gate_up_proj
    e, rows, d = W.shape  # experts × 2·inter × d

    def put(new: torch.Tensor) -> None:
        set_param(m, "gate_up_proj", new.reshape(e, rows, -1))

    return W.detach().reshape(e * rows, d), put


def _experts_writes(m: nn.Module) -> tuple[torch.Tensor, Callable[[torch.Tensor], None]]:
    W: Any = m.down_proj
    e, d, inner = W.shape  # experts × d × inter

    def put(new: torch.Tensor) -> None:
        set_param(m, "down_proj", new.reshape(-1, e, inner).permute(1, 0, 2))

    return W.detach().permute(1, 0, 2).reshape(d, e * inner), put


def _set_hidden_dim(m: nn.Module, d: int) -> None:
    if isinstance(getattr(m, "hidden_dim", None), int):
        setattr(m, "hidden_dim", int(d))  # noqa: B010 (typed as a Tensor)


def _experts_sync(m: nn.Module) -> None:
    gate_up: Any = m.gate_up_proj
    _set_hidden_dim(m, int(gate_up.shape[2]))


def _router_reads(m: nn.Module) -> tuple[torch.Tensor, Callable[[torch.Tensor], None]]:
    W: Any = m.weight  # experts × d

    def put(new: torch.Tensor) -> None:
        set_param(m, "weight", new)

    return W.detach(), put


def _router_sync(m: nn.Module) -> None:
    W: Any = m.weight
    _set_hidden_dim(m, int(W.shape[1]))


def _is_router(m: nn.Module) -> bool:
    """A MoE router: a ``…Router`` module whose one parameter is a 2-D ``weight`` (it may
    reshape its input by ``hidden_dim``, which narrowing sets: Mixtral, Qwen2/3-MoE,
    OLMoE; GraniteMoE's and PhiMoE's have none)."""
    params = dict(m.named_parameters(recurse=False))
    w = params.get("weight")
    return (
        "Router" in type(m).__name__
        and set(params) == {"weight"}
        and w is not None
        and w.dim() == 2
        and not list(m.children())
    )


register_stream_view(
    StreamView(
        "moe-experts",
        is_experts_module,
        _experts_reads,
        _experts_writes,
        _experts_sync,
    )
)
register_stream_view(
    StreamView(
        "moe-router",
        _is_router,
        _router_reads,
        None,
        _router_sync,
    )
)


def width_step(model: nn.Module, stream: ResidualStream) -> int:
    """The multiple the stream's width must stay at for its modules to run: Hugging
    Face's default experts kernel (``torch._grouped_mm``) needs every row of their 3-D
    weights to be a multiple of 16 bytes (4 float32 or 8 bfloat16 coordinates); ``1``
    when no module needs one."""
    step = 1
    for name in stream.modules():
        module = model.get_submodule(name)
        if is_experts_module(module):
            step = math.lcm(step, row_step(module))
    return step


def has_bias(model: nn.Module, path: str) -> bool:
    """Whether module ``path`` has a bias tensor."""
    return isinstance(getattr(model.get_submodule(path), "bias", None), torch.Tensor)


def set_module(model: nn.Module, path: str, new: nn.Module) -> None:
    """Replace the submodule at ``path`` (``new`` goes to the device the old one was on)."""
    parent, _, leaf = path.rpartition(".")
    old = model.get_submodule(path)
    where = next((t.device for t in (*old.parameters(), *old.buffers())), None)
    if where is not None:
        new.to(where)
    setattr(model.get_submodule(parent) if parent else model, leaf, new)


# ------------------------------------------------------------------------- finders


def _join(*parts: str) -> str:
    return ".".join(p for p in parts if p)


def _children(module: nn.Module, name: str) -> list[Any]:
    return list(getattr(module, name))


def _width(module: nn.Module, name: str) -> int:
    """The output width of embedding ``name`` of ``module``."""
    emb: Any = getattr(module, name)
    return int(emb.weight.shape[1])


def _has(module: nn.Module, *names: str) -> bool:
    return all(isinstance(getattr(module, n, None), nn.Module) for n in names)


def _head(model: nn.Module, path: str, width: int) -> list[str]:
    """A language-model head reading the final norm: ``lm_head`` (GPT-NeoX:
    ``embed_out``) beside the base model."""
    parent = path.rpartition(".")[0] if "." in path else ""
    for where in (parent, ""):
        owner = model.get_submodule(where) if where else model
        for name in ("lm_head", "embed_out"):
            head = getattr(owner, name, None)
            if isinstance(head, nn.Linear) and head.in_features == width:
                return [_join(where, name)]
    return []


@dataclass(frozen=True)
class _Layout:
    """Where a pre-LN decoder keeps its parts (module names; ``norms`` maps each of a
    block's norms to the linears reading it, in execution order)."""

    embeddings: tuple[str, ...]
    blocks: str
    final: str
    norms: tuple[tuple[str, tuple[str, ...]], ...]
    writers: tuple[str, ...]
    #: a norm of the embeddings before the first block (BLOOM); its output is the stream
    embedding_norm: str | None = None


#: decoders whose blocks the LLaMA and GPT-2 finders do not match (parallel attention and
#: MLP reading one norm, other names)
_LAYOUTS = {
    "gpt_neox": _Layout(("embed_in",), "layers", "final_layer_norm",
                        (("input_layernorm", ("attention.query_key_value",)),
                         ("post_attention_layernorm", ("mlp.dense_h_to_4h",))),
                        ("attention.dense", "mlp.dense_4h_to_h")),
    "gptj": _Layout(("wte",), "h", "ln_f",
                    (("ln_1", ("attn.q_proj", "attn.k_proj", "attn.v_proj", "mlp.fc_in")),),
                    ("attn.out_proj", "mlp.fc_out")),
    "codegen": _Layout(("wte",), "h", "ln_f",
                       (("ln_1", ("attn.qkv_proj", "mlp.fc_in")),),
                       ("attn.out_proj", "mlp.fc_out")),
    "phi": _Layout(("embed_tokens",), "layers", "final_layernorm",
                   (("input_layernorm", ("self_attn.q_proj", "self_attn.k_proj",
                                         "self_attn.v_proj", "mlp.fc1")),),
                   ("self_attn.dense", "mlp.fc2")),
    # Cohere / Cohere2 (Command-R): attention and a gated MLP in parallel on one norm
    "cohere": _Layout(("embed_tokens",), "layers", "norm",
                      (("input_layernorm", ("self_attn.q_proj", "self_attn.k_proj",
                                            "self_attn.v_proj", "mlp.gate_proj",
                                            "mlp.up_proj")),),
                      ("self_attn.o_proj", "mlp.down_proj")),
    "falcon-parallel": _Layout(("word_embeddings",), "h", "ln_f",
                               (("input_layernorm", ("self_attention.query_key_value",
                                                     "mlp.dense_h_to_4h")),),
                               ("self_attention.dense", "mlp.dense_4h_to_h")),
    "falcon": _Layout(("word_embeddings",), "h", "ln_f",
                      (("input_layernorm", ("self_attention.query_key_value",)),
                       ("post_attention_layernorm", ("mlp.dense_h_to_4h",))),
                      ("self_attention.dense", "mlp.dense_4h_to_h")),
    "bloom": _Layout(("word_embeddings",), "h", "ln_f",
                     (("input_layernorm", ("self_attention.query_key_value",)),
                      ("post_attention_layernorm", ("mlp.dense_h_to_4h",))),
                     ("self_attention.dense", "mlp.dense_4h_to_h"),
                     embedding_norm="word_embeddings_layernorm"),
}  # fmt: skip


def _get(module: nn.Module, dotted: str) -> nn.Module | None:
    """The submodule at a dotted path, or ``None``."""
    for part in dotted.split("."):
        nxt = getattr(module, part, None)
        if not isinstance(nxt, nn.Module):
            return None
        module = nxt
    return module


def _is_norm(module: nn.Module) -> bool:
    return isinstance(module, nn.LayerNorm | nn.RMSNorm) or "norm" in type(module).__name__.lower()


@register_stream("pre-ln decoders")
def _decoders(path: str, module: nn.Module, model: nn.Module) -> ResidualStream | None:
    """GPT-NeoX (parallel residual or not), GPT-J, CodeGen, Phi, Falcon (parallel, or
    with a norm before the MLP) and BLOOM (Falcon's names and a LayerNorm of the
    embeddings): a block's norms read the running sum, its attention and MLP outputs are
    added to it (:data:`_LAYOUTS`).  A model with a norm the layout has no place for
    (Falcon-40B's ``ln_attn``/``ln_mlp``) or whose blocks add a normalised copy back
    (BLOOM's ``apply_residual_connection_post_layernorm``) is not matched.  Where the
    embeddings are normalised, the LM head (which shares their weight) reads the full
    width after the last norm, so it stays tied and whole."""
    for layout in _LAYOUTS.values():
        if not all(_get(module, e) is not None for e in layout.embeddings):
            continue
        if _get(module, layout.final) is None or not _has(module, layout.blocks):
            continue
        emb_norm = layout.embedding_norm
        if emb_norm is not None and not _is_norm_module(_get(module, emb_norm)):
            continue
        blocks = _children(module, layout.blocks)
        names = [n for n, _ in layout.norms] + [r for _, rs in layout.norms for r in rs]
        names += list(layout.writers)
        if not blocks or not all(all(_get(b, n) is not None for n in names) for b in blocks):
            continue
        if any(getattr(b, "apply_residual_connection_post_layernorm", False) for b in blocks):
            continue
        known = {n for n, _ in layout.norms} | {"self_attn", "self_attention", "attn", "mlp"}
        top = {layout.final} | ({emb_norm} if emb_norm is not None else set())
        owners = [(b, known | {"attention"}) for b in blocks] + [(module, top)]
        if any(  # a norm the layout does not know: another arrangement of the block, or
            _is_norm(m)  # one of the model's (BLOOM normalises its embeddings first)
            for owner, allowed in owners
            for n, m in owner.named_children()
            if n not in allowed
        ):
            continue
        d = _width(module, layout.embeddings[0].split(".")[-1])
        sites, writers = [], []
        for i in range(len(blocks)):
            p = _join(path, f"{layout.blocks}.{i}")
            sites += [NormSite(_join(p, n), [_join(p, r) for r in rs]) for n, rs in layout.norms]
            writers += [_join(p, w) for w in layout.writers]
        if emb_norm is None:
            sites.append(NormSite(_join(path, layout.final), _head(model, path, d)))
            emb = [_join(path, e) for e in layout.embeddings]
            return ResidualStream(path or "model", "pre", d, emb, writers, sites)
        sites.append(NormSite(_join(path, layout.final), []))
        norms = [_join(path, emb_norm)]
        return ResidualStream(path or "model", "pre", d, [], writers, sites, embedding_norms=norms)
    return None


def _is_norm_module(module: nn.Module | None) -> bool:
    return module is not None and _is_norm(module)


@register_stream("gpt2")
def _gpt2(path: str, module: nn.Module, model: nn.Module) -> ResidualStream | None:
    """GPT-2: ``wte``/``wpe`` embeddings, blocks ``h.i`` with ``ln_1 → attn.c_attn``,
    ``attn.c_proj``, ``ln_2 → mlp.c_fc``, ``mlp.c_proj``, and ``ln_f``."""
    if not _has(module, "wte", "wpe", "h", "ln_f"):
        return None
    blocks = _children(module, "h")
    if not blocks or not all(
        _has(b, "ln_1", "attn", "ln_2", "mlp") and getattr(b, "crossattention", None) is None
        for b in blocks
    ):
        return None
    d = _width(module, "wte")
    sites, writers = [], []
    for i in range(len(blocks)):
        p = _join(path, f"h.{i}")
        sites += [
            NormSite(_join(p, "ln_1"), [_join(p, "attn.c_attn")]),
            NormSite(_join(p, "ln_2"), [_join(p, "mlp.c_fc")]),
        ]
        writers += [_join(p, "attn.c_proj"), _join(p, "mlp.c_proj")]
    sites.append(NormSite(_join(path, "ln_f"), _head(model, path, d)))
    return ResidualStream(
        path or "model", "pre", d, [_join(path, "wte"), _join(path, "wpe")], writers, sites
    )


#: the children a MoE block may have besides its router (``gate``) and ``experts``: a
#: shared expert (Qwen2-MoE) and its sigmoid gate, both reading the normalised stream
_MOE_SHARED = ("shared_expert", "shared_expert_gate")


#: the (readers, writer) of two-layer MLPs without a gate: Arcee / Nemotron / Apertus,
#: NanoChat, StarCoder2, and GPT-NeoX's names
_PLAIN_MLPS = (("up_proj", "down_proj"), ("fc1", "fc2"), ("c_fc", "c_proj"),
               ("dense_h_to_4h", "dense_4h_to_h"))  # fmt: skip


def _mlp_parts(mlp: nn.Module) -> tuple[list[str], list[str]] | None:
    """The readers and writers of a LLaMA-style MLP, relative to it: ``gate_proj`` and
    ``up_proj`` (Phi-3: ``gate_up_proj``) and ``down_proj``, or one of
    :data:`_PLAIN_MLPS`; or a MoE block's router (``gate``, or ``router`` in GraniteMoE
    and PhiMoE, a :class:`StreamView`), ``experts`` (read and written through their 3-D
    parameters) and a shared expert with its gate (Qwen2-MoE); ``None`` otherwise."""
    if _has(mlp, "down_proj") and _has(mlp, "gate_proj", "up_proj"):
        return ["gate_proj", "up_proj"], ["down_proj"]
    if _has(mlp, "down_proj") and _has(mlp, "gate_up_proj"):
        return ["gate_up_proj"], ["down_proj"]
    for up, down in _PLAIN_MLPS:
        if _has(mlp, up, down) and all(  # an activation may hold scalars (Apertus's xIELU)
            p.numel() == 1
            for n, c in mlp.named_children()
            if n not in (up, down)
            for p in c.parameters()
        ):
            return [up], [down]
    route = next((n for n in ("gate", "router") if _has(mlp, n)), None)
    if route is None or not _has(mlp, "experts") or dict(mlp.named_parameters(recurse=False)):
        return None
    gate, experts = mlp.get_submodule(route), mlp.get_submodule("experts")
    if not (_is_router(gate) and is_experts_module(experts)):
        return None
    names = {n for n, _ in mlp.named_children()}
    if not names <= {route, "experts", *_MOE_SHARED}:
        return None  # another arrangement (e.g. a second router, a dense residual MLP)
    readers, writers = [route, "experts"], ["experts"]
    shared = getattr(mlp, "shared_expert", None)
    if shared is not None:
        parts = _mlp_parts(shared) if isinstance(shared, nn.Module) else None
        if parts is None or not isinstance(getattr(mlp, "shared_expert_gate", None), nn.Linear):
            return None
        readers += [f"shared_expert.{r}" for r in parts[0]] + ["shared_expert_gate"]
        writers += [f"shared_expert.{w}" for w in parts[1]]
    return readers, writers


#: a LLaMA-style layer's names: the norm before the attention, the norm before the MLP
#: (VaultGemma's ``pre_feedforward_layernorm`` alone; Gemma-2's sandwich, which has it
#: beside ``post_attention_layernorm``, is not matched), the MLP, the attention's output
_ATTN_NORMS = ("input_layernorm", "attention_layernorm")
_MLP_NORMS = ("post_attention_layernorm", "feedforward_layernorm", "pre_feedforward_layernorm")
_MLPS = ("mlp", "block_sparse_moe", "feed_forward")
_ATTN_OUTS = ("o_proj", "dense")


def _one_of(module: nn.Module, names: Sequence[str]) -> str | None:
    """The one child of ``module`` named in ``names`` (``None`` for none or several)."""
    found = [n for n in names if isinstance(getattr(module, n, None), nn.Module)]
    return found[0] if len(found) == 1 else None


@register_stream("llama")
def _llama(path: str, module: nn.Module, model: nn.Module) -> ResidualStream | None:
    """LLaMA / Mistral / Qwen2 / Gemma / Phi-3 and the decoders built the same way
    (Mixtral, Qwen2/3-MoE, OLMoE, GraniteMoE, PhiMoE; Arcee, Nemotron, Apertus, NanoChat,
    StarCoder2, VaultGemma with their own names): ``embed_tokens``, ``layers.i`` with a
    norm (:data:`_ATTN_NORMS`) → ``self_attn.{q,k,v}_proj`` (Phi-3: one ``qkv_proj``),
    ``self_attn.o_proj`` (or ``dense``), a norm (:data:`_MLP_NORMS`) → an MLP
    (:data:`_MLPS`, :func:`_mlp_parts`), and ``norm`` (or ``final_layernorm``).  Layers
    with more norms (Gemma-2's sandwich norms) or another part holding parameters are not
    matched; :func:`spectrim._hidden.stream_self_check` catches what names cannot tell."""
    final = _one_of(module, ("norm", "final_layernorm"))
    if final is None or not _has(module, "embed_tokens", "layers"):
        return None
    blocks = _children(module, "layers")
    # per layer: its attention's norm, its MLP's norm, its MLP, the attention's readers
    # and writer, the MLP's readers and writers
    layers: list[tuple[str, str, str, list[str], str, tuple[list[str], list[str]]]] = []
    for b in blocks:
        a_norm, m_norm, mlp = _one_of(b, _ATTN_NORMS), _one_of(b, _MLP_NORMS), _one_of(b, _MLPS)
        attn = getattr(b, "self_attn", None)
        if a_norm is None or m_norm is None or mlp is None or not isinstance(attn, nn.Module):
            return None
        if any(  # a norm or a parameter the layout has no place for
            list(c.parameters())
            for n, c in b.named_children()
            if n not in (a_norm, m_norm, mlp, "self_attn")
        ) or list(b.parameters(recurse=False)):
            return None
        if _has(attn, "q_proj", "k_proj", "v_proj"):
            q = ["q_proj", "k_proj", "v_proj"]
        elif _has(attn, "qkv_proj"):
            q = ["qkv_proj"]
        else:
            return None
        out = _one_of(attn, _ATTN_OUTS)
        parts = _mlp_parts(getattr(b, mlp))
        if parts is None or out is None:
            return None
        layers.append((a_norm, m_norm, mlp, q, out, parts))
    if not blocks:
        return None
    d = _width(module, "embed_tokens")
    sites, writers = [], []
    for i, (a_norm, m_norm, mlp, q, out, (reads, writes)) in enumerate(layers):
        p = _join(path, f"layers.{i}")
        a, m = _join(p, "self_attn"), _join(p, mlp)
        sites += [
            NormSite(_join(p, a_norm), [_join(a, r) for r in q]),
            NormSite(_join(p, m_norm), [_join(m, r) for r in reads]),
        ]
        writers += [_join(a, out), *(_join(m, w) for w in writes)]
    sites.append(NormSite(_join(path, final), _head(model, path, d)))
    return ResidualStream(path or "model", "pre", d, [_join(path, "embed_tokens")], writers, sites)


@register_stream("opt")
def _opt(path: str, module: nn.Module, model: nn.Module) -> ResidualStream | None:
    """OPT decoders with pre-LN (``do_layer_norm_before``) and no ``project_in``/``out``."""
    if not _has(module, "embed_tokens", "embed_positions", "layers", "final_layer_norm"):
        return None
    if (
        getattr(module, "project_in", None) is not None
        or getattr(module, "project_out", None) is not None
    ):
        return None
    blocks = _children(module, "layers")
    if not blocks or not all(
        _has(b, "self_attn_layer_norm", "self_attn", "final_layer_norm", "fc1", "fc2")
        and getattr(b, "do_layer_norm_before", False)
        for b in blocks
    ):
        return None
    d = _width(module, "embed_tokens")
    sites, writers = [], []
    for i in range(len(blocks)):
        p = _join(path, f"layers.{i}")
        a = _join(p, "self_attn")
        sites += [
            NormSite(_join(p, "self_attn_layer_norm"), [_join(a, f"{r}_proj") for r in "qkv"]),
            NormSite(_join(p, "final_layer_norm"), [_join(p, "fc1")]),
        ]
        writers += [_join(a, "out_proj"), _join(p, "fc2")]
    sites.append(NormSite(_join(path, "final_layer_norm"), _head(model, path, d)))
    emb = [_join(path, "embed_tokens"), _join(path, "embed_positions")]
    return ResidualStream(path or "model", "pre", d, emb, writers, sites)


#: where a BERT-layout post-LN block keeps its parts: the query/key/value readers of the
#: block's input, the attention's output and its norm (BERT, RoBERTa, MiniLM, ELECTRA;
#: MPNet keeps all four projections in ``attention.attn`` and its norm beside it)
_POST_LN_LAYOUTS = (
    (("attention.self.query", "attention.self.key", "attention.self.value"),
     "attention.output.dense", "attention.output.LayerNorm"),
    (("attention.attn.q", "attention.attn.k", "attention.attn.v"),
     "attention.attn.o", "attention.LayerNorm"),
)  # fmt: skip


@register_stream("bert")
def _bert(path: str, module: nn.Module, model: nn.Module) -> ResidualStream | None:
    """BERT-family post-LN encoders (BERT, RoBERTa, MiniLM, ELECTRA, and MPNet):
    ``embeddings`` (word, position, token type, ``LayerNorm``; ELECTRA's may be narrower,
    then ``embeddings_project`` writes the stream's first value, which no norm follows,
    and its site is that projection), ``encoder.layer.i`` with
    ``attention.self.{query,key,value}``, ``attention.output.{dense,LayerNorm}`` (MPNet:
    ``attention.attn.{q,k,v,o}``, ``attention.LayerNorm``), ``intermediate.dense``,
    ``output.{dense,LayerNorm}``.  The last norm's output is the model's output
    (``pooler`` and heads read it at full width)."""
    emb = getattr(module, "embeddings", None)
    enc = getattr(module, "encoder", None)
    if not (isinstance(emb, nn.Module) and _has(emb, "word_embeddings", "LayerNorm")):
        return None
    if not (isinstance(enc, nn.Module) and _has(enc, "layer")):
        return None
    blocks = _children(enc, "layer")
    layout = next(
        (
            (qkv, out, norm)
            for qkv, out, norm in _POST_LN_LAYOUTS
            if blocks
            and all(
                all(_get(b, n) is not None for n in (*qkv, out, norm))
                and _has(b, "intermediate", "output")
                and _has(b.intermediate, "dense")
                and _has(b.output, "dense", "LayerNorm")
                and getattr(b, "crossattention", None) is None
                for b in blocks
            )
        ),
        None,
    )
    if layout is None:
        return None
    qkv, attn_out, attn_norm = layout
    d = _width(emb, "word_embeddings")
    e = _join(path, "embeddings")
    embeddings = [
        _join(e, n)
        for n in ("word_embeddings", "position_embeddings", "token_type_embeddings")
        if isinstance(getattr(emb, n, None), nn.Embedding)
    ]
    sites, writers = [], []
    first_readers = [_join(path, f"encoder.layer.0.{r}") for r in qkv]
    project = getattr(module, "embeddings_project", None)
    if isinstance(project, nn.Linear):  # ELECTRA: narrower embeddings, projected up
        d, embeddings = project.out_features, []  # the stream starts at the projection
        writers.append(_join(path, "embeddings_project"))
        sites.append(NormSite(writers[0], first_readers))
    else:
        sites.append(NormSite(_join(e, "LayerNorm"), first_readers))
    for i in range(len(blocks)):
        p = _join(path, f"encoder.layer.{i}")
        nxt = (
            [_join(path, f"encoder.layer.{i + 1}.{r}") for r in qkv] if i + 1 < len(blocks) else []
        )
        sites += [
            NormSite(_join(p, attn_norm), [_join(p, "intermediate.dense")]),
            NormSite(_join(p, "output.LayerNorm"), nxt),
        ]
        writers += [_join(p, attn_out), _join(p, "output.dense")]
    return ResidualStream(path or "model", "post", d, embeddings, writers, sites)


@register_stream("distilbert")
def _distilbert(path: str, module: nn.Module, model: nn.Module) -> ResidualStream | None:
    """DistilBERT (post-LN): ``embeddings`` (word, position, ``LayerNorm``) and
    ``transformer.layer.i`` with ``attention.{q,k,v}_lin``, ``attention.out_lin``,
    ``sa_layer_norm``, ``ffn.lin1``, ``ffn.lin2``, ``output_layer_norm``."""
    emb, tr = getattr(module, "embeddings", None), getattr(module, "transformer", None)
    if not (isinstance(emb, nn.Module) and _has(emb, "word_embeddings", "LayerNorm")):
        return None
    if not (isinstance(tr, nn.Module) and _has(tr, "layer")):
        return None
    blocks = _children(tr, "layer")
    if not blocks or not all(
        _has(b, "attention", "sa_layer_norm", "ffn", "output_layer_norm")
        and _has(b.attention, "q_lin", "k_lin", "v_lin", "out_lin")
        and _has(b.ffn, "lin1", "lin2")
        for b in blocks
    ):
        return None
    d = _width(emb, "word_embeddings")
    e = _join(path, "embeddings")
    embeddings = [
        _join(e, n)
        for n in ("word_embeddings", "position_embeddings")
        if isinstance(getattr(emb, n, None), nn.Embedding)
    ]

    def qkv(i: int) -> list[str]:
        if i >= len(blocks):
            return []
        return [_join(path, f"transformer.layer.{i}.attention.{r}_lin") for r in "qkv"]

    sites, writers = [NormSite(_join(e, "LayerNorm"), qkv(0))], []
    for i in range(len(blocks)):
        p = _join(path, f"transformer.layer.{i}")
        sites += [
            NormSite(_join(p, "sa_layer_norm"), [_join(p, "ffn.lin1")]),
            NormSite(_join(p, "output_layer_norm"), qkv(i + 1)),
        ]
        writers += [_join(p, "attention.out_lin"), _join(p, "ffn.lin2")]
    return ResidualStream(path or "model", "post", d, embeddings, writers, sites)


@register_stream("t5")
def _t5(path: str, module: nn.Module, model: nn.Module) -> ResidualStream | None:
    """T5 encoders (pre-LN, RMSNorm): a stack with ``embed_tokens``, ``block.i.layer.0``
    (``layer_norm → SelfAttention.{q,k,v}``, ``SelfAttention.o``) and ``block.i.layer.1``
    (``layer_norm → DenseReluDense.wi`` or ``wi_0``/``wi_1``, ``DenseReluDense.wo``), and
    ``final_layer_norm``.  Decoder stacks (cross-attention) are not matched."""
    if not _has(module, "embed_tokens", "block", "final_layer_norm"):
        return None
    if getattr(module, "is_decoder", False):
        return None
    blocks = _children(module, "block")
    ok = all(
        _has(b, "layer")
        and len(b.layer) == 2
        and _has(b.layer[0], "layer_norm", "SelfAttention")
        and _has(b.layer[1], "layer_norm", "DenseReluDense")
        for b in blocks
    )
    if not blocks or not ok:
        return None
    d = _width(module, "embed_tokens")
    sites, writers = [], []
    for i, b in enumerate(blocks):
        p = _join(path, f"block.{i}.layer")
        ff = b.layer[1].DenseReluDense
        wi = ["wi"] if _has(ff, "wi") else ["wi_0", "wi_1"]
        sites += [
            NormSite(_join(p, "0.layer_norm"), [_join(p, f"0.SelfAttention.{r}") for r in "qkv"]),
            NormSite(_join(p, "1.layer_norm"), [_join(p, f"1.DenseReluDense.{w}") for w in wi]),
        ]
        writers += [_join(p, "0.SelfAttention.o"), _join(p, "1.DenseReluDense.wo")]
    sites.append(NormSite(_join(path, "final_layer_norm"), []))
    return ResidualStream(path or "model", "pre", d, [_join(path, "embed_tokens")], writers, sites)
