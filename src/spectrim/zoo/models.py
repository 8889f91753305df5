"""Built-in models: CIFAR ResNets (He et al. 2016, §4.2) with pretrained weights, and a small
CNN for the 8×8 scikit-learn digits that trains in seconds on a CPU.

Example::

    >>> from spectrim.zoo import get_model, load_dataset
    >>> model = get_model("resnet20-cifar10")  # doctest: +SKIP
    >>> x, y = load_dataset("cifar10", "test", limit=8).tensors  # doctest: +SKIP
    >>> model(x).argmax(1)  # doctest: +SKIP
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from spectrim.zoo.download import fetch

__all__ = [
    "PadShortcut",
    "BasicBlock",
    "CifarResNet",
    "resnet20",
    "resnet32",
    "resnet44",
    "resnet56",
    "PRETRAINED_FILES",
    "load_pretrained",
    "DigitsCNN",
    "train_digits_cnn",
    "MODELS",
    "list_models",
    "get_model",
]

Shortcut = Literal["A", "B"]


class PadShortcut(nn.Module):
    """Parameter-free option-A shortcut: subsample by 2 and zero-pad the channels.

    Maps ``(N, planes // 2, H, W)`` to ``(N, planes, H // 2, W // 2)``.
    """

    def __init__(self, planes: int) -> None:
        super().__init__()
        self.planes = planes

    def forward(self, x: Tensor) -> Tensor:
        p = self.planes // 4
        return F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, p, p), "constant", 0)

    def extra_repr(self) -> str:
        return f"planes={self.planes}"


class BasicBlock(nn.Module):
    """Two 3×3 conv-BN layers with a residual connection: ``relu(bn2(conv2(relu(bn1(conv1 x)))) +
    shortcut(x))``."""

    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int = 1, shortcut: Shortcut = "A"):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut: nn.Module
        if stride == 1 and in_planes == planes:
            self.shortcut = nn.Identity()
        elif shortcut == "A":
            if stride != 2 or planes != 2 * in_planes:
                raise ValueError(
                    f"option-A shortcut needs stride 2 and planes == 2*in_planes, got "
                    f"stride={stride}, in_planes={in_planes}, planes={planes}"
                )
            self.shortcut = PadShortcut(planes)
        elif shortcut == "B":
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False),
                nn.BatchNorm2d(planes),
            )
        else:
            raise ValueError(f"shortcut must be 'A' or 'B', got {shortcut!r}")

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out = out + self.shortcut(x)
        return F.relu(out)


class CifarResNet(nn.Module):
    """CIFAR ResNet of He et al. (2016, §4.2): depth ``6n+2``, stages of ``width``, ``2·width`` and
    ``4·width`` channels on 32×32 inputs.

    The module names (``conv1``, ``bn1``, ``layer1..3``, ``linear``) match the akamaster
    checkpoints, so their state dicts load with ``strict=True``.

    Args:
        depth: Total depth, ``6n + 2`` (20, 32, 44, 56, 110, ...).
        num_classes: Output classes.
        shortcut: ``"A"`` (zero-padding identity, parameter-free) or ``"B"`` (1×1 conv + BN
            projection) for blocks that change shape.
        width: Channels of the first stage.
        in_channels: Input channels.

    Example::

        >>> m = CifarResNet(20)
        >>> m(torch.zeros(2, 3, 32, 32)).shape
        torch.Size([2, 10])
    """

    def __init__(
        self,
        depth: int,
        num_classes: int = 10,
        shortcut: Shortcut = "A",
        width: int = 16,
        in_channels: int = 3,
    ) -> None:
        super().__init__()
        if depth < 8 or (depth - 2) % 6 != 0:
            raise ValueError(
                f"CifarResNet depth must be 6n+2 with n >= 1 (20, 32, ...), got {depth}"
            )
        if shortcut not in ("A", "B"):
            raise ValueError(f"shortcut must be 'A' or 'B', got {shortcut!r}")
        if shortcut == "A" and width % 2 != 0:
            raise ValueError(f"option-A shortcut needs an even width, got {width}")
        n = (depth - 2) // 6
        self.depth = depth
        self.shortcut_type: Shortcut = shortcut
        self.in_planes = width
        self.conv1 = nn.Conv2d(in_channels, width, 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.layer1 = self._make_layer(width, n, 1, shortcut)
        self.layer2 = self._make_layer(2 * width, n, 2, shortcut)
        self.layer3 = self._make_layer(4 * width, n, 2, shortcut)
        self.linear = nn.Linear(4 * width, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Linear | nn.Conv2d):
                nn.init.kaiming_normal_(m.weight)

    def _make_layer(
        self, planes: int, blocks: int, stride: int, shortcut: Shortcut
    ) -> nn.Sequential:
        layers: list[nn.Module] = []
        for s in [stride] + [1] * (blocks - 1):
            layers.append(BasicBlock(self.in_planes, planes, s, shortcut))
            self.in_planes = planes
        return nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layer1(out)
        out = self.layer2(out)
        out = self.layer3(out)
        out = F.avg_pool2d(out, out.size()[3])
        out = out.view(out.size(0), -1)
        return self.linear(out)


def resnet20(num_classes: int = 10, shortcut: Shortcut = "A") -> CifarResNet:
    """ResNet-20 for CIFAR (0.27M parameters with option A)."""
    return CifarResNet(20, num_classes, shortcut)


def resnet32(num_classes: int = 10, shortcut: Shortcut = "A") -> CifarResNet:
    """ResNet-32 for CIFAR (0.46M parameters with option A)."""
    return CifarResNet(32, num_classes, shortcut)


def resnet44(num_classes: int = 10, shortcut: Shortcut = "A") -> CifarResNet:
    """ResNet-44 for CIFAR (0.66M parameters with option A)."""
    return CifarResNet(44, num_classes, shortcut)


def resnet56(num_classes: int = 10, shortcut: Shortcut = "A") -> CifarResNet:
    """ResNet-56 for CIFAR (0.85M parameters with option A)."""
    return CifarResNet(56, num_classes, shortcut)


#: Pretrained model name -> (depth, data file relative to the data root).
PRETRAINED_FILES: dict[str, tuple[int, str]] = {
    "resnet20-cifar10": (20, "cifar10-resnet-akamaster/resnet20-12fca82f.th"),
    "resnet32-cifar10": (32, "cifar10-resnet-akamaster/resnet32-d509ac18.th"),
    "resnet44-cifar10": (44, "cifar10-resnet-akamaster/resnet44-014dd654.th"),
    "resnet56-cifar10": (56, "cifar10-resnet-akamaster/resnet56-4bfd9763.th"),
}


def load_pretrained(name: str) -> nn.Module:
    """A CIFAR-10 ResNet with the pretrained weights of Idelbayev (akamaster), in eval mode.

    Inputs are expected as RGB in [0, 1] normalised with mean (0.485, 0.456, 0.406) and std
    (0.229, 0.224, 0.225), which is what ``load_dataset("cifar10", ...)`` returns.

    Example::

        >>> model = load_pretrained("resnet56-cifar10")  # doctest: +SKIP
    """
    if name not in PRETRAINED_FILES:
        raise KeyError(
            f"no pretrained weights for {name!r}; available: {', '.join(PRETRAINED_FILES)}"
        )
    depth, relpath = PRETRAINED_FILES[name]
    path = fetch(relpath)
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    state = ckpt["state_dict"] if isinstance(ckpt, dict) and "state_dict" in ckpt else ckpt
    state = {k.removeprefix("module."): v for k, v in state.items()}
    model = CifarResNet(depth, num_classes=10, shortcut="A")
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise RuntimeError(f"weights in {path} do not match CifarResNet({depth}): {exc}") from exc
    return model.eval()


class DigitsCNN(nn.Module):
    """Small CNN for the 8×8 scikit-learn digits (1 input channel, 10 classes).

    ``conv(1→32)-BN-ReLU → conv(32→64)-BN-ReLU → maxpool2 → conv(64→64)-BN-ReLU → flatten →
    Linear(1024→128)-ReLU → Linear(128→10)``.
    """

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 32, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(32)
        self.conv2 = nn.Conv2d(32, 64, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(64)
        self.pool = nn.MaxPool2d(2)
        self.conv3 = nn.Conv2d(64, 64, 3, padding=1)
        self.bn3 = nn.BatchNorm2d(64)
        self.fc1 = nn.Linear(64 * 4 * 4, 128)
        self.fc2 = nn.Linear(128, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        x = F.relu(self.bn2(self.conv2(x)))
        x = self.pool(x)
        x = F.relu(self.bn3(self.conv3(x)))
        x = torch.flatten(x, 1)
        x = F.relu(self.fc1(x))
        return self.fc2(x)


def train_digits_cnn(
    seed: int = 0,
    epochs: int = 4,
    batch_size: int = 64,
    lr: float = 3e-3,
    num_threads: int | None = 1,
) -> tuple[DigitsCNN, TensorDataset, TensorDataset]:
    """Train a :class:`DigitsCNN` on the scikit-learn digits (1297 train / 500 test images).

    Deterministic for a given ``seed``; the global RNG state is left untouched. Reaches about
    98% test accuracy in a few seconds on one CPU core.

    Args:
        seed: Seed for the initialisation and the batch order.
        epochs: Passes over the training set.
        batch_size: Mini-batch size.
        lr: Peak Adam learning rate (one-cycle schedule).
        num_threads: torch's intra-op thread count during training, restored afterwards
            (``None``: leave it alone). One thread is the fastest for this tiny model and avoids
            heavy slow-downs when the CPU is shared.

    Returns:
        ``(model, train_set, test_set)`` with the model in eval mode.

    Example::

        >>> model, train_set, test_set = train_digits_cnn(seed=0)  # doctest: +SKIP
    """
    from spectrim.zoo.datasets import load_dataset

    train_set = load_dataset("digits", "train")
    test_set = load_dataset("digits", "test")
    old_threads = torch.get_num_threads()
    if num_threads is not None:
        torch.set_num_threads(num_threads)
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = DigitsCNN()
            gen = torch.Generator().manual_seed(seed)
            loader = DataLoader(train_set, batch_size=batch_size, shuffle=True, generator=gen)
            opt = torch.optim.Adam(model.parameters(), lr=lr)
            sched = torch.optim.lr_scheduler.OneCycleLR(
                opt, max_lr=lr, total_steps=max(epochs * len(loader), 1)
            )
            model.train()
            for _ in range(epochs):
                for xb, yb in loader:
                    opt.zero_grad(set_to_none=True)
                    F.cross_entropy(model(xb), yb).backward()
                    opt.step()
                    sched.step()
    finally:
        if num_threads is not None:
            torch.set_num_threads(old_threads)
    model.eval()
    return model, train_set, test_set


def _pretrained_builder(name: str) -> Callable[[bool], nn.Module]:
    depth = PRETRAINED_FILES[name][0]

    def build(pretrained: bool = True) -> nn.Module:
        return load_pretrained(name) if pretrained else CifarResNet(depth).eval()

    build.__doc__ = f"{name}: CifarResNet({depth}, shortcut='A'), pretrained by akamaster."
    return build


def _digits_builder(pretrained: bool = True) -> nn.Module:
    """digits-cnn: DigitsCNN; "pretrained" trains it on sklearn digits (seed 0, a few seconds)."""
    return train_digits_cnn(seed=0)[0] if pretrained else DigitsCNN().eval()


#: Model name -> builder ``f(pretrained: bool) -> nn.Module``.
MODELS: dict[str, Callable[[bool], nn.Module]] = {
    **{name: _pretrained_builder(name) for name in PRETRAINED_FILES},
    "digits-cnn": _digits_builder,
}


def list_models() -> list[str]:
    """Names accepted by :func:`get_model`."""
    return sorted(MODELS)


def get_model(name: str, pretrained: bool = True) -> nn.Module:
    """Build a registered model; with ``pretrained=True`` its trained weights are loaded.

    Example::

        >>> get_model("resnet20-cifar10", pretrained=False).linear.out_features
        10
    """
    if name not in MODELS:
        raise KeyError(f"unknown model {name!r}; available: {', '.join(list_models())}")
    return MODELS[name](pretrained)
