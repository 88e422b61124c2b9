"""Data-flow space search (Akiba et al.): routings of the sources' layers, the routed model,
routing files and their passthrough checkpoints, the hybrid source, bad input."""

from __future__ import annotations

import pytest
import torch
import yaml
from typer.testing import CliRunner

import mergelab
from mergelab.cli import app
from mergelab.errors import ConfigError, MergeLabError

transformers = pytest.importorskip("transformers")

from _data_aware_models import tiny_bert_folders  # noqa: E402

from mergelab.search.dataflow import (  # noqa: E402
    DataflowSpace,
    build_dataflow_space,
    layer_stack,
    load_routing,
    load_source,
    routed_model,
    routing_merge_config,
)


def _space(**kw) -> DataflowSpace:
    facts = dict(models=("a", "b"), layers=2, repeats=2, scaling=True, scale_low=0.5,
                 scale_high=1.5, host=0, start="host")
    return DataflowSpace(**{**facts, **kw})


def test_a_point_maps_to_its_routing_by_hand():
    space = _space()
    # M = 4 layout layers (a0 a1 b0 b1), T = 8 slots, W 4 x 4 = 16 scales
    assert (space.layout, space.slots, space.size) == (4, 8, 24)
    include = [0.9, 0.1, 0.2, 0.7, 0.5, 0.6, 0.0, 0.0]  # slots 0 (a0), 3 (b1), 5 (a1); 0.5 is out
    scales = [0.5] * 16
    scales[0 * 4 + 3] = 1.0   # a0 -> b1: 0.5 + 1.0 * 1.0 = 1.5
    scales[3 * 4 + 1] = 0.25  # b1 -> a1: 0.5 + 0.25 = 0.75
    routing = space.to_config(include + scales)["routing"]
    assert routing["host"] == "a" and routing["models"] == ["a", "b"]
    assert routing["layers"] == [
        {"model": 0, "layer": 0, "scale": 1.0},   # the first layer reads the embeddings as they are
        {"model": 1, "layer": 1, "scale": 1.5},
        {"model": 0, "layer": 1, "scale": 0.75},
    ]
    unscaled = _space(scaling=False)
    assert unscaled.size == 8
    assert [e["scale"] for e in unscaled.to_config(include)["routing"]["layers"]] == [1.0] * 3


def test_the_start_point_is_the_hosts_own_stack_once():
    space = _space(host=1)
    start = space.start_point()
    routing = space.to_config([start[d.label] for d in space.dimensions])["routing"]
    assert routing["layers"] == [{"model": 1, "layer": 0, "scale": 1.0},
                                 {"model": 1, "layer": 1, "scale": 1.0}]
    assert _space(start="centre").start_point() is None


def _inputs(folder):
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    return tokenizer(["the film was very good", "bad plot"], padding=True, return_tensors="pt")


def test_the_routed_model_composes_the_sources_layers_without_copying_them(tmp_path):
    folders = tiny_bert_folders(tmp_path)
    a, b = load_source(str(folders["m0"])), load_source(str(folders["m1"]))
    before = {k: v.clone() for k, v in a.state_dict().items()}
    routing = {"routing": {"host": "A", "models": ["A", "B"], "layers": [
        {"model": 0, "layer": 1, "scale": 1.0},
        {"model": 1, "layer": 0, "scale": 0.5},
        {"model": 1, "layer": 0, "scale": 2.0},
    ]}}
    model = routed_model(routing, [a, b])
    assert model.config.num_hidden_layers == 3 and a.config.num_hidden_layers == 2
    stack_a, stack_b = layer_stack(a)[1], layer_stack(b)[1]
    routed = layer_stack(model)[1]
    assert routed[0].layer is stack_a[1] and routed[1].layer is stack_b[0]
    shared = {p.data_ptr() for p in a.parameters()} | {p.data_ptr() for p in b.parameters()}
    assert {p.data_ptr() for p in model.parameters()} <= shared  # no weight copied
    tokens = _inputs(folders["m0"])
    with torch.no_grad():
        out = model(**tokens).last_hidden_state
        # by hand: A's embeddings, A's layer 1, then B's layer 0 on 0.5 x and on 2 x its input
        seen = {}
        hook = stack_a[0].register_forward_pre_hook(
            lambda module, args, kwargs: seen.update(args=args[1:], kwargs=kwargs), with_kwargs=True)
        a(**tokens)  # what the host hands its layers besides the hidden state (the mask)
        hook.remove()

        def run(layer, h):
            out = layer(h, *seen["args"], **seen["kwargs"])
            return out[0] if isinstance(out, tuple) else out

        h = a.embeddings(input_ids=tokens["input_ids"], token_type_ids=tokens["token_type_ids"])
        h = run(stack_a[1], h)
        h = run(stack_b[0], 0.5 * h)
        h = run(stack_b[0], 2.0 * h)
    torch.testing.assert_close(out, h)
    assert all(torch.equal(v, a.state_dict()[k]) for k, v in before.items())  # A unchanged
    with torch.no_grad():  # the host's own stack is the host
        own = routed_model({"routing": {"host": "A", "models": ["A"], "layers": [
            {"model": 0, "layer": 0, "scale": 1.0}, {"model": 0, "layer": 1, "scale": 1.0}]}}, [a])
        torch.testing.assert_close(own(**tokens).last_hidden_state, a(**tokens).last_hidden_state)


