"""mergelab's kernels against FusionBench's own implementation, on the same small tensors.

    make fusionbench-env                                   # fusion-bench in .fusionbench-venv
    .venv/bin/python benchmarks/fusionbench_kernels.py --write-docs
    .venv/bin/python benchmarks/fusionbench_kernels.py --only 'ties*'

Inputs: a two-layer MLP (`mlp.fc1` [48, 32] and `mlp.fc2` [32, 48], with biases) as a seeded
base and four fine-tune-like variants (base + sparse task vectors, half a shared direction and
half each task's own noise: `_common._perturb`), seeded layer inputs, RegMean / Fisher batches,
a seeded WEMoE router, and mergelab's diagonal Fishers of the task models (the Fisher merge-step
rows feed them to FusionBench). They are saved with safetensors to a temporary folder;
`benchmarks/fusionbench_driver.py` runs there under `.fusionbench-venv/bin/python` and calls
FusionBench's own functions and classes on them (one case each, its outputs saved back), and
this script runs mergelab's kernels on the same tensors the way a user does
(`mergelab.merge_state_dicts`, `merge_modulated`, `merge_upscaled`, `mergelab.datamerge.data_merge`;
WEMoE's layer as the engine builds it). Each row is max |mergelab - FusionBench| / max |FusionBench|
over the case's tensors (the worst tensor). Rows where the two tools are known to differ say
why, and still show the figure; the randomised DARE row compares statistics of merged - base.
The exit status is non-zero when a row does not come out as its `expect` says.
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import math
import shutil
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (  # noqa: E402
    _perturb,
    fusionbench_python,
    replace_docs_section,
    run,
)
from fusionbench_driver import HIDDEN, IN_FEATURES, TinyMLP, tiny_mlp  # noqa: E402

SECTION = "fusionbench-kernels"
HEADING = "Kernels against FusionBench"
REPRODUCE = "make fusionbench-env && .venv/bin/python benchmarks/fusionbench_kernels.py --write-docs"
DRIVER = Path(__file__).resolve().parent / "fusionbench_driver.py"
NUM_TASKS = 4
SEED = 0
TOKENS = (6, 5)  # layer inputs: 6 sequences of 5 tokens
REGMEAN_BATCHES = 2
RTOL = 1e-5  # float32 kernels that do the same arithmetic
RTOL_ITERATIVE = 1e-4  # WUDI's 300 Adam steps: rounding of the loss's gradient accumulates
DARE_SEEDS = 20
SIGMAS = 4.0  # DARE: the means over seeds must agree within this many standard errors
CONSENSUS = {"tall_mask_lambda": 0.4, "prun_thre_k": 2, "lambda": 0.3}

State = dict[str, torch.Tensor]


# --------------------------------------------------------------------------- inputs


def build_inputs(seed: int = SEED) -> dict[str, torch.Tensor]:
    """Every tensor both sides read, keyed as the driver expects (`base.<param>`,
    `ft<i>.<param>`, the same on a zero base under `zero.`, `x.*`, `data<i>.<j>`, `router.*`)."""
    gen = torch.Generator().manual_seed(seed)
    base = {k: 0.2 * torch.randn(v.shape, generator=gen) for k, v in TinyMLP().state_dict().items()}
    shared = {k: torch.randn(v.shape, generator=gen) for k, v in base.items()}
    tuned = [_perturb(base, shared, seed + 1 + i, scale=0.05) for i in range(NUM_TASKS)]
    out: dict[str, torch.Tensor] = {}
    for prefix, offset in (("", None), ("zero.", base)):
        for name, state in (("base", base), *((f"ft{i}", ft) for i, ft in enumerate(tuned))):
            out.update({f"{prefix}{name}.{k}": v if offset is None else v - offset[k]
                        for k, v in state.items()})
    out["x.tokens"] = torch.randn(*TOKENS, IN_FEATURES, generator=gen)
    out["x.one_token"] = out["x.tokens"][:, :1].clone()
    for i in range(NUM_TASKS):
        for j in range(REGMEAN_BATCHES):
            rows = regmean_rows(i)
            out[f"data{i}.{j}"] = torch.randn(rows, IN_FEATURES, generator=gen) + 0.5 * i
    # A router "after training": random, so that routing differs from input to input.
    out["router.router_in"] = 0.3 * torch.randn(IN_FEATURES, IN_FEATURES, generator=gen)
    out["router.router_in_bias"] = 0.1 * torch.randn(IN_FEATURES, generator=gen)
    out["router.router_out"] = 0.3 * torch.randn(NUM_TASKS, IN_FEATURES, generator=gen)
    out["router.router_out_bias"] = 0.3 + 0.05 * torch.randn(NUM_TASKS, generator=gen)
    return out


def regmean_rows(task: int) -> int:
    """Rows per RegMean batch of task `task`: 16, 24, 32, ... (unequal, so that how each model's
    Gram is weighted shows)."""
    return 16 + 8 * task


def family(tensors: dict[str, torch.Tensor], prefix: str = "") -> dict[str, State]:
    """{'base': ..., 'task0': ...}: the checkpoints of one family as mergelab's state dicts."""

    def state(name: str) -> State:
        start = f"{prefix}{name}."
        return {k[len(start):]: v for k, v in tensors.items() if k.startswith(start)}

    return {"base": state("base"), **{f"task{i}": state(f"ft{i}") for i in range(NUM_TASKS)}}


def _config(method: str, parameters: dict | None = None, weights: bool = False,
            models: int = NUM_TASKS, base: str | None = "base") -> dict:
    entries = [{"model": f"task{i}", **({"parameters": {"weight": 1.0}} if weights else {})}
               for i in range(models)]
    config = {"merge_method": method, "models": entries, "parameters": parameters or {}}
    if base is not None:
        config["base_model"] = base
    return config


