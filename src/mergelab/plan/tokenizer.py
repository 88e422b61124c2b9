"""The output tokenizer and vocabulary: mergekit's `tokenizer_source`, `tokenizer:` section and
`chat_template`, decided before any tensor is read.

With `tokenizer_source: union|base|PATH` (or the `tokenizer:` section, whose `source` defaults
to `union`), the output vocabulary is built from the sources' tokenizers and every source's
embedding and LM-head rows are mapped onto it. The rules are mergekit 0.1.5's:

- the base tokenizer is the base model's (else the first model's); a model whose folder has no
  tokenizer files is assumed to share it;
- `union`: the base tokenizer, plus every other token of every source (ordinary tokens first,
  in source order, then added tokens with the settings of the first source that has them);
  `base`: the base tokenizer; a path: that folder's tokenizer. Tokens named under
  `tokenizer.tokens` are added when absent;
- a token a model has keeps that model's row. A token some model lacks gets, in that model:
  the row of the one model that has it; else the base model's row (when the base is an input
  of the tensor and has it); else the average of the rows of the models that have it; a token
  no model has is zero;
- a `tokens:` entry overrides this for its token: `source: MODEL` (that model's row of the
  token), `{kind: model_token, model, token | token_id}` (that model's row of another token),
  `{kind: zero}`; with `force: true` it replaces even the models' own rows;
- `pad_to_multiple_of` rounds the row count up; padding rows are the mean of each model's
  mapped rows. config.json's `vocab_size` is the padded count.

The result is a `VocabularyPlan`: per vocabulary tensor and inputs, a `VocabularyRemap` the
engine applies to the input tensors before the merge kernel (mergelab.engine.vocabulary), and
the output tokenizer's files, written beside the merged weights. A `chat_template` (a name of
`CHAT_TEMPLATES`, a Jinja string, or `auto`: the template most of the models have) is set on the
output tokenizer (the donor's, when there is no tokenizer section) as mergekit sets it.
"""

from __future__ import annotations

import re
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from mergelab.plan.config import MergeConfig, TokenSourceSpec, TokenSpec
from mergelab.plan.layout import TensorSource, split_layer_name

# Tensors indexed by token (rows): input embeddings and output heads, outside the layer stack.
VOCABULARY_TENSOR_RE = re.compile(
    r"(^|\.)(embed_tokens|lm_head|wte|word_embeddings|embed_in|embed_out)(\.|$)"
)
# Files a tokenizer folder holds; a folder with none of them has no tokenizer of its own.
_TOKENIZER_MARKERS = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json",
                      "vocab.txt")

# Named chat templates (mergekit's names); anything else with a `{` is a Jinja template itself.
CHAT_TEMPLATES: dict[str, str] = {
    "chatml": (
        "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + "
        "message['content'] + '<|im_end|>' + '\\n'}}{% endfor %}\n"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}\n"
    ),
    "llama3": (
        "{{ bos_token }}{% for message in messages %}{{ '<|start_header_id|>' + message['role'] "
        "+ '<|end_header_id|>\\n\\n' + message['content'] | trim + '<|eot_id|>' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}"
        "{% endif %}"
    ),
    "mistral": (
        "{{ bos_token }}{% for message in messages %}{% if message['role'] == 'user' %}"
        "{{ '[INST] ' + message['content'] + ' [/INST]' }}{% elif message['role'] == "
        "'assistant' %}{{ message['content'] + eos_token }}{% else %}{{ message['content'] + "
        "'\\n\\n' }}{% endif %}{% endfor %}"
    ),
    "alpaca": (
        "{% for message in messages %}{% if message['role'] == 'system' %}"
        "{{ message['content'] + '\\n\\n' }}{% elif message['role'] == 'user' %}"
        "{{ '### Instruction:\\n' + message['content'] + '\\n\\n' }}{% elif message['role'] == "
        "'assistant' %}{{ '### Response:\\n' + message['content'] + eos_token + '\\n\\n' }}"
        "{% endif %}{% endfor %}{% if add_generation_prompt %}{{ '### Response:\\n' }}{% endif %}"
    ),
    "exaone": (
        "{% for message in messages %}{% if message['role'] == 'system' %}{{ '[|system|]' + "
        "message['content'] + '[|endofturn|]\\n' }}{% elif message['role'] == 'user' %}"
        "{{ '[|user|]' + message['content'] + '\\n' }}{% elif message['role'] == 'assistant' %}"
        "{{ '[|assistant|]' + message['content'] + '[|endofturn|]\\n' }}{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}{{ '[|assistant|]' }}{% endif %}"
    ),
}


