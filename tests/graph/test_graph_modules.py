"""The module-type registry: matrices, input rows and round trips, against the modules."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from spectrim.graph.modules import WeightKind, register_weight_kind, weight_kind, weight_modules


@pytest.mark.parametrize(
    "module, shape",
    [
        (nn.Linear(6, 4), (3, 5, 6)),
        (nn.Conv2d(3, 5, 3, padding=1), (2, 3, 7, 6)),
        (nn.Conv2d(3, 5, (3, 2), stride=2, dilation=(1, 2), padding=(1, 0)), (2, 3, 9, 8)),
        (nn.Conv2d(3, 5, 3, padding="same"), (2, 3, 6, 6)),
        (nn.Conv1d(4, 6, 3, padding=2, stride=2), (2, 4, 11)),
    ],
)
def test_input_rows_times_matrix_is_the_output(module: nn.Module, shape: tuple[int, ...]) -> None:
    kind = weight_kind(module)
    assert kind is not None
    x = torch.randn(*shape, dtype=torch.float64)
    module = module.double()
    rows = kind.input_rows(module, x)
    y = module(x) - (
        module.bias.reshape(-1, *[1] * (x.dim() - 2))
        if x.dim() > 2 and not isinstance(module, nn.Linear)
        else module.bias
    )
    out = rows @ kind.matrix(module).T
    if isinstance(module, nn.Linear):
        want = y.reshape(-1, y.shape[-1])
    else:
        want = y.movedim(1, -1).reshape(-1, y.shape[1])
    torch.testing.assert_close(out, want)


def test_set_matrix_round_trip_and_grouped_conv_has_no_rows() -> None:
    conv = nn.Conv2d(4, 8, 3)
    kind = weight_kind(conv)
    assert kind is not None
    m = torch.randn(8, 36)
    kind.set_matrix(conv, m)
    torch.testing.assert_close(conv.weight.flatten(1), m)
    dw = nn.Conv2d(4, 4, 3, groups=4)
    assert weight_kind(dw).input_rows(dw, torch.randn(1, 4, 5, 5)) is None  # type: ignore[union-attr]
    assert weight_kind(nn.BatchNorm2d(3)) is None


def test_hf_conv1d_is_a_transposed_linear() -> None:
    pytest.importorskip("transformers")
    from transformers.pytorch_utils import Conv1D

    layer = Conv1D(5, 3)  # nf=5 outputs, nx=3 inputs; weight (3, 5)
    kind = weight_kind(layer)
    assert kind is not None and kind.name == "hf-conv1d"
    x = torch.randn(2, 4, 3)
    out = kind.input_rows(layer, x) @ kind.matrix(layer).T + layer.bias
    torch.testing.assert_close(out, layer(x).reshape(-1, 5))
    kind.set_matrix(layer, torch.zeros(5, 3))
    assert not layer.weight.any()


def test_registering_a_new_type_is_one_call() -> None:
    class Scaled(nn.Linear):
        pass

    assert weight_kind(Scaled(2, 2)).name == "linear"  # type: ignore[union-attr]

    class MyLayer(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.weight = nn.Parameter(torch.randn(3, 2))

    net = nn.Sequential(MyLayer(), nn.Linear(2, 2))
    assert [n for n, _, _ in weight_modules(net)] == ["1"]
    register_weight_kind(
        MyLayer,
        WeightKind("mine", lambda m: m.weight.t(), lambda m, v: None, lambda m, x: x, ()),
    )
    assert [n for n, _, _ in weight_modules(net)] == ["0", "1"]
    assert F.relu(torch.zeros(1)).item() == 0.0
