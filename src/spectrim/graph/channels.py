"""Channel-flow analysis: which channels can be removed together, and who reads them.

Every channel a prunable module produces (a conv filter, a linear neuron) is an
*atom*.  Walking the traced graph, each tensor gets a label per position of its
channel dimension (the atom that position carries).  Element-wise ops (residual adds,
SE gating) union atoms position by position, ``cat`` concatenates label lists,
``flatten`` repeats them, per-channel ops (BatchNorm, activations, pooling, depthwise
conv) pass them through.  Ops whose meaning for channels is unknown, or whose
arguments hard-code channel counts (``F.pad`` over channels, ``view`` with a literal
channel size, ``split``), *pin* the atoms that flow through them: pinned channels are
never removed, so an op we do not understand can cost compression but never
correctness.

Atoms unified by element-wise ops form a *class* (one channel that must be kept or
dropped everywhere at once).  Classes produced by the same set of modules form a
:class:`UnitGroup`, the unit of selection.

Example::

    >>> import torch, torch.nn as nn
    >>> from spectrim.graph import analyze_channels
    >>> net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 4, 3))
    >>> a = analyze_channels(net, torch.randn(1, 3, 8, 8))
    >>> [(g.name, g.width, g.pinned) for g in a.groups]
    [('0', 8, None), ('2', 4, 'reaches the model output')]
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from spectrim.graph.modules import module_kind
from spectrim.graph.trace import Graph, Op, Value, trace

__all__ = [
    "Analysis",
    "ConsumerSlot",
    "UnitGroup",
    "analyze_channels",
    "shared_tensors",
    "tied_parameters",
]


_UNARY = {
    "relu", "relu6", "gelu", "silu", "sigmoid", "tanh", "hardswish", "hardsigmoid",
    "hardtanh", "leaky_relu", "elu", "selu", "celu", "mish", "softplus", "dropout",
    "dropout1d", "dropout2d", "dropout3d", "alpha_dropout", "feature_alpha_dropout",
    "neg", "abs", "exp", "log", "sqrt", "rsqrt", "clamp", "clip", "clamp_min",
    "clamp_max", "contiguous", "clone", "detach", "to", "float", "half", "double",
    "bfloat16", "type_as", "sign", "square", "erf", "cos", "sin", "logsigmoid",
    "nan_to_num", "reciprocal", "threshold", "hardshrink", "softsign", "gelu_",
    "requires_grad", "cpu", "cuda", "type", "expm1", "log1p", "exp2", "log2", "log10",
    "floor", "ceil", "round", "trunc", "frac", "tan", "atan", "sinh", "cosh", "asinh",
    "logical_not", "bool", "int", "long", "isnan", "isinf", "isfinite",
}  # fmt: skip
#: element by element, broadcasting: arithmetic, comparisons (xIELU's ``x > 0`` in
#: Apertus feeds a ``where``), and ``min`` / ``max`` of two tensors (not reductions)
_BINARY = {"add", "sub", "rsub", "mul", "div", "rdiv", "maximum", "minimum", "pow", "where",
           "lerp", "addcmul", "addcdiv", "fmod", "remainder", "floor_divide", "gt", "lt",
           "ge", "le", "eq", "ne", "greater", "less", "greater_equal", "less_equal",
           "logical_and", "logical_or", "logical_xor", "fmax", "fmin", "copysign",
           "atan2", "hypot"}  # fmt: skip
_POOL_FUNCS = {
    "adaptive_avg_pool1d", "adaptive_avg_pool2d", "adaptive_avg_pool3d", "adaptive_max_pool1d",
    "adaptive_max_pool2d", "adaptive_max_pool3d", "avg_pool1d", "avg_pool2d", "avg_pool3d",
    "max_pool1d", "max_pool2d", "max_pool3d", "max_pool1d_with_indices",
    "max_pool2d_with_indices", "max_pool3d_with_indices", "interpolate", "upsample",
    "upsample_nearest", "upsample_bilinear", "boolean_dispatch",
}  # fmt: skip
_REDUCE = {"mean", "sum", "amax", "amin", "max", "min", "std", "var", "logsumexp", "prod", "norm"}
_CREATE = {"zeros_like", "ones_like", "empty_like", "full_like", "rand_like", "randn_like",
           "new_zeros", "new_ones", "new_empty", "new_full", "new_tensor", "arange", "zeros",
           "ones", "full", "empty", "tensor"}  # fmt: skip


@dataclass
class _Labels:
    dim: int
    atoms: np.ndarray  # int64, one atom id per position of `dim`


class _UnionFind:
    def __init__(self) -> None:
        self.parent: list[int] = []
        self.pinned: list[str | None] = []

    def new(self, n: int, pinned: str | None = None) -> np.ndarray:
        start = len(self.parent)
        self.parent.extend(range(start, start + n))
        self.pinned.extend([pinned] * n)
        return np.arange(start, start + n, dtype=np.int64)

    def find(self, a: int) -> int:
        root = a
        while self.parent[root] != root:
            root = self.parent[root]
        while self.parent[a] != root:
            self.parent[a], a = root, self.parent[a]
        return root

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra == rb:
            return
        if rb < ra:
            ra, rb = rb, ra
        self.parent[rb] = ra
        if self.pinned[ra] is None:
            self.pinned[ra] = self.pinned[rb]

    def pin(self, a: int, reason: str) -> None:
        r = self.find(a)
        if self.pinned[r] is None:
            self.pinned[r] = reason


@dataclass
class ConsumerSlot:
    """A module that linearly contracts a group's channels (where the correction goes).

    ``positions[i, j]`` is the index, along the module's input feature axis, of the
    ``j``-th occurrence of the group's ``i``-th channel (``r > 1`` after a flatten:
    the correction is then applied as ``T ⊗ I``).
    """

    module: str
    positions: np.ndarray  # (m, r)

    @property
    def repeats(self) -> int:
        return int(self.positions.shape[1])


@dataclass
class UnitGroup:
    """Channels that are selected together: one kept set for all producers."""

    index: int
    name: str  # the first producer's qualified name
    classes: np.ndarray  # class ids, canonical order (first producer's channel order)
    producers: list[str]
    consumers: list[ConsumerSlot]
    passengers: list[str]  # modules/params sliced along these channels (BN, depthwise ...)
    pinned: str | None = None  # reason the group cannot be pruned
    producer_channels: dict[str, np.ndarray] = field(default_factory=dict)
    """output channel index of each of the group's channels, per producer"""
    producer_copies: dict[str, np.ndarray] = field(default_factory=dict)
    """per producer that outputs every channel ``r > 1`` times (tied parts of a fused
    projection): the ``(r, width)`` output indices (row 0 is ``producer_channels``)"""

    @property
    def width(self) -> int:
        return len(self.classes)

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "width": self.width,
            "producers": self.producers,
            "consumers": [c.module for c in self.consumers],
            "passengers": self.passengers,
            "pinned": self.pinned,
        }


