"""Consumer fits in output space, and the residual drift they can cancel.

The sequential pass (:mod:`spectrim.calibration.sequential`) by default corrects a
consumer by *channel interpolation*: its kept input channels reconstruct the original's
input channels, ``Z ≈ Z'_S Bᵀ``, and ``W·B`` replaces ``W``.  For a convolution that
ties the correction to one ``m×k`` matrix shared by every kernel tap.  Two stronger fits
of the same consumer, from the same pass (``CompressConfig.sequential_fit``):

* ``"outputs"``: least squares on the consumer's own outputs over its *unfolded* kept
  inputs (every tap of every kept channel free, and the bias),
  ``min_W' ‖Z W_oᵀ − U(Z') W'ᵀ‖²`` with ``U`` the im2col unfolding (the identity for a
  ``Linear``).  For a ``Linear`` reading one group this is the interpolation fit itself.
* ``"residual"``: the same, but the target also carries the residual stream's drift.
  When the consumer's output reaches an addition through per-channel affine maps only
  (a ``BatchNorm`` in eval mode, ``Dropout`` in eval mode), ``y·s + t + r``, the
  compressed model's other operand ``r'`` differs from the original's ``r`` by what the
  compressed prefix lost; the consumer is fitted to ``Y + (r − r')/s`` so that the *sum*
  matches the original's.  The other operand is found at run time
  (:func:`residual_partners`): the consumer's output tensor is followed through affine
  maps to the first addition that takes it.

Example::

    >>> import torch, torch.nn as nn
    >>> conv = nn.Conv2d(2, 3, 3, padding=1)
    >>> x = torch.randn(4, 2, 5, 5)
    >>> rows = consumer_rows(conv, x)
    >>> y = rows @ conv.weight.reshape(3, -1).T + conv.bias
    >>> bool(torch.allclose(y, output_rows(conv, conv(x)), atol=1e-5))
    True
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from spectrim.config import SEQUENTIAL_FITS

__all__ = [
    "FITS",
    "MIN_ROWS_PER_UNKNOWN",
    "Partner",
    "consumer_rows",
    "output_rows",
    "residual_partners",
    "resolve_fit",
    "rows_of",
    "set_unfolded_weight",
    "supports_output_fit",
]

#: the consumer fits of the sequential pass (``CompressConfig.sequential_fit``)
FITS = SEQUENTIAL_FITS

#: an output fit needs at least this many calibration rows per unknown of a weight row
#: (kept channels × kernel taps, + the bias); below it least squares follows the rows
#: rather than the function (on a random-weight ResNet-18 with 256 images, its last
#: stage's fits were exact on the rows and worse on new inputs than the interpolation),
#: and the consumer keeps the interpolation, with a warning.  The CIFAR ResNets' fits
#: have 21 or more.
MIN_ROWS_PER_UNKNOWN = 8


class _Unfolding(NamedTuple):
    """How one module type is fitted in output space (:data:`_UNFOLD`)."""

    #: whether this module of the type can be (groups, padding mode, ...)
    supports: Callable[[nn.Module], bool]
    #: its input as the rows its weight multiplies, ``(rows, in·taps)``
    rows: Callable[[nn.Module, torch.Tensor], torch.Tensor]
    #: how many such rows an input gives, without unfolding it
    n_rows: Callable[[nn.Module, torch.Tensor], int]
    #: its output (or anything of that layout) as ``(rows, out)`` in the same row order
    outputs: Callable[[torch.Tensor], torch.Tensor]


def _linear_rows(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return x.reshape(-1, x.shape[-1])


def _linear_count(module: nn.Module, x: torch.Tensor) -> int:
    return int(x.numel() // max(x.shape[-1], 1))


def _conv_rows(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    assert isinstance(module, (nn.Conv1d, nn.Conv2d)) and not isinstance(module.padding, str)
    k, d, p, s = module.kernel_size, module.dilation, module.padding, module.stride
    if isinstance(module, nn.Conv1d):  # (N, C, T) as an image of height 1
        x = x.unsqueeze(2)
        k, d, p, s = (1, *k), (1, *d), (0, *p), (1, *s)
    cols = F.unfold(x, k, dilation=d, padding=p, stride=s)
    return cols.transpose(1, 2).reshape(-1, cols.shape[1])


def _conv_count(module: nn.Module, x: torch.Tensor) -> int:
    """Batch × output positions, from the convolution's output-size formula."""
    assert isinstance(module, (nn.Conv1d, nn.Conv2d)) and not isinstance(module.padding, str)
    rows = int(x.shape[0])
    for i, size in enumerate(x.shape[2:]):
        k, d = module.kernel_size[i], module.dilation[i]
        p, s = module.padding[i], module.stride[i]
        rows *= max((int(size) + 2 * p - d * (k - 1) - 1) // s + 1, 0)
    return rows


def _conv_ok(module: nn.Module) -> bool:
    assert isinstance(module, (nn.Conv1d, nn.Conv2d))
    return (
        module.groups == 1
        and module.padding_mode == "zeros"
        and not isinstance(module.padding, str)
        and not module.transposed
    )


_LINEAR = _Unfolding(
    lambda m: True, _linear_rows, _linear_count, lambda y: y.reshape(-1, y.shape[-1])
)
_CONV = _Unfolding(
    _conv_ok, _conv_rows, _conv_count, lambda y: y.movedim(1, -1).reshape(-1, y.shape[1])
)

#: module type -> how it is fitted in output space; a type is added here, in one place
_UNFOLD: dict[type[nn.Module], _Unfolding] = {
    nn.Linear: _LINEAR,
    nn.Conv1d: _CONV,
    nn.Conv2d: _CONV,
}


def _entry(module: nn.Module) -> _Unfolding | None:
    """The nearest registered base type's entry, for a subclass that computes what that
    base computes (it keeps its ``forward``: spectrim's ``StandardisedConv2d`` does, timm's
    ``Conv2dSame``, which pads first, does not)."""
    cls = type(module)
    for base in cls.__mro__:
        entry = _UNFOLD.get(base)
        if entry is not None:
            return entry if cls.forward is base.forward else None  # type: ignore[attr-defined]
    return None


def _unfolding(module: nn.Module) -> _Unfolding:
    entry = _entry(module)
    if entry is None or not entry.supports(module):
        raise TypeError(f"{type(module).__name__} cannot be fitted on its unfolded inputs")
    return entry


def supports_output_fit(module: nn.Module) -> bool:
    """Whether ``module``'s weight can be fitted on its unfolded inputs (``Linear``,
    ``Conv1d``/``Conv2d`` with ``groups=1``, zero padding of fixed size, or a subclass
    that keeps their ``forward``)."""
    entry = _entry(module)
    return entry is not None and entry.supports(module)


def resolve_fit(fit: str, consumers: Iterable[nn.Module]) -> str:
    """The consumer fit ``fit`` names: ``"auto"`` is ``"residual"`` when one of
    ``consumers`` is fitted on unfolded inputs with more than one tap per input channel (a
    convolution, where every tap free beats one channel mix shared by the taps), else
    ``"inputs"``; any other value is itself.

    Example::

        >>> import torch.nn as nn
        >>> resolve_fit("auto", [nn.Linear(4, 2)]), resolve_fit("auto", [nn.Conv2d(4, 2, 3)])
        ('inputs', 'residual')
        >>> resolve_fit("outputs", [nn.Linear(4, 2)])
        'outputs'
    """
    if fit not in FITS:
        raise ValueError(f"sequential_fit={fit!r} must be one of {', '.join(FITS)}")
    if fit != "auto":
        return fit
    for module in consumers:
        weight = getattr(module, "weight", None)
        if (
            isinstance(weight, torch.Tensor)
            and supports_output_fit(module)
            and int(weight[0, 0].numel()) > 1
        ):
            return "residual"
    return "inputs"


def consumer_rows(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``module``'s input ``x`` as the rows its weight multiplies: ``(rows, in·taps)`` in
    the order of ``weight.reshape(out, -1)``'s columns (im2col for a convolution)."""
    return _unfolding(module).rows(module, x)


def rows_of(module: nn.Module, x: torch.Tensor) -> int:
    """How many rows :func:`consumer_rows` gives for ``x``, without unfolding it.

    Example::

        >>> import torch, torch.nn as nn
        >>> conv = nn.Conv2d(2, 3, 3, stride=2, padding=1)
        >>> x = torch.randn(4, 2, 7, 6)
        >>> rows_of(conv, x) == consumer_rows(conv, x).shape[0]
        True
    """
    return _unfolding(module).n_rows(module, x)


def output_rows(module: nn.Module, y: torch.Tensor) -> torch.Tensor:
    """``module``'s output (or anything of its layout) as ``(rows, out)``, the rows in
    the order of :func:`consumer_rows`."""
    return _unfolding(module).outputs(y)


def set_unfolded_weight(
    module: nn.Module, w: np.ndarray, channels: torch.Tensor | None = None
) -> None:
    """Write ``w`` (``out × in·taps``, plus a last column for the bias when ``module``
    has one) into ``module``'s weight (and bias), keeping their dtype and layout.  With
    ``channels``, ``w`` holds those input channels only and the others become zero."""
    weight = module.weight
    assert isinstance(weight, torch.Tensor)
    bias = getattr(module, "bias", None)
    out, inputs, taps = weight.shape[0], weight.shape[1], int(weight[0, 0].numel())
    cols = (inputs if channels is None else len(channels)) * taps
    if w.shape != (out, cols + (bias is not None)):
        raise ValueError(f"a fit of shape {w.shape} for a weight of shape {tuple(weight.shape)}")
    new = torch.as_tensor(w[:, :cols], dtype=weight.dtype, device=weight.device)
    if channels is not None:
        full = new.new_zeros(out, inputs, taps)
        full[:, channels.to(full.device)] = new.reshape(out, len(channels), taps)
        new = full
    # fresh storage, never a write into the tensors the module holds: surgery keeps a
    # consumer's bias (and an unsliced weight) as they were, and ``inplace=True`` undoes a
    # failed run by putting those tensors back (graph.surgery.ModuleSnapshot)
    weight.data = torch.empty_like(weight.data).copy_(new.reshape(weight.shape))
    if bias is not None:
        fitted = torch.as_tensor(w[:, cols], dtype=bias.dtype, device=bias.device)
        bias.data = torch.empty_like(bias.data).copy_(fitted)


# --------------------------------------------------------------------------- partners

#: the additions a residual stream is summed with
_ADDS = {
    torch.add,
    torch.Tensor.add,
    torch.Tensor.add_,
    torch.Tensor.__add__,
    torch.Tensor.__radd__,
    torch.Tensor.__iadd__,
}
_BN_ARGS = ("input", "running_mean", "running_var", "weight", "bias", "training", "momentum", "eps")


def _bn_scale(args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> torch.Tensor | None:
    """The per-channel scale of an eval-mode ``F.batch_norm`` call (``None``: not affine)."""
    bound = dict(zip(_BN_ARGS, args))
    bound.update(kwargs)
    var = bound.get("running_var")
    if bound.get("training", False) or var is None:
        return None
    scale = torch.rsqrt(var.double() + float(bound.get("eps", 1e-5)))
    weight = bound.get("weight")
    return scale if weight is None else scale * weight.double()


class Partner:
    """The other operand ``r`` of the addition a consumer's output reaches, and the
    per-channel scale ``s`` of the affine maps on the way (``None``: none).  The block
    pass may replace ``other`` by the handle of a file holding it
    (:class:`~spectrim.calibration.spill.Spill`)."""

    __slots__ = ("other", "scale")

    def __init__(self, other: torch.Tensor, scale: torch.Tensor | None) -> None:
        self.other, self.scale = other, scale


class _Found(Exception):
    """Raised to stop a pass once the wanted addition has been seen."""


class _Follow(TorchFunctionMode):
    """Follows tagged tensors through eval-mode BatchNorm and Dropout to an addition."""

    def __init__(self, found: Callable[[str, Partner], None]) -> None:
        super().__init__()
        self.found = found
        self.tracked: dict[int, tuple[torch.Tensor, str, torch.Tensor | None]] = {}

    def tag(self, t: torch.Tensor, name: str, scale: torch.Tensor | None) -> None:
        self.tracked[id(t)] = (t, name, scale)

    def _get(self, t: Any) -> tuple[torch.Tensor, str, torch.Tensor | None] | None:
        if not isinstance(t, torch.Tensor):
            return None
        hit = self.tracked.get(id(t))
        return hit if hit is not None and hit[0] is t else None

    def __torch_function__(
        self,
        func: Any,
        types: Any,
        args: tuple[Any, ...] = (),
        kwargs: Mapping[str, Any] | None = None,
    ) -> Any:
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if not self.tracked or not args:
            return out
        if func in _ADDS and len(args) + ("other" in kwargs) >= 2 and "alpha" not in kwargs:
            a, b = args[0], args[1] if len(args) > 1 else kwargs["other"]
            for mine, other in ((a, b), (b, a)):
                hit = self._get(mine)
                if (
                    hit is not None
                    and isinstance(other, torch.Tensor)
                    and other.shape == mine.shape
                ):
                    del self.tracked[id(mine)]
                    self.found(hit[1], Partner(other.detach(), hit[2]))
                    break
            return out
        hit = self._get(args[0])
        if hit is not None and isinstance(out, torch.Tensor) and out.shape == args[0].shape:
            if func is F.batch_norm:
                s = _bn_scale(args, kwargs)
                if s is not None:
                    self.tag(out, hit[1], s if hit[2] is None else hit[2] * s)
            elif func is F.dropout and not kwargs.get(
                "training", args[2] if len(args) > 2 else True
            ):
                self.tag(out, hit[1], hit[2])
        return out


def residual_partners(
    consumers: Mapping[str, nn.Module],
    batches: Sequence[Any],
    call: Callable[[Any], Any],
    first: bool = False,
    store: Callable[[Any], Any] | None = None,
) -> dict[str, list[Partner]]:
    """For each consumer (name -> the module that ``call`` runs), per batch, the other
    operand of the addition its output reaches through eval-mode BatchNorm / Dropout,
    with their scale.

    Consumers whose output reaches no addition that way are absent.  With ``first``, each
    batch's pass stops at the first such addition (the caller wants one consumer's, and
    the rest of the model need not run).  ``store`` keeps each operand as its batch is
    done (e.g. :meth:`~spectrim.calibration.spill.Spill.put`, a file), so that the
    batches' operands need not all be in memory at once.

    Example::

        >>> import torch, torch.nn as nn
        >>> class Block(nn.Module):
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.conv, self.bn = nn.Conv2d(2, 2, 1), nn.BatchNorm2d(2).eval()
        ...     def forward(self, x):
        ...         return self.bn(self.conv(x)) + x
        >>> m, x = Block(), torch.randn(1, 2, 3, 3)
        >>> p = residual_partners({"conv": m.conv}, [x], m)["conv"][0]
        >>> bool(torch.equal(p.other, x)), tuple(p.scale.shape)
        (True, (2,))
    """
    found: dict[str, list[Partner]] = {}
    current: dict[str, Partner] = {}

    def seen(name: str, partner: Partner) -> None:
        current.setdefault(name, partner)
        if first:
            raise _Found

    mode = _Follow(seen)

    def tagger(name: str) -> Callable[..., None]:
        def hook(module: nn.Module, args: Any, out: Any) -> None:
            if isinstance(out, torch.Tensor):
                mode.tag(out, name, None)

        return hook

    handles = [m.register_forward_hook(tagger(n)) for n, m in consumers.items()]
    try:
        for i, batch in enumerate(batches):
            current.clear()
            mode.tracked.clear()
            try:
                with torch.no_grad(), mode:
                    call(batch)
            except _Found:
                pass
            for name, partner in current.items():
                if store is not None:
                    partner.other = store(partner.other)
                found.setdefault(name, [None] * len(batches))[i] = partner  # type: ignore[list-item]
    finally:
        for h in handles:
            h.remove()
        mode.tracked.clear()
    # a consumer must reach its addition in every batch
    return {n: ps for n, ps in found.items() if all(p is not None for p in ps)}