# --------------------------------------------------------------------------- mergelab's side


def ml_merge(method: str, parameters: dict, weights: bool = False, models: int = NUM_TASKS,
             base: str | None = "base") -> Callable[[dict[str, State]], State]:
    def merge(sds: dict[str, State]) -> State:
        import mergelab

        return mergelab.merge_state_dicts(_config(method, parameters, weights, models, base), sds)

    return merge


def ml_ties_matched(threshold: float, normalize: bool, scaling: float) -> Callable[[dict[str, State]], State]:
    """TIES with, per tensor, the density that keeps as many entries as FusionBench's
    `topk_values_mask` does: int(n * K) + 1 of n (a filter list on `density`)."""

    def merge(sds: dict[str, State]) -> State:
        import mergelab

        densities = [{"filter": name, "value": matched_density(v.numel(), threshold)}
                     for name, v in sds["base"].items()]
        params = {"density": densities, "normalize": normalize, "lambda": scaling}
        return mergelab.merge_state_dicts(_config("ties", params, weights=True), sds)

    return merge


def fusionbench_kept(numel: int, threshold: float) -> int:
    """Entries FusionBench's `topk_values_mask(M, K)` keeps of `numel` (no ties in |M|): those
    with |M| >= the (n - int(n K))-th smallest, i.e. int(n K) + 1."""
    return int(numel * threshold) + 1


def matched_density(numel: int, threshold: float) -> float:
    """The density for which mergelab's magnitude trim (int(density * n) entries) keeps
    `fusionbench_kept` entries; half an entry over, so float rounding cannot floor it to one less
    (at most 1: keeping all n entries)."""
    return min(1.0, (fusionbench_kept(numel, threshold) + 0.5) / numel)


def ml_dare(parameters: dict) -> Callable[[dict[str, State]], State]:
    """`dare_linear` once per seed (`merge_state_dicts(seed=...)`), keyed `seed<s>.<tensor>`."""

    def merge(sds: dict[str, State]) -> State:
        import mergelab

        out = {}
        for seed in range(DARE_SEEDS):
            merged = mergelab.merge_state_dicts(_config("dare_linear", parameters, weights=True), sds, seed=seed)
            out.update({f"seed{seed}.{k}": v for k, v in merged.items()})
        return out

    return merge


def ml_modulated(method: str, parameters: dict) -> Callable[[dict[str, State]], State]:
    """Each task's own weights from the shared weights and its modulators."""

    def merge(sds: dict[str, State]) -> State:
        import mergelab

        result = mergelab.merge_modulated(_config(method, parameters), sds)
        return {f"{task}.{k}": v for task in result.tasks for k, v in result.task_state_dict(task).items()}

    return merge


def ml_smile(parameters: dict, tokens: torch.Tensor) -> Callable[[dict[str, State]], State]:
    def merge(sds: dict[str, State]) -> State:
        import mergelab

        result = mergelab.merge_upscaled(_config("smile", parameters), sds)
        model = result.upscale(tiny_mlp(result.state_dict)).eval()
        with torch.no_grad():
            return {"out": model(tokens)}

    return merge


def ml_wemoe(tensors: dict[str, torch.Tensor], scale: float) -> Callable[[dict[str, State]], State]:
    """mlp.fc1 as mergelab's engine builds a WEMoE layer (the `wemoe` kernel's merged weight and
    extras, as tests/test_wemoe.py does), its router set to the inputs' router."""

    def merge(sds: dict[str, State]) -> State:
        from mergelab.methods import get_method
        from mergelab.methods.registry import TensorMerge, resolve_defaults
        from mergelab.methods.wemoe import ROUTER_KEYS, WEMoELinear, wemoe_tensor

        params = resolve_defaults(get_method("wemoe").global_params,
                                  {"lambda": scale, "router_hidden": IN_FEATURES})
        tasks = [f"task{i}" for i in range(NUM_TASKS)]

        def job(name: str):
            return wemoe_tensor(TensorMerge(
                tensors=[sds[t][name] for t in tasks], base=sds["base"][name],
                model_params=[{}] * NUM_TASKS, params=params, name=name,
                generator=torch.Generator().manual_seed(0)))

        weight, bias = job("mlp.fc1.weight"), job("mlp.fc1.bias")
        layer = torch.nn.Linear(IN_FEATURES, HIDDEN)
        with torch.no_grad():
            layer.weight.copy_(weight.merged)
            layer.bias.copy_(bias.merged)
        extras = {**weight.extras, **bias.extras}
        extras.update({key: tensors[f"router.{key}"] for key in ROUTER_KEYS})
        moe = WEMoELinear(layer, extras, scale)
        with torch.no_grad():
            return {"out_one_token": moe(tensors["x.one_token"]), "out_sequence": moe(tensors["x.tokens"])}

    return merge


FISHER_FLOOR = 1e-6  # mergelab's `fisher_floor` = FusionBench's `minimal_fisher_weight` (both added)


def ml_fisher(tensors: dict[str, torch.Tensor], normalize: bool) -> Callable[[dict[str, State]], State]:
    def merge(sds: dict[str, State]) -> State:
        return _fisher_result(tensors, sds, normalize).state_dict

    return merge


