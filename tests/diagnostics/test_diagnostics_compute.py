"""spectrim.analyze on real models and data, checked against brute-force computations."""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

import spectrim
from spectrim.diagnostics import CompressibilityReport, GroupDiagnostics
from spectrim.linalg import id_factorize


def _group(report: CompressibilityReport, name: str) -> GroupDiagnostics:
    return next(g for g in report.groups if g.name == name)


def _consumer_rows(model: nn.Module, consumer: str, data: torch.Tensor) -> np.ndarray:
    """The consumer's input activations as (examples × positions, channels), float64."""
    seen: list[torch.Tensor] = []
    module = dict(model.named_modules())[consumer]
    handle = module.register_forward_pre_hook(lambda _m, args: seen.append(args[0].detach()))
    try:
        with torch.no_grad():
            for batch in data.split(64):
                model(batch)
    finally:
        handle.remove()
    x = torch.cat(seen).double()
    return x.permute(0, 2, 3, 1).reshape(-1, x.shape[1]).numpy()


# ---------------------------------------------------------------------------- group statistics


def test_spectra_and_dof_match_brute_force(
    r20_report: CompressibilityReport, resnet20: nn.Module, cifar_calib192: torch.Tensor
) -> None:
    g = _group(r20_report, "layer1.0.conv1")
    assert g.consumers == ["layer1.0.conv2"]
    Z = _consumer_rows(resnet20, "layer1.0.conv2", cifar_calib192)
    assert g.rows == Z.shape[0] == 192 * 32 * 32
    sigma = Z.T @ Z / Z.shape[0]
    tr = np.trace(sigma)
    eig = np.sort(np.linalg.eigvalsh(sigma))[::-1] / tr
    got = np.array(g.eigenvalues)
    big = eig > 1e-6
    np.testing.assert_allclose(got[big], eig[big], rtol=1e-4)
    assert got.sum() == pytest.approx(1.0, abs=1e-9)
    for alpha, dof in zip(r20_report.alphas, g.dof):
        lam = alpha * tr
        brute = np.trace(sigma @ np.linalg.inv(sigma + lam * np.eye(16)))
        assert dof == pytest.approx(brute, rel=1e-4)


def test_dof_bounded_and_decreasing_in_lambda(r20_report: CompressibilityReport) -> None:
    assert len(r20_report.groups) == 9  # the 9 block-internal convs of ResNet-20
    for g in r20_report.groups:
        dof = np.array(g.dof)
        assert np.all(dof <= g.rank + 1e-9) and g.rank <= g.width
        assert np.all(np.diff(dof) < 0), g.name  # alphas ascending: N(λ) strictly falls
        assert 0 < g.effective_rank <= g.rank
        eig = np.array(g.eigenvalues)
        assert len(eig) == g.width and np.all(np.diff(eig) <= 1e-15)


def test_error_curve_and_predicted_width(r20_report: CompressibilityReport) -> None:
    for g in r20_report.groups:
        curve = np.array(g.error_curve)
        assert len(curve) == g.width + 1
        assert curve[0] == pytest.approx(1.0) and curve[-1] == 0.0
        assert np.all(np.diff(curve) <= 1e-12)
        k = g.predicted_width
        assert curve[k] <= r20_report.error < curve[k - 1]
        assert g.predicted_error == curve[k]
        assert g.compressible_fraction == pytest.approx(1 - k / g.width)


def test_duplicated_channels_show_in_rank_and_width(
    resnet20: nn.Module, cifar_calib192: torch.Tensor
) -> None:
    dup = copy.deepcopy(resnet20)
    block = dup.layer1[0]
    with torch.no_grad():
        block.conv1.weight[8:] = block.conv1.weight[:8]
        for t in (block.bn1.weight, block.bn1.bias, block.bn1.running_mean, block.bn1.running_var):
            t[8:] = t[:8]
    calib = cifar_calib192[:64]
    report = spectrim.analyze(dup, calib, heldout=calib, sensitivity=False, verify=False)
    g = _group(report, "layer1.0.conv1")
    assert g.rank <= 8 and g.effective_rank <= 8
    assert g.predicted_width <= 8 and g.compressible_fraction >= 0.5
    assert max(g.dof) <= 8 + 1e-9
    assert g.error_curve[g.rank] < 1e-5
    # the untouched neighbour keeps its full-rank spectrum
    assert _group(report, "layer1.1.conv1").rank > 8


