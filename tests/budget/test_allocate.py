"""Budget allocation: exact cost model, targets reached as measured by the profiler,
round_to / min_width respected, error targets met, greedy optimal where it must be."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import spectrim
from spectrim.budget import CostModel, allocate, uniform_widths, widths_for_error
from spectrim.budget.allocate import allocate_budget
from spectrim.calibration import collect_statistics
from spectrim.config import Target
from spectrim.evaluation import profile
from spectrim.graph import GroupPlan, analyze_channels, apply_plan
from spectrim.methods import get_method
from spectrim.zoo import CifarResNet


def cost_model_of(model: nn.Module, x: torch.Tensor):  # type: ignore[no-untyped-def]
    a = analyze_channels(model, x)
    cost = profile(model, x)
    other = cost.macs - sum(cost.per_module.values())
    return a, cost, CostModel(model, a, cost.per_module, other_macs=max(other, 0))


class FlattenNet(nn.Module):
    """conv → BN → depthwise → pointwise → flatten → Linear → Linear (varied cost terms)."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(3, 12, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(12)
        self.dw = nn.Conv2d(12, 12, 3, padding=1, groups=12)
        self.c2 = nn.Conv2d(12, 10, 1)
        self.fc1 = nn.Linear(10 * 4 * 4, 20)
        self.fc2 = nn.Linear(20, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.c1(x)))
        x = F.relu(self.c2(F.relu(self.dw(x))))
        x = torch.flatten(F.adaptive_avg_pool2d(x, 4), 1)
        return self.fc2(F.relu(self.fc1(x)))


MODELS = {
    "flatten_net": (FlattenNet, (2, 3, 8, 8)),
    "resnet8_B": (lambda: CifarResNet(8, shortcut="B", width=8), (2, 3, 16, 16)),
    "resnet8_A": (lambda: CifarResNet(8, shortcut="A", width=8), (2, 3, 16, 16)),
}


def _random_model(name: str, seed: int):  # type: ignore[no-untyped-def]
    """``(model, x, analysis, cost model, rng)`` for one of :data:`MODELS`."""
    build, shape = MODELS[name]
    torch.manual_seed(seed)
    model = build().eval()
    x = torch.randn(*shape)
    a, _, cm = cost_model_of(model, x)
    return model, x, a, cm, np.random.default_rng(seed)


@pytest.mark.parametrize("name", sorted(MODELS))
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_cost_model_is_exact_for_sliced_models(name: str, seed: int) -> None:
    """For random widths, the modelled MACs and parameters equal the profiler's count of
    the physically pruned model."""
    model, x, a, cm, rng = _random_model(name, seed)
    widths = {g.index: int(rng.integers(1, g.width + 1)) for g in a.prunable}
    plans = {gi: GroupPlan(keep=np.sort(rng.permutation(a.groups[gi].width)[:k]))
             for gi, k in widths.items()}  # fmt: skip
    apply_plan(model, a, plans)
    after = profile(model, x)
    assert cm.macs(widths) == pytest.approx(after.macs, rel=1e-9, abs=1)
    assert cm.params(widths) == pytest.approx(after.params, rel=1e-9, abs=0.5)


@pytest.mark.parametrize("kind,value", [("macs", 0.5), ("macs", 0.8), ("params", 0.4)])
def test_compress_reaches_global_target_measured_by_profile(kind: str, value: float) -> None:
    torch.manual_seed(0)
    model = CifarResNet(8, shortcut="B", width=8).eval()
    x = torch.randn(64, 3, 16, 16)
    small, report = spectrim.compress(model, x, method="id", target=f"{kind}={value}")
    before, after = profile(model, x[:4]), profile(small, x[:4])
    ratio = getattr(after, kind) / getattr(before, kind)
    assert ratio <= value + 1e-9
    assert ratio >= value - 0.03, f"{kind} ratio {ratio:.4f} undershoots the target {value}"
    assert report.macs_after == after.macs and report.params_after == after.params
    assert report.macs_before == before.macs and report.params_before == before.params