def _fisher_result(tensors: dict[str, torch.Tensor], sds: dict[str, State], normalize: bool):
    """mergelab's Fisher merge of the task models on their RegMean batches, the MLP's outputs
    read as logits, y the model's arg-max prediction (deterministic)."""
    from mergelab.datamerge import data_merge

    tasks = [f"task{i}" for i in range(NUM_TASKS)]
    batches = {t: [tensors[f"data{i}.{j}"] for j in range(REGMEAN_BATCHES)] for i, t in enumerate(tasks)}
    return data_merge("fisher", tiny_mlp(sds["base"]), {t: sds[t] for t in tasks}, batches,
                      fisher_target="argmax", normalize=normalize, fisher_floor=FISHER_FLOOR)


def add_mergelab_fishers(tensors: dict[str, torch.Tensor]) -> None:
    """Store mergelab's diagonal Fisher of each task model as `fisher<i>.<param>` (what the
    `fisher(merge step)` rows feed FusionBench's merge step)."""
    result = _fisher_result(tensors, family(tensors), normalize=False)
    for i in range(NUM_TASKS):
        store = result.statistics[f"task{i}"]["fisher"]
        tensors.update({f"fisher{i}.{k}": v.detach().float().contiguous() for k, v in store.fisher.items()})


def ml_regmean(tensors: dict[str, torch.Tensor], alpha: float,
               average_grams: bool) -> Callable[[dict[str, State]], State]:
    def merge(sds: dict[str, State]) -> State:
        from mergelab.datamerge import data_merge

        tasks = [f"task{i}" for i in range(NUM_TASKS)]
        dtype = sds["base"]["mlp.fc1.weight"].dtype
        batches = {t: [tensors[f"data{i}.{j}"].to(dtype) for j in range(REGMEAN_BATCHES)]
                   for i, t in enumerate(tasks)}
        result = data_merge("regmean", tiny_mlp(sds["base"]), {t: sds[t] for t in tasks}, batches,
                            alpha=alpha, average_grams=average_grams)
        return dict(result.state_dict)

    return merge


# --------------------------------------------------------------------------- cases


@dataclass(frozen=True)
class Case:
    name: str  # row id, unique; also the driver's output prefix
    fusionbench: str  # FusionBench's function or class, as in its source
    runner: str  # the driver's function
    settings: dict  # FusionBench's arguments (passed to the driver)
    mergelab: str  # mergelab's method and parameters, as a reader would write them
    merge: Callable[[dict[str, State]], State] = field(compare=False, repr=False)
    expect: str = "agree"  # "agree" or "differ"
    why: str = ""  # for "differ": the reason, checked by a sibling row that agrees
    family: str = ""  # "" or "zero." (the same task vectors on a zero base)
    check: str = "exact"  # "exact", "iterative" or "statistical"
    keys: tuple[str, ...] = ()  # the outputs compared (empty: all of them)
    dtype: str = "float32"  # both tools run on the inputs in this dtype


