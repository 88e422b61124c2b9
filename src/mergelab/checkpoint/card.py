"""Model cards: the `README.md` a written checkpoint carries, as mergekit writes one.

Model hubs read its front matter (`base_model`, `library_name`, `tags`); people read the rest:
how the checkpoint was made (method, paper, sources as the config names them, the config
itself) and what it can be used for (the task heads it carries). Nothing here touches the
network or reads a model.
"""

from __future__ import annotations

from collections.abc import Sequence

from mergelab.checkpoint.heads import TaskHead

CARD_FILE = "README.md"


def _front_matter(base: str | None, tags: Sequence[str], extra: dict[str, str] | None = None) -> str:
    lines = ["---"]
    if base:
        lines.append(f"base_model: {base}")
    lines += ["library_name: transformers", f"tags: [{', '.join(tags)}]"]
    lines += [f"{k}: {v}" for k, v in (extra or {}).items()]
    return "\n".join([*lines, "---", ""])


def merge_card(
    *, method: str, paper: str, url: str, sources: Sequence[str], base: str | None,
    parameters: dict, config_yaml: str, heads: Sequence[TaskHead], version: str,
) -> str:  # fmt: skip
    """The README.md of a merged checkpoint: front matter, method and paper, the sources (as
    given), the global parameters, the task heads it carries, and the full config."""
    listed = "\n".join(f"- `{s}`" for s in sources) or "- (none)"
    settings = ", ".join(f"`{k}`: {v}" for k, v in parameters.items()) or "the method's defaults"
    parts = [
        _front_matter(base, ["merge", "mergelab", method]),
        "# Merged model",
        "",
        f"Merged with mergelab {version} by `{method}` "
        f"({paper}, {url}).",
        "",
        f"Base model: `{base}`." if base else "No base model.",
        "",
        "## Sources",
        "",
        listed,
        "",
        f"Global parameters: {settings}; per-model parameters are in the config below.",
        "",
    ]
    if heads:
        parts += ["## Task heads", "",
                  "Scored with `mergelab eval THIS_FOLDER --task TASK`, shipped with "
                  "`mergelab export THIS_FOLDER --task TASK --out OUT`.", "",
                  "| head | task | classes | from |", "|---|---|---|---|"]  # fmt: skip
        parts += [f"| {h.name} | {h.task} | {', '.join(h.label_names) or '?'} | `{h.source}` |"
                  for h in heads]  # fmt: skip
        parts.append("")
    parts += ["## Configuration", "", "```yaml", config_yaml.rstrip(), "```", ""]
    return "\n".join(parts)


def classifier_card(*, task: str, head: str, source: str, model: str, labels: Sequence[str],
                    max_length: int | None) -> str:  # fmt: skip
    """The README.md of an exported sequence classifier (see `mergelab.export`)."""
    classes = ", ".join(f"`{n}`" for n in labels)
    return f"""{_front_matter(None, ["mergelab", "text-classification"], {"pipeline_tag": "text-classification"})}
# {task} classifier

Exported by `mergelab export` from `{model}` with the head `{head}` (trained with `{source}`).
Classes: {classes}. Inputs are truncated at {max_length or "the tokenizer's maximum"} tokens,
as in training.

The model is the encoder, its last hidden states mean-pooled over the real tokens, and a linear
head: `modeling_mergelab.py` in this folder, so load it with `trust_remote_code=True`:

```python
from transformers import pipeline
classify = pipeline("text-classification", model="PATH/TO/THIS/FOLDER", trust_remote_code=True)
```
"""
