"""Built-in models: architecture, pretrained accuracy on real CIFAR-10 images, digits CNN."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from torch import nn

from spectrim.zoo import (
    CifarResNet,
    DigitsCNN,
    PadShortcut,
    get_model,
    list_models,
    load_dataset,
    load_pretrained,
    train_digits_cnn,
)

DEFAULT_DATA = "/work/shared/data"


@torch.no_grad()
def _top1_percent(model: nn.Module, x: torch.Tensor, y: torch.Tensor, bs: int = 500) -> float:
    model.eval()
    correct = sum(
        int((model(x[i : i + bs]).argmax(1) == y[i : i + bs]).sum()) for i in range(0, len(x), bs)
    )
    return 100.0 * correct / len(x)


@pytest.fixture(scope="module")
def cifar_test() -> tuple[torch.Tensor, torch.Tensor]:
    """The 1000 lossless CIFAR-10 test images, loaded once for the module."""
    root = os.environ.get("SPECTRIM_DATA") or DEFAULT_DATA
    if not Path(root).is_dir():
        pytest.skip(f"offline data not found at {root} (set SPECTRIM_DATA)")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SPECTRIM_DATA", root)
        x, y = load_dataset("cifar10", "test").tensors
    return x, y


def _n_params(m: nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


@pytest.mark.parametrize(
    ("depth", "params"), [(20, 269_722), (32, 464_154), (44, 658_586), (56, 853_018)]
)
def test_option_a_param_counts_match_checkpoints(depth: int, params: int) -> None:
    # parameter counts of the akamaster checkpoints (data README)
    assert _n_params(CifarResNet(depth)) == params


def test_resnet_structure_and_shapes() -> None:
    m = CifarResNet(20)
    assert [name for name, _ in m.named_children()] == [
        "conv1", "bn1", "layer1", "layer2", "layer3", "linear",
    ]  # fmt: skip
    assert len(m.layer1) == len(m.layer2) == len(m.layer3) == 3
    assert isinstance(m.layer2[0].shortcut, PadShortcut)
    assert isinstance(m.layer1[0].shortcut, nn.Identity)
    sc = PadShortcut(32)
    assert list(sc.parameters()) == []
    assert sc(torch.randn(2, 16, 32, 32)).shape == (2, 32, 16, 16)
    x = torch.randn(4, 3, 32, 32)
    assert m(x).shape == (4, 10)
    # stage outputs
    out = m.layer1(torch.relu(m.bn1(m.conv1(x))))
    assert out.shape == (4, 16, 32, 32)
    assert m.layer3(m.layer2(out)).shape == (4, 64, 8, 8)


def test_option_b_and_width() -> None:
    m = CifarResNet(32, num_classes=7, shortcut="B", width=8)
    proj = m.layer3[0].shortcut
    assert isinstance(proj, nn.Sequential)
    assert isinstance(proj[0], nn.Conv2d) and proj[0].stride == (2, 2)
    assert proj[0].in_channels == 16 and proj[0].out_channels == 32
    assert isinstance(proj[1], nn.BatchNorm2d)
    assert "layer2.0.shortcut.0.weight" in m.state_dict()
    m.eval()
    y = m(torch.randn(3, 3, 32, 32))
    assert y.shape == (3, 7) and torch.isfinite(y).all()
    # option B has more parameters than option A (projections)
    assert _n_params(CifarResNet(20, shortcut="B")) > _n_params(CifarResNet(20))
    # backward works
    m.train()
    m(torch.randn(2, 3, 32, 32)).sum().backward()
    assert m.layer2[0].shortcut[0].weight.grad is not None


def test_invalid_arguments() -> None:
    with pytest.raises(ValueError, match="6n\\+2"):
        CifarResNet(21)
    with pytest.raises(ValueError, match="shortcut"):
        CifarResNet(20, shortcut="C")  # type: ignore[arg-type]
    with pytest.raises(KeyError, match="resnet110-cifar10"):
        load_pretrained("resnet110-cifar10")
    with pytest.raises(KeyError, match="no-such-model"):
        get_model("no-such-model")


def test_registry() -> None:
    names = list_models()
    for depth in (20, 32, 44, 56):
        assert f"resnet{depth}-cifar10" in names
    assert "digits-cnn" in names
    m = get_model("resnet44-cifar10", pretrained=False)
    assert isinstance(m, CifarResNet) and m.depth == 44 and not m.training
    assert isinstance(get_model("digits-cnn", pretrained=False), DigitsCNN)


def test_pretrained_resnet20_accuracy(
    data_dir: Path, cifar_test: tuple[torch.Tensor, torch.Tensor]
) -> None:
    model = load_pretrained("resnet20-cifar10")
    assert not model.training
    assert _n_params(model) == 269_722
    acc = _top1_percent(model, *cifar_test)
    assert acc == pytest.approx(91.5, abs=0.2), acc


def test_pretrained_resnet56_accuracy(
    data_dir: Path, cifar_test: tuple[torch.Tensor, torch.Tensor]
) -> None:
    model = get_model("resnet56-cifar10")
    acc = _top1_percent(model, *cifar_test)
    assert acc == pytest.approx(92.6, abs=0.2), acc


def test_digits_cnn_shapes() -> None:
    m = DigitsCNN().eval()
    assert m(torch.randn(5, 1, 8, 8)).shape == (5, 10)
    assert m.fc1.in_features == 64 * 16


def test_digits_cnn_trains_deterministically() -> None:
    state = torch.random.get_rng_state()
    threads = torch.get_num_threads()
    model, train_set, test_set = train_digits_cnn(seed=0)
    assert torch.equal(torch.random.get_rng_state(), state)  # global RNG untouched
    assert torch.get_num_threads() == threads
    assert len(train_set) == 1297 and len(test_set) == 500
    assert not model.training
    acc = _top1_percent(model, *test_set.tensors)
    assert acc >= 95.0, acc
    # same seed, same weights
    model2, _, _ = train_digits_cnn(seed=0, epochs=1, batch_size=256)
    model3, _, _ = train_digits_cnn(seed=0, epochs=1, batch_size=256)
    for a, b in zip(model2.state_dict().values(), model3.state_dict().values()):
        assert torch.equal(a, b)