def cases(tensors: dict[str, torch.Tensor]) -> list[Case]:
    ta = "fusion_bench.method.task_arithmetic.task_arithmetic"
    ties = "fusion_bench.method.ties_merging"
    tall = "fusion_bench.method.tall_mask"
    smile_params = [{"k": 8, "gate_k": 1, "top_k": 1}, {"k": 8, "gate_k": 2, "top_k": 2}]
    out = [
        Case("simple_average", "`fusion_bench.method.simple_average.SimpleAverageAlgorithm()` (no base)",
             "simple_average", {}, "`linear`, weight 1 each, no base",
             ml_merge("linear", {}, weights=True, base=None)),
        Case("task_arithmetic", f"`{ta}.TaskArithmeticAlgorithm(scaling_factor=0.3)`",
             "task_arithmetic", {"scaling_factor": 0.3},
             "`task_arithmetic`, weight 1, lambda 0.3",
             ml_merge("task_arithmetic", {"lambda": 0.3}, weights=True)),
        Case("magmax", "`fusion_bench.method.magmax.magmax.MagMaxAlgorithm(scaling_factor=0.5)`",
             "magmax", {"scaling_factor": 0.5}, "`magmax`, lambda 0.5",
             ml_merge("magmax", {"lambda": 0.5})),
        Case("model_stock(2 models)", "`fusion_bench.method.model_stock.model_stock.ModelStock()` on "
             "task0, task1", "model_stock", {"models": 2}, "`model_stock` on task0, task1",
             ml_merge("model_stock", {}, models=2)),
        Case("model_stock(4 models)", "`fusion_bench.method.model_stock.model_stock.ModelStock()`",
             "model_stock", {"models": NUM_TASKS}, f"`model_stock` on the {NUM_TASKS} fine-tunes",
             ml_merge("model_stock", {}), expect="differ",
             why="with more than two models FusionBench averages the pairwise *angles* and takes "
                 "the cosine of the mean angle, mergelab (as mergekit) averages the pairwise cosines; "
                 "with one pair the two are the same (row above)"),
        Case("slerp", "`fusion_bench.method.slerp.slerp.SlerpMergeAlgorithm(t=0.3)` from task0 to task1",
             "slerp", {"t": 0.3}, "`slerp`, t 0.3, base_model task0, models task0 and task1; "
             "on the zero-base family (task vectors: far from colinear, so the spherical branch runs)",
             ml_merge("slerp", {"t": 0.3}, models=2, base="task0"), family="zero."),
        Case("expo", "`fusion_bench.method.linear.llama_expo.expo_(sft_model=base, rlhf_model=task0, "
             "extrapolation_factor=0.3)`", "expo", {"extrapolation_factor": 0.3},
             "`expo`, alpha 0.3, base_model base, models task0", ml_merge("expo", {"alpha": 0.3}, models=1)),
        Case("ties(sum, same density)",
             f"`{ties}.ties_merging_utils.ties_merging(reset_thresh=0.5, merge_func='sum')` per tensor",
             "ties_per_tensor", {"threshold": 0.5, "merge_func": "sum", "scaling_factor": 0.4},
             "`ties`, density 0.5, normalize false, lambda 0.4",
             ml_merge("ties", {"density": 0.5, "normalize": False, "lambda": 0.4}, weights=True),
             expect="differ",
             why="FusionBench's `topk_values_mask` keeps int(n K) + 1 entries of n "
                 "(|tau| >= the (n - int(n K))-th smallest), mergelab (as mergekit) int(n K); "
                 "the next row, with one more entry kept, agrees"),
        Case("ties(sum)",
             f"`{ties}.ties_merging_utils.ties_merging(reset_thresh=0.5, merge_func='sum')` per tensor",
             "ties_per_tensor", {"threshold": 0.5, "merge_func": "sum", "scaling_factor": 0.4},
             "`ties`, normalize false, lambda 0.4, density (int(0.5 n) + 1) / n per tensor",
             ml_ties_matched(0.5, normalize=False, scaling=0.4)),
        Case("ties(mean)",
             f"`{ties}.ties_merging_utils.ties_merging(reset_thresh=0.3, merge_func='mean')` per tensor",
             "ties_per_tensor", {"threshold": 0.3, "merge_func": "mean", "scaling_factor": 1.0},
             "`ties`, normalize true, lambda 1, density (int(0.3 n) + 1) / n per tensor",
             ml_ties_matched(0.3, normalize=True, scaling=1.0)),
        Case("ties(whole model)",
             f"`{ties}.ties_merging.TiesMergingAlgorithm(threshold=0.5, merge_func='sum', scaling_factor=0.4)`",
             "ties_whole_model", {"threshold": 0.5, "merge_func": "sum", "scaling_factor": 0.4},
             "`ties`, normalize false, lambda 0.4, density (int(0.5 n) + 1) / n per tensor",
             ml_ties_matched(0.5, normalize=False, scaling=0.4), expect="differ",
             why="FusionBench's algorithm class (like the TIES paper's own code, which it adapts) trims "
                 "the top-K entries of the whole flattened model, one threshold for all tensors; "
                 "mergelab trims each tensor, as mergekit and PEFT do (a merge streams tensor by "
                 "tensor); its `ties_merging` called on one tensor at a time agrees (rows above)"),
        Case("tsv",
             "`fusion_bench.method.task_singular_vector.TSVM.TaskSingularVectorMerging(alpha=1.0)`",
             "tsvm", {"alpha": 1.0}, "`tsv`, lambda 1, rank_fraction 0 (1/num_models)",
             ml_merge("tsv", {"lambda": 1.0})),
        Case("iso_c",
             "`fusion_bench.method.isotropic_merging.iso.IsotropicMergingInCommonSubspace(scaling_factor=0.9)`",
             "iso_c", {"scaling_factor": 0.9}, "`iso_c`, alpha 0.9",
             ml_merge("iso_c", {"alpha": 0.9})),
        Case("iso_cts",
             "`fusion_bench.method.isotropic_merging.iso.IsotropicMergingInCommonAndTaskSubspace"
             "(scaling_factor=0.9, common_space_fraction=0.8)`",
             "iso_cts", {"scaling_factor": 0.9, "common_space_fraction": 0.8},
             "`iso_cts`, alpha 0.9, common_space_fraction 0.8",
             ml_merge("iso_cts", {"alpha": 0.9, "common_space_fraction": 0.8})),
        Case("wudi", "`fusion_bench.method.wudi.wudi.WUDIMerging(iter_num=300)` (Adam, lr 1e-5 fixed)",
             "wudi", {"iter_num": 300}, "`wudi`, iterations 300, learning_rate 1e-5, lambda 1",
             ml_merge("wudi", {"iterations": 300, "learning_rate": 1e-5, "lambda": 1.0}),
             check="iterative"),
        Case("tall_masks", f"`{tall}.utils.generate_task_masks(tall_mask_lambda=0.4)`, "
             "task t = base + mask_t * sum of task vectors",
             "tall_masks_utils", {"tall_mask_lambda": 0.4},
             "`tall_masks`, lambda 1, mask_lambda 0.4; each task's `task_state_dict`",
             ml_modulated("tall_masks", {"lambda": 1.0, "mask_lambda": 0.4})),
        Case("tall_masks(class)",
             f"`{tall}.task_arithmetic.TallMaskTaskArithmeticAlgorithm(tall_mask_lambda=0.4)`",
             "tall_masks_class", {"tall_mask_lambda": 0.4},
             "`tall_masks`, lambda 1, mask_lambda 0.4; each task's `task_state_dict`",
             ml_modulated("tall_masks", {"lambda": 1.0, "mask_lambda": 0.4}), expect="differ",
             why="the class's `generate_task_masks(multi_task_vector, ft_task_vector, "
                 "pretrained_task_vector)` is called with task t's *task vector* where its docstring "
                 "wants theta_t and with the base's *weights* as theta_0, so it tests "
                 "|theta_0 - tau_t| > lambda |tau_MTL - tau_t| instead of |tau_t| > ...; on a zero base "
                 "the two coincide (next row). (On modules with parameters the class raises TypeError "
                 "in its own `state_dict_sub`, Parameter against Tensor: the driver hands it the same "
                 "modules with their weights held as buffers)"),
        Case("tall_masks(class, zero base)",
             f"`{tall}.task_arithmetic.TallMaskTaskArithmeticAlgorithm(tall_mask_lambda=0.4)`",
             "tall_masks_class", {"tall_mask_lambda": 0.4},
             "`tall_masks`, lambda 1, mask_lambda 0.4; same task vectors on a base of zeros",
             ml_modulated("tall_masks", {"lambda": 1.0, "mask_lambda": 0.4}), family="zero."),
        Case("consensus", f"`{tall}.utils.construct_consensus_mask(prun_thre_k=2)` over "
             "`generate_task_masks(tall_mask_lambda=0.4)` (saved as its `load_tall_mask` reads them); "
             "base + 0.3 * mask * sum of task vectors",
             "consensus", CONSENSUS, "`consensus`, k 2, mask_lambda 0.4, lambda 0.3",
             ml_merge("consensus", {"k": 2, "mask_lambda": 0.4, "lambda": 0.3}), expect="differ",
             why="FusionBench's `load_tall_mask` turns each task's mask into a state dict with "
                 "`fusion_bench.utils.vector_to_state_dict`, which writes into the reference state "
                 "dict's own tensors and returns them, so every task's dict aliases the same tensors "
                 "and `construct_consensus_mask` counts the *last* task's mask N times (the driver "
                 "checks this, note below); counted task by task (next row) it agrees"),
        Case("consensus(counted)", f"`{tall}.utils.generate_task_masks(tall_mask_lambda=0.4)`, "
             "counted as `construct_consensus_mask` does (sum of masks >= 2); base + 0.3 * mask * sum",
             "consensus_counted", CONSENSUS, "`consensus`, k 2, mask_lambda 0.4, lambda 0.3",
             ml_merge("consensus", {"k": 2, "mask_lambda": 0.4, "lambda": 0.3})),
        Case("emr", "`fusion_bench.method.emr_merging.emr_merging.EMRMerging()`; "
             "each task's backbone after `set_task`",
             "emr", {}, "`emr`; each task's `task_state_dict`", ml_modulated("emr", {})),
    ]
    for p in smile_params:
        label = f"smile(k {p['k']}, gate_k {p['gate_k']}, top_k {p['top_k']})"
        out.append(Case(
            label, "`fusion_bench.models.smile_moe.linear_from_module.SmileMoELinear"
            f"(gate_k={p['gate_k']}, k={p['k']}, top_k={p['top_k']})` on both layers; the MLP's output",
            "smile", {**p}, f"`smile`, k {p['k']}, gate_k {p['gate_k']}, top_k {p['top_k']}; "
            "`merge_upscaled(...).upscale(model)`'s output", ml_smile(p, tensors["x.tokens"])))
    regmean = ("`fusion_bench.method.regmean.regmean.regmean_merging(reduce_non_diagonal_ratio=0.9)` "
               "(its own forward hooks on nn.Linear inputs; a stand-in Trainer yields the batches)")
    fisher = "fusion_bench.method.fisher_merging.fisher_merging"
    wemoe = ("`fusion_bench.models.we_moe.WeightEnsemblingMoE(init_lambda=0.3, router_hidden_layers=2, "
             "batch_first=True)` around mlp.fc1, its gate's weights set to the same router")
    ml_wemoe_text = "`wemoe` kernel + `WEMoELinear`, lambda 0.3, router_hidden 32, the same router"
    out += [
        Case("wemoe(1 token)", wemoe, "wemoe", {"init_lambda": 0.3}, ml_wemoe_text,
             ml_wemoe(tensors, 0.3), keys=("out_one_token",)),
        Case("wemoe(5 tokens)", wemoe, "wemoe", {"init_lambda": 0.3}, ml_wemoe_text,
             ml_wemoe(tensors, 0.3), keys=("out_sequence",), expect="differ",
             why="mergelab routes each token (r(x) per token); FusionBench averages the router's "
                 "outputs over a sequence's tokens and merges once per sequence "
                 "(docs/upscaled.md says why); on one-token sequences the two agree (row above)"),
        Case("regmean", regmean, "regmean", {"reduce_non_diagonal_ratio": 0.9},
             "`mergelab.datamerge.data_merge('regmean', alpha=0.9, average_grams=True)`, same batches",
             ml_regmean(tensors, 0.9, average_grams=True), dtype="float64"),
        Case("regmean(summed Grams)", regmean, "regmean", {"reduce_non_diagonal_ratio": 0.9},
             "`mergelab.datamerge.data_merge('regmean', alpha=0.9)` (default: average_grams false)",
             ml_regmean(tensors, 0.9, average_grams=False), expect="differ", dtype="float64",
             why="FusionBench's hook keeps each model's Gram divided by its row count (X^T X / n: an "
                 "equal say per model), mergelab's default sums X_i^T X_i as the paper writes it (a model "
                 "with more rows weighs more); the tasks here have 32 to 80 rows; mergelab's "
                 "`average_grams: true` is FusionBench's choice (row above)"),
        Case("fisher(merge step)", f"`{fisher}.merging_with_fisher_weights(normalize_fisher_weight=False, "
             f"minimal_fisher_weight={FISHER_FLOOR:g})` fed with mergelab's Fishers",
             "fisher_merge_step", {"normalize_fisher_weight": False, "minimal_fisher_weight": FISHER_FLOOR},
             f"`data_merge('fisher', fisher_target='argmax', normalize=False, fisher_floor={FISHER_FLOOR:g})`",
             ml_fisher(tensors, normalize=False)),
        Case("fisher(merge step, normalised)", f"`{fisher}.merging_with_fisher_weights(normalize_fisher_weight=True, "
             f"minimal_fisher_weight={FISHER_FLOOR:g})` fed with mergelab's Fishers",
             "fisher_merge_step", {"normalize_fisher_weight": True, "minimal_fisher_weight": FISHER_FLOOR},
             f"`data_merge('fisher', fisher_target='argmax', normalize=True, fisher_floor={FISHER_FLOOR:g})`",
             ml_fisher(tensors, normalize=True), expect="differ",
             why="FusionBench's `normalize_fisher_weight` scales model i by 1 / ||F_i|| (the L2 norm of its "
                 "Fisher over all parameters, the weights then summing to 1), mergelab's `normalize` divides "
                 "F_i by its mean entry; the two agree only when ||F_i|| / mean(F_i) is the same for every "
                 "model; unnormalised (row above) they agree"),
        Case("fisher(own estimates)", f"`{fisher}.fisher_merging(normalize_fisher_weight=False, "
             f"minimal_fisher_weight={FISHER_FLOOR:g})` (its own Fisher; a stand-in Trainer, the MLP's "
             "output as logits)", "fisher_own_estimate",
             {"normalize_fisher_weight": False, "minimal_fisher_weight": FISHER_FLOOR},
             f"`data_merge('fisher', fisher_target='argmax', normalize=False, fisher_floor={FISHER_FLOOR:g})`",
             ml_fisher(tensors, normalize=False), expect="differ",
             why="the estimates differ: FusionBench squares the gradient of a whole batch's "
                 "sum_n sum_y sqrt(p_ny) log p_ny (cross terms between examples and classes, divided by "
                 "the examples), mergelab squares per-example gradients of log p(y|x) (here y the "
                 "model's arg-max: `fisher_target` sample, argmax or labels); fed the same Fishers "
                 "(first row) the merges agree"),
        Case("dare", "`fusion_bench.method.dare.task_arithmetic.DareTaskArithmetic(sparsity_ratio=0.6, "
             f"scaling_factor=0.5, only_on_linear_weights=False, rescale=True)`, seeds 0-{DARE_SEEDS - 1}",
             "dare", {"sparsity_ratio": 0.6, "scaling_factor": 0.5, "seeds": list(range(DARE_SEEDS))},
             f"`dare_linear`, density 0.4, weight 1, lambda 0.5, rescale true, seeds 0-{DARE_SEEDS - 1}",
             ml_dare({"density": 0.4, "lambda": 0.5, "rescale": True}), check="statistical"),
    ]
    return out