def test_predicted_vs_measured_heldout_error(
    r20_report: CompressibilityReport,
    resnet20: nn.Module,
    cifar_calib192: torch.Tensor,
    cifar_eval128: TensorDataset,
) -> None:
    """Well sampled (16 channels, 196k rows): held-out error close to the prediction, and
    both equal explicit least squares on the activations themselves."""
    g = _group(r20_report, "layer1.0.conv1")
    k = g.predicted_width
    Zc = _consumer_rows(resnet20, "layer1.0.conv2", cifar_calib192)
    Zh = _consumer_rows(resnet20, "layer1.0.conv2", cifar_eval128.tensors[0])
    S = np.sort(id_factorize(Zc.T @ Zc).selected(k))
    B = np.linalg.lstsq(Zc[:, S], Zc, rcond=None)[0]
    pred = np.linalg.norm(Zc - Zc[:, S] @ B) / np.linalg.norm(Zc)
    meas = np.linalg.norm(Zh - Zh[:, S] @ B) / np.linalg.norm(Zh)
    assert g.predicted_error == pytest.approx(pred, rel=1e-3)
    assert g.measured_error == pytest.approx(meas, rel=1e-3)
    assert g.consumer_errors["layer1.0.conv2"] == pytest.approx(meas, rel=1e-3)
    assert abs(g.measured_error - g.predicted_error) < 0.02
    # every group: same order of magnitude (a few hundred images sample ResNet-20 well)
    for h in r20_report.groups:
        assert h.measured_error is not None
        assert abs(h.measured_error - h.predicted_error) < 0.05, h.name


# ------------------------------------------------------------------------------- sensitivity


def test_sensitivity_from_real_forward_passes(
    r20_report: CompressibilityReport, resnet20: nn.Module, cifar_eval128: TensorDataset
) -> None:
    from spectrim.evaluation import accuracy

    r = r20_report
    assert r.sensitivity_metric == "accuracy"
    assert r.baseline_accuracy == pytest.approx(accuracy(resnet20, cifar_eval128))
    assert "divided by the original's accuracy" in r.sensitivity_meaning
    for g in r.groups:
        s = g.sensitivity
        assert s is not None and s.accuracy is not None and s.kept is not None
        assert s.width == round(0.25 * g.width)
        assert s.kept == pytest.approx(s.accuracy / r.baseline_accuracy)
        assert 0.0 <= s.agreement <= 1.0
    # compressing a layer to a quarter of its width changes some predictions
    assert min(g.sensitivity.agreement for g in r.groups if g.sensitivity) < 1.0
    assert r.spearman is not None and -1.0 <= r.spearman <= 1.0
    assert r.pearson is not None and -1.0 <= r.pearson <= 1.0
    table = r.correlation_table
    assert set(table) == {"N/m vs kept", "N/m vs agreement", "N vs kept", "N vs agreement"}
    assert table["N/m vs kept"] == {"spearman": r.spearman, "pearson": r.pearson}
    from scipy import stats

    x = [g.dof_at_alpha for g in r.groups]
    y = [g.sensitivity.agreement for g in r.groups if g.sensitivity]
    assert table["N vs agreement"]["spearman"] == pytest.approx(stats.spearmanr(x, y).statistic)


def test_sensitivity_accuracy_reproduced_independently(
    r20_report: CompressibilityReport,
    resnet20: nn.Module,
    cifar_calib192: torch.Tensor,
    cifar_eval128: TensorDataset,
) -> None:
    """Rebuild the one-layer compression through the engine and evaluate it separately."""
    from spectrim.calibration import collect
    from spectrim.evaluation import accuracy
    from spectrim.graph import analyze_channels, apply_plan
    from spectrim.methods.interpolative import IDSolver

    g = _group(r20_report, "layer3.2.conv1")
    model = copy.deepcopy(resnet20)
    analysis = analyze_channels(model, cifar_calib192[:2])
    group = analysis.group("layer3.2.conv1")
    stats = collect(model, analysis, list(cifar_calib192.split(64)), [group]).stats
    grams = {c.module: stats[(group.index, c.module)].gram_numpy() for c in group.consumers}
    apply_plan(model, analysis, {group.index: IDSolver(group, grams).plan(16)})
    assert model.layer3[2].conv1.out_channels == 16
    assert g.sensitivity is not None
    assert g.sensitivity.accuracy == pytest.approx(accuracy(model, cifar_eval128), abs=1e-9)


