"""A text classifier as `mergelab` scores one: an encoder, its last hidden states mean-pooled
over the real tokens, and a linear head on them.

`mergelab export` copies this file into the folder it writes, beside `config.json` (whose
`auto_map` names it), so that transformers loads and runs the folder by itself:

    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    model = AutoModelForSequenceClassification.from_pretrained(FOLDER, trust_remote_code=True)
    tokenizer = AutoTokenizer.from_pretrained(FOLDER)

This file imports transformers and torch only (never mergelab): the folder needs nothing else.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import AutoModel, PreTrainedModel
from transformers.modeling_outputs import SequenceClassifierOutput


class MeanPooledForSequenceClassification(PreTrainedModel):
    """`encoder` (any `AutoModel` of the config) + mean pooling + `classifier` (nn.Linear)."""

    base_model_prefix = "encoder"

    def __init__(self, config):
        super().__init__(config)
        self.encoder = AutoModel.from_config(config)
        self.classifier = nn.Linear(config.hidden_size, config.num_labels)
        self.post_init()

    def forward(self, input_ids=None, attention_mask=None, token_type_ids=None, labels=None,
                **kwargs) -> SequenceClassifierOutput:  # fmt: skip
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        inputs = {"input_ids": input_ids, "attention_mask": attention_mask}
        if token_type_ids is not None:
            inputs["token_type_ids"] = token_type_ids
        hidden = self.encoder(**inputs).last_hidden_state
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1.0)
        logits = self.classifier(pooled)
        loss = nn.functional.cross_entropy(logits, labels) if labels is not None else None
        return SequenceClassifierOutput(loss=loss, logits=logits)