def test_allocate_stops_at_the_budget_and_keeps_pinned_groups() -> None:
    torch.manual_seed(0)
    model = CifarResNet(8, shortcut="A", width=8).eval()
    x = torch.randn(2, 3, 16, 16)
    a, cost, cm = cost_model_of(model, x)
    curves = {g.index: np.linspace(1.0, 0.0, g.width + 1) ** 2 for g in a.prunable}
    widths = allocate(Target("macs", 0.8), curves, cm)
    assert set(widths) == {g.index for g in a.prunable}
    full = cm.macs({})
    assert full == pytest.approx(cost.macs)
    assert cm.macs(widths) <= 0.8 * full
    # one channel more anywhere would be above the budget (the greedy stops at once)
    assert any(cm.macs({**widths, g: w + 1}) > 0.8 * full
               for g, w in widths.items() if w < a.groups[g].width)  # fmt: skip


@pytest.mark.parametrize("round_to", [4, 8])
@pytest.mark.parametrize("target", ["macs=0.5", "params=0.6", "width=0.55", "error=0.3"])
def test_round_to_gives_multiples_or_full_width(round_to: int, target: str) -> None:
    torch.manual_seed(0)
    model = CifarResNet(8, shortcut="B", width=12).eval()  # widths 12, 24, 48
    x = torch.randn(48, 3, 16, 16)
    _, report = spectrim.compress(model, x, method="id", target=target, round_to=round_to)
    pruned = 0
    for g in report.groups:
        if g.pinned is None:
            assert g.width_after % round_to == 0 or g.width_after == g.width_before, g
            pruned += g.width_after < g.width_before
    assert pruned > 0


def test_allowed_widths_with_round_to_and_min_width() -> None:
    curves = {0: np.linspace(1, 0, 11) ** 2, 1: np.linspace(1, 0, 7) ** 2}  # widths 10, 6
    assert uniform_widths({0: 10, 1: 6}, 0.3, round_to=4) == {0: 4, 1: 4}
    assert uniform_widths({0: 10, 1: 6}, 0.05, round_to=1, min_width=3) == {0: 3, 1: 3}
    assert uniform_widths({0: 10, 1: 6}, 0.95, round_to=4) == {0: 10, 1: 6}
    w = widths_for_error(curves, 0.55, round_to=4)
    assert all(k % 4 == 0 or k in (10, 6) for k in w.values())
    for g, k in w.items():
        assert np.sqrt(curves[g][k]) <= 0.55 + 1e-12


@pytest.mark.parametrize("error", [0.05, 0.2, 0.5])
def test_error_target_per_group_errors_are_at_most_e(error: float) -> None:
    torch.manual_seed(0)
    model = FlattenNet().eval()
    x = torch.randn(128, 3, 8, 8)
    _, report = spectrim.compress(model, x, method="id", target=f"error={error}")
    checked = 0
    for g in report.groups:
        if g.pinned is None:
            assert g.predicted_error is not None and g.predicted_error <= error + 1e-12, g
            checked += 1
    assert checked == 3
    # minimality: one channel fewer would exceed E (curves recomputed from scratch)
    a = analyze_channels(model, x[:2])
    stats = collect_statistics(model, a, [x], a.prunable)
    method = get_method("id")
    for g in a.prunable:
        solver = method.solver(
            g, {c.module: stats[(g.index, c.module)] for c in g.consumers}, model
        )
        e = np.sqrt(np.maximum(solver.error_curve(), 0))
        k = report.widths[g.name][1]
        assert e[k] <= error + 1e-12
        if k > 1:
            assert e[k - 1] > error, (g.name, k, e[k - 1])
    assert report.params_after <= report.params_before


def test_widths_for_error_picks_the_smallest_k() -> None:
    curves = {0: np.array([1.0, 0.5, 0.1, 0.01, 0.0]), 1: np.array([1.0, 0.0, 0.0])}
    assert widths_for_error(curves, 0.11) == {0: 3, 1: 1}  # sqrt(0.01) = 0.1 <= 0.11
    assert widths_for_error(curves, 0.0) == {0: 4, 1: 1}
    assert widths_for_error(curves, 0.99, min_width=2) == {0: 2, 1: 2}


# --------------------------------------------------------------- greedy vs brute force


class Branches(nn.Module):
    """Three independent hidden groups: every channel of every group costs the same MACs
    (4 inputs + 2 outputs), so the cost is additive and uniform per channel."""

    def __init__(self, widths: tuple[int, ...] = (4, 5, 3)) -> None:
        super().__init__()
        self.up = nn.ModuleList(nn.Linear(4, w) for w in widths)
        self.down = nn.ModuleList(nn.Linear(w, 2) for w in widths)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return sum(d(F.relu(u(x))) for u, d in zip(self.up, self.down))  # type: ignore[return-value]