def selected_outputs(case: Case, state: State) -> State:
    """The tensors of `state` the row compares (`case.keys`; all when empty)."""
    return {k: v for k, v in state.items() if not case.keys or k in case.keys}


def driver_outputs_for(case: Case, outputs: dict[str, torch.Tensor]) -> State:
    """The driver's outputs of `case` (saved as `<case name>/<tensor>`)."""
    prefix = f"{case.name}/"
    return selected_outputs(case, {k[len(prefix):]: v for k, v in outputs.items() if k.startswith(prefix)})


# Methods mergelab has that FusionBench 0.2.33 cannot run here, and why.
NOT_RUN = [
    ("regmean_plusplus", "FusionBench's `RegMeanAlgorithmPlusPlus` leaves the model-specific steps "
                         "(embedding merge, first-layer inputs, the layer list, per-layer Grams) to "
                         "subclasses, and 0.2.33 ships only a CLIP one (`clip_regmean_plusplus.py`); a "
                         "row would run a subclass written here, not FusionBench's code."),
    ("adamerging_taskwise, adamerging_layerwise", "FusionBench's AdaMerging classes leave the test "
                         "loaders and logits to its CLIP, flan-t5, GPT-2, ResNet and Llama subclasses, "
                         "which load their model pools and task pools; and an optimisation over shuffled "
                         "batches compares only statistically."),
    ("lines", "FusionBench 0.2.33 has no LiNeS (no implementation under `fusion_bench/method`)."),
    ("pcb", "FusionBench 0.2.33 has no PCB merging (no implementation under `fusion_bench/method`)."),
]