@dataclass
class Analysis:
    """Result of :func:`analyze_channels`: the graph, per-module labels and the groups."""

    graph: Graph
    groups: list[UnitGroup]
    # class labels (after union-find) of every channel-indexed parameter axis:
    out_labels: dict[str, np.ndarray]  # producer module -> labels of its output channels
    in_labels: dict[str, np.ndarray]  # consumer module -> labels of its input features
    chan_labels: dict[str, np.ndarray]  # passenger module/param -> labels of its channels
    param_dims: dict[str, int]  # passenger parameter name -> sliced axis
    class_group: dict[int, int] = field(default_factory=dict)

    @property
    def prunable(self) -> list[UnitGroup]:
        return [g for g in self.groups if g.pinned is None]

    def group(self, name: str) -> UnitGroup:
        for g in self.groups:
            if g.name == name:
                return g
        raise KeyError(f"no unit group named {name!r}; groups: {[g.name for g in self.groups]}")

    def pin(self, group: UnitGroup, reason: str) -> None:
        group.pinned = group.pinned or reason

    def summary(self) -> str:
        lines = []
        for g in self.groups:
            state = "prunable" if g.pinned is None else f"pinned ({g.pinned})"
            lines.append(
                f"{g.name}: width {g.width}, {len(g.producers)} producer(s), "
                f"{len(g.consumers)} consumer(s): {state}"
            )
        return "\n".join(lines)


