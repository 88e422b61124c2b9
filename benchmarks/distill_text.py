"""Merging by distillation on the text zoo: the five fine-tunes distilled into one MiniLM student
(one head per task, `mergelab.distill`, SAM-CLIP's two stages, with and without a replay memory)
against the fine-tunes, the benchmark table's weight merges, ProDistill and the linear probe, with
95% bootstrap intervals over test examples; and the forgetting ablation on a zero-shot ability of
the pretrained sentence embedder.

    .venv/bin/python benchmarks/distill_text.py --recipes lpft,joint --seeds 0,1 --write-docs

For every recipe and seed of the text zoo:
- baselines and the data-free weight merges (grid point picked on validation) come from the
  benchmark runner (`mergelab_bench.bench.run_seed`);
- ProDistill (`mergelab.data_merge("prodistill", ...)`): per-layer coefficients distilled from
  `--prodistill-examples` training inputs per task (a seeded draw; the paper: 64);
- the students: each zoo fine-tune is written as a model folder (`mergelab finetune`'s format,
  a teacher); `mergelab.distill.distill` runs a config whose student starts from the pretrained
  MiniLM, with `--teacher-examples` training texts per teacher (a seeded draw from the task's
  training groups, as the fine-tunes' own; the zoo's test groups are never seen), the stages
  `--probe-steps` (heads only) then `--distill-steps` (encoder and heads), and a replay memory
  of `--replay-examples` texts (other training texts of the five tasks, none a teacher
  distils) at ratio `--replay-ratio`, or none;
- the ability: WordNet lemma retrieval from its gloss (`--probe-items` synsets whose glosses
  are in the part-of-speech task's *test* groups and in no supersense split, so no fine-tune
  and no replay memory saw them; each gloss embedded and matched by cosine against every
  item's lemma; correct when the nearest lemma is one of the synset's), measured for the
  pretrained model, every fine-tune, the weight merges and the students.
With `--validation-examples N` the students, the probe and the fine-tunes are also scored on
N validation examples per task (the zoo's larger validation draw): the split a choice between
variants is made on; the section also counts the validation and test texts that are among what
the students distil or replay for another task (the tasks share sources).
Students and teacher folders are cached in ~/.cache/mergelab/bench/distill (a killed run
resumes at the stage it reached). Results go to docs/benchmarks.md between this script's
markers with `--write-docs`.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import sys
import time
from pathlib import Path

import torch
from _common import digest, replace_docs_section

MARKER = "distill-text"
HEADING = "Merging by distillation: text zoo"
CACHE = Path(os.environ.get("MERGELAB_CACHE", Path.home() / ".cache" / "mergelab")) / "bench" / "distill"
WEIGHT_MERGES = ("task_arithmetic", "ties", "tsv", "tall_masks")
PROBE_ROWS = ("ties", "tsv")  # weight merges whose encoder the ability probe also scores
STUDENT_ROWS = {True: "distilled student, replay", False: "distilled student, no replay"}
CACHED_STUDENTS: list[str] = []  # students of this run read from the cache, not trained


# --- the ability: lemma retrieval from WordNet glosses ----------------------------------------------


def _lemma(word: str) -> str:
    """A WordNet data-file word as text: syntactic markers dropped, underscores as spaces."""
    return re.sub(r"\([a-z]+\)$", "", word).replace("_", " ").lower()


def wordnet_synsets() -> list[tuple[str, tuple[str, ...]]]:
    """(definition, lemmas) of every WordNet synset, the definition as the zoo's tasks read it."""
    from mergelab.eval.tasks import WORDNET_DIR, parse_wordnet_data_line

    synsets = []
    for part in ("noun", "verb", "adj", "adv"):
        with (WORDNET_DIR / f"data.{part}").open(encoding="utf-8", errors="replace") as handle:
            for line in handle:
                parsed = parse_wordnet_data_line(line)
                if parsed is None:
                    continue
                fields = line.split("|", 1)[0].split()
                count = int(fields[3], 16)
                lemmas = tuple(dict.fromkeys(_lemma(w) for w in fields[4 : 4 + 2 * count : 2]))
                synsets.append((parsed[2], lemmas))
    return synsets


