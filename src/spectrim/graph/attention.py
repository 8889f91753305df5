"""Attention layers as sets of heads: where their projections are, and how to remove heads.

The channel analysis cannot prune attention: ``q``, ``k`` and ``v`` are reshaped into
``(heads, head_dim)`` and mixed by ``softmax(QKᵀ)V``, so their channels are pinned.  Whole
heads, though, are independent: removing head ``h`` from the query, key and value
projections and the matching ``head_dim`` input columns of the output projection gives
exactly the model without that head.  The output projection's input (the concatenated
per-head outputs) is where heads are *selected* and *corrected*: its Gram splits into
head blocks, and the correction for the removed heads folds into the output projection
like a channel correction into a consumer.

An :class:`AttentionBlock` records, for one attention layer, the module names of its
projections, the head counts and the attributes that hold them.  Each architecture family
is one *finder* registered with :func:`register_attention`; finders match on structure
(attribute names), not on class names, so BERT, RoBERTa, MiniLM, ELECTRA (``query`` /
``key`` / ``value`` under ``.self``, ``output.dense``), LLaMA, Mistral, Qwen2, OPT, HF ViT
and Phi (``q_proj`` / ``k_proj`` / ``v_proj`` / ``o_proj``, ``out_proj`` or ``dense``),
DistilBERT (``q_lin`` ...), GPT-2 (a fused ``c_attn`` ``Conv1D``), GPTBigCode (a fused
``c_attn`` Linear, multi-query or with interleaved heads), GPT-NeoX (a fused
``query_key_value`` with interleaved heads; BLOOM's too), Falcon, CodeGen (a fused
``qkv_proj`` in ``mp_num`` parts), ALBERT (``query`` ... ``dense`` in one module), T5
encoders and MPNet (``q`` / ``k`` / ``v`` / ``o``) and timm's ViT ``Attention`` (a fused
``qkv``) are found by one finder each.  Where every layer adds a per-head bias computed
once for all heads (T5's and MPNet's relative positions, BLOOM's and Falcon-RW's ALiBi),
:class:`HeadBias` says where it enters, and each layer adds its kept heads' rows.

Units are *key/value groups*: with grouped-query attention (``kv_heads < heads``) a KV head
goes together with the ``heads / kv_heads`` query heads that read it, so every layer keeps
the same number of query heads per KV head and the model's own code still runs.  With
plain multi-head attention a unit is one head, and under multi-query attention (one KV
head for all query heads) a unit is one query head: the shared key and value stay.

Example::

    >>> import torch
    >>> from transformers import BertConfig, BertModel
    >>> cfg = BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
    ...                  intermediate_size=37, vocab_size=50)
    >>> model = BertModel(cfg).eval()
    >>> block, = find_attention(model)
    >>> block.name, block.heads, block.units, block.head_dim
    ('encoder.layer.0.attention', 4, 4, 8)
    >>> block.columns([1]).tolist()
    [8, 9, 10, 11, 12, 13, 14, 15]
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from spectrim.graph.modules import index_along, module_kind, register_swap_class, set_param

__all__ = [
    "BIAS_HEADS",
    "AttentionBlock",
    "HeadAttention",
    "HeadBias",
    "LayerConfig",
    "Projection",
    "find_attention",
    "prepare_attention",
    "register_attention",
    "unmatched_attention",
    "unmatched_reason",
]


#: unit indices: a sequence of ints or an integer array
Units = Sequence[int] | np.ndarray


@dataclass(frozen=True)
class Projection:
    """Output features ``[offset, offset + heads·head_dim)`` of module ``module`` are the
    heads of one of ``q`` / ``k`` / ``v`` (``offset > 0`` only in a fused projection).

    With ``stride`` set, the heads are interleaved with the other roles' instead: head
    ``h`` is features ``[offset + h·stride, offset + h·stride + head_dim)`` (GPTBigCode's
    ``c_attn``, ``[q₀ k₀ v₀ q₁ k₁ v₁ …]``: ``stride = 3·head_dim``).

    In a layer cut in :attr:`AttentionBlock.blocks` parts (CodeGen), ``part`` is the
    role's place in each part: part ``g`` is ``[q_g | v_g | k_g]`` (``part`` 0, 1, 2),
    each the ``heads / blocks`` heads of that part.
    """

    module: str
    role: str  # "q", "k" or "v"
    offset: int = 0
    stride: int = 0
    part: int = 0


#: attribute of an attention layer with a :class:`HeadBias`: the heads it kept, as indices
#: into the bias every layer is handed (the original heads); saved in the manifest
BIAS_HEADS = "spectrim_bias_heads"


@dataclass(frozen=True)
class HeadBias:
    """A per-head score bias that one module computes for every layer and each layer adds
    to its scores (relative positions: T5's first layer computes it and every layer hands
    it on, MPNet's encoder computes it and passes it to each layer; ALiBi slopes: BLOOM's
    model builds them for every head, Falcon-RW's adds them into the attention mask).  A layer that lost
    heads adds only its kept heads' rows: a forward pre-hook slices the bias to
    :data:`BIAS_HEADS` (installed by :meth:`AttentionBlock.sync`, so also on reload), and
    where the layer hands the bias on, a forward hook hands on the whole one again.

    Attributes:
        index, name: the bias's position among the layer's arguments and its keyword.
        hands_on: index in the layer's output tuple where it returns the bias for the
            next layer (T5), or ``None``.
        compute: ``(module, args, kwargs) -> bias or None`` for a layer that computes the
            bias itself when it is given none (T5's first layer).
        flat: the heads are flattened with the batch into the bias's first axis
            (BLOOM's ALiBi, ``(batch·heads, 1, keys)``; the batch is the layer's first
            argument's); otherwise they are its ``axis``.
        axis: the bias's head axis (1: ``(batch, heads, …)``; MPT's ALiBi has no batch,
            ``(heads, 1, keys)``: 0).
        zeros: the bias is zeros that the first layer makes for its heads and hands on
            (T5's cross-attention): a layer that lost heads is handed none, so it makes
            its own for the heads it has, and hands none on.
    """

    index: int
    name: str = "position_bias"
    hands_on: int | None = None
    compute: Callable[[nn.Module, tuple[Any, ...], dict[str, Any]], Any] | None = None
    flat: bool = False
    axis: int = 1
    zeros: bool = False


def _slice_bias(
    spec: HeadBias, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]
) -> tuple[tuple[Any, ...], dict[str, Any]] | None:
    """Forward pre-hook: the layer gets the bias rows of its kept heads."""
    kept = getattr(module, BIAS_HEADS, None)
    if kept is None:
        return None
    positional = spec.name not in kwargs and len(args) > spec.index
    if spec.zeros:  # the layer makes its own for the heads it has
        if positional:
            return (*args[: spec.index], None, *args[spec.index + 1 :]), kwargs
        return args, {**kwargs, spec.name: None}
    bias = args[spec.index] if positional else kwargs.get(spec.name)
    if bias is None and spec.compute is not None:
        bias = spec.compute(module, args, kwargs)
    if spec.hands_on is not None:
        module.__dict__["_spectrim_whole_bias"] = bias
    if not isinstance(bias, torch.Tensor):
        return None
    whole = bias
    if spec.flat:  # (batch·heads, …) -> (batch, heads, …)
        batch = (args[0] if args else kwargs["hidden_states"]).shape[0]
        bias = bias.reshape(batch, bias.shape[0] // batch, *bias.shape[1:])
    axis = 1 if spec.flat else spec.axis
    if bias.dim() <= axis or bias.shape[axis] <= max(kept):
        raise ValueError(
            f"{type(module).__name__}: a position bias of shape {tuple(whole.shape)} cannot "
            f"hold the rows of the heads this layer kept ({BIAS_HEADS} = {kept})"
        )
    rows = bias.index_select(axis, torch.as_tensor(kept, device=bias.device))
    if spec.flat:
        rows = rows.flatten(0, 1)
    if positional:
        args = (*args[: spec.index], rows, *args[spec.index + 1 :])
    else:
        kwargs = {**kwargs, spec.name: rows}
    return args, kwargs


def _hand_on_bias(spec: HeadBias, module: nn.Module, args: tuple[Any, ...], output: Any) -> Any:
    """Forward hook: the next layer is handed the whole bias, not this layer's rows."""
    whole = module.__dict__.pop("_spectrim_whole_bias", None)
    if spec.zeros and spec.hands_on is not None and isinstance(output, tuple):
        return (*output[: spec.hands_on], None, *output[spec.hands_on + 1 :])
    if whole is None or spec.hands_on is None or not isinstance(output, tuple):
        return None
    return (*output[: spec.hands_on], whole, *output[spec.hands_on + 1 :])


def _install_bias_hooks(module: nn.Module, spec: HeadBias) -> None:
    """The hooks of :class:`HeadBias`, once per module."""
    if any(
        isinstance(h, functools.partial) and h.func is _slice_bias
        for h in module._forward_pre_hooks.values()
    ):
        return
    module.register_forward_pre_hook(functools.partial(_slice_bias, spec), with_kwargs=True)
    if spec.hands_on is not None:
        module.register_forward_hook(functools.partial(_hand_on_bias, spec))


@dataclass
class AttentionBlock:
    """One attention layer seen as heads.

    Attributes:
        name: module path of the attention layer (for reports).
        projections: the q, k and v projections (a fused ``c_attn`` appears three times
            with its offsets).
        out: module path of the output projection, whose input columns are the
            concatenated per-head outputs (head ``h``: columns ``h·d … h·d + d − 1``).
        heads, kv_heads, head_dim: as the layer holds them now.
        head_attrs / kv_attrs / width_attrs / group_attrs: ``(module path, attribute)``
            pairs that hold the number of query heads, of KV heads, ``heads·head_dim`` and
            the query heads per KV head (updated after surgery so the layer's code still
            agrees).

        slots: with grouped-query attention, remove query heads inside the KV groups
            instead of whole groups (:attr:`per_query`): ``slots[i]`` lists group ``i``'s
            query heads (``0 … group_size − 1``) most valuable first, and unit ``u`` is
            the ``slots[i, u]``-th head of every group ``i``, so each group keeps as many
            query heads as the others and every key and value stays.
        bias: where a per-head bias shared by every layer enters this one
            (:class:`HeadBias`; T5, MPNet), or ``None``.
        calls: how many times one forward pass runs the layer (more than once where
            every depth shares it: ALBERT), as the last statistics pass counted.
        blocks: the fused projection is cut in this many equal parts, each holding
            ``heads / blocks`` heads of every role (CodeGen's ``mp_num``): a unit is then
            one head of every part (the same place in each), so the parts stay equal.
        head_tables: ``(parameter path, axis)`` of tensors inside the layer with one
            slice per query head along ``axis`` (Swin's relative-position bias table,
            Swin-v2's ``logit_scale``), indexed with the kept query heads.
        head_outputs: modules inside the layer with one output per query head (Swin-v2's
            position-bias MLP's last linear), sliced to the kept query heads.

    Units are KV groups, except under multi-query attention (one KV head shared by
    several query heads) or with :attr:`slots` set (:attr:`per_query`): there a unit is
    one query head of every KV group, and the keys and values stay.
    """

    name: str
    projections: list[Projection]
    out: str
    heads: int
    kv_heads: int
    head_dim: int
    head_attrs: list[tuple[str, str]] = field(default_factory=list)
    kv_attrs: list[tuple[str, str]] = field(default_factory=list)
    width_attrs: list[tuple[str, str]] = field(default_factory=list)
    group_attrs: list[tuple[str, str]] = field(default_factory=list)
    slots: np.ndarray | None = None
    bias: HeadBias | None = None
    blocks: int = 1
    calls: int = 1
    head_tables: list[tuple[str, int]] = field(default_factory=list)
    head_outputs: list[str] = field(default_factory=list)

    @property
    def group_size(self) -> int:
        """Query heads per KV head."""
        return self.heads // self.kv_heads

    @property
    def per_query(self) -> bool:
        """The units are query heads and the keys and values stay: under multi-query
        attention (one KV head for several query heads: removing the only KV group would
        remove every head), or inside the KV groups where :attr:`slots` says so."""
        return (self.kv_heads == 1 and self.heads > 1) or self.slots is not None

    @property
    def units(self) -> int:
        """Removable units: KV groups (one head each without grouped-query attention), or
        query-head slots (:attr:`per_query`; one query head each under multi-query)."""
        if self.blocks > 1:
            return self.heads // self.blocks
        return self.group_size if self.per_query else self.kv_heads

    @property
    def unit_heads(self) -> int:
        """Query heads per unit."""
        if self.blocks > 1:
            return self.blocks
        return self.kv_heads if self.per_query else self.group_size

    def set_slots(self, ranking: Units) -> None:
        """Remove query heads inside the KV groups from now on, each group's in the order
        they take in ``ranking`` (every query head once, most valuable first)."""
        g = self.group_size
        ranking = [int(h) for h in ranking]
        if sorted(ranking) != list(range(self.heads)):
            raise ValueError(
                f"attention '{self.name}': ranking must list each of {self.heads} heads once"
            )
        self.slots = np.array(
            [[h - i * g for h in ranking if h // g == i] for i in range(self.kv_heads)],
            dtype=np.int64,
        )

    def role_rows(self, role: str) -> int:
        """Output rows of a ``role`` projection that one unit takes with it (a shared KV
        head's rows go with no unit)."""
        if role == "q" or self.blocks > 1:
            return self.unit_heads * self.head_dim
        return 0 if self.per_query else self.head_dim

    def query_heads(self, units: Units) -> np.ndarray:
        """Query heads of the given units, in order (under :attr:`per_query`: in head
        order, so the heads of each KV group stay together)."""
        if self.per_query:
            g = self.group_size
            slots = np.arange(g)[None, :] if self.slots is None else self.slots
            heads = [i * g + int(slots[i, u]) for u in units for i in range(self.kv_heads)]
            return np.sort(np.array(heads, dtype=np.int64))
        if self.blocks > 1:  # one head at the same place of every part
            size = self.heads // self.blocks
            return np.sort(
                np.array([g * size + u for u in units for g in range(self.blocks)], np.int64)
            )
        r = self.unit_heads
        return np.array([u * r + i for u in units for i in range(r)], dtype=np.int64)

    def columns(self, units: Units) -> np.ndarray:
        """Output-projection input columns written by the given units."""
        d = self.head_dim
        return np.array(
            [h * d + i for h in self.query_heads(units) for i in range(d)], dtype=np.int64
        )

    def rows(self, role: str, units: Units) -> np.ndarray:
        """Output rows of the ``role`` (``"q"``, ``"k"`` or ``"v"``) projection that hold the
        given units: the query heads' rows for ``q`` (the output projection's columns), the
        KV heads' rows for ``k`` and ``v``."""
        if role == "q" or self.blocks > 1:  # with parts every head has its own k and v
            return self.columns(units)
        d = self.head_dim
        if self.per_query:  # the KV heads stay whatever query heads are kept
            return np.arange(self.kv_heads * d, dtype=np.int64)
        return np.array([u * d + i for u in units for i in range(d)], dtype=np.int64)

    def projection_rows(self, proj: Projection, units: Units) -> np.ndarray:
        """The output features of ``proj``'s module that hold the given units' rows."""
        rows = self.rows(proj.role, units)
        d = self.head_dim
        if proj.stride:  # interleaved heads: head h starts at h·stride
            rows = (rows // d) * proj.stride + rows % d
        if self.blocks > 1:  # head h is in part h // size, at h % size of its role's slice
            size = self.heads // self.blocks
            head, at = rows // d, rows % d
            rows = (head // size) * 3 * size * d + proj.part * size * d + (head % size) * d + at
        return rows + proj.offset

    def unit_columns(self) -> list[np.ndarray]:
        """Columns of each unit (the blocks of the output projection's input Gram)."""
        return [self.columns([u]) for u in range(self.units)]

    def prune(self, model: nn.Module, keep: Units, fold: np.ndarray | None) -> None:
        """Keep the units ``keep`` (sorted); ``fold`` (``heads·head_dim × len(columns)``),
        if given, is the correction ``B`` with ``z ≈ B z_kept`` folded into the output
        projection (its new weight is ``W_o B``).  In place."""
        keep = sorted(int(u) for u in keep)
        if not keep:
            raise ValueError(f"attention '{self.name}': cannot remove every head")
        if any(not 0 <= u < self.units for u in keep) or len(set(keep)) != len(keep):
            raise ValueError(f"attention '{self.name}': bad unit indices {keep}")
        modules = dict(model.named_modules())
        # a fused projection keeps its q, k and v parts in order, each sliced
        per_module: dict[str, list[np.ndarray]] = {}
        for p in self.projections:
            per_module.setdefault(p.module, []).append(self.projection_rows(p, keep))
        for path, parts in per_module.items():
            _keep_outputs(modules[path], np.sort(np.concatenate(parts)), path)
        cols = self.columns(keep)
        _fold_inputs(modules[self.out], cols, fold, self.out)
        heads = self.query_heads(keep)
        for path, axis in self.head_tables:  # per-head position tables and scales
            owner, _, leaf = path.rpartition(".")
            table = getattr(modules[owner], leaf)
            set_param(modules[owner], leaf, index_along(table.data, axis, heads))
        for path in self.head_outputs:
            _keep_outputs(modules[path], heads, path)
        if self.bias is not None:  # the rows of the shared bias this layer still adds
            layer = modules[self.name]
            before = getattr(layer, BIAS_HEADS, None) or list(range(self.heads))
            setattr(layer, BIAS_HEADS, [int(before[h]) for h in self.query_heads(keep)])
        if self.per_query:  # each group keeps its heads in their order
            self.heads, self.slots = len(keep) * self.kv_heads, None
        elif self.blocks > 1:
            self.heads = self.kv_heads = len(keep) * self.blocks
        else:
            self.heads, self.kv_heads = len(keep) * self.group_size, len(keep)
        self.sync(model)

    def sync(self, model: nn.Module) -> None:
        """Write the head counts (and the widths they imply) into the attributes the
        layer's code reads, e.g. after its weights were loaded at a pruned size."""
        modules = dict(model.named_modules())
        d = self.head_dim
        for path, attr in self.head_attrs:
            _set_count(modules[path], attr, self.heads)
        for path, attr in self.kv_attrs:
            _set_count(modules[path], attr, self.kv_heads)
        for path, attr in self.width_attrs:
            _set_count(modules[path], attr, self.heads * d)
        for path, attr in self.group_attrs:
            _set_count(modules[path], attr, self.group_size)
        layer = modules.get(self.name)
        if self.bias is not None and layer is not None and hasattr(layer, BIAS_HEADS):
            _install_bias_hooks(layer, self.bias)


class LayerConfig:
    """One layer's view of a config object shared by every layer (a Hugging Face model's
    ``config``): the values set on it are the layer's own, every other attribute is read
    from the shared object when it is asked for, so a later change there (e.g.
    ``model.set_attn_implementation("sdpa")``) reaches the layer too.

    Example::

        >>> from types import SimpleNamespace
        >>> shared = SimpleNamespace(num_attention_heads=4, impl="eager")
        >>> mine = LayerConfig(shared, num_attention_heads=2)
        >>> shared.impl = "sdpa"
        >>> mine.num_attention_heads, mine.impl, shared.num_attention_heads
        (2, 'sdpa', 4)
    """

    def __init__(self, shared: object, **own: Any) -> None:
        object.__setattr__(self, "_shared", shared)
        object.__setattr__(self, "_own", dict(own))

    def __getattr__(self, name: str) -> Any:  # called only when normal lookup fails
        own = object.__getattribute__(self, "_own")  # AttributeError while unpickling
        if name in own:
            return own[name]
        return getattr(object.__getattribute__(self, "_shared"), name)

    def __setattr__(self, name: str, value: Any) -> None:
        self._own[name] = value

    def __repr__(self) -> str:
        return f"LayerConfig({type(self._shared).__name__}, {self._own})"


def _set_count(module: nn.Module, attr: str, value: int) -> None:
    """``module.attr = value``; a dotted ``attr`` (``"config.num_attention_heads"``, Phi-3's
    attention reads its head count from the model's config) is set on the layer's own
    :class:`LayerConfig` view of that object, so other layers keep theirs and the
    layer still follows every other change of the shared object."""
    owner, _, leaf = attr.rpartition(".")
    if not owner:
        setattr(module, attr, value)
        return
    mine = getattr(module, owner)
    if not isinstance(mine, LayerConfig):
        mine = LayerConfig(mine)
        setattr(module, owner, mine)
    setattr(mine, leaf, value)


def _keep_outputs(module: nn.Module, idx: np.ndarray, path: str) -> None:
    kind = module_kind(module)
    if kind is None or kind.slice is None:
        raise TypeError(f"attention projection '{path}' ({type(module).__name__}) cannot be sliced")
    kind.slice(module, idx, "out")


def _fold_inputs(module: nn.Module, cols: np.ndarray, fold: np.ndarray | None, path: str) -> None:
    kind = module_kind(module)
    if kind is None or kind.in_size is None:
        raise TypeError(f"output projection '{path}' ({type(module).__name__}) cannot be folded")
    weight = module.weight
    assert isinstance(weight, torch.Tensor)
    in_dim = kind.weight_dims[1]
    w = weight.data.movedim(in_dim, 1)  # (out, in)
    if fold is None:
        new_w = index_along(w, 1, cols)
    else:
        b = torch.as_tensor(fold, dtype=torch.float64, device=w.device)
        if b.shape != (w.shape[1], len(cols)):
            raise ValueError(
                f"output projection '{path}': correction of shape {tuple(b.shape)}, "
                f"expected {(w.shape[1], len(cols))}"
            )
        new_w = (w.double() @ b).to(w.dtype)
    set_param(module, "weight", new_w.movedim(1, in_dim).contiguous())
    setattr(module, kind.in_size, new_w.shape[1])


Finder = Callable[[str, nn.Module], AttentionBlock | None]
_FINDERS: list[tuple[str, Finder]] = []


def register_attention(name: str) -> Callable[[Finder], Finder]:
    """Register a finder ``(path, module) -> AttentionBlock | None`` for one family of
    attention layers (tried on every module, in registration order; the first match
    wins and the module's children are not searched further)."""

    def deco(fn: Finder) -> Finder:
        _FINDERS[:] = [(n, f) for n, f in _FINDERS if n != name] + [(name, fn)]
        return fn

    return deco


def find_attention(model: nn.Module) -> list[AttentionBlock]:
    """Every attention layer of ``model`` a registered finder recognises, in module
    order (which is execution order for the models spectrim knows)."""
    out: list[AttentionBlock] = []
    inside: list[str] = []
    for path, module in model.named_modules():
        if any(path.startswith(p + ".") for p in inside):
            continue
        for _, finder in _FINDERS:
            block = finder(path, module)
            if block is not None and (
                _rebuilt_from_config(model, path) or _out_reads_more(model, block)
            ):
                break  # unmatched_reason says why
            if block is not None:
                _find_head_state(block, module, model)
                out.append(block)
                inside.append(path)
                break
    return out


#: parameters inside an attention layer holding one slice per query head: name -> axis
_HEAD_TABLES = {"relative_position_bias_table": -1, "logit_scale": 0, "sinks": 0}
#: modules inside an attention layer with one output per query head (Swin-v2)
_HEAD_OUTPUT_MODULES = ("continuous_position_bias_mlp",)


def _find_head_state(block: AttentionBlock, layer: nn.Module, model: nn.Module) -> None:
    """Per-head tensors of ``layer`` beside its projections (:attr:`AttentionBlock.
    head_tables`, :attr:`~AttentionBlock.head_outputs`), by name and size: Swin's
    relative-position bias tables, Swin-v2's ``logit_scale`` and position-bias MLP, and
    BEiT's per-layer table, which its transformer layer holds beside the attention, and
    UMT5's per-layer relative-position embedding (T5's first layer computes the bias that
    every layer shares: a :class:`HeadBias`, its table whole)."""
    h = block.heads
    found = [(block.name, n, p) for n, p in layer.named_parameters()]
    parent = block.name.rpartition(".")[0]
    if block.name:
        for name, child in model.get_submodule(parent).named_children():
            if child is not layer and name.startswith("relative_position_bias"):
                found += [(_join(parent, name), n, p) for n, p in child.named_parameters()]
    for owner, name, p in found:
        axis = _HEAD_TABLES.get(name.rpartition(".")[2])
        if name == "relative_attention_bias.weight" and block.bias is None:
            axis = 1  # UMT5: each layer's own (buckets, heads) table, not a shared bias
        if axis is not None and p.dim() >= 1 and p.shape[axis] == h:
            block.head_tables.append((_join(owner, name), axis % p.dim()))
    for name, child in layer.named_modules():
        if name.rpartition(".")[2] in _HEAD_OUTPUT_MODULES and isinstance(child, nn.Sequential):
            last = [m for m in child if isinstance(m, nn.Module) and _linear(m)]
            if last and _outputs(last[-1]) == h:
                index = next(i for i, m in enumerate(child) if m is last[-1])
                block.head_outputs.append(_join(block.name, name, str(index)))


def _join(*parts: str) -> str:
    return ".".join(p for p in parts if p)


def _norm_across_heads(module: nn.Module) -> bool:
    """A ``q_norm`` / ``k_norm`` wider than one head (OLMo-2, OLMoE): it normalises all the
    heads' outputs together."""
    d = _attr(module, "head_dim")
    for n in ("q_norm", "k_norm"):
        w = getattr(getattr(module, n, None), "weight", None)
        if d is not None and isinstance(w, torch.Tensor) and w.numel() != d:
            return True
    return False


def _rebuilt_from_config(model: nn.Module, path: str) -> bool:
    """Whether the module holding the layer at ``path`` replaces it by a new one built from
    the model's config at run time: BigBird's ``set_attention_type``, called whenever the
    sequence length changes the attention type (block-sparse or full), keeps the
    projections but takes the head count from the config, which cannot say that one
    layer has fewer heads."""
    parent = path.rpartition(".")[0]
    holder = model.get_submodule(parent) if parent else None
    return holder is not None and callable(getattr(holder, "set_attention_type", None))


def _out_reads_more(model: nn.Module, block: AttentionBlock) -> bool:
    """Whether the output projection reads more than the heads write (``heads ·
    head_dim`` columns): ConvBERT's reads its convolution heads' outputs too, so the
    layer's heads are not all of its input and cutting them would misalign the rest.
    (An output module of no registered weight layout is taken as it is.)"""
    out = model.get_submodule(block.out)
    return _linear(out) and _inputs(out) != block.heads * block.head_dim


def unmatched_attention(model: nn.Module, blocks: Sequence[AttentionBlock]) -> list[str]:
    """The attention layers of ``model`` that no block in ``blocks`` covers: each outermost
    module whose class is named for attention and that holds at least two linear layers
    (of a registered weight layout), outside every block and holding none (T5's decoder
    attention, a family's encoder that rebuilds its attention), as ``'path' (Class)``.

    Example::

        >>> import torch.nn as nn
        >>> class CrossAttention(nn.Module):
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.q, self.kv, self.out = nn.Linear(4, 4), nn.Linear(4, 8), nn.Linear(4, 4)
        >>> unmatched_attention(nn.ModuleDict({"cross": CrossAttention()}), [])
        ["'cross' (CrossAttention)"]
    """
    names = [b.name for b in blocks]

    def covered(path: str) -> bool:
        return any(
            path == n or path.startswith(n + ".") or not path or n.startswith(path + ".")
            for n in names
        )

    out: list[str] = []
    outer: list[str] = []
    for path, module in model.named_modules():
        if "attention" not in type(module).__name__.lower() or covered(path):
            continue
        if any(path.startswith(p + ".") for p in outer):
            continue
        if sum(1 for m in module.modules() if _linear(m)) >= 2:
            outer.append(path)
            out.append(f"'{path}' ({type(module).__name__})")
    return out


def unmatched_reason(model: nn.Module) -> str | None:
    """Why attention layers that look like a known family's were not matched, for the
    message of a refusal (``None`` when nothing is known)."""
    modules = dict(model.named_modules())
    rebuilt = [p for p, m in modules.items() if callable(getattr(m, "set_attention_type", None))]
    if rebuilt:
        path = max(rebuilt, key=lambda p: (p.count("."), len(p)))  # the layer's own holder
        return (
            f"'{path}' ({type(modules[path]).__name__}) rebuilds its self-attention from the "
            "model's config when the sequence length changes its attention type (BigBird's "
            "set_attention_type), so a layer with fewer heads would not survive the next "
            "long or short input"
        )
    for path, module in modules.items():
        for _, finder in _FINDERS:
            block = finder(path, module)
            if block is not None and _out_reads_more(model, block):
                n = _inputs(model.get_submodule(block.out))
                return (
                    f"'{block.out}' reads {n} columns but the {block.heads} heads of "
                    f"'{path}' write {block.heads * block.head_dim}: something besides the "
                    "heads feeds it (ConvBERT's convolution heads), so its heads are not "
                    "cut alone"
                )
        if _norm_across_heads(module):
            return (
                f"'{path}' normalises all its heads' queries or keys together (a q_norm/k_norm "
                "over heads·head_dim, as in OLMo-2 and OLMoE), so removing a head would "
                "change the others"
            )
        if getattr(module, "new_decoder_architecture", False) is True and hasattr(
            module, "query_key_value"
        ):
            return (
                f"'{path}' has Falcon's grouped layout (new_decoder_architecture: the query "
                "heads and one key and value per KV group in one projection), which spectrim "
                "does not cut"
            )
    return None


def _features(module: object, side: int) -> int:
    """Output (``side=0``) or input (``1``) features of a registered weight module
    (Linear: rows / columns; ``Conv1D``: columns / rows)."""
    assert isinstance(module, nn.Module)
    kind = module_kind(module)
    weight = getattr(module, "weight", None)
    assert kind is not None and isinstance(weight, torch.Tensor)
    return int(weight.shape[kind.weight_dims[side]])


def _outputs(module: object) -> int:
    return _features(module, 0)


def _inputs(module: object) -> int:
    return _features(module, 1)


def _linear(m: object) -> bool:
    kind = module_kind(m) if isinstance(m, nn.Module) else None
    return kind is not None and kind.in_size is not None and kind.slice is not None


#: (query, key, value) names under ``attention.self`` and the extra per-head projections
#: (name, role) of each BERT-layout family: BERT/RoBERTa/ELECTRA, and DeBERTa-v2/v3, whose
#: disentangled attention projects relative positions per head (with the layer's query
#: and key under ``share_att_key``, else with ``pos_key_proj`` / ``pos_query_proj``)
_BERT_LAYOUTS = (
    (("query", "key", "value"), ()),
    (("query_proj", "key_proj", "value_proj"), (("pos_key_proj", "k"), ("pos_query_proj", "q"))),
)


@register_attention("bert")
def _bert(path: str, module: nn.Module) -> AttentionBlock | None:
    """HF BERT family and DeBERTa: ``attention.self.{query,key,value}`` (DeBERTa:
    ``…_proj`` and its position projections where present) and ``attention.output.dense``."""
    inner = getattr(module, "self", None)
    out = getattr(getattr(module, "output", None), "dense", None)
    if not isinstance(inner, nn.Module) or not _linear(out):
        return None
    for qkv, extra in _BERT_LAYOUTS:
        if not all(_linear(getattr(inner, r, None)) for r in qkv):
            continue
        d = _attr(inner, "attention_head_size")
        q_out = _outputs(getattr(inner, qkv[0]))
        if d is None or q_out % d:
            return None
        h = q_out // d  # the weights, not the attributes, say how many heads are left
        me = _join(path, "self")
        roles = [*zip(qkv, "qkv", strict=True)]
        roles += [(n, r) for n, r in extra if _linear(getattr(inner, n, None))]
        return AttentionBlock(
            name=path,
            projections=[Projection(_join(me, n), r) for n, r in roles],
            out=_join(path, "output", "dense"),
            heads=h,
            kv_heads=h,
            head_dim=d,
            head_attrs=[(me, "num_attention_heads")],
            width_attrs=[(me, "all_head_size")],
        )
    return None


def _attr(module: nn.Module, *names: str) -> int | None:
    for n in names:
        v = getattr(module, n, None)
        if isinstance(v, int) and not isinstance(v, bool):
            return v
    return None


@register_attention("q_proj")
def _qkv_proj(path: str, module: nn.Module) -> AttentionBlock | None:
    """LLaMA / Mistral / Qwen2 / OPT / Phi: ``q_proj``, ``k_proj``, ``v_proj`` and ``o_proj``,
    ``out_proj``, (Phi) ``dense`` or (ModernBERT's decoder) ``Wo``; grouped-query attention
    from the projections' sizes.
    A ``q_norm`` / ``k_norm`` must be per head (Qwen3): OLMo-2's and OLMoE's normalise all
    the heads' outputs together, so no head can go without changing the others."""
    outs = ("o_proj", "out_proj", "dense", "Wo")
    out_name = next((n for n in outs if _linear(getattr(module, n, None))), None)
    if out_name is None or not all(
        _linear(getattr(module, n, None)) for n in ("q_proj", "k_proj", "v_proj")
    ):
        return None
    d = _attr(module, "head_dim")
    if d is None:
        return None
    q_out = _outputs(module.q_proj)
    k_out = _outputs(module.k_proj)
    if q_out % d or k_out % d:
        return None
    if _norm_across_heads(module):  # not per head (Qwen3's) but over all heads (OLMo-2's)
        return None
    h, kv = q_out // d, k_out // d
    if h % kv:
        return None
    attrs = [
        (path, n) for n in ("num_heads", "num_attention_heads") if _attr(module, n) is not None
    ]
    kv_attrs = [(path, "num_key_value_heads")] if _attr(module, "num_key_value_heads") else []
    groups = [(path, "num_key_value_groups")] if _attr(module, "num_key_value_groups") else []
    # BART-style layers (XGLM) reshape the heads' output to ``embed_dim`` before out_proj:
    # the heads' width, and the model's (q_proj's input) in a layer that already lost
    # heads, as when it is found again on a model being reloaded
    read = _inputs(module.q_proj)
    width = [
        (path, n)
        for n in ("embed_dim", "all_head_size")
        if (e := _attr(module, n)) == h * d or (e == read and e > h * d)
    ]
    return AttentionBlock(
        name=path,
        projections=[Projection(_join(path, f"{r}_proj"), r) for r in ("q", "k", "v")],
        out=_join(path, out_name),
        heads=h,
        kv_heads=kv,
        head_dim=d,
        head_attrs=attrs,
        kv_attrs=kv_attrs,
        group_attrs=groups,
        width_attrs=width,
    )


def _t5_bias(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    """T5's first encoder or decoder layer computes the relative-position bias when given
    none: over the tokens the decoder's cache already holds too, as the layer does."""
    if not getattr(module, "has_relative_attention_bias", False):
        return None
    hidden = args[0] if args else kwargs["hidden_states"]
    n = hidden.shape[1]
    cache = kwargs.get("cache", kwargs.get("past_key_values"))
    if cache is None or not getattr(module, "is_decoder", False):
        return module.compute_bias(n, n, device=hidden.device)  # type: ignore[operator]
    past = cache.get_seq_length(module.layer_idx)
    return module.compute_bias(  # type: ignore[operator]
        n, n + past, device=hidden.device, past_seen_tokens=past
    )


#: T5Attention(hidden_states, mask, key_value_states, position_bias, …) returns
#: ``(output, position_bias, weights)``; MPNetSelfAttention(hidden_states, attention_mask,
#: position_bias, …) is handed the encoder's bias and returns none
_T5_BIAS = HeadBias(index=3, hands_on=1, compute=_t5_bias)
#: T5's cross-attention: its first layer makes zeros for its heads and hands them on
_T5_CROSS = HeadBias(index=3, hands_on=1, zeros=True)
_MPNET_BIAS = HeadBias(index=2)


#: the layers with their query, key, value and output projections in one module: (names,
#: head count, head size and width attributes, shared bias) of T5's encoder attention,
#: MPNet's and ALBERT's
_SEPARATE = (
    ("qkvo", "n_heads", "key_value_proj_dim", "inner_dim", _T5_BIAS),
    ("qkvo", "num_attention_heads", "attention_head_size", "all_head_size", _MPNET_BIAS),
    (("query", "key", "value", "dense"), "num_attention_heads", "attention_head_size",
     "all_head_size", None),
)  # fmt: skip


def _separate(
    path: str, names: Sequence[str], d: int | None, query: object, **fields: Any
) -> AttentionBlock | None:
    """A multi-head layer with separate query, key, value and output projections
    (``names``, under ``path``), ``d`` wide heads; the head count is read off the weight of
    ``query`` (the attributes may not say how many heads are left)."""
    q_out = _outputs(query)
    if d is None or q_out % d:
        return None
    h = q_out // d
    return AttentionBlock(
        name=path,
        projections=[Projection(_join(path, n), r) for n, r in zip(names[:3], "qkv", strict=True)],
        out=_join(path, names[3]),
        heads=h,
        kv_heads=h,
        head_dim=d,
        **fields,
    )


@register_attention("qkvo")
def _qkvo(path: str, module: nn.Module) -> AttentionBlock | None:
    """T5 encoders (``q``, ``k``, ``v``, ``o``; ``n_heads``, ``key_value_proj_dim``,
    ``inner_dim``), MPNet (the same projections; ``num_attention_heads``,
    ``attention_head_size``, ``all_head_size``) and ALBERT (``query``, ``key``, ``value``,
    ``dense``; one layer that every depth runs, so its heads are chosen from all of its
    calls): the four projections in one module.  T5's and MPNet's layers add a
    relative-position bias that every layer shares (:class:`HeadBias`): in T5's decoder
    over the tokens of its cache, and its cross-attention hands on a bias of zeros.
    UMT5's layers each compute their own from a table of their own.  LongT5's local and
    transient-global attention (a bias per block) is not matched, nor a T5 decoder whose
    bias does not say how many tokens its cache holds (transformers before 5)."""
    for names, heads, size, width, bias in _SEPARATE:
        if not all(_linear(getattr(module, n, None)) for n in names):
            continue
        if _attr(module, heads) is None or _attr(module, size) is None:
            continue
        if bias is _T5_BIAS:
            matched, bias = _t5_bias_of(path, module)
            if not matched:
                return None
        return _separate(path, names, _attr(module, size), getattr(module, names[0]),
                         head_attrs=[(path, heads)], width_attrs=[(path, width)],
                         bias=bias)  # fmt: skip
    return None


def _t5_bias_of(path: str, module: nn.Module) -> tuple[bool, HeadBias | None]:
    """Whether a layer with T5's projections is matched, and the bias it shares: none for
    UMT5's (each layer computes its own), zeros handed on for a cross-attention, else the
    bias its stack's first layer computes.  LongT5's block-local bias and a decoder whose
    bias does not take the cache's length are not matched."""
    own_bias = "position_bias" not in inspect.signature(module.forward).parameters
    compute = getattr(module, "compute_bias", None)
    takes = inspect.signature(compute).parameters if callable(compute) else {}
    if callable(compute) and "key_length" not in takes:
        return False, None
    if own_bias:
        return True, None
    if getattr(module, "is_decoder", False) and "past_seen_tokens" not in takes:
        return False, None
    return True, _T5_CROSS if path.rpartition(".")[2] == "EncDecAttention" else _T5_BIAS


@register_attention("distilbert")
def _distilbert(path: str, module: nn.Module) -> AttentionBlock | None:
    """DistilBERT: ``q_lin``, ``k_lin``, ``v_lin``, ``out_lin`` with ``n_heads``."""
    names = ("q_lin", "k_lin", "v_lin", "out_lin")
    if not all(_linear(getattr(module, n, None)) for n in names):
        return None
    return _separate(path, names, _attr(module, "attention_head_size"), module.q_lin,
                     head_attrs=[(path, "n_heads")])  # fmt: skip


def _fused(module: str, heads: int, kv_heads: int, d: int) -> list[Projection]:
    """``[q | k | v]`` along one module's outputs: the query heads, then the KV heads'
    keys and values."""
    return [
        Projection(module, "q"),
        Projection(module, "k", heads * d),
        Projection(module, "v", (heads + kv_heads) * d),
    ]


def _interleaved(module: str, d: int) -> list[Projection]:
    """``[q₀ k₀ v₀ q₁ k₁ v₁ …]``: the three roles interleaved head by head
    (``view(…, heads, 3·d)``)."""
    return [Projection(module, r, i * d, 3 * d) for i, r in enumerate("qkv")]


def _query_key_value(
    module: str, width: int, d: int, multi_query: bool
) -> tuple[int, int, list[Projection]] | None:
    """``(heads, kv_heads, projections)`` of a fused projection ``width`` rows wide that is
    ``[q | k | v]`` with one KV head (``multi_query``) or interleaved head by head
    (GPTBigCode, Falcon); ``None`` if the width fits neither."""
    if width % d:
        return None
    rows = width // d
    if multi_query:
        return (rows - 2, 1, _fused(module, rows - 2, 1, d)) if rows >= 3 else None
    return (rows // 3, rows // 3, _interleaved(module, d)) if rows % 3 == 0 else None


@register_attention("gpt_bigcode")
def _gpt_bigcode(path: str, module: nn.Module) -> AttentionBlock | None:
    """GPTBigCode (SantaCoder, StarCoder): a fused ``c_attn`` Linear and ``c_proj``.  With
    ``multi_query`` it is ``[q | k | v]`` with one KV head (the units are query heads);
    without, the heads are interleaved, ``[q₀ k₀ v₀ q₁ k₁ v₁ …]``
    (``view(…, heads, 3·head_dim)``)."""
    c_attn, c_proj = getattr(module, "c_attn", None), getattr(module, "c_proj", None)
    multi_query = getattr(module, "multi_query", None)
    if not isinstance(multi_query, bool) or not _linear(c_attn) or not _linear(c_proj):
        return None
    if getattr(module, "q_attn", None) is not None or getattr(module, "is_cross_attention", False):
        return None
    d = _attr(module, "head_dim")
    if d is None:
        return None
    found = _query_key_value(_join(path, "c_attn"), _outputs(c_attn), d, multi_query)
    if found is None:
        return None
    h, kv, projections = found
    return AttentionBlock(
        name=path,
        projections=projections,
        out=_join(path, "c_proj"),
        heads=h,
        kv_heads=kv,
        head_dim=d,
        head_attrs=[(path, "num_heads")],
        kv_attrs=[(path, "kv_heads")],
        width_attrs=[(path, "embed_dim"), (path, "split_size")],
        group_attrs=[(path, "num_key_value_groups")],
    )


@register_attention("phi3")
def _phi3(path: str, module: nn.Module) -> AttentionBlock | None:
    """Phi-3: a fused ``qkv_proj`` Linear, ``[q | k | v]`` with grouped-query attention, cut
    at ``config.num_attention_heads·head_dim`` (the layer is given its own copy of the
    config with its count), and ``o_proj``."""
    qkv, out = getattr(module, "qkv_proj", None), getattr(module, "o_proj", None)
    config = getattr(module, "config", None)
    if not _linear(qkv) or not _linear(out) or config is None:
        return None
    d = _attr(module, "head_dim")
    if d is None or _attr(config, "num_attention_heads") is None:
        return None
    assert isinstance(out, nn.Module)
    kind = module_kind(out)
    weight = out.weight
    assert kind is not None and isinstance(weight, torch.Tensor)
    q_width = int(weight.shape[kind.weight_dims[1]])  # the heads' outputs it reads
    rest = _outputs(qkv) - q_width
    if q_width % d or rest <= 0 or rest % (2 * d):
        return None
    h, kv = q_width // d, rest // (2 * d)
    if h % kv:
        return None
    return AttentionBlock(
        name=path,
        projections=_fused(_join(path, "qkv_proj"), h, kv, d),
        out=_join(path, "o_proj"),
        heads=h,
        kv_heads=kv,
        head_dim=d,
        head_attrs=[(path, "config.num_attention_heads")],
        kv_attrs=[(path, "num_key_value_heads")],
        group_attrs=[(path, "num_key_value_groups")],
    )


#: FalconAttention(hidden_states, attention_mask, …) with ALiBi: the model adds every
#: head's slopes into the mask, ``(batch, heads, queries, keys)``
_FALCON_ALIBI = HeadBias(index=1, name="attention_mask")


@register_attention("falcon")
def _falcon(path: str, module: nn.Module) -> AttentionBlock | None:
    """Falcon: a fused ``query_key_value`` and ``dense``; with ``multi_query`` (Falcon-7B)
    ``[q | k | v]`` with one KV head, without it the heads interleaved ``[q₀ k₀ v₀ …]``.
    With ALiBi (Falcon-RW) the model adds the slopes of all its heads into the mask every
    layer gets (:class:`HeadBias`).  Not matched: the grouped layout of
    ``new_decoder_architecture`` (Falcon-40B/180B)."""
    qkv, dense = getattr(module, "query_key_value", None), getattr(module, "dense", None)
    config = getattr(module, "config", None)
    multi_query = getattr(module, "multi_query", None)
    if not isinstance(multi_query, bool) or not _linear(qkv) or not _linear(dense):
        return None
    alibi = getattr(config, "alibi", None)
    if getattr(module, "new_decoder_architecture", True) or not isinstance(alibi, bool):
        return None
    d = _attr(module, "head_dim")
    if d is None:
        return None
    found = _query_key_value(_join(path, "query_key_value"), _outputs(qkv), d, multi_query)
    if found is None:
        return None
    h, kv, projections = found
    return AttentionBlock(
        name=path,
        projections=projections,
        out=_join(path, "dense"),
        heads=h,
        kv_heads=kv,
        head_dim=d,
        head_attrs=[(path, "num_heads")],
        kv_attrs=[(path, "num_kv_heads")],
        group_attrs=[(path, "num_key_value_groups")],
        bias=_FALCON_ALIBI if alibi else None,
    )


@register_attention("codegen")
def _codegen(path: str, module: nn.Module) -> AttentionBlock | None:
    """CodeGen: a fused ``qkv_proj`` viewed as ``mp_num`` parts of ``[q_g | v_g | k_g]``
    (each ``embed_dim / mp_num`` wide, the heads of that part), and ``out_proj``; a head
    goes from every part at once (:attr:`AttentionBlock.blocks`)."""
    qkv, out = getattr(module, "qkv_proj", None), getattr(module, "out_proj", None)
    parts = _attr(module, "mp_num")
    d = _attr(module, "head_dim")
    if not _linear(qkv) or not _linear(out) or parts is None or d is None:
        return None
    width = _outputs(qkv)
    if width % (3 * d) or (width // (3 * d)) % parts:
        return None
    h = width // (3 * d)
    me = _join(path, "qkv_proj")
    return AttentionBlock(
        name=path,
        projections=[Projection(me, r, part=i) for i, r in enumerate("qvk")],
        out=_join(path, "out_proj"),
        heads=h,
        kv_heads=h,
        head_dim=d,
        head_attrs=[(path, "num_attention_heads")],
        width_attrs=[(path, "embed_dim")],
        blocks=parts,
    )


#: BloomAttention(hidden_states, residual, alibi, …): the model's ALiBi slopes for every
#: head, flattened with the batch
_BLOOM_ALIBI = HeadBias(index=2, name="alibi", flat=True)

#: the fused ``query_key_value`` layouts with interleaved heads: (head size attribute,
#: head count attributes, shared bias) of GPT-NeoX and of BLOOM
_INTERLEAVED = (("head_size", (), None), ("head_dim", ("num_heads",), _BLOOM_ALIBI))


@register_attention("gpt_neox")
def _gpt_neox(path: str, module: nn.Module) -> AttentionBlock | None:
    """GPT-NeoX (Pythia) and BLOOM: a fused ``query_key_value`` Linear with its heads
    interleaved (``view(…, heads, 3·head_size)`` then ``chunk(3)``; BLOOM's
    ``view(…, heads, 3, head_dim)``) and ``dense``; BLOOM's ALiBi slopes are built once
    for all the model's heads (:class:`HeadBias`).  Not matched: Falcon's layouts its own
    finder leaves (``multi_query`` marks them), and BLOOM's ``pretraining_tp > 1`` with
    ``slow_but_exact`` (its output projection is cut at the original width)."""
    qkv, dense = getattr(module, "query_key_value", None), getattr(module, "dense", None)
    if not _linear(qkv) or not _linear(dense) or hasattr(module, "multi_query"):
        return None
    if getattr(module, "pretraining_tp", 1) > 1 and getattr(module, "slow_but_exact", False):
        return None
    for size, counts, bias in _INTERLEAVED:
        d = _attr(module, size)
        if d is None:
            continue
        if _outputs(qkv) % (3 * d):
            return None
        h = _outputs(qkv) // (3 * d)
        return AttentionBlock(
            name=path,
            projections=_interleaved(_join(path, "query_key_value"), d),
            out=_join(path, "dense"),
            heads=h,
            kv_heads=h,
            head_dim=d,
            head_attrs=[(path, c) for c in counts],
            bias=bias,
        )
    return None


@register_attention("gpt2")
def _gpt2(path: str, module: nn.Module) -> AttentionBlock | None:
    """GPT-2: fused ``c_attn`` (``Conv1D``, ``[q | k | v]`` along its outputs) and ``c_proj``,
    ``split_size`` the width of each part.  Its cross-attention (a decoder of an
    encoder-decoder, ``add_cross_attention``) has the queries in ``q_attn`` and ``[k | v]``
    of the encoder's states in ``c_attn``."""
    c_attn, c_proj = getattr(module, "c_attn", None), getattr(module, "c_proj", None)
    if not _linear(c_attn) or not _linear(c_proj):
        return None
    if hasattr(module, "multi_query"):  # GPTBigCode: another layout (above)
        return None
    d, n = _attr(module, "head_dim"), _attr(module, "n_head")  # OpenAI GPT: n_head alone
    split = _attr(module, "split_size")
    if d is None and n and split and split % n == 0:
        d = split // n
    if d is None:
        return None
    heads = [(path, a) for a in ("num_heads", "n_head") if _attr(module, a)]
    q_attn = getattr(module, "q_attn", None)
    if q_attn is None:
        return _thirds(path, module, "c_attn", "c_proj", d, heads, [(path, "split_size")])
    h = _outputs(q_attn) // d if _linear(q_attn) else 0
    if not h or _outputs(q_attn) != h * d or _outputs(c_attn) != 2 * h * d:
        return None
    kv = _join(path, "c_attn")
    return AttentionBlock(
        name=path,
        projections=[Projection(_join(path, "q_attn"), "q"), Projection(kv, "k"),
                     Projection(kv, "v", h * d)],
        out=_join(path, "c_proj"),
        heads=h,
        kv_heads=h,
        head_dim=d,
        head_attrs=heads,
        width_attrs=[(path, "split_size")],
    )  # fmt: skip


def _thirds(
    path: str,
    module: nn.Module,
    qkv: str,
    out: str,
    d: int,
    head_attrs: list[tuple[str, str]] | None = None,
    width_attrs: list[tuple[str, str]] | None = None,
) -> AttentionBlock | None:
    """The layer at ``path`` whose fused ``qkv`` is ``[q | k | v]`` along its outputs,
    ``d`` values per head, read by ``out`` (``None`` when its width is no multiple of
    ``3·d``)."""
    width = _outputs(getattr(module, qkv))
    if width % (3 * d):
        return None
    h = width // (3 * d)
    return AttentionBlock(
        name=path,
        projections=_fused(_join(path, qkv), h, h, d),
        out=_join(path, out),
        heads=h,
        kv_heads=h,
        head_dim=d,
        head_attrs=head_attrs or [],
        width_attrs=width_attrs or [],
    )


@register_attention("modernbert")
def _modernbert(path: str, module: nn.Module) -> AttentionBlock | None:
    """ModernBERT: a fused ``Wqkv`` Linear, viewed as ``(…, 3, heads, head_dim)`` (so
    ``[q | k | v]`` along its outputs; the head count is the view's ``-1``), and ``Wo``."""
    qkv, out = getattr(module, "Wqkv", None), getattr(module, "Wo", None)
    d = _attr(module, "head_dim")
    if not _linear(qkv) or not _linear(out) or d is None:
        return None
    return _thirds(path, module, "Wqkv", "Wo", d)


#: MptAttention(hidden_states, position_bias, …): the model's ALiBi slopes for every head,
#: ``(heads, 1, keys)``
_MPT_ALIBI = HeadBias(index=1, axis=0)


@register_attention("mpt")
def _mpt(path: str, module: nn.Module) -> AttentionBlock | None:
    """MPT: a fused ``Wqkv`` Linear (``chunk(3)``: ``[q | k | v]``), ``out_proj`` and
    ``n_heads``, with the model's ALiBi bias for every head handed to each layer."""
    qkv, out = getattr(module, "Wqkv", None), getattr(module, "out_proj", None)
    d = _attr(module, "head_dim")
    if not _linear(qkv) or not _linear(out) or d is None or _attr(module, "n_heads") is None:
        return None
    block = _thirds(path, module, "Wqkv", "out_proj", d, [(path, "n_heads")])
    return dataclasses.replace(block, bias=_MPT_ALIBI) if block is not None else None


@register_attention("timm")
def _timm(path: str, module: nn.Module) -> AttentionBlock | None:
    """timm's ``Attention`` (ViT, DeiT, ...): fused ``qkv`` Linear (``[q | k | v]`` along
    its outputs) and ``proj``, ``attn_dim = num_heads·head_dim``.  Variants with a norm
    over ``attn_dim`` (``scale_norm``) or a per-channel ``gate`` are not recognised."""
    qkv, proj = getattr(module, "qkv", None), getattr(module, "proj", None)
    if not isinstance(qkv, nn.Linear) or not _linear(proj) or _attr(module, "attn_dim") is None:
        return None
    d = _attr(module, "head_dim")
    if d is None or _attr(module, "num_heads") is None:
        return None
    if getattr(module, "gate", None) is not None:
        return None
    if not isinstance(getattr(module, "norm", nn.Identity()), nn.Identity):
        return None
    return _thirds(path, module, "qkv", "proj", d, [(path, "num_heads")], [(path, "attn_dim")])


@register_attention("timm-window")
def _timm_window(path: str, module: nn.Module) -> AttentionBlock | None:
    """timm's Swin ``WindowAttention``: fused ``qkv`` and ``proj`` like ``Attention``, the
    head count in ``num_heads`` alone (the head size follows from ``qkv``), and a
    relative-position bias table with one column per head (cut with its heads).  The
    table's columns say how many heads are left (a reloaded layer's ``num_heads`` is the
    fresh model's until :meth:`AttentionBlock.sync`)."""
    qkv, proj = getattr(module, "qkv", None), getattr(module, "proj", None)
    table = getattr(module, "relative_position_bias_table", None)
    if not isinstance(qkv, nn.Linear) or not _linear(proj) or _attr(module, "num_heads") is None:
        return None
    if not isinstance(table, torch.Tensor) or table.dim() != 2:
        return None
    h = int(table.shape[-1])
    if _attr(module, "attn_dim", "head_dim") is not None or _outputs(qkv) % (3 * h):
        return None  # timm's other layouts: not this finder's
    return AttentionBlock(
        name=path,
        projections=_fused(_join(path, "qkv"), h, h, _outputs(qkv) // (3 * h)),
        out=_join(path, "proj"),
        heads=h,
        kv_heads=h,
        head_dim=_outputs(qkv) // (3 * h),
        head_attrs=[(path, "num_heads")],
    )


@register_swap_class
class HeadAttention(nn.Module):
    """``nn.MultiheadAttention``'s computation with its head count free of ``embed_dim``.

    ``nn.MultiheadAttention`` derives ``head_dim = embed_dim // num_heads`` in its
    functional forward, so it cannot run with fewer heads.  This module holds the same
    weights as a fused ``in_proj`` Linear (``[q | k | v]``, ``3·heads·head_dim`` outputs) and
    ``out_proj``, takes the same call (``query, key, value, key_padding_mask,
    need_weights, attn_mask, average_attn_weights, is_causal``; ``batch_first`` or not;
    unbatched inputs) and returns the same ``(output, weights or None)``.
    :func:`prepare_attention` puts it in place of each ``nn.MultiheadAttention`` it can
    (exactly: tested against the original), before heads are removed.

    Example::

        >>> mha = nn.MultiheadAttention(8, 2, batch_first=True).eval()
        >>> ours = HeadAttention.from_mha(mha).eval()
        >>> x = torch.randn(3, 5, 8)
        >>> bool(torch.allclose(ours(x, x, x)[0], mha(x, x, x)[0], atol=1e-6))
        True
    """

    def __init__(
        self,
        embed_dim: int,
        num_heads: int,
        head_dim: int,
        bias: bool = True,
        batch_first: bool = False,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        self.embed_dim, self.num_heads, self.head_dim = embed_dim, num_heads, head_dim
        self.batch_first, self.dropout = batch_first, float(dropout)
        self.in_proj = nn.Linear(embed_dim, 3 * num_heads * head_dim, bias=bias)
        self.out_proj = nn.Linear(num_heads * head_dim, embed_dim, bias=bias)

    @classmethod
    def from_mha(cls, mha: nn.MultiheadAttention) -> HeadAttention:
        """The same attention as ``mha`` (self-attention weights: ``kdim = vdim =
        embed_dim``, no ``bias_k``/``bias_v``, no ``add_zero_attn``)."""
        if not mha._qkv_same_embed_dim or mha.bias_k is not None or mha.add_zero_attn:
            raise ValueError("only nn.MultiheadAttention with kdim = vdim = embed_dim, "
                             "no bias_k/bias_v and no add_zero_attn is supported")  # fmt: skip
        w = mha.in_proj_weight
        assert w is not None
        new = cls(mha.embed_dim, mha.num_heads, mha.head_dim, mha.in_proj_bias is not None,
                  mha.batch_first, mha.dropout)  # fmt: skip
        new.to(device=w.device, dtype=w.dtype)
        with torch.no_grad():
            new.in_proj.weight.copy_(w)
            new.out_proj.weight.copy_(mha.out_proj.weight)
            if mha.in_proj_bias is not None:
                new.in_proj.bias.copy_(mha.in_proj_bias)
            if mha.out_proj.bias is not None and new.out_proj.bias is not None:
                new.out_proj.bias.copy_(mha.out_proj.bias)
        return new.train(mha.training)

    def spectrim_kwargs(self) -> dict[str, int | bool | float]:
        """Constructor arguments (recorded in a saved manifest)."""
        return {"embed_dim": self.embed_dim, "num_heads": self.num_heads,
                "head_dim": self.head_dim, "bias": self.in_proj.bias is not None,
                "batch_first": self.batch_first, "dropout": self.dropout}  # fmt: skip

    def _mask(
        self,
        attn_mask: torch.Tensor | None,
        key_padding_mask: torch.Tensor | None,
        n: int,
        q_len: int,
        k_len: int,
        dtype: torch.dtype,
    ) -> torch.Tensor | None:
        """One additive float mask ``(n, heads, q_len, k_len)`` (``True`` in a boolean
        mask means *not allowed*, as in ``nn.MultiheadAttention``)."""

        def additive(m: torch.Tensor) -> torch.Tensor:
            if m.dtype == torch.bool:
                return torch.zeros(m.shape, dtype=dtype, device=m.device).masked_fill(
                    m, float("-inf")
                )
            return m.to(dtype)

        out = None
        if attn_mask is not None:
            m = additive(attn_mask)
            m = (
                m.view(n, self.num_heads, q_len, k_len)
                if m.dim() == 3
                else m.view(1, 1, q_len, k_len)
            )
            out = m
        if key_padding_mask is not None:
            p = additive(key_padding_mask).view(n, 1, 1, k_len)
            out = p if out is None else out + p
        return out

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        key_padding_mask: torch.Tensor | None = None,
        need_weights: bool = True,
        attn_mask: torch.Tensor | None = None,
        average_attn_weights: bool = True,
        is_causal: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        unbatched = query.dim() == 2
        if unbatched:
            query, key, value = (
                t.unsqueeze(1 if not self.batch_first else 0) for t in (query, key, value)
            )
            if key_padding_mask is not None:
                key_padding_mask = key_padding_mask.unsqueeze(0)
        if not self.batch_first:
            query, key, value = (t.transpose(0, 1) for t in (query, key, value))
        h, d = self.num_heads, self.head_dim
        w = h * d
        if query is key and key is value:  # self-attention: one call of the fused projection
            q, k, v = self.in_proj(query).split(w, dim=-1)
        else:
            W, b = self.in_proj.weight, self.in_proj.bias
            q, k, v = (
                nn.functional.linear(
                    t, W[i * w : (i + 1) * w], None if b is None else b[i * w : (i + 1) * w]
                )
                for i, t in enumerate((query, key, value))
            )
        n, lq, lk = q.shape[0], q.shape[1], k.shape[1]
        q, k, v = (t.reshape(n, -1, h, d).transpose(1, 2) for t in (q, k, v))
        mask = self._mask(attn_mask, key_padding_mask, n, lq, lk, q.dtype)
        p = self.dropout if self.training else 0.0
        weights = None
        if need_weights:
            scores = (q @ k.transpose(-2, -1)) / math.sqrt(d)
            if is_causal and mask is None:
                causal = torch.ones(lq, lk, dtype=torch.bool, device=q.device).triu(1)
                scores = scores.masked_fill(causal, float("-inf"))
            if mask is not None:
                scores = scores + mask
            attn = scores.softmax(-1)
            weights = attn.mean(1) if average_attn_weights else attn
            out = nn.functional.dropout(attn, p) @ v
        else:
            out = nn.functional.scaled_dot_product_attention(
                q, k, v, attn_mask=mask, dropout_p=p, is_causal=is_causal and mask is None
            )
        out = self.out_proj(out.transpose(1, 2).reshape(n, lq, w))
        if not self.batch_first:
            out = out.transpose(0, 1)
        if unbatched:
            out = out.squeeze(1 if not self.batch_first else 0)
            weights = None if weights is None else weights.squeeze(0)
        return out, weights


_FAST_PATH_PARENTS = (nn.TransformerEncoderLayer, nn.TransformerDecoderLayer)


def prepare_attention(model: nn.Module) -> list[str]:
    """Put a :class:`HeadAttention` in place of every ``nn.MultiheadAttention`` of
    ``model`` it can stand for (in place; the model computes the same).  Skipped: those
    :meth:`HeadAttention.from_mha` refuses and those of ``nn.TransformerEncoderLayer`` /
    ``DecoderLayer``, whose fast path reads the attention's internals.  Returns the paths
    replaced."""
    done = []
    for path, module in list(model.named_modules()):
        for name, child in list(module.named_children()):
            if not isinstance(child, nn.MultiheadAttention) or isinstance(
                module, _FAST_PATH_PARENTS
            ):
                continue
            try:
                new = HeadAttention.from_mha(child)
            except ValueError:
                continue
            setattr(module, name, new)
            done.append(_join(path, name))
    return done


@register_attention("head-attention")
def _head_attention(path: str, module: nn.Module) -> AttentionBlock | None:
    """spectrim's :class:`HeadAttention` (an ``nn.MultiheadAttention`` after
    :func:`prepare_attention`)."""
    if not isinstance(module, HeadAttention):
        return None
    d = module.head_dim
    h = _outputs(module.in_proj) // (3 * d)
    return AttentionBlock(
        name=path,
        projections=_fused(_join(path, "in_proj"), h, h, d),
        out=_join(path, "out_proj"),
        heads=h,
        kv_heads=h,
        head_dim=d,
        head_attrs=[(path, "num_heads")],
    )
