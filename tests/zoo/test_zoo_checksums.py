"""Every registry file is verified before use: offline root, cache hits, once per process."""

from __future__ import annotations

import gzip
import hashlib
import os
import shutil
from pathlib import Path

import pytest

from spectrim import _files
from spectrim.zoo import download as dl
from spectrim.zoo.download import FILES, ChecksumError, RemoteFile, fetch, verify_file

RESNET20 = "cifar10-resnet-akamaster/resnet20-12fca82f.th"
PNG = "cifar10-convnetjs/cifar10_batch_50.png"
LABELS_GZ = "mnist/t10k-labels-idx1-ubyte.gz"


def _copy(data_dir: Path, tmp: Path, *rels: str) -> Path:
    root = tmp / "data"
    for rel in rels:
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(data_dir / rel, root / rel)
    return root


def _flip(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


def test_bit_flip_in_offline_weights_is_refused(
    data_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from spectrim.zoo import get_model

    root = _copy(data_dir, tmp_path, RESNET20)
    _flip(root / RESNET20, 500_000)
    monkeypatch.setenv("SPECTRIM_DATA", str(root))
    with pytest.raises(ChecksumError) as info:
        get_model("resnet20-cifar10")
    msg = str(info.value)
    assert str(root / RESNET20) in msg
    assert FILES[RESNET20].sha256 in msg  # expected
    assert _files.sha256_file(root / RESNET20) in msg  # actual


def test_edited_cifar_png_is_refused(
    data_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from spectrim.zoo import load_dataset

    root = _copy(data_dir, tmp_path, PNG, "cifar10-convnetjs/cifar10_labels.js")
    _flip(root / PNG, 10_000)
    monkeypatch.setenv("SPECTRIM_DATA", str(root))
    with pytest.raises(ChecksumError, match=r"cifar10_batch_50\.png"):
        load_dataset("cifar10", "test", limit=10)


def test_corrupt_cache_hit_is_refused(
    data_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cache = tmp_path / "cache"
    (cache / RESNET20).parent.mkdir(parents=True)
    shutil.copyfile(data_dir / RESNET20, cache / RESNET20)
    monkeypatch.delenv("SPECTRIM_DATA", raising=False)
    monkeypatch.setenv("SPECTRIM_CACHE", str(cache))
    assert fetch(RESNET20) == cache / RESNET20  # intact: served from the cache
    _flip(cache / RESNET20, 1000)
    with pytest.raises(ChecksumError, match="delete it from the cache"):
        fetch(RESNET20)


def test_truncated_gz_names_the_file(tmp_path: Path) -> None:
    from spectrim.zoo import read_idx

    path = tmp_path / "t10k-labels-idx1-ubyte.gz"
    path.write_bytes(gzip.compress(b"\0\0\x08\x01" + (100).to_bytes(4, "big") + bytes(100))[:-12])
    with pytest.raises(ValueError, match=r"t10k-labels-idx1-ubyte.gz is truncated or corrupt"):
        read_idx(path)


def test_truncated_registered_gz_fails_its_checksum(
    data_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from spectrim.zoo import load_dataset

    root = _copy(data_dir, tmp_path, LABELS_GZ, "mnist/t10k-images-idx3-ubyte.gz")
    path = root / LABELS_GZ
    path.write_bytes(path.read_bytes()[:-100])
    monkeypatch.setenv("SPECTRIM_DATA", str(root))
    with pytest.raises(ChecksumError) as info:
        load_dataset("mnist", "test", limit=5)
    assert str(path) in str(info.value) and "could not decompress" in str(info.value)


def test_each_file_is_hashed_once_per_process(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    payload = b"spectrim" * 4096
    root = tmp_path / "data"
    (root / "test").mkdir(parents=True)
    (root / "test" / "blob.bin").write_bytes(payload)
    monkeypatch.setitem(
        FILES,
        "test/blob.bin",
        RemoteFile(
            "test/blob.bin", "https://example.invalid/b", hashlib.sha256(payload).hexdigest()
        ),
    )
    monkeypatch.setenv("SPECTRIM_DATA", str(root))
    calls: list[Path] = []
    real = _files.sha256_file

    def counting(path: str | os.PathLike[str]) -> str:
        calls.append(Path(path))
        return real(path)

    monkeypatch.setattr(_files, "sha256_file", counting)
    for _ in range(5):
        fetch("test/blob.bin")
    assert len(calls) == 1
    # a changed file (new size / mtime) is hashed again, and refused
    (root / "test" / "blob.bin").write_bytes(payload + b"!")
    with pytest.raises(ChecksumError):
        fetch("test/blob.bin")
    assert len(calls) == 2


def test_unregistered_local_file_is_not_served(data_dir: Path) -> None:
    with pytest.raises(KeyError, match="not registered"):
        verify_file(
            "cifar10-resnet-akamaster/LICENSE", data_dir / "cifar10-resnet-akamaster/LICENSE"
        )


def test_shared_data_verifies(data_dir: Path) -> None:
    """The offline copy matches the registry, file for file (what CI reads)."""
    for rel in FILES:
        if (data_dir / rel).is_file():
            assert verify_file(rel, data_dir / rel) == data_dir / rel
    assert dl.data_root() == data_dir