# --------------------------------------------------------------------------- comparison


@dataclass
class Row:
    case: Case
    ran: bool = False
    tensors: int = 0
    max_rel: float = float("nan")
    worst: str = ""
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def agrees(self) -> bool:
        return self.ran and not self.problems

    @property
    def status(self) -> str:
        if not self.ran:
            return "FAIL"
        outcome = "agree" if self.agrees else "differ"
        return outcome if outcome == self.case.expect else f"UNEXPECTED {outcome}"


def relative_difference(mergelab: torch.Tensor, fusionbench: torch.Tensor) -> float:
    """max |mergelab - FusionBench| / max |FusionBench| (float64); 0 for two empty tensors."""
    a, b = mergelab.double(), fusionbench.double()
    if b.numel() == 0:
        return 0.0
    return float((a - b).abs().max()) / max(float(b.abs().max()), 1e-30)


def compare(row: Row, ml: State, fb: State, base: State) -> None:
    """Fill `row`: key sets, shapes, then the worst relative difference (deterministic rows) or
    the statistics of merged - base over seeds (the statistical row)."""
    only_fb, only_ml = sorted(set(fb) - set(ml)), sorted(set(ml) - set(fb))
    if only_fb:
        row.problems.append(f"only FusionBench has {', '.join(only_fb[:4])}")
    if only_ml:
        row.problems.append(f"only mergelab has {', '.join(only_ml[:4])}")
    common = sorted(set(fb) & set(ml))
    row.tensors = len(common)
    for name in common:
        if ml[name].shape != fb[name].shape:
            row.problems.append(f"{name}: shape mergelab {tuple(ml[name].shape)} vs FusionBench "
                                f"{tuple(fb[name].shape)}")
    common = [n for n in common if ml[n].shape == fb[n].shape]
    if row.case.check == "statistical":
        _compare_statistics(row, ml, fb, base, common)
        return
    worst, worst_name = 0.0, ""
    for name in common:
        rel = relative_difference(ml[name], fb[name])
        if rel > worst or not worst_name:
            worst, worst_name = rel, name
    row.max_rel, row.worst = worst, worst_name
    tolerance = RTOL_ITERATIVE if row.case.check == "iterative" else RTOL
    if worst > tolerance:
        row.problems.append(f"max relative difference {worst:.3g} in {worst_name} (tolerance {tolerance:g})")


