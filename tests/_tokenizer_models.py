"""Tiny Llama checkpoints whose tokenizers differ by added tokens (vocabulary merging tests).

Every model shares a word-level base vocabulary (`<unk>`, `<s>`, `</s>`, `w0`...); each may add
tokens of its own, appended after the base vocabulary as transformers appends added tokens, with
embedding and LM-head rows of their own. Built here with transformers; nothing from a hub.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

BASE_WORDS = 12  # tokens of the shared vocabulary


def word_tokenizer(added: Sequence[str] = (), special: Sequence[str] = ()):
    """A fast word-level tokenizer: the shared vocabulary, then `added` (plain added tokens)
    and `special` (special added tokens), in that order."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["<unk>", "<s>", "</s>"] + [f"w{i}" for i in range(BASE_WORDS - 3)]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    out = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>",
                                  eos_token="</s>")
    if added:
        out.add_tokens(list(added))
    if special:
        out.add_tokens(list(special), special_tokens=True)
    return out


def save_llama(folder: Path, seed: int, added: Sequence[str] = (), special: Sequence[str] = (),
               tie: bool = False, tokenizer: bool = True) -> Path:
    """A tiny LlamaForCausalLM with the tokenizer `word_tokenizer(added, special)`; its
    vocab_size is the tokenizer's length. Returns the folder."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = word_tokenizer(added, special)
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tok), hidden_size=8, intermediate_size=12, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=16,
        tie_word_embeddings=tie, bos_token_id=1, eos_token_id=2,
    )
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():  # every row distinct, norms not all ones
        for p in model.parameters():
            p.add_(0.1 * torch.randn(p.shape))
    model.save_pretrained(folder, safe_serialization=True)
    if tokenizer:
        tok.save_pretrained(folder)
    return folder