def ability_items(count: int, split_seed: int, seed: int = 0) -> tuple[list[str], list[tuple[str, ...]]]:
    """`count` (gloss, lemmas) synsets no zoo fine-tune trained on (see the module docstring)."""
    from mergelab.eval.data import seeded_indices
    from mergelab.eval.tasks import resolve_task

    pos = resolve_task("pos").splits(split_seed)
    held_out = set(pos.test.texts)
    supersense = set(resolve_task("supersense").load().texts)
    candidates = [(g, lemmas) for g, lemmas in wordnet_synsets()
                  if g in held_out and g not in supersense and lemmas]  # fmt: skip
    unique = {}
    for gloss, lemmas in candidates:  # a gloss shared by two synsets: neither is an item
        unique[gloss] = None if gloss in unique else lemmas
    items = sorted((g, lemmas) for g, lemmas in unique.items() if lemmas is not None)
    chosen = seeded_indices(len(items), count, seed).tolist()
    return [items[i][0] for i in chosen], [items[i][1] for i in chosen]


class Ability:
    """Top-1 lemma retrieval from glosses by cosine similarity of mean-pooled embeddings."""

    def __init__(self, tokenizer, count: int, split_seed: int, max_length: int):
        self.glosses, self.lemmas = ability_items(count, split_seed)
        self.pool = sorted({lemma for lemmas in self.lemmas for lemma in lemmas})
        index = {lemma: i for i, lemma in enumerate(self.pool)}
        self.targets = [[index[lemma] for lemma in lemmas] for lemmas in self.lemmas]
        self.tokenizer, self.max_length = tokenizer, max_length

    @torch.no_grad()
    def correct(self, module: torch.nn.Module) -> torch.Tensor:
        from mergelab.eval.harness import embed_texts

        def embed(texts):
            features = embed_texts(module, self.tokenizer, texts, max_length=self.max_length)
            return torch.nn.functional.normalize(features, dim=-1)

        nearest = (embed(self.glosses) @ embed(self.pool).T).argmax(dim=1).tolist()
        return torch.tensor([n in t for n, t in zip(nearest, self.targets)])


# --- teachers, replay memory, students -------------------------------------------------------------


def teacher_folders(built, root: Path, split_seed: int, max_length: int) -> dict[str, Path]:
    """Each zoo fine-tune as the folder `mergelab finetune` writes (a distill teacher)."""
    from transformers import AutoModel, AutoTokenizer

    from mergelab.eval.harness import state_dict_hash
    from mergelab.eval.tasks import resolve_task
    from mergelab.fileio import atomic_folder
    from mergelab.training.folder import save_head, write_recipe
    from mergelab.training.to_folder import default_text_model

    base = default_text_model()
    folders = {}
    for task in built.tasks:
        folder = root / f"{built.recipe}-s{built.seed}-{task}-{state_dict_hash(built.finetuned[task])[:16]}"
        folders[task] = folder
        if folder.is_dir():
            continue
        model = AutoModel.from_pretrained(base, local_files_only=True)
        model.load_state_dict(built.finetuned[task])
        with atomic_folder(folder) as partial:
            model.save_pretrained(partial, safe_serialization=True)
            AutoTokenizer.from_pretrained(base, local_files_only=True).save_pretrained(partial)
            save_head(built.heads[task], partial / "head.safetensors")
            write_recipe(partial, {
                "format": 1, "task": task, "modality": "text", "base_model": str(base),
                "label_names": list(resolve_task(task).label_names),
                "data": {"split_seed": split_seed, "max_length": max_length},
                "zoo": {"recipe": built.recipe, "seed": built.seed},
            })  # fmt: skip
    return folders


