"""Built-in models and datasets, offline-first.

Files are read from ``$SPECTRIM_DATA`` when set, else from the download cache
(``$SPECTRIM_CACHE`` or ``~/.cache/spectrim``), else downloaded from pinned public URLs and
verified by sha256.

Example::

    >>> from spectrim.zoo import get_model, load_dataset
    >>> model = get_model("resnet20-cifar10")  # doctest: +SKIP
    >>> x, y = load_dataset("cifar10", "eval").tensors  # doctest: +SKIP
    >>> (model(x).argmax(1) == y).float().mean()  # doctest: +SKIP
    tensor(0.9150)
"""

from spectrim.zoo.datasets import (
    CIFAR10_CLASSES,
    CIFAR10_MEAN,
    CIFAR10_STD,
    DATASETS,
    MNIST_MEAN,
    MNIST_STD,
    DatasetInfo,
    ImageTensorDataset,
    Split,
    list_datasets,
    load_dataset,
    load_image_folder,
    read_idx,
)
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
from spectrim.zoo.models import (
    MODELS,
    PRETRAINED_FILES,
    BasicBlock,
    CifarResNet,
    DigitsCNN,
    PadShortcut,
    get_model,
    list_models,
    load_pretrained,
    resnet20,
    resnet32,
    resnet44,
    resnet56,
    train_digits_cnn,
)

__all__ = [
    # models
    "CifarResNet",
    "BasicBlock",
    "PadShortcut",
    "resnet20",
    "resnet32",
    "resnet44",
    "resnet56",
    "DigitsCNN",
    "train_digits_cnn",
    "load_pretrained",
    "PRETRAINED_FILES",
    "MODELS",
    "list_models",
    "get_model",
    # datasets
    "load_dataset",
    "load_image_folder",
    "list_datasets",
    "DATASETS",
    "DatasetInfo",
    "ImageTensorDataset",
    "Split",
    "read_idx",
    "CIFAR10_CLASSES",
    "CIFAR10_MEAN",
    "CIFAR10_STD",
    "MNIST_MEAN",
    "MNIST_STD",
    # download
    "fetch",
    "data_root",
    "cache_dir",
    "sha256_file",
    "FILES",
    "RemoteFile",
    "DownloadError",
    "ChecksumError",
]
