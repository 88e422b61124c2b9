"""Every bad input of a user's road (fine-tune, merge, data-aware merge, eval, export) is a clear
error naming the file, key, label, layer or tensor, with exit status 1 and nothing written.

Tiny BERT folders from tests/_data_aware_models.py; nothing loads from a hub."""

from __future__ import annotations

import csv
import json
import shutil

import pytest
import torch
import yaml
from _data_aware_models import bert_config, tiny_bert_folders
from typer.testing import CliRunner

pytest.importorskip("transformers")


def _cli(args):
    from mergelab.cli import app

    return CliRunner().invoke(app, [str(a) for a in args])


def _flat(output: str) -> str:
    return " ".join(output.split())


def _nothing_written(out) -> bool:
    """Neither the output nor a temporary folder beside it."""
    return not out.exists() and not any(p.name.startswith(f".{out.name}.") for p in out.parent.iterdir())


def _refused(args, out, *expected):
    outcome = _cli(args)
    text = _flat(outcome.output)
    assert outcome.exit_code == 1, outcome.output
    assert "Traceback" not in outcome.output and text.startswith("error:"), outcome.output
    for part in expected:
        assert part in text, (part, text)
    assert _nothing_written(out)
    return text


def _write_csv(path, rows):
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["text", "label"])
        writer.writerows(rows)
    return path


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    root = tmp_path_factory.mktemp("bad_inputs")
    return root, tiny_bert_folders(root)


def _write_config(path, config):
    path.write_text(yaml.safe_dump(config))
    return path


# --- mergelab finetune ------------------------------------------------------------------------


def test_finetune_steps_zero_and_steps_within_warmup(zoo, tmp_path):
    root, folders = zoo
    out = tmp_path / "ft"
    base = ["finetune", "--task", root / "task.csv", "--model", folders["base"], "--out", out]
    _refused([*base, "--steps", 0], out, "steps: ", "greater than or equal to 1; got 0")
    _refused([*base, "--steps", 8], out,
             "`warmup_steps` (10) must be below `steps` (8)", "0: no warm-up")  # fmt: skip
    _refused([*base, "--steps", 3, "--warmup-steps", 3], out, "`warmup_steps` (3) must be below `steps` (3)")


def test_finetune_task_file_without_csv_prefix_suggests_it(zoo, tmp_path):
    root, folders = zoo
    tsv = tmp_path / "reviews.txt"
    shutil.copy(root / "task.csv", tsv)
    out = tmp_path / "ft"
    _refused(["finetune", "--task", tsv, "--model", folders["base"], "--out", out],
             out, f"unknown task '{tsv}'", f"give csv:{tsv}")  # fmt: skip
    # A bare PATH.csv needs no prefix.
    _refused(["finetune", "--task", tmp_path / "absent.csv", "--model", folders["base"], "--out", out],
             out, f"task CSV {tmp_path / 'absent.csv'} does not exist")  # fmt: skip
    _refused(["eval", folders["m0"], "--task", tsv], tmp_path / "none", f"give csv:{tsv}")


def test_finetune_csv_that_is_not_utf8_names_the_line(zoo, tmp_path):
    _, folders = zoo
    latin = tmp_path / "latin.csv"
    latin.write_bytes("text,label\ngood film,1\ncaf\xe9 bad,0\n".encode("latin-1"))
    out = tmp_path / "ft"
    _refused(["finetune", "--task", latin, "--model", folders["base"], "--out", out],
             out, f"task CSV {latin}, line 3: not UTF-8", "save the file as UTF-8")  # fmt: skip


def test_finetune_class_absent_from_the_training_split(zoo, tmp_path):
    _, folders = zoo
    rows = [(f"the film was good {i}", "common") for i in range(38)] + [("awful", "rare"), ("bad", "rare")]
    task = _write_csv(tmp_path / "rare.csv", rows)
    from mergelab.eval.tasks import make_splits, read_csv_task

    csv_task = read_csv_task(task)
    # A seed whose split puts both rows of `rare` outside the training split.
    sizes = {"train": 22, "validation": 6, "test": 6}
    from mergelab.eval.tasks import SplitSizes

    seed = next(s for s in range(50) if 1 not in make_splits(
        csv_task.load(), SplitSizes(**sizes), num_classes=2, seed=s).train.labels)  # fmt: skip
    out = tmp_path / "ft"
    _refused(["finetune", "--task", task, "--model", folders["base"], "--out", out, "--seed", seed,
              "--steps", 4, "--warmup-steps", 1],
             out, "class(es) 'rare' (2 row(s) in all) have no example in the training split",
             f"seed {seed}")  # fmt: skip


# --- mergelab merge ---------------------------------------------------------------------------