def test_split_heldout_labels_and_spread(
    resnet20: nn.Module,
    cifar_calib192: torch.Tensor,
    state_hash: Callable[[nn.Module], str],
) -> None:
    from spectrim.zoo import load_dataset

    labelled = load_dataset("cifar10", "calib", limit=64)
    before = state_hash(resnet20)
    r = spectrim.analyze(resnet20, labelled, max_sensitivity_groups=3, verify=False)
    assert state_hash(resnet20) == before and not resnet20.training
    assert (r.n_calibration, r.n_heldout) == (48, 16)
    assert "last 16 of 64" in r.heldout_source
    assert r.sensitivity_metric == "accuracy"  # labels came with the TensorDataset
    measured = [i for i, g in enumerate(r.groups) if g.sensitivity is not None]
    assert measured == [0, 4, 8]
    assert any("3 of 9 groups" in n for n in r.notes)

    # unlabelled: agreement with the original's predictions
    r2 = spectrim.analyze(
        resnet20, cifar_calib192[:64], max_sensitivity_groups=2, sensitivity_fraction=0.5
    )
    assert r2.sensitivity_metric == "agreement" and r2.baseline_accuracy is None
    assert "no labels" in r2.sensitivity_meaning
    kept = [g.sensitivity for g in r2.groups if g.sensitivity is not None]
    assert [s.width for s in kept] == [8, 32]
    assert all(s.kept == s.agreement for s in kept)
    assert r2.spearman is None  # two points: no correlation, and the report says why
    assert any("no correlation" in n for n in r2.notes)


# ------------------------------------------------------------------------- other architectures


def test_digits_cnn_flatten_consumer_and_weights() -> None:
    from spectrim.zoo import DigitsCNN, load_dataset

    torch.manual_seed(0)
    model = DigitsCNN().eval()
    x = load_dataset("digits", "train", limit=160).tensors[0]
    r = spectrim.analyze(model, x, sensitivity=False, verify=False)
    assert [g.name for g in r.groups] == ["conv1", "conv2", "conv3", "fc1"]
    conv3 = _group(r, "conv3")
    assert conv3.consumers == ["fc1"]  # read through torch.flatten
    assert conv3.rows == 120 * 16  # 16 repeats of each channel per example
    assert r.sensitivity_metric is None and r.spearman is None
    shapes = {w.name: (w.shape, w.group) for w in r.weights}
    assert shapes == {
        "conv1": ([32, 9], "conv1"),
        "conv2": ([64, 288], "conv2"),
        "conv3": ([64, 576], "conv3"),
        "fc1": ([128, 1024], "fc1"),
        "fc2": ([10, 128], "fc2"),
    }
    assert r.pinned == {"fc2": "reaches the model output"}


def test_weight_diagnostics_brute_force(
    r20_report: CompressibilityReport, resnet20: nn.Module
) -> None:
    w = next(w for w in r20_report.weights if w.name == "layer2.0.conv1")
    W = resnet20.layer2[0].conv1.weight.detach().double().reshape(32, -1).numpy()
    assert w.shape == [32, 144] and w.group == "layer2.0.conv1"

    def pq(v: np.ndarray, p: float = 0.5, q: float = 1.0) -> float:
        d = v.size
        norm_p = np.sum(np.abs(v) ** p) ** (1 / p)
        norm_q = np.sum(np.abs(v) ** q) ** (1 / q)
        return 1 - d ** (1 / q - 1 / p) * norm_p / norm_q

    rows = [pq(r) for r in W]
    assert w.pq_index == pytest.approx(pq(W.ravel()), rel=1e-6)
    assert w.pq_index_row_mean == pytest.approx(np.mean(rows), rel=1e-6)
    assert w.pq_index_row_median == pytest.approx(np.median(rows), rel=1e-6)
    s = np.linalg.svd(W, compute_uv=False)
    assert w.spectral_norm == pytest.approx(s[0], rel=1e-5)
    assert w.stable_rank == pytest.approx(np.sum(s**2) / s[0] ** 2, rel=1e-5)
    assert len(r20_report.weights) == 20  # 19 convs + the classifier
    # the ℓq bound: ⌈d·SI^{−q/(1−q)}⌉ per row with SI = M₁/M_q, q = 0.5
    need = 0
    for r in W:
        a = np.abs(r)
        si = np.mean(a) / np.mean(a**0.5) ** 2
        need += min(int(np.ceil(a.size * si ** (-1.0) - 1e-9)), a.size)
    assert w.lq_keep == need


# ------------------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"alphas": [-1.0]}, "alphas"),
        ({"alphas": []}, "alphas"),
        ({"error": -0.1}, "error"),
        ({"sensitivity_fraction": 0.0}, "sensitivity_fraction"),
        ({"pq": (1.0, 0.5)}, "pq"),
        ({"labels": torch.zeros(5, dtype=torch.long)}, "labels"),
        ({"labels": torch.zeros(48, dtype=torch.float32)}, "integer"),
    ],
)
def test_bad_arguments(kwargs: dict, match: str) -> None:
    net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    with pytest.raises(ValueError, match=match):
        spectrim.analyze(net, torch.randn(64, 4), **kwargs)


def test_single_batch_needs_heldout() -> None:
    net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    batches: Sequence[torch.Tensor] = [torch.randn(32, 4)]
    with pytest.raises(ValueError, match="heldout"):
        spectrim.analyze(net, batches)
    with pytest.raises(TypeError, match=r"nn\.Module"):
        spectrim.analyze("net", torch.randn(8, 4))  # type: ignore[arg-type]
