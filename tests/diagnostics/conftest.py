"""Shared, computed-once fixtures: pretrained ResNet-20, real CIFAR-10 images, one report."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

import spectrim
from spectrim.diagnostics import CompressibilityReport


@pytest.fixture(scope="session")
def resnet20(data_root: Path) -> nn.Module:
    from spectrim.zoo import load_pretrained

    return load_pretrained("resnet20-cifar10").eval()


@pytest.fixture(scope="session")
def cifar_calib192(data_root: Path) -> torch.Tensor:
    """192 normalised CIFAR-10 training images (unlabelled use)."""
    from spectrim.zoo import load_dataset

    return load_dataset("cifar10", "calib", limit=192).tensors[0].clone()


@pytest.fixture(scope="session")
def cifar_eval128(data_root: Path) -> TensorDataset:
    """The first 128 CIFAR-10 test images with their labels."""
    from spectrim.zoo import load_dataset

    x, y = load_dataset("cifar10", "eval", limit=128).tensors
    return TensorDataset(x.clone(), y.clone())


@pytest.fixture(scope="session")
def r20_report(
    resnet20: nn.Module, cifar_calib192: torch.Tensor, cifar_eval128: TensorDataset
) -> CompressibilityReport:
    """The full report (every sensitivity run) of ResNet-20 on real CIFAR-10 images."""
    return spectrim.analyze(resnet20, cifar_calib192, heldout=cifar_eval128)


@pytest.fixture(scope="session")
def r20_written(
    r20_report: CompressibilityReport, tmp_path_factory: pytest.TempPathFactory
) -> dict[str, Path]:
    """``r20_report.write(...)``: every file it wrote."""
    return r20_report.write(tmp_path_factory.mktemp("r20-report"))
