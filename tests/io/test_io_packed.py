"""Sparse models saved compactly (bitmask + values in safetensors) and reloaded exactly."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import spectrim
from spectrim.io import load_compressed, save_compressed
from spectrim.io.manifest import ManifestError


@pytest.fixture(scope="module")
def sparse_resnet(data_root):  # type: ignore[no-untyped-def]
    from spectrim.zoo import load_pretrained

    model = load_pretrained("resnet20-cifar10").eval()
    x = torch.randn(64, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    small, report = spectrim.compress(model, x, "magnitude", "sparsity=0.7", structured=False)
    return small, report


def test_packed_file_is_smaller_and_reloads_exactly_in_a_fresh_process(
    sparse_resnet, tmp_path: Path
) -> None:  # type: ignore[no-untyped-def]
    small, report = sparse_resnet
    arch = {"zoo": "resnet20-cifar10"}
    packed = save_compressed(small, tmp_path / "packed", report, arch=arch)
    dense = save_compressed(small, tmp_path / "dense", report, arch=arch, pack=False)
    size_p = (packed / "model.safetensors").stat().st_size
    size_d = (dense / "model.safetensors").stat().st_size
    assert size_p < 0.5 * size_d  # 70% zeros: 1 bit + 30% of 4 bytes per weight
    manifest = json.loads((packed / "manifest.json").read_text())
    assert "layer1.0.conv1.weight" in manifest["packed"]
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    torch.save({"x": x, "y": small(x).detach()}, tmp_path / "io.pt")
    code = (
        "import sys, torch; from spectrim.io import load_compressed;"
        f"m = load_compressed({str(packed)!r}); d = torch.load({str(tmp_path / 'io.pt')!r});"
        "sys.exit(0 if torch.equal(m(d['x']), d['y']) else 3)"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    again = load_compressed(packed)
    for (n, a), (_, b) in zip(again.state_dict().items(), small.state_dict().items(), strict=True):
        assert torch.equal(a, b), n


def test_a_packed_entry_that_does_not_fit_is_refused(sparse_resnet, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    from safetensors.torch import load_file, save_file

    from spectrim._files import sha256_file

    small, report = sparse_resnet
    folder = save_compressed(small, tmp_path / "bad", report, arch={"zoo": "resnet20-cifar10"})
    state = load_file(str(folder / "model.safetensors"))
    name = "layer1.0.conv1.weight::values"
    state[name] = state[name][:-1].clone()  # one value short of the mask
    save_file(state, str(folder / "model.safetensors"))
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["files"]["model.safetensors"]["sha256"] = sha256_file(folder / "model.safetensors")
    manifest["files"]["model.safetensors"]["bytes"] = (folder / "model.safetensors").stat().st_size
    (folder / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ManifestError, match=r"layer1\.0\.conv1\.weight.*values for"):
        load_compressed(folder)
