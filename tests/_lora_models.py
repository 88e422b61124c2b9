"""Tiny models and real PEFT adapters for the LoRA tests (built here, nothing from a hub)."""

from __future__ import annotations

import warnings
from pathlib import Path

import torch

warnings.filterwarnings("ignore", message=".*embedding.*", category=UserWarning)


def tiny_llama(seed: int = 0, tie: bool = False, **changes):
    """A 2-layer Llama (hidden 16, MLP 24, vocab 48); `changes` override config fields (e.g.
    `hidden_size=24` for a model of another shape)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    settings = dict(
        vocab_size=48, hidden_size=16, intermediate_size=24, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=32,
        tie_word_embeddings=tie, bos_token_id=1, eos_token_id=2, pad_token_id=0,
    )
    settings.update(changes)
    return LlamaForCausalLM(LlamaConfig(**settings)).eval()


def tiny_gpt2(seed: int = 0):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    config = GPT2Config(
        vocab_size=48, n_embd=16, n_layer=2, n_head=2, n_positions=32,
        bos_token_id=1, eos_token_id=2,
    )
    return GPT2LMHeadModel(config).eval()


def save_model(model, folder: Path) -> Path:
    model.save_pretrained(folder, safe_serialization=True)
    return folder


def make_adapter(base_model, folder: Path, seed: int, **lora_kwargs) -> Path:
    """A PEFT adapter with random (non-zero) A and B, saved with `save_pretrained`."""
    import copy

    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    model = copy.deepcopy(base_model)
    settings = {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"]}
    settings.update(lora_kwargs)
    peft_model = get_peft_model(model, LoraConfig(init_lora_weights=False, **settings))
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name or "lora_embedding_B" in name:
                param.normal_(0, 0.3)
    peft_model.save_pretrained(folder)
    return folder


def merged_with_peft(base_model, adapter: Path) -> dict[str, torch.Tensor]:
    """PEFT's `merge_and_unload` of an adapter into a copy of the base: the reference."""
    import copy

    from peft import PeftModel

    model = PeftModel.from_pretrained(copy.deepcopy(base_model), str(adapter))
    return {k: v.detach().clone() for k, v in model.merge_and_unload().state_dict().items()}
