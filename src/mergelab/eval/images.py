"""Image classification tasks: declarations with seeded splits, and two user sources (an NPZ
file of arrays, a folder of images per class).

A task is data only: a loader of its labelled images (and of its official test set, when it has
one), its label names and split sizes. Dataset-specific loaders (Fashion-MNIST, MNIST, ...) live
with whoever uses them (the benchmark harness); they return `LabelledImages` and declare an
`ImageTask`.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from mergelab.errors import MergeLabError
from mergelab.eval.data import LabelledImages, Splits

ImageSplits = Splits  # the splits of an image task: Splits[LabelledImages]


@dataclass(frozen=True)
class ImageSplitSizes:
    """Examples per split. Validation (and test, unless the task has its own test set) are drawn
    from the loaded pool before training, so the three never overlap."""

    train: int
    validation: int
    test: int


@dataclass(frozen=True)
class ImageTask:
    """Declaration of an image classification task (the image variant of
    `mergelab.eval.task.Task`).

    load: every labelled training-pool image (deterministic).
    load_test: the task's official test set, when it has one; otherwise the test split is drawn
        from `load`'s pool.
    source: origin and licence of the data, shown next to results.
    """

    name: str
    description: str
    label_names: tuple[str, ...]
    load: Callable[[], LabelledImages]
    source: str
    sizes: ImageSplitSizes
    load_test: Callable[[], LabelledImages] | None = None
    modality: str = "image"
    metric: str = "accuracy"

    @property
    def num_classes(self) -> int:
        return len(self.label_names)

    def splits(self, seed: int = 0) -> Splits[LabelledImages]:
        """The task's train/validation/test splits drawn from `seed` (see `make_image_splits`)."""
        return make_image_splits(self, seed)


def make_image_splits(task: ImageTask, seed: int = 0) -> Splits[LabelledImages]:
    """Draw disjoint train/validation/test splits of `task`, reproducibly from `seed`."""
    pool = task.load()
    _check_labels(task, pool, "pool")
    sizes = task.sizes
    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(pool), generator=generator)
    if task.load_test is not None:
        official = task.load_test()
        _check_labels(task, official, "test set")
        test_order = torch.randperm(len(official), generator=generator)
        if sizes.test > len(official):
            raise MergeLabError(
                f"{task.name}: {sizes.test} test images asked, {len(official)} exist"
            )
        test = official.subset(test_order[: sizes.test].sort().values)
    else:
        test = pool.subset(order[: sizes.test].sort().values)
        order = order[sizes.test :]
    pool_needed = sizes.train + sizes.validation
    if pool_needed > len(order):
        raise MergeLabError(
            f"{task.name}: {pool_needed} train+validation images asked, {len(order)} available"
        )
    validation = pool.subset(order[: sizes.validation].sort().values)
    train = pool.subset(order[sizes.validation : pool_needed].sort().values)
    return Splits(train=train, validation=validation, test=test)


def _check_labels(task: ImageTask, data: LabelledImages, what: str) -> None:
    if len(data) and (int(data.labels.min()) < 0 or int(data.labels.max()) >= task.num_classes):
        raise MergeLabError(
            f"task {task.name!r} ({what}): labels must lie in 0..{task.num_classes - 1}; "
            f"found {int(data.labels.min())}..{int(data.labels.max())}"
        )


def user_split_sizes(n: int, what: str) -> ImageSplitSizes:
    """55% training, 15% validation, 15% test (drawn at random), as `mergelab finetune` splits a
    user's images: `mergelab eval` then scores a fine-tune on images it never trained on."""
    sizes = ImageSplitSizes(train=int(0.55 * n), validation=int(0.15 * n), test=int(0.15 * n))
    if min(sizes.train, sizes.validation, sizes.test) < 2:
        raise MergeLabError(f"{what} holds {n} images: too few to split (need about 20)")
    return sizes


def _check_class_sizes(labels: torch.Tensor, label_names, where: str) -> None:
    counts = torch.bincount(labels, minlength=len(label_names)).tolist()
    thin = [f"{label_names[k]!r} ({c})" for k, c in enumerate(counts) if c < 2]
    if thin:
        raise MergeLabError(
            f"{where}: label(s) {', '.join(thin)} have fewer than two examples; every class "
            "needs at least two (one to learn from, one to score on)"
        )


# --- a folder of images per class ------------------------------------------------------------------


def load_image_folder(
    folder: str | os.PathLike, size: int = 28, color: bool | None = False
) -> tuple[LabelledImages, tuple[str, ...]]:
    """A user's task from `folder/<class name>/<image files>`, resized to size x size.

    color: False: grayscale [N, S, S]; True: RGB [N, S, S, 3]; None: RGB unless every image
        is grayscale. Classes are the sub-folder names in sorted order. Raises MergeLabError for
        a missing folder, fewer than two class sub-folders, an empty class or an unreadable image
        (naming the file). Needs Pillow (installed with matplotlib).
    """
    try:
        from PIL import Image, UnidentifiedImageError
    except ImportError:
        raise MergeLabError("image folders need Pillow: `pip install pillow`") from None

    root = Path(folder)
    if not root.is_dir():
        raise MergeLabError(f"image folder {root} does not exist")
    classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if len(classes) < 2:
        raise MergeLabError(
            f"image folder {root} needs at least two class sub-folders; found {classes}"
        )
    files: list[tuple[Path, int]] = []
    for label, name in enumerate(classes):
        found = sorted(
            p for p in (root / name).iterdir() if p.is_file() and not p.name.startswith(".")
        )
        if not found:
            raise MergeLabError(f"class folder {root / name} holds no images")
        files.extend((path, label) for path in found)
    def read(path: Path, convert: Callable):
        try:
            with Image.open(path) as image:
                return convert(image)
        except (UnidentifiedImageError, OSError) as error:
            raise MergeLabError(f"cannot read image {path}: {error}") from error

    if color is None:  # opening reads only the header: the mode costs no decoding
        gray_modes = ("L", "LA", "1", "I", "I;16", "F")
        color = any(read(path, lambda image: image.mode not in gray_modes) for path, _ in files)
    mode = "RGB" if color else "L"

    def pixels(image) -> torch.Tensor:
        converted = image.convert(mode).resize((size, size), Image.BILINEAR)
        flat = torch.frombuffer(bytearray(converted.tobytes()), dtype=torch.uint8)
        return flat.reshape(size, size, 3) if color else flat.reshape(size, size)

    images = [read(path, pixels) for path, _ in files]
    labels = torch.tensor([label for _, label in files])
    return LabelledImages(torch.stack(images), labels), tuple(classes)


