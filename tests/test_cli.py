"""The `mergelab` command tree and the conventions every command shares (mergelab.cliutil)."""

from __future__ import annotations

import pytest
import typer
from typer.main import get_command
from typer.testing import CliRunner

from mergelab.cli import app
from mergelab.cliutil import cli_message, command_group, fail, output_path, parse_seeds
from mergelab.errors import ConfigError, MergeLabError


def _commands(group, prefix: tuple[str, ...] = ()):
    """(path, command) of every leaf command under `group` (typer's command objects)."""
    for name, command in sorted(group.commands.items()):
        if hasattr(command, "commands"):
            yield from _commands(command, (*prefix, name))
        else:
            yield (*prefix, name), command


def _tree() -> dict:
    return {" ".join(path): command for path, command in _commands(get_command(app))}


def _options(command):
    return [p for p in command.params if p.param_type_name == "option"]


def _annotation(option):
    return option.type_descriptor.annotation


def test_the_command_tree_is_nouns_with_verbs():
    tree = _tree()
    for path in (
        "merge", "validate", "methods", "inspect", "align run", "align validate",
        "diagnose report", "diagnose study", "bench run", "zoo build", "zoo list",
        "multimodal recipe",
    ):  # fmt: skip
        assert path in tree, sorted(tree)
    for old in ("diagnose-study", "bench", "diagnose"):
        assert old not in tree


def test_seed_is_one_integer_and_seeds_are_many_everywhere():
    seen = set()
    for path, command in _tree().items():
        for param in _options(command):
            if "--seed" in param.opts:
                seen.add("seed")
                assert _annotation(param) is int, path
                assert not param.multiple and param.nargs == 1, path
            if "--seeds" in param.opts:
                seen.add("seeds")
                # a string that parse_seeds reads ("0,1", "0-2"), never a single int
                assert _annotation(param) is str, path
                assert not param.multiple and param.nargs == 1, path
            assert not {"--seed-list", "--random-seed", "--random-seeds"} & set(param.opts), path
    assert seen == {"seed", "seeds"}


def test_every_output_option_is_called_out():
    outputs = 0
    for path, command in _tree().items():
        for param in _options(command):
            if param.hidden:
                continue
            longs = [o for o in param.opts if o.startswith("--")]
            if any(o.startswith(("--out", "--output")) for o in longs):
                if longs == ["--out-shard-size"]:
                    continue  # a size, not an output
                outputs += 1
                assert longs == ["--out"] and "-o" in param.opts, (path, param.opts)
    assert outputs >= 8


def test_parse_seeds_lists_and_ranges():
    assert parse_seeds("0,1") == [0, 1]
    assert parse_seeds("0-2") == [0, 1, 2]
    assert parse_seeds(" 3, 5-6 ") == [3, 5, 6]
    with pytest.raises(MergeLabError, match="'a' is not an integer"):
        parse_seeds("0,a")
    with pytest.raises(MergeLabError, match="at least one seed"):
        parse_seeds(",")


def _invoke(function, *args):
    demo = typer.Typer()

    @demo.command()
    def main() -> None:
        function(*args)

    @demo.command()
    def other() -> None:  # two commands: `main` stays a subcommand
        pass

    return CliRunner().invoke(demo, ["main"])


def test_the_error_printer_format():
    result = _invoke(fail, ConfigError(["models.0: no such file", "merge_method: unknown"], "c.yml"))
    assert result.exit_code == 1
    assert result.stdout == ""
    assert result.stderr == (
        "error: 2 problem(s) in c.yml:\n  - models.0: no such file\n  - merge_method: unknown\n"
    )
    long = _invoke(fail, "x" * 300)  # one logical line, never wrapped at the terminal width
    assert long.stderr == "error: " + "x" * 300 + "\n"


def test_library_messages_speak_cli():
    assert cli_message("folder x exists (pass overwrite=True to replace)") == (
        "folder x exists (pass --overwrite to replace)"
    )
    assert cli_message("pass allow_nonfinite=True") == "pass --allow-nonfinite"
    assert cli_message("pass progress=False") == "pass --no-progress"
    assert cli_message("weight=True is stored") == "weight=True is stored"


def test_merge_refuses_an_existing_output_with_the_cli_flag(tmp_path):
    import torch
    from safetensors.torch import save_file

    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        save_file({"w": torch.ones(2, 2)}, tmp_path / name / "model.safetensors")
    config = tmp_path / "c.yml"
    config.write_text(
        "merge_method: linear\nmodels:\n"
        "  - {model: a, parameters: {weight: 1.0}}\n  - {model: b, parameters: {weight: 1.0}}\n"
    )
    out = tmp_path / "out"
    runner = CliRunner()
    assert runner.invoke(app, ["merge", str(config), "--out", str(out), "--no-progress"]).exit_code == 0
    again = runner.invoke(app, ["merge", str(config), "-o", str(out), "--no-progress"])
    assert again.exit_code == 1
    assert again.stderr.startswith("error: ") and "pass --overwrite to replace" in again.stderr
    assert "overwrite=True" not in again.stderr
    # mergekit's `CONFIG OUT` still works (a hidden alias); both spellings at once must agree.
    legacy = runner.invoke(app, ["merge", str(config), str(tmp_path / "o2"), "--no-progress"])
    assert legacy.exit_code == 0 and (tmp_path / "o2" / "model.safetensors").is_file()
    both = runner.invoke(app, ["merge", str(config), str(tmp_path / "o3"), "--out", str(tmp_path / "o4")])
    assert both.exit_code == 1 and "give the output once" in both.stderr
    neither = runner.invoke(app, ["merge", str(config)])
    assert neither.exit_code == 1 and "missing option --out" in neither.stderr


def test_output_path_prefers_the_one_given(tmp_path):
    assert output_path(tmp_path, None) == tmp_path
    assert output_path(None, tmp_path) == tmp_path
    assert output_path(tmp_path, tmp_path) == tmp_path


def test_command_group_is_get_or_create():
    root = typer.Typer()
    first = command_group(root, "tools", "Tools.")
    assert command_group(root, "tools", "Other help.") is first
    assert len(root.registered_groups) == 1
    assert command_group(root, "more", "More.") is not first


def test_no_module_switches_the_process_offline():
    """Importing every module of mergelab and mergelab_bench, and loading a text encoder from
    disk, leave HF_HUB_OFFLINE / TRANSFORMERS_OFFLINE as the user set them (loads from disk use
    local_files_only=True instead). Run in a fresh interpreter: imports are cached here."""
    import subprocess
    import sys
    import textwrap

    script = textwrap.dedent(
        """
        import importlib, os, pkgutil
        import mergelab, mergelab_bench
        before = {k: os.environ.get(k) for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
        names = []
        for package in (mergelab, mergelab_bench):
            for info in pkgutil.walk_packages(package.__path__, package.__name__ + "."):
                importlib.import_module(info.name)
                names.append(info.name)
        assert len(names) > 40, names
        after_import = {k: os.environ.get(k) for k in before}
        assert after_import == before, ("import", after_import)
        try:
            from mergelab.training.to_folder import load_text_encoder
            load_text_encoder()
        except mergelab.errors.MergeLabError:
            pass  # the packaged MiniLM is not installed: the import check above still ran
        after_load = {k: os.environ.get(k) for k in before}
        assert after_load == before, ("load", after_load)
        print("ok", len(names))
        """
    )
    env = {k: v for k, v in __import__("os").environ.items()
           if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.startswith("ok")
