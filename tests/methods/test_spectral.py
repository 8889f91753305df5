"""``method="spectral"``: output-aware weighting, ridge folds, dof budgets, options."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

import spectrim
from spectrim.calibration import collect
from spectrim.graph import analyze_channels
from spectrim.linalg import degrees_of_freedom, gram_spectrum
from spectrim.methods import get_method
from spectrim.methods.spectral import consumer_weight_gram


def _net() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 12, 3, padding=1),
        nn.BatchNorm2d(12),
        nn.ReLU(),
        nn.Conv2d(12, 8, 3, padding=1),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(8 * 6 * 6, 5),
    ).eval()


def test_consumer_weight_gram_conv_and_flatten_brute_force() -> None:
    net = _net()
    pos = np.array([[1], [4], [7]])
    w = net[3].weight.detach().double()  # (8, 12, 3, 3)
    ref = sum(w[:, pos[:, 0], a, b].T @ w[:, pos[:, 0], a, b] for a in range(3) for b in range(3))
    np.testing.assert_allclose(consumer_weight_gram(net[3], pos), ref.numpy(), rtol=1e-12)
    # flatten: channel i occupies columns i*36 .. i*36+35 of the Linear
    fpos = np.arange(8 * 36).reshape(8, 36)
    wl = net[6].weight.detach().double()
    ref_l = sum(wl[:, fpos[:, r]].T @ wl[:, fpos[:, r]] for r in range(36))
    np.testing.assert_allclose(consumer_weight_gram(net[6], fpos), ref_l.numpy(), rtol=1e-12)


def test_theta_changes_the_selection_and_output_aware_lowers_output_error() -> None:
    """θ=0 selects for what the consumers compute: the model's output error is lower than
    with θ=1 (the input-aware selection), measured by running both models."""
    net = _net()
    x = torch.randn(128, 3, 6, 6)
    with torch.no_grad():  # make the consumer care about a few input channels only
        net[3].weight[:, 6:] *= 0.05
    outs = {}
    for theta in (0.0, 1.0):
        small, rep = spectrim.compress(
            net, x, method="spectral", target="width=0.5", theta=theta, tau="none",
            sequential=False,
        )  # fmt: skip
        with torch.no_grad():
            ref = net(x)
            outs[theta] = float((small(x) - ref).norm() / ref.norm())
        assert rep.widths["0"] == [12, 6]
    assert outs[0.0] < outs[1.0]


def test_dof_target_uses_c_times_degrees_of_freedom() -> None:
    net = _net()
    x = torch.randn(96, 3, 6, 6)
    a = analyze_channels(net, x[:2])
    stats = collect(net, a, [x], a.prunable).stats
    for alpha, c in ((1e-3, 1.0), (1e-2, 1.5)):
        _, rep = spectrim.compress(net, x, method="spectral", target=f"dof={alpha}", c=c)
        for g in a.prunable:
            (acc,) = [v for k, v in stats.items() if k[0] == g.index]
            sigma = acc.gram_numpy() / acc.count
            n_dof = degrees_of_freedom(gram_spectrum(sigma), alpha * np.trace(sigma))
            expect = min(max(math.ceil(c * n_dof - 1e-9), 1), g.width)
            assert rep.widths[g.name] == [g.width, expect]
    small_a, _ = spectrim.compress(net, x, method="spectral", target="dof=0.001")
    small_b, _ = spectrim.compress(net, x, method="spectral", target="dof=0.1")
    assert small_b[0].out_channels <= small_a[0].out_channels  # N(λ) decreases in λ
    with pytest.raises(ValueError, match="degrees of freedom"):
        spectrim.compress(net, x, method="id", target="dof=0.01")


def test_sequential_refit_keeps_the_ridge() -> None:
    """In sequential mode the folds are refitted with the same I_τ: larger α shrinks the
    reconstruction, so the folded weights' norm decreases with α (the interpolation's
    folds: an output fit of a convolution has no ridge, docs/design.md §7)."""
    net = _net()
    x = torch.randn(64, 3, 6, 6)
    norms = []
    for alpha in (1e-6, 1e-1):
        small, _ = spectrim.compress(
            net,
            x,
            method="spectral",
            target="width=0.5",
            theta=1.0,
            alpha=alpha,
            sequential_fit="inputs",
        )
        norms.append(float(small[3].weight.detach().norm()))
    assert norms[1] < norms[0]


def test_options_are_validated() -> None:
    for bad, match in (
        ({"theta": 1.5}, "theta"),
        ({"alpha": -1.0}, "alpha"),
        ({"tau": "banana"}, "tau"),
        ({"c": 0.0}, "c="),
        ({"lam": 1.0}, "lam"),
    ):
        with pytest.raises(ValueError, match=match):
            get_method("spectral", **bad)


def test_spectral_beats_l1_on_the_digits_cnn() -> None:
    """Real data: the small CNN of the demo, trained on scikit-learn's digits."""
    from spectrim.evaluation import evaluate
    from spectrim.zoo import train_digits_cnn

    model, train, test = train_digits_cnn(seed=0)
    calib = train.tensors[0][:512]
    acc = {}
    for method in ("spectral", "l1"):
        small, _ = spectrim.compress(model, calib, method=method, target="macs=0.35")
        acc[method] = evaluate(small, test).accuracy
    assert acc["spectral"] > acc["l1"] + 0.05, acc