def replay_file(tasks, teacher_texts: set[str], count: int, split_seed: int, path: Path) -> Path:
    """`count` training texts of the tasks (equally many per task, a seeded draw) that no teacher
    distils, one per line."""
    from mergelab.eval.data import seeded_subset
    from mergelab.eval.tasks import resolve_task

    texts = []
    for task in tasks:
        train = resolve_task(task).splits(split_seed).train
        spare = train.subset([i for i, t in enumerate(train.texts)
                              if t not in teacher_texts and "\n" not in t and t.strip()])  # fmt: skip
        texts += list(seeded_subset(spare, count // len(tasks), seed=1).texts)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(t.strip() for t in texts) + "\n", encoding="utf-8")
    return path


def student_init(args, teachers: dict[str, Path], chosen: dict[str, str], root: Path) -> str:
    """The student's init: the pretrained MiniLM folder, or a merge config of the teachers
    (`--student-init tsv`/`ties`, at the grid point chosen on validation) merged in memory."""
    import yaml

    from mergelab.training.to_folder import default_text_model
    from mergelab_bench.bench import grid_for, merge_config

    base = str(default_text_model())
    if args.student_init == "pretrained":
        return base
    label = chosen[args.student_init]
    point = next(p for p in grid_for(args.student_init) if p.label == label)
    config = merge_config(args.student_init, point, list(teachers))
    for entry in config["models"]:
        entry["model"] = str(teachers[entry["model"]])
    config["base_model"] = base
    path = root / f"init-{digest(json.dumps(config, sort_keys=True))}.yml"
    root.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")
    return str(path)


def distill_config(args, teachers: dict[str, Path], replay: Path | None, seed: int, init: str) -> dict:
    # the default loss (cosine features, KL logits at temperature 2, weights 1) stays implicit,
    # so the config (and the cached student's name) is the one of a run without these options
    weights = {"feature_weight": args.feature_weight, "logit_weight": args.logit_weight}
    loss = {} if weights == {"feature_weight": 1.0, "logit_weight": 1.0} else {"loss": weights}
    if args.student_head != "new":  # likewise: the default head stays implicit
        loss["head"] = args.student_head
    config = {
        "seed": seed,
        "student": {"init": init},
        "teachers": [{"model": str(folder), "task": task, "examples": args.teacher_examples,
                      "validation_examples": 100, **loss} for task, folder in teachers.items()],
        "stages": [
            {"name": "probe", "steps": args.probe_steps, "train_backbone": False,
             "head_learning_rate": 1e-2, "batch_size": args.batch_size},
            {"name": "distill", "steps": args.distill_steps, "learning_rate": args.learning_rate,
             "head_learning_rate": 1e-3, "batch_size": args.batch_size, "warmup_steps": 10,
             "schedule": "linear"},
        ],
    }  # fmt: skip
    if replay is not None:
        config["replay"] = {"data": str(replay), "examples": args.replay_examples,
                            "ratio": args.replay_ratio}  # fmt: skip
        if args.replay_model == "pretrained":  # the default (the init's own) stays implicit
            from mergelab.training.to_folder import default_text_model

            config["replay"]["model"] = str(default_text_model())
    return config


def distilled_texts(config: dict, split_seed: int) -> set[str]:
    """Every training text a teacher of `config` distils (the draws `mergelab.distill` makes)."""
    from mergelab.distill.config import DistillConfig, teacher_splits
    from mergelab.eval.tasks import resolve_task

    checked = DistillConfig(**config)
    texts = set()
    for teacher in checked.teachers:
        train, _ = teacher_splits(teacher, resolve_task(teacher.task), split_seed, checked.seed)
        texts |= set(train.texts)
    return texts


def run_student(config: dict, root: Path) -> tuple[Path, dict]:
    """The student of `config` (cached by the config's hash; a killed run resumes)."""
    import yaml

    from mergelab.distill import distill
    from mergelab.distill.run import REPORT_FILE

    key = digest(json.dumps(config, sort_keys=True))
    out = root / f"student-{key}"
    if (out / REPORT_FILE).is_file():
        CACHED_STUDENTS.append(out.name)
    else:
        root.mkdir(parents=True, exist_ok=True)
        path = root / f"student-{key}.yml"
        path.write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")
        distill(path, out, progress=False)
    return out, json.loads((out / REPORT_FILE).read_text())


def student_encoder_and_heads(folder: Path):
    from safetensors.torch import load_file

    from mergelab.checkpoint.heads import folder_heads
    from mergelab.training.folder import load_head

    encoder = load_file(str(folder / "model.safetensors"))
    return encoder, {h.task: load_head(h.path) for h in folder_heads(folder)}


def prodistill_encoder(args, built, seed: int):
    """ProDistill's merged encoder and the examples per task it used."""
    import mergelab
    from mergelab_bench.data_aware_zoos import ZooData

    adapter = ZooData(built)
    tasks = list(built.tasks)
    data = {t: adapter.task_data(t, "train", args.prodistill_examples, 16) for t in tasks}
    result = mergelab.data_merge(
        "prodistill", adapter.module(), {t: built.finetuned[t] for t in tasks}, data,
        base_state_dict=built.pretrained, generator=torch.Generator().manual_seed(seed),
        examples=args.prodistill_examples, steps=args.prodistill_steps, lr=0.01, batch_size=16,
        seed=seed,
    )  # fmt: skip
    return {**built.pretrained, **result.state_dict}, max(result.examples.values())


class Validation:
    """Scores on a larger validation draw of one recipe and seed (`built`: the zoo built with
    `validation_examples`): the probe, the fine-tunes and the students given to `score`."""

    def __init__(self, built):
        from mergelab_bench.bench import FINETUNED_ROW, PROBE_ROW

        self.built, self.tasks = built, list(built.tasks)
        self.results: dict[str, dict[str, float]] = {}
        self.examples: dict[str, dict[str, torch.Tensor]] = {}
        self.score(PROBE_ROW, built.pretrained, built.probe_heads)
        self.examples[FINETUNED_ROW], self.results[FINETUNED_ROW] = {}, {}
        for task in self.tasks:
            self.results[FINETUNED_ROW].update(self._evaluate(
                built.finetuned[task], {task: built.heads[task]}, [task], self.examples[FINETUNED_ROW]))

    def _evaluate(self, encoder, heads, tasks, examples):
        from mergelab.eval.harness import evaluate_model

        return evaluate_model(self.built.evaluator, encoder, heads, tasks=tasks, split="validation",
                              examples=examples)  # fmt: skip

    def score(self, row: str, encoder, heads) -> None:
        self.examples[row] = {}
        self.results[row] = self._evaluate(encoder, heads, self.tasks, self.examples[row])
        mean = sum(self.results[row].values()) / len(self.tasks)
        print(f"  {row}: validation {100 * mean:.1f}%", flush=True)


def shared_texts(built, texts: set[str], split: str) -> dict[str, int]:
    """Per task of `built`, how many texts of its `split` are also in `texts` (what the
    students distil or replay). The tasks share sources (Rotten Tomatoes snippets are in
    sentiment and subjectivity, SemCor sentences in supersense and pos), so another task's
    training texts hold some of a task's validation and test texts, unlabelled for that task."""
    stripped = {t.strip() for t in texts}
    return {task: len(stripped & {t.strip() for t in built.evaluator.split(task, split).texts})
            for task in built.tasks}  # fmt: skip


# --- the run ------------------------------------------------------------------------------------


def gain_line(rows, args) -> str:
    """The fine-tuning gain over the probe each student keeps, beside the weight merges' best."""
    by_name = {r.name: r for r in rows}

    def kept(name):
        row = by_name.get(name)
        return None if row is None or row.retained_gain is None else 100 * row.retained_gain.mean

    merges = {name: kept(name) for name in by_name if name.split(" ")[0] in (*WEIGHT_MERGES, "prodistill")}
    merges = {n: v for n, v in merges.items() if v is not None}
    best = max(merges, key=merges.get) if merges else None
    parts = [f"{name} keeps {kept(name):.0f}% of the fine-tuning gain over the probe"
             for name in STUDENT_ROWS.values() if kept(name) is not None]  # fmt: skip
    if best is not None:
        parts.append(f"the weight merge that keeps most, {best}, {merges[best]:.0f}%")
    return "Gain kept (mean over seeds; the aim is 90%): " + "; ".join(parts) + "."


def run(args) -> str:
    from mergelab.eval.bootstrap import bootstrap_interval
    from mergelab.eval.harness import (
        aggregate_rows,
        correctness_from_bits,
        default_result_cache,
        evaluate_model,
        interval_text,
        markdown_table,
        summarise,
    )
    from mergelab.training.to_folder import load_text_encoder
    from mergelab_bench.bench import (
        CELLS_NOTE,
        FINETUNED_ROW,
        PROBE_ROW,
        grid_for,
        machine_note,
        merge_zoo,
        run_seed,
        test_size_note,
    )
    from mergelab_bench.zoo.registry import get_zoo, test_examples_option
    from mergelab_bench.zoo.text import TextZooSettings

    started, load_at_start = time.perf_counter(), os.getloadavg()[0]
    zoo = get_zoo("text", **test_examples_option(args.test_examples))
    settings = TextZooSettings()
    cache = default_result_cache()
    tokenizer, _ = load_text_encoder()
    ability = Ability(tokenizer, args.probe_items, settings.split_seed, settings.max_length)
    sections, sizes_seen, costs = [], [], []
    ability_rows: dict[str, list[torch.Tensor]] = {}

    def ability_of(row: str, module) -> None:
        correct = ability.correct(module)
        ability_rows.setdefault(row, []).append(correct)
        print(f"  ability, {row}: {100 * correct.float().mean():.1f}%", flush=True)

    # the students on a larger validation draw (the zoo's own validation split, a superset of
    # the default draw), to choose between variants; the test rows stay on `zoo`
    validation_zoo = (None if args.validation_examples is None
                      else get_zoo("text", validation_examples=args.validation_examples))  # fmt: skip
    overlaps: list[dict[str, dict[str, int]]] = []  # per recipe and seed, per split and task
    for recipe in args.recipes.split(","):
        per_seed_rows, per_seed_examples, choices = [], [], {}
        validation_rows, validation_examples = [], []
        for seed in (int(s) for s in args.seeds.split(",")):
            print(f"text zoo, recipe {recipe}, seed {seed}", flush=True)
            built = zoo.build(recipe=recipe, seed=seed, progress=False)
            tasks = list(built.tasks)
            seed_result = run_seed(built, list(WEIGHT_MERGES), log=print, cache=cache, repair=False)
            results = dict(seed_result.results)
            for name, outcome in seed_result.outcomes.items():
                choices.setdefault(name, []).append(outcome.chosen)
            outcomes = {row: {t: correctness_from_bits(b) for t, b in by_task.items()}
                        for row, by_task in seed_result.examples.items()}  # fmt: skip

            def score(row, encoder, heads, results=results, outcomes=outcomes, built=built, tasks=tasks):
                outcomes[row] = {}
                results[row] = evaluate_model(built.evaluator, encoder, heads, tasks=tasks,
                                              cache=cache, examples=outcomes[row])  # fmt: skip
                print(f"  {row}: test {100 * sum(results[row].values()) / len(tasks):.1f}%", flush=True)

            module = built.evaluator.module
            tag = f"{recipe}, seed {seed}"
            ability_of(f"pretrained ({tag})", module(built.pretrained))
            for task in tasks:
                ability_of(f"{task} fine-tune ({tag})", module(built.finetuned[task]))
            for name in PROBE_ROWS:
                chosen = seed_result.outcomes[name].chosen
                point = next(p for p in grid_for(name) if p.label == chosen)
                ability_of(f"{name} ({tag})", module(merge_zoo(built, name, point)))

            if args.prodistill_examples:
                tick = time.perf_counter()
                merged, used = prodistill_encoder(args, built, seed)
                row = f"prodistill ({used} examples/task)"
                score(row, merged, built.heads)
                costs.append((row, recipe, seed, time.perf_counter() - tick))
                ability_of(f"prodistill ({tag})", module(merged))

            teachers = teacher_folders(built, CACHE / "teachers", settings.split_seed, settings.max_length)
            init = student_init(args, teachers, {n: o.chosen for n, o in seed_result.outcomes.items()},
                                CACHE / "inits")  # fmt: skip
            teacher_texts = distilled_texts(distill_config(args, teachers, None, seed, init), settings.split_seed)
            replay = replay_file(tasks, teacher_texts, args.replay_examples, settings.split_seed,
                                 CACHE / f"replay-{recipe}-s{seed}-{args.replay_examples}.txt")  # fmt: skip
            if validation_zoo is not None:
                validation = Validation(validation_zoo.build(recipe=recipe, seed=seed, progress=False))
                seen = teacher_texts | set(replay.read_text(encoding="utf-8").splitlines())
                overlaps.append({"validation": shared_texts(validation.built, seen, "validation"),
                                 "test": shared_texts(built, seen, "test")})  # fmt: skip
            for with_replay in {"both": (True, False), "with": (True,), "without": (False,)}[args.replay]:
                config = distill_config(args, teachers, replay if with_replay else None, seed, init)
                tick = time.perf_counter()
                folder, report = run_student(config, CACHE / "students")
                encoder, heads = student_encoder_and_heads(folder)
                # the folder also carries the base's non-persistent buffers (position ids)
                encoder = {k: encoder[k] for k in built.pretrained}
                score(STUDENT_ROWS[with_replay], encoder, heads)
                costs.append((STUDENT_ROWS[with_replay], recipe, seed, report.get("seconds", time.perf_counter() - tick)))
                ability_of(f"{STUDENT_ROWS[with_replay]} ({tag})", module(encoder))
                if validation_zoo is not None:
                    validation.score(STUDENT_ROWS[with_replay], encoder, heads)
            if validation_zoo is not None:
                validation_rows.append(summarise(validation.results, finetuned=validation.results[FINETUNED_ROW],
                                                 probe=validation.results[PROBE_ROW]))  # fmt: skip
                validation_examples.append(validation.examples)
            per_seed_rows.append(summarise(results, finetuned=results[FINETUNED_ROW],
                                           probe=results[PROBE_ROW]))  # fmt: skip
            per_seed_examples.append(outcomes)
            sizes_seen.append(outcomes[FINETUNED_ROW])
        notes = {name: "; ".join(labels) for name, labels in choices.items()}
        rows = aggregate_rows(per_seed_rows, notes, per_seed_examples)
        sections += [f"### recipe `{recipe}`", "", markdown_table(rows), "", gain_line(rows, args), ""]
        if validation_rows:
            sections += [f"Validation split, {args.validation_examples} examples per task (the "
                         "zoo's validation groups of each task, which its teacher and fine-tune "
                         "never train on; what a choice between student variants is made on):", "",
                         markdown_table(aggregate_rows(validation_rows, {}, validation_examples)), ""]  # fmt: skip
    if overlaps:
        def most(split):
            return ", ".join(f"{t} {max(o[split][t] for o in overlaps)}" for t in overlaps[0][split])

        sections += [
            "Texts shared across tasks (the largest count over recipes and seeds): the tasks "
            "share sources (Rotten Tomatoes snippets are in sentiment and subjectivity, SemCor "
            "sentences in supersense and pos), so the texts the students distil or replay for "
            "one task include some of another task's validation and test texts, labelled for "
            f"their own task only: validation {most('validation')}; test {most('test')} (of "
            f"{args.validation_examples} validation texts per task and the test texts scored). The "
            "fine-tunes and the data-aware merges see the same cross-task texts.", ""]

    ability_lines = ["| model (recipe, seed) | lemma retrieval top-1 |", "|---|---:|"]
    for row, corrects in ability_rows.items():
        mean = torch.stack([c.double() for c in corrects]).mean(dim=0)
        ability_lines.append(f"| {row} | {100 * mean.mean():.1f}{interval_text(bootstrap_interval(mean))} |")
    cost_lines = ["| model | recipe | seed | seconds |", "|---|---|---:|---:|"]
    cost_lines += [f"| {row} | {recipe} | {seed} | {seconds:.0f} |" for row, recipe, seed, seconds in costs]
    wall = time.perf_counter() - started
    body = "\n".join([
        f"Reproduce: `{args.command}`",
        "",
        f"Wall time {wall / 60:.1f} min"
        + (f" ({len(CACHED_STUDENTS)} students read from the cache of an earlier run; their "
           "seconds below are that run's)" if CACHED_STUDENTS else "")
        + f", {machine_note(load_at_start)}. " + CELLS_NOTE + " "
        + test_size_note(sizes_seen),
        "",
        f"Students: {'MiniLM (pretrained)' if args.student_init == 'pretrained' else 'the ' + args.student_init + ' merge of the fine-tunes (its grid point chosen on validation)'} "
        f"with one head per task ({'a copy of the teacher' + chr(39) + 's head at the start' if args.student_head == 'teacher' else 'new, randomly initialised'}), "
        f"distilled from the five fine-tunes (each teacher's mean-pooled "
        f"features by cosine, weight {args.feature_weight:g}, its logits by KL at temperature 2, "
        f"weight {args.logit_weight:g}), "
        f"{args.teacher_examples} training texts per teacher (a seeded draw from the task's "
        f"training groups), {args.probe_steps} head-probing steps then {args.distill_steps} steps "
        f"of encoder and heads (lr {args.learning_rate:g}, heads 1e-3, batch {args.batch_size}); "
        f"replay: {args.replay_examples} other training texts of the five tasks, "
        + ("the pretrained MiniLM's" if args.replay_model == "pretrained" else "the student init's own")
        + f" features on them, ratio {args.replay_ratio:g}. ProDistill: "
        f"{args.prodistill_examples} training inputs per task, {args.prodistill_steps} steps per "
        "layer. Weight merges: grid point picked on validation (mergelab_bench.bench.GRIDS); "
        "`tall_masks` keeps a binary mask per task.",
        "",
        *sections,
        f"Forgetting: WordNet lemma retrieval from its gloss, {len(ability.glosses)} synsets whose "
        f"glosses no fine-tune, teacher or replay memory saw (part-of-speech test groups, no "
        f"supersense text), nearest of {len(ability.pool)} lemmas by cosine; 95% bootstrap "
        "interval over synsets.",
        "",
        *ability_lines,
        "",
        "Cost (seconds of the merge or of the whole distillation, teacher outputs included):",
        "",
        *cost_lines,
        "",
    ])
    if args.write_docs:
        heading = HEADING if args.student_init == "pretrained" else (
            f"{HEADING}, student initialised from the {args.student_init} merge")
        if args.student_head == "teacher":  # a variant's section must not repeat another's title
            heading += ", heads copied from the teachers"
        if args.replay_model == "pretrained":
            heading += ", replaying the pretrained model"
        replace_docs_section(args.docs_marker, body, heading=heading)
    return body


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipes", default="lpft,joint")
    parser.add_argument("--seeds", default="0,1")
    parser.add_argument("--teacher-examples", type=int, default=1000)
    parser.add_argument("--student-init", choices=("pretrained", "tsv", "ties"), default="pretrained",
                        help="the student's init: MiniLM, or the weight merge (grid point chosen on "
                        "validation) merged in memory")
    parser.add_argument("--student-head", choices=("new", "teacher"), default="new",
                        help="the student's head per task: new, or a copy of the teacher's")
    parser.add_argument("--feature-weight", type=float, default=1.0, help="weight of the cosine feature loss")
    parser.add_argument("--logit-weight", type=float, default=1.0, help="weight of the KL logit loss (T 2)")
    parser.add_argument("--replay", choices=("both", "with", "without"), default="both",
                        help="students with and/or without the replay memory")
    parser.add_argument("--docs-marker", default=MARKER, help="docs/benchmarks.md section to write")
    parser.add_argument("--probe-steps", type=int, default=50)
    parser.add_argument("--distill-steps", type=int, default=200)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--learning-rate", type=float, default=5e-5)
    parser.add_argument("--replay-model", choices=("init", "pretrained"), default="init",
                        help="whose features the replay memory keeps: the student init's, or "
                        "the pretrained MiniLM's (for a student initialised from a merge)")
    parser.add_argument("--replay-examples", type=int, default=500)
    parser.add_argument("--replay-ratio", type=float, default=0.3)
    parser.add_argument("--prodistill-examples", type=int, default=64, help="0: no ProDistill row")
    parser.add_argument("--prodistill-steps", type=int, default=100)
    parser.add_argument("--probe-items", type=int, default=1000, help="synsets of the ability probe")
    parser.add_argument("--test-examples", type=int, default=None)
    parser.add_argument("--validation-examples", type=int, default=None,
                        help="also score the students on this many validation examples per task "
                             "(the zoo's larger validation draw), to choose a variant")
    parser.add_argument("--write-docs", action="store_true")
    args = parser.parse_args(argv)
    args.command = "python benchmarks/distill_text.py " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:]))
    print(run(args))


if __name__ == "__main__":
    main()
