"""Count multiply-accumulates (MACs) and parameters of a PyTorch model.

This is the one MAC counter of spectrim; every report of model cost goes through it.

Convention
----------
One MAC is one multiply-accumulate (``a += w * x``); FLOPs are usually quoted as
``2 × MACs``. Only tensor products are counted:

* ``nn.Conv1d/2d/3d``: ``C_out · prod(output spatial size) · (C_in / groups) · prod(kernel)``.
* ``nn.ConvTranspose1d/2d/3d``: ``C_in · prod(input spatial size) · (C_out / groups) · prod(kernel)``
  (every input element is multiplied by one kernel slice per output channel of its group).
* ``nn.Linear``: ``in_features · out_features`` per output row, so a ``(B, T, H)`` input counts
  ``T`` rows per example.
* Tensor products called as functions, outside the modules above: ``torch.matmul`` / ``@`` /
  ``mm`` / ``bmm`` / ``addmm`` / ``baddbmm`` / ``addbmm`` / ``mv`` / ``dot`` / ``F.linear`` /
  ``torch.einsum`` / functional ``F.conv*``: ``(output elements) · (contracted length)``; and
  ``F.scaled_dot_product_attention``: ``QKᵀ`` plus ``AV``, i.e.
  ``prod(q.shape[:-1]) · S · (E_qk + E_v)`` whatever backend runs it.
  ``nn.MultiheadAttention`` and ``nn.TransformerEncoderLayer`` are counted through these (their
  fused inference fast path is switched off while counting, so that they run op by op).

Not counted: biases, batch/layer norm, activations, softmax, pooling, element-wise additions and
multiplications, embeddings (lookups), interpolation, and recurrent layers (``nn.LSTM``/``GRU``/
``RNN`` run as opaque kernels and count 0).

Counts are **per single example**: the model is run once on ``example_inputs`` and the totals are
divided by the batch size, read as the first dimension of the first tensor in ``example_inputs``
(for a dict, the first tensor value, e.g. ``input_ids``). A model that does not take the batch in
the first dimension must be given a batch of one. Per-module counts are divided (and rounded) the
same way.

How it works
------------
``nn.Conv*``, ``nn.ConvTranspose*`` and ``nn.Linear`` modules (and subclasses that keep the stock
``forward``) are counted by forward hooks from their weight and output/input shapes. Every other
tensor product is counted at the ATen level by a :class:`~torch.utils._python_dispatch.TorchDispatchMode`,
which sees the kernels that ``torch.matmul``, ``@``, ``F.linear``, ``einsum``,
``F.scaled_dot_product_attention`` and friends actually run, including those called from inside
Python-level functions such as ``F.multi_head_attention_forward`` (a ``TorchFunctionMode`` only
sees the outermost overridable call there and would miss them). Function-level counting is
suppressed while a hook-counted module runs, so the ``F.linear``/``F.conv2d`` inside
``nn.Linear``/``nn.Conv2d`` are not counted twice. A custom module with its own ``forward`` is not
hook-counted; the kernels it calls are counted instead.

The model runs under ``torch.no_grad()`` in eval mode; every submodule's ``training`` flag is
restored afterwards and the model is not modified (the hooks are removed).

Example::

    >>> import torch
    >>> from torch import nn
    >>> from spectrim.evaluation.flops import count_macs, count_params
    >>> conv = nn.Conv2d(3, 8, kernel_size=3, padding=1)
    >>> count_macs(conv, torch.randn(2, 3, 16, 16))  # 8·16·16 · 3·3·3 per example
    55296
    >>> count_params(conv)
    224
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from spectrim.evaluation._common import (
    batch_size_of,
    call_model,
    check_inputs,
    eval_mode,
    model_device,
    to_device,
)

__all__ = ["ModelCost", "count_macs", "count_params", "hook_counted", "profile"]

# --------------------------------------------------------------------------------------------
# Result type
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelCost:
    """Cost of one forward pass on a single example.

    Attributes:
        macs: multiply-accumulates per example (see the module docstring for the convention).
        params: number of unique parameters (shared tensors counted once).
        per_module: MACs per example attributed to the module that directly performed them, by
            qualified name (``""`` is the root module). Only modules with non-zero MACs appear;
            a module called several times accumulates. The values sum to ``macs`` up to
            per-entry rounding when the batch size does not divide a count.

    Example::

        >>> cost = profile(nn.Sequential(nn.Linear(4, 3), nn.ReLU()), torch.randn(1, 4))
        >>> cost.macs, cost.params, cost.per_module
        (12, 15, {'0': 12})
    """

    macs: int
    params: int
    per_module: dict[str, int] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable view of the cost."""
        return {"macs": self.macs, "params": self.params, "per_module": dict(self.per_module)}


