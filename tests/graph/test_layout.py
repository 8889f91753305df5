"""Memory layout of the internal passes: channels_last only where the model reproduces
its outputs there, and the user's layout restored exactly (strides, not just flags)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import spectrim
from spectrim.graph.layout import (
    memory_formats,
    restore_formats,
    suits_channels_last,
    to_channels_last,
)
from spectrim.zoo import DigitsCNN


class _ViewsActivations(nn.Module):
    """``view`` on a conv output: fine on NCHW, an error on channels_last."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.fc = nn.Linear(4 * 6 * 6, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.conv(x))
        return self.fc(h.view(h.shape[0], -1))


def _strides(model: nn.Module) -> dict[str, tuple[int, ...]]:
    return {n: p.stride() for n, p in model.state_dict().items()}


def test_suits_channels_last() -> None:
    net = DigitsCNN()
    assert suits_channels_last(net, [torch.randn(4, 1, 8, 8)])
    assert not suits_channels_last(net, [{"x": torch.randn(4, 1, 8, 8)}])
    assert not suits_channels_last(nn.Linear(3, 2), [torch.randn(4, 3, 2, 2)])
    assert not suits_channels_last(net, [torch.randn(4, 1, 8, 8).long()])


def test_switch_and_restore_exactly() -> None:
    torch.manual_seed(0)
    net = DigitsCNN().eval()  # conv1 weight is (30, 1, 3, 3): contiguous in both layouts
    x = torch.randn(3, 1, 8, 8)
    with torch.no_grad():
        ref = net(x)
    before = _strides(net)
    formats = memory_formats(net)
    assert not any(formats.values())
    assert to_channels_last(net, x)
    assert net.conv2.weight.is_contiguous(memory_format=torch.channels_last)
    assert net.conv1.weight.stride() == (9, 1, 3, 1)
    restore_formats(net, formats)
    assert _strides(net) == before  # the (30, 1, 3, 3) weight too: same kernels, same bits
    with torch.no_grad():
        assert torch.equal(net(x), ref)


def test_a_channels_last_model_stays_channels_last() -> None:
    net = DigitsCNN().eval().to(memory_format=torch.channels_last)
    formats = memory_formats(net)
    assert formats["conv2.weight"] and formats["conv1.weight"]
    net.conv2.weight.data = net.conv2.weight.data.contiguous()
    restore_formats(net, formats)
    assert net.conv2.weight.is_contiguous(memory_format=torch.channels_last)


def test_model_that_fails_in_channels_last_keeps_its_layout() -> None:
    net = _ViewsActivations().eval()
    x = torch.randn(2, 3, 6, 6)
    before = _strides(net)
    assert not to_channels_last(net, x)
    assert _strides(net) == before


@pytest.mark.parametrize("channels_last", [None, True, False])
def test_compress_returns_the_users_layout(channels_last: bool | None) -> None:
    torch.manual_seed(0)
    net = DigitsCNN().eval()
    x = torch.randn(96, 1, 8, 8)
    before = _strides(net)
    small, report = spectrim.compress(
        net, x, target="macs=0.5", channels_last=channels_last, sequential_fraction=1.0
    )
    assert _strides(net) == before  # the user's model is untouched
    for p in small.parameters():
        if p.dim() == 4:
            assert p.stride() == torch.empty(p.shape, device="meta").stride()
    assert report.config["channels_last"] == channels_last
    ref, _ = spectrim.compress(
        copy.deepcopy(net), x, target="macs=0.5", channels_last=False, sequential_fraction=1.0
    )
    with torch.no_grad():
        torch.testing.assert_close(small(x), ref(x), rtol=1e-4, atol=1e-4)


def test_compress_warns_when_channels_last_was_asked_but_fails() -> None:
    torch.manual_seed(0)
    net = _ViewsActivations().eval()
    small, report = spectrim.compress(
        net, torch.randn(64, 3, 6, 6), target="width=0.5", channels_last=True
    )
    assert any("channels_last=True" in w for w in report.warnings)
    with torch.no_grad():
        assert small(torch.randn(2, 3, 6, 6)).shape == (2, 2)


class _HoldsA5DTable(nn.Module):
    """A conv net with a 5-D parameter (as timm's LambdaLayer's position table):
    ``model.to(memory_format=torch.channels_last)`` raises on it."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, padding=1)
        self.conv2 = nn.Conv2d(16, 4, 3, padding=1)
        self.table = nn.Parameter(torch.randn(1, 4, 2, 3, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv2(torch.relu(self.conv1(x)))
        return h.mean((2, 3)) + self.table.sum((2, 3, 4))


def test_a_5d_parameter_stays_as_it_is_in_the_channels_last_passes() -> None:
    """Found on timm's lambda_resnet26t (a crash in the calibration pass, stop 49)."""
    torch.manual_seed(0)
    net = _HoldsA5DTable().eval()
    x = torch.randn(96, 3, 6, 6)
    with pytest.raises(RuntimeError, match="rank 4"):  # what spectrim did before
        copy.deepcopy(net).to(memory_format=torch.channels_last)
    before = _strides(net)
    small, report = spectrim.compress(
        net, x, target="width=0.5", channels_last=True, sequential_fraction=1.0
    )
    assert report.config["channels_last"] is True
    assert not any("channels_last" in w for w in report.warnings)  # it ran in that layout
    assert small.conv1.out_channels == 8 and small.table.shape == (1, 4, 2, 3, 3)
    assert _strides(net) == before
    ref, _ = spectrim.compress(
        net, x, target="width=0.5", channels_last=False, sequential_fraction=1.0
    )
    with torch.no_grad():
        torch.testing.assert_close(small(x), ref(x), rtol=1e-4, atol=1e-4)