def test_a_routing_file_loads_back_and_an_unscaled_one_is_a_passthrough_checkpoint(tmp_path):
    folders = tiny_bert_folders(tmp_path)
    layers = [{"model": 0, "layer": 0, "scale": 1.0}, {"model": 0, "layer": 1, "scale": 1.0},
              {"model": 1, "layer": 1, "scale": 1.0}, {"model": 1, "layer": 0, "scale": 1.0}]
    routing = {"routing": {"host": str(folders["m0"]), "models": [str(folders["m0"]), str(folders["m1"])],
                           "layers": layers}}
    path = tmp_path / "routing.yaml"
    path.write_text(yaml.safe_dump(routing))
    model = load_routing(path)
    config = routing_merge_config(routing)
    assert [s["sources"][0]["layer_range"] for s in config["slices"]] == [[0, 2], [1, 2], [0, 1]]
    mergelab.merge(config, tmp_path / "stacked")
    stacked = transformers.AutoModel.from_pretrained(tmp_path / "stacked").eval()
    assert stacked.config.num_hidden_layers == 4
    tokens = _inputs(folders["m0"])
    with torch.no_grad():
        torch.testing.assert_close(stacked(**tokens).last_hidden_state,
                                   model(**tokens).last_hidden_state)
    scaled = {"routing": {**routing["routing"], "layers": [{**layers[0], "scale": 0.9}]}}
    assert routing_merge_config(scaled) is None  # a scale is no weight


def test_a_merge_config_is_a_source_merged_in_memory(tmp_path):
    """The hybrid: a parameter-space recipe (best.yaml) becomes a data-flow source."""
    folders = tiny_bert_folders(tmp_path)
    recipe = {"merge_method": "linear", "models": [{"model": "m0", "parameters": {"weight": 0.3}},
                                                  {"model": "m1", "parameters": {"weight": 0.7}}]}
    (tmp_path / "best.yaml").write_text(yaml.safe_dump(recipe))
    module = load_source(str(tmp_path / "best.yaml"))
    a, b = load_source(str(folders["m0"])), load_source(str(folders["m1"]))
    weight = "encoder.layer.1.output.dense.weight"
    expected = 0.3 * a.state_dict()[weight] + 0.7 * b.state_dict()[weight]
    torch.testing.assert_close(module.state_dict()[weight], expected)
    # checkpoints that also hold the non-persistent `position_ids` buffer (older BERTs, the
    # all-MiniLM-L6-v2 folder the text zoo uses) merge and load the same
    import json

    from safetensors.torch import load_file, save_file

    for name in ("m0", "m1"):
        path = folders[name] / "model.safetensors"
        tensors = load_file(str(path))
        positions = json.loads((folders[name] / "config.json").read_text())["max_position_embeddings"]
        tensors["embeddings.position_ids"] = torch.arange(positions)[None]
        save_file(tensors, str(path))
    with_positions = load_source(str(tmp_path / "best.yaml"))
    torch.testing.assert_close(with_positions.state_dict()[weight], expected)


