"""AdaMerging (Yang et al. 2024, https://arxiv.org/abs/2310.02575): an optimiser whose output
is a plan.

The merged model is theta = theta_0 + sum_k lambda_k tau_k (task-wise: one lambda per task
vector tau_k = theta_k - theta_0; layer-wise: one per task vector and tensor, as the paper's code
does). The lambdas are learned by minimising the Shannon entropy of each task head's predictions
on that task's unlabeled inputs, summed over tasks: the paper shows entropy tracks the error
rate. The merged weights stay a differentiable function of the lambdas through
`torch.func.functional_call`, so the models themselves are never modified.

The result is not weights but a plain task-arithmetic config (`coefficients_config`): each
model's `weight` per tensor, through the config's name filters, which `mergelab merge` (or
`merge_state_dicts`) turns into the merged weights; the floats are written so that they read
back exactly, so the saved YAML reproduces the weights bit for bit.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import nn
from torch.func import functional_call

from mergelab.progress import progress_bar
from mergelab.stats.batches import DataError, TaskData, batch_size, split_batch, to_device
from mergelab.stats.fisher import BoundForward

StateDict = Mapping[str, torch.Tensor]


@dataclass
class AdaMergingResult:
    """coefficients: [tasks] (task-wise) or [tasks, tensors] (layer-wise), in `tasks` order;
    tensor_names: the tensors the columns of a layer-wise result refer to; state_dict: the
    optimiser's own view of the merged weights (the engine's, from the config, is the result)."""

    state_dict: dict[str, torch.Tensor]
    coefficients: torch.Tensor
    tasks: list[str]
    tensor_names: list[str]
    entropy_history: list[float] = field(default_factory=list)
    examples: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0


def prediction_entropy(logits: torch.Tensor) -> torch.Tensor:
    """Mean Shannon entropy (nats) of softmax(logits) over the rows (all leading dimensions)."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    return -(logp.exp() * logp).sum(-1).mean()


def _cycle(task: TaskData) -> Iterator:
    # A task's batches, round and round (each pass calls the task's loader afresh).
    for _ in itertools.count():
        empty = True
        for batch in task.iterate():
            empty = False
            yield batch
        if empty:
            raise DataError("a task's data loader yielded no batch: AdaMerging needs data")


def adamerging(
    module: nn.Module,
    base: StateDict,
    finetuned: Mapping[str, StateDict],
    data: Mapping[str, TaskData],
    *,
    granularity: Literal["task", "layer"],
    steps: int = 500,
    lr: float = 1e-3,
    init: float = 0.3,
    clamp: bool = True,
    device: str | torch.device | None = None,
    progress: bool = False,
) -> AdaMergingResult:
    """Learn AdaMerging coefficients and return the merged state dict with them.

    base: the pretrained state (theta_0), same keys as every fine-tuned state.
    data: per task (same names as `finetuned`): unlabeled batches and the task's head/forward
        producing logits. Labels in the batches are ignored.
    Tensors equal in every model (e.g. frozen embeddings) and integer tensors keep the base
    value and get no coefficient. Raises DataError on an empty loader or a non-finite entropy.
    """
    tasks = list(finetuned)
    start = time.perf_counter()
    dev = torch.device(device) if device is not None else None
    merge_keys: list[str] = []
    vectors: dict[str, torch.Tensor] = {}
    for key, base_value in base.items():
        if not base_value.is_floating_point():
            continue
        stacked = torch.stack([finetuned[t][key].to(base_value.dtype) - base_value for t in tasks])
        if bool(stacked.any()):
            merge_keys.append(key)
            vectors[key] = stacked.to(dev) if dev is not None else stacked
    base_on = {k: (v.to(dev) if dev is not None else v) for k, v in base.items()}
    shape = (len(tasks),) if granularity == "task" else (len(tasks), len(merge_keys))
    if granularity not in ("task", "layer"):
        raise ValueError(f"granularity must be 'task' or 'layer'; got {granularity!r}")
    coefficients = torch.full(shape, float(init), dtype=torch.float32, device=dev, requires_grad=True)
    optimiser = torch.optim.Adam([coefficients], lr=lr)

    def merged_params(lam: torch.Tensor) -> dict[str, torch.Tensor]:
        out = {}
        for j, key in enumerate(merge_keys):
            weights = lam if granularity == "task" else lam[:, j]
            tau = vectors[key]
            view = weights.reshape((-1,) + (1,) * (tau.dim() - 1)).to(tau.dtype)
            out[f"inner.{key}"] = base_on[key] + (view * tau).sum(0)
        return out

    bound = {t: BoundForward(module, data[t].logits_fn()) for t in tasks}
    # Everything not learned comes from the base (functional_call takes it from this dict).
    fixed = {f"inner.{k}": v for k, v in base_on.items() if k not in vectors}
    streams = {t: _cycle(data[t]) for t in tasks}
    history: list[float] = []
    was_training = module.training
    module.eval()
    try:
        with progress_bar("AdaMerging", steps, progress) as advance:
            for step in range(steps):
                optimiser.zero_grad()
                params = {**fixed, **merged_params(coefficients)}
                total = torch.zeros((), device=dev)
                for t in tasks:
                    inputs, _ = split_batch(next(streams[t]))
                    inputs = to_device(inputs, dev)
                    logits = functional_call(bound[t], params, (inputs,), strict=False)
                    total = total + prediction_entropy(logits)
                if not torch.isfinite(total):
                    raise DataError(f"AdaMerging: the entropy became non-finite at step {step}")
                total.backward()
                optimiser.step()
                if clamp:
                    with torch.no_grad():
                        coefficients.clamp_(0.0, 1.0)
                history.append(float(total.detach()))
                advance(1)
    finally:
        module.train(was_training)
    with torch.no_grad():
        learned = merged_params(coefficients.detach())
    state = {}
    for key, value in base.items():
        merged = learned.get(f"inner.{key}")
        state[key] = value.clone() if merged is None else merged.detach().to(value.device, value.dtype)
    if not torch.isfinite(coefficients).all():
        raise DataError("AdaMerging: the coefficients became non-finite")
    return AdaMergingResult(
        state_dict=state,
        coefficients=coefficients.detach().cpu(),
        tasks=tasks,
        tensor_names=merge_keys if granularity == "layer" else [],
        entropy_history=history,
        examples=unique_examples(data, tasks),
        seconds=time.perf_counter() - start,
    )