def test_ties_density_zero_is_refused_before_any_tensor_is_read(zoo, tmp_path):
    _, folders = zoo
    config = _write_config(tmp_path / "ties.yml", {
        "merge_method": "ties", "base_model": str(folders["base"]),
        "models": [{"model": str(folders["m0"]), "parameters": {"weight": 1.0, "density": 0.0}},
                   {"model": str(folders["m1"]), "parameters": {"weight": 1.0, "density": 0.5}}],
    })  # fmt: skip
    out = tmp_path / "merged"
    text = _refused(["merge", config, out, "--no-progress"], out,
                    "models.0.parameters.density: `density` must be in (0, 1]; got 0.0",
                    "makes the method a no-op")  # fmt: skip
    assert "models.1" not in text
    _refused(["validate", config], out, "models.0.parameters.density")


def test_cli_messages_speak_cli_flags_not_python_keywords(zoo, tmp_path):
    _, folders = zoo
    config = _write_config(tmp_path / "linear.yml", {
        "merge_method": "linear",
        "models": [{"model": str(folders[m]), "parameters": {"weight": 0.5}} for m in ("m0", "m1")],
    })  # fmt: skip
    out = tmp_path / "merged"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    outcome = _cli(["merge", config, out, "--no-progress"])
    assert outcome.exit_code == 1 and "pass --overwrite" in _flat(outcome.output)
    assert "overwrite=True" not in outcome.output
    assert [p.name for p in out.iterdir()] == ["keep.txt"]


# --- data-aware merges ------------------------------------------------------------------------


def test_data_csv_with_a_label_the_heads_lack(zoo, tmp_path):
    root, folders = zoo
    three = _write_csv(tmp_path / "three.csv", [(f"the film was good {i}", "abc"[i % 3]) for i in range(30)])
    config = bert_config(root, folders, "fisher")
    config["data"]["task"] = str(three)
    out = tmp_path / "merged"
    _refused(["merge", _write_config(tmp_path / "fisher.yml", config), out, "--no-progress"], out,
             f"data: task '{three}' of model '{folders['m0']}'",
             "the task has 3 classes ['a', 'b', 'c']", "predicts 2")  # fmt: skip


def test_data_csv_with_a_label_name_the_recorded_head_lacks(zoo, tmp_path):
    root, folders = zoo
    tuned = {}
    for name in ("m0", "m1"):  # the heads' label names recorded as `mergelab finetune` does
        tuned[name] = tmp_path / name
        shutil.copytree(folders[name], tuned[name])
        (tuned[name] / "recipe.json").write_text(json.dumps({"task": "task", "label_names": ["0", "1"]}))
    named = _write_csv(tmp_path / "named.csv", [(f"the film {i}", ["neg", "pos"][i % 2]) for i in range(30)])
    config = bert_config(root, {**folders, **tuned}, "fisher")
    config["data"]["task"] = str(named)
    out = tmp_path / "merged"
    _refused(["merge", _write_config(tmp_path / "fisher.yml", config), out, "--no-progress"], out,
             "label(s) ['neg', 'pos'] of the task are not classes of the head",
             str(tuned["m0"] / "head.safetensors"))  # fmt: skip


def test_data_csv_that_is_not_utf8(zoo, tmp_path):
    root, folders = zoo
    latin = tmp_path / "latin.csv"
    latin.write_bytes(("text,label\n" + "film good,1\ncaf\xe9 bad,0\n" * 10).encode("latin-1"))
    config = bert_config(root, folders, "regmean")
    config["data"]["task"] = str(latin)
    out = tmp_path / "merged"
    _refused(["merge", _write_config(tmp_path / "regmean.yml", config), out, "--no-progress"], out,
             f"task CSV {latin}, line 3: not UTF-8")  # fmt: skip


@pytest.fixture(scope="module")
def statistics(zoo, tmp_path_factory):
    """Gram and Fisher statistics folders of m0 and m1, collected once by a merge."""
    root, folders = zoo
    where = tmp_path_factory.mktemp("statistics")
    found = {}
    for method in ("regmean", "fisher"):
        config = bert_config(root, folders, method)
        config["data"]["statistics"] = [str(where / f"{method}-{m}") for m in ("m0", "m1")]
        made = _cli(["merge", _write_config(where / f"{method}.yml", config), where / f"out-{method}",
                     "--no-progress"])  # fmt: skip
        assert made.exit_code == 0, made.output
        found[method] = config["data"]["statistics"]
    return found


