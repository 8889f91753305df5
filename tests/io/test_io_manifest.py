"""save_compressed / load_compressed / apply_manifest on real compressed models."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

import spectrim
from spectrim.io import (
    MANIFEST_FILE,
    MANIFEST_FORMAT,
    REPORT_FILE,
    WEIGHTS_FILE,
    ManifestError,
    apply_manifest,
    build_manifest,
    load_compressed,
    read_manifest,
    save_compressed,
)
from spectrim.zoo import CifarResNet, DigitsCNN


def _shapes(model: nn.Module) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


@pytest.fixture(scope="module")
def resnet_pair() -> tuple[nn.Module, nn.Module, spectrim.CompressionReport]:
    torch.manual_seed(0)
    model = CifarResNet(8).eval()  # the CIFAR ResNet family at its smallest depth (fast)
    calib = torch.randn(16, 3, 32, 32)
    small, report = spectrim.compress(model, calib, target="width=0.5", verify=False)
    return model, small, report


@pytest.fixture(scope="module")
def digits_pair() -> tuple[nn.Module, nn.Module, spectrim.CompressionReport]:
    torch.manual_seed(1)
    model = DigitsCNN().eval()
    small, report = spectrim.compress(model, torch.randn(64, 1, 8, 8), target="macs=0.5")
    return model, small, report


def test_resnet_roundtrip_from_class_arch(resnet_pair, tmp_path: Path) -> None:
    _, small, report = resnet_pair
    assert report.params_after < report.params_before
    arch = {"class": "spectrim.zoo.CifarResNet", "kwargs": {"depth": 8}}
    out = save_compressed(small, tmp_path / "r8", report, arch=arch)
    assert {p.name for p in out.iterdir()} == {WEIGHTS_FILE, MANIFEST_FILE, REPORT_FILE}

    loaded = load_compressed(out)  # architecture rebuilt from the class, then reshaped
    assert isinstance(loaded, CifarResNet) and not loaded.training
    assert _shapes(loaded) == _shapes(small)
    assert loaded.layer1[0].conv1.out_channels == small.layer1[0].conv1.out_channels < 16
    assert loaded.layer1[0].bn1.num_features == small.layer1[0].bn1.num_features
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(loaded(x), small(x))
    assert sum(p.numel() for p in loaded.parameters()) == report.params_after

    saved_report = json.loads((out / REPORT_FILE).read_text())
    assert saved_report["params_after"] == report.params_after
    assert saved_report["widths"] == {k: list(v) for k, v in report.widths.items()}


def test_roundtrip_with_explicit_base_model(digits_pair, tmp_path: Path) -> None:
    _, small, report = digits_pair
    save_compressed(small, tmp_path, report)  # no arch: base_model required
    base = DigitsCNN()
    loaded = load_compressed(tmp_path, base_model=base)
    assert loaded is base
    assert _shapes(loaded) == _shapes(small)
    x = torch.randn(5, 1, 8, 8)
    with torch.no_grad():
        assert torch.equal(loaded(x), small(x))
    with pytest.raises(ManifestError, match="pass base_model"):
        load_compressed(tmp_path)


def test_zoo_arch(digits_pair, tmp_path: Path) -> None:
    _, small, _ = digits_pair
    save_compressed(small, tmp_path, arch={"zoo": "digits-cnn"})  # built without training
    loaded = load_compressed(tmp_path)
    assert isinstance(loaded, DigitsCNN)
    assert _shapes(loaded) == _shapes(small)
    assert not (tmp_path / REPORT_FILE).exists()
    x = torch.randn(5, 1, 8, 8)
    with torch.no_grad():
        assert torch.equal(loaded(x), small(x))


def test_manifest_content(digits_pair) -> None:
    _, small, _ = digits_pair
    manifest = build_manifest(small, {"zoo": "digits-cnn"})
    assert manifest["format"] == MANIFEST_FORMAT
    assert manifest["arch"] == {"zoo": "digits-cnn"}
    assert manifest["shapes"]["conv1.weight"] == list(small.conv1.weight.shape)
    assert manifest["shapes"]["bn1.num_batches_tracked"] == []
    assert manifest["modules"]["conv2"] == {
        "in_channels": small.conv2.in_channels,
        "out_channels": small.conv2.out_channels,
        "groups": 1,
    }
    assert manifest["modules"]["fc1"]["in_features"] == small.fc1.in_features
    assert manifest["modules"]["bn2"] == {"num_features": small.bn2.num_features}
    json.dumps(manifest)  # serialisable


def test_apply_manifest_keeps_tied_weights_and_flags() -> None:
    class Tied(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.emb = nn.Embedding(10, 8)
            self.out = nn.Linear(8, 10, bias=False)
            self.out.weight = self.emb.weight

    small = Tied()
    small.emb.weight = nn.Parameter(torch.randn(10, 4))
    small.out.weight = small.emb.weight
    small.emb.embedding_dim = 4
    small.out.in_features = 4
    manifest = build_manifest(small)
    model = apply_manifest(Tied(), manifest)
    assert model.emb.weight is model.out.weight
    assert tuple(model.emb.weight.shape) == (10, 4)
    assert model.emb.embedding_dim == 4 and model.out.in_features == 4
    assert isinstance(model.emb.weight, nn.Parameter) and model.emb.weight.requires_grad


def test_layernorm_shape_attribute_roundtrip() -> None:
    small = nn.Sequential(nn.Linear(4, 6), nn.LayerNorm(6))
    manifest = build_manifest(small)
    assert manifest["modules"]["1"]["normalized_shape"] == [6]
    model = apply_manifest(nn.Sequential(nn.Linear(4, 12), nn.LayerNorm(12)), manifest)
    assert model[1].normalized_shape == (6,)
    model.load_state_dict(small.state_dict(), strict=True)
    x = torch.randn(3, 4)
    assert torch.equal(model(x), small(x))


# ------------------------------------------------------------------------------------ errors


def test_corrupted_manifest_json(digits_pair, tmp_path: Path) -> None:
    _, small, _ = digits_pair
    save_compressed(small, tmp_path)
    (tmp_path / MANIFEST_FILE).write_text('{"format": "spectrim-manifest/2", "shapes": {')
    with pytest.raises(ManifestError, match=r"manifest\.json: not valid JSON"):
        load_compressed(tmp_path, base_model=DigitsCNN())


def test_wrong_shape_in_manifest_names_file_and_tensor(digits_pair, tmp_path: Path) -> None:
    _, small, _ = digits_pair
    save_compressed(small, tmp_path)
    manifest = json.loads((tmp_path / MANIFEST_FILE).read_text())
    manifest["shapes"]["fc1.weight"] = [7, 3]
    (tmp_path / MANIFEST_FILE).write_text(json.dumps(manifest))
    with pytest.raises(ManifestError, match=r"model\.safetensors: tensor 'fc1\.weight' has shape"):
        load_compressed(tmp_path, base_model=DigitsCNN())


@pytest.mark.parametrize(
    ("edit", "pattern"),
    [
        (lambda m: m.update(format="other/2"), "unsupported format 'other/2'"),
        (lambda m: m.update(shapes=[1, 2]), "'shapes' must be an object"),
        (lambda m: m["shapes"].update({"fc1.weight": [-1, "a"]}), "shape of 'fc1.weight'"),
        (lambda m: m["shapes"].update({"nope.weight": [3]}), "no submodule 'nope'"),
        (lambda m: m["shapes"].update({"fc1.gamma": [3]}), "'fc1.gamma' is neither"),
        (lambda m: m["modules"].update({"head": {"in_features": 3}}), "module 'head' is not"),
        (lambda m: m["modules"].update({"fc1": {"channels": 3}}), "'channels' is not a size"),
        (lambda m: m["modules"].update({"fc1": {"in_features": "x"}}), "must be an int"),
        (lambda m: m["modules"].update({"fc1": {"forward": 1}}), "'forward' is not a size"),
        (lambda m: m.update(bias_heads={"fc1": [0, 0]}), "'bias_heads' must map"),
        (lambda m: m.update(bias_heads={"fc1": "0"}), "'bias_heads' must map"),
        (lambda m: m.update(bias_heads={"nope": [1]}), "attention layer 'nope' is not"),
        (lambda m: m.update(versions={"fc1": "2"}), "'versions' must map"),
        (lambda m: m.update(plain="fc1"), "'plain' must be a list"),
        (lambda m: m.update(plain=["nope"]), "module 'nope' \\(made plain\\) is not"),
    ],
)
def test_malformed_manifest_errors(digits_pair, tmp_path: Path, edit, pattern: str) -> None:
    _, small, _ = digits_pair
    save_compressed(small, tmp_path)
    manifest = json.loads((tmp_path / MANIFEST_FILE).read_text())
    edit(manifest)
    (tmp_path / MANIFEST_FILE).write_text(json.dumps(manifest))
    with pytest.raises(ManifestError, match=pattern):
        load_compressed(tmp_path, base_model=DigitsCNN())


def test_wrong_base_architecture(digits_pair, tmp_path: Path) -> None:
    _, small, _ = digits_pair
    save_compressed(small, tmp_path)
    with pytest.raises(ManifestError, match="CifarResNet"):
        load_compressed(tmp_path, base_model=CifarResNet(20))


def test_missing_files(digits_pair, tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="not a directory"):
        load_compressed(tmp_path / "nothing")
    with pytest.raises(FileNotFoundError, match=MANIFEST_FILE):
        read_manifest(tmp_path)
    _, small, _ = digits_pair
    save_compressed(small, tmp_path)
    (tmp_path / WEIGHTS_FILE).unlink()
    with pytest.raises(FileNotFoundError, match=WEIGHTS_FILE):
        load_compressed(tmp_path, base_model=DigitsCNN())


def test_unknown_arch(digits_pair, tmp_path: Path) -> None:
    _, small, _ = digits_pair
    save_compressed(small, tmp_path, arch={"recipe": "x"})
    with pytest.raises(ManifestError, match="names no 'zoo', 'torchvision', 'timm'"):
        load_compressed(tmp_path)


def test_state_dict_versions_travel_with_the_weights(tmp_path: Path) -> None:
    """A module whose ``_load_from_state_dict`` reads its version (torchvision's MNASNet
    refuses ``None``) failed to reload: safetensors keeps no state-dict metadata.  The
    manifest records every module's version and loading gives them back."""
    models = pytest.importorskip("torchvision.models")
    torch.manual_seed(0)
    net = models.mnasnet0_5(weights=None, num_classes=10).eval()
    x = torch.randn(32, 3, 32, 32)
    small, report = spectrim.compress(net, x, "id", "width=0.75")
    save_compressed(small, tmp_path / "m", report)
    manifest = json.loads((tmp_path / "m" / MANIFEST_FILE).read_text())
    assert manifest["versions"][""] == 2  # MNASNet's own _version
    back = load_compressed(tmp_path / "m", models.mnasnet0_5(weights=None, num_classes=10))
    with torch.no_grad():
        assert torch.equal(back(x[:4]), small(x[:4]))
