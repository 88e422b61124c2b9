"""Vocabulary merging (`tokenizer_source`, the `tokenizer:` section) and chat templates.

Three tiny Llamas share a word vocabulary and differ by added tokens, at different ids:
    base: <ba>                      (13 tokens)
    a:    <ba> <tool> <both>        (15 tokens)
    b:    <both> <x> + special <|im_start|>   (15 tokens)
The merged rows are checked token by token against mergekit's rules, and against mergekit 0.1.5
itself on the same config.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from _tokenizer_models import save_llama
from safetensors.torch import load_file

import mergelab
from mergelab import ConfigError

ADDED = {"base": (["<ba>"], []), "a": (["<ba>", "<tool>", "<both>"], []),
         "b": (["<both>", "<x>"], ["<|im_start|>"])}
WEIGHTS = {"base": 0.4, "a": 0.3, "b": 0.3}
HEADS = ("model.embed_tokens.weight", "lm_head.weight")


@pytest.fixture(scope="module")
def family(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("vocab")
    out = {}
    for seed, (name, (added, special)) in enumerate(ADDED.items()):
        out[name] = save_llama(root / name, seed, added, special)
    for seed, (name, (added, special)) in enumerate(ADDED.items()):
        out[f"{name}_tied"] = save_llama(root / f"{name}_tied", 10 + seed, added, special, tie=True)
    return out


def _config(tmp_path: Path, family: dict[str, Path], suffix: str = "", **extra) -> Path:
    cfg = {
        "merge_method": "linear",
        "base_model": str(family["base" + suffix]),
        "models": [{"model": str(family[k + suffix]), "parameters": {"weight": w}}
                   for k, w in WEIGHTS.items()],
        "dtype": "float32",
        **extra,
    }
    path = tmp_path / "merge.yml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def _vocab(folder: Path) -> dict[str, int]:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(folder), local_files_only=True).get_vocab()


def _tensors(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "model.safetensors"))


SECTION = {"source": "union", "pad_to_multiple_of": 8,
           "tokens": {"<x>": {"source": {"kind": "model_token", "model": "BASE", "token": "w0"},
                              "force": True},
                      "<new>": {"source": {"kind": "zero"}}}}


def _section(family) -> dict:
    section = json.loads(json.dumps(SECTION))
    section["tokens"]["<x>"]["source"]["model"] = str(family["base"])
    return section


def test_union_rows_follow_the_rules_token_by_token(tmp_path, family):
    out = tmp_path / "out"
    report = mergelab.merge(_config(tmp_path, family, tokenizer=_section(family)), out,
                            progress=False)
    vocab = _vocab(out)
    # base's vocabulary, then the added tokens in first-seen order, then `tokens:` additions
    order = sorted(vocab, key=vocab.get)
    assert order[13:] == ["<tool>", "<both>", "<x>", "<|im_start|>", "<new>"]
    assert len(vocab) == 18
    config = json.loads((out / "config.json").read_text())
    assert config["vocab_size"] == 24  # 18 rounded up to a multiple of 8
    assert any("18 tokens in 24 rows" in n for n in report.notes), report.notes
    sources = {k: (_tensors(family[k]), _vocab(family[k])) for k in WEIGHTS}
    merged = _tensors(out)
    for name in HEADS:
        assert merged[name].shape == (24, 8)

        def row(model: str, token: str, name: str = name) -> torch.Tensor:
            tensors, own = sources[model]
            return tensors[name][own[token]]

        def mapped(model: str, token: str) -> torch.Tensor:
            """The model's row of `token` on the output vocabulary, by the rules."""
            holders = [k for k in WEIGHTS if token in sources[k][1]]
            if token == "<x>":
                return row("base", "w0")  # forced: every model takes base's row of w0
            if token == "<new>":
                return torch.zeros(8)
            if model in holders:
                return row(model, token)
            if len(holders) == 1:
                return row(holders[0], token)
            if "base" in holders:
                return row("base", token)
            return sum(row(k, token) for k in holders) / len(holders)

        for token, index in vocab.items():
            expected = sum(w * mapped(k, token) for k, w in WEIGHTS.items())
            torch.testing.assert_close(merged[name][index], expected, msg=f"{name} {token}")
        # padding rows: each model's mean mapped row, merged
        means = {k: torch.stack([mapped(k, t) for t in vocab]).mean(0) for k in WEIGHTS}
        expected_pad = sum(w * means[k] for k, w in WEIGHTS.items())
        for index in range(18, 24):
            torch.testing.assert_close(merged[name][index], expected_pad)
    # the cases the rules distinguish all occur
    assert "<both>" not in sources["base"][1] and "<ba>" not in sources["b"][1]