def _wider_berts(root):
    """BERT folders of another width (12, not 8) with the same tokenizer and heads."""
    import transformers

    config = transformers.BertConfig(vocab_size=14, hidden_size=12, num_hidden_layers=2,
                                     num_attention_heads=2, intermediate_size=16,
                                     max_position_embeddings=32)  # fmt: skip
    folders = {}
    for i, name in enumerate(("base", "m0", "m1")):
        torch.manual_seed(i)
        folders[name] = root / f"wide-{name}"
        transformers.BertModel(config).save_pretrained(folders[name])
        for side in ("vocab.txt", "tokenizer.json", "tokenizer_config.json", "head.safetensors"):
            if (root / "m0" / side).is_file():
                shutil.copy(root / "m0" / side, folders[name] / side)
    return folders


@pytest.mark.parametrize("method, shapes", [
    ("regmean", "the gram statistics entry `encoder.layer.0.attention.self.query` does not fit: "
                "its linear Gram has shape [8, 8]; a weight of shape [12, 12] needs [12, 12]"),
    ("fisher", "the fisher statistics entry `encoder.layer.0.attention.self.query.weight` does not "
               "fit: its Fisher has shape [8, 8]; the tensor has [12, 12]"),
])  # fmt: skip
def test_statistics_of_a_model_of_other_shapes(zoo, statistics, tmp_path, method, shapes):
    root, _ = zoo
    wide = _wider_berts(root) if not (root / "wide-m0").exists() else {
        n: root / f"wide-{n}" for n in ("base", "m0", "m1")}  # fmt: skip
    config = bert_config(root, wide, method)
    config["data"]["statistics"] = statistics[method]
    out = tmp_path / "merged"
    _refused(["merge", _write_config(tmp_path / f"{method}.yml", config), out, "--no-progress"], out,
             f"tensor `encoder.layer.0.attention.self.query.weight` of model '{wide['m0']}'", shapes)  # fmt: skip


def test_statistics_that_share_no_layer_with_the_model(zoo, statistics, tmp_path):
    """Grams of a wrapped module (`encoder.` prefixed names) match no tensor: an error, not a
    plain average."""
    from safetensors.torch import load_file, save_file

    root, folders = zoo
    renamed = []
    for folder in statistics["regmean"]:
        target = tmp_path / ("renamed-" + folder.rsplit("/", 1)[-1])
        target.mkdir()
        grams = load_file(f"{folder}/grams.safetensors")
        save_file({f"wrapper.{k}": v for k, v in grams.items()}, str(target / "grams.safetensors"))
        info = json.loads((root.parent / folder / "stats.json").read_text())
        info["layers"] = {f"wrapper.{k}": v for k, v in info["layers"].items()}
        (target / "stats.json").write_text(json.dumps(info))
        renamed.append(str(target))
    config = bert_config(root, folders, "regmean")
    config["data"]["statistics"] = renamed
    out = tmp_path / "merged"
    _refused(["merge", _write_config(tmp_path / "regmean.yml", config), out, "--no-progress"], out,
             "the gram statistics share no layer with the model",
             "'wrapper.embeddings.word_embeddings'", "computed for another model")  # fmt: skip


# --- mergelab eval and export -----------------------------------------------------------------


def test_eval_with_labels_the_head_lacks(zoo, tmp_path):
    _, folders = zoo
    tuned = tmp_path / "ft"
    shutil.copytree(folders["m0"], tuned)
    (tuned / "recipe.json").write_text(json.dumps({"task": "task", "label_names": ["neg", "pos"]}))
    other = _write_csv(tmp_path / "task.csv", [(f"the film {i}", ["neg", "meh"][i % 2]) for i in range(40)])
    _refused(["eval", tuned, "--task", other, "--no-baselines"], tmp_path / "none",
             "task 'task' has label(s) ['meh'] that the head 'task'", "its classes are ['neg', 'pos']")  # fmt: skip


@pytest.mark.parametrize("method", ["regmean", "fisher"])
def test_a_nan_in_a_source_under_a_data_aware_method_names_the_tensor(zoo, tmp_path, method):
    """Not the layer after it, which is where the forward pass would first see it."""
    from safetensors.torch import load_file, save_file

    root, folders = zoo
    poisoned = tmp_path / "m0"
    shutil.copytree(folders["m0"], poisoned)
    weights = load_file(str(poisoned / "model.safetensors"))
    weights["encoder.layer.0.attention.self.query.weight"][0, 0] = float("nan")
    save_file(weights, str(poisoned / "model.safetensors"), metadata={"format": "pt"})
    config = bert_config(root, {**folders, "m0": poisoned}, method)
    out = tmp_path / "merged"
    _refused(["merge", _write_config(tmp_path / f"{method}.yml", config), out, "--no-progress"], out,
             f"tensor `encoder.layer.0.attention.self.query.weight` of model '{poisoned}' "
             f"({poisoned / 'model.safetensors'}) holds 1 NaN/Inf value(s)")  # fmt: skip