# --------------------------------------------------------------------------------------------
# Parameters
# --------------------------------------------------------------------------------------------


def count_params(model: nn.Module) -> int:
    """Number of unique parameters of *model* (a parameter shared by several modules counts once).

    Buffers (e.g. batch-norm running statistics) are not parameters and are not counted.

    Example::

        >>> count_params(nn.Linear(10, 5))
        55
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"count_params expects an nn.Module, got {type(model).__name__!r}")
    total = 0
    seen: set[int] = set()
    for name, param in model.named_parameters(remove_duplicate=False):
        if id(param) in seen:
            continue
        seen.add(id(param))
        if isinstance(param, nn.parameter.UninitializedParameter):
            raise ValueError(
                f"parameter {name!r} is uninitialized (lazy module); run the model once first"
            )
        total += param.numel()
    return total


# --------------------------------------------------------------------------------------------
# MACs of ATen kernels (function-level tensor products)
# --------------------------------------------------------------------------------------------

_OpCounter = Callable[[tuple[Any, ...], dict[str, Any], Any], int]


def _last(t: torch.Tensor) -> int:
    return int(t.shape[-1]) if t.dim() > 0 else 1


def _macs_mm(args: tuple[Any, ...], kwargs: dict[str, Any], out: Any) -> int:
    # mm(a, b), bmm(a, b), mv(a, v): every output element is a dot product of length a.shape[-1]
    return int(out.numel()) * _last(args[0])


def _macs_add_mm(args: tuple[Any, ...], kwargs: dict[str, Any], out: Any) -> int:
    # addmm(c, a, b), baddbmm(c, a, b), addmv(c, a, v), _addmm_activation(c, a, b)
    return int(out.numel()) * _last(args[1])


def _macs_addbmm(args: tuple[Any, ...], kwargs: dict[str, Any], out: Any) -> int:
    # addbmm(c, b1, b2) = c + sum_i b1[i] @ b2[i]
    batch1 = args[1]
    return int(batch1.shape[0]) * int(out.numel()) * _last(batch1)


def _macs_dot(args: tuple[Any, ...], kwargs: dict[str, Any], out: Any) -> int:
    return int(args[0].numel())


def _macs_convolution(args: tuple[Any, ...], kwargs: dict[str, Any], out: Any) -> int:
    # convolution(input, weight, bias, stride, padding, dilation, transposed, output_padding, groups)
    inp, weight = args[0], args[1]
    transposed = bool(args[6]) if len(args) > 6 else bool(kwargs.get("transposed", False))
    per_element = int(weight.shape[1]) * math.prod(int(s) for s in weight.shape[2:])
    return (int(inp.numel()) if transposed else int(out.numel())) * per_element


def _macs_sdpa(args: tuple[Any, ...], kwargs: dict[str, Any], out: Any) -> int:
    # (query, key, value, ...) with shapes (..., L, E), (..., S, E), (..., S, Ev)
    query, key, value = args[0], args[1], args[2]
    rows = int(query.numel()) // max(_last(query), 1)  # prod(query.shape[:-1])
    keys = int(key.shape[-2])
    return rows * keys * (_last(query) + _last(value))


def _macs_native_mha(args: tuple[Any, ...], kwargs: dict[str, Any], out: Any) -> int:
    # _native_multi_head_attention(query, key, value, embed_dim, ...) (inference fast path)
    query, key, value, embed_dim = args[0], args[1], args[2], int(args[3])
    keys = int(key.shape[-2])
    projections = (2 * int(query.numel()) + int(key.numel()) + int(value.numel())) * embed_dim
    attention = 2 * int(query.numel()) * keys  # QKᵀ and AV summed over heads
    return projections + attention


def _macs_grouped_mm(args: tuple[Any, ...], kwargs: dict[str, Any], out: Any) -> int:
    # _grouped_mm(a, b, offs, ...): one product per group, e.g. a MoE layer's experts
    # (a: tokens × K sorted by expert, b: experts × K × N, out: tokens × N). Each output
    # element sums K products, except when the groups split K itself (a, b both 2-D,
    # out: groups × M × N), where each group sums only its share of K.
    a, b = args[0], args[1]
    if a.dim() == 2 and b.dim() == 2:
        return int(a.shape[0]) * int(b.shape[1]) * _last(a)
    return int(out.numel()) * _last(a)


def _build_op_table() -> dict[Any, _OpCounter]:
    aten = torch.ops.aten
    table: dict[Any, _OpCounter] = {}
    groups: list[tuple[_OpCounter, tuple[str, ...]]] = [
        (_macs_mm, ("mm", "bmm", "mv", "matmul")),
        (_macs_add_mm, ("addmm", "baddbmm", "addmv", "_addmm_activation")),
        (_macs_addbmm, ("addbmm",)),
        (_macs_dot, ("dot", "vdot")),
        (_macs_convolution, ("convolution", "_convolution")),
        (
            _macs_sdpa,
            (
                "_scaled_dot_product_flash_attention",
                "_scaled_dot_product_flash_attention_for_cpu",
                "_scaled_dot_product_efficient_attention",
                "_scaled_dot_product_cudnn_attention",
                "_scaled_dot_product_fused_attention_overrideable",
            ),
        ),
        (_macs_native_mha, ("_native_multi_head_attention",)),
        (_macs_grouped_mm, ("_grouped_mm",)),
    ]
    for counter, names in groups:
        for name in names:
            packet = getattr(aten, name, None)
            if packet is not None:
                table[packet] = counter
    # ``linear``/``matmul`` are composite and normally decompose before a dispatch mode sees
    # them; if a backend does dispatch them whole, the weight of F.linear is (out, in).
    linear = getattr(aten, "linear", None)
    if linear is not None:
        table[linear] = _macs_linear_op
    return table


def _macs_linear_op(args: tuple[Any, ...], kwargs: dict[str, Any], out: Any) -> int:
    return int(out.numel()) * _last(args[1])


_OP_TABLE: dict[Any, _OpCounter] = _build_op_table()

# --------------------------------------------------------------------------------------------
# MACs of hook-counted modules
# --------------------------------------------------------------------------------------------

_CONV_FORWARDS = {nn.Conv1d.forward, nn.Conv2d.forward, nn.Conv3d.forward}
_CONV_TRANSPOSE_FORWARDS = {
    nn.ConvTranspose1d.forward,
    nn.ConvTranspose2d.forward,
    nn.ConvTranspose3d.forward,
}


def hook_counted(module: nn.Module) -> bool:
    """Whether :func:`profile` counts ``module``'s MACs by a formula on its hook (a
    built-in Linear/conv forward) rather than through the kernels it calls.

    Example::

        >>> hook_counted(nn.Linear(2, 2)), hook_counted(nn.MultiheadAttention(4, 2))
        (True, False)
    """
    return _module_counter(module) is not None


def _module_counter(module: nn.Module) -> Callable[[tuple[Any, ...], Any], int] | None:
    """MAC formula for a hook-counted module, or ``None`` if it is counted through its kernels."""
    forward = type(module).forward
    weight = getattr(module, "weight", None)
    if isinstance(module, nn.Linear) and forward is nn.Linear.forward:

        def linear(args: tuple[Any, ...], out: Any) -> int:
            return int(out.numel()) * int(module.weight.shape[1])

        return linear
    if isinstance(weight, torch.Tensor) and forward in _CONV_FORWARDS:

        def conv(args: tuple[Any, ...], out: Any) -> int:
            w = module.weight
            assert isinstance(w, torch.Tensor)
            return int(out.numel()) * int(w.shape[1]) * math.prod(int(s) for s in w.shape[2:])

        return conv
    if isinstance(weight, torch.Tensor) and forward in _CONV_TRANSPOSE_FORWARDS:

        def conv_transpose(args: tuple[Any, ...], out: Any) -> int:
            w = module.weight
            assert isinstance(w, torch.Tensor)
            return int(args[0].numel()) * int(w.shape[1]) * math.prod(int(s) for s in w.shape[2:])

        return conv_transpose
    return None


# --------------------------------------------------------------------------------------------
# Counting machinery
# --------------------------------------------------------------------------------------------


class _Tally:
    """Mutable counting state shared by the hooks and the dispatch mode."""

    def __init__(self) -> None:
        self.stack: list[str] = []
        self.suppress = 0
        self.per_module: defaultdict[str, int] = defaultdict(int)

    def add(self, macs: int, name: str | None = None) -> None:
        if macs:
            owner = name if name is not None else (self.stack[-1] if self.stack else "")
            self.per_module[owner] += macs


class _KernelCounter(TorchDispatchMode):
    """Counts tensor-product kernels run outside hook-counted modules."""

    def __init__(self, tally: _Tally) -> None:
        super().__init__()
        self.tally = tally

    def __torch_dispatch__(
        self,
        func: Any,
        types: Any,
        args: tuple[Any, ...] = (),
        kwargs: dict[str, Any] | None = None,
    ) -> Any:
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if self.tally.suppress == 0:
            counter = _OP_TABLE.get(func.overloadpacket)
            if counter is not None:
                self.tally.add(counter(args, kwargs, out))
        return out


@contextmanager
def _hooks(model: nn.Module, tally: _Tally) -> Iterator[None]:
    handles: list[Any] = []

    def attach(name: str, module: nn.Module) -> None:
        counter = _module_counter(module)

        def pre_hook(mod: nn.Module, args: tuple[Any, ...]) -> None:
            tally.stack.append(name)
            if counter is not None:
                tally.suppress += 1

        def post_hook(mod: nn.Module, args: tuple[Any, ...], out: Any) -> None:
            if tally.stack:
                tally.stack.pop()
            if counter is not None:
                tally.suppress -= 1
                if tally.suppress == 0 and isinstance(out, torch.Tensor):
                    tally.add(counter(args, out), name)

        handles.append(module.register_forward_pre_hook(pre_hook, prepend=True))
        handles.append(module.register_forward_hook(post_hook, always_call=True))

    try:
        for name, module in model.named_modules():
            attach(name, module)
        yield
    finally:
        for handle in handles:
            handle.remove()


@contextmanager
def _mha_fastpath_disabled() -> Iterator[None]:
    """Switch off the fused MultiheadAttention/TransformerEncoderLayer inference fast path."""
    mha = getattr(torch.backends, "mha", None)
    getter = getattr(mha, "get_fastpath_enabled", None)
    setter = getattr(mha, "set_fastpath_enabled", None)
    if getter is None or setter is None:
        yield
        return
    previous = getter()
    setter(False)
    try:
        yield
    finally:
        setter(previous)


def _divide(total: int, batch: int) -> int:
    return (total + batch // 2) // batch


# --------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------


def profile(model: nn.Module, example_inputs: Any, *, kernels: bool = True) -> ModelCost:
    """MACs per example (total and per module) and unique parameter count of *model*.

    Args:
        model: the model; it is run once and left unmodified (training flags restored).
        example_inputs: a tensor (one positional argument), a tuple/list of positional
            arguments, or a dict of keyword arguments (e.g. ``input_ids``/``attention_mask``).
            Tensors are moved to the model's device. Counts are divided by the batch size, the
            first dimension of the first tensor.
        kernels: also count tensor products called as functions (the dispatch-mode
            counter). Pass ``False`` only when the caller knows there are none (e.g. from
            a trace): it skips a one-off import of about two seconds.

    Example::

        >>> mlp = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 2))
        >>> cost = profile(mlp, torch.randn(4, 8))
        >>> cost.macs, cost.per_module
        (160, {'0': 128, '2': 32})
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"profile expects an nn.Module, got {type(model).__name__!r}")
    check_inputs(example_inputs)
    batch = batch_size_of(example_inputs)
    inputs = to_device(example_inputs, model_device(model))
    tally = _Tally()
    with (
        eval_mode(model),
        torch.no_grad(),
        _mha_fastpath_disabled(),
        _hooks(model, tally),
        _KernelCounter(tally) if kernels else nullcontext(),
    ):
        call_model(model, inputs)
    raw_total = sum(tally.per_module.values())
    per_module = {name: _divide(macs, batch) for name, macs in tally.per_module.items() if macs > 0}
    return ModelCost(
        macs=_divide(raw_total, batch), params=count_params(model), per_module=per_module
    )


def count_macs(model: nn.Module, example_inputs: Any) -> int:
    """Multiply-accumulates of one forward pass, per example (see the module docstring).

    Example::

        >>> count_macs(nn.Linear(16, 32), torch.randn(3, 5, 16))  # 5 rows · 16 · 32
        2560
    """
    return profile(model, example_inputs).macs