def test_cli_dataflow_search_writes_a_routing_that_scores_as_recorded(tmp_path):
    from mergelab.eval.evaluator import ModelEvaluator
    from mergelab.eval.models import Classifier, load_model, read_head
    from mergelab.eval.sources import load_task

    folders = tiny_bert_folders(tmp_path)
    task = f"csv:{tmp_path / 'task.csv'}"
    config = {
        "models": [str(folders["m0"]), str(folders["m1"])],
        "search": {"space": "dataflow", "repeats": 2, "scaling": True, "trials": 5,
                   "sampler": "cmaes", "seed": 1,
                   "evaluator": {"tasks": {task: str(folders["m0"])}, "split": "validation"}},
    }
    path = tmp_path / "search.yml"
    path.write_text(yaml.safe_dump(config))
    done = CliRunner().invoke(app, ["search", "validate", str(path)])
    assert done.exit_code == 0, done.output
    assert "2 source(s) x 2 layers, repeated 2 time(s): 8 slots" in " ".join(done.output.split())
    out = tmp_path / "out"
    done = CliRunner().invoke(app, ["search", "run", str(path), "--out", str(out)])
    assert done.exit_code == 0, done.output
    for name in ("best_routing.yaml", "trials.csv", "curve.png", "routing.png"):
        assert (out / name).is_file(), name
    best = yaml.safe_load((out / "best_routing.yaml").read_text())
    trials = (out / "trials.csv").read_text().splitlines()
    assert len(trials) == 1 + 5
    # trial 0 is the start: m0's own two layers, unscaled
    import csv
    import json

    first = next(csv.DictReader(trials))
    assert json.loads(first["config"])["routing"]["layers"] == [
        {"model": 0, "layer": 0, "scale": 1.0}, {"model": 0, "layer": 1, "scale": 1.0}]
    # the recorded best value is the eval layer's validation accuracy of the loaded routing
    template = load_model(folders["m0"])
    routed = Classifier(load_routing(out / "best_routing.yaml"),
                        read_head(folders["m0"] / "head.safetensors"), template.tokenizer)
    scored = ModelEvaluator(seed=0).evaluate(routed, load_task(task), "validation")
    values = [float(r["value"]) for r in csv.DictReader(trials) if r["value"]]
    assert max(values) == pytest.approx(scored.score.value)
    assert best["routing"]["models"] == [str(folders["m0"]), str(folders["m1"])]


def test_bad_dataflow_configs_name_every_problem(tmp_path):
    from mergelab.search.run import read_search_config

    folders = tiny_bert_folders(tmp_path)
    three = transformers.BertConfig(vocab_size=14, hidden_size=8, num_hidden_layers=3,
                                    num_attention_heads=2, intermediate_size=16)
    transformers.BertModel(three).save_pretrained(tmp_path / "deep")
    config = {
        "merge_method": "ties",
        "models": [str(folders["m0"]), str(tmp_path / "deep")],
        "search": {"space": "dataflow", "repeats": 0, "scale_range": [1.5, 0.5], "host": 4,
                   "layer_groups": 2, "evaluator": "x:y"},
    }
    path = tmp_path / "search.yml"
    path.write_text(yaml.safe_dump(config))
    with pytest.raises(ConfigError) as caught:
        read_search_config(path)
    text = str(caught.value)
    assert "search.layer_groups: unknown key for a dataflow search" in text
    config["search"].pop("layer_groups")
    path.write_text(yaml.safe_dump(config))
    with pytest.raises(ConfigError) as caught:
        read_search_config(path)
    text = str(caught.value)
    assert "the data-flow sources need as many layers each; got m0 2, deep 3" in text
    config["models"] = [str(folders["m0"]), str(folders["m1"])]
    path.write_text(yaml.safe_dump(config))
    with pytest.raises(ConfigError) as caught:
        read_search_config(path)
    text = str(caught.value)
    for expected in ("search.repeats: a positive integer; got 0",
                     "search.scale_range: [low, high] with 0 <= low < high",
                     "search.host: the index of a source in `models` (0..1); got 4",
                     "merge_method: a data-flow search routes layers and merges nothing"):
        assert expected in text, expected
    with pytest.raises(MergeLabError, match="routing.layers.0.layer: 5 is not a layer"):
        routed_model({"routing": {"host": "a", "models": ["a"],
                                  "layers": [{"model": 0, "layer": 5}]}},
                     [load_source(str(folders["m0"]))])
    assert build_dataflow_space({"models": ["a"]}, {}, 2).size == 2 + 4
