"""The public entry point ``spectrim.compress``: inputs, errors, the report."""

from __future__ import annotations

import copy
import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import spectrim
from spectrim import CompressConfig, CompressionReport, Target
from spectrim.evaluation import profile


class Net(nn.Module):
    """Small CNN with a residual add and a flatten head."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1)
        self.bn = nn.BatchNorm2d(16)
        self.c1 = nn.Conv2d(16, 24, 3, padding=1)
        self.c2 = nn.Conv2d(24, 16, 3, padding=1)
        self.fc1 = nn.Linear(16 * 2 * 2, 32)
        self.fc2 = nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn(self.stem(x)))
        x = F.relu(x + self.c2(F.relu(self.c1(x))))
        x = torch.flatten(F.adaptive_avg_pool2d(x, 2), 1)
        return self.fc2(F.relu(self.fc1(x)))


class KwNet(nn.Module):
    """Takes keyword inputs (Hugging Face style): ``model(pixels=..., scale=...)``."""

    def __init__(self) -> None:
        super().__init__()
        self.net = Net()

    def forward(self, pixels: torch.Tensor, scale: torch.Tensor | None = None) -> torch.Tensor:
        if scale is not None:
            pixels = pixels * scale
        return self.net(pixels)


@pytest.fixture
def net() -> nn.Module:
    torch.manual_seed(0)
    return Net().eval()


@pytest.fixture
def images() -> torch.Tensor:
    return torch.randn(96, 3, 8, 8, generator=torch.Generator().manual_seed(1))


def outputs(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(x)


# ------------------------------------------------------------------- model ownership


def test_users_model_is_untouched(net: nn.Module, images: torch.Tensor, state_hash) -> None:
    net.train()  # compress must not even flip the training flag
    h = state_hash(net)
    ref = outputs(copy.deepcopy(net).eval(), images)
    small, report = spectrim.compress(net, images, method="id", target="macs=0.5")
    assert small is not net
    assert state_hash(net) == h
    assert net.training
    assert (net.stem.out_channels, net.c1.out_channels, net.fc1.out_features) == (16, 24, 32)
    assert torch.equal(outputs(copy.deepcopy(net).eval(), images), ref)
    assert report.macs_after < report.macs_before
    assert profile(small, images[:2]).macs == report.macs_after
    # the compressed model shares no storage with the original
    ptrs = {p.data_ptr() for p in net.parameters()}
    assert not ptrs & {p.data_ptr() for p in small.parameters()}


def test_inplace_modifies_and_returns_the_model(
    net: nn.Module, images: torch.Tensor, state_hash
) -> None:
    h = state_hash(net)
    small, report = spectrim.compress(net, images, method="id", target="width=0.5", inplace=True)
    assert small is net
    assert state_hash(net) != h
    assert net.stem.out_channels == 8 and net.c1.out_channels == 12
    assert net.fc1.in_features == 8 * 4 and net.fc1.out_features == 16
    assert report.widths["stem"] == [16, 8]
    assert outputs(net, images).shape == (96, 10)


# ---------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    "target,culprit",
    [
        ("macs=2", "macs=2"),
        ("macs=0", "macs=0"),
        ("params=-0.5", "params=-0.5"),
        ("error=1.5", "error=1.5"),
        ("speed=0.5", "speed"),
        ("macs", "macs"),
        ("macs=half", "half"),
        ("", "''"),
    ],
)
def test_bad_target_raises_value_error_naming_it(
    net: nn.Module, images: torch.Tensor, target: str, culprit: str
) -> None:
    with pytest.raises(ValueError) as info:
        spectrim.compress(net, images, method="id", target=target)
    assert culprit in str(info.value)


def test_unknown_method_raises_value_error_listing_available(
    net: nn.Module, images: torch.Tensor
) -> None:
    with pytest.raises(ValueError, match="unknown method 'svd-magic'") as info:
        spectrim.compress(net, images, method="svd-magic", target="macs=0.5")
    for name in spectrim.available_methods():
        assert name in str(info.value)
    assert "id" in spectrim.available_methods()


def test_unknown_option_and_bad_option_value_are_named(
    net: nn.Module, images: torch.Tensor
) -> None:
    with pytest.raises(ValueError, match="frobnicate"):
        spectrim.compress(net, images, method="id", target="macs=0.5", frobnicate=3)
    with pytest.raises(ValueError, match="ridge"):
        spectrim.compress(net, images, method="id", target="macs=0.5", ridge=-1.0)
    with pytest.raises(ValueError, match="round_to"):
        spectrim.compress(net, images, method="id", target="macs=0.5", round_to=0)
    with pytest.raises(ValueError, match="min_width"):
        spectrim.compress(net, images, method="id", target="macs=0.5", min_width=0)


@pytest.mark.parametrize(
    "calibration,exc,culprit",
    [
        (42, TypeError, "int"),
        (3.5, TypeError, "float"),
        (None, TypeError, "NoneType"),
        (torch.empty(0, 3, 8, 8), ValueError, "empty"),
        (torch.tensor(1.0), ValueError, "empty"),
        ([], ValueError, "no batches"),
    ],
)
def test_bad_calibration_raises_naming_the_culprit(
    net: nn.Module, calibration: object, exc: type[Exception], culprit: str
) -> None:
    with pytest.raises(exc, match=culprit):
        spectrim.compress(net, calibration, method="id", target="macs=0.5")


def test_bad_calibration_batch_type_raises_type_error(net: nn.Module) -> None:
    with pytest.raises(TypeError, match="str"):
        spectrim.compress(net, ["not", "tensors"], method="id", target="macs=0.5")


def test_non_module_model_raises_type_error(images: torch.Tensor) -> None:
    with pytest.raises(TypeError, match="function"):
        spectrim.compress(lambda x: x, images, method="id", target="macs=0.5")  # type: ignore[arg-type]


# ------------------------------------------------------------------------ the report


def test_report_round_trips_through_json(net: nn.Module, images: torch.Tensor, tmp_path) -> None:
    _, report = spectrim.compress(net, images, method="id", target="macs=0.6", round_to=2)
    path = tmp_path / "report.json"
    text = report.to_json(path)
    assert path.read_text() == text
    d = json.loads(text)
    again = CompressionReport.from_dict(d)
    assert again == report
    assert again.to_json() == text
    assert d["method"] == "id" and d["target"] == "macs=0.6"
    assert d["config"]["round_to"] == 2
    assert d["macs_ratio"] == pytest.approx(report.macs_after / report.macs_before)
    assert d["params_ratio"] == pytest.approx(report.params_after / report.params_before)
    assert d["widths"] == {k: list(v) for k, v in report.widths.items()}
    assert d["calibration_rows"] == 96
    assert {g["name"] for g in d["groups"]} == {"stem", "c1", "fc1", "fc2"}
    for g in d["groups"]:
        if g["name"] == "fc2":
            assert g["pinned"] == "reaches the model output"
        else:
            assert g["pinned"] is None and 0 <= g["predicted_error"] <= 1
            assert g["width_after"] % 2 == 0 or g["width_after"] == g["width_before"]
    # the recorded config reproduces the run
    cfg = CompressConfig.from_dict(d["config"])
    assert cfg.parsed_target == Target("macs", 0.6)
    _, report2 = spectrim.compress(net, images, config=cfg)
    assert report2.widths == report.widths
    assert "pinned" in report.table() and "stem" in report.table()


def test_config_object_and_explicit_arguments(net: nn.Module, images: torch.Tensor) -> None:
    cfg = CompressConfig(method="l1", target="width=0.25")
    _, r1 = spectrim.compress(net, images, config=cfg)
    assert r1.method == "l1" and r1.widths["c1"] == [24, 6]
    _, r2 = spectrim.compress(net, images, method="id", target="width=0.5", config=cfg)
    assert r2.method == "id" and r2.widths["c1"] == [24, 12]
    # a config in the method's place is the config (torchao's compress(model, config) habit)
    _, r3 = spectrim.compress(net, images, cfg)
    assert r3.method == "l1" and r3.widths == r1.widths
    with pytest.raises(TypeError, match="both as method and as config"):
        spectrim.compress(net, images, cfg, config=cfg)
    with pytest.raises(TypeError, match="method must be a method name"):
        spectrim.compress(net, images, {"method": "id"})  # type: ignore[arg-type]


# --------------------------------------------------------------- calibration formats


def test_calibration_formats_agree(images: torch.Tensor) -> None:
    """A tensor, a labelled TensorDataset, a list of dict batches and a labelled
    DataLoader through ``inputs_only`` give the same compression."""
    torch.manual_seed(0)
    base = Net().eval()
    kw = KwNet().eval()
    kw.net.load_state_dict(base.state_dict())
    labels = torch.randint(0, 10, (len(images),))
    runs = {
        "tensor": (base, images),
        "dataset": (base, TensorDataset(images, labels)),
        "loader": (base, spectrim.inputs_only(DataLoader(TensorDataset(images, labels), 32))),
        "dicts": (kw, [{"pixels": b} for b in images.split(32)]),
        "dicts+kwarg": (
            kw,
            [{"pixels": b, "scale": torch.ones(len(b), 1, 1, 1)} for b in images.split(48)],
        ),
    }
    results = {}
    for name, (model, calib) in runs.items():
        # all examples in the sequential fits too, so batch boundaries cannot matter
        small, report = spectrim.compress(
            model, calib, method="id", target="macs=0.5", sequential_fraction=1.0
        )
        assert report.calibration_rows == len(images), name
        assert report.macs_after < 0.51 * report.macs_before, name
        results[name] = (small, report)
    ref_widths = {k: v for k, v in results["tensor"][1].widths.items()}
    ref_out = outputs(results["tensor"][0], images)
    for name, (small, report) in results.items():
        widths = {k.removeprefix("net."): v for k, v in report.widths.items()}
        assert widths == ref_widths, name
        out = outputs(small.net if isinstance(small, KwNet) else small, images)
        assert torch.allclose(out, ref_out, rtol=1e-4, atol=1e-4 * float(ref_out.abs().max())), name


def test_dict_batch_with_scalar_tensor_kwarg(images: torch.Tensor) -> None:
    torch.manual_seed(0)
    model = KwNet().eval()
    calib = [{"pixels": b, "scale": torch.tensor(1.0)} for b in images.split(48)]
    small, report = spectrim.compress(model, calib, method="id", target="macs=0.5")
    assert report.macs_after < report.macs_before
    assert small(pixels=images, scale=torch.tensor(1.0)).shape == (96, 10)


def test_tuple_batches_are_positional_arguments() -> None:
    class TwoInputs(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Linear(6, 12)
            self.b = nn.Linear(12, 3)

        def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            return self.b(F.relu(self.a(x + y)))

    torch.manual_seed(0)
    model = TwoInputs().eval()
    x, y = torch.randn(64, 6), torch.randn(64, 6)
    small, report = spectrim.compress(
        model, [(x[:32], y[:32]), (x[32:], y[32:])], target="width=0.5"
    )
    assert report.widths["a"] == [12, 6]
    assert small(x, y).shape == (64, 3)


def test_magnitude_methods_run_without_statistics(net: nn.Module, images: torch.Tensor) -> None:
    for method in ("l1", "l2", "random"):
        small, report = spectrim.compress(net, images, method=method, target="macs=0.5")
        assert report.method == method
        assert report.macs_after <= 0.5 * report.macs_before
        assert outputs(small, images).shape == (96, 10)
    # the same seed gives the same random choice, another seed another one
    s1, _ = spectrim.compress(net, images, method="random", target="width=0.5", seed=3)
    s2, _ = spectrim.compress(net, images, method="random", target="width=0.5", seed=3)
    s3, _ = spectrim.compress(net, images, method="random", target="width=0.5", seed=4)
    assert torch.equal(s1.c1.weight, s2.c1.weight)
    assert not torch.equal(s1.c1.weight, s3.c1.weight)
    # the method's own seed option wins over the run's (it reaches the method through the
    # run context, not a special case that passed it twice)
    cfg = spectrim.CompressConfig(method="random", target="width=0.5", options={"seed": 3})
    s4, _ = spectrim.compress(net, images, config=cfg, seed=4)
    assert torch.equal(s1.c1.weight, s4.c1.weight)


def test_channel_run_reports_each_named_stage(net: nn.Module, images: torch.Tensor) -> None:
    _, report = spectrim.compress(net, images, method="id", target="macs=0.5")
    stages = ["analysis", "statistics", "selection", "allocation", "apply", "report"]
    assert list(report.timings) == stages
    assert all(t >= 0 for t in report.timings.values())
    assert sum(report.timings.values()) <= report.seconds
