"""FusionBench's side of benchmarks/fusionbench_kernels.py: run its own functions and classes.

    .fusionbench-venv/bin/python benchmarks/fusionbench_driver.py WORK_DIR

Runs in `.fusionbench-venv` (`make fusionbench-env`), never in mergelab's venv, and imports
nothing of mergelab. WORK_DIR holds what fusionbench_kernels.py wrote: `inputs.safetensors`
(`base.<param>`, `ft<i>.<param>`, the layer inputs `x.*`, RegMean's batches `data<i>`, WEMoE's
router `router.*`) and `cases.json` (the settings of each case). It writes
`outputs.safetensors` (`<case>/<tensor>`) and `status.json` (per case: ok, error, seconds).
A case that raises is recorded as failed; the others still run.

`TinyMLP` is defined here, with no FusionBench import at module level, so the benchmark's
mergelab side builds the very same module.
"""

from __future__ import annotations

import copy
import json
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

IN_FEATURES, HIDDEN = 32, 48


class TinyMLP(nn.Module):
    """Two linear layers, as a transformer's MLP block: mlp.fc1 [48, 32], mlp.fc2 [32, 48]."""

    def __init__(self) -> None:
        super().__init__()
        self.mlp = nn.Module()
        self.mlp.fc1 = nn.Linear(IN_FEATURES, HIDDEN)
        self.mlp.fc2 = nn.Linear(HIDDEN, IN_FEATURES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp.fc2(torch.nn.functional.gelu(self.mlp.fc1(x)))


def tiny_mlp(state: dict[str, torch.Tensor]) -> TinyMLP:
    """A TinyMLP holding `state`, in the state's dtype."""
    model = TinyMLP().to(next(iter(state.values())).dtype)
    model.load_state_dict(state)
    return model.eval()


# --------------------------------------------------------------------------- helpers


class Inputs:
    """The inputs of one case: `family` prefixes the checkpoints' keys ("" or e.g. "zero.")."""

    def __init__(self, tensors: dict[str, torch.Tensor], num_tasks: int, family: str = "") -> None:
        self.tensors = tensors
        self.num_tasks = num_tasks
        self.family = family

    def state(self, prefix: str) -> dict[str, torch.Tensor]:
        start = f"{self.family}{prefix}."
        return {k[len(start):]: v.clone() for k, v in self.tensors.items() if k.startswith(start)}

    @property
    def base(self) -> dict[str, torch.Tensor]:
        return self.state("base")

    @property
    def fine_tunes(self) -> list[dict[str, torch.Tensor]]:
        return [self.state(f"ft{i}") for i in range(self.num_tasks)]

    def pool(self, models: int | None = None, pretrained: bool = True) -> dict[str, nn.Module]:
        """A fresh model pool as FusionBench's algorithms take it: `_pretrained_` (unless
        `pretrained` is false) and the first `models` tasks (all by default)."""
        pool: dict[str, nn.Module] = {"_pretrained_": tiny_mlp(self.base)} if pretrained else {}
        tuned = self.fine_tunes[:models]
        pool.update({f"task{i}": tiny_mlp(sd) for i, sd in enumerate(tuned)})
        return pool

    def task_vectors(self) -> list[dict[str, torch.Tensor]]:
        base = self.base
        return [{k: ft[k] - base[k] for k in base} for ft in self.fine_tunes]


def _state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _fabric():
    import lightning

    return lightning.Fabric(accelerator="cpu", devices=1)


def _model_pool(inputs: Inputs, models: int | None = None, pretrained: bool = True):
    from fusion_bench.modelpool import BaseModelPool

    return BaseModelPool(inputs.pool(models, pretrained))


# --------------------------------------------------------------------------- cases

Result = dict[str, torch.Tensor]  # a runner may return (Result, notes) instead


def task_arithmetic(inputs: Inputs, s: dict) -> Result:
    from fusion_bench.method.task_arithmetic.task_arithmetic import TaskArithmeticAlgorithm

    algo = TaskArithmeticAlgorithm(scaling_factor=s["scaling_factor"])
    return _state(algo.run(inputs.pool()))


def simple_average(inputs: Inputs, s: dict) -> Result:
    from fusion_bench.method.simple_average import SimpleAverageAlgorithm

    return _state(SimpleAverageAlgorithm().run(_model_pool(inputs, pretrained=False)))


def magmax(inputs: Inputs, s: dict) -> Result:
    from fusion_bench.method.magmax.magmax import MagMaxAlgorithm

    return _state(MagMaxAlgorithm(scaling_factor=s["scaling_factor"]).run(_model_pool(inputs)))


def model_stock(inputs: Inputs, s: dict) -> Result:
    from fusion_bench.method.model_stock.model_stock import ModelStock

    return _state(ModelStock().run(_model_pool(inputs, s["models"])))


def slerp(inputs: Inputs, s: dict) -> Result:
    """SlerpMergeAlgorithm between the first two fine-tunes (task0 primary)."""
    from fusion_bench.method.slerp.slerp import SlerpMergeAlgorithm

    return _state(SlerpMergeAlgorithm(t=s["t"]).run(_model_pool(inputs, 2, pretrained=False)))


def expo(inputs: Inputs, s: dict) -> Result:
    """`expo_(sft_model=base, rlhf_model=task0)`: extrapolate task0 away from the base."""
    from fusion_bench.method.linear.llama_expo import expo_

    return _state(expo_(tiny_mlp(inputs.base), tiny_mlp(inputs.fine_tunes[0]),
                        extrapolation_factor=s["extrapolation_factor"]))


def ties_per_tensor(inputs: Inputs, s: dict) -> Result:
    """`ties_merging` (ties_merging_utils) called on one tensor at a time, so that the top-k
    trim is per tensor as in mergelab (the algorithm class trims over the whole model)."""
    from fusion_bench.method.ties_merging.ties_merging_utils import ties_merging

    base, vectors = inputs.base, inputs.task_vectors()
    out = {}
    for name, value in base.items():
        flat = torch.stack([tv[name].reshape(-1) for tv in vectors])
        merged = ties_merging(flat, reset_thresh=s["threshold"], merge_func=s["merge_func"])
        out[name] = value + s["scaling_factor"] * merged.reshape(value.shape)
    return out


def ties_whole_model(inputs: Inputs, s: dict) -> Result:
    from fusion_bench.method.ties_merging.ties_merging import TiesMergingAlgorithm

    algo = TiesMergingAlgorithm(scaling_factor=s["scaling_factor"], threshold=s["threshold"],
                                remove_keys=[], merge_func=s["merge_func"])
    return _state(algo.run(inputs.pool()))


def tsvm(inputs: Inputs, s: dict) -> Result:
    from fusion_bench.method.task_singular_vector.TSVM import TaskSingularVectorMerging

    algo = TaskSingularVectorMerging(alpha=s["alpha"], exclude_keys=[])
    algo.fabric = _fabric()
    return _state(algo.run(_model_pool(inputs)))


def iso_c(inputs: Inputs, s: dict) -> Result:
    from fusion_bench.method.isotropic_merging.iso import IsotropicMergingInCommonSubspace

    algo = IsotropicMergingInCommonSubspace(scaling_factor=s["scaling_factor"], exclude_keys=[])
    algo.fabric = _fabric()
    return _state(algo.run(_model_pool(inputs)))


def iso_cts(inputs: Inputs, s: dict) -> Result:
    from fusion_bench.method.isotropic_merging.iso import IsotropicMergingInCommonAndTaskSubspace

    algo = IsotropicMergingInCommonAndTaskSubspace(
        scaling_factor=s["scaling_factor"], common_space_fraction=s["common_space_fraction"],
        exclude_keys=[])
    algo.fabric = _fabric()
    return _state(algo.run(_model_pool(inputs)))


def wudi(inputs: Inputs, s: dict) -> Result:
    from fusion_bench.method.wudi.wudi import WUDIMerging

    algo = WUDIMerging(iter_num=s["iter_num"], exclude_keys=[])
    algo.fabric = _fabric()
    with torch.enable_grad():
        return _state(algo.run(_model_pool(inputs)))


def _flat(inputs: Inputs):
    from fusion_bench.utils import state_dict_to_vector

    base = inputs.base
    flat_ptm = state_dict_to_vector(base, remove_keys=[])
    flat_ft = torch.stack([state_dict_to_vector(ft, remove_keys=[]) for ft in inputs.fine_tunes])
    return base, flat_ptm, flat_ft


def tall_masks_utils(inputs: Inputs, s: dict) -> Result:
    """`generate_task_masks` (tall_mask/utils.py, the original TALL-masks code) on flat
    vectors; task t's model is base + mask_t * sum of task vectors (the retrieval of
    TallMaskTaskArithmeticAlgorithm and of the paper)."""
    from fusion_bench.utils import vector_to_state_dict

    base, flat_ptm, tv_flat, masks = _tall_masks(inputs, s)
    total = tv_flat.sum(0)
    out = {}
    for t in range(inputs.num_tasks):
        # vector_to_state_dict writes into (and returns) the reference's own tensors: a fresh copy each time
        task = vector_to_state_dict(flat_ptm + masks[t] * total, copy.deepcopy(base), remove_keys=[])
        out.update({f"task{t}.{k}": v.clone() for k, v in task.items()})
    return out


def _weights_as_buffers(model: nn.Module) -> nn.Module:
    """The same module with every parameter held as a buffer (plain tensors in its state dict)."""
    for module in model.modules():
        for name, param in list(module._parameters.items()):
            del module._parameters[name]
            module.register_buffer(name, param.detach())
    return model


def tall_masks_class(inputs: Inputs, s: dict) -> Result:
    """TallMaskTaskArithmeticAlgorithm on the pool's modules with their weights as buffers: on
    modules with parameters its own `state_dict_sub(parameters, task vector)` raises
    TypeError (FusionBench 0.2.33 checks that both operands have the same tensor type)."""
    from fusion_bench.method.tall_mask.task_arithmetic import TallMaskTaskArithmeticAlgorithm

    algo = TallMaskTaskArithmeticAlgorithm(tall_mask_lambda=s["tall_mask_lambda"])
    pool = {name: _weights_as_buffers(model) for name, model in inputs.pool().items()}
    models = algo.run(pool)["models"]
    return {f"task{t}.{k}": v for t in range(inputs.num_tasks)
            for k, v in _state(models[f"task{t}"]).items()}


def consensus(inputs: Inputs, s: dict) -> tuple[Result, list[str]]:
    """`construct_consensus_mask` (tall_mask/utils.py) over the TALL masks of
    `generate_task_masks`, saved where its `load_tall_mask` reads them (bit-packed as its
    `find_optimal_mask` saves them); merged = base + lambda * mask * sum of task vectors (the
    merge step of the TALL-masks code; FusionBench has no Consensus algorithm class)."""
    import tempfile

    import numpy as np
    from fusion_bench.method.tall_mask.utils import construct_consensus_mask
    from omegaconf import OmegaConf

    base, flat_ptm, tv_flat, masks = _tall_masks(inputs, s)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "tall_masks" / "tiny"
        folder.mkdir(parents=True)
        packed = {f"task{t}": torch.from_numpy(np.packbits(masks[t].numpy()))
                  for t in range(inputs.num_tasks)}
        torch.save(packed, folder / f"TALL_mask_{inputs.num_tasks}task.npy")
        config = OmegaConf.create({"model_location": str(Path(tmp) / "checkpoints"), "model": "tiny",
                                   "num_tasks": inputs.num_tasks, "method": {"use_ties": False}})
        keep = construct_consensus_mask(copy.deepcopy(base), s["prun_thre_k"], config, remove_keys=[])
    keep = keep[: flat_ptm.numel()].bool()
    counted = masks.sum(0) >= s["prun_thre_k"]
    notes = [f"its consensus mask equals the mask counted task by task: {bool(torch.equal(keep, counted))}; "
             f"equals the last task's TALL mask alone: {bool(torch.equal(keep, masks[-1]))}"]
    return _consensus_merge(base, flat_ptm, tv_flat, keep, s["lambda"]), notes


def consensus_counted(inputs: Inputs, s: dict) -> Result:
    """Consensus from `generate_task_masks`, counted here as `construct_consensus_mask` counts
    (sum of the tasks' masks >= prun_thre_k), without its load_tall_mask round trip."""
    base, flat_ptm, tv_flat, masks = _tall_masks(inputs, s)
    return _consensus_merge(base, flat_ptm, tv_flat, masks.sum(0) >= s["prun_thre_k"], s["lambda"])


def _tall_masks(inputs: Inputs, s: dict):
    from fusion_bench.method.tall_mask.utils import generate_task_masks

    base, flat_ptm, flat_ft = _flat(inputs)
    tv_flat = flat_ft - flat_ptm
    masks = generate_task_masks(tv_flat, flat_ft, flat_ptm, tall_mask_lambda=s["tall_mask_lambda"])
    return base, flat_ptm, tv_flat, masks


def _consensus_merge(base, flat_ptm, tv_flat, keep, scale: float) -> Result:
    from fusion_bench.utils import vector_to_state_dict

    merged = flat_ptm + scale * keep * tv_flat.sum(0)
    return {k: v.clone() for k, v in vector_to_state_dict(merged, copy.deepcopy(base), remove_keys=[]).items()}


def emr(inputs: Inputs, s: dict) -> Result:
    from fusion_bench.method.emr_merging.emr_merging import EMRMerging

    model = EMRMerging().run(inputs.pool())
    out = {}
    for t in range(inputs.num_tasks):
        model.set_task(f"task{t}")
        out.update({f"task{t}.{k}": v for k, v in _state(model.backbone).items()})
    return out


def smile(inputs: Inputs, s: dict) -> Result:
    """Both linear layers of the base replaced by `SmileMoELinear`; the model's outputs."""
    from fusion_bench.models.smile_moe.linear_from_module import SmileMoELinear

    model = tiny_mlp(inputs.base)
    tuned = [tiny_mlp(sd) for sd in inputs.fine_tunes]
    for layer in ("fc1", "fc2"):
        upscaled = SmileMoELinear(getattr(model.mlp, layer), [getattr(m.mlp, layer) for m in tuned],
                                  gate_k=s["gate_k"], k=s["k"], top_k=s["top_k"])
        setattr(model.mlp, layer, upscaled)
    with torch.no_grad():
        return {"out": model(inputs.tensors["x.tokens"])}


def wemoe(inputs: Inputs, s: dict) -> Result:
    """`WeightEnsemblingMoE` around the base's first linear layer, its router (Depth_2_Gate)
    holding the router weights given in the inputs; outputs on sequences of 1 and of T tokens."""
    from fusion_bench.models.we_moe import WeightEnsemblingMoE

    def layer(state: dict[str, torch.Tensor]) -> nn.Linear:
        return tiny_mlp(state).mlp.fc1

    moe = WeightEnsemblingMoE(hidden_size=IN_FEATURES, base_model=layer(inputs.base),
                              expert_models=[layer(sd) for sd in inputs.fine_tunes],
                              init_lambda=s["init_lambda"], batch_first=True,
                              router_hidden_layers=2, batch_reduce=False)
    t = inputs.tensors
    with torch.no_grad():
        moe.gate.fc1.weight.copy_(t["router.router_in"])
        moe.gate.fc1.bias.copy_(t["router.router_in_bias"])
        moe.gate.fc2.weight.copy_(t["router.router_out"])
        moe.gate.fc2.bias.copy_(t["router.router_out_bias"])
        return {"out_one_token": moe(t["x.one_token"]), "out_sequence": moe(t["x.tokens"])}


class _Batches:
    """What `regmean_merging` asks of a Hugging Face Trainer: a train dataloader (dicts of
    keyword arguments for the model), its batch size and input preparation."""

    def __init__(self, batches: list[torch.Tensor]) -> None:
        self._batches = batches
        self._train_batch_size = batches[0].shape[0]

    def get_train_dataloader(self):
        return [{"x": b} for b in self._batches]

    def _prepare_inputs(self, inputs):
        return inputs


def regmean(inputs: Inputs, s: dict) -> Result:
    from fusion_bench.method.regmean.regmean import regmean_merging

    batches = _task_batches(inputs)
    merged = regmean_merging(
        models_to_merge=[tiny_mlp(sd) for sd in inputs.fine_tunes],
        trainers=[_Batches(b) for b in batches],
        exclude_param_names_regex=[],
        nums_regmean_examples=[sum(x.shape[0] for x in b) for b in batches],
        reduce_non_diagonal_ratio=s["reduce_non_diagonal_ratio"],
    )
    return {k: v.detach().clone() for k, v in merged.items()}


class _Logits(nn.Module):
    """A TinyMLP whose output is read as class logits (`.logits`, as `fisher_merging` reads a
    Hugging Face model's output); the same parameter names."""

    def __init__(self, model: TinyMLP) -> None:
        super().__init__()
        self.mlp = model.mlp

    def forward(self, x: torch.Tensor):
        from types import SimpleNamespace

        return SimpleNamespace(logits=TinyMLP.forward(self, x))


def _task_batches(inputs: Inputs) -> list[list[torch.Tensor]]:
    t = inputs.tensors
    return [[t[k] for k in sorted(t) if k.startswith(f"data{i}.")] for i in range(inputs.num_tasks)]


def fisher_merge_step(inputs: Inputs, s: dict) -> Result:
    """`merging_with_fisher_weights` fed with mergelab's diagonal Fishers (inputs `fisher<i>.*`),
    equal scaling coefficients."""
    from fusion_bench.method.fisher_merging.fisher_merging import merging_with_fisher_weights

    tuned = inputs.fine_tunes
    params = {k: [sd[k] for sd in tuned] for k in tuned[0]}
    fishers = [inputs.state(f"fisher{i}") for i in range(inputs.num_tasks)]
    merged = merging_with_fisher_weights(
        models_to_merge_param_dict=params, models_to_merge_fisher_weights_list=fishers,
        fisher_scaling_coefficients=torch.ones(inputs.num_tasks) / inputs.num_tasks,
        normalize_fisher_weight=s["normalize_fisher_weight"], minimal_fisher_weight=s["minimal_fisher_weight"])
    return {k: v.detach().clone() for k, v in merged.items()}


def fisher_own_estimate(inputs: Inputs, s: dict) -> Result:
    """`fisher_merging` whole: its own Fisher estimate (a stand-in Trainer yields the batches,
    the MLP's outputs read as logits) and its merge."""
    from fusion_bench.method.fisher_merging.fisher_merging import fisher_merging

    batches = _task_batches(inputs)
    with torch.enable_grad():
        merged = fisher_merging(
            models_to_merge=[_Logits(tiny_mlp(sd)) for sd in inputs.fine_tunes],
            trainers=[_Batches(b) for b in batches], exclude_param_names_regex=[],
            nums_fisher_examples=[sum(x.shape[0] for x in b) for b in batches],
            normalize_fisher_weight=s["normalize_fisher_weight"],
            minimal_fisher_weight=s["minimal_fisher_weight"])
    return {k: v.detach().clone() for k, v in merged.items()}


def dare(inputs: Inputs, s: dict) -> Result:
    """One DARE merge per seed (torch's global RNG, which `param_random_drop_` draws from)."""
    from fusion_bench.method.dare.task_arithmetic import DareTaskArithmetic

    out = {}
    for seed in s["seeds"]:
        torch.manual_seed(seed)
        algo = DareTaskArithmetic(scaling_factor=s["scaling_factor"], sparsity_ratio=s["sparsity_ratio"],
                                  only_on_linear_weights=False, rescale=True)
        out.update({f"seed{seed}.{k}": v for k, v in _state(algo.run(_model_pool(inputs))).items()})
    return out


RUNNERS: dict[str, Callable[[Inputs, dict], Result]] = {
    f.__name__: f
    for f in (simple_average, task_arithmetic, magmax, model_stock, slerp, expo, ties_per_tensor,
              ties_whole_model, tsvm, iso_c, iso_cts, wudi, tall_masks_utils, tall_masks_class,
              consensus, consensus_counted, emr, smile, wemoe, regmean, fisher_merge_step,
              fisher_own_estimate, dare)
}


def main(work: Path) -> int:
    from safetensors.torch import load_file, save_file

    torch.set_num_threads(1)
    cases = json.loads((work / "cases.json").read_text())
    tensors = load_file(str(work / "inputs.safetensors"))
    status: dict[str, dict] = {}
    outputs: dict[str, torch.Tensor] = {}
    for case in cases["cases"]:
        dtype = getattr(torch, case.get("dtype", "float32"))
        inputs = Inputs({k: v.to(dtype) for k, v in tensors.items()}, cases["num_tasks"],
                        case.get("family", ""))
        start = time.perf_counter()
        try:
            result = RUNNERS[case["runner"]](inputs, case["settings"])
            result, notes = result if isinstance(result, tuple) else (result, [])
            outputs.update({f"{case['name']}/{k}": v.detach().contiguous() for k, v in result.items()})
            status[case["name"]] = {"ok": True, "notes": notes}
        except Exception as exc:  # one failing case is a row, not a crash
            status[case["name"]] = {"ok": False, "error": f"{type(exc).__name__}: {exc}",
                                    "traceback": traceback.format_exc(limit=6)}
        status[case["name"]]["seconds"] = round(time.perf_counter() - start, 3)
    save_file(outputs, str(work / "outputs.safetensors"))
    import importlib.metadata as metadata

    versions = {p: metadata.version(p) for p in ("fusion-bench", "torch")}
    (work / "status.json").write_text(json.dumps({"cases": status, "versions": versions}, indent=1))
    return 0


if __name__ == "__main__":
    if len(sys.argv) != 2:
        raise SystemExit(f"usage: {sys.argv[0]} WORK_DIR")
    raise SystemExit(main(Path(sys.argv[1])))
