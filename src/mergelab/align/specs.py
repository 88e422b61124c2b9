"""Hand-declared permutation specs for architectures torch.fx cannot trace as they are.

Hugging Face BERT (`BertModel`, `BertForSequenceClassification`) computes attention with
separate query/key/value layers, reshapes into heads and takes `config`-driven branches, so
`derive_spec` cannot follow it; its spec is written here once, from the module names. It is the
model for declaring any other architecture with `PermutationSpec.build`.
"""

from __future__ import annotations

from torch import nn

from mergelab.align.spec import AlignError, PermutationSpec, Probe


def bert_spec(model: nn.Module, *, permute_stream: bool | None = None) -> PermutationSpec:
    """The permutation spec of a Hugging Face BERT encoder (with or without a classifier).

    Spaces: the residual stream (embeddings, every attention and FFN output, every LayerNorm),
    per layer the query/key dimensions and the value dimensions within each head (head_size =
    hidden / heads; heads keep their order) and the FFN's hidden units, and the pooler's units
    when a classifier reads them.
    permute_stream: whether the hidden states may be permuted; default: only when a classifier
        head makes them internal (for a bare BertModel they are the output).
    """
    config = getattr(model, "config", None)
    if config is None or getattr(config, "model_type", None) != "bert":
        raise AlignError(f"bert_spec needs a Hugging Face BERT model; got {type(model).__name__}")
    names = dict(model.named_parameters())
    prefix = next(
        (k[: -len("embeddings.word_embeddings.weight")] for k in names
         if k.endswith("embeddings.word_embeddings.weight")),
        None,
    )  # fmt: skip
    if prefix is None:
        raise AlignError("no `embeddings.word_embeddings.weight` parameter: not a BERT model")
    has_classifier = "classifier.weight" in names
    if permute_stream is None:
        permute_stream = has_classifier
    hidden, heads = config.hidden_size, config.num_attention_heads
    stream = "stream" if permute_stream else None
    spaces: dict[str, int | tuple[int, int | None]] = {}
    axes: dict[str, list] = {}
    probes: dict[str, list[Probe]] = {}
    if stream:
        spaces[stream] = hidden
        probes[stream] = []
    emb = f"{prefix}embeddings"
    for table in ("word_embeddings", "position_embeddings", "token_type_embeddings"):
        if f"{emb}.{table}.weight" in names:
            axes[f"{emb}.{table}.weight"] = [None, stream]
    axes[f"{emb}.LayerNorm.weight"] = [stream]
    axes[f"{emb}.LayerNorm.bias"] = [stream]
    for i in range(config.num_hidden_layers):
        layer = f"{prefix}encoder.layer.{i}"
        attn, qk, v, ffn = f"{layer}.attention", f"qk.{i}", f"v.{i}", f"ffn.{i}"
        spaces[qk] = (hidden, hidden // heads)
        spaces[v] = (hidden, hidden // heads)
        spaces[ffn] = config.intermediate_size
        for proj, space in (("query", qk), ("key", qk), ("value", v)):
            axes[f"{attn}.self.{proj}.weight"] = [space, stream]
            axes[f"{attn}.self.{proj}.bias"] = [space]
        axes[f"{attn}.output.dense.weight"] = [stream, v]
        axes[f"{attn}.output.dense.bias"] = [stream]
        for norm in (f"{attn}.output.LayerNorm", f"{layer}.output.LayerNorm"):
            axes[f"{norm}.weight"] = [stream]
            axes[f"{norm}.bias"] = [stream]
        axes[f"{layer}.intermediate.dense.weight"] = [ffn, stream]
        axes[f"{layer}.intermediate.dense.bias"] = [ffn]
        axes[f"{layer}.output.dense.weight"] = [stream, ffn]
        axes[f"{layer}.output.dense.bias"] = [stream]
        if stream:
            probes[stream].append(Probe(f"{attn}.self.query"))
            probes[stream].append(Probe(f"{layer}.intermediate.dense"))
        # queries and keys have no module input of their own: project the layer input
        probes[qk] = [
            Probe(f"{attn}.self.query", weight="weight", bias="bias"),
            Probe(f"{attn}.self.key", weight="weight", bias="bias"),
        ]
        probes[v] = [Probe(f"{attn}.output.dense")]
        probes[ffn] = [Probe(f"{layer}.output.dense")]
    if f"{prefix}pooler.dense.weight" in names:
        pooler = "pooler" if has_classifier else None
        if pooler:
            spaces[pooler] = hidden
            probes[pooler] = [Probe("classifier")]
            axes["classifier.weight"] = [None, pooler]
        axes[f"{prefix}pooler.dense.weight"] = [pooler, stream]
        axes[f"{prefix}pooler.dense.bias"] = [pooler]
        if stream:
            probes[stream].append(Probe(f"{prefix}pooler.dense"))
    elif has_classifier and stream:
        axes["classifier.weight"] = [None, stream]
    roles = {name: ["out"] + ["in"] * (len(entries) - 1) for name, entries in axes.items()}
    for table in ("word_embeddings", "position_embeddings", "token_type_embeddings"):
        roles[f"{emb}.{table}.weight"] = ["in", "out"]  # the table's columns produce the stream
    return PermutationSpec.build(spaces, axes, roles=roles, probes=probes)