def seed_statistics(merged: State, base: State, names: list[str]) -> dict[str, tuple[float, float]]:
    """Per seed (`seed<s>.<tensor>` keys): (fraction of entries that differ from the base,
    L2 norm of merged - base over the model)."""
    totals: dict[str, list[float]] = {}
    for key in names:
        seed, name = key.split(".", 1)
        delta = merged[key].double() - base[name].double()
        entry = totals.setdefault(seed, [0.0, 0.0, 0.0])
        entry[0] += float((delta != 0).sum())
        entry[1] += float(delta.square().sum())
        entry[2] += delta.numel()
    return {seed: (changed / numel, math.sqrt(squares)) for seed, (changed, squares, numel) in totals.items()}


def mean_and_error(values: list[float]) -> tuple[float, float]:
    """Sample mean and its standard error."""
    n = len(values)
    mean = sum(values) / n
    variance = sum((v - mean) ** 2 for v in values) / max(n - 1, 1)
    return mean, math.sqrt(variance / n)


def _compare_statistics(row: Row, ml: State, fb: State, base: State, names: list[str]) -> None:
    """Both tools' draws over the same seeds: the mean changed fraction and the mean norm of
    merged - base must agree within SIGMAS standard errors of their difference."""
    stats_ml, stats_fb = seed_statistics(ml, base, names), seed_statistics(fb, base, names)
    if not stats_ml or not stats_fb:
        row.problems.append("no seed to compare")
        return
    worst = 0.0
    for index, label in ((0, "entries changed from the base"), (1, "|merged - base|")):
        m_ml, e_ml = mean_and_error([v[index] for v in stats_ml.values()])
        m_fb, e_fb = mean_and_error([v[index] for v in stats_fb.values()])
        gap, error = abs(m_ml - m_fb), math.hypot(e_ml, e_fb)
        worst = max(worst, gap / max(abs(m_fb), 1e-30))
        row.notes.append(f"{label} over {len(stats_fb)} seeds: FusionBench {m_fb:.4f} ± {e_fb:.4f}, "
                         f"mergelab {m_ml:.4f} ± {e_ml:.4f} (mean ± standard error)")
        if gap > SIGMAS * error:
            row.problems.append(f"{label}: means differ by {gap:.4g}, more than {SIGMAS:g} standard "
                                f"errors ({error:.3g})")
    row.max_rel = worst


# --------------------------------------------------------------------------- running


def run_fusionbench(work: Path, selected: list[Case], tensors: dict[str, torch.Tensor]) -> dict:
    """Write the inputs, run the driver in .fusionbench-venv; returns its status.json."""
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in tensors.items()}, str(work / "inputs.safetensors"))
    spec = {"num_tasks": NUM_TASKS,
            "cases": [{"name": c.name, "runner": c.runner, "settings": c.settings, "family": c.family,
                       "dtype": c.dtype} for c in selected]}
    (work / "cases.json").write_text(json.dumps(spec, indent=1))
    res = run([fusionbench_python(), DRIVER, work], timeout=900)
    if not res.ok:
        raise SystemExit(f"the FusionBench driver failed (exit {res.returncode}):\n{res.tail(30)}")
    return json.loads((work / "status.json").read_text())


def evaluate(selected: list[Case], tensors: dict[str, torch.Tensor], status: dict,
             outputs: dict[str, torch.Tensor]) -> list[Row]:
    rows = []
    for case in selected:
        row = Row(case)
        rows.append(row)
        state = status["cases"].get(case.name, {"ok": False, "error": "not run by the driver"})
        if not state["ok"]:
            row.problems.append(f"FusionBench raised {state['error']}")
            continue
        dtype = getattr(torch, case.dtype)
        sds = {name: {k: v.to(dtype) for k, v in sd.items()} for name, sd in family(tensors, case.family).items()}
        try:
            ml = case.merge(sds)
        except Exception as exc:  # a failing mergelab call is a failed row
            row.problems.append(f"mergelab raised {type(exc).__name__}: {exc}")
            continue
        row.ran = True
        row.notes += [f"FusionBench side: {n}" for n in state.get("notes", [])]
        compare(row, selected_outputs(case, ml), driver_outputs_for(case, outputs), sds["base"])
    return rows


# --------------------------------------------------------------------------- report


def _fmt(x: float) -> str:
    return "-" if math.isnan(x) else f"{x:.1e}"


