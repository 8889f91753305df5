"""Built-in datasets on the real data, and user data via load_image_folder."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from spectrim.zoo import (
    CIFAR10_MEAN,
    CIFAR10_STD,
    DATASETS,
    list_datasets,
    load_dataset,
    load_image_folder,
)

# Published MNIST class counts (data README).
MNIST_TRAIN_COUNTS = [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]
MNIST_TEST_COUNTS = [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]


def test_registry() -> None:
    assert list_datasets() == ["cifar10", "cifar10-jpeg", "digits", "mnist"]
    assert DATASETS["cifar10"].input_shape == (3, 32, 32)
    assert DATASETS["mnist"].sizes == {"train": 60000, "test": 10000}


def test_digits_split() -> None:
    train = load_dataset("digits", "train")
    test = load_dataset("digits", "eval")
    xtr, ytr = train.tensors
    xte, yte = test.tensors
    assert xtr.shape == (1297, 1, 8, 8) and xte.shape == (500, 1, 8, 8)
    assert xtr.dtype == torch.float32 and ytr.dtype == torch.int64
    assert float(xtr.min()) == 0.0 and float(xtr.max()) == 1.0
    # stratified: every class is in both splits, roughly 50 per class in test
    assert torch.bincount(yte, minlength=10).min() >= 45
    # together the two splits are exactly the 1797 images, class by class
    from sklearn.datasets import load_digits

    all_counts = torch.bincount(torch.as_tensor(load_digits().target), minlength=10)
    assert len(train) + len(test) == 1797
    assert torch.equal(
        torch.bincount(ytr, minlength=10) + torch.bincount(yte, minlength=10), all_counts
    )
    # the split is fixed
    assert torch.equal(load_dataset("digits", "calib").tensors[1], ytr)
    assert len(load_dataset("digits", "train", limit=10)) == 10


def test_mnist(data_dir: Path) -> None:
    test = load_dataset("mnist", "test")
    x, y = test.tensors
    assert x.shape == (10000, 1, 28, 28) and x.dtype == torch.float32
    assert torch.bincount(y).tolist() == MNIST_TEST_COUNTS
    # normalised with mean 0.1307 / std 0.3081
    assert float(x.min()) == pytest.approx(-0.1307 / 0.3081, abs=1e-5)
    assert float(x.max()) == pytest.approx((1 - 0.1307) / 0.3081, abs=1e-5)
    train = load_dataset("mnist", "train")
    xt, yt = train.tensors
    assert xt.shape == (60000, 1, 28, 28)
    assert torch.bincount(yt).tolist() == MNIST_TRAIN_COUNTS
    assert abs(float(xt.mean())) < 1e-3 and float(xt.std()) == pytest.approx(1.0, abs=1e-3)
    assert yt[:5].tolist() == [5, 0, 4, 1, 9]
    small = load_dataset("mnist", "calib", limit=100)
    assert torch.equal(small.tensors[0], xt[:100]) and torch.equal(small.tensors[1], yt[:100])


def test_cifar10(data_dir: Path) -> None:
    x, y = load_dataset("cifar10", "test").tensors
    assert x.shape == (1000, 3, 32, 32) and x.dtype == torch.float32 and y.dtype == torch.int64
    assert y[:10].tolist() == [3, 8, 8, 0, 6, 6, 1, 6, 3, 1]
    # undo the normalisation: pixels are k/255 exactly
    mean = torch.tensor(CIFAR10_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(CIFAR10_STD).view(1, 3, 1, 1)
    raw = x * std + mean
    assert torch.allclose(raw * 255, (raw * 255).round(), atol=1e-3)
    # test image 0 matches the raw RGB bytes recorded for CIFAR-10 test index 0 (prefix/suffix)
    import hashlib

    img0 = (raw[0] * 255).round().to(torch.uint8).permute(1, 2, 0).contiguous().numpy()
    digest = hashlib.sha256(img0.tobytes()).hexdigest()
    assert digest.startswith("af12e124") and digest.endswith("1f913")

    xtr, ytr = load_dataset("cifar10", "calib", limit=1500).tensors
    assert xtr.shape == (1500, 3, 32, 32)
    assert ytr[:5].tolist() == [6, 9, 9, 4, 1]
    assert load_dataset("cifar10", "train").tensors[0].shape[0] == 4000


def test_cifar10_jpeg_is_the_full_test_set_one_of_every_class_at_a_time(data_dir: Path) -> None:
    """The archive is sorted by class; a prefix of the dataset must hold every class
    (the first 1000 images calibrating on airplanes alone was a silent defect)."""
    x, y = load_dataset("cifar10-jpeg", "test", limit=3001).tensors
    assert x.shape == (3001, 3, 32, 32) and y.bincount().tolist() == [301] + [300] * 9
    assert y[:20].tolist() == list(range(10)) * 2
    # cat/0000.jpg is CIFAR-10 test image 0 (a cat), saved lossy: close to the lossless one
    lossless = load_dataset("cifar10", "test", limit=1).tensors[0][0]
    std = torch.tensor(CIFAR10_STD).view(3, 1, 1)
    assert float(((x[3] - lossless) * std).abs().mean()) < 0.03
    assert float(((x[0] - lossless) * std).abs().mean()) > 0.1  # an airplane is not


def test_a_file_without_a_download_says_where_to_put_it(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.delenv("SPECTRIM_DATA", raising=False)
    monkeypatch.setenv("SPECTRIM_CACHE", str(tmp_path))
    with pytest.raises(FileNotFoundError, match="no byte-identical public download"):
        load_dataset("cifar10-jpeg", "test")


def test_bad_names() -> None:
    with pytest.raises(KeyError, match="imagenet"):
        load_dataset("imagenet", "test")
    with pytest.raises(ValueError, match=r"'digits'.*'valid'"):
        load_dataset("digits", "valid")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="limit"):
        load_dataset("digits", "test", limit=-1)


def test_missing_offline_data_names_path(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("SPECTRIM_DATA", str(tmp_path))
    with pytest.raises(FileNotFoundError, match="SPECTRIM_DATA") as info:
        load_dataset("mnist", "test")
    assert str(tmp_path / "mnist") in str(info.value)


def test_image_folder_with_classes(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    expected = {}
    for cls in ("dog", "cat"):
        (tmp_path / cls).mkdir()
        for i in range(3):
            arr = rng.integers(0, 256, size=(6, 5, 3), dtype=np.uint8)
            Image.fromarray(arr).save(tmp_path / cls / f"{i}.png")
            expected[(cls, i)] = arr
    (tmp_path / "cat" / "notes.txt").write_text("ignored")
    ds = load_image_folder(tmp_path, normalize=((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)))
    x, y = ds.tensors
    assert ds.classes == ("cat", "dog")
    # one of every class at a time, so that limit= keeps every class
    assert x.shape == (6, 3, 6, 5) and y.tolist() == [0, 1, 0, 1, 0, 1]
    want = torch.from_numpy(expected[("dog", 1)]).permute(2, 0, 1).float() / 255
    assert torch.allclose(x[3], (want - 0.5) / 0.5)
    # grayscale + resize + limit
    g = load_image_folder(tmp_path, grayscale=True, size=(4, 4), limit=2)
    assert g.tensors[0].shape == (2, 1, 4, 4) and g.tensors[1].tolist() == [0, 1]


def test_image_folder_errors(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="nope"):
        load_image_folder(tmp_path / "nope")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="no images"):
        load_image_folder(empty)
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    Image.new("RGB", (4, 4)).save(mixed / "a.png")
    Image.new("RGB", (5, 4)).save(mixed / "b.png")
    with pytest.raises(ValueError, match=r"b.png.*size="):
        load_image_folder(mixed)
    ds = load_image_folder(mixed, size=(4, 4))
    assert ds.tensors[1].tolist() == [-1, -1]  # flat folder: unlabelled
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "x.png").write_bytes(b"not a png")
    with pytest.raises(ValueError, match=r"x.png"):
        load_image_folder(broken)
    with pytest.raises(ValueError, match="channels"):
        load_image_folder(mixed, size=(4, 4), normalize=((0.5, 0.5), (0.5, 0.5)))


def test_tensor_files(tmp_path: Path) -> None:
    x = np.random.default_rng(0).integers(0, 256, size=(4, 8, 8, 3), dtype=np.uint8)  # NHWC
    y = np.arange(4)
    np.savez(tmp_path / "d.npz", x=x, y=y)
    ds = load_image_folder(tmp_path / "d.npz")
    assert ds.tensors[0].shape == (4, 3, 8, 8)
    assert torch.allclose(ds.tensors[0][1, 2], torch.from_numpy(x[1, :, :, 2]).float() / 255)
    assert ds.tensors[1].tolist() == [0, 1, 2, 3]

    xf = torch.randn(5, 1, 8, 8)
    torch.save({"x": xf}, tmp_path / "d.pt")
    ds = load_image_folder(tmp_path / "d.pt", normalize=((1.0,), (2.0,)))
    assert torch.allclose(ds.tensors[0], (xf - 1) / 2)
    assert ds.tensors[1].tolist() == [-1] * 5

    # a file sorted by class comes one of every class at a time, so a prefix (limit=,
    # the CLI's --calib) holds every class; regression targets keep the file's order
    xs = torch.arange(12.0).reshape(12, 1, 1, 1)
    torch.save((xs, torch.tensor([0] * 6 + [1] * 4 + [2] * 2)), tmp_path / "sorted.pt")
    ds = load_image_folder(tmp_path / "sorted.pt", limit=6)
    assert ds.tensors[1].tolist() == [0, 1, 2, 0, 1, 2]
    assert ds.tensors[0].flatten().tolist() == [0, 6, 10, 1, 7, 11]
    torch.save((xs, torch.linspace(1.0, 0.0, 12)), tmp_path / "reg.pt")
    assert load_image_folder(tmp_path / "reg.pt").tensors[0].flatten().tolist() == list(range(12))

    torch.save((xf, torch.arange(4)), tmp_path / "bad.pt")
    with pytest.raises(ValueError, match=r"bad.pt.*5 images but 4 labels"):
        load_image_folder(tmp_path / "bad.pt")
    np.savez(tmp_path / "nox.npz", images=x)
    with pytest.raises(ValueError, match=r"nox.npz.*'x'"):
        load_image_folder(tmp_path / "nox.npz")
    (tmp_path / "d.csv").write_text("1,2")
    with pytest.raises(ValueError, match=r"d.csv"):
        load_image_folder(tmp_path / "d.csv")


def test_a_seed_draws_the_order_of_examples_without_class_labels(tmp_path: Path) -> None:
    """A table sorted by a feature (the California housing file opens with the Bay Area):
    with ``seed`` its rows come in a random order drawn from it, so ``limit`` keeps a
    uniform sample; whole-number prices are targets, not 400,000 classes."""
    x = torch.arange(40.0)
    rows = ["f,target"] + [f"{v:.1f},{100000 + 5000 * v:.1f}" for v in x.tolist()]
    (tmp_path / "sorted.csv").write_text("\n".join(rows) + "\n")
    first = load_image_folder(tmp_path / "sorted.csv", limit=10)
    assert first.tensors[0].flatten().tolist() == list(range(10))  # no seed: the file's
    assert first.tensors[1].tolist() == [-1] * 10  # targets, no labels
    ds = load_image_folder(tmp_path / "sorted.csv", seed=3)
    order = torch.randperm(40, generator=torch.Generator().manual_seed(3))
    assert ds.tensors[0].flatten().tolist() == order.float().tolist()
    drawn = load_image_folder(tmp_path / "sorted.csv", seed=3, limit=10)
    assert drawn.tensors[0].flatten().tolist() == order[:10].float().tolist()
    assert drawn.tensors[0].max() > 20  # not the first rows: a sample of the whole range
    # labelled files and class folders ignore the seed: every class in turn
    torch.save((x.reshape(40, 1, 1, 1), torch.arange(40) // 20), tmp_path / "labelled.pt")
    turns = load_image_folder(tmp_path / "labelled.pt", seed=3, limit=4)
    assert turns.tensors[1].tolist() == [0, 1, 0, 1]
    # a flat folder of images (no labels): the files in the drawn order
    for i in range(6):
        Image.fromarray(np.full((2, 2, 3), 40 * i, dtype=np.uint8)).save(tmp_path / f"{i}.png")
    flat = load_image_folder(tmp_path, seed=5)
    values = (flat.tensors[0][:, 0, 0, 0] * 255).round().div(40).long().tolist()
    assert values == torch.randperm(6, generator=torch.Generator().manual_seed(5)).tolist()


def test_nan_inputs_are_named_by_their_place_in_the_file(tmp_path: Path) -> None:
    """The CLI may draw or interleave the examples before they calibrate; a NaN is
    reported where the user can find it: its example in the file (a CSV: its line)."""
    x = torch.zeros(12, 1, 2, 2)
    x[9, 0, 1, 0] = float("inf")
    x[11] = float("nan")
    torch.save((x, torch.arange(12) % 3), tmp_path / "bad.pt")  # labelled: comes in turns
    with pytest.raises(
        ValueError, match=r"bad.pt: example 9 \(of 12, in the file's order\).*1 more"
    ):
        load_image_folder(tmp_path / "bad.pt", seed=0)
    (tmp_path / "bad.csv").write_text("a,b\n1,2\n3,nan\n")
    with pytest.raises(ValueError, match=r"bad.csv, line 3: example 1 "):
        load_image_folder(tmp_path / "bad.csv")