@dataclass(frozen=True)
class RowFill:
    """One output row made from rows of the tensor's inputs: the sum of the rows `parts`
    ((input position, source row)), divided by their number when `mean`; no parts: zeros."""

    row: int
    parts: tuple[tuple[int, int], ...]
    mean: bool = False


@dataclass(frozen=True)
class InputRows:
    """How one input of a vocabulary tensor maps onto the output vocabulary.

    take: int64 [tokens]: the input's own row of each output token, -1 where `fills` has it.
    """

    take: torch.Tensor
    fills: tuple[RowFill, ...] = ()


@dataclass(frozen=True)
class VocabularyRemap:
    """The inputs of one vocabulary tensor, mapped onto the output vocabulary (rows axis 0).

    rows: the output's row count (`tokens`, padded to `pad_to_multiple_of`); rows from `tokens`
    on are the mean of the first `tokens` mapped rows of each input. inputs: per task input.
    """

    rows: int
    tokens: int
    inputs: tuple[InputRows, ...]


@dataclass
class VocabularyPlan:
    """The output vocabulary, how each source's token ids map onto it, and the output
    tokenizer's files.

    vocab: output token -> id. rows: the padded row count. permutations: source key -> int64
    [tokens] (its row of each output token, -1 where it lacks the token). original: source key
    -> its own vocabulary. base: the base key of the rules. files: the output tokenizer's files
    (name -> bytes), written beside the weights.
    """

    vocab: dict[str, int]
    rows: int
    permutations: dict[str, torch.Tensor]
    original: dict[str, dict[str, int]]
    base: str
    tokens: Mapping[str, TokenSpec]
    files: dict[str, bytes] = field(default_factory=dict)
    _cache: dict[tuple, VocabularyRemap] = field(default_factory=dict, repr=False)

    def remap(self, keys: Sequence[str], base: str | None, source_rows: Sequence[int]) -> VocabularyRemap:
        """The remap of a vocabulary tensor whose inputs are the sources `keys` (their row
        counts `source_rows`), `base` the base input of the merge (None: none)."""
        cache_key = (tuple(keys), base, tuple(source_rows))
        if cache_key not in self._cache:
            self._cache[cache_key] = _remap(self, list(keys), base, list(source_rows))
        return self._cache[cache_key]


def is_vocabulary_tensor(name: str) -> bool:
    """Whether a tensor is indexed by token on its first axis (an embedding or LM head)."""
    return split_layer_name(name) is None and VOCABULARY_TENSOR_RE.search(name) is not None


def tokenizer_source_of(config: MergeConfig) -> str | None:
    """`union`, `base`, a model path, or None (no vocabulary merging)."""
    if config.tokenizer is not None:
        return config.tokenizer.source
    return config.tokenizer_source


