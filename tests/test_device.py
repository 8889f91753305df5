"""``compress(..., device=...)``: the forward passes and the statistics where the user says.

The CUDA tests run only where a GPU is present (never in CI); the argument checks run
everywhere.
"""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from torch import nn

import spectrim
from spectrim.calibration import GramAccumulator

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 4)).eval()


def test_bad_device_is_named() -> None:
    with pytest.raises(ValueError, match="device='gpu0' is not a torch device"):
        spectrim.compress(_mlp(), torch.randn(64, 8), device="gpu0")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            spectrim.compress(_mlp(), torch.randn(64, 8), device="cuda")


def test_a_model_with_tensors_on_the_meta_device_is_refused_by_name() -> None:
    """Weights never loaded (meta tensors) have nothing to measure: named, not a deep
    'cannot call item() on meta tensors'."""
    net = _mlp()
    net[2].to("meta")
    for device in (None, "cpu"):
        with pytest.raises(ValueError, match=r"'2.weight' of the model is on the meta device"):
            spectrim.compress(net, torch.randn(64, 8), device=device)


def test_explicit_cpu_device_matches_the_default(state_hash) -> None:  # type: ignore[no-untyped-def]
    x = torch.randn(256, 8)
    a, _ = spectrim.compress(_mlp(), x, target="width=0.5")
    b, _ = spectrim.compress(_mlp(), x, target="width=0.5", device="cpu")
    assert state_hash(a) == state_hash(b)


def test_accumulator_follows_its_rows() -> None:
    acc = GramAccumulator(3)
    assert acc.device.type == "cpu"
    acc.update(torch.randn(5, 3))
    assert acc.device.type == "cpu" and acc.count == 5
    fixed = GramAccumulator(3, device="cpu")
    assert fixed.device.type == "cpu"


# ---------------------------------------------------------------------------- on a GPU


@pytest.fixture(scope="module")
def resnet20(data_root: Path) -> nn.Module:
    from spectrim.zoo import load_pretrained

    return load_pretrained("resnet20-cifar10").eval()


@pytest.fixture(scope="module")
def held_out(data_root: Path) -> torch.Tensor:
    from spectrim.zoo import load_dataset

    x, _ = load_dataset("cifar10", "test", limit=512).tensors
    return x


@cuda
def test_gram_on_the_gpu_matches_the_cpu_even_with_tf32() -> None:
    """float64 sums of true float32 products on the device: the GPU Gram equals the CPU
    one to float32 precision, and TF32 (when the user enabled it) does not reach it."""
    x = torch.randn(20000, 256) * torch.linspace(0.1, 10, 256)
    cpu = GramAccumulator(256)
    cpu.update(x)
    saved = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = True
    try:
        gpu = GramAccumulator(256)
        gpu.update(x.cuda())
    finally:
        torch.backends.cuda.matmul.allow_tf32 = saved
    assert gpu.device.type == "cuda" and gpu.gram.dtype == torch.float64
    rel = (gpu.gram.cpu() - cpu.gram).norm() / cpu.gram.norm()
    assert rel < 1e-6, rel  # TF32 would leave ~1e-3
    assert torch.backends.cuda.matmul.allow_tf32 == saved


@cuda
@pytest.mark.parametrize("method", ["id", "spectral", "l1"])
def test_channel_pruning_on_the_gpu(
    method: str, resnet20: nn.Module, cifar_calib: torch.Tensor, held_out: torch.Tensor, state_hash
) -> None:  # type: ignore[no-untyped-def]
    """A CPU model compressed with device='cuda' comes back on the CPU, unmodified
    original, same widths and the same predictions as the CPU run."""
    before = state_hash(resnet20)
    on_gpu, rg = spectrim.compress(resnet20, cifar_calib, method, "macs=0.5", device="cuda")
    on_cpu, rc = spectrim.compress(resnet20, cifar_calib, method, "macs=0.5")
    assert state_hash(resnet20) == before
    assert {p.device.type for p in on_gpu.parameters()} == {"cpu"}
    assert abs(rg.macs_ratio - rc.macs_ratio) < 0.02
    with torch.no_grad():
        a, b = on_gpu(held_out).argmax(1), on_cpu(held_out).argmax(1)
    assert float((a == b).float().mean()) >= 0.95


@cuda
def test_a_model_on_the_gpu_stays_there(resnet20: nn.Module, cifar_calib: torch.Tensor) -> None:
    net = copy.deepcopy(resnet20).cuda()
    small, report = spectrim.compress(net, cifar_calib, target="macs=0.6")
    assert {p.device.type for p in small.parameters()} == {"cuda"}
    assert report.macs_ratio < 0.62
    with torch.no_grad():
        out = small(cifar_calib[:8].cuda())
    assert out.shape == (8, 10) and bool(torch.isfinite(out).all())


@cuda
@pytest.mark.parametrize("method,target", [("obs", "sparsity=0.5"), ("wanda", "sparsity=2:4")])
def test_weight_sparsification_on_the_gpu(
    method: str, target: str, resnet20: nn.Module, cifar_calib: torch.Tensor, held_out: torch.Tensor
) -> None:
    on_gpu, rg = spectrim.compress(resnet20, cifar_calib, method, target, device="cuda")
    on_cpu, rc = spectrim.compress(resnet20, cifar_calib, method, target)
    assert abs(rg.sparsity - rc.sparsity) < 0.01
    with torch.no_grad():
        a, b = on_gpu(held_out).argmax(1), on_cpu(held_out).argmax(1)
    assert float((a == b).float().mean()) >= 0.95


@cuda
@pytest.mark.parametrize("target", ["heads=0.5", "hidden=0.75", "macs=0.5"])
def test_transformers_on_the_gpu(target: str) -> None:
    """Heads, the residual width and the FFN of a tiny GPT-2 compressed on the GPU."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=101, n_positions=32)
    net = transformers.GPT2LMHeadModel(cfg).eval()
    ids = torch.randint(0, 101, (64, 16))
    batches = [{"input_ids": b} for b in ids.split(16)]
    small, report = spectrim.compress(net, batches, "id", target, device="cuda")
    assert {p.device.type for p in small.parameters()} == {"cpu"}
    assert report.params_after < report.params_before
    with torch.no_grad():
        out = small(input_ids=ids[:2]).logits
    assert bool(torch.isfinite(out).all())
