"""ID and spectral pruning are exact on rank-deficient activations.

Real models are made redundant on purpose (identical channels: copied filters and
BatchNorm parameters; dead channels: a large negative bias before a ReLU; scaled copies:
``relu(2z) = 2 relu(z)``).  ``spectrim.compress(method="id", target="error=1e-7")`` must
then remove exactly the redundant channels (the same for ``method="spectral"`` with
``theta=1`` or ``0.5`` and ``tau="none"``: at ``k >= rank`` every loss is zero) (the kept width equals the numerical rank of
the group's activations, computed here independently with an SVD) and still reproduce
the original outputs to 1e-5 relative on the calibration data.
"""

from __future__ import annotations

import copy
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import spectrim
from spectrim.graph import Analysis, UnitGroup, analyze_channels
from spectrim.zoo import CifarResNet

RTOL = 1e-5


# ------------------------------------------------------------------------------ helpers


def _index_of(labels: np.ndarray, cls: int) -> int:
    (where,) = np.flatnonzero(labels == cls)
    return int(where)


def _param_sites(
    model: nn.Module, analysis: Analysis, group: UnitGroup
) -> list[tuple[nn.Module, np.ndarray, str]]:
    """(module, labels, role) of every producer and passenger of ``group``."""
    modules = dict(model.named_modules())
    sites = [(modules[p], analysis.out_labels[p], "out") for p in group.producers]
    sites += [(modules[p], analysis.chan_labels[p], "chan") for p in group.passengers]
    return sites


@torch.no_grad()
def duplicate_channels(
    model: nn.Module, analysis: Analysis, group: UnitGroup, src: list[int], dst: list[int]
) -> None:
    """Make channel ``dst[i]`` of ``group`` an exact copy of ``src[i]`` everywhere."""
    for mod, labels, _ in _param_sites(model, analysis, group):
        for s, d in zip(src, dst):
            i = _index_of(labels, int(group.classes[s]))
            j = _index_of(labels, int(group.classes[d]))
            for name in ("weight", "bias", "running_mean", "running_var"):
                t = getattr(mod, name, None)
                if isinstance(t, torch.Tensor):
                    t[j] = t[i]


@torch.no_grad()
def kill_channels(model: nn.Module, analysis: Analysis, group: UnitGroup, idx: list[int]) -> None:
    """A very negative BatchNorm/Linear bias: the channel is 0 after the next ReLU."""
    hit = False
    for mod, labels, role in _param_sites(model, analysis, group):
        is_bn = isinstance(mod, nn.modules.batchnorm._BatchNorm)
        if not (is_bn or (isinstance(mod, nn.Linear) and role == "out")):
            continue
        for c in idx:
            j = _index_of(labels, int(group.classes[c]))
            if is_bn:
                mod.weight[j] = 1e-3
            mod.bias[j] = -100.0
        hit = True
    assert hit, f"group {group.name} has no bias to kill channels with"


@torch.no_grad()
def randomize_bn(model: nn.Module, seed: int = 0) -> None:
    """Non-trivial BatchNorm statistics and affine parameters (eval mode)."""
    gen = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            n = m.num_features
            m.running_mean.copy_(0.2 * torch.randn(n, generator=gen))
            m.running_var.copy_(0.5 + 1.5 * torch.rand(n, generator=gen))
            m.weight.copy_(0.5 + torch.rand(n, generator=gen))
            m.bias.copy_(0.3 * torch.randn(n, generator=gen))


@torch.no_grad()
def group_activations(
    model: nn.Module, groups: list[UnitGroup], x: torch.Tensor
) -> dict[str, torch.Tensor]:
    """Per group, the stacked (rows, m) float64 activations at all its consumers' inputs.

    Independent of spectrim's collector: forward pre-hooks on the consumers (one forward
    pass), rows are (example, position[, repeat]) and columns the group's channels in
    canonical order.
    """
    modules = dict(model.named_modules())
    chunks: dict[str, list[torch.Tensor]] = {g.name: [] for g in groups}
    handles = []
    for g in groups:
        for slot in g.consumers:
            pos = torch.as_tensor(slot.positions)  # (m, r)

            def hook(module: nn.Module, args: tuple[torch.Tensor, ...], pos=pos, g=g) -> None:
                a = args[0].double()
                a = a.movedim(-1 if isinstance(module, nn.Linear) else 1, -1)
                a = a.reshape(-1, a.shape[-1])  # (rows, features)
                m, r = pos.shape
                sel = a[:, pos.reshape(-1)].reshape(-1, m, r).transpose(1, 2).reshape(-1, m)
                chunks[g.name].append(sel)

            handles.append(modules[slot.module].register_forward_pre_hook(hook))
    try:
        model.eval()(x)
    finally:
        for h in handles:
            h.remove()
    return {name: torch.cat(c) for name, c in chunks.items()}