def test_tied_models_stay_tied_and_the_output_loads_in_transformers(tmp_path, family):
    from transformers import AutoModelForCausalLM

    out = tmp_path / "out"
    mergelab.merge(_config(tmp_path, family, "_tied", tokenizer_source="union"), out,
                   progress=False)
    merged = _tensors(out)
    assert "lm_head.weight" not in merged and merged["model.embed_tokens.weight"].shape == (17, 8)
    config = json.loads((out / "config.json").read_text())
    assert config["tie_word_embeddings"] is True and config["vocab_size"] == 17
    model = AutoModelForCausalLM.from_pretrained(str(out), local_files_only=True)
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(out), local_files_only=True)
    ids = tok("w0 <both> <|im_start|>", return_tensors="pt").input_ids
    assert ids.max() < 17
    with torch.no_grad():
        logits = model(ids).logits
    assert logits.shape == (1, ids.shape[1], 17) and torch.isfinite(logits).all()


def test_tokenizer_source_base_maps_every_model_onto_the_base_vocabulary(tmp_path, family):
    out = tmp_path / "out"
    mergelab.merge(_config(tmp_path, family, tokenizer_source="base"), out, progress=False)
    assert _vocab(out) == _vocab(family["base"])
    merged, base_vocab = _tensors(out), _vocab(family["base"])
    sources = {k: (_tensors(family[k]), _vocab(family[k])) for k in WEIGHTS}
    # <ba>: base and a have it, b does not: b takes base's row
    index = base_vocab["<ba>"]
    rows = {k: s[0]["lm_head.weight"][s[1]["<ba>"]] for k, s in sources.items() if "<ba>" in s[1]}
    expected = 0.4 * rows["base"] + 0.3 * rows["a"] + 0.3 * rows["base"]
    torch.testing.assert_close(merged["lm_head.weight"][index], expected)


def _mergekit(config: Path, out: Path) -> None:
    script = Path(sys.executable).with_name("mergekit-yaml")
    if not script.exists():
        pytest.fail(f"mergekit-yaml is not in {script.parent}: `make venv` installs mergekit 0.1.5 "
                    "(the reference of the differential tests)", pytrace=False)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    done = subprocess.run([str(script), str(config), str(out), "--device", "cpu"], env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]


