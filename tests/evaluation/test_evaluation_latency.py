"""Tests of spectrim.evaluation.latency (no timing assertions beyond "positive and finite")."""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch import nn

from spectrim.evaluation import LatencyResult, compare_latency, measure_latency


class _Recorder(nn.Module):
    """A linear layer that appends its tag to a shared log on every call."""

    def __init__(self, tag: str, log: list[str], width: int = 32) -> None:
        super().__init__()
        self.tag, self.log = tag, log
        self.linear = nn.Linear(width, width)
        self.seen_training: list[bool] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.log.append(self.tag)
        self.seen_training.append(self.training)
        return self.linear(x)


def _assert_sane(result: LatencyResult) -> None:
    for value in (result.median, result.p10, result.p90, result.per_example):
        assert value > 0 and math.isfinite(value)
    assert result.p10 <= result.median <= result.p90


def test_measure_latency_statistics_and_call_count() -> None:
    log: list[str] = []
    model = _Recorder("a", log)
    result = measure_latency(model, torch.randn(4, 32), warmup=2, repeats=7)
    _assert_sane(result)
    assert result.batch_size == 4 and result.repeats == 7
    assert result.per_example == pytest.approx(result.median / 4)
    assert log == ["a"] * 9
    json.loads(json.dumps(result.to_dict()))


def test_measure_latency_restores_state() -> None:
    model = _Recorder("a", [])
    model.train()
    threads = torch.get_num_threads()
    measure_latency(model, torch.randn(2, 32), warmup=1, repeats=3, threads=1)
    assert not any(model.seen_training)  # timed in eval mode
    assert model.training and model.linear.training
    assert torch.get_num_threads() == threads
    assert torch.is_grad_enabled()


def test_measure_latency_dict_and_tuple_inputs() -> None:
    class TwoInputs(nn.Module):
        def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
            return a @ b.transpose(-2, -1)

    x, z = torch.randn(3, 4, 8), torch.randn(3, 5, 8)
    assert measure_latency(TwoInputs(), {"a": x, "b": z}, repeats=2).batch_size == 3
    assert measure_latency(TwoInputs(), (x, z), repeats=2).batch_size == 3


def test_compare_latency_interleaves_and_reports_speedup() -> None:
    log: list[str] = []
    original, compressed = _Recorder("A", log, 64), _Recorder("B", log, 64)
    report = compare_latency(original, compressed, torch.randn(8, 64), warmup=1, repeats=4)
    # counterbalanced interleaving: AB BA AB BA ... over warmup + repeats rounds
    assert "".join(log) == "AB" + "BA" + "AB" + "BA" + "AB"
    assert report["speedup"] == pytest.approx(
        report["original_median"] / report["compressed_median"]
    )
    assert report["speedup"] > 0 and math.isfinite(report["speedup"])
    for key in ("original", "compressed"):
        _assert_sane(LatencyResult(**{k: v for k, v in report[key].items() if k != "per_example"}))
        assert report[key]["repeats"] == 4
    assert report["batch_size"] == 8 and report["repeats"] == 4
    json.loads(json.dumps(report))


def test_invalid_arguments_raise() -> None:
    model = nn.Linear(2, 2)
    x = torch.randn(1, 2)
    with pytest.raises(ValueError, match="repeats"):
        measure_latency(model, x, repeats=0)
    with pytest.raises(ValueError, match="warmup"):
        compare_latency(model, model, x, warmup=-1)
    with pytest.raises(ValueError, match="threads"):
        measure_latency(model, x, threads=0)
    with pytest.raises(TypeError, match="'float'"):
        measure_latency(model, 1.5)
    with pytest.raises(TypeError, match="'NoneType'"):
        compare_latency(model, None, x)  # type: ignore[arg-type]