class _Analyzer:
    def __init__(self, graph: Graph) -> None:
        self.g = graph
        self.uf = _UnionFind()
        self.labels: dict[int, _Labels | None] = {}
        self.space: dict[str, np.ndarray] = {}  # producer module -> its atoms
        self.consumer_calls: dict[str, list[np.ndarray]] = {}
        self.passenger_atoms: dict[str, np.ndarray] = {}
        self.param_atoms: dict[str, np.ndarray] = {}
        self.param_dims: dict[str, int] = {}
        self.module_of: dict[str, nn.Module] = {}

    # -- helpers ------------------------------------------------------------------
    def lab(self, v: Value | None) -> _Labels | None:
        if v is None:
            return None
        return self.labels.get(v.index)

    def set(self, v: Value, lab: _Labels | None) -> None:
        if (
            lab is not None
            and v.shape
            and (lab.dim >= len(v.shape) or v.shape[lab.dim] != len(lab.atoms))
        ):
            self._pin_atoms(lab.atoms, f"shape mismatch at value {v.index}")
            lab = None
        self.labels[v.index] = lab

    def _pin_atoms(self, atoms: np.ndarray, reason: str) -> None:
        for a in atoms.tolist():
            self.uf.pin(a, reason)

    def pin_inputs(self, op: Op, reason: str | None = None) -> None:
        why = reason or f"passes through {op.describe()}, which spectrim does not map"
        for v in op.inputs:
            lab = self.lab(v)
            if lab is not None:
                self._pin_atoms(lab.atoms, why)

    def opaque(self, op: Op, reason: str | None = None) -> None:
        self.pin_inputs(op, reason)
        for v in op.outputs:
            self.set(v, None)

    def unify(self, a: np.ndarray, b: np.ndarray) -> None:
        for x, y in zip(a.tolist(), b.tolist()):
            self.uf.union(x, y)

    def passthrough(self, op: Op, lab: _Labels | None) -> None:
        for v in op.outputs:
            self.set(v, lab)

    # -- main loop ----------------------------------------------------------------
    def run(self) -> None:
        for op in self.g.ops:
            try:
                if op.kind == "module":
                    self.module_op(op)
                else:
                    self.function_op(op)
            except Exception as exc:  # defensive: an analysis bug must pin, not crash
                self.opaque(op, f"analysis of {op.describe()} failed: {exc}")
        for v in self.g.outputs:
            lab = self.lab(v)
            if lab is not None:
                self._pin_atoms(lab.atoms, "reaches the model output")

    def producer(self, op: Op, n: int, dim: int, pinned: str | None = None) -> None:
        atoms = self.space.get(op.name)
        if atoms is None or len(atoms) != n:
            atoms = self.uf.new(n, pinned)
            self.space[op.name] = atoms
        for v in op.outputs[:1]:
            self.set(v, _Labels(dim if dim >= 0 else len(v.shape) + dim, atoms))
        for v in op.outputs[1:]:
            self.set(v, None)

    def consumer(self, op: Op, lab: _Labels | None, dim: int) -> None:
        if lab is None:
            return
        x = op.inputs[0]
        want = dim if dim >= 0 else len(x.shape) + dim
        if lab.dim != want:
            self._pin_atoms(lab.atoms, f"{op.describe()} contracts another axis")
            return
        prev = self.consumer_calls.setdefault(op.name, [])
        if prev and len(prev[0]) == len(lab.atoms):
            self.unify(prev[0], lab.atoms)
        elif prev:
            self._pin_atoms(lab.atoms, f"{op.describe()} is called with different widths")
            return
        prev.append(lab.atoms)

    def passenger(self, op: Op, lab: _Labels | None, dim: int = 1) -> None:
        if lab is None:
            self.passthrough(op, None)
            return
        if lab.dim != dim:
            self.opaque(op, f"{op.describe()} mixes the channel axis")
            return
        prev = self.passenger_atoms.get(op.name)
        if prev is not None:
            self.unify(prev, lab.atoms)
        else:
            self.passenger_atoms[op.name] = lab.atoms
        self.passthrough(op, lab)

    # -- modules ------------------------------------------------------------------
    def module_op(self, op: Op) -> None:
        m = op.target
        self.module_of[op.name] = m
        x = op.inputs[0] if op.inputs else None
        lab = self.lab(x)
        kind = module_kind(m)
        if kind is None or kind.channels is None:
            self.opaque(op)
        else:  # the type's registered rule (graph/modules.py)
            kind.channels(self, op, m, lab)

    def softmax_like(self, op: Op, lab: _Labels | None, d: int) -> None:
        x = op.inputs[0]
        d = d % len(x.shape)
        if lab is not None and lab.dim == d:
            self.opaque(op, f"{op.describe()} normalises over channels")
        else:
            self.passthrough(op, lab)

    # -- functions ----------------------------------------------------------------
    def arg(self, op: Op, pos: int, name: str, default: Any = None) -> Any:
        if name in op.kwargs:
            return op.kwargs[name]
        # args[0] is the tensor itself for methods and functions alike
        return op.args[pos] if len(op.args) > pos else default

    def function_op(self, op: Op) -> None:
        name = op.name
        x = op.inputs[0] if op.inputs else None
        lab = self.lab(x)
        first_is_tensor = bool(op.args) and isinstance(op.args[0], Value)
        if name in _CREATE:
            for v in op.outputs:
                self.set(v, None)
        elif name in _UNARY and first_is_tensor and len(op.inputs) == 1:
            self.passthrough(op, lab)
        elif name in _BINARY or (name in _UNARY and len(op.inputs) > 1):
            self.elementwise(op)
        elif name in _POOL_FUNCS:
            if lab is not None and lab.dim != 1:
                self.opaque(op, f"{op.describe()} pools over the channel axis")
            else:
                self.passthrough(op, lab)
        elif name in ("softmax", "log_softmax"):
            self.softmax_like(op, lab, self.arg(op, 1, "dim", -1))
        elif name == "cat":
            self.cat(op)
        elif name == "flatten":
            self.flatten(op, lab, self.arg(op, 1, "start_dim", 0), self.arg(op, 2, "end_dim", -1))
        elif name in ("view", "reshape"):
            self.reshape(op, lab)
        elif name in ("view_as", "reshape_as"):
            self.reshape_as(op, lab)
        elif name in ("permute", "transpose", "swapaxes", "swapdims", "movedim", "t", "unsqueeze",
                      "squeeze"):  # fmt: skip
            self.move_dims(op, lab)
        elif name in ("min", "max") and len(op.inputs) > 1:  # torch.min(x, y): per element
            self.elementwise(op)
        elif name in _REDUCE:
            self.reduce(op, lab)
        elif name == "pad":
            self.pad(op, lab)
        elif name == "__getitem__":
            self.getitem(op, lab)
        elif name in ("expand", "expand_as", "broadcast_to"):
            y = op.outputs[0]
            if (
                lab is not None
                and x is not None
                and y.shape[lab.dim + len(y.shape) - len(x.shape)] != len(lab.atoms)
            ):
                self.opaque(op)
            else:
                shift = len(y.shape) - len(x.shape) if x is not None else 0
                self.passthrough(op, None if lab is None else _Labels(lab.dim + shift, lab.atoms))
        elif name in ("chunk", "split", "unbind", "tensor_split", "narrow", "select",
                      "split_with_sizes"):  # fmt: skip
            self.split_like(op, lab)
        else:
            self.opaque(op)

    def elementwise(self, op: Op) -> None:
        out = op.outputs[0]
        nd = len(out.shape)
        labelled: list[tuple[int, _Labels]] = []
        others: list[Value] = []
        for v in op.inputs:
            lab = self.lab(v)
            if lab is None:
                others.append(v)
            else:
                labelled.append((lab.dim + nd - len(v.shape), lab))
        if not labelled:
            self.passthrough(op, None)
            return
        dims = {d for d, _ in labelled}
        if len(dims) != 1:
            self.opaque(op, f"{op.describe()} combines tensors with different channel axes")
            return
        (d,) = dims
        n = len(labelled[0][1].atoms)
        if any(len(lab.atoms) != n for _, lab in labelled):
            self.opaque(op)
            return
        for _, lab in labelled[1:]:
            self.unify(labelled[0][1].atoms, lab.atoms)
        for v in others:
            vd = d - (nd - len(v.shape))
            if vd < 0 or v.shape[vd] == 1:
                continue  # broadcast along channels: a scalar per channel is fine
            if v.kind == "param" and v.shape[vd] == n:
                prev = self.param_atoms.get(v.name)
                if prev is not None:
                    self.unify(prev, labelled[0][1].atoms)
                else:
                    self.param_atoms[v.name] = labelled[0][1].atoms
                    self.param_dims[v.name] = vd
                continue
            origin = v.producer.describe() if v.producer is not None else f"a {v.kind} tensor"
            self.opaque(
                op,
                f"{op.describe()} combines these channels with untracked channels (from {origin})",
            )
            return
        self.passthrough(op, _Labels(d, labelled[0][1].atoms))

    def cat(self, op: Op) -> None:
        tensors = op.args[0] if op.args else op.kwargs.get("tensors")
        dim = self.arg(op, 1, "dim", 0)
        out = op.outputs[0]
        dim = dim % len(out.shape)
        vals = [t for t in tensors if isinstance(t, Value)] if tensors is not None else []
        labs = [self.lab(v) for v in vals]
        if all(lab is None for lab in labs):
            self.passthrough(op, None)
            return
        if all(lab is not None and lab.dim == dim for lab in labs):
            atoms = np.concatenate([lab.atoms for lab in labs if lab is not None])
            self.passthrough(op, _Labels(dim, atoms))
            return
        # concatenation along another axis: channel labels must agree
        if all(lab is not None and lab.dim != dim for lab in labs):
            d0 = labs[0].dim  # type: ignore[union-attr]
            if all(lab.dim == d0 and len(lab.atoms) == len(labs[0].atoms) for lab in labs):  # type: ignore[union-attr]
                for lab in labs[1:]:
                    self.unify(labs[0].atoms, lab.atoms)  # type: ignore[union-attr]
                self.passthrough(op, labs[0])
                return
        self.opaque(op, f"{op.describe()} mixes labelled and unlabelled channels")

    def flatten(self, op: Op, lab: _Labels | None, start: int, end: int) -> None:
        if lab is None:
            self.passthrough(op, None)
            return
        shape = op.inputs[0].shape
        nd = len(shape)
        start, end = start % nd, end % nd
        if lab.dim < start:
            self.passthrough(op, lab)
        elif lab.dim > end:
            self.passthrough(op, _Labels(lab.dim - (end - start), lab.atoms))
        else:
            self.passthrough(op, _Labels(start, _flatten_labels(shape, start, end, lab)))

    def reshape(self, op: Op, lab: _Labels | None) -> None:
        if lab is None:
            self.passthrough(op, None)
            return
        x, y = op.inputs[0], op.outputs[0]
        raw = list(op.args[1:]) if len(op.args) > 1 else [op.kwargs.get("shape")]
        if len(raw) == 1 and isinstance(raw[0], (tuple, list, torch.Size)):
            raw = list(raw[0])
        xs, ys = list(x.shape), list(y.shape)
        pre, c = math.prod(xs[: lab.dim]), xs[lab.dim]
        j, acc = 0, 1
        while j < len(ys) and acc < pre:
            acc *= ys[j]
            j += 1
        while j < len(ys) and ys[j] == 1 and acc == pre and xs[lab.dim] != 1 and ys[j] != c:
            j += 1
        if acc == pre and j < len(ys) and len(raw) == len(ys):
            given = raw[j]
            # the channel axis kept, its size given as -1, or as the count itself with
            # every size explicit: a hard-coded count then cannot absorb a narrower width
            # (no -1 elsewhere), so the shrink self-check pins it (PVT-v2's and SegFormer's
            # ``x.transpose(1, 2).view(B, C, H, W)`` with ``C`` read from the input)
            if ys[j] == c and (given == -1 or (given == c and -1 not in raw)):
                self.passthrough(op, _Labels(j, lab.atoms))
                return
            if given == -1 and ys[j] % c == 0 and _merges(xs, lab.dim, ys[j] // c):
                self.passthrough(op, _Labels(j, np.repeat(lab.atoms, ys[j] // c)))
                return
        self.opaque(op, f"{op.describe()} reshapes the channel axis with literal sizes")

    def reshape_as(self, op: Op, lab: _Labels | None) -> None:
        """``x.reshape_as(other)``: the target shape follows ``other``, so the channel axis
        may be reshaped when it lands on ``other``'s channel axis (the two are then one
        set of channels and shrink together)."""
        x, y = op.inputs[0], op.outputs[0]
        other = op.inputs[1] if len(op.inputs) > 1 else None
        olab = self.lab(other)
        if lab is None and olab is None:
            self.passthrough(op, None)
            return
        if lab is not None and olab is not None:
            xs, ys, j = list(x.shape), list(y.shape), olab.dim
            c = xs[lab.dim]
            if (
                math.prod(xs[: lab.dim]) == math.prod(ys[:j])
                and ys[j] == c
                and len(olab.atoms) == len(lab.atoms)
            ):
                self.unify(lab.atoms, olab.atoms)
                self.passthrough(op, _Labels(j, lab.atoms))
                return
        self.opaque(op, f"{op.describe()} reshapes the channel axis to another tensor's shape")

    def move_dims(self, op: Op, lab: _Labels | None) -> None:
        if lab is None:
            self.passthrough(op, None)
            return
        x, y = op.inputs[0], op.outputs[0]
        d = _moved_dim(op, lab.dim, len(x.shape), len(y.shape))
        if d is None or y.shape[d] != len(lab.atoms):
            self.opaque(op, f"{op.describe()} moves the channel axis in a way spectrim cannot map")
        else:
            self.passthrough(op, _Labels(d, lab.atoms))

    def reduce(self, op: Op, lab: _Labels | None) -> None:
        if lab is None:
            self.passthrough(op, None)
            return
        x, y = op.inputs[0], op.outputs[0]
        dims = self.arg(op, 1, "dim", None)
        if dims is None or isinstance(dims, Value):
            self.opaque(op, f"{op.describe()} reduces over channels")
            return
        dims = [dims] if isinstance(dims, int) else list(dims)
        dims = [d % len(x.shape) for d in dims]
        if lab.dim in dims:
            self.opaque(op, f"{op.describe()} reduces over channels")
            return
        keep = len(y.shape) == len(x.shape)
        d = lab.dim if keep else lab.dim - sum(1 for dd in dims if dd < lab.dim)
        for v in op.outputs:
            if v.shape and d < len(v.shape) and v.shape[d] == len(lab.atoms):
                self.set(v, _Labels(d, lab.atoms))
            else:
                self.set(v, None)

    def pad(self, op: Op, lab: _Labels | None) -> None:
        if lab is None:
            self.passthrough(op, None)
            return
        pads = self.arg(op, 1, "pad", ())
        nd = len(op.inputs[0].shape)
        axis_from_end = nd - 1 - lab.dim
        lo = 2 * axis_from_end
        if len(pads) > lo and (pads[lo] != 0 or pads[lo + 1] != 0):
            # mapped exactly (zero channels are new atoms) but pinned: the widths are
            # literals in the model's code, so the channels cannot change
            why = f"{op.describe()} pads the channel axis with literal widths"
            self._pin_atoms(lab.atoms, why)
            before, after = int(pads[lo]), int(pads[lo + 1])
            if before < 0 or after < 0:
                self.opaque(op, why)
                return
            atoms = np.concatenate([self.uf.new(before, why), lab.atoms, self.uf.new(after, why)])
            self.passthrough(op, _Labels(lab.dim, atoms))
        else:
            self.passthrough(op, lab)

    def getitem(self, op: Op, lab: _Labels | None) -> None:
        if lab is None:
            self.passthrough(op, None)
            return
        idx = op.args[1] if len(op.args) > 1 else None
        d, part = _index_dim(idx, lab.dim, len(op.inputs[0].shape))
        y = op.outputs[0]
        c = len(lab.atoms)
        if d is None or d >= len(y.shape):
            self.opaque(op, f"{op.describe()} indexes the channel axis")
            return
        if part is None or (part.start in (None, 0) and (part.stop is None or part.stop >= c)):
            # every channel, also after any shrink: x[:, :k] with k ≥ the width clamps
            if y.shape[d] != c:
                self.opaque(op, f"{op.describe()} indexes the channel axis")
            else:
                self.passthrough(op, _Labels(d, lab.atoms))
            return
        atoms = lab.atoms[part]
        if y.shape[d] != len(atoms):
            self.opaque(op, f"{op.describe()} indexes the channel axis")
            return
        # a literal part of the axis (GhostNet's out[:, :oup]): mapped exactly, but its
        # bounds are literals in the model's code, so none of these channels may change
        self._pin_atoms(lab.atoms, f"{op.describe()} slices the channel axis with literal bounds")
        self.passthrough(op, _Labels(d, atoms))

    def split_like(self, op: Op, lab: _Labels | None) -> None:
        if lab is None:
            self.passthrough(op, None)
            return
        x = op.inputs[0]
        default = 0
        dim = self.arg(op, 2, "dim", default)
        if op.name in ("select", "narrow"):
            dim = self.arg(op, 1, "dim", 0)
        if op.name == "unbind":
            dim = self.arg(op, 1, "dim", 0)
        dim = dim % len(x.shape)
        if dim == lab.dim and op.name == "chunk":
            self.chunk(op, lab)
            return
        if dim == lab.dim:
            self.opaque(op, f"{op.describe()} splits the channel axis with literal sizes")
            return
        for v in op.outputs:
            d = lab.dim - (1 if len(v.shape) < len(x.shape) and dim < lab.dim else 0)
            self.set(v, _Labels(d, lab.atoms))

    def chunk(self, op: Op, lab: _Labels) -> None:
        """``x.chunk(n, dim=channels)``: ``n`` equal parts, whatever the width (Phi-3's
        fused ``gate_up_proj``).  Channel ``j`` of every part is tied to channel ``j`` of
        the others, so every part keeps the same channels and the parts stay equal."""
        c, n = len(lab.atoms), len(op.outputs)
        chunks = self.arg(op, 1, "chunks", 0)
        ok = n > 0 and chunks == n and c % n == 0
        if ok and any(v.shape[lab.dim] != c // n for v in op.outputs):
            ok = False
        if not ok:  # uneven parts: their sizes follow the width in no simple way
            self.opaque(op, f"{op.describe()} splits the channel axis into uneven parts")
            return
        parts = lab.atoms.reshape(n, c // n)
        for part in parts[1:]:
            self.unify(parts[0], part)
        for v, part in zip(op.outputs, parts, strict=True):
            self.set(v, _Labels(lab.dim, part))

    def pin_tied(self, tied: dict[str, list[str]]) -> None:
        """Pin every channel axis of a tensor shared by several modules (tied weights,
        e.g. an LM head tied to its embedding): surgery replaces tensors module by
        module, which would untie them, and no single slice and fold fits both users."""
        if not tied:
            return
        by_module: dict[str, tuple[str, list[str]]] = {}
        for full, others in tied.items():
            mname, _, _ = full.rpartition(".")
            by_module.setdefault(mname, (full, others))
        for mname, (full, others) in by_module.items():
            why = f"'{full}' is tied to '{others[0]}' (tied weights are kept, never untied)"
            for table in (self.space, self.passenger_atoms):
                if mname in table:
                    self._pin_atoms(table[mname], why)
            for atoms in self.consumer_calls.get(mname, []):
                self._pin_atoms(atoms, why)
        for pname, atoms in self.param_atoms.items():
            if pname in tied:
                why = f"'{pname}' is tied to '{tied[pname][0]}' (tied weights are kept)"
                self._pin_atoms(atoms, why)

    # -- groups ---------------------------------------------------------------------
    def groups(self) -> Analysis:
        find = self.uf.find
        roots = np.fromiter(
            (find(i) for i in range(len(self.uf.parent))), dtype=np.int64, count=len(self.uf.parent)
        )

        def cls(a: np.ndarray) -> np.ndarray:
            return roots[np.asarray(a, dtype=np.int64)]

        out_labels = {k: cls(v) for k, v in self.space.items()}
        in_labels = {k: cls(v[0]) for k, v in self.consumer_calls.items()}
        chan_labels = {k: cls(v) for k, v in self.passenger_atoms.items()}
        chan_labels.update({k: cls(v) for k, v in self.param_atoms.items()})

        # producers of each class (a class may only appear once per producer)
        producers_of: dict[int, list[str]] = {}
        bad: dict[int, str] = {}
        first_call: dict[str, int] = {}
        for op in self.g.ops:
            first_call.setdefault(op.name, op.index)
        order = sorted(out_labels, key=lambda n: first_call.get(n, 1 << 30))
        for name in order:
            labs = out_labels[name]
            counts: dict[int, int] = {}
            for c in labs.tolist():
                if c not in counts:
                    producers_of.setdefault(c, []).append(name)
                counts[c] = counts.get(c, 0) + 1
            # a class may come out of several positions of one producer (a fused projection
            # whose parts are tied, Phi-3's gate_up_proj), if every class of it does so
            # equally often: each removed class then takes as many rows
            if len(set(counts.values())) > 1:
                for c, n in counts.items():
                    if n > 1:
                        bad[c] = f"channel produced twice by '{name}'"
        by_key: dict[tuple[str, ...], list[int]] = {}
        for name in order:
            for c in out_labels[name].tolist():
                key = tuple(producers_of[c])
                lst = by_key.setdefault(key, [])
                if key[0] == name and c not in lst:
                    lst.append(c)
        groups: list[UnitGroup] = []
        class_group: dict[int, int] = {}
        for gi, classes in enumerate(by_key.values()):
            for c in classes:
                class_group[c] = gi
        # which groups each consumer / passenger touches: one pass, not groups × consumers
        touching: dict[int, list[str]] = {}
        for cname, labs in in_labels.items():
            for gi in sorted({class_group[c] for c in set(labs.tolist()) if c in class_group}):
                touching.setdefault(gi, []).append(cname)
        carrying: dict[int, list[str]] = {}
        for pname, labs in chan_labels.items():
            for gi in sorted({class_group[c] for c in set(labs.tolist()) if c in class_group}):
                carrying.setdefault(gi, []).append(pname)
        for key, classes in by_key.items():
            arr = np.asarray(classes, dtype=np.int64)
            gi = len(groups)
            reason = None
            for c in classes:
                reason = reason or self.uf.pinned[c] or bad.get(c)
            members = set(classes)
            consumers: list[ConsumerSlot] = []
            for cname in touching.get(gi, []):
                labs = in_labels[cname]
                mask = np.isin(labs, arr)
                counts = {c: 0 for c in classes}
                for c in labs[mask].tolist():
                    counts[c] += 1
                r = counts[classes[0]]
                if any(v != r for v in counts.values()):
                    reason = reason or f"consumer '{cname}' reads an irregular subset"
                    continue
                pos = np.full((len(classes), r), -1, dtype=np.int64)
                fill = dict.fromkeys(classes, 0)
                index = {c: i for i, c in enumerate(classes)}
                for p, c in enumerate(labs.tolist()):
                    if c in members:
                        pos[index[c], fill[c]] = p
                        fill[c] += 1
                consumers.append(ConsumerSlot(cname, pos))
            passengers = carrying.get(gi, [])
            if not consumers and reason is None:
                reason = "no consumer reads these channels"
            pchan, copies = {}, {}
            for pname in key:
                where: dict[int, list[int]] = {}
                for p, c in enumerate(out_labels[pname].tolist()):
                    where.setdefault(c, []).append(p)
                at = [where[c] for c in classes]
                pchan[pname] = np.asarray([ps[0] for ps in at], dtype=np.int64)
                if len({len(ps) for ps in at}) == 1 and len(at[0]) > 1:  # r rows per channel
                    copies[pname] = np.asarray(at, dtype=np.int64).T  # (r, width)
            group = UnitGroup(gi, key[0], arr, list(key), consumers, passengers, reason, pchan)
            group.producer_copies = copies
            groups.append(group)
        return Analysis(
            self.g, groups, out_labels, in_labels, chan_labels, dict(self.param_dims), class_group
        )


def _merges(shape: Sequence[int], dim: int, rest: int) -> bool:
    acc = 1
    for s in shape[dim + 1 :]:
        acc *= s
        if acc == rest:
            return True
    return False


def _flatten_labels(shape: Sequence[int], start: int, end: int, lab: _Labels) -> np.ndarray:
    before = math.prod(shape[start : lab.dim])
    after = math.prod(shape[lab.dim + 1 : end + 1])
    return np.tile(np.repeat(lab.atoms, after), before)


def _moved_dim(op: Op, d: int, nd_in: int, nd_out: int) -> int | None:
    name = op.name
    args = op.args[1:]
    if name == "permute":
        perm = args[0] if len(args) == 1 and isinstance(args[0], (tuple, list)) else args
        perm = op.kwargs.get("dims", perm)
        perm = [p % nd_in for p in perm]
        return perm.index(d)
    if name in ("transpose", "swapaxes", "swapdims"):
        a = args[0] if args else op.kwargs.get("dim0", 0)
        b = args[1] if len(args) > 1 else op.kwargs.get("dim1", 0)
        a, b = a % nd_in, b % nd_in
        return b if d == a else a if d == b else d
    if name == "t":
        return 1 - d if nd_in == 2 else d
    if name == "movedim":
        src = args[0] if args else op.kwargs.get("source", 0)
        dst = args[1] if len(args) > 1 else op.kwargs.get("destination", 0)
        src = [src] if isinstance(src, int) else list(src)
        dst = [dst] if isinstance(dst, int) else list(dst)
        order = [i for i in range(nd_in) if i not in [s % nd_in for s in src]]
        perm = [-1] * nd_in
        for s, t in zip(src, dst):
            perm[t % nd_in] = s % nd_in
        it = iter(order)
        perm = [p if p >= 0 else next(it) for p in perm]
        return perm.index(d)
    if name == "unsqueeze":
        u = args[0] if args else op.kwargs.get("dim", 0)
        u = u % nd_out
        return d + 1 if u <= d else d
    if name == "squeeze":
        if nd_in == nd_out:
            return d
        s = args[0] if args else op.kwargs.get("dim", None)
        if s is None:
            return None
        squeezed = [s] if isinstance(s, int) else list(s)
        squeezed = [x % nd_in for x in squeezed]
        return d - sum(1 for x in squeezed if x < d)
    return None


def _index_dim(idx: Any, d: int, nd: int) -> tuple[int | None, slice | None]:
    """Output axis of input axis ``d`` after ``x[idx]`` (None if ``d`` is indexed by
    anything but a slice of literal ints with step 1) and that slice (None: the whole
    axis)."""
    items = list(idx) if isinstance(idx, tuple) else [idx]
    if any(isinstance(i, (Value, list)) for i in items):
        return None, None
    n_consuming = sum(1 for i in items if i is not None and i is not Ellipsis)
    expanded: list[Any] = []
    for i in items:
        if i is Ellipsis:
            expanded.extend([slice(None)] * (nd - n_consuming))
        else:
            expanded.append(i)
    expanded.extend([slice(None)] * (nd - sum(1 for i in expanded if i is not None)))
    in_axis = 0
    out_axis = 0
    for i in expanded:
        if i is None:
            out_axis += 1
            continue
        if in_axis == d:
            if isinstance(i, slice) and i.step in (None, 1):
                bounds = (i.start, i.stop)
                if all(b is None for b in bounds) or (i.start in (None, 0) and i.stop is None):
                    return out_axis, None
                if all(b is None or (isinstance(b, int) and b >= 0) for b in bounds):
                    return out_axis, slice(i.start, i.stop)
            return None, None
        if isinstance(i, int):
            in_axis += 1
            continue
        in_axis += 1
        out_axis += 1
    return None, None


def analyze_channels(model: nn.Module, example: Any) -> Analysis:
    """Trace ``model`` on ``example`` and find its prunable unit groups.

    Groups that cannot be pruned safely are returned with ``pinned`` set to the
    reason (naming the op), never silently dropped.
    """
    graph = trace(model, example)
    an = _Analyzer(graph)
    an.run()
    an.pin_tied(tied_parameters(model))
    return an.groups()


def shared_tensors(model: nn.Module) -> list[list[str]]:
    """The parameters and buffers held by more than one module: one list of qualified
    names per shared tensor, in ``named_modules`` order.

    Example::

        >>> net = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4))
        >>> net[1].weight = net[0].weight
        >>> shared_tensors(net)
        [['0.weight', '1.weight']]
    """
    holders: dict[int, list[str]] = {}
    for mname, module in model.named_modules():
        for attr, t in list(module._parameters.items()) + list(module._buffers.items()):
            if t is not None:
                holders.setdefault(id(t), []).append(f"{mname}.{attr}" if mname else attr)
    return [names for names in holders.values() if len(names) > 1]


def tied_parameters(model: nn.Module) -> dict[str, list[str]]:
    """Parameters and buffers held by more than one module: qualified name -> the others.

    Example::

        >>> net = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4))
        >>> net[1].weight = net[0].weight
        >>> tied_parameters(net)
        {'0.weight': ['1.weight'], '1.weight': ['0.weight']}
    """
    return {n: [o for o in names if o != n] for names in shared_tensors(model) for n in names}
