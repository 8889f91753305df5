"""Surgery: physically remove channels and fold the correction into every consumer.

Given, per unit group, the kept channels ``S`` and per consumer a reconstruction
matrix ``B`` (``z ≈ B z_S``, shape ``m × k``), :func:`apply_plan`

* slices every producer (conv filters, linear rows, embedding columns) to ``S``;
* slices every passenger (BatchNorm statistics and affine, depthwise filters, PReLU
  slopes, per-channel parameters) to ``S``;
* replaces every consumer's input weights ``W`` by ``W B`` on the group's columns,
  as ``W (B ⊗ I)`` when the consumer reads the channels through a flatten.

Only module parameters, buffers and size attributes change, so the result is the
user's own module tree, smaller, and a plain state_dict plus a shape manifest rebuilds
it.  Example::

    >>> import torch, torch.nn as nn, numpy as np
    >>> from spectrim.graph import analyze_channels
    >>> net = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 2))
    >>> a = analyze_channels(net, torch.randn(3, 4))
    >>> g = a.prunable[0]
    >>> apply_plan(net, a, {g.index: GroupPlan(keep=np.arange(3))})
    >>> net[0].out_features, net[2].in_features
    (3, 3)
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from spectrim.graph.channels import Analysis
from spectrim.graph.modules import index_along, module_kind, set_param

__all__ = [
    "GroupPlan",
    "ModuleSnapshot",
    "WeightPlan",
    "apply_plan",
    "apply_weight_plans",
    "fold_consumer",
    "gather_index",
    "new_positions",
]


@dataclass
class GroupPlan:
    """What to do with one unit group.

    Attributes:
        keep: indices (into ``group.classes``) of the channels to keep.
        folds: consumer module name -> reconstruction ``B`` of shape ``(m, k)``
            (rows: all ``m`` channels of the group; columns: kept channels in the order
            of ``keep`` sorted ascending).  A consumer without an entry is sliced
            without correction (magnitude-pruning baselines).
        perm: optional permutation of the group's channels (self-checks only).
    """

    keep: np.ndarray
    folds: dict[str, np.ndarray] = field(default_factory=dict)
    perm: np.ndarray | None = None


@dataclass
class WeightPlan:
    """Same shapes, new values: what to do with one module's weight matrix.

    Attributes:
        module: the module's name.
        keep: boolean ``out × cols`` mask of the weights kept (the weight read as a matrix
            by its :class:`~spectrim.graph.modules.WeightKind`).
        values: the new ``out × cols`` values; zero wherever ``keep`` is false.
    """

    module: str
    keep: np.ndarray
    values: np.ndarray


def apply_weight_plans(model: nn.Module, plans: Mapping[str, WeightPlan]) -> None:
    """Write each plan's values into its module's weight, in place (shapes unchanged).

    Example::

        >>> import torch.nn as nn, numpy as np
        >>> lin = nn.Linear(2, 2, bias=False)
        >>> keep = np.array([[True, False], [False, True]])
        >>> apply_weight_plans(nn.Sequential(lin), {"0": WeightPlan("0", keep, np.eye(2))})
        >>> lin.weight.tolist()
        [[1.0, 0.0], [0.0, 1.0]]
    """
    from spectrim.graph.modules import weight_kind

    modules = dict(model.named_modules())
    for name, plan in plans.items():
        module = modules.get(name)
        kind = weight_kind(module) if module is not None else None
        if module is None or kind is None:
            raise ValueError(f"weight plan for '{name}': no module with a weight kind there")
        current = kind.matrix(module)
        keep = np.asarray(plan.keep, dtype=bool)
        if keep.shape != tuple(current.shape) or np.shape(plan.values) != keep.shape:
            raise ValueError(
                f"weight plan for '{name}': mask {keep.shape} / values "
                f"{np.shape(plan.values)} do not match the weight matrix {tuple(current.shape)}"
            )
        values = torch.as_tensor(np.where(keep, plan.values, 0.0))
        kind.set_matrix(module, values)


def gather_index(labels: np.ndarray, dropped: set[int], sub: Mapping[int, int]) -> np.ndarray:
    """Source position of every position that survives, after substitution."""
    labels = np.asarray(labels, dtype=np.int64)
    keep = ~np.isin(labels, np.fromiter(dropped, dtype=np.int64, count=len(dropped)))
    if not sub:
        return np.nonzero(keep)[0]
    occ: dict[tuple[int, int], int] = {}
    count: dict[int, int] = {}
    reps = np.empty(len(labels), dtype=np.int64)
    for p, c in enumerate(labels.tolist()):
        r = count.get(c, 0)
        count[c] = r + 1
        occ[(c, r)] = p
        reps[p] = r
    src = [
        occ[(sub.get(c, c), r)]
        for c, r, k in zip(labels.tolist(), reps.tolist(), keep.tolist())
        if k
    ]
    return np.asarray(src, dtype=np.int64)


def new_positions(labels: np.ndarray, dropped: set[int]) -> np.ndarray:
    """old position -> new position (or -1 when dropped)."""
    keep = ~np.isin(labels, np.fromiter(dropped, dtype=np.int64, count=len(dropped)))
    newpos = np.full(len(labels), -1, dtype=np.int64)
    newpos[keep] = np.arange(int(keep.sum()))
    return newpos


def _slice_module(module: nn.Module, idx: np.ndarray, role: str) -> None:
    """Slice a producer's outputs (role 'out') or a passenger's channels (role 'chan'),
    as its registered :class:`~spectrim.graph.modules.ModuleKind` says."""
    kind = module_kind(module)
    if kind is None or kind.slice is None:  # pragma: no cover - the analysis checks
        raise TypeError(f"cannot slice module of type {type(module).__name__}")
    kind.slice(module, idx, role)


def fold_consumer(
    module: nn.Module,
    labels: np.ndarray,
    dropped: set[int],
    sub: Mapping[int, int],
    folds: list[tuple[np.ndarray, np.ndarray, np.ndarray]],
) -> None:
    """Gather the consumer's input columns, then apply each group's ``B`` on its columns.

    ``folds`` holds ``(positions (m, r), kept (k,), B (m, k))`` per group with a fold.
    """
    kind = module_kind(module)
    attr = kind.in_size if kind is not None else None
    if (
        kind is None or attr is None
    ):  # pragma: no cover - the analysis only folds into registered types
        raise TypeError(f"cannot fold into module of type {type(module).__name__}")
    weight = module.weight
    assert isinstance(weight, torch.Tensor)
    in_dim = kind.weight_dims[1]  # work on (out, in, ...) and move the axis back
    w = weight.data.movedim(in_dim, 1)
    src = gather_index(labels, dropped, sub)
    new_w = index_along(w, 1, src)
    if folds:
        newpos = new_positions(labels, dropped)
        w64 = w.double()
        new_w = new_w.double()
        for pos, kept, b in folds:
            m, r = pos.shape
            cols = w64[:, torch.as_tensor(pos.reshape(-1))]  # (out, m*r, ...)
            cols = cols.reshape(w.shape[0], m, r, *w.shape[2:])
            bt = torch.as_tensor(b, dtype=torch.float64, device=w.device)
            folded = torch.einsum("om r..., mk -> okr...".replace(" ", ""), cols, bt)
            target = newpos[pos[kept]]  # (k, r)
            if (target < 0).any():  # pragma: no cover - kept columns always survive
                raise RuntimeError("internal error: kept channel has no new position")
            new_w[:, torch.as_tensor(target.reshape(-1))] = folded.reshape(
                w.shape[0], -1, *w.shape[2:]
            )
        new_w = new_w.to(w.dtype)
    set_param(module, "weight", new_w.movedim(1, in_dim))
    setattr(module, attr, new_w.shape[1])


def apply_plan(
    model: nn.Module,
    analysis: Analysis,
    plans: Mapping[int, GroupPlan],
    *,
    already: Collection[int] = (),
    only: Callable[[str], bool] | None = None,
) -> None:
    """Apply per-group plans to ``model`` in place (pass a copy to keep the original).

    ``plans`` maps group index to :class:`GroupPlan`; groups without a plan keep all
    their channels.  Pinned groups must not appear.  ``already``: channel classes an
    earlier surgery on this model removed (its modules no longer have them), so a second
    surgery on other groups indexes what is there.  ``only``: the modules (by qualified
    name) to change; the others are left for a later call with the same plans (the
    block-by-block pass slices one block at a time).
    """
    dropped: set[int] = set()
    sub: dict[int, int] = {}
    fold_at: dict[str, list[tuple[np.ndarray, np.ndarray, np.ndarray]]] = {}
    for gi, plan in plans.items():
        g = analysis.groups[gi]
        if g.pinned is not None:
            raise ValueError(f"unit group '{g.name}' is pinned ({g.pinned}) and cannot be pruned")
        keep = np.sort(np.asarray(plan.keep, dtype=np.int64))
        if keep.size == 0:
            raise ValueError(f"unit group '{g.name}': at least one channel must be kept")
        if keep.min() < 0 or keep.max() >= g.width or len(np.unique(keep)) != len(keep):
            raise ValueError(f"unit group '{g.name}': keep indices out of range or repeated")
        mask = np.ones(g.width, dtype=bool)
        mask[keep] = False
        dropped.update(int(c) for c in g.classes[mask])
        if plan.perm is not None:
            perm = np.asarray(plan.perm)
            for i, j in enumerate(perm.tolist()):
                sub[int(g.classes[i])] = int(g.classes[j])
        for slot in g.consumers:
            b = plan.folds.get(slot.module)
            if b is None:
                continue
            if b.shape != (g.width, len(keep)):
                raise ValueError(
                    f"unit group '{g.name}': fold for consumer '{slot.module}' has shape "
                    f"{b.shape}, expected {(g.width, len(keep))}"
                )
            fold_at.setdefault(slot.module, []).append((slot.positions, keep, b))
    if not dropped and not sub:
        return
    touched = np.fromiter(dropped | set(sub), dtype=np.int64)

    def affected(labels: np.ndarray) -> bool:
        return bool(np.isin(labels, touched).any())

    gone = np.fromiter(already, dtype=np.int64)
    if gone.size and np.isin(touched, gone).any():
        raise ValueError("apply_plan: a plan drops channels an earlier surgery already removed")
    if gone.size and fold_at:  # folds address the consumers' original columns
        raise ValueError("apply_plan: folds cannot be applied after an earlier surgery")

    def present(labels: np.ndarray) -> np.ndarray:
        return labels[~np.isin(labels, gone)] if gone.size else labels

    modules = dict(model.named_modules())
    mine = (lambda name: True) if only is None else only
    for name, labels in analysis.in_labels.items():
        if mine(name) and (fold_at.get(name) or affected(labels)):
            fold_consumer(modules[name], present(labels), dropped, sub, fold_at.get(name, []))
    for name, labels in analysis.out_labels.items():
        if mine(name) and affected(labels):
            _slice_module(modules[name], gather_index(present(labels), dropped, sub), "out")
    for name, labels in analysis.chan_labels.items():
        if not mine(name) or not affected(labels):
            continue
        labels = present(labels)
        idx = gather_index(labels, dropped, sub)
        if name in analysis.param_dims:
            owner_name, _, attr = name.rpartition(".")
            owner = modules[owner_name]
            set_param(
                owner, attr, index_along(getattr(owner, attr).data, analysis.param_dims[name], idx)
            )
        else:
            _slice_module(modules[name], idx, "chan")


_PLAIN = (bool, int, float, str, tuple, type(None))


class ModuleSnapshot:
    """What surgery can change in a module tree, kept by reference, to undo it in place.

    Surgery (and a switch of memory layout) replaces parameters, buffers and their
    ``.data`` and sets size attributes; before it, modules may be swapped in, and
    :func:`~spectrim.graph.modules.make_plain` may change a module's class and remove
    its weight-norm hooks.  None of these writes into a tensor the model holds.  So
    references to every module's class, parameter, buffer, child and hook tables, to each
    tensor's data and to its plain attributes are enough to put the model back exactly,
    at no copy of the weights. :func:`spectrim.compress` takes one with ``inplace=True``
    and restores it when a run fails midway.

    Example::

        >>> import numpy as np
        >>> from spectrim.graph import analyze_channels
        >>> net = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 2))
        >>> a = analyze_channels(net, torch.randn(3, 4))
        >>> snap = ModuleSnapshot(net)
        >>> apply_plan(net, a, {a.prunable[0].index: GroupPlan(keep=np.arange(3))})
        >>> snap.restore()
        >>> net[0].out_features, net[2].weight.shape
        (6, torch.Size([2, 6]))
    """

    def __init__(self, model: nn.Module) -> None:
        self._entries = []
        for module in model.modules():
            params = dict(module._parameters)
            buffers = dict(module._buffers)
            data = [(t, t.data) for t in (*params.values(), *buffers.values()) if t is not None]
            attrs = {k: v for k, v in vars(module).items() if isinstance(v, _PLAIN)}
            children = dict(module._modules)  # modules swapped in (attention, plain convs)
            # and the class: make_plain turns a parametrized module back into its own type
            hooks = [  # and its weight-norm hooks
                (table, dict(table))
                for table in (
                    module._forward_pre_hooks,
                    module._state_dict_hooks,
                    module._load_state_dict_pre_hooks,
                )
            ]
            self._entries.append(
                (module, type(module), params, buffers, data, attrs, children, hooks)
            )

    def restore(self) -> None:
        """Put every recorded module back as it was when the snapshot was taken."""
        for module, cls, params, buffers, data, attrs, children, hooks in self._entries:
            module.__class__ = cls
            for table, entries in hooks:
                table.clear()
                table.update(entries)
            module._modules.clear()
            module._modules.update(children)
            module._parameters.clear()
            module._parameters.update(params)
            module._buffers.clear()
            module._buffers.update(buffers)
            for t, d in data:
                t.data = d
            module.__dict__.update(attrs)