def test_union_section_and_chat_template_match_mergekit(tmp_path, family):
    config = _config(tmp_path, family, tokenizer=_section(family), chat_template="chatml")
    ours, theirs = tmp_path / "ours", tmp_path / "theirs"
    mergelab.merge(config, ours, progress=False)
    _mergekit(config, theirs)
    a, b = _tensors(ours), _tensors(theirs)
    assert a.keys() == b.keys()
    # mergekit orders the union by a set of its models (the order varies between its runs), so
    # the two vocabularies hold the same tokens, maybe at other ids: rows are compared by token.
    ours_vocab, theirs_vocab = _vocab(ours), _vocab(theirs)
    assert ours_vocab.keys() == theirs_vocab.keys()
    assert all(ours_vocab[t] == theirs_vocab[t] for t in _vocab(family["base"]))
    for name in a:
        if name not in HEADS:
            torch.testing.assert_close(a[name], b[name], rtol=0, atol=1e-6, msg=name)
            continue
        for token, index in ours_vocab.items():
            torch.testing.assert_close(a[name][index], b[name][theirs_vocab[token]], rtol=0,
                                       atol=1e-6, msg=f"{name} {token}")
        torch.testing.assert_close(a[name][len(ours_vocab):], b[name][len(ours_vocab):],
                                   rtol=0, atol=1e-6, msg=f"{name} padding")
    assert (ours / "chat_template.jinja").read_text() == (theirs / "chat_template.jinja").read_text()
    ours_cfg = json.loads((ours / "config.json").read_text())
    theirs_cfg = json.loads((theirs / "config.json").read_text())
    assert ours_cfg["vocab_size"] == theirs_cfg["vocab_size"] == 24


def _one_model(tmp_path: Path, family: dict[str, Path], **extra) -> Path:
    cfg = {"merge_method": "linear", "models": [{"model": str(family["base"]),
                                                 "parameters": {"weight": 1.0}}], **extra}
    path = tmp_path / "one.yml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_chat_template_by_name_or_jinja_is_set_on_the_tokenizer(tmp_path, family):
    from transformers import AutoTokenizer

    jinja = "{% for m in messages %}<<{{ m['role'] }}>>{{ m['content'] }}{% endfor %}"
    messages = [{"role": "user", "content": "w0 w1"}]
    for template, expected in (("chatml", "<|im_start|>user\nw0 w1<|im_end|>\n"), (jinja, "<<user>>w0 w1")):
        out = tmp_path / "out"
        shutil.rmtree(out, ignore_errors=True)
        mergelab.merge(_one_model(tmp_path, family, chat_template=template), out, progress=False)
        tok = AutoTokenizer.from_pretrained(str(out), local_files_only=True)
        assert tok.apply_chat_template(messages, tokenize=False) == expected
        assert _vocab(out) == _vocab(family["base"])  # no vocabulary merging asked for
    for name in ("llama3", "mistral", "alpaca", "exaone"):
        shutil.rmtree(out, ignore_errors=True)
        mergelab.merge(_one_model(tmp_path, family, chat_template=name), out, progress=False)
        tok = AutoTokenizer.from_pretrained(str(out), local_files_only=True)
        assert "w0 w1" in tok.apply_chat_template(messages, tokenize=False)


def test_chat_template_auto_takes_the_most_common_template_of_the_models(tmp_path, family):
    from transformers import AutoTokenizer

    templates = {"base": "{{ 'A' }}{% for m in messages %}{{ m['content'] }}{% endfor %}",
                 "a": "{{ 'B' }}{% for m in messages %}{{ m['content'] }}{% endfor %}",
                 "b": "{{ 'B' }}{% for m in messages %}{{ m['content'] }}{% endfor %}"}
    folders = {}
    for key, template in templates.items():
        folders[key] = tmp_path / key
        shutil.copytree(family[key], folders[key])
        tok = AutoTokenizer.from_pretrained(str(folders[key]), local_files_only=True)
        tok.chat_template = template
        tok.save_pretrained(str(folders[key]))
    out = tmp_path / "out"
    mergelab.merge(_config(tmp_path, folders, tokenizer_source="union", chat_template="auto"), out,
                   progress=False)
    tok = AutoTokenizer.from_pretrained(str(out), local_files_only=True)
    assert tok.apply_chat_template([{"role": "user", "content": "w0"}], tokenize=False) == "Bw0"


def _reads(monkeypatch) -> list[str]:
    from mergelab.checkpoint.reader import CheckpointReader

    reads: list[str] = []
    original = CheckpointReader.get
    monkeypatch.setattr(CheckpointReader, "get", lambda self, n: reads.append(n) or original(self, n))
    return reads