def convex_curve(rng: np.random.Generator, m: int) -> np.ndarray:
    """Decreasing, convex e[k], e[m] = 0."""
    steps = np.sort(rng.exponential(size=m))[::-1]  # decreasing marginal gains
    e = np.concatenate([np.cumsum(steps[::-1])[::-1], [0.0]])
    return e / e[0]


def brute_force(curves, cm, kind, budget):  # type: ignore[no-untyped-def]
    best = (np.inf, None)
    groups = sorted(curves)
    for ks in itertools.product(*[range(1, len(curves[g])) for g in groups]):
        w = dict(zip(groups, ks))
        if cm.cost(kind, w) <= budget + 1e-9:
            err = sum(curves[g][k] for g, k in w.items())
            if err < best[0] - 1e-12:
                best = (err, w)
    return best


@pytest.mark.parametrize("seed", range(8))
@pytest.mark.parametrize("fraction", [0.3, 0.5, 0.75])
def test_greedy_matches_brute_force(seed: int, fraction: float) -> None:
    torch.manual_seed(seed)
    model = Branches().eval()
    x = torch.randn(2, 4)
    a, _, cm = cost_model_of(model, x)
    assert len(a.prunable) == 3
    rng = np.random.default_rng(seed)
    curves = {g.index: convex_curve(rng, g.width) for g in a.prunable}
    for kind in ("macs", "params"):
        widths = allocate(Target(kind, fraction), curves, cm)
        budget = fraction * cm.cost(kind, {})
        err, best = brute_force(curves, cm, kind, budget)
        assert best is not None
        assert cm.cost(kind, widths) <= budget + 1e-9
        got = sum(curves[g][k] for g, k in widths.items())
        assert got == pytest.approx(err, rel=1e-9, abs=1e-12), (kind, widths, best)


def test_greedy_prefers_the_cheap_error() -> None:
    """Two groups, equal cost per channel: the flat curve is pruned first."""
    torch.manual_seed(0)
    model = Branches((4, 4)).eval()
    a, _, cm = cost_model_of(model, torch.randn(2, 4))
    g0, g1 = (g.index for g in a.prunable)
    flat = np.array([1.0, 0.03, 0.02, 0.01, 0.0])
    steep = np.array([1.0, 0.6, 0.4, 0.2, 0.0])
    widths = allocate(Target("macs", 0.75), {g0: flat, g1: steep}, cm)
    # 8 hidden channels cost 6 MACs each (+ constant-free): 75% -> remove 2 of the 8
    assert widths == {g0: 2, g1: 4}


def test_a_group_step_keeps_that_group_at_its_multiples() -> None:
    """``group_steps`` (a MoE model's residual stream must stay a multiple of 4 float32
    coordinates): that group lands on a multiple of its step or its whole width, the
    budget holds, and the other groups still move one channel at a time."""
    free_widths = []
    for seed in range(6):
        torch.manual_seed(seed)
        model = Branches((8, 5, 6)).eval()
        a, _, cm = cost_model_of(model, torch.randn(2, 4))
        rng = np.random.default_rng(seed)
        curves = {g.index: convex_curve(rng, g.width) for g in a.prunable}
        g0 = a.prunable[0].index
        for fraction in (0.4, 0.6, 0.8):
            target = Target("macs", fraction)
            widths = allocate_budget(target, curves, cm, group_steps={g0: 4}).widths
            assert widths[g0] in (4, 8), widths
            assert cm.cost("macs", widths) <= fraction * cm.cost("macs", {}) + 1e-9
            free_widths.append(allocate_budget(target, curves, cm).widths[g0])
    assert any(k % 4 for k in free_widths), free_widths  # without the step it lands elsewhere


