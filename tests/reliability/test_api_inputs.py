"""Bad input to the Python API: a specific exception whose message names the culprit, or a
warning where the run can go on; never a deep traceback, never a silently wrong model."""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import spectrim
from spectrim.api import _say_if_unchanged
from spectrim.calibration.checks import CalibrationError
from spectrim.config import CompressConfig, UnreachableTargetError
from spectrim.zoo import CifarResNet, train_digits_cnn


@pytest.fixture(scope="module")
def digits() -> tuple[nn.Module, torch.Tensor, TensorDataset, TensorDataset]:
    model, train, test = train_digits_cnn(seed=0, epochs=3)
    return model.eval(), train.tensors[0][:400].clone(), train, test


def _x(digits: Any) -> torch.Tensor:
    return digits[1].clone()


def _nan_at(i: int, value: float = float("nan")) -> Callable[[Any], Any]:
    def make(d: Any) -> torch.Tensor:
        x = _x(d)
        x[i, 0, 2, 3] = value
        return x

    return make


class _NanInside(nn.Module):
    """Finite on most inputs; the hidden layer divides by zero where x[:, 0] == 5."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(4, 16), nn.Linear(16, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.a(x))
        h = h / (x[:, :1] - 5.0).abs().clamp_max(1.0)  # inf at x0 == 5
        return self.b(h)


def _nan_inside_data(_: Any) -> torch.Tensor:
    x = torch.randn(300, 4)
    x[200, 0] = 5.0  # batch 3, example 200
    return x


# (id, model builder, calibration builder, keyword arguments, exception, message parts)
ERRORS: list[Any] = [
    ("model not a module", lambda d: "resnet", _x, {}, TypeError, ["torch.nn.Module", "str"]),
    ("empty tensor", None, lambda d: torch.zeros(0, 1, 8, 8), {}, ValueError, ["empty"]),
    ("empty list", None, lambda d: [], {}, ValueError, ["no batches"]),
    ("calibration of wrong type", None, lambda d: 3, {}, TypeError, ["int", "not supported"]),
    ("batch without tensor", None, lambda d: [[1, 2]], {}, TypeError, ["holds no tensor"]),
    ("wrong input shape", None, lambda d: torch.randn(8, 3, 32, 32), {}, ValueError,
     ["fails on the first calibration batch by itself", "channels", "inputs the kind and size"]),
    ("wrong dtype", None, lambda d: torch.randint(0, 5, (8, 1, 8, 8)), {}, ValueError,
     ["by itself", "before spectrim changes anything"]),
    ("NaN in example 0", None, _nan_at(0), {}, CalibrationError,
     ["batch 0", "example 0", "NaN or inf"]),
    ("inf in example 130", None, _nan_at(130, float("inf")), {}, CalibrationError,
     ["batch 2", "example 130", "index 2"]),
    ("NaN in a dict input", None,
     lambda d: [{"x": torch.tensor([[0.0, float("nan")]])}], {}, CalibrationError,
     ["input ['x']", "example 0"]),
    ("NaN made by the model", lambda d: _NanInside(), _nan_inside_data, {}, CalibrationError,
     ["'b'", "batch 3", "example 200"]),
    ("all-zero calibration", None, lambda d: torch.zeros(64, 1, 8, 8), {}, CalibrationError,
     ["all 64 examples are identical"]),
    ("constant calibration", None, lambda d: torch.full((32, 1, 8, 8), 0.3), {},
     CalibrationError, ["identical"]),
    ("labelled loader", None, lambda d: DataLoader(d[2], batch_size=64), {}, ValueError,
     ["by itself", "inputs_only"]),
    ("malformed target", None, _x, {"target": "macs"}, ValueError, ["'macs'", "macs=0.5"]),
    ("non-numeric target", None, _x, {"target": "macs=abc"}, ValueError, ["'abc'"]),
    ("unknown target kind", None, _x, {"target": "flops=0.5"}, ValueError, ["flops"]),
    ("target out of range", None, _x, {"target": "macs=1.5"}, ValueError, ["macs=1.5", "(0, 1]"]),
    ("error target out of range", None, _x, {"target": "error=1"}, ValueError, ["[0, 1)"]),
    ("unknown method", None, _x, {"method": "svd"}, ValueError, ["'svd'", "available"]),
    ("unknown option", None, _x, {"rigde": 0.1}, ValueError, ["rigde"]),
    ("option of the wrong type", None, _x, {"ridge": "abc"}, ValueError,
     ["ridge='abc'", "number"]),
    ("option not finite", None, _x, {"ridge": float("nan")}, ValueError, ["finite"]),
    ("bad round_to", None, _x, {"round_to": 0}, ValueError, ["round_to"]),
    ("bad on_unreachable", None, _x, {"on_unreachable": "maybe"}, ValueError, ["stop"]),
    ("bad max_error", None, _x, {"max_error": 0}, ValueError, ["max_error"]),
    ("unreachable, raise", lambda d: CifarResNet(8, width=8).eval(),
     lambda d: torch.randn(64, 3, 16, 16), {"target": "macs=0.01", "on_unreachable": "raise"},
     UnreachableTargetError, ["macs=0.01 is unreachable", "pinned", "pads the channel axis"]),
]  # fmt: skip


@pytest.mark.parametrize(
    ("build", "data", "kwargs", "exc", "parts"),
    [pytest.param(*row[1:], id=row[0]) for row in ERRORS],
)
def test_api_errors(digits, build, data, kwargs, exc, parts) -> None:
    model = digits[0] if build is None else build(digits)
    with pytest.raises(exc) as info:
        spectrim.compress(model, data(digits), **kwargs)
    msg = str(info.value)
    for part in parts:
        assert part in msg, msg


def test_too_few_examples_keep_the_model_and_say_so(digits) -> None:
    """--calib 3 --target error=0 used to report 0.0000 everywhere and keep 29.4%."""
    model, x, _, test = digits
    xt, yt = test.tensors
    for n in (3, 1):
        small, report = spectrim.compress(model, x[:n], target="error=0")
        with torch.no_grad():
            acc = (small(xt).argmax(1) == yt).float().mean().item()
            ref = (model(xt).argmax(1) == yt).float().mean().item()
        assert acc >= ref - 0.01, (n, acc, report.table())
        fc1 = next(g for g in report.groups if g.name == "fc1")
        assert fc1.width_after == fc1.width_before and fc1.rows == n
        assert "calibration rows" in (fc1.pinned or "")
        (warning,) = [w for w in report.warnings if "'fc1'" in w]
        assert "128 channels" in warning and f"{n} calibration rows" in warning
        assert not [g for g in report.groups if g.pinned is None and g.predicted_error == 0.0
                    and g.width_after < g.width_before]  # fmt: skip
    _, one = spectrim.compress(model, x[:1], target="error=0")
    assert any("single example" in w for w in one.warnings)


def test_repeated_examples_count_once(digits) -> None:
    model, x, _, _ = digits
    _, report = spectrim.compress(model, x[:20].repeat(10, 1, 1, 1), target="macs=0.5")
    assert any("only 20 of the 200 examples are distinct" in w for w in report.warnings)
    fc1 = next(g for g in report.groups if g.name == "fc1")
    assert fc1.rows == 20 and fc1.width_after == 128  # 20 distinct rows for 128 channels


def test_predicted_error_is_never_optimistic_zero(digits) -> None:
    """With few rows per channel the reported errors are larger than in-sample ones."""
    model, x, _, _ = digits
    _, report = spectrim.compress(model, x[:150], target="width=0.5", sequential=False)
    fc1 = next(g for g in report.groups if g.name == "fc1")
    assert fc1.rows == 150 and fc1.predicted_error is not None
    # the in-sample (calibration-row) error of the same selection is smaller
    in_sample = max(fc1.consumer_errors.values())
    assert fc1.predicted_error > 1.2 * in_sample > 0


@pytest.mark.parametrize("fit", ["inputs", "residual"])
def test_inplace_failure_restores_the_model(digits, monkeypatch, state_hash, fit) -> None:
    """A run that fails after the surgery leaves an inplace model exactly as it was (the
    output fits once wrote into a consumer's bias, which the surgery had kept)."""
    import spectrim._prune as api

    x = digits[1]
    net = train_digits_cnn(seed=1, epochs=1)[0].eval()
    before = state_hash(net)
    strides = {n: p.stride() for n, p in net.named_parameters()}
    ref = net(x[:8])
    real = api.sequential_correct

    def fail_after(*args: Any, **kwargs: Any) -> Any:
        real(*args, **kwargs)  # the model is pruned now
        raise RuntimeError("disk full")

    monkeypatch.setattr(api, "sequential_correct", fail_after)
    with pytest.raises(RuntimeError, match="disk full"):
        spectrim.compress(net, x, target="macs=0.5", inplace=True, sequential_fit=fit)
    assert state_hash(net) == before
    assert {n: p.stride() for n, p in net.named_parameters()} == strides
    assert net.conv2.in_channels == 32 and net.fc1.out_features == 128 and not net.training
    with torch.no_grad():
        assert torch.equal(net(x[:8]), ref)
    # and a successful inplace run still prunes the model itself
    monkeypatch.setattr(api, "sequential_correct", real)
    small, _ = spectrim.compress(net, x, target="macs=0.5", inplace=True)
    assert small is net and net.conv2.in_channels < 32


def test_pins_are_summarised_in_warnings(digits) -> None:
    _, report = spectrim.compress(CifarResNet(20).eval(), torch.randn(16, 3, 32, 32))
    (summary,) = [w for w in report.warnings if "unit groups are pinned" in w]
    assert summary.startswith("4 of 13 unit groups are pinned")
    assert "pads the channel axis" in summary and "reaches the model output" in summary


@pytest.mark.parametrize("target", ["heads=0.5", "hidden=0.75", "experts=0.5"])
def test_a_transformer_that_fails_by_itself_is_named_on_every_route(target: str) -> None:
    """Token ids beyond the vocabulary fail in the model's own embedding.  The channel
    route said so; the heads, stream and experts routes crashed in the profiler with the
    bare ``IndexError`` (found by ``benchmarks/held_out.py`` on a misconfigured OLMoE)."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.MixtralConfig(
        vocab_size=50, hidden_size=32, intermediate_size=32, num_hidden_layers=1,
        num_attention_heads=4, num_key_value_heads=2, num_local_experts=2,
    )  # fmt: skip
    model = transformers.MixtralForCausalLM(cfg).eval()
    if target == "hidden=0.75":  # a stream spectrim knows: a LLaMA of the same shape
        llama = {k: getattr(cfg, k) for k in ("vocab_size", "hidden_size", "intermediate_size")}
        model = transformers.LlamaForCausalLM(
            transformers.LlamaConfig(num_hidden_layers=1, num_attention_heads=4, **llama)
        ).eval()
    batches = [{"input_ids": torch.randint(60, 90, (4, 8))}]
    with pytest.raises(ValueError, match="fails on the first calibration batch by itself"):
        spectrim.compress(model, batches, "id", target)


def test_a_smaller_model_asked_for_and_none_made_is_said_in_python_too() -> None:
    """Every group pinned (8 rows for 64 channels, and the output layer): the model comes
    back whole, and a caller who never reads the report hears it from a RuntimeWarning
    naming the reason."""
    torch.manual_seed(0)
    mlp = nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 4)).eval()
    x = torch.randn(8, 16, generator=torch.Generator().manual_seed(1))
    with pytest.warns(RuntimeWarning, match=r"target width=0.5 .* came back unchanged") as seen:
        small, report = spectrim.compress(mlp, x, "id", "width=0.5")
    assert "too few calibration rows" in str(seen[0].message)  # the reason, not only the fact
    assert seen[0].filename == __file__  # points at the caller's line
    assert report.warnings[0] == str(seen[0].message)
    assert report.params_after == report.params_before
    assert all(torch.equal(a, b) for a, b in zip(small.parameters(), mlp.parameters()))
    # with enough rows the same call compresses, and says nothing of the kind
    more = torch.randn(256, 16, generator=torch.Generator().manual_seed(2))
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        _, done = spectrim.compress(mlp, more, "id", "width=0.5")
    assert done.params_after < done.params_before
    assert not any("came back unchanged" in w for w in done.warnings)
    # a target that asks for nothing smaller is no reason to warn
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        spectrim.compress(mlp, x, "id", "width=1.0")
    # nothing pinned but a width that rounds back up: that is the reason given
    narrow = nn.Sequential(nn.Linear(16, 4), nn.ReLU(), nn.Linear(4, 2)).eval()
    with pytest.warns(RuntimeWarning, match=r"not pinned kept every channel") as seen:
        _, same = spectrim.compress(narrow, more, "id", "width=0.9")
    assert same.params_after == same.params_before and "too few" not in str(seen[0].message)
    # an unreachable target where max_error holds every group at its full width: the
    # reason is the error bound, not a rounding
    with pytest.warns(RuntimeWarning, match=r"exceed max_error=1e-06") as seen:
        _, held = spectrim.compress(mlp, more, "id", "macs=0.01", max_error=1e-6)
    assert held.params_after == held.params_before
    assert "rounds up" not in str(seen[0].message)
    assert "is unreachable" in held.warnings[-1] and "stopped at macs=1.000" in held.warnings[-1]
    # the reason is read from the report's data, which names the group the bound held
    assert held.allocation is not None and not held.allocation["reachable"]
    assert held.allocation["held"] == ["0"] and held.allocation["reached"] == 1.0
    assert "of the 1 group(s) that could shrink ('0')" in str(seen[0].message)
    # reworded allocator text changes nothing: the check reads report.allocation
    held.warnings = [w for w in held.warnings if "is unreachable" not in w]
    held.warnings.pop(0)
    with pytest.warns(RuntimeWarning, match=r"exceed max_error=1e-06"):
        _say_if_unchanged(held, CompressConfig(method="id", target="macs=0.01", max_error=1e-6))
    _, met = spectrim.compress(mlp, more, "id", "macs=0.5")  # a budget met: reachable, none held
    assert met.allocation is not None and met.allocation["reachable"] and not met.allocation["held"]
    assert met.allocation["reached"] == pytest.approx(met.macs_ratio, abs=0.02)
    assert done.allocation is None  # a width target allocates nothing


def test_only_rank_0_of_a_team_warns_that_nothing_shrank(monkeypatch: pytest.MonkeyPatch) -> None:
    """Under torchrun every rank computes the same report; the RuntimeWarning comes from
    rank 0 alone (the others' reports still carry the message), so N processes do not
    print it N times."""
    from spectrim.distributed import Team

    torch.manual_seed(0)
    mlp = nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 4)).eval()
    x = torch.randn(8, 16, generator=torch.Generator().manual_seed(1))
    monkeypatch.setattr(Team, "is_root", property(lambda self: False))
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        _, report = spectrim.compress(mlp, x, "id", "width=0.5")
    assert "came back unchanged" in report.warnings[0]
    monkeypatch.undo()
    with pytest.warns(RuntimeWarning, match="came back unchanged"):
        spectrim.compress(mlp, x, "id", "width=0.5")
