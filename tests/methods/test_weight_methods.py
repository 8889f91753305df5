"""Weight sparsification through ``spectrim.compress`` on a real pretrained ResNet-20."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import spectrim
from spectrim.graph.modules import weight_modules
from spectrim.methods import available

WEIGHT_METHODS = [
    "magnitude", "random", "wanda", "obs", "obc", "lq", "pqi", "spectrum", "lq-lasso",
]  # fmt: skip


@pytest.fixture(scope="module")
def resnet20(data_root):  # type: ignore[no-untyped-def]
    from spectrim.zoo import load_pretrained

    return load_pretrained("resnet20-cifar10").eval()


@pytest.fixture(scope="module")
def test_images(data_root):  # type: ignore[no-untyped-def]
    from spectrim.zoo import load_dataset

    x, y = load_dataset("cifar10", "test", limit=256).tensors
    return x.clone(), y.clone()


def _matrices(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: k.matrix(m).detach() for n, m, k in weight_modules(model)}


def test_every_weight_method_is_registered() -> None:
    assert set(WEIGHT_METHODS) <= set(available("weight"))
    assert "random" in available("channel") and "obs" not in available("channel")


@pytest.mark.parametrize("method", WEIGHT_METHODS)
def test_sparsity_zero_reproduces_the_model(method, resnet20, cifar_calib, state_hash) -> None:  # type: ignore[no-untyped-def]
    small, report = spectrim.compress(resnet20, cifar_calib[:64], method, "sparsity=0")
    assert state_hash(small) == state_hash(resnet20)
    assert report.sparsity == 0.0


@pytest.mark.parametrize("method", ["magnitude", "wanda", "obs", "lq", "pqi", "spectrum", "random"])
def test_half_sparsity_on_resnet20(method, resnet20, cifar_calib, test_images) -> None:  # type: ignore[no-untyped-def]
    small, report = spectrim.compress(
        resnet20, cifar_calib[:64], method, "sparsity=0.5", structured=False
    )
    tol = 0.02 if method == "spectrum" else 0.002
    assert abs(report.sparsity - 0.5) <= tol
    mats = _matrices(small)
    zeros = sum(int((m == 0).sum()) for m in mats.values())
    total = sum(m.numel() for m in mats.values())
    assert abs(zeros / total - report.sparsity) < 1e-9  # the report says what the model holds
    x, _y = test_images
    with torch.no_grad():
        dense, out = resnet20(x).argmax(1), small(x).argmax(1)
    agree = float((dense == out).float().mean())
    floor = {"random": 0.0, "spectrum": 0.1}.get(method, 0.75)
    assert agree >= floor, f"{method}: agreement {agree:.3f}"
    assert len(report.matrices) == len(mats)
    m0 = report.matrices[1]
    assert 0 < m0.density < 1 and m0.output_error is not None and m0.spectral_error is not None


def test_data_aware_and_refit_reduce_the_output_error(resnet20, cifar_calib, test_images) -> None:  # type: ignore[no-untyped-def]
    x, _ = test_images
    with torch.no_grad():
        ref = resnet20(x)

    def err(method: str, **kw) -> float:  # type: ignore[no-untyped-def]
        small, _ = spectrim.compress(resnet20, cifar_calib[:64], method, "sparsity=0.7", **kw)
        with torch.no_grad():
            return float((small(x) - ref).norm() / ref.norm())

    mag, mag_refit, obs = err("magnitude"), err("magnitude", refit=True), err("obs")
    # held-out images: the fits are on the 64 calibration images only
    assert mag_refit < 0.8 * mag
    assert obs < 0.8 * mag


def test_two_four_pattern(resnet20, cifar_calib) -> None:  # type: ignore[no-untyped-def]
    small, report = spectrim.compress(resnet20, cifar_calib[:64], "wanda", "sparsity=2:4")
    assert report.target == "sparsity=2:4"
    for name, m in _matrices(small).items():
        full = (m.shape[1] // 4) * 4
        groups = (m[:, :full] != 0).reshape(m.shape[0], -1, 4).sum(-1)
        assert int(groups.max()) <= 2, name


def test_global_scope_and_seeds(resnet20, cifar_calib, state_hash) -> None:  # type: ignore[no-untyped-def]
    _small, report = spectrim.compress(
        resnet20, cifar_calib[:64], "magnitude", "sparsity=0.6", scope="global"
    )
    assert abs(report.sparsity - 0.6) < 1e-4
    densities = [m.density for m in report.matrices]
    assert max(densities) - min(densities) > 0.2  # one threshold, uneven layers
    a, _ = spectrim.compress(resnet20, cifar_calib[:64], "spectrum", "sparsity=0.5", seed=1)
    b, _ = spectrim.compress(resnet20, cifar_calib[:64], "spectrum", "sparsity=0.5", seed=1)
    c, _ = spectrim.compress(resnet20, cifar_calib[:64], "spectrum", "sparsity=0.5", seed=2)
    assert state_hash(a) == state_hash(b) != state_hash(c)


def test_lq_solves_eta_for_a_sparsity_and_sizes_itself(resnet20, cifar_calib) -> None:  # type: ignore[no-untyped-def]
    _, auto = spectrim.compress(resnet20, cifar_calib[:32], "lq", q=0.5)
    assert auto.target == "auto" and 0.05 < auto.sparsity < 0.95
    lq_bound = sum(m.lq_bound for m in auto.matrices if m.lq_bound is not None)
    assert auto.nonzeros_after == lq_bound  # η = 0, q = 0.5: exactly the bound
    _, rep = spectrim.compress(resnet20, cifar_calib[:32], "lq", "sparsity=0.8")
    assert rep.config["solved"]["eta"] > 0
    assert 0.8 - 1e-9 <= rep.sparsity <= 0.81


def test_structured_removal_is_exact() -> None:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(8, 64), nn.ReLU(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 3))
    x = torch.randn(512, 8)
    flat, r0 = spectrim.compress(net, x, "lq-lasso", lam=3e-3, structured=False)
    small, r1 = spectrim.compress(net, x, "lq-lasso", lam=3e-3)
    assert r1.params_after < r0.params_after == r0.params_before
    assert any("channels no longer read" in w for w in r1.warnings)
    torch.testing.assert_close(small(x), flat(x), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    "method, target, options, match",
    [
        ("obs", "sparsity=1.0", {}, r"sparsity=1.0 must be in \[0, 1\)"),
        ("obs", "sparsity=-0.1", {}, r"must be in \[0, 1\)"),
        ("lq", "sparsity=0.5", {"q": 1.5}, r"q=1.5 must be in \(0, 1\)"),
        ("lq", "sparsity=0.5", {"q": 0.0}, r"must be in \(0, 1\)"),
        ("obs", "sparsity=4:2", {}, "n:m pattern"),
        ("obs", "sparsity=2:x", {}, "n:m pattern"),
        ("lq", "sparsity=2:4", {}, "does not make n:m patterns"),
        ("obs", "macs=0.5", {}, "weight method"),
        ("id", "sparsity=0.5", {}, "channel method"),
        ("obs", "auto", {}, "needs target='sparsity=S'"),
        ("spectrum", "sparsity=0.5", {"distribution": "l3"}, "distribution"),
    ],
)
def test_clear_errors(method, target, options, match) -> None:  # type: ignore[no-untyped-def]
    net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    with pytest.raises(ValueError, match=match):
        spectrim.compress(net, torch.randn(64, 4), method, target, **options)


def test_model_without_weights_is_refused() -> None:
    net = nn.Sequential(nn.ReLU(), nn.BatchNorm1d(4))
    with pytest.raises(ValueError, match="no weight matrix to sparsify"):
        spectrim.compress(net, torch.randn(64, 4), "magnitude", "sparsity=0.5")


def test_tied_weights_stay_dense_and_tied() -> None:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 16))
    net[2].weight = net[0].weight
    small, rep = spectrim.compress(net, torch.randn(128, 8), "magnitude", "sparsity=0.5")
    assert small[2].weight is small[0].weight and bool((small[0].weight != 0).all())
    assert any("shared with another module" in w for w in rep.warnings)
    assert [m.name for m in rep.matrices] == ["4"]
    np.testing.assert_allclose(rep.sparsity, 0.5)


def test_channels_then_weights_in_one_call(resnet20, cifar_calib, test_images) -> None:  # type: ignore[no-untyped-def]
    small, report = spectrim.compress(
        resnet20,
        cifar_calib[:96],
        "id",
        "macs=0.5",
        then={"method": "obs", "target": "sparsity=0.5"},
    )
    assert report.method == "id+obs" and report.groups and report.matrices
    assert report.macs_ratio < 0.55 and abs(report.sparsity - 0.5) < 0.01
    # the matrices reported are the pruned ones, half of their weights zero
    pruned = _matrices(small)
    assert sum(int((m != 0).sum()) for m in pruned.values()) <= report.nonzeros_after
    x, _ = test_images
    with torch.no_grad():
        agree = float((small(x).argmax(1) == resnet20(x).argmax(1)).float().mean())
    assert agree > 0.6
    assert spectrim.CompressionReport.from_dict(report.to_dict()).matrices == report.matrices


def test_obc_through_compress_beats_obs_on_held_out_outputs() -> None:
    """``obc`` runs through the entry point (sequential, with a refit, curves and rounds),
    hits the sparsity, and reconstructs held-out outputs better than ``obs`` does."""
    torch.manual_seed(0)
    mix = torch.randn(48, 48)
    net = nn.Sequential(nn.Linear(48, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(),
                        nn.Linear(64, 8))  # fmt: skip
    x, held = torch.randn(512, 48) @ mix, torch.randn(256, 48) @ mix
    with torch.no_grad():
        ref = net(held)

    def err(method: str, **kw: object) -> float:
        small, report = spectrim.compress(net, x, method, "sparsity=0.8", structured=False,
                                          refit=True, **kw)  # fmt: skip
        assert abs(report.sparsity - 0.8) < 0.01
        with torch.no_grad():
            return float((small(held) - ref).norm() / ref.norm())

    for kw in ({}, {"allocation": "curves"}, {"rounds": 3}):
        e_obc, e_obs = err("obc", **kw), err("obs", **kw)
        assert e_obc < e_obs, (kw, e_obc, e_obs)
    with pytest.raises(ValueError, match="n:m"):
        spectrim.compress(net, x, "obc", "sparsity=2:4")
    with pytest.raises(ValueError, match="reach"):
        spectrim.compress(net, x, "obc", "sparsity=0.5", reach=0.5)


def test_refit_ridge_with_the_zero_prior_shrinks_the_refit() -> None:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 4))
    x = torch.randn(256, 32)
    norms = []
    for ridge in (0.0, 1.0, 1e3):
        small, _ = spectrim.compress(
            net, x, "magnitude", "sparsity=0.5", refit=True, refit_ridge=ridge,
            refit_prior="zero", structured=False,
        )  # fmt: skip
        norms.append(float(small[0].weight.detach().norm()))
    assert norms[0] > norms[1] > norms[2]
    with pytest.raises(ValueError, match="refit_ridge"):
        spectrim.compress(net, x, "obs", "sparsity=0.5", refit=True, refit_ridge=-1.0)


def test_refit_prior_weights_pulls_the_refit_towards_the_weights() -> None:
    """``refit_prior="weights"``: a large ridge keeps the masked original weights (where
    the zero prior shrinks them), a tiny one is the exact refit."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 4))
    x = torch.randn(256, 32)

    def first(**kw: object) -> torch.Tensor:
        kw.setdefault("refit", True)
        small, _ = spectrim.compress(net, x, "magnitude", "sparsity=0.5", structured=False,
                                     **kw)  # fmt: skip
        return small[0].weight.detach()

    masked = first(refit=False)
    held = first(refit_ridge=1e6, refit_prior="weights")
    assert torch.allclose(held, masked, atol=1e-4)
    shrunk = first(refit_ridge=1e6, refit_prior="zero")
    assert float(shrunk.norm()) < 1e-2 * float(masked.norm())
    exact = first()
    assert torch.allclose(first(refit_ridge=1e-9, refit_prior="weights"), exact, atol=1e-4)
    assert not torch.allclose(exact, masked, atol=1e-3)  # the refit does move the weights
    # for a mask-only method its values are the masked weights: "values" (the default)
    # is "weights"
    assert torch.allclose(first(refit_ridge=1e6), held)
    with pytest.raises(ValueError, match="refit_prior"):
        spectrim.compress(net, x, "obs", "sparsity=0.5", refit=True, refit_prior="mean")