def image_folder_task(
    name: str,
    folder: str | os.PathLike,
    sizes: ImageSplitSizes | None = None,
    size: int = 28,
    color: bool | None = False,
) -> ImageTask:
    """Declare a user task from a folder of images (see `load_image_folder`); sizes default to
    `user_split_sizes`. Raises MergeLabError for a class with fewer than two images."""
    data, label_names = load_image_folder(folder, size, color)
    _check_class_sizes(data.labels, label_names, f"image folder {folder}")
    return ImageTask(
        name=name,
        description=f"images in {folder}",
        label_names=label_names,
        load=lambda: data,
        source=f"user images from {folder}",
        sizes=sizes or user_split_sizes(len(data), f"image folder {folder}"),
    )


# --- an NPZ file of arrays --------------------------------------------------------------------------


def read_npz_task(path: str | os.PathLike, name: str | None = None) -> ImageTask:
    """A task from an `.npz` file holding `images` [N, H, W] or [N, H, W, C] (uint8, or floats in
    [0, 1]) and integer `labels` [N] in 0..K-1, optionally `label_names` [K] (strings).

    Raises MergeLabError naming the file for a missing array, a wrong shape or dtype, labels
    outside 0..K-1, a class with fewer than two images or a `label_names` of the wrong length.
    """
    import numpy as np

    path = Path(path)
    if not path.is_file():
        raise MergeLabError(f"task NPZ {path} does not exist")
    where = f"task NPZ {path}"
    try:
        archive = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as error:
        raise MergeLabError(f"{where}: not a readable .npz file ({error})") from None
    with archive:
        missing = [k for k in ("images", "labels") if k not in archive.files]
        if missing:
            raise MergeLabError(
                f"{where}: missing array(s) {missing}; it holds {sorted(archive.files)} "
                "(expected `images` [N, H, W(, C)], `labels` [N], optionally `label_names`)"
            )
        images = archive["images"]
        labels = archive["labels"]
        names = archive["label_names"] if "label_names" in archive.files else None
    if images.ndim not in (3, 4) or (images.ndim == 4 and images.shape[-1] not in (1, 3, 4)):
        raise MergeLabError(
            f"{where}: `images` must be [N, H, W] or [N, H, W, C] with C in 1, 3, 4; "
            f"got shape {images.shape}"
        )
    if images.dtype != np.uint8:
        if not np.issubdtype(images.dtype, np.floating):
            raise MergeLabError(f"{where}: `images` must be uint8 or float in [0, 1]; got {images.dtype}")
        if images.size and (images.min() < 0 or images.max() > 1):
            raise MergeLabError(
                f"{where}: float `images` must lie in [0, 1]; found {images.min():g}..{images.max():g}"
            )
        images = np.round(images * 255).astype(np.uint8)
    if images.ndim == 4 and images.shape[-1] == 1:
        images = images[..., 0]
    if labels.ndim != 1 or labels.shape[0] != images.shape[0]:
        raise MergeLabError(
            f"{where}: `labels` must be [N] with N = {images.shape[0]} images; got {labels.shape}"
        )
    if not np.issubdtype(labels.dtype, np.integer):
        raise MergeLabError(f"{where}: `labels` must be integers 0..K-1; got {labels.dtype}")
    if labels.size == 0:
        raise MergeLabError(f"{where} holds no images")
    num_classes = int(labels.max()) + 1
    if names is not None:
        label_names = tuple(str(n) for n in names.tolist())
        if len(label_names) < num_classes:
            raise MergeLabError(
                f"{where}: `label_names` names {len(label_names)} classes; labels go up to "
                f"{num_classes - 1}"
            )
        num_classes = len(label_names)
    else:
        label_names = tuple(str(k) for k in range(num_classes))
    if int(labels.min()) < 0:
        raise MergeLabError(f"{where}: labels must lie in 0..K-1; found {int(labels.min())}")
    if num_classes < 2:
        raise MergeLabError(f"{where}: a single class; a classification task needs at least two")
    data = LabelledImages(torch.from_numpy(images.copy()), torch.from_numpy(labels.astype(np.int64)))
    _check_class_sizes(data.labels, label_names, where)
    return ImageTask(
        name=name or path.stem,
        description=f"images in {path}",
        label_names=label_names,
        load=lambda: data,
        source=f"user images from {path}",
        sizes=user_split_sizes(len(data), where),
    )
