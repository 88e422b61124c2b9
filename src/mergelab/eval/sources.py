"""Task specs a user can name (`mergelab eval --task SPEC`, `load_task(SPEC)`).

- a built-in text task: `sentiment`, `subjectivity`, `fortune`, `supersense`, `pos`;
- a built-in image task: `digits`, `mnist_5k`, `fashion_mnist` (the data `mergelab finetune`
  reads, split as it splits them);
- `csv:PATH` or a bare `PATH.csv`: a UTF-8 CSV with columns `text,label` (optionally `group`);
- `npz:PATH` or a bare `PATH.npz`: arrays `images` [N, H, W(, C)] and `labels` [N], optionally
  `label_names`;
- `images:DIR`: one sub-folder of images per class (read with Pillow, resized to 32 x 32,
  RGB unless every image is grayscale);
- `perplexity:PATH`: a UTF-8 text file, one example per non-empty line, for causal LMs.
"""

from __future__ import annotations

from pathlib import Path

from mergelab.errors import MergeLabError
from mergelab.eval.task import Task

IMAGE_FOLDER_SIZE = 32
SPEC_FORMS = (
    "a built-in text or image task, csv:PATH, PATH.csv, npz:PATH, images:DIR or perplexity:PATH"
)


def load_task(spec: str) -> Task:
    """The task `spec` names (see the module docstring); bad input raises MergeLabError."""
    from mergelab.eval import images, perplexity, tasks

    spec = spec.strip()
    kind, _, rest = spec.partition(":")
    # A Windows drive letter ("C:\\data.csv") is not a kind.
    if rest and len(kind) > 1:
        if kind == "csv":
            return tasks.read_csv_task(rest)
        if kind == "npz":
            return images.read_npz_task(rest)
        if kind == "images":
            folder = Path(rest)
            return images.image_folder_task(
                folder.name or "images", folder, size=IMAGE_FOLDER_SIZE, color=None
            )
        if kind == "perplexity":
            return perplexity.read_text_task(rest)
        raise MergeLabError(f"unknown task kind {kind!r} in {spec!r}; give {SPEC_FORMS}")
    if spec.lower().endswith(".csv"):
        return tasks.read_csv_task(spec)
    if spec.lower().endswith(".npz"):
        return images.read_npz_task(spec)
    if spec in tasks.TASKS:
        return tasks.TASKS[spec]
    builtin_images = _builtin_image_tasks()
    if spec in builtin_images:
        return builtin_image_task(spec)
    known = ", ".join(sorted([*tasks.TASKS, *builtin_images]))
    raise MergeLabError(
        f"unknown task {spec!r}; give {SPEC_FORMS} (built-in: {known}){tasks.file_hint(spec)}"
    )


def _builtin_image_tasks() -> dict:
    from mergelab.training.image_tasks import BUILTIN_IMAGE_TASKS

    return BUILTIN_IMAGE_TASKS


def builtin_image_task(name: str):
    """A built-in image task (`digits`, `mnist_5k`, `fashion_mnist`) as an eval `ImageTask`,
    with `mergelab finetune`'s loaders and split sizes (so the same seed draws the same split)."""
    from mergelab.eval.data import LabelledImages
    from mergelab.eval.images import ImageSplitSizes, ImageTask

    load, load_test, label_names, source, sizes = _builtin_image_tasks()[name]
    return ImageTask(
        name=name,
        description=f"built-in image task {name}",
        label_names=tuple(label_names),
        load=lambda: LabelledImages(*load()),
        load_test=(lambda: LabelledImages(*load_test())) if load_test is not None else None,
        source=source,
        sizes=ImageSplitSizes(*sizes),
    )
