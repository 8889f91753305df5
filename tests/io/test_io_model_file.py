"""load_model_file and the TorchScript -> eager conversion."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

from spectrim.io import (
    ModelFileError,
    TorchScriptConversionError,
    is_torchscript_file,
    load_model_file,
    script_to_module,
)
from spectrim.zoo import DigitsCNN


class MixedNet(nn.Module):
    """Many layer types, a Python attribute and a nested Sequential."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 8, 3, stride=2, padding=1, bias=False),
            nn.BatchNorm2d(8, eps=1e-3, momentum=0.2),
            nn.ReLU(inplace=True),
            nn.Conv2d(8, 8, 3, padding=1, groups=8, padding_mode="reflect"),
            nn.GroupNorm(2, 8),
            nn.LeakyReLU(0.2),
            nn.Conv2d(8, 16, 1),
            nn.AvgPool2d(2),
            nn.MaxPool2d(3, stride=1, padding=1),
            nn.GELU(approximate="tanh"),
            nn.AdaptiveAvgPool2d((2, 2)),
            nn.Flatten(),
            nn.LayerNorm(64),
            nn.Dropout(0.3),
        )
        self.head = nn.Linear(64, 5)
        self.act = nn.PReLU(5)
        self.scale = 2.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.head(self.features(x))) * self.scale


def _randomise_bn(model: nn.Module) -> nn.Module:
    gen = torch.Generator().manual_seed(0)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=gen))
            m.running_var.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
    return model


def _save_script(model: nn.Module, example: torch.Tensor, how: str, path: Path) -> Path:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        compiled = torch.jit.script(model) if how == "script" else torch.jit.trace(model, example)
        torch.jit.save(compiled, str(path))
    return path


@pytest.mark.parametrize("how", ["script", "trace"])
def test_torchscript_digits_cnn(how: str, tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = _randomise_bn(DigitsCNN()).eval()
    x = torch.randn(4, 1, 8, 8)
    path = _save_script(model, x, how, tmp_path / "digits.pt")
    assert is_torchscript_file(path)
    eager = load_model_file(path, example_inputs=x)
    assert type(eager) is DigitsCNN
    assert not isinstance(eager, torch.jit.ScriptModule)
    with torch.no_grad():
        torch.testing.assert_close(eager.eval()(x), model(x))
    eager.conv1.out_channels = 5  # editable like any eager module
    assert eager.conv1.out_channels == 5


def test_torchscript_scripted_mixed_layers(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = _randomise_bn(MixedNet()).eval()
    x = torch.randn(3, 3, 16, 16)
    path = _save_script(model, x, "script", tmp_path / "mixed.pt")
    eager = load_model_file(path, example_inputs=x)
    assert type(eager) is MixedNet and eager.scale == 2.0
    assert eager.features[3].padding_mode == "reflect" and eager.features[3].groups == 8
    assert eager.features[1].eps == pytest.approx(1e-3)
    with torch.no_grad():
        torch.testing.assert_close(eager.eval()(x), model(x))


def test_torchscript_traced_layers_recovered_from_graph() -> None:
    torch.manual_seed(0)
    layers = _randomise_bn(MixedNet()).features.eval()
    x = torch.randn(3, 3, 16, 16)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(layers, x)
    eager = script_to_module(traced, x)
    conv = eager[0]
    assert isinstance(conv, nn.Conv2d) and conv.stride == (2, 2) and conv.padding == (1, 1)
    assert eager[3].padding_mode == "reflect" and eager[3].groups == 8
    assert isinstance(eager[8], nn.MaxPool2d) and eager[8].stride in (1, (1, 1))
    assert eager[4].num_groups == 2
    with torch.no_grad():
        torch.testing.assert_close(eager(x), layers(x))


def test_traced_python_attribute_is_reported() -> None:
    model = MixedNet().eval()
    x = torch.randn(2, 3, 16, 16)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(model, x)
    with pytest.raises(TorchScriptConversionError, match=r"torch\.jit\.script or torch\.save"):
        script_to_module(traced, x)


def test_pickled_module_and_checkpoint(tmp_path: Path) -> None:
    model = DigitsCNN().eval()
    torch.save(model, tmp_path / "full.pt")
    loaded = load_model_file(tmp_path / "full.pt", trust_pickle=True)
    assert type(loaded) is DigitsCNN and not is_torchscript_file(tmp_path / "full.pt")
    torch.save({"model": model, "epoch": 3}, tmp_path / "ckpt.pt")
    assert type(load_model_file(tmp_path / "ckpt.pt", trust_pickle=True)) is DigitsCNN


def test_pickle_needs_trust_and_runs_nothing_without_it(tmp_path: Path) -> None:
    """A pickle that would run code on load is refused, and nothing of it runs."""
    marker = tmp_path / "ran"

    class Payload:
        def __reduce__(self):  # type: ignore[no-untyped-def]
            return (marker.write_text, ("pwned",))

    torch.save({"model": Payload()}, tmp_path / "evil.pt")
    with pytest.raises(ModelFileError, match=r"evil\.pt is a pickled Python object.*trust_pickle"):
        load_model_file(tmp_path / "evil.pt")
    assert not marker.exists()
    torch.save(DigitsCNN().eval(), tmp_path / "full.pt")
    with pytest.raises(ModelFileError, match="--trust-pickle"):
        load_model_file(tmp_path / "full.pt")


def test_model_file_errors(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"missing\.pt"):
        load_model_file(tmp_path / "missing.pt")
    torch.save(DigitsCNN().state_dict(), tmp_path / "weights.pt")
    with pytest.raises(ModelFileError, match=r"weights\.pt holds a state dict"):
        load_model_file(tmp_path / "weights.pt")
    (tmp_path / "junk.pt").write_bytes(b"definitely not a model")
    with pytest.raises(ModelFileError, match=r"junk\.pt is neither a TorchScript archive"):
        load_model_file(tmp_path / "junk.pt")
    torch.save([1, 2, 3], tmp_path / "list.pt")
    with pytest.raises(ModelFileError, match=r"list\.pt holds a list"):
        load_model_file(tmp_path / "list.pt")
    # a checkpoint {"state_dict": ...} is recognised as weights without unpickling objects
    torch.save({"state_dict": DigitsCNN().state_dict(), "epoch": 1}, tmp_path / "ck.pt")
    with pytest.raises(ModelFileError, match=r"ck\.pt holds a state dict"):
        load_model_file(tmp_path / "ck.pt")
