"""Built-in datasets as in-memory :class:`~torch.utils.data.TensorDataset` objects.

Every dataset returns ``(images, labels)`` with float32 normalised images in NCHW layout and int64
labels. Splits are ``"train"`` / ``"test"``; ``"calib"`` is an alias for ``"train"`` and ``"eval"``
for ``"test"``.

==========  ======================  ==============  =====================================
name        train / test            shape           normalisation
==========  ======================  ==============  =====================================
digits      1297 / 500 (stratified) (N, 1, 8, 8)    /16
mnist       60000 / 10000           (N, 1, 28, 28)  /255, mean 0.1307, std 0.3081
cifar10     4000 / 1000 (lossless)  (N, 3, 32, 32)  /255, ImageNet mean/std (per channel)
==========  ======================  ==============  =====================================

Example::

    >>> from spectrim.zoo import load_dataset
    >>> ds = load_dataset("digits", "test")
    >>> x, y = ds.tensors
    >>> tuple(x.shape), y.dtype
    ((500, 1, 8, 8), torch.int64)
"""

from __future__ import annotations

import gzip
import json
import os
import re
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, TypeVar

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import TensorDataset

from spectrim.zoo.download import fetch

__all__ = [
    "Split",
    "ImageTensorDataset",
    "DatasetInfo",
    "DATASETS",
    "CIFAR10_CLASSES",
    "CIFAR10_MEAN",
    "CIFAR10_STD",
    "MNIST_MEAN",
    "MNIST_STD",
    "IMAGE_EXTENSIONS",
    "list_datasets",
    "load_dataset",
    "load_image_folder",
    "read_idx",
]

Split = Literal["train", "test", "calib", "eval"]

CIFAR10_CLASSES: tuple[str, ...] = (
    "airplane",
    "automobile",
    "bird",
    "cat",
    "deer",
    "dog",
    "frog",
    "horse",
    "ship",
    "truck",
)
#: Normalisation expected by the pretrained akamaster ResNets (ImageNet statistics).
CIFAR10_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
CIFAR10_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)
MNIST_MEAN: tuple[float] = (0.1307,)
MNIST_STD: tuple[float] = (0.3081,)