@pytest.mark.parametrize("min_width", [1, 3])
def test_unreachable_target_force_returns_minimum_widths(min_width: int) -> None:
    """Option-A streams are pinned, so macs=0.01 cannot be reached. Forced, every
    prunable group ends at min_width, the model still runs, and a warning says so."""
    torch.manual_seed(0)
    model = CifarResNet(8, shortcut="A", width=8).eval()
    x = torch.randn(32, 3, 16, 16)
    small, report = spectrim.compress(
        model, x, method="id", target="macs=0.01", min_width=min_width, on_unreachable="force"
    )
    prunable = [g for g in report.groups if g.pinned is None]
    assert prunable
    assert all(g.width_after == min_width for g in prunable), report.widths
    assert report.macs_ratio > 0.01
    assert profile(small, x[:2]).macs == report.macs_after
    with torch.no_grad():
        assert small(x).shape == (32, 10)
    (msg,) = [w for w in report.warnings if "unreachable" in w]
    assert "minimum width" in msg and "pinned" in msg


def test_unreachable_target_stops_where_errors_are_sane() -> None:
    """The default never trades the model's function for a target it cannot reach: no
    group goes past max_error, and the warning gives the value reached, the floor, the
    pins' reason and what to do; on_unreachable="raise" raises with the same message."""
    from spectrim.config import UnreachableTargetError

    torch.manual_seed(0)
    model = CifarResNet(8, shortcut="A", width=8).eval()
    x = torch.randn(64, 3, 16, 16)
    small, report = spectrim.compress(model, x, method="id", target="macs=0.01")
    prunable = [g for g in report.groups if g.pinned is None]
    assert all(g.predicted_error is not None and g.predicted_error <= 0.5 for g in prunable)
    assert any(g.width_after > 1 for g in prunable)  # not cut to the bone
    (msg,) = [w for w in report.warnings if "unreachable" in w]
    assert "macs=0.01 is unreachable" in msg and "pads the channel axis" in msg
    assert f"stopped at macs={report.macs_ratio:.2f}" in msg or "stopped at macs=" in msg
    assert "max_error" in msg
    loose, _ = spectrim.compress(model, x, method="id", target="macs=0.01", max_error=0.9)
    assert loose.layer1[0].conv1.out_channels <= small.layer1[0].conv1.out_channels
    with pytest.raises(UnreachableTargetError, match="unreachable"):
        spectrim.compress(model, x, method="id", target="macs=0.01", on_unreachable="raise")
    # a reachable target is allocated without the bound, and without the warning
    _, ok = spectrim.compress(model, x, method="id", target="macs=0.8")
    assert not [w for w in ok.warnings if "unreachable" in w]


# ------------------------------------------------------------ one budget over channels and weights


def _masked(model: nn.Module, densities: dict[str, float], seed: int) -> None:
    """Zero ``round((1 − d)·numel)`` entries of each named module's weight."""
    g = torch.Generator().manual_seed(seed)
    mods = dict(model.named_modules())
    with torch.no_grad():
        for name, d in densities.items():
            w = mods[name].weight
            drop = round((1 - d) * w.numel())
            idx = torch.randperm(w.numel(), generator=g)[:drop]
            w.view(-1)[idx] = 0.0