def numerical_rank(z: torch.Tensor) -> int:
    """Rank of ``z`` from its singular values; asserts a clear gap so it is well defined."""
    s = torch.linalg.svdvals(z)
    if s[0] == 0:
        return 0
    rel = (s / s[0]).numpy()
    rank = int((rel > 1e-5).sum())
    assert rank == len(rel) or rel[rank] < 1e-6, f"no clear rank gap: {rel}"
    assert rel[rank - 1] > 1e-4, f"no clear rank gap: {rel}"
    return rank


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / a.abs().max())


def check_exact(
    model: nn.Module,
    x: torch.Tensor,
    redundant: dict[str, int],
    method: str = "id",
    **options: Any,
) -> spectrim.CompressionReport:
    """Compress at error=1e-7; check widths == rank, the drop, and exact outputs."""
    model.eval()
    analysis = analyze_channels(model, x[:2])
    acts = group_activations(model, analysis.prunable, x)
    ranks = {name: numerical_rank(z) for name, z in acts.items()}
    before = copy.deepcopy(model.state_dict())
    small, report = spectrim.compress(model, x, method=method, target="error=1e-7", **options)
    widths = report.widths
    for name, n in redundant.items():
        m, k = widths[name]
        assert k <= m - n, f"group {name}: {m} -> {k}, expected >= {n} redundant channels removed"
    for name, rank in ranks.items():
        assert widths[name][1] == rank, f"group {name}: kept {widths[name][1]}, rank {rank}"
    for g in report.groups:
        if g.pinned is None:
            assert g.predicted_error is not None and g.predicted_error <= 1e-7, g
        if options.get("sequential") is False:
            # one-shot: B is the exact interpolation, only float32 rounding remains
            assert all(e <= 1e-6 for e in g.consumer_errors.values()), g
    assert report.params_after < report.params_before
    assert report.macs_after < report.macs_before
    with torch.no_grad():
        ref, out = model(x), small(x)
    assert out.shape == ref.shape
    assert _rel(ref, out) <= RTOL, f"outputs differ by {_rel(ref, out):.3g} (relative)"
    # the user's model is untouched
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    return report


# ------------------------------------------------------------------------------- models


