"""Peer architectures: small models for MNIST-1D and digits, and the CIFAR models of the paper.

`build_model(arch, input_shape, num_classes, **options)` makes any of `ARCHS`. The CIFAR models
default to the paper's configurations (Zhang et al., 2018, Table 1): ResNet-32 (0.46M parameters),
MobileNet (3.2M) and WRN-28-10 (36.5M).
"""

from __future__ import annotations

import inspect
import math

import torch.nn.functional as F
from torch import Tensor, nn

from fastdml.errors import ConfigError


class MLP(nn.Module):
    """A ReLU multi-layer perceptron over the flattened input."""

    def __init__(
        self, in_features: int, num_classes: int, *, hidden: int = 256, depth: int = 2
    ) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.Flatten()]
        width = in_features
        for _ in range(depth):
            layers += [nn.Linear(width, hidden), nn.ReLU()]
            width = hidden
        layers.append(nn.Linear(width, num_classes))
        self.net = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


class CNN1d(nn.Module):
    """The 1-D convolutional baseline of the MNIST-1D paper (Greydanus, 2020): three strided
    convolutions and a linear classifier; with `batch_norm`, a batch norm after each
    convolution. Takes [N, L] or [N, channels, L]."""

    def __init__(
        self,
        length: int,
        num_classes: int,
        *,
        in_channels: int = 1,
        channels: int = 25,
        batch_norm: bool = False,
    ) -> None:
        super().__init__()
        self.convs = nn.ModuleList(
            [
                nn.Conv1d(in_channels, channels, 5, stride=2, padding=1),
                nn.Conv1d(channels, channels, 3, stride=2, padding=1),
                nn.Conv1d(channels, channels, 3, stride=2, padding=1),
            ]
        )
        norm = nn.BatchNorm1d if batch_norm else nn.Identity
        self.norms = nn.ModuleList([norm(channels) for _ in self.convs])
        for conv in self.convs:
            length = (length + 2 * conv.padding[0] - conv.kernel_size[0]) // conv.stride[0] + 1
        self.linear = nn.Linear(channels * length, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() == 2:
            x = x.unsqueeze(1)
        for conv, norm in zip(self.convs, self.norms, strict=True):
            x = F.relu(norm(conv(x)))
        return self.linear(x.flatten(1))


class BasicBlock(nn.Module):
    """The two-convolution residual block of CIFAR ResNets (He et al., 2016); a 1x1 projection
    where the shape changes."""

    def __init__(self, in_channels: int, channels: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, channels, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_channels != channels:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_channels, channels, 1, stride, bias=False), nn.BatchNorm2d(channels)
            )

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class CifarResNet(nn.Module):
    """ResNet for 32x32 images: three stages of (depth - 2) / 6 blocks, 16/32/64 channels."""

    def __init__(self, num_classes: int, *, depth: int = 32, in_channels: int = 3) -> None:
        super().__init__()
        if (depth - 2) % 6:
            raise ValueError(f"a CIFAR ResNet has depth 6n + 2, got {depth}")
        blocks = (depth - 2) // 6
        self.stem = nn.Sequential(
            nn.Conv2d(in_channels, 16, 3, 1, 1, bias=False), nn.BatchNorm2d(16), nn.ReLU()
        )
        layers, width = [], 16
        for stage, channels in enumerate((16, 32, 64)):
            for b in range(blocks):
                layers.append(BasicBlock(width, channels, 2 if stage and not b else 1))
                width = channels
        self.blocks = nn.Sequential(*layers)
        self.fc = nn.Linear(64, num_classes)
        _init_convs(self)

    def forward(self, x: Tensor) -> Tensor:
        x = self.blocks(self.stem(x))
        return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))


class WideBlock(nn.Module):
    """The pre-activation block of wide ResNets (Zagoruyko and Komodakis, 2016)."""

    def __init__(self, in_channels: int, channels: int, stride: int, dropout: float) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_channels)
        self.conv1 = nn.Conv2d(in_channels, channels, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, 1, 1, bias=False)
        self.dropout = nn.Dropout(dropout)
        self.shortcut: nn.Module | None = None
        if stride != 1 or in_channels != channels:
            self.shortcut = nn.Conv2d(in_channels, channels, 1, stride, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        pre = F.relu(self.bn1(x))
        out = self.conv2(self.dropout(F.relu(self.bn2(self.conv1(pre)))))
        return out + (x if self.shortcut is None else self.shortcut(pre))


class WideResNet(nn.Module):
    """WRN-depth-width for 32x32 images; the default is the paper's WRN-28-10."""

    def __init__(
        self,
        num_classes: int,
        *,
        depth: int = 28,
        width: int = 10,
        dropout: float = 0.0,
        in_channels: int = 3,
    ) -> None:
        super().__init__()
        if (depth - 4) % 6:
            raise ValueError(f"a wide ResNet has depth 6n + 4, got {depth}")
        blocks = (depth - 4) // 6
        self.stem = nn.Conv2d(in_channels, 16, 3, 1, 1, bias=False)
        layers, channels = [], 16
        for stage, base in enumerate((16, 32, 64)):
            for b in range(blocks):
                layers.append(
                    WideBlock(channels, base * width, 2 if stage and not b else 1, dropout)
                )
                channels = base * width
        self.blocks = nn.Sequential(*layers)
        self.bn = nn.BatchNorm2d(channels)
        self.fc = nn.Linear(channels, num_classes)
        _init_convs(self)

    def forward(self, x: Tensor) -> Tensor:
        x = F.relu(self.bn(self.blocks(self.stem(x))))
        return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))