@pytest.mark.parametrize("name", sorted(MODELS))
@pytest.mark.parametrize("seed", [0, 1])
def test_joint_cost_is_exact_for_pruned_and_masked_models(name: str, seed: int) -> None:
    """At random widths and densities, the joint greedy's cost of every kind equals what
    the sliced and masked model measures: MACs counting each matrix by its non-zeros,
    parameters counting a matrix's non-zeros only, non-zero weights of the matrices."""
    from spectrim._joint import sparse_macs
    from spectrim.budget import joint_cost

    model, x, a, cm, rng = _random_model(name, seed)
    mats = [n for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    dens = {n: float(rng.choice([0.25, 0.5, 0.75, 1.0])) for n in mats}
    widths = {g.index: int(rng.integers(1, g.width + 1)) for g in a.prunable}
    plans = {gi: GroupPlan(keep=np.sort(rng.permutation(a.groups[gi].width)[:k]))
             for gi, k in widths.items()}  # fmt: skip
    apply_plan(model, a, plans)
    mods = dict(model.named_modules())
    numel = {n: mods[n].weight.numel() for n in mats}
    _masked(model, dens, seed)
    nonzeros = sum(int((mods[n].weight != 0).sum()) for n in mats)
    others = sum(p.numel() for n, p in model.named_parameters() if n.rsplit(".", 1)[0] not in mats
                 or not n.endswith(".weight"))  # fmt: skip
    slack = len(mats)  # one weight of rounding per matrix
    assert joint_cost(cm, "nonzeros", widths, dens) == pytest.approx(nonzeros, abs=slack)
    assert joint_cost(cm, "params", widths, dens) == pytest.approx(nonzeros + others, abs=slack)
    per_module = profile(model, x).per_module  # a weight of rounding: its MACs per weight
    macs_slack = sum(per_module[n] / numel[n] for n in mats if numel[n]) + 1e-6
    assert joint_cost(cm, "macs", widths, dens) == pytest.approx(
        sparse_macs(model, x), abs=macs_slack
    )
    # all dense: the channel cost model's own counts
    full = dict.fromkeys(mats, 1.0)
    assert joint_cost(cm, "macs", widths, full) == pytest.approx(cm.macs(widths))
    assert joint_cost(cm, "params", widths, full) == pytest.approx(cm.params(widths))


class _Independent:
    """A cost model of independent weight matrices: one non-zero term per matrix."""

    def __init__(self, sizes: dict[str, int]) -> None:
        self.widths: dict[int, int] = {}
        self.other_macs = 0.0
        self.param_terms = [(float(s), []) for s in sizes.values()]
        self.param_owners = list(sizes)

    def terms_of(self, kind: str):  # type: ignore[no-untyped-def]
        return self.param_terms

    def owners_of(self, kind: str):  # type: ignore[no-untyped-def]
        return self.param_owners


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("density", [0.3, 0.55, 0.8])
def test_joint_greedy_with_matrices_only_is_the_density_allocator(
    seed: int, density: float
) -> None:
    """Two implementations of the convex-hull greedy agree: matrices alone (non-zeros
    kind), the joint greedy gives the densities of allocate_densities, and its budget is
    met exactly (the last step stops part-way)."""
    from spectrim.budget import greedy_allocate
    from spectrim.budget.densities import allocate_densities

    rng = np.random.default_rng(seed)
    grid = np.array([1.0, 0.8, 0.6, 0.4, 0.2, 0.1])
    sizes = {n: int(rng.integers(10, 500)) for n in "abcd"}
    curves = {n: (grid, np.concatenate([[0.0], np.cumsum(rng.random(5))])) for n in sizes}
    got = greedy_allocate("nonzeros", density, _Independent(sizes), {}, curves)  # type: ignore[arg-type]
    ref = allocate_densities(curves, sizes, density)
    for n in sizes:
        assert got.densities[n] == pytest.approx(ref[n], abs=1e-9), n
    assert got.reached == pytest.approx(density, abs=1e-12)
    kept = sum(got.densities[n] * sizes[n] for n in sizes) / sum(sizes.values())
    assert kept == pytest.approx(density, abs=1e-12)


def test_joint_greedy_takes_free_channels_before_sparsifying() -> None:
    """A group whose last two channels cost no error is narrowed first (that alone halves
    the consumer's non-zeros); a tighter budget is then met by the matrix's density, part-way,
    not by the group's expensive next channel."""
    from spectrim.budget import greedy_allocate

    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 6)).eval()
    x = torch.randn(2, 3)
    a, _, cm = cost_model_of(model, x)
    (g,) = a.prunable
    group_curve = np.array([1.0, 0.9, 0.0, 0.0, 0.0])  # widths 4, 3, 2 free; 1 costs 0.9
    grid = np.array([1.0, 0.5, 0.25])
    mats = {"2": (grid, np.array([0.0, 0.1, 0.3]))}
    # non-zeros of the consumer '2' only: 24 weights, 6 per channel of the group
    half = greedy_allocate("nonzeros", 0.5, cm, {g.index: group_curve}, mats)
    assert half.widths == {g.index: 2} and half.densities == {"2": 1.0}
    assert half.reached == pytest.approx(0.5)
    quarter = greedy_allocate("nonzeros", 0.25, cm, {g.index: group_curve}, mats)
    assert quarter.widths == {g.index: 2}
    assert quarter.densities["2"] == pytest.approx(0.5)  # 12 weights at half density
    assert quarter.reached == pytest.approx(0.25)
    # with no matrix curves the same greedy is the channel allocator, width for width
    for frac in (0.3, 0.5, 0.8):
        alone = greedy_allocate("macs", frac, cm, {g.index: group_curve}, {})
        assert alone.widths == allocate(Target("macs", frac), {g.index: group_curve}, cm)