def test_refit_prior_values_pulls_obs_refit_towards_obs_values() -> None:
    """``refit_prior="values"`` with obs: a large ridge returns OBS's own updated values
    (not the masked original), a tiny one the exact refit."""
    torch.manual_seed(1)
    net = nn.Sequential(nn.Linear(24, 16), nn.ReLU(), nn.Linear(16, 4))
    x = torch.randn(200, 24)

    def first(**kw: object) -> torch.Tensor:
        small, _ = spectrim.compress(net, x, "obs", "sparsity=0.6", structured=False, **kw)
        return small[0].weight.detach()

    obs = first()
    assert torch.allclose(first(refit=True, refit_ridge=1e7, refit_prior="values"), obs, atol=1e-4)
    assert not torch.allclose(
        first(refit=True, refit_ridge=1e7, refit_prior="weights"), obs, atol=1e-3
    )
    exact = first(refit=True)
    assert torch.allclose(first(refit=True, refit_ridge=1e-9, refit_prior="values"), exact,
                          atol=1e-4)  # fmt: skip


def test_output_allocation_weights_curves_by_the_measured_gain() -> None:
    """``allocation="output"``: each matrix's gain is the model-output error with that
    matrix alone sparsified over its own output error (checked by brute force), and the
    layer whose errors the network amplifies is kept denser than under ``"curves"``."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(8, 32), nn.Tanh(), nn.Linear(32, 32), nn.Tanh(), nn.Linear(32, 4))
    with torch.no_grad():
        net[4].weight.mul_(20.0)  # the last layer amplifies what reaches it
    x = torch.randn(512, 8)
    _, rep = spectrim.compress(net, x, "magnitude", "sparsity=0.6", allocation="output")
    gains, dens = rep.config["solved"]["output_gains"], rep.config["solved"]["densities"]
    assert set(gains) == {"0", "2", "4"}
    assert abs(rep.sparsity - 0.6) < 0.02
    # brute force, matrix "0" at the probe density (the grid point nearest 0.4 kept)
    from spectrim._sparsify import CURVE_GRID

    d = float(CURVE_GRID[int(np.argmin(np.abs(CURVE_GRID - 0.4)))])
    w = net[0].weight.detach().double()
    k = round(d * w.numel())
    thr = w.abs().flatten().sort(descending=True).values[k - 1]
    w_s = torch.where(w.abs() >= thr, w, 0.0)
    probe = x[:128]  # the gain's numerator: the first 128 examples; its denominator: all
    xin = x.double()
    own = float(((xin @ (w - w_s).T) ** 2).sum() / ((xin @ w.T) ** 2).sum())
    twin = __import__("copy").deepcopy(net)
    with torch.no_grad():
        twin[0].weight.copy_(w_s.float())
        ref, out = net(probe).double(), twin(probe).double()
    final = float(((out - ref) ** 2).sum() / (ref**2).sum())
    assert gains["0"] == pytest.approx(final / own, rel=1e-3)
    _, rep_c = spectrim.compress(net, x, "magnitude", "sparsity=0.6", allocation="curves")
    assert dens["2"] >= rep_c.config["solved"]["densities"]["2"] - 1e-9


def test_rounds_reach_the_target_in_steps_and_refit_to_the_original() -> None:
    """``rounds=R``: the same final sparsity through R sequential passes; with
    ``refit_to="original"`` each refit reconstructs the original model's outputs (checked
    on the first layer, whose inputs never change, against ``lstsq`` row by row), by
    default those of the model the round started from; ``rounds=1`` is the default."""
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Linear(12, 32), nn.Tanh(), nn.Linear(32, 32), nn.Tanh(), nn.Linear(32, 4)
    )
    x = torch.randn(512, 12)
    kw = {"refit": True, "structured": False}
    base, _ = spectrim.compress(net, x, "obs", "sparsity=0.8", **kw)
    same, _ = spectrim.compress(net, x, "obs", "sparsity=0.8", rounds=1, **kw)
    assert all(
        torch.equal(a, b) for a, b in zip(base.state_dict().values(), same.state_dict().values())
    )
    steps, rep = spectrim.compress(
        net, x, "obs", "sparsity=0.8", rounds=3, refit_to="original", **kw
    )
    assert rep.config["solved"]["rounds"] == 3 and abs(rep.sparsity - 0.8) < 0.01
    w = steps[0].weight.detach().double()
    assert not torch.equal(w, base[0].weight.detach().double())  # another path, another mask
    xd, target = x.double(), (x.double() @ net[0].weight.detach().double().T)
    for row in range(w.shape[0]):
        cols = torch.nonzero(w[row]).flatten()
        sol = torch.linalg.lstsq(xd[:, cols], target[:, row : row + 1]).solution.flatten()
        torch.testing.assert_close(w[row, cols], sol, rtol=1e-4, atol=1e-5)
    chained, rep_c = spectrim.compress(net, x, "obs", "sparsity=0.8", rounds=3, **kw)
    assert abs(rep_c.sparsity - 0.8) < 0.01
    # the first layer's nested least-squares projections agree (P_r P_{r-1} = P_r), the
    # second layer's do not: its targets are the last round's outputs, not the original's
    torch.testing.assert_close(chained[0].weight, steps[0].weight, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(chained[2].weight, steps[2].weight, atol=1e-3)
    with pytest.raises(ValueError, match="refit_to"):
        spectrim.compress(net, x, "obs", "sparsity=0.5", rounds=2, refit_to="teacher")
    with pytest.raises(ValueError, match="rounds"):
        spectrim.compress(net, x, "obs", "sparsity=2:4", rounds=2)
    with pytest.raises(ValueError, match="rounds"):
        spectrim.compress(net, x, "magnitude", "sparsity=0.5", rounds=2, scope="global")
