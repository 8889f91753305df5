"""Concrete tracing of a PyTorch model into a flat dataflow graph.

The model is run once on a small example batch.  Calls of the module types registered in
:mod:`spectrim.graph.modules` (``nn.Conv2d``, ``nn.Linear``, ``nn.BatchNorm2d`` ...) are recorded through module
hooks, everything else (``torch.cat``, ``x + y``, ``F.pad``, ``x.view`` ...) through a
:class:`torch.overrides.TorchFunctionMode`.  Because the model really runs, Python
control flow, Hugging Face models and ``**kwargs`` inputs need no special tracer; the
price is that a data-dependent graph is captured for the example only.

Example::

    >>> import torch, torch.nn as nn
    >>> g = trace(nn.Sequential(nn.Linear(4, 3), nn.ReLU()), torch.randn(2, 4))
    >>> [op.name for op in g.ops]
    ['0', '1']
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten, tree_map

from spectrim.graph.modules import module_kind

__all__ = [
    "Graph",
    "Op",
    "StopPass",
    "Value",
    "call_model",
    "call_until_stopped",
    "model_outputs",
    "routed_modules",
    "tensors_in",
    "trace",
]


@dataclass(eq=False)
class Value:
    """A tensor flowing through the graph."""

    index: int
    shape: tuple[int, ...]
    producer: Op | None = None
    kind: str = "tensor"  # "tensor" | "input" | "param" | "const"
    name: str = ""  # parameter/buffer qualified name for kind == "param"

    def __repr__(self) -> str:
        src = self.producer.name if self.producer is not None else self.kind
        return f"Value({self.index}, {list(self.shape)}, from={src})"


@dataclass(eq=False)
class Op:
    """One recorded call: a leaf module call or a torch function."""

    index: int
    kind: str  # "module" | "function"
    name: str  # module qualified name, or normalised function name
    target: Any  # the nn.Module or the callable
    inputs: list[Value]
    outputs: list[Value]
    args: tuple[Any, ...] = ()  # with Value placeholders for tensors
    kwargs: dict[str, Any] = field(default_factory=dict)

    @property
    def module(self) -> nn.Module | None:
        return self.target if self.kind == "module" else None

    def describe(self) -> str:
        if self.kind == "module":
            return f"module '{self.name}' ({type(self.target).__name__})"
        return f"function '{self.name}'"

    def __repr__(self) -> str:
        return f"Op({self.index}, {self.describe()})"


@dataclass
class Graph:
    """The recorded dataflow graph (ops in execution order)."""

    ops: list[Op]
    values: list[Value]
    inputs: list[Value]
    outputs: list[Value]
    module_names: dict[int, str]  # id(module) -> qualified name
    #: the traced call's output tensors (detached): the reference the self-checks
    #: compare against, so that they need no forward pass of their own
    output_tensors: list[torch.Tensor] = field(default_factory=list)

    def module_calls(self) -> dict[str, list[Op]]:
        calls: dict[str, list[Op]] = {}
        for op in self.ops:
            if op.kind == "module":
                calls.setdefault(op.name, []).append(op)
        return calls

    def consumers_of(self) -> dict[int, list[Op]]:
        uses: dict[int, list[Op]] = {}
        for op in self.ops:
            for v in op.inputs:
                uses.setdefault(v.index, []).append(op)
        return uses


def call_model(model: nn.Module, batch: Any) -> Any:
    """Call ``model`` on one calibration batch.

    A tensor is passed as the single positional argument, a tuple/list as positional
    arguments and a mapping as keyword arguments (Hugging Face style).
    """
    if isinstance(batch, torch.Tensor):
        return model(batch)
    if isinstance(batch, Mapping):
        return model(**batch)
    if isinstance(batch, (tuple, list)):
        return model(*batch)
    raise TypeError(
        f"calibration batch of type {type(batch).__name__} is not supported: "
        "use a tensor, a tuple of tensors (positional args) or a dict (keyword args)"
    )


class StopPass(Exception):
    """Raised by a hook to end a forward pass once what the pass was run for is taken
    (:func:`call_until_stopped` ends the pass there)."""


def call_until_stopped(model: nn.Module, batch: Any) -> None:
    """:func:`call_model`, ending quietly where a hook raises :class:`StopPass` (the rest
    of the model is not needed)."""
    try:
        call_model(model, batch)
    except StopPass:
        pass


_RENAME = {
    "__add__": "add",
    "__radd__": "add",
    "__iadd__": "add",
    "__sub__": "sub",
    "__rsub__": "rsub",
    "__isub__": "sub",
    "__mul__": "mul",
    "__rmul__": "mul",
    "__imul__": "mul",
    "__truediv__": "div",
    "__itruediv__": "div",
    "__rtruediv__": "rdiv",
    "__neg__": "neg",
    "__pow__": "pow",
    "__matmul__": "matmul",
    "__rmatmul__": "matmul",
    "multiply": "mul",
    "divide": "div",
    "true_divide": "div",
    "subtract": "sub",
    "concat": "cat",
    "concatenate": "cat",
}


def _func_name(func: Callable[..., Any]) -> str:
    name = getattr(func, "__name__", None) or repr(func)
    if name in _RENAME:
        return _RENAME[name]
    if name.endswith("_") and not name.startswith("_"):
        name = name[:-1]  # in-place variant: add_ -> add
    return _RENAME.get(name, name)


class _Recorder(TorchFunctionMode):
    def __init__(self, tracer: _Tracer) -> None:
        super().__init__()
        self.tracer = tracer

    def __torch_function__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if self.tracer.depth == 0:
            self.tracer.record_function(func, args, kwargs, out)
        return out


class _Tracer:
    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.depth = 0
        self.ops: list[Op] = []
        self.values: list[Value] = []
        self.by_id: dict[int, Value] = {}
        self.keep: list[torch.Tensor] = []  # keep tensors alive so ids stay unique
        self.module_names = {id(m): n for n, m in model.named_modules()}
        self.param_names: dict[int, str] = {}
        for n, p in model.named_parameters(remove_duplicate=False):
            self.param_names.setdefault(id(p), n)
        for n, b in model.named_buffers(remove_duplicate=False):
            self.param_names.setdefault(id(b), n)
        self.pending: list[tuple[nn.Module, list[Value]]] = []

    # -- values -------------------------------------------------------------------
    def new_value(self, t: torch.Tensor, producer: Op | None, kind: str = "tensor") -> Value:
        v = Value(len(self.values), tuple(t.shape), producer, kind)
        self.values.append(v)
        self.by_id[id(t)] = v
        self.keep.append(t)
        return v

    def lookup(self, t: torch.Tensor) -> Value:
        v = self.by_id.get(id(t))
        if v is not None:
            return v
        name = self.param_names.get(id(t))
        v = self.new_value(t, None, "param" if name is not None else "const")
        if name is not None:
            v.name = name
        return v

    def _template(self, obj: Any) -> Any:
        if isinstance(obj, torch.Tensor):
            return self.lookup(obj)
        if type(obj) in (tuple, list):  # the common case, without pytree's generality
            return type(obj)(self._template(x) for x in obj)
        if type(obj) is dict:
            return {k: self._template(v) for k, v in obj.items()}
        if isinstance(obj, (int, float, bool, str, type(None), torch.dtype, torch.device)):
            return obj
        return tree_map(lambda x: self.lookup(x) if isinstance(x, torch.Tensor) else x, obj)

    # -- recording ----------------------------------------------------------------
    def record_function(self, func: Callable[..., Any], args: Any, kwargs: Any, out: Any) -> None:
        flat_out = tensors_in(out)
        if not flat_out:
            return
        inputs = [self.lookup(t) for t in tensors_in((args, kwargs))]
        targs = self._template(args)
        tkwargs = self._template(kwargs)
        op = Op(len(self.ops), "function", _func_name(func), func, inputs, [], targs, tkwargs)
        self.ops.append(op)
        op.outputs = [self.new_value(t, op) for t in flat_out]

    def pre_hook(self, module: nn.Module, args: Any, kwargs: Any) -> None:
        if self.depth == 0:
            self.pending.append((module, [self.lookup(t) for t in tensors_in((args, kwargs))]))
        self.depth += 1

    def post_hook(self, module: nn.Module, args: Any, kwargs: Any, out: Any) -> None:
        self.depth -= 1
        if self.depth != 0:
            return
        mod, inputs = self.pending.pop()
        assert mod is module
        name = self.module_names.get(id(module), type(module).__name__)
        op = Op(len(self.ops), "module", name, module, inputs, [], (), {})
        self.ops.append(op)
        op.outputs = [self.new_value(t, op) for t in tensors_in(out)]


def tensors_in(obj: Any) -> list[torch.Tensor]:
    """The tensors in ``obj`` in pytree order (tuples, lists and dicts walked directly).

    >>> tensors_in({"a": torch.ones(1), "b": (2, [torch.zeros(2)])})
    [tensor([1.]), tensor([0., 0.])]
    """
    if isinstance(obj, torch.Tensor):
        return [obj]
    if type(obj) in (tuple, list):
        return [t for x in obj for t in tensors_in(x)]
    if type(obj) is dict:
        return [t for v in obj.values() for t in tensors_in(v)]
    if isinstance(obj, (int, float, bool, str, type(None))):
        return []
    return [x for x in tree_flatten(obj)[0] if isinstance(x, torch.Tensor)]


def _is_leaf(module: nn.Module, leaf_types: Sequence[type[nn.Module]] | None) -> bool:
    if leaf_types is None:  # every type the module registry knows (graph/modules.py)
        return module_kind(module) is not None
    return isinstance(module, tuple(leaf_types))


def _iter_leaves(
    model: nn.Module, leaf_types: Sequence[type[nn.Module]] | None
) -> Iterator[nn.Module]:
    def visit(m: nn.Module) -> Iterator[nn.Module]:
        if _is_leaf(m, leaf_types):
            yield m
            return
        for child in m.children():
            yield from visit(child)

    yield from visit(model)


def trace(
    model: nn.Module,
    example: Any,
    leaf_types: Sequence[type[nn.Module]] | None = None,
) -> Graph:
    """Run ``model`` once on ``example`` and record its dataflow graph.

    Args:
        model: the network (left unchanged; run in eval mode under ``no_grad``).
        example: one calibration batch (tensor, tuple of positional args or dict of
            keyword args).
        leaf_types: module types recorded as single ops (default: every type registered
            in :mod:`spectrim.graph.modules`).
    """
    tracer = _Tracer(model)
    handles = []
    for m in _iter_leaves(model, leaf_types):
        handles.append(m.register_forward_pre_hook(tracer.pre_hook, with_kwargs=True))
        handles.append(m.register_forward_hook(tracer.post_hook, with_kwargs=True))
    flat_args = [x for x in tree_flatten(example)[0] if isinstance(x, torch.Tensor)]
    inputs = [tracer.new_value(t, None, "input") for t in flat_args]
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), _Recorder(tracer):
            out = call_model(model, example)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    out_tensors = tensors_in(_plain(out))
    outputs = [tracer.lookup(t) for t in out_tensors]
    return Graph(
        tracer.ops,
        tracer.values,
        inputs,
        outputs,
        tracer.module_names,
        [t.detach() for t in out_tensors],
    )


#: functions that pick rows (or elements) of their first input at the places the tensors
#: after it say
_GATHERS = frozenset({"__getitem__", "index_select", "masked_select", "take", "gather",
                      "take_along_dim"})  # fmt: skip
#: functions that write into their first input at the places the tensors after it say: the
#: result has the first input's rows, whichever rows were written
_SCATTERS = frozenset({"index_add", "index_copy", "index_put", "index_fill", "index_reduce",
                       "scatter", "scatter_add", "scatter_reduce", "masked_scatter",
                       "masked_fill"})  # fmt: skip


def routed_modules(graph: Graph) -> dict[str, str]:
    """The recorded modules whose input rows the model picks by its own activations, each
    with the call that picked them (e.g. a mixture-of-experts layer's experts: each runs on
    the tokens its router sent it, ``hidden[top_x]``).

    A gather (``x[i]``, ``index_select``, ``gather`` ...) whose index depends on the output
    of a recorded module picks routed rows; what is computed from them is routed too, until
    a scatter (``index_add_`` ...) writes them back into a tensor that is not.  Indices
    computed from the model's inputs alone (an attention mask, the positions of a token)
    pick the same rows whatever the weights are, so they route nothing.  An element-wise
    op that combines routed values with a tensor of its output's shape that is not routed
    (the residual stream an MoE layer's output is added to, after the layer put its rows
    back in order however it routed them) gives values in the model's own order again.  Two runs of a
    routed module on the same batch need not see the same rows when the weights before it
    change (a pruned prefix): its rows cannot be paired between them.

    Example::

        >>> import torch, torch.nn as nn
        >>> class TopHalf(nn.Module):  # rows chosen by a score the model computes
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.score, self.ffn = nn.Linear(4, 1), nn.Linear(4, 4)
        ...     def forward(self, x):
        ...         keep = self.score(x).squeeze(-1) > 0
        ...         out = torch.zeros_like(x)
        ...         return out.index_add(0, keep.nonzero().squeeze(1), self.ffn(x[keep]))
        >>> routed_modules(trace(TopHalf(), torch.randn(8, 4)))
        {'ffn': "function '__getitem__'"}
    """
    depends: set[int] = set()  # values computed from some module's output
    routed: dict[int, str] = {}  # value -> the call that picked its rows
    out: dict[str, str] = {}
    for op in graph.ops:
        ins = op.inputs
        why: str | None = None
        if op.kind == "module":
            why = next((routed[v.index] for v in ins if v.index in routed), None)
            if why is not None:
                out.setdefault(op.name, why)
        elif op.name in _GATHERS and any(v.index in depends for v in ins[1:]):
            why = op.describe()
        elif op.name in _SCATTERS:
            why = routed.get(ins[0].index) if ins else None
        else:
            why = next((routed[v.index] for v in ins if v.index in routed), None)
            shape = op.outputs[0].shape if op.outputs else None
            if why is not None and any(
                v.index not in routed and v.kind != "param" and v.shape == shape for v in ins
            ):  # combined with rows in the model's own order (a residual addition): aligned
                why = None
        dep = op.kind == "module" or any(v.index in depends for v in ins)
        for v in op.outputs:
            if dep:
                depends.add(v.index)
            if why is not None:
                routed[v.index] = why
    return out


def _plain(out: Any) -> Any:
    """Turn Hugging Face ModelOutput-like objects into plain containers."""
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, Mapping):
        return {k: _plain(v) for k, v in out.items()}
    if isinstance(out, (tuple, list)):
        return [_plain(v) for v in out]
    if hasattr(out, "to_tuple"):
        return [_plain(v) for v in out.to_tuple()]
    return out


def model_outputs(model: nn.Module, batch: Any) -> list[torch.Tensor]:
    """The output tensors of ``model`` on ``batch`` (no grad), flattened in order."""
    with torch.no_grad():
        return tensors_in(_plain(call_model(model, batch)))


def batch_len(batch: Any) -> int:
    """Number of examples in a batch (first dimension of its first tensor)."""
    if isinstance(batch, torch.Tensor):
        return int(batch.shape[0]) if batch.dim() else 1
    if isinstance(batch, dict):
        for v in batch.values():
            return batch_len(v)
    if isinstance(batch, (tuple, list)) and batch:
        return batch_len(batch[0])
    return 0