class FlattenCNN(nn.Module):
    """conv-BN-ReLU ×2 → adaptive pool 4×4 → flatten → Linear-ReLU → Linear."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(16)
        self.conv2 = nn.Conv2d(16, 24, 3, stride=2, padding=1)
        self.bn2 = nn.BatchNorm2d(24)
        self.fc1 = nn.Linear(24 * 4 * 4, 32)
        self.fc2 = nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        x = F.relu(self.bn2(self.conv2(x)))
        x = torch.flatten(F.adaptive_avg_pool2d(x, 4), 1)
        return self.fc2(F.relu(self.fc1(x)))


MODES = [pytest.param({}, id="default"), pytest.param({"sequential": False}, id="one-shot")]
METHODS = [
    pytest.param({"method": "id"}, id="id"),
    pytest.param({"method": "spectral", "theta": 1.0, "tau": "none"}, id="spectral-theta1"),
    pytest.param({"method": "spectral", "theta": 0.5, "tau": "none"}, id="spectral-theta05"),
]


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("options", MODES)
def test_flatten_cnn_duplicated_and_dead_channels(
    options: dict[str, Any], method: dict[str, Any]
) -> None:
    torch.manual_seed(1)
    model = FlattenCNN().eval()
    randomize_bn(model)
    x = torch.randn(192, 3, 16, 16)
    a = analyze_channels(model, x[:2])
    g1, g2, g3 = a.group("conv1"), a.group("conv2"), a.group("fc1")
    assert g2.consumers[0].module == "fc1" and g2.consumers[0].repeats == 16
    duplicate_channels(model, a, g1, [0, 1, 2], [3, 4, 5])
    kill_channels(model, a, g1, [6, 7])
    duplicate_channels(model, a, g2, [0, 1, 2, 3], [4, 5, 6, 7])
    kill_channels(model, a, g2, [8])
    duplicate_channels(model, a, g3, [0, 1], [10, 11])
    kill_channels(model, a, g3, [20, 21, 22])
    report = check_exact(model, x, {"conv1": 5, "conv2": 5, "fc1": 5}, **method, **options)
    assert report.widths["fc2"] == [10, 10]  # the output is never pruned


class MLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(12, 40)
        self.fc2 = nn.Linear(40, 24)
        self.fc3 = nn.Linear(24, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc3(torch.tanh(self.fc2(F.relu(self.fc1(x)))))


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("options", MODES)
def test_mlp_duplicates_scaled_copies_and_dead_neurons(
    options: dict[str, Any], method: dict[str, Any]
) -> None:
    torch.manual_seed(2)
    model = MLP().eval()
    x = torch.randn(300, 12)
    a = analyze_channels(model, x[:2])
    g1, g2 = a.group("fc1"), a.group("fc2")
    duplicate_channels(model, a, g1, [0, 1, 2, 3], [30, 31, 32, 33])
    with torch.no_grad():  # relu(2z) = 2 relu(z): removable only with a real correction
        model.fc1.weight[34:37] = 2.0 * model.fc1.weight[4:7]
        model.fc1.bias[34:37] = 2.0 * model.fc1.bias[4:7]
    kill_channels(model, a, g1, [37, 38, 39])
    duplicate_channels(model, a, g2, [0, 1], [22, 23])  # tanh of equal pre-activations
    report = check_exact(model, x, {"fc1": 10, "fc2": 2}, **method, **options)
    assert report.widths["fc1"][1] <= 30
    assert report.widths["fc3"] == [5, 5]


def redundant_resnet(depth: int) -> tuple[nn.Module, torch.Tensor, dict[str, int]]:
    """Option-B CifarResNet whose three residual streams each carry 2 duplicated and
    1 dead channel (copied in every producer conv and BatchNorm of the stream)."""
    torch.manual_seed(3)
    model = CifarResNet(depth, shortcut="B", width=8).eval()
    randomize_bn(model, seed=depth)
    x = torch.randn(48, 3, 16, 16)
    a = analyze_channels(model, x[:2])
    streams = [g for g in a.prunable if len(g.producers) >= 2]
    # the three residual streams of a 3-stage ResNet, each shared by 1 + n blocks
    assert len(streams) == 3
    n = (depth - 2) // 6
    for g in streams:
        assert len(g.producers) == 1 + n
        assert all(isinstance(dict(model.named_modules())[p], nn.Conv2d) for p in g.producers)
    redundant = {}
    for g in streams:
        duplicate_channels(model, a, g, [0, 1], [g.width - 1, g.width - 2])
        kill_channels(model, a, g, [2])
        redundant[g.name] = 3
    return model, x, redundant


@pytest.mark.parametrize("depth", [8, 14])
def test_option_b_resnet_duplicated_stream_channels(depth: int) -> None:
    """One-shot ID (every correction fitted on the original activations)."""
    model, x, redundant = redundant_resnet(depth)
    check_exact(model, x, redundant, sequential=False)


@pytest.mark.parametrize("method", METHODS)
def test_sequential_default_is_exact_on_redundant_resnet(method: dict[str, Any]) -> None:
    model, x, redundant = redundant_resnet(14)
    report = check_exact(model, x, redundant, **method)  # default: sequential calibration
    worst = max(max(g.consumer_errors.values()) for g in report.groups if g.consumer_errors)
    # the activations are exactly reconstructible: only float32 rounding may remain
    assert worst <= 1e-6, f"worst consumer reconstruction error {worst:.3g}"


def test_pretrained_resnet20_error_zero_is_lossless(cifar_calib: torch.Tensor) -> None:
    """error=0 removes only channels that are identically zero on the calibration data
    (the pretrained ResNet-20 has a few dead ReLUs), and the outputs are unchanged."""
    from spectrim.zoo import load_pretrained

    model = load_pretrained("resnet20-cifar10")
    x = cifar_calib[:64]
    analysis = analyze_channels(model, x[:2])
    acts = group_activations(model, analysis.prunable, x)
    dead = {name: int((z.abs().amax(0) == 0).sum()) for name, z in acts.items()}
    assert sum(dead.values()) > 0  # the pretrained net does have dead ReLUs
    small, report = spectrim.compress(model, x, method="id", target="error=0")
    widths = report.widths
    for g in analysis.groups:
        m, k = widths[g.name]
        assert m == g.width
        if g.pinned is not None:
            assert k == m, g.name
        else:
            assert k == m - dead[g.name], f"{g.name}: {m} -> {k}, {dead[g.name]} dead"
    with torch.no_grad():
        ref, out = model(x), small(x)
    assert _rel(ref, out) <= RTOL
    assert torch.equal(ref.argmax(1), out.argmax(1))