class MobileNet(nn.Module):
    """MobileNet (v1; Howard et al., 2017) for 32x32 images: depthwise-separable convolutions,
    the first at stride 1 so the 32x32 input keeps its resolution."""

    # output channels, or (channels, stride) for a downsampling block
    LAYERS = (64, (128, 2), 128, (256, 2), 256, (512, 2), 512, 512, 512, 512, 512, (1024, 2), 1024)

    def __init__(self, num_classes: int, *, in_channels: int = 3, width: float = 1.0) -> None:
        super().__init__()

        def scaled(c: int) -> int:
            return max(8, int(c * width))

        layers: list[nn.Module] = [
            nn.Conv2d(in_channels, scaled(32), 3, 1, 1, bias=False),
            nn.BatchNorm2d(scaled(32)),
            nn.ReLU(),
        ]
        channels = scaled(32)
        for spec in self.LAYERS:
            out, stride = spec if isinstance(spec, tuple) else (spec, 1)
            out = scaled(out)
            layers += [
                nn.Conv2d(channels, channels, 3, stride, 1, groups=channels, bias=False),
                nn.BatchNorm2d(channels),
                nn.ReLU(),
                nn.Conv2d(channels, out, 1, bias=False),
                nn.BatchNorm2d(out),
                nn.ReLU(),
            ]
            channels = out
        self.features = nn.Sequential(*layers)
        self.fc = nn.Linear(channels, num_classes)
        _init_convs(self)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(F.adaptive_avg_pool2d(self.features(x), 1).flatten(1))


def _init_convs(model: nn.Module) -> None:
    """He initialisation of the convolutions, as in the ResNet papers."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")


ARCHS: dict[str, type[nn.Module]] = {
    "mlp": MLP,
    "cnn1d": CNN1d,
    "resnet32": CifarResNet,
    "wrn28_10": WideResNet,
    "mobilenet": MobileNet,
}


def build_model(
    arch: str, input_shape: tuple[int, ...], num_classes: int, **options: object
) -> nn.Module:
    """A new model of architecture `arch` (one of `ARCHS`) for inputs of `input_shape` (without
    the batch dimension); `options` are the architecture's keyword options (e.g. ``hidden`` of
    mlp, ``depth`` and ``width`` of wrn28_10).

    Returns:
        An ``nn.Module`` that maps inputs [N, *input_shape] to logits [N, num_classes].
    """
    if arch not in ARCHS:
        raise ConfigError(f"unknown architecture {arch!r}; choose one of {', '.join(ARCHS)}")
    cls, shape = ARCHS[arch], tuple(input_shape)
    accepted = _keyword_options(cls)
    unknown = sorted(set(options) - accepted)
    if unknown:
        raise ConfigError(
            f"{arch} has no option {unknown[0]!r}; its options are {', '.join(sorted(accepted))}"
        )
    try:
        if cls is MLP:
            return MLP(math.prod(shape), num_classes, **options)
        if cls is CNN1d:
            if len(shape) not in (1, 2):
                raise ValueError(f"it takes sequences [L] or [channels, L], got {shape}")
            return CNN1d(
                shape[-1], num_classes, in_channels=shape[0] if len(shape) == 2 else 1, **options
            )
        if len(shape) != 3:
            raise ValueError(f"it takes images [channels, H, W], got {shape}")
        return cls(num_classes, in_channels=shape[0], **options)
    except (TypeError, ValueError) as error:
        raise ConfigError(f"{arch}: {error}") from None


def _keyword_options(cls: type[nn.Module]) -> set[str]:
    parameters = inspect.signature(cls).parameters.values()
    return {p.name for p in parameters if p.kind is p.KEYWORD_ONLY and p.name != "in_channels"}
