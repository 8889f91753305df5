"""fetch(): offline root, cache, and verified downloads (via file:// URLs, no network)."""

from __future__ import annotations

import gzip
import hashlib
from pathlib import Path

import pytest

from spectrim.zoo import download as dl
from spectrim.zoo.download import (
    FILES,
    ChecksumError,
    DownloadError,
    RemoteFile,
    cache_dir,
    data_root,
    fetch,
    sha256_file,
)


@pytest.fixture
def online(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """No offline root; an empty cache under tmp_path."""
    monkeypatch.delenv("SPECTRIM_DATA", raising=False)
    cache = tmp_path / "cache"
    monkeypatch.setenv("SPECTRIM_CACHE", str(cache))
    return cache


def _register(monkeypatch: pytest.MonkeyPatch, remote: RemoteFile) -> None:
    monkeypatch.setitem(FILES, remote.relpath, remote)


def test_registry_is_consistent() -> None:
    for rel, f in FILES.items():
        assert f.relpath == rel
        # a file without a download is one no public URL serves byte for byte
        assert f.url.startswith("https://") or (f.url == "" and rel.startswith("cifar10-jpg/"))
        assert len(f.sha256) == 64 and int(f.sha256, 16) >= 0
        if rel.startswith("cifar10-resnet-akamaster/"):
            # the 8-hex suffix of each checkpoint name is the start of its sha256
            assert f.sha256.startswith(Path(rel).stem.split("-")[1])
    assert FILES["mnist/train-images-idx3-ubyte.gz"].uncompressed_md5 is not None
    assert "ossci-datasets" in FILES["mnist/train-images-idx3-ubyte.gz"].url


def test_offline_root_matches_registry(data_dir: Path) -> None:
    assert data_root() == data_dir
    path = fetch("cifar10-resnet-akamaster/resnet20-12fca82f.th")
    assert path == data_dir / "cifar10-resnet-akamaster/resnet20-12fca82f.th"
    assert sha256_file(path) == FILES[str(path.relative_to(data_dir))].sha256
    small = fetch("mnist/t10k-labels-idx1-ubyte.gz")
    remote = FILES["mnist/t10k-labels-idx1-ubyte.gz"]
    assert sha256_file(small) == remote.sha256
    assert dl.md5_gunzipped(small) == remote.uncompressed_md5


def test_offline_missing_file_names_path_and_variable(data_dir: Path) -> None:
    with pytest.raises(FileNotFoundError) as info:
        fetch("cifar10-resnet-akamaster/resnet1202-f3b1deed.th")
    msg = str(info.value)
    assert str(data_dir / "cifar10-resnet-akamaster/resnet1202-f3b1deed.th") in msg
    assert "SPECTRIM_DATA" in msg


def test_cache_dir_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("SPECTRIM_CACHE", str(tmp_path / "c"))
    assert cache_dir() == tmp_path / "c"
    monkeypatch.delenv("SPECTRIM_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_dir() == tmp_path / "xdg" / "spectrim"
    monkeypatch.setenv("SPECTRIM_DATA", "")
    assert data_root() is None


def test_invalid_relpath(online: Path) -> None:
    for bad in ("../etc/passwd", "/abs/file", "", "a/./b"):
        with pytest.raises(ValueError, match="invalid data path"):
            fetch(bad)


def test_unknown_file_without_offline_root(online: Path) -> None:
    with pytest.raises(KeyError, match=r"no-such/file.bin"):
        fetch("no-such/file.bin")


def test_download_file_url_verifies_and_caches(
    online: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    src = tmp_path / "remote" / "blob.bin"
    src.parent.mkdir()
    payload = b"spectrim" * 1000
    src.write_bytes(payload)
    remote = RemoteFile("test/blob.bin", src.as_uri(), hashlib.sha256(payload).hexdigest())
    _register(monkeypatch, remote)

    path = fetch("test/blob.bin")
    assert path == online / "test" / "blob.bin"
    assert path.read_bytes() == payload
    assert [p.name for p in path.parent.iterdir()] == ["blob.bin"]  # no temp files left

    # second call is served from the cache, even when the source is gone
    src.unlink()
    assert fetch("test/blob.bin") == path


def test_download_rejects_wrong_sha256(
    online: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    src = tmp_path / "blob.bin"
    src.write_bytes(b"tampered")
    remote = RemoteFile("test/blob.bin", src.as_uri(), "0" * 64)
    _register(monkeypatch, remote)
    with pytest.raises(ChecksumError) as info:
        fetch("test/blob.bin")
    msg = str(info.value)
    assert "test/blob.bin" in msg and src.as_uri() in msg
    assert hashlib.sha256(b"tampered").hexdigest() in msg and "0" * 64 in msg
    # nothing was left in the cache, not even a partial file
    assert not (online / "test" / "blob.bin").exists()
    assert list((online / "test").iterdir()) == []


def test_download_accepts_recompressed_gz_by_uncompressed_md5(
    online: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    content = bytes(range(256)) * 100
    original = gzip.compress(content, compresslevel=9, mtime=0)
    mirror = gzip.compress(content, compresslevel=1, mtime=12345)  # different bytes, same content
    assert original != mirror
    src = tmp_path / "mirror.gz"
    src.write_bytes(mirror)
    md5 = hashlib.md5(content).hexdigest()
    remote = RemoteFile("test/data.gz", src.as_uri(), hashlib.sha256(original).hexdigest(), md5)
    _register(monkeypatch, remote)
    path = fetch("test/data.gz")
    assert gzip.decompress(path.read_bytes()) == content

    # a gz whose content differs is still rejected, with both checks in the message
    bad = tmp_path / "bad.gz"
    bad.write_bytes(gzip.compress(content + b"x"))
    _register(monkeypatch, RemoteFile("test/bad.gz", bad.as_uri(), remote.sha256, md5))
    with pytest.raises(ChecksumError, match="uncompressed md5"):
        fetch("test/bad.gz")


def test_download_error_names_url_and_file(
    online: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    missing = (tmp_path / "does-not-exist.bin").as_uri()
    _register(monkeypatch, RemoteFile("test/x.bin", missing, "0" * 64))
    with pytest.raises(DownloadError) as info:
        fetch("test/x.bin")
    msg = str(info.value)
    assert missing in msg and "test/x.bin" in msg and "SPECTRIM_DATA" in msg
    assert not isinstance(info.value, ChecksumError)
    assert list((online / "test").iterdir()) == []


def test_download_network_error_is_wrapped(online: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import urllib.error

    def refuse(*args: object, **kwargs: object) -> None:
        raise urllib.error.URLError("network is unreachable")

    monkeypatch.setattr(dl.urllib.request, "urlopen", refuse)
    remote = FILES["mnist/t10k-labels-idx1-ubyte.gz"]
    with pytest.raises(DownloadError, match="network is unreachable") as info:
        fetch(remote.relpath)
    assert remote.url in str(info.value)
