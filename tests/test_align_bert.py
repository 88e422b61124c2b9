"""The hand-declared spec of Hugging Face BERT: permutations are symmetries, recovered exactly."""

from __future__ import annotations

import copy

import pytest
import torch

from mergelab.align import (
    AlignError,
    activation_matching,
    invert,
    permute_state_dict,
    random_permutations,
    weight_matching,
    zip_models,
)
from mergelab.align.specs import bert_spec

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def bert():
    config = transformers.BertConfig(
        vocab_size=30, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=24, max_position_embeddings=12, num_labels=3,
    )  # fmt: skip
    torch.manual_seed(0)
    return transformers.BertForSequenceClassification(config).eval()


def test_bert_spec_covers_every_weight_and_is_a_symmetry(bert):
    spec = bert_spec(bert)
    # everything but the classifier's bias (class outputs are fixed) is in the spec
    assert sorted(set(bert.state_dict()) - set(spec.axes)) == ["classifier.bias"]
    assert spec.spaces["qk.0"].head_size == 8
    g = torch.Generator().manual_seed(0)
    perms = random_permutations(spec, g)
    other = copy.deepcopy(bert)
    other.load_state_dict(permute_state_dict(spec, bert.state_dict(), perms))
    tokens = torch.randint(0, 30, (8, 10), generator=g)
    with torch.no_grad():
        want = bert(tokens).logits
        torch.testing.assert_close(other(tokens).logits, want, atol=1e-5, rtol=1e-5)
        found = weight_matching(spec, bert.state_dict(), other.state_dict(), generator=g)
        assert all(torch.equal(found[k], invert(p)) for k, p in perms.items())
        found = activation_matching(spec, bert, other, [tokens])
        assert all(torch.equal(found[k], invert(p)) for k, p in perms.items())
        zipped = zip_models([bert, other], [tokens], spec=spec, repair=None)
        torch.testing.assert_close(zipped(tokens).logits, want, atol=1e-5, rtol=1e-5)


def test_bert_spec_refuses_other_models():
    with pytest.raises(AlignError, match="needs a Hugging Face BERT model"):
        bert_spec(torch.nn.Linear(2, 2))
