"""mergekit configs run unchanged through mergelab and mergekit 0.1.5, outputs compared.

    .venv/bin/python benchmarks/mergekit_configs.py            # table printed, docs/benchmarks.md updated
    .venv/bin/python benchmarks/mergekit_configs.py --only 'tok*' --no-docs

The corpus is `benchmarks/mergekit_configs/*.yml`: configs in the shapes found in mergekit's
examples and in published model cards (TIES/DARE/DELLA recipes, gradient SLERP, passthrough
frankenmerges, `modules:`, the tokenizer section, chat templates, multi-document files),
written for this corpus. Their model names are remapped to tiny local checkpoints built here
(benchmarks/_common.build_family("llama"): a 4-layer Llama with a word tokenizer), by
`REMAP`; two of them add chat and tool tokens to their tokenizers (and rows to their
embeddings and heads), for the vocabulary configs.

Each config runs through `mergekit-yaml CONFIG OUT --device cpu --random-seed 0` (multi-document
files through `mergekit-multi`) and `mergelab.merge(CONFIG, OUT, seed=0)`. The table: whether
each tool ran, and for deterministic methods the largest difference over every tensor
(max |mergelab - mergekit| / max |mergekit|, per tensor, in float32). Vocabulary tensors are
compared row by row through the tokens (the two tools may order a union differently).
Randomised methods (DARE, DELLA) draw different masks in each tool: their row reports the
ratio of |merged - base| norms instead.
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import REPO_ROOT, WORK_DIR, build_family, load_folder, run  # noqa: E402

CORPUS = Path(__file__).resolve().parent / "mergekit_configs"
DOCS_FILE = REPO_ROOT / "docs" / "benchmarks.md"
SECTION = "## mergekit configs run unchanged"
# Agreement "to rounding": two units in the last place of the output dtype, relative to the
# tensor's largest magnitude (float32: 1e-5, as benchmarks/parity_mergekit.py).
TOLERANCE = {"float32": 1e-5, "float16": 2 * 2.0**-10, "bfloat16": 2 * 2.0**-7}

# Model names of the corpus -> role in the tiny family (see `_build`).
REMAP = {
    "mistralai/Mistral-7B-v0.1": "base",
    "mistralai/Mistral-7B-Instruct-v0.2": "ft1",
    "BioMistral/BioMistral-7B": "ft2",
    "WizardLM/WizardMath-7B-V1.1": "ft3",
    "teknium/OpenHermes-2.5-Mistral-7B": "ft1_chat",
    "NousResearch/Hermes-2-Pro-Mistral-7B": "ft2_tools",
}
ADDED_TOKENS = {
    "ft1_chat": ("ft1", ["<|im_start|>", "<|im_end|>"]),
    "ft2_tools": ("ft2", ["<tool_call>", "<|im_end|>", "</tool_call>", "<|im_start|>"]),
}
RANDOMIZED = {"dare_ties", "dare_linear", "della", "della_linear"}


def _build(root: Path) -> dict[str, Path]:
    family = build_family("llama", root)
    roles = {"base": family.base, **{f"ft{i + 1}": p for i, p in enumerate(family.variants)}}
    for role, (parent, tokens) in ADDED_TOKENS.items():
        folder = root / role
        if not (folder / ".complete").exists():
            _with_added_tokens(roles[parent], folder, tokens, seed=len(role))
        roles[role] = folder
    return roles


def _with_added_tokens(src: Path, folder: Path, tokens: list[str], seed: int) -> None:
    """A copy of `src` whose tokenizer adds `tokens` (special), with new embedding/head rows."""
    from safetensors.torch import save_file
    from transformers import AutoTokenizer

    shutil.rmtree(folder, ignore_errors=True)
    shutil.copytree(src, folder)
    tok = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    tok.add_tokens(tokens, special_tokens=True)
    tok.save_pretrained(str(folder))
    state = load_folder(folder)
    gen = torch.Generator().manual_seed(seed)
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        if name in state:
            extra = 0.02 * torch.randn(len(tokens), state[name].shape[1], generator=gen)
            state[name] = torch.cat([state[name], extra.to(state[name].dtype)])
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
    config = json.loads((folder / "config.json").read_text())
    config["vocab_size"] = len(tok)
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    (folder / ".complete").write_text("ok")


def _remapped(config: Path, roles: dict[str, Path], out: Path) -> Path:
    """The config with every model name of REMAP replaced by its local folder (text replace,
    so every place a name occurs, `tokens:` sources included, is remapped alike)."""
    text = config.read_text()
    for name, role in sorted(REMAP.items(), key=lambda kv: -len(kv[0])):
        text = text.replace(name, str(roles[role]))
    out.write_text(text)
    return out


@dataclass
class Row:
    name: str
    method: str
    mergekit: str
    mergelab: str
    difference: str
    note: str = ""
    float32: str | None = None  # the difference with the config run in float32
    tolerance: float = TOLERANCE["float32"]


def _vocab(folder: Path) -> dict[str, int] | None:
    if not (folder / "tokenizer.json").exists() and not (folder / "tokenizer_config.json").exists():
        return None
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(folder), local_files_only=True).get_vocab()


def _compare(ours: Path, theirs: Path, base: Path | None, randomized: bool) -> tuple[str, str]:
    a, b = load_folder(ours), load_folder(theirs)
    if a.keys() != b.keys():
        return "keys differ", f"only mergelab: {sorted(a.keys() - b.keys())}; only mergekit: {sorted(b.keys() - a.keys())}"
    va, vb = _vocab(ours), _vocab(theirs)
    notes = []
    if va is not None and vb is not None and va.keys() != vb.keys():
        return "vocabularies differ", f"{len(va)} vs {len(vb)} tokens"
    if randomized and base is not None:
        ref = load_folder(base)
        num = sum(float((a[k].float() - ref[k].float()).norm()) ** 2 for k in a if k in ref and a[k].shape == ref[k].shape)
        den = sum(float((b[k].float() - ref[k].float()).norm()) ** 2 for k in b if k in ref and b[k].shape == ref[k].shape)
        return f"norm ratio {num ** 0.5 / den ** 0.5:.4f}", "random masks differ: |merged - base| compared"
    worst, where = 0.0, ""
    for name in a:
        x, y = a[name].float(), b[name].float()
        if va is not None and vb is not None and x.shape[0] >= len(va) and name.endswith(
                ("embed_tokens.weight", "lm_head.weight")):
            order = sorted(va, key=va.get)
            index_a = torch.tensor([va[t] for t in order])
            index_b = torch.tensor([vb[t] for t in order])
            if va != vb:
                notes.append("union ordered differently; rows compared by token")
            x = torch.cat([x[index_a], x[len(va):]])
            y = torch.cat([y[index_b], y[len(vb):]])
        if x.shape != y.shape:
            return "shapes differ", f"{name}: {list(x.shape)} vs {list(y.shape)}"
        scale = float(y.abs().max()) or 1.0
        diff = float((x - y).abs().max()) / scale
        if diff > worst:
            worst, where = diff, name
    note = "; ".join(sorted(set(notes)))
    if worst > 0:
        note = f"largest at {where}" + (f"; {note}" if note else "")
    return f"{worst:.1e}", note


def _mergekit_bin(explicit: str | None) -> Path:
    if explicit:
        return Path(explicit)
    bench = REPO_ROOT / ".bench-venv" / "bin"
    return bench if (bench / "mergekit-yaml").exists() else Path(sys.executable).parent


def _as_float32(local: Path) -> Path:
    """The config with every document merging and writing in float32."""
    documents = [d for d in yaml.safe_load_all(local.read_text()) if d]
    for doc in documents:
        doc["dtype"] = "float32"
        doc.pop("out_dtype", None)
    out = local.with_name(local.stem + "-float32.yml")
    out.write_text(yaml.safe_dump_all(documents, sort_keys=False))
    return out


def run_case(config: Path, roles: dict[str, Path], work: Path, bin_dir: Path,
             float32: bool = False) -> Row:
    import mergelab

    case = work / (config.stem + ("-float32" if float32 else ""))
    shutil.rmtree(case, ignore_errors=True)
    case.mkdir(parents=True)
    local = _remapped(config, roles, case / config.name)
    if float32:
        local = _as_float32(local)
    documents = [d for d in yaml.safe_load_all(local.read_text()) if d]
    moe = "experts" in documents[0]  # a mergekit-moe config
    method = (f"moe ({documents[0].get('gate_mode', 'hidden')})" if moe
              else " -> ".join(d.get("merge_method", "?") for d in documents))
    if moe:
        cmd = [bin_dir / "mergekit-moe", local, case / "mergekit", "--device", "cpu",
               "--random-seed", "0"]
    elif len(documents) > 1:
        cmd = [bin_dir / "mergekit-multi", local, "--intermediate-dir", case / "mk-stages",
               "--out-path", case / "mergekit", "--device", "cpu", "--random-seed", "0"]
    else:
        cmd = [bin_dir / "mergekit-yaml", local, case / "mergekit", "--device", "cpu",
               "--random-seed", "0"]
    theirs = run(cmd, timeout=900)
    try:
        build = mergelab.moe if moe else mergelab.merge
        build(local, case / "mergelab", seed=0, progress=False)
        ours_ok, ours_error = True, ""
    except Exception as exc:  # noqa: BLE001 - the table reports any failure
        ours_ok, ours_error = False, " ".join(str(exc).split())[:200]
    row = Row(config.stem, method, "yes" if theirs.ok else "no", "yes" if ours_ok else "no", "-")
    if not theirs.ok:
        row.note = "mergekit: " + " ".join(theirs.tail(3).split())[:200]
    if not ours_ok:
        row.note = (row.note + "; " if row.note else "") + "mergelab: " + ours_error
    if theirs.ok and ours_ok:
        base_model = documents[-1].get("base_model")
        base = Path(base_model) if base_model else None
        randomized = documents[-1].get("merge_method") in RANDOMIZED or (
            moe and documents[0].get("gate_mode") in ("random", "uniform_random"))
        row.difference, row.note = _compare(case / "mergelab", case / "mergekit", base, randomized)
        dtype = documents[-1].get("out_dtype") or documents[-1].get("dtype") or "float32"
        row.tolerance = TOLERANCE.get(dtype, TOLERANCE["float32"])
        if moe and documents[0].get("gate_mode", "hidden").startswith("hidden"):
            # both tools run the base model in bfloat16 for the router rows
            row.tolerance = TOLERANCE["bfloat16"]
            row.note = "router rows from a bfloat16 forward pass in both tools; " + row.note
            return row
        if dtype != "float32" and not float32 and _too_far(row):
            # mergekit runs many kernels in the half-precision input dtype, mergelab in float32:
            # the same config in float32 separates that from the method.
            again = run_case(config, roles, work, bin_dir, float32=True)
            row.note = (f"in float32: {again.difference}"
                        + (f" ({again.note})" if again.note else "") + "; " + row.note).rstrip("; ")
            row.float32 = again.difference
    return row


def table(rows: list[Row]) -> str:
    lines = ["| config | method | runs in mergekit | runs in mergelab | max difference | note |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| `{r.name}` | {r.method} | {r.mergekit} | {r.mergelab} | {r.difference} | "
                     f"{r.note.replace('|', '/')} |")
    return "\n".join(lines)


def _merged_with_docs(rows: list[Row]) -> list[Row] | None:
    """The docs table's rows with `rows` replacing (or joining) those of their configs; None
    when the docs have no table yet or it lists a config the corpus no longer has."""
    text = DOCS_FILE.read_text(encoding="utf-8")
    if SECTION not in text:
        return None
    section = text[text.index(SECTION):]
    end = section.find("\n## ", len(SECTION))
    section = section if end == -1 else section[:end]
    old: dict[str, Row] = {}
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 6 and cells[0].startswith("`"):
            old[cells[0].strip("`")] = Row(cells[0].strip("`"), *cells[1:])
    names = {c.stem for c in CORPUS.glob("*.yml")}
    if set(old) - names:
        return None
    old.update({r.name: r for r in rows})
    return [old[n] for n in sorted(old)]


def _write_docs(rows: list[Row]) -> None:
    from mergelab.fileio import write_text_atomic

    both = sum(1 for r in rows if r.mergekit == "yes")
    ours = sum(1 for r in rows if r.mergekit == "yes" and r.mergelab == "yes")
    body = (
        f"{SECTION}\n\n"
        "Reproduce with `.venv/bin/python benchmarks/mergekit_configs.py` (CPU, offline). The "
        f"corpus (`benchmarks/mergekit_configs/`, {len(rows)} configs) holds configs in the shapes "
        "of mergekit's examples and published model cards, model names remapped to tiny local "
        "Llama checkpoints (4 layers, a word tokenizer; two of them add chat and tool tokens). "
        "Each runs through `mergekit-yaml` (`mergekit-multi` for multi-document files, "
        "`mergekit-moe` for MoE configs) and `mergelab merge` (`mergelab moe`). Max difference: max over tensors of "
        "max |mergelab - mergekit| / max |mergekit| in float32 (vocabulary rows matched by "
        "token); agreement to rounding is two units in the last place of the output dtype (float32: "
        "1e-5). A half-precision row beyond that is run again with `dtype: float32` in both "
        "tools (the note gives that difference): mergekit runs many kernels in the half-precision "
        "input dtype, mergelab in float32. Randomised methods draw different masks, so their row "
        "gives the ratio of the |merged - base| norms. Timings are not measured here. mergekit "
        f"ran {both} configs, mergelab ran {ours} of those.\n\n"
        + table(rows) + "\n"
    )
    text = DOCS_FILE.read_text(encoding="utf-8")
    if SECTION in text:
        start = text.index(SECTION)
        end = text.find("\n## ", start + len(SECTION))
        text = text[:start] + body + (text[end:] if end != -1 else "")
    else:
        text = text.rstrip("\n") + "\n\n" + body
    write_text_atomic(DOCS_FILE, text)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", default="*", help="glob over config names")
    parser.add_argument("--no-docs", action="store_true", help="do not update docs/benchmarks.md")
    parser.add_argument("--mergekit-bin", default=None,
                        help="folder holding mergekit-yaml (default: .bench-venv/bin, else this Python's)")
    args = parser.parse_args()
    work = WORK_DIR / "mergekit_configs"
    roles = _build(WORK_DIR / "families")
    bin_dir = _mergekit_bin(args.mergekit_bin)
    rows = []
    for config in sorted(CORPUS.glob("*.yml")):
        if fnmatch.fnmatch(config.stem, args.only):
            rows.append(run_case(config, roles, work, bin_dir))
            print(table(rows[-1:]).splitlines()[-1], flush=True)
    print(table(rows))
    if not args.no_docs:
        whole = rows if args.only == "*" else _merged_with_docs(rows)
        if whole is not None:
            _write_docs(whole)
    failed = [r for r in rows if r.mergekit == "yes" and (r.mergelab != "yes" or _too_far(r))]
    return 1 if failed else 0


def _too_far(row: Row) -> bool:
    """Whether a row disagrees beyond rounding (a half-precision row: in float32)."""
    value = row.float32 if row.float32 is not None else row.difference
    try:
        return float(value) > (row.tolerance if row.float32 is None else TOLERANCE["float32"])
    except ValueError:
        return not value.startswith("norm ratio")


if __name__ == "__main__":
    sys.exit(main())