def test_bad_tokenizer_input_is_refused_before_any_tensor_is_read(tmp_path, family, monkeypatch):
    reads = _reads(monkeypatch)
    broken = tmp_path / "broken"
    shutil.copytree(family["a"], broken)
    (broken / "tokenizer.json").write_text("{not json")
    cfg = yaml.safe_load(_config(tmp_path, family, tokenizer_source="union").read_text())
    cfg["models"][1]["model"] = str(broken)
    (tmp_path / "broken.yml").write_text(yaml.safe_dump(cfg))
    with pytest.raises(ConfigError, match=r"tokenizer: the tokenizer of model '.*broken' .* cannot be read"):
        mergelab.merge(tmp_path / "broken.yml", tmp_path / "never", progress=False)
    section = {"tokens": {"<nowhere>": {}, "<tool>": {"source": str(family["b"])}}}
    with pytest.raises(ConfigError) as info:
        mergelab.merge(_config(tmp_path, family, tokenizer=section), tmp_path / "never",
                       progress=False)
    text = str(info.value)
    assert "tokenizer.tokens.<nowhere>: token '<nowhere>' is in no source's vocabulary" in text
    assert f"tokenizer.tokens.<tool>.source: model {str(family['b'])!r} has no token '<tool>'" in text
    with pytest.raises(ConfigError, match="chat_template: 'nonsense' is neither a known template"):
        mergelab.merge(_one_model(tmp_path, family, chat_template="nonsense"), tmp_path / "never",
                       progress=False)
    with pytest.raises(ConfigError, match="give `tokenizer_source` or the `tokenizer` section, not both"):
        mergelab.merge(_config(tmp_path, family, tokenizer_source="union", tokenizer={}),
                       tmp_path / "never", progress=False)
    assert reads == [] and not (tmp_path / "never").exists()


def test_tokenizer_source_path_and_a_stage_whose_union_the_next_stage_reads(tmp_path, family):
    # tokenizer_source: PATH: the output vocabulary is a's
    out = tmp_path / "out"
    mergelab.merge(_config(tmp_path, family, tokenizer_source=str(family["a"])), out,
                   progress=False)
    assert _vocab(out) == _vocab(family["a"])
    assert json.loads((out / "config.json").read_text())["vocab_size"] == 15
    # A first stage builds base+a's union; the final stage unites it with b. The final stage is
    # validated against the tokenizer the first will write, before anything runs.
    first = {"name": "base-a", "merge_method": "linear", "base_model": str(family["base"]),
             "models": [{"model": str(family["base"]), "parameters": {"weight": 0.5}},
                        {"model": str(family["a"]), "parameters": {"weight": 0.5}}],
             "tokenizer_source": "union", "dtype": "float32"}
    final = {"merge_method": "linear", "base_model": "base-a",
             "models": [{"model": "base-a", "parameters": {"weight": 0.5}},
                        {"model": str(family["b"]), "parameters": {"weight": 0.5}}],
             "tokenizer_source": "union", "dtype": "float32"}
    config = tmp_path / "multi.yml"
    config.write_text(yaml.safe_dump_all([first, final]))
    plan = mergelab.plan_merge(config)
    mergelab.api.close_plan(plan)
    assert any("output vocabulary: 17 tokens" in n for n in plan.notes), plan.notes
    staged = tmp_path / "staged"
    mergelab.merge(config, staged, progress=False)
    vocab = _vocab(staged)
    assert set(vocab) == set(_vocab(family["a"])) | set(_vocab(family["b"]))
    merged, sources = _tensors(staged), {k: (_tensors(family[k]), _vocab(family[k])) for k in WEIGHTS}
    # <tool> is a's alone: the first stage's row is a's, and b lacks it, so the final row is it
    row = sources["a"][0]["lm_head.weight"][sources["a"][1]["<tool>"]]
    torch.testing.assert_close(merged["lm_head.weight"][vocab["<tool>"]], row)