def plan_vocabulary(
    config: MergeConfig,
    sources: Mapping[str, TensorSource],
    problems: list[str],
    notes: list[str],
) -> VocabularyPlan | None:
    """The vocabulary plan of a config with a tokenizer source (None without one, or when a
    problem was found: appended to `problems`). Reads tokenizers only, never tensors.
    `sources` holds every model of the config and a tokenizer source path (the planner opens
    it; when it could not, the planner reported it and this returns None)."""
    source = tokenizer_source_of(config)
    if source is None:
        return None
    try:
        import transformers  # noqa: F401
    except ImportError:
        problems.append("tokenizer: merging vocabularies needs transformers "
                        "(pip install 'mergelab[hf]')")
        return None
    models = config.referenced_models()
    base_key = config.base_model or models[0]
    base_tok = _load_tokenizer(base_key, sources[base_key], problems, required=True)
    if base_tok is None:
        return None
    tokenizers: dict[str, Any] = {base_key: base_tok}
    assumed = []
    for key in models:
        if key == base_key:
            continue
        tok = _load_tokenizer(key, sources[key], problems, required=False)
        if tok is None:
            assumed.append(key)
        else:
            tokenizers[key] = tok
    if assumed:
        notes.append(f"{', '.join(map(repr, assumed))} ha{'s' if len(assumed) == 1 else 've'} no "
                     f"tokenizer files: assumed to share the tokenizer of {base_key!r}")
    sizes = {key: _vocab_size(sources[key], tokenizers.get(key, base_tok)) for key in models}
    beyond = [t for t, i in base_tok.get_vocab().items() if i >= sizes[base_key]]
    if beyond and source in ("union", "base"):
        problems.append(f"tokenizer: the tokenizer of {base_key!r} has {len(beyond)} token(s) "
                        f"beyond its vocab_size {sizes[base_key]} (e.g. {beyond[0]!r}); "
                        "stripping them is not supported")
        return None
    if source == "union":
        out_tok = _union_tokenizer(base_tok, tokenizers, sizes)
    elif source == "base":
        out_tok = _copy_tokenizer(base_tok)
    else:
        holder = sources.get(source)
        if holder is None:
            return None  # it did not open: the planner reported why
        out_tok = _load_tokenizer(source, holder, problems, required=True, key_path="tokenizer.source")
        if out_tok is None:
            return None
    specs = dict(config.tokenizer.tokens or {}) if config.tokenizer is not None else {}
    existing = set(out_tok.get_vocab())
    for token in specs:
        if token not in existing:
            out_tok.add_tokens(token)
            existing.add(token)
    vocab = dict(out_tok.get_vocab())
    pad = config.tokenizer.pad_to_multiple_of if config.tokenizer is not None else None
    rows = len(vocab)
    if pad and rows % pad:
        rows = (rows // pad + 1) * pad
    original = {key: dict(tokenizers.get(key, base_tok).get_vocab()) for key in models}
    permutations = {}
    for key in models:
        own, size = original[key], sizes[key]
        perm = torch.full((len(vocab),), -1, dtype=torch.int64)
        for token, new_id in vocab.items():
            old_id = own.get(token)
            if old_id is not None and old_id < size:
                perm[new_id] = old_id
        permutations[key] = perm
    _check_token_specs(specs, vocab, permutations, original, sizes, models, problems)
    if problems:
        return None
    _set_chat_template(out_tok, config, problems, sources)
    return VocabularyPlan(vocab=vocab, rows=rows, permutations=permutations, original=original,
                          base=base_key, tokens=specs, files=_tokenizer_files(out_tok))


def chat_template_files(
    config: MergeConfig, donor_key: str | None, sources: Mapping[str, TensorSource],
    problems: list[str],
) -> dict[str, bytes]:
    """With a `chat_template` and no vocabulary merging: the donor's tokenizer with the
    template set (its files, to write in place of the donor's). Empty without a template.
    `auto` takes the template most of the config's models have (mergekit's rule)."""
    donor = sources.get(donor_key) if donor_key else None
    if config.chat_template is None:
        return {}
    if donor is None or donor_key is None:
        problems.append("chat_template: there is no tokenizer to set it on (no donor model)")
        return {}
    try:
        import transformers  # noqa: F401
    except ImportError:
        problems.append("chat_template: needs transformers (pip install 'mergelab[hf]')")
        return {}
    tok = _load_tokenizer(donor_key, donor, problems, required=True, key_path="chat_template")
    if tok is None:
        return {}
    _set_chat_template(tok, config, problems, sources)
    return _tokenizer_files(tok)


def resolve_chat_template(value: str) -> str | None:
    """A named template's text, a Jinja template as given, or None when `value` is neither
    (mergekit's rule: a short string without `{` must be a known name)."""
    if value in CHAT_TEMPLATES:
        return CHAT_TEMPLATES[value]
    if len(value) < 20 or "{" not in value:
        return None
    return value


def _set_chat_template(tok: Any, config: MergeConfig, problems: list[str],
                       sources: Mapping[str, TensorSource]) -> None:
    value = config.chat_template
    if not value:
        return
    if value == "auto":
        template = _most_common_template(config, sources, problems)
        if template is not None:
            tok.chat_template = template
        return
    template = resolve_chat_template(value)
    if template is None:
        names = ", ".join(sorted(CHAT_TEMPLATES))
        problems.append(f"chat_template: {value!r} is neither a known template ({names}) nor a "
                        "Jinja template")
        return
    tok.chat_template = template


def _most_common_template(config: MergeConfig, sources: Mapping[str, TensorSource],
                          problems: list[str]) -> str | None:
    """`chat_template: auto`: the template most of the config's models have (stripped; a tie
    goes to the first in config order); None when none has one (the tokenizer keeps its own)."""
    from collections import Counter

    templates = []
    for key in config.referenced_models():
        tok = _load_tokenizer(key, sources[key], [], required=False)
        template = getattr(tok, "chat_template", None) if tok is not None else None
        if isinstance(template, dict):
            template = template.get("default")
        if template:
            templates.append(template.strip())
    return Counter(templates).most_common(1)[0][0] if templates else None


def _has_tokenizer(root: Path | None) -> bool:
    return root is not None and any((root / name).is_file() for name in _TOKENIZER_MARKERS)


def _load_tokenizer(key: str, source: TensorSource, problems: list[str], *, required: bool,
                    key_path: str = "tokenizer") -> Any:
    """The fast tokenizer in a source's folder; None when it has none (a problem if `required`)
    or it cannot be read (always a problem)."""
    root = getattr(source, "root", None)
    if not _has_tokenizer(root):
        if required:
            problems.append(f"{key_path}: model {key!r} has no tokenizer files "
                            f"({', '.join(_TOKENIZER_MARKERS)})")
        return None
    import transformers

    try:
        return transformers.AutoTokenizer.from_pretrained(str(root), use_fast=True,
                                                          local_files_only=True)
    except Exception as exc:  # noqa: BLE001 - transformers raises many kinds
        message = " ".join(str(exc).split()) or type(exc).__name__
        if len(message) > 300:
            message = message[:297] + "..."
        problems.append(f"{key_path}: the tokenizer of model {key!r} ({root}) cannot be read: "
                        f"{message}")
        return None


def _vocab_size(source: TensorSource, tok: Any) -> int:
    cfg = source.config() or {}
    for scope in (cfg, cfg.get("text_config") or {}):
        if isinstance(scope, dict) and isinstance(scope.get("vocab_size"), int):
            return scope["vocab_size"]
    return len(tok.get_vocab())


def _copy_tokenizer(tok: Any) -> Any:
    """An independent copy (saved and loaded back, so adding tokens leaves `tok` as it was)."""
    import transformers

    with tempfile.TemporaryDirectory() as folder:
        tok.save_pretrained(folder)
        return transformers.AutoTokenizer.from_pretrained(folder, use_fast=True,
                                                          local_files_only=True)


def _union_tokenizer(base_tok: Any, tokenizers: Mapping[str, Any], sizes: Mapping[str, int]) -> Any:
    ordinary: dict[str, None] = {}
    added: dict[str, Any] = {}
    for key, tok in tokenizers.items():
        size = sizes.get(key, len(tok.get_vocab()))
        added_here = tok.added_tokens_decoder
        added_contents = {info.content for info in added_here.values()}
        for token, index in sorted(tok.get_vocab().items(), key=lambda item: item[1]):
            if index < size and token not in added_contents:
                ordinary.setdefault(token)
        for index, info in sorted(added_here.items()):
            if index < size:
                added.setdefault(info.content, info)
    out = _copy_tokenizer(base_tok)
    base_vocab = base_tok.get_vocab()
    for token in ordinary:
        if token not in base_vocab and token not in added:
            out.add_tokens(token)
    for info in added.values():
        out.add_tokens(info)
    return out


def _check_token_specs(specs, vocab, permutations, original, sizes, models, problems) -> None:
    for token, spec in specs.items():
        where = f"tokenizer.tokens.{token}"
        src = spec.source
        if isinstance(src, str):
            if src not in permutations:
                problems.append(f"{where}.source: {src!r} is not a model of this merge "
                                f"({', '.join(map(repr, models))})")
            elif permutations[src][vocab[token]] < 0:
                problems.append(f"{where}.source: model {src!r} has no token {token!r}")
        elif isinstance(src, TokenSourceSpec) and src.kind == "model_token":
            if src.model not in permutations:
                problems.append(f"{where}.source.model: {src.model!r} is not a model of this "
                                f"merge ({', '.join(map(repr, models))})")
            elif src.token is not None and src.token not in original[src.model]:
                problems.append(f"{where}.source.token: model {src.model!r} has no token "
                                f"{src.token!r}")
            elif src.token_id is not None and not 0 <= src.token_id < sizes[src.model]:
                problems.append(f"{where}.source.token_id: {src.token_id} is outside the "
                                f"{sizes[src.model]} tokens of model {src.model!r}")
        elif src is None and all(int(p[vocab[token]]) < 0 for p in permutations.values()):
            problems.append(
                f"{where}: token {token!r} is in no source's vocabulary, so no row can be taken "
                "for it; give `source: {kind: model_token, model: ..., token: ...}` or "
                "`source: {kind: zero}`"
            )


def _remap(plan: VocabularyPlan, keys: list[str], base: str | None,
           source_rows: list[int]) -> VocabularyRemap:
    tokens = len(plan.vocab)
    perms = []
    for key, available in zip(keys, source_rows):
        perm = plan.permutations[key].clone()
        perm[perm >= available] = -1  # a row the tensor does not have (a shorter head)
        perms.append(perm)
    present = torch.stack([p >= 0 for p in perms])  # [inputs, tokens]
    count = present.sum(0)
    forced = {plan.vocab[t] for t, s in plan.tokens.items() if s.force}
    specs = {plan.vocab[t]: s for t, s in plan.tokens.items()}
    base_pos = keys.index(base) if base in keys else None
    default: dict[int, tuple[tuple[tuple[int, int], ...], bool]] = {}
    needs = torch.nonzero(count < len(keys)).squeeze(1).tolist()
    for token_id in sorted(set(needs) | forced):
        spec = specs.get(token_id)
        if spec is not None and spec.source is not None:
            default[token_id] = (_spec_parts(spec.source, token_id, keys, perms, plan), False)
            continue
        holders = [i for i in range(len(keys)) if perms[i][token_id] >= 0]
        if len(holders) == 1:
            default[token_id] = (((holders[0], int(perms[holders[0]][token_id])),), False)
        elif not holders:
            default[token_id] = ((), False)
        elif base_pos is not None and base_pos in holders:
            default[token_id] = (((base_pos, int(perms[base_pos][token_id])),), False)
        else:
            default[token_id] = (tuple((i, int(perms[i][token_id])) for i in holders), True)
    inputs = []
    for perm in perms:
        take = perm.clone()
        fills = []
        for token_id, (parts, mean) in default.items():
            if take[token_id] < 0 or token_id in forced:
                take[token_id] = -1
                fills.append(RowFill(token_id, parts, mean))
        inputs.append(InputRows(take, tuple(fills)))
    return VocabularyRemap(plan.rows, tokens, tuple(inputs))


def _spec_parts(src, token_id: int, keys: list[str], perms: list[torch.Tensor],
                plan: VocabularyPlan) -> tuple[tuple[int, int], ...]:
    if isinstance(src, TokenSourceSpec) and src.kind == "zero":
        return ()
    model = src.model if isinstance(src, TokenSourceSpec) else src
    if model not in keys:
        raise _MissingInput(model)
    pos = keys.index(model)
    if isinstance(src, TokenSourceSpec):
        row = src.token_id if src.token_id is not None else plan.original[model][src.token]
        return ((pos, int(row)),)
    return ((pos, int(perms[pos][token_id])),)


class _MissingInput(LookupError):
    """A `tokens:` entry takes its row from a model that is not an input of this tensor."""


def _tokenizer_files(tok: Any) -> dict[str, bytes]:
    with tempfile.TemporaryDirectory() as folder:
        tok.save_pretrained(folder)
        return {p.name: p.read_bytes() for p in sorted(Path(folder).iterdir()) if p.is_file()}
