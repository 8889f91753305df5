"""Small hand-built models exercising one channel-flow construct each (shared by the
graph tests).  All take ``(N, 3, 6, 6)`` images unless stated otherwise."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def image(n: int = 2, size: int = 6) -> torch.Tensor:
    return torch.randn(n, 3, size, size)


class Residual(nn.Module):
    """stem → (stem + c2(c1(stem))) → mean → head: the stream has 2 producers."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.c1 = nn.Conv2d(8, 6, 3, padding=1)
        self.c2 = nn.Conv2d(6, 8, 3, padding=1)
        self.head = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn(self.stem(x)))
        y = self.c2(F.relu(self.c1(x)))
        x = F.relu(x + y)
        return self.head(x.mean((2, 3)))


class DenseLike(nn.Module):
    """DenseNet-style: c reads cat([a, b]); a is read by b and c."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 4, 3, padding=1)
        self.b = nn.Conv2d(4, 5, 3, padding=1)
        self.c = nn.Conv2d(9, 6, 1)
        self.fc = nn.Linear(6, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = F.relu(self.a(x))
        b = F.relu(self.b(a))
        c = F.relu(self.c(torch.cat([a, b], 1)))
        return self.fc(F.adaptive_avg_pool2d(c, 1).flatten(1))


class FlattenHead(nn.Module):
    """conv (4 ch) → pool to 3×3 → flatten → Linear: every channel is read 9 times."""

    def __init__(self, how: str = "torch.flatten") -> None:
        super().__init__()
        self.how = how
        self.c = nn.Conv2d(3, 4, 3, padding=1)
        self.flat = nn.Flatten()
        self.fc = nn.Linear(4 * 3 * 3, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.adaptive_avg_pool2d(F.relu(self.c(x)), 3)
        if self.how == "torch.flatten":
            y = torch.flatten(y, 1)
        elif self.how == "view":
            y = y.view(y.size(0), -1)
        elif self.how == "reshape":
            y = y.reshape(y.shape[0], -1)
        else:
            y = self.flat(y)
        return self.fc(y)


class Depthwise(nn.Module):
    """pointwise → BN → depthwise → BN → pointwise (MobileNet block)."""

    def __init__(self) -> None:
        super().__init__()
        self.pw = nn.Conv2d(3, 6, 1)
        self.bn = nn.BatchNorm2d(6)
        self.dw = nn.Conv2d(6, 6, 3, padding=1, groups=6)
        self.bn2 = nn.BatchNorm2d(6)
        self.pw2 = nn.Conv2d(6, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn(self.pw(x)))
        return self.pw2(F.relu(self.bn2(self.dw(x))))


class SqueezeExcite(nn.Module):
    """x * sigmoid(e(relu(r(pool(x))))): the gate's producer joins x's group."""

    def __init__(self) -> None:
        super().__init__()
        self.c = nn.Conv2d(3, 8, 3, padding=1)
        self.r = nn.Conv2d(8, 2, 1)
        self.e = nn.Conv2d(2, 8, 1)
        self.out = nn.Conv2d(8, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.c(x))
        g = torch.sigmoid(self.e(F.relu(self.r(F.adaptive_avg_pool2d(x, 1)))))
        return self.out(x * g)


class OptionA(nn.Module):
    """Option-A shortcut: the identity path is zero-padded over channels by F.pad."""

    def __init__(self) -> None:
        super().__init__()
        self.c = nn.Conv2d(3, 4, 3, padding=1)
        self.mid = nn.Conv2d(4, 6, 3, padding=1)
        self.c2 = nn.Conv2d(6, 8, 3, stride=2, padding=1)
        self.out = nn.Conv2d(8, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.c(x))
        y = self.c2(F.relu(self.mid(x)))
        y = y + F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, 2, 2))
        return self.out(F.relu(y))


class LiteralView(nn.Module):
    """``a.view(N, 4, 36)`` hard-codes a's channel count; ``b.view(N, -1)`` does not."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 4, 3, padding=1)
        self.b = nn.Conv2d(3, 5, 3, padding=1)
        self.fa = nn.Linear(4 * 36, 2)
        self.fb = nn.Linear(5 * 36, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = F.relu(self.a(x))
        b = F.relu(self.b(x))
        return self.fa(a.view(a.size(0), 4, 36).reshape(a.size(0), -1)) + self.fb(
            b.view(b.size(0), -1)
        )


class UnknownOp(nn.Module):
    """cumsum over channels: not an op spectrim maps."""

    def __init__(self) -> None:
        super().__init__()
        self.c = nn.Conv2d(3, 4, 3, padding=1)
        self.keep = nn.Conv2d(3, 5, 3, padding=1)
        self.out = nn.Conv2d(9, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = torch.cumsum(self.c(x), 1)
        b = F.relu(self.keep(x))
        return self.out(torch.cat([a, b], 1))


class LayerNormMLP(nn.Module):
    """a → LayerNorm(8) (normalises a's channels: pinned) → b → relu → c."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(5, 8)
        self.ln = nn.LayerNorm(8)
        self.b = nn.Linear(8, 6)
        self.c = nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c(F.relu(self.b(self.ln(self.a(x)))))


class SpatialLayerNorm(nn.Module):
    """LayerNorm over the width axis of a conv output: channels pass through."""

    def __init__(self) -> None:
        super().__init__()
        self.c = nn.Conv2d(3, 4, 3, padding=1)
        self.ln = nn.LayerNorm(6)
        self.out = nn.Conv2d(4, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.ln(F.relu(self.c(x))))


class TwoOutputs(nn.Module):
    """Returns an intermediate feature map as well: its channels are an output."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 6, 3, padding=1)
        self.b = nn.Conv2d(6, 5, 3, padding=1)
        self.c = nn.Conv2d(5, 2, 1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        a = F.relu(self.a(x))
        b = F.relu(self.b(a))
        return self.c(b), a


class SplitChannels(nn.Module):
    """torch.split over channels with literal sizes."""

    def __init__(self) -> None:
        super().__init__()
        self.c = nn.Conv2d(3, 8, 3, padding=1)
        self.l = nn.Conv2d(4, 2, 1)
        self.r = nn.Conv2d(4, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b = torch.split(F.relu(self.c(x)), [4, 4], dim=1)
        return self.l(a) + self.r(b)


class GroupedConv(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c = nn.Conv2d(3, 8, 3, padding=1)
        self.g = nn.Conv2d(8, 8, 3, padding=1, groups=2)
        self.out = nn.Conv2d(8, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(F.relu(self.g(F.relu(self.c(x)))))


class GroupNormNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c = nn.Conv2d(3, 8, 3, padding=1)
        self.gn = nn.GroupNorm(2, 8)
        self.out = nn.Conv2d(8, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(F.relu(self.gn(self.c(x))))


class LayerScale(nn.Module):
    """A per-channel parameter multiplies the activations (ConvNeXt layer scale)."""

    def __init__(self) -> None:
        super().__init__()
        self.c = nn.Conv2d(3, 6, 3, padding=1)
        self.gamma = nn.Parameter(torch.rand(6, 1, 1) + 0.5)
        self.out = nn.Conv2d(6, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(F.relu(self.c(x)) * self.gamma)


class ShapeAssert(nn.Module):
    """Python code checks a channel count: invisible to the tracer, caught by the shrink
    self-check."""

    def __init__(self) -> None:
        super().__init__()
        self.c = nn.Conv2d(3, 8, 3, padding=1)
        self.mid = nn.Conv2d(8, 6, 3, padding=1)
        self.out = nn.Conv2d(6, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.c(x))
        if y.shape[1] != 8:
            raise RuntimeError("expected 8 channels")
        return self.out(F.relu(self.mid(y)))


class SharedConv(nn.Module):
    """One conv applied twice: its input and output channels must be the same channels."""

    def __init__(self) -> None:
        super().__init__()
        self.c0 = nn.Conv2d(3, 8, 3, padding=1)
        self.s = nn.Conv2d(8, 8, 3, padding=1)
        self.h = nn.Conv2d(8, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.c0(x))
        x = F.relu(self.s(x))
        return self.h(F.relu(self.s(x)))


ALL_MODELS: dict[str, tuple[type[nn.Module], tuple[int, ...]]] = {
    "residual": (Residual, (2, 3, 6, 6)),
    "dense": (DenseLike, (2, 3, 6, 6)),
    "flatten": (FlattenHead, (2, 3, 6, 6)),
    "depthwise": (Depthwise, (2, 3, 6, 6)),
    "se": (SqueezeExcite, (2, 3, 6, 6)),
    "option_a": (OptionA, (2, 3, 6, 6)),
    "literal_view": (LiteralView, (2, 3, 6, 6)),
    "unknown_op": (UnknownOp, (2, 3, 6, 6)),
    "layernorm": (LayerNormMLP, (2, 5)),
    "spatial_layernorm": (SpatialLayerNorm, (2, 3, 6, 6)),
    "two_outputs": (TwoOutputs, (2, 3, 6, 6)),
    "split": (SplitChannels, (2, 3, 6, 6)),
    "grouped": (GroupedConv, (2, 3, 6, 6)),
    "groupnorm": (GroupNormNet, (2, 3, 6, 6)),
    "layer_scale": (LayerScale, (2, 3, 6, 6)),
    "shape_assert": (ShapeAssert, (2, 3, 6, 6)),
    "shared_conv": (SharedConv, (2, 3, 6, 6)),
}


def build(name: str, seed: int = 0) -> tuple[nn.Module, torch.Tensor]:
    """(model in eval mode with non-trivial BatchNorm statistics, example input)."""
    cls, shape = ALL_MODELS[name]
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = cls().eval()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                n = m.num_features
                m.running_mean.copy_(0.2 * torch.randn(n, generator=gen))
                m.running_var.copy_(0.5 + torch.rand(n, generator=gen))
                m.weight.copy_(0.5 + torch.rand(n, generator=gen))
                m.bias.copy_(0.2 * torch.randn(n, generator=gen))
    return model, torch.randn(*shape, generator=gen)