def markdown(rows: list[Row], versions: dict) -> str:
    fb_version = versions.get("fusion-bench", "?")
    lines = [
        f"Reproduce with `{REPRODUCE}` (CPU, offline, under a minute; `make fusionbench-env` builds",
        f"`.fusionbench-venv` with torch {versions.get('torch', '?')} (CPU wheel) and fusion-bench=={fb_version},",
        "all its dependencies installed from the package index).",
        "",
        f"Inputs (seed {SEED}): a two-layer MLP, `mlp.fc1` [{HIDDEN}, {IN_FEATURES}] and `mlp.fc2` "
        f"[{IN_FEATURES}, {HIDDEN}] with biases, as a base",
        f"and {NUM_TASKS} fine-tune-like variants (base + sparse task vectors: half a shared direction,",
        "half each task's own noise, on 60 % of the entries); layer inputs of 6 sequences x 5 tokens;",
        f"RegMean / Fisher batches ({REGMEAN_BATCHES} per task, of {regmean_rows(0)} to "
        f"{regmean_rows(NUM_TASKS - 1)} rows); a seeded WEMoE router.",
        "`benchmarks/fusionbench_driver.py` runs FusionBench's own code on them in `.fusionbench-venv`,",
        "`benchmarks/fusionbench_kernels.py` runs mergelab's (`merge_state_dicts`, `merge_modulated`,",
        "`merge_upscaled`, `datamerge.data_merge`) on the same tensors. **rel diff** is",
        "max |mergelab - FusionBench| / max |FusionBench| over the row's tensors (its worst tensor), in",
        f"float32 (RegMean: float64); rows agree under {RTOL:g} ({RTOL_ITERATIVE:g} for WUDI's 300 Adam steps). Rows marked",
        "*differ* are known differences, each explained below and each paired with a row that sets both",
        "tools alike and agrees. DARE draws random masks: its row compares the fraction of entries that",
        f"differ from the base and the norm of merged - base, averaged over {DARE_SEEDS} seeds of each tool",
        f"(means within {SIGMAS:g} standard errors of their difference; **rel diff** is the larger relative gap).",
        "",
        f"| row | FusionBench ({fb_version}) | mergelab | rel diff | outcome |",
        "|---|---|---|---:|---|",
    ]
    for r in rows:
        lines.append(f"| {r.case.name} | {r.case.fusionbench} | {r.case.mergelab} | {_fmt(r.max_rel)} | "
                     f"{r.status} |")
    lines += ["", "Why rows differ, and notes:", ""]
    for r in rows:
        if r.case.expect == "differ":
            lines.append(f"* `{r.case.name}`: {r.case.why}.")
        for note in r.notes:
            lines.append(f"* `{r.case.name}`: {note}.")
        if r.status not in ("agree", "differ"):
            lines += [f"* `{r.case.name}`: **{p}**" for p in r.problems]
    rank = min(IN_FEATURES, HIDDEN)
    lines += [
        "* Shared settings beyond the table: both tools merge every tensor (no `exclude_keys` /",
        "  `remove_keys`); non-matrix tensors (biases) take the mean of the task vectors in TSV-M,",
        f"  ISO-C, ISO-CTS and WUDI in both; TSV-M keeps floor(rank / {NUM_TASKS}) = {rank // NUM_TASKS} "
        "triplets per task of each",
        f"  rank-{rank} matrix; ISO-CTS keeps int(0.8 rank) common directions, then rounds the rest to "
        f"a multiple of {NUM_TASKS};",
        "  the RegMean rows run both tools in float64 (models and batches): in float32 FusionBench",
        "  inverts the summed Gram with `torch.inverse` in float32 (mergelab solves in float64 by",
        "  Cholesky), which alone moves its result by more than 1e-5 here; in float64 what remains is",
        "  its off-diagonal factor, built in float32 (0.9 as 0.89999998).",
        "",
        "Not compared:",
        "",
    ]
    lines += [f"* `{name}`: {why}" for name, why in NOT_RUN]
    return "\n".join(lines)


def print_table(rows: list[Row]) -> None:
    width = max(len(r.case.name) for r in rows)
    print(f"{'row':<{width}}  {'rel diff':>9}  outcome")
    for r in rows:
        print(f"{r.case.name:<{width}}  {_fmt(r.max_rel):>9}  {r.status}")
        for p in r.problems if r.status not in ("agree", "differ") else ():
            print(f"{'':<{width}}    {p}")
        for n in r.notes:
            print(f"{'':<{width}}    {n}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", default="*", help="glob on row names (e.g. 'ties*')")
    parser.add_argument("--write-docs", action="store_true",
                        help=f"rewrite the '{HEADING}' section of docs/benchmarks.md (full runs only)")
    parser.add_argument("--keep", type=Path, default=None,
                        help="keep the inputs and FusionBench's outputs in this folder")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    fusionbench_python()  # fail early with the hint to run `make fusionbench-env`

    tensors = build_inputs()
    add_mergelab_fishers(tensors)
    selected = [c for c in cases(tensors) if fnmatch.fnmatch(c.name, args.only)]
    if not selected:
        print("no row matches", file=sys.stderr)
        return 2
    work = Path(tempfile.mkdtemp(prefix="fusionbench-kernels-"))
    try:
        status = run_fusionbench(work, selected, tensors)
        from safetensors.torch import load_file

        outputs = load_file(str(work / "outputs.safetensors"))
        rows = evaluate(selected, tensors, status, outputs)
        if args.keep is not None:
            shutil.copytree(work, args.keep, dirs_exist_ok=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print_table(rows)
    for name, why in NOT_RUN:
        print(f"not compared: {name}: {why}")
    if args.write_docs:
        if args.only != "*":
            print("--write-docs needs a full run (no --only); docs not written", file=sys.stderr)
        else:
            replace_docs_section(SECTION, markdown(rows, status["versions"]), heading=HEADING)
            print("wrote docs/benchmarks.md")
    bad = [r for r in rows if r.status not in ("agree", "differ")]
    print(f"{len(rows) - len(bad)} of {len(rows)} rows as expected; {len(bad)} not")
    return 1 if bad else 0


if __name__ == "__main__":
    raise SystemExit(main())