def unique_examples(data: Mapping[str, TaskData], tasks: Sequence[str]) -> dict[str, int]:
    """Examples in one pass over each task's data (what AdaMerging had available)."""
    out = {}
    for t in tasks:
        out[t] = sum(batch_size(split_batch(b)[0]) for b in data[t].iterate())
    return out


def coefficients_config(
    config,
    tasks: Sequence[str],
    coefficients: torch.Tensor,
    tensor_names: Sequence[str],
):
    """The task-arithmetic MergeConfig applying learned coefficients: theta_0 + sum_k w_k tau_k.

    config: the AdaMerging config (its models, base, dtypes and tokenizer are kept; `data:`
        and the optimiser's parameters are dropped).
    tasks: model keys, in the order of the coefficients' rows.
    coefficients: [tasks] (one `weight` per model) or [tasks, tensors] (a `weight` per tensor
        through name filters; tensors without a coefficient, whose task vectors are zero, get 0).
    Filters match substrings, first match first: entries are ordered longest name first, so a
    tensor's own name is the first filter it contains (a shorter name inside it comes later).
    """
    from mergelab.plan.config import MergeConfig

    values = coefficients.detach().cpu().double()
    models = []
    for i, task in enumerate(tasks):
        if values.dim() == 1:
            weight = float(values[i])
        else:
            order = sorted(range(len(tensor_names)), key=lambda j: (-len(tensor_names[j]), tensor_names[j]))
            weight = [{"filter": tensor_names[j], "value": float(values[i, j])} for j in order]
            weight.append({"value": 0.0})
        models.append({"model": task, "parameters": {"weight": weight}})
    listed = {m["model"] for m in models}
    if config.base_model not in listed:
        models.append({"model": config.base_model})
    dumped = config.model_dump(exclude_none=True, mode="json")
    for key in ("data", "parameters", "models", "merge_method", "name"):
        dumped.pop(key, None)
    return MergeConfig.model_validate(
        {
            "merge_method": "task_arithmetic",
            "models": models,
            "parameters": {"lambda": 1.0, "normalize": False},
            "name": f"{config.merge_method} coefficients (learned on data)",
            **dumped,
        }
    )


def coefficient_inputs(plan):
    """What a stage that learns task-arithmetic coefficients reads of `plan`: the method's
    parameters, the merged sources (the tasks, in order), the base's weights of the planned
    tensors and each source's weights."""
    from mergelab.stats.stage import source_weights

    params = plan.tasks[0].params if plan.tasks else {}
    tasks = plan.merged_sources
    names = [n for t in plan.tasks for i, (k, n) in enumerate(t.inputs) if i == t.base_index]
    base = {n: plan.sources[plan.config.base_model].get(n) for n in names}
    return params, tasks, base, {k: source_weights(plan, k) for k in tasks}


def optimise(plan, provider, options, folders=None):
    """The `adamerging` optimisation stage: learn the coefficients on the provider's data and
    return (the task-arithmetic config that applies them, the AdaMergingResult)."""
    from mergelab.stats.stage import load_weights, task_on_device, working_module

    granularity = dict(plan.method.optimiser_options).get("granularity", "task")
    params, tasks, base, finetuned = coefficient_inputs(plan)
    module = working_module(provider, options.device)
    load_weights(module, base)
    data = {k: task_on_device(provider.task_data(k), options.device) for k in tasks}
    result = adamerging(
        module,
        base,
        finetuned,
        data,
        granularity=granularity,
        steps=int(params["steps"]),
        lr=float(params["lr"]),
        init=float(params["init"]),
        clamp=bool(params["clamp"]),
        device=options.device,
        progress=options.progress,
    )
    return coefficients_config(plan.config, tasks, result.coefficients, result.tensor_names), result


def describe(plan) -> dict:
    """What a dry run reports of the `adamerging` stage's cost (nothing is run)."""
    params = plan.tasks[0].params if plan.tasks else {}
    steps = int(params.get("steps", 0))
    data = plan.config.data
    batch = data.batch_size if data is not None else 0
    sources = len(plan.merged_sources)
    return {
        "output": "a task_arithmetic config with the learned per-model (per-tensor) weights",
        "estimated_forward_passes": steps * sources * batch,
        "cost": f"{steps} steps x {sources} task(s) x {batch} examples, each a forward and "
        "a backward pass through the merged model",
    }