IMAGE_EXTENSIONS: frozenset[str] = frozenset(
    {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm"}
)

_SPLIT_ALIASES: dict[str, Literal["train", "test"]] = {
    "train": "train",
    "calib": "train",
    "test": "test",
    "eval": "test",
}


class ImageTensorDataset(TensorDataset):
    """A :class:`TensorDataset` of ``(images, labels)`` that also records its class names.

    Attributes:
        classes: Class names, indexed by label (empty when unknown).
        source: Where the data came from (dataset name or path), for messages.
    """

    def __init__(
        self, images: Tensor, labels: Tensor, classes: Sequence[str] = (), source: str = ""
    ):
        super().__init__(images, labels)
        self.classes: tuple[str, ...] = tuple(classes)
        self.source = source

    def __repr__(self) -> str:
        x = self.tensors[0]
        return f"ImageTensorDataset(source={self.source!r}, n={len(x)}, shape={tuple(x.shape[1:])})"


@dataclass(frozen=True)
class DatasetInfo:
    """Metadata of a built-in dataset; ``loader(split, limit)`` builds it."""

    name: str
    loader: Callable[[Literal["train", "test"], int | None], ImageTensorDataset]
    input_shape: tuple[int, int, int]
    num_classes: int
    sizes: dict[str, int]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    description: str


def _normalize(x: Tensor, mean: Sequence[float], std: Sequence[float]) -> Tensor:
    c = x.shape[1]
    m = torch.as_tensor(mean, dtype=x.dtype)
    s = torch.as_tensor(std, dtype=x.dtype)
    if m.numel() not in (1, c) or s.numel() not in (1, c):
        raise ValueError(
            f"normalize mean/std have {m.numel()}/{s.numel()} values but the images have {c} channels"
        )
    if bool((s <= 0).any()):
        raise ValueError(f"normalize std must be positive, got {list(std)}")
    shape = (1, -1) + (1,) * (x.dim() - 2)  # images (N, C, H, W) or features (N, F)
    return (x - m.view(shape)) / s.view(shape)


def _check_limit(limit: int | None, what: str) -> None:
    if limit is not None and (not isinstance(limit, int) or limit < 0):
        raise ValueError(f"{what}: limit must be a non-negative int or None, got {limit!r}")


# ---------------------------------------------------------------------------------------- digits


def _load_digits(split: Literal["train", "test"], limit: int | None) -> ImageTensorDataset:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    bunch = load_digits()
    x = np.asarray(bunch.images, dtype=np.float32) / 16.0
    y = np.asarray(bunch.target, dtype=np.int64)
    idx_train, idx_test = train_test_split(
        np.arange(len(y)), test_size=500, random_state=0, stratify=y
    )
    idx = np.sort(idx_train if split == "train" else idx_test)[:limit]
    images = torch.from_numpy(x[idx]).unsqueeze(1).contiguous()
    labels = torch.from_numpy(y[idx])
    return ImageTensorDataset(images, labels, [str(i) for i in range(10)], f"digits/{split}")


# ----------------------------------------------------------------------------------------- mnist


def read_idx(path: str | os.PathLike[str], limit: int | None = None) -> np.ndarray:
    """Read an IDX file (optionally gzipped) of unsigned bytes into a numpy array.

    Only the first ``limit`` items are decoded when ``limit`` is given.
    """
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as fh:
            header = fh.read(4)
            if len(header) != 4 or header[0] != 0 or header[1] != 0 or header[2] != 0x08:
                raise ValueError(f"{path} is not an unsigned-byte IDX file (header {header.hex()})")
            ndim = header[3]
            dims = [int.from_bytes(fh.read(4), "big") for _ in range(ndim)]
            n = dims[0] if limit is None else min(dims[0], limit)
            count = n * int(np.prod(dims[1:], dtype=np.int64))
            data = fh.read(count)
    except (EOFError, zlib.error, gzip.BadGzipFile) as exc:
        raise ValueError(
            f"{path} is truncated or corrupt ({exc or type(exc).__name__}); restore the file"
        ) from None
    if len(data) != count:
        raise ValueError(f"{path} is truncated: expected {count} bytes of data, got {len(data)}")
    return np.frombuffer(data, dtype=np.uint8).reshape(n, *dims[1:])


def _load_mnist(split: Literal["train", "test"], limit: int | None) -> ImageTensorDataset:
    prefix = "train" if split == "train" else "t10k"
    images_u8 = read_idx(fetch(f"mnist/{prefix}-images-idx3-ubyte.gz"), limit)
    labels_u8 = read_idx(fetch(f"mnist/{prefix}-labels-idx1-ubyte.gz"), limit)
    if len(images_u8) != len(labels_u8):
        raise ValueError(f"mnist/{split}: {len(images_u8)} images but {len(labels_u8)} labels")
    x = torch.from_numpy(images_u8.copy()).unsqueeze(1).float().div_(255.0)
    x = _normalize(x, MNIST_MEAN, MNIST_STD)
    y = torch.from_numpy(labels_u8.astype(np.int64))
    return ImageTensorDataset(x, y, [str(i) for i in range(10)], f"mnist/{split}")


# --------------------------------------------------------------------------------------- cifar10

_CIFAR_DIR = "cifar10-convnetjs"
_CIFAR_TRAIN_BATCHES = (0, 1, 2, 3)
_CIFAR_TEST_BATCH = 50  # labels[50000:51000] are the first 1000 test labels


def _cifar_labels() -> np.ndarray:
    path = fetch(f"{_CIFAR_DIR}/cifar10_labels.js")
    match = re.search(r"\[.*\]", path.read_text(encoding="utf-8"), re.S)
    if match is None:
        raise ValueError(f"{path}: no label array found (expected 'var labels=[...]')")
    labels = np.asarray(json.loads(match.group(0)), dtype=np.int64)
    if labels.shape != (51000,):
        raise ValueError(f"{path}: expected 51000 labels, found {labels.shape[0]}")
    return labels


def _cifar_batch(k: int) -> np.ndarray:
    from PIL import Image

    path = fetch(f"{_CIFAR_DIR}/cifar10_batch_{k}.png")
    with Image.open(path) as im:
        arr = np.asarray(im.convert("RGB"))
    if arr.shape != (1000, 1024, 3):
        raise ValueError(f"{path}: expected a 1024×1000 RGB image, got array shape {arr.shape}")
    return arr.reshape(1000, 32, 32, 3)


def _load_cifar10(split: Literal["train", "test"], limit: int | None) -> ImageTensorDataset:
    batches = _CIFAR_TRAIN_BATCHES if split == "train" else (_CIFAR_TEST_BATCH,)
    n_total = 1000 * len(batches)
    n = n_total if limit is None else min(limit, n_total)
    needed = batches[: max(1, -(-n // 1000))] if n > 0 else batches[:1]
    images = np.concatenate([_cifar_batch(k) for k in needed])[:n]
    all_labels = _cifar_labels()
    labels = np.concatenate([all_labels[1000 * k : 1000 * (k + 1)] for k in needed])[:n]
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float().div_(255.0).contiguous()
    x = _normalize(x, CIFAR10_MEAN, CIFAR10_STD)
    return ImageTensorDataset(
        x, torch.from_numpy(labels.copy()), CIFAR10_CLASSES, f"cifar10/{split}"
    )


_T = TypeVar("_T")


def _in_turns(items: Sequence[_T], key: Callable[[_T], object]) -> list[_T]:
    """``items`` taken one of every ``key`` at a time (in their order within a key, keys
    in their order of first appearance), so the first ``n`` are as balanced across the
    keys as ``n`` allows: a folder sorted by class, cut at ``limit``, would otherwise
    hold the first classes only.

    Example::

        >>> _in_turns(["a1", "a2", "a3", "b1", "c1", "c2"], key=lambda s: s[0])
        ['a1', 'b1', 'c1', 'a2', 'c2', 'a3']
    """
    rank: dict[object, int] = {}
    first: dict[object, int] = {}
    order = []
    for i, item in enumerate(items):
        k = key(item)
        first.setdefault(k, len(first))
        order.append((rank.get(k, 0), first[k], i))
        rank[k] = rank.get(k, 0) + 1
    return [items[i] for _, _, i in sorted(order)]


_CIFAR_JPEG = {"train": "cifar10-jpg/train.tar.gz", "test": "cifar10-jpg/test.tar.gz"}


def _load_cifar10_jpeg(split: Literal["train", "test"], limit: int | None) -> ImageTensorDataset:
    """All 10000 test (50000 train) CIFAR-10 images as lossy JPEGs (quality ~75): about 10
    points below the lossless images for pretrained models, so for relative numbers only.
    Members are read from the verified tarball in memory (nothing is extracted).  The
    archive is sorted by class; the images come one of every class at a time
    (:func:`_in_turns`), so the first ``limit`` are balanced across the classes."""
    import tarfile

    from PIL import Image

    path = fetch(_CIFAR_JPEG[split])
    with tarfile.open(path, "r:gz") as tar:
        members = _in_turns(
            sorted(
                (m for m in tar.getmembers() if m.isfile() and m.name.endswith(".jpg")),
                key=lambda m: (m.name.split("/")[-2], m.name),
            ),
            key=lambda m: m.name.split("/")[-2],
        )[:limit]
        # read in the archive's order (a gzip stream cannot seek back cheaply), placed
        # in the order above
        images: list[np.ndarray] = [np.empty(0)] * len(members)
        labels = [0] * len(members)
        for i in sorted(range(len(members)), key=lambda i: members[i].offset_data):
            m = members[i]
            cls = m.name.split("/")[-2]
            if cls not in CIFAR10_CLASSES:
                raise ValueError(f"{path}: member {m.name!r} is not under a CIFAR-10 class folder")
            f = tar.extractfile(m)
            assert f is not None
            with Image.open(f) as im:
                arr = np.asarray(im.convert("RGB"))
            if arr.shape != (32, 32, 3):
                raise ValueError(f"{path}: member {m.name!r} is {arr.shape}, not 32×32 RGB")
            images[i] = arr
            labels[i] = CIFAR10_CLASSES.index(cls)
    x = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float().div_(255.0).contiguous()
    x = _normalize(x, CIFAR10_MEAN, CIFAR10_STD)
    y = torch.tensor(labels, dtype=torch.int64)
    return ImageTensorDataset(x, y, CIFAR10_CLASSES, f"cifar10-jpeg/{split}")


# -------------------------------------------------------------------------------------- registry

#: Built-in datasets by name.
DATASETS: dict[str, DatasetInfo] = {
    "digits": DatasetInfo(
        name="digits",
        loader=_load_digits,
        input_shape=(1, 8, 8),
        num_classes=10,
        sizes={"train": 1297, "test": 500},
        mean=(0.0,),
        std=(1.0,),
        description="scikit-learn 8×8 digits, /16, stratified split (seed 0)",
    ),
    "mnist": DatasetInfo(
        name="mnist",
        loader=_load_mnist,
        input_shape=(1, 28, 28),
        num_classes=10,
        sizes={"train": 60000, "test": 10000},
        mean=MNIST_MEAN,
        std=MNIST_STD,
        description="MNIST (original IDX files)",
    ),
    "cifar10": DatasetInfo(
        name="cifar10",
        loader=_load_cifar10,
        input_shape=(3, 32, 32),
        num_classes=10,
        sizes={"train": 4000, "test": 1000},
        mean=CIFAR10_MEAN,
        std=CIFAR10_STD,
        description="CIFAR-10 lossless subset: first 4000 train / first 1000 test images",
    ),
    "cifar10-jpeg": DatasetInfo(
        name="cifar10-jpeg",
        loader=_load_cifar10_jpeg,
        input_shape=(3, 32, 32),
        num_classes=10,
        sizes={"train": 50000, "test": 10000},
        mean=CIFAR10_MEAN,
        std=CIFAR10_STD,
        description="CIFAR-10, all images as lossy JPEG (~10 points below lossless)",
    ),
}


def list_datasets() -> list[str]:
    """Names accepted by :func:`load_dataset`."""
    return sorted(DATASETS)


def load_dataset(name: str, split: Split, limit: int | None = None) -> ImageTensorDataset:
    """Load a built-in dataset split into memory.

    Args:
        name: One of :func:`list_datasets` (``"digits"``, ``"mnist"``, ``"cifar10"``).
        split: ``"train"``/``"calib"`` or ``"test"``/``"eval"``.
        limit: Keep only the first ``limit`` samples (in the dataset's fixed order, which
            mixes the classes: ``cifar10-jpeg`` takes one image of every class at a time).

    Returns:
        A :class:`TensorDataset` of (float32 normalised NCHW images, int64 labels).

    Example::

        >>> x, y = load_dataset("cifar10", "eval", limit=100).tensors  # doctest: +SKIP
        >>> x.shape  # doctest: +SKIP
        torch.Size([100, 3, 32, 32])
    """
    info = DATASETS.get(name)
    if info is None:
        raise KeyError(f"unknown dataset {name!r}; available: {', '.join(list_datasets())}")
    canonical = _SPLIT_ALIASES.get(split)
    if canonical is None:
        raise ValueError(
            f"dataset {name!r}: unknown split {split!r}; use one of {', '.join(_SPLIT_ALIASES)}"
        )
    _check_limit(limit, f"dataset {name!r}")
    return info.loader(canonical, limit)


# ------------------------------------------------------------------------------- user image data


def _as_nchw(x: Tensor, path: Path) -> Tensor:
    if x.ndim == 2:  # tabular features (N, F): an MLP's input, kept as is
        return x
    if x.ndim == 3:  # (N, H, W)
        return x.unsqueeze(1)
    if x.ndim != 4:
        raise ValueError(
            f"{path}: 'x' must have 2 (features: N×F), 3 (NHW) or 4 (NCHW/NHWC) dims, "
            f"got {tuple(x.shape)}"
        )
    if x.shape[1] not in (1, 3, 4) and x.shape[3] in (1, 3, 4):  # NHWC
        return x.permute(0, 3, 1, 2)
    return x


#: CSV columns read as the labels / targets of tabular data (the first one present)
LABEL_COLUMNS = ("y", "label", "target")


def _load_csv(path: Path) -> tuple[Tensor, Tensor | None]:
    """Tabular features: a header row, then numbers; a ``y`` / ``label`` / ``target``
    column holds the labels (or regression targets), every other column is a feature."""
    import csv

    with path.open(encoding="utf-8", newline="") as f:
        rows = list(csv.reader(f))
    if len(rows) < 2:
        raise ValueError(f"{path}: expected a header row and at least one row of numbers")
    header = [h.strip() for h in rows[0]]
    label = next((header.index(c) for c in LABEL_COLUMNS if c in header), None)
    data = np.empty((len(rows) - 1, len(header)))
    for i, row in enumerate(rows[1:], start=2):
        if len(row) != len(header):
            raise ValueError(f"{path}, line {i}: {len(row)} values, the header has {len(header)}")
        try:
            data[i - 2] = [float(v) for v in row]
        except ValueError:
            bad = next(v for v in row if not _is_number(v))
            raise ValueError(f"{path}, line {i}: {bad!r} is not a number") from None
    features = [j for j in range(len(header)) if j != label]
    x = torch.from_numpy(data[:, features]).float()
    y = torch.from_numpy(data[:, label]) if label is not None else None
    return x, y


def _is_number(v: str) -> bool:
    try:
        float(v)
    except ValueError:
        return False
    return True


def _load_tensor_file(path: Path) -> tuple[Tensor, Tensor | None]:
    if path.suffix == ".csv":
        return _load_csv(path)
    if path.suffix == ".npz":
        with np.load(path, allow_pickle=False) as npz:
            keys = list(npz.keys())
            if "x" not in keys:
                raise ValueError(
                    f"{path}: expected an array named 'x' (and optional 'y'), found {keys}"
                )
            x = torch.from_numpy(np.array(npz["x"]))
            y = torch.from_numpy(np.array(npz["y"])) if "y" in keys else None
        return x, y
    obj = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(obj, Tensor):
        return obj, None
    if isinstance(obj, dict):
        if "x" not in obj:
            raise ValueError(
                f"{path}: expected a dict with tensor 'x' (and optional 'y'), found keys {list(obj)}"
            )
        x, y = obj["x"], obj.get("y")
    elif isinstance(obj, tuple | list) and len(obj) in (1, 2):
        x, y = obj[0], (obj[1] if len(obj) == 2 else None)
    else:
        raise ValueError(f"{path}: expected a tensor, a dict {{'x', 'y'}} or a tuple (x, y)")
    if not isinstance(x, Tensor) or (y is not None and not isinstance(y, Tensor)):
        raise ValueError(f"{path}: 'x' and 'y' must be tensors")
    return x, y


def _read_image(file: Path, mode: str, size: tuple[int, int] | None) -> np.ndarray:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(file) as raw:
            im = raw.convert(mode)
            if size is not None:
                im = im.resize((size[1], size[0]), Image.Resampling.BILINEAR)
            arr = np.asarray(im, dtype=np.uint8)
    except (UnidentifiedImageError, OSError) as exc:
        raise ValueError(f"cannot read image {file}: {exc}") from exc
    return arr[:, :, None] if arr.ndim == 2 else arr


def _is_image(p: Path) -> bool:
    return p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS


def _check_finite(x: Tensor, p: Path) -> None:
    """Refuse NaN or inf inputs, naming the first such example by its place in the file
    (a CSV: its line)."""
    if not x.is_floating_point() or not len(x):
        return
    bad = (~torch.isfinite(x.reshape(len(x), -1))).any(1).nonzero().flatten()
    if len(bad):
        i = int(bad[0])
        where = f", line {i + 2}" if p.suffix == ".csv" else ""
        raise ValueError(
            f"{p}{where}: example {i} (of {len(x)}, in the file's order) contains NaN or inf"
            + (f"; so do {len(bad) - 1} more" if len(bad) > 1 else "")
        )


def _drawn(n: int, seed: int) -> Tensor:
    """A random order of ``n`` examples drawn from ``seed`` (the same on every machine)."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(int(seed)))


def _class_labels(y: Tensor) -> bool:
    """Whether ``y`` holds class indices, not regression targets: integers, none negative,
    and, when stored as floats (a CSV column), dense: ``max + 1`` at most twice the number
    of distinct values, as indices ``0 … C-1`` are.  Whole-dollar house prices are whole
    numbers too, but not classes.

    >>> _class_labels(torch.tensor([0, 2, 1, 2])), _class_labels(torch.tensor([452600.0, 358500.0]))
    (True, False)
    """
    y = y.reshape(-1)
    if y.numel() == 0 or y.is_complex() or y.dtype == torch.bool:
        return False
    if y.is_floating_point() and not bool((y == y.round()).all()):
        return False
    if not bool((y >= 0).all()):
        return False
    return not y.is_floating_point() or int(y.max()) + 1 <= 2 * len(torch.unique(y))


def load_image_folder(
    path: str | os.PathLike[str],
    normalize: tuple[Sequence[float], Sequence[float]] | None = None,
    *,
    grayscale: bool = False,
    size: tuple[int, int] | None = None,
    limit: int | None = None,
    seed: int | None = None,
) -> ImageTensorDataset:
    """Load user data: a ``.pt``/``.npz`` tensor file, a ``.csv`` of features, or a folder of
    images.

    * ``.npz``: arrays ``x`` and optional ``y``. ``.pt``: a tensor, a dict ``{"x", "y"}`` or a
      tuple ``(x, y)``.  With class labels, the examples come one of every class at a time
      (each class's in file order), as from a folder. ``x`` may be NCHW, NHWC or NHW images, or ``N × F`` tabular features
      (an MLP's input); uint8 values are scaled by 1/255, floats are kept as they are.
    * ``.csv``: a header row, then numbers; a ``y`` / ``label`` / ``target`` column is the
      label, every other column a feature.  Non-integer targets (regression) count as no
      labels: accuracy is then not scored, output fidelity still is.
    * A folder with class subfolders (``root/<class>/*.png``): labels are the indices of the
      sorted class names, and the images come one of every class at a time (each class's
      in file-name order, :func:`_in_turns`), so ``limit`` keeps every class.  A flat folder
      of images gives unlabelled data, in file-name order.
    * Without class labels (a flat folder, unlabelled or regression files) the examples
      keep the file's order, unless ``seed`` is given: then they come in a random order
      drawn from it, so ``limit`` keeps a uniform sample (files are often sorted: the
      first 1000 rows of the California housing table are all from the Bay Area).
      Pixels are scaled to [0, 1]; all images must have one size unless ``size`` is given.

    Missing labels are set to ``-1``.

    Args:
        path: File or directory.
        normalize: ``(mean, std)`` per channel (or one value for all), applied after scaling.
        grayscale: Read images as one channel (``"L"``) instead of RGB (folders only).
        size: Resize images to ``(height, width)`` (folders only).
        limit: Keep only the first ``limit`` samples (of a class folder: every class).
        seed: Draw the order of examples without class labels from this seed (before
            ``limit``); ``None`` (default): file order.  Labelled examples come in turns.

    Example::

        >>> ds = load_image_folder("my_images/", normalize=((0.5,) * 3, (0.5,) * 3))  # doctest: +SKIP
        >>> ds.classes  # doctest: +SKIP
        ('cat', 'dog')
    """
    p = Path(path).expanduser()
    _check_limit(limit, str(p))
    classes: list[str] = []
    if p.is_file():
        if p.suffix not in (".pt", ".pth", ".npz", ".csv"):
            raise ValueError(
                f"{p}: expected a .pt/.pth/.npz file, a .csv of features or a folder of images"
            )
        x, y = _load_tensor_file(p)
        x = _as_nchw(x, p)
        _check_finite(x, p)  # before any reordering: the culprit by its place in the file
        if y is not None and y.dim() == 1 and len(y) == len(x) and _class_labels(y):
            labels = y.tolist()
            turns = torch.tensor(_in_turns(range(len(labels)), key=labels.__getitem__))
            x, y = x[turns], y[turns]
        elif seed is not None:
            order = _drawn(len(x), seed)
            x, y = x[order], (y[order] if y is not None and len(y) == len(x) else y)
        x = x[:limit]
        y = y[:limit] if y is not None else None
        if x.dtype == torch.uint8:
            x = x.float().div_(255.0)
        elif x.is_floating_point():
            x = x.float()
        else:
            raise ValueError(f"{p}: 'x' must be uint8 or floating point, got {x.dtype}")
    elif p.is_dir():
        subdirs = sorted(d for d in p.iterdir() if d.is_dir() and not d.name.startswith("."))
        files: list[tuple[Path, int]] = []
        if subdirs:
            classes = [d.name for d in subdirs]
            for label, d in enumerate(subdirs):
                files += [(f, label) for f in sorted(d.iterdir()) if _is_image(f)]
            files = _in_turns(files, key=lambda item: item[1])
        else:
            files = [(f, -1) for f in sorted(p.iterdir()) if _is_image(f)]
            if seed is not None:
                files = [files[i] for i in _drawn(len(files), seed).tolist()]
        if not files:
            exts = ", ".join(sorted(IMAGE_EXTENSIONS))
            raise FileNotFoundError(f"no images ({exts}) found in {p} or its class subfolders")
        files = files[:limit]
        mode = "L" if grayscale else "RGB"
        arrays = [_read_image(f, mode, size) for f, _ in files]
        shape0 = arrays[0].shape
        for (f, _), a in zip(files, arrays):
            if a.shape != shape0:
                raise ValueError(
                    f"image {f} has size {a.shape[:2]} but {files[0][0]} has {shape0[:2]}; "
                    "pass size=(height, width) to resize"
                )
        x = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float().div_(255.0)
        y = torch.tensor([label for _, label in files], dtype=torch.int64)
    else:
        raise FileNotFoundError(f"{p} does not exist (expected a .pt/.npz file or an image folder)")

    if y is not None and not _class_labels(y) and not bool((y == -1).all()):
        y = None  # regression targets: no classes to score (fidelity is still measured)
    if y is None:
        y = torch.full((x.shape[0],), -1, dtype=torch.int64)
    y = y.reshape(-1).long()
    if len(y) != len(x):
        raise ValueError(f"{p}: {len(x)} images but {len(y)} labels")
    if normalize is not None:
        x = _normalize(x, normalize[0], normalize[1])
    return ImageTensorDataset(x.contiguous(), y, classes, str(p))
