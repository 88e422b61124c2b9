"""Learning an upscaling method's trainable extras on unlabelled data (WEMoE's routers).

The data stage of a method whose `Upscaling` declares a `trainer`:

1. the engine merges the plan in memory (shared weights, and every extra at its initial value:
   the kernel's, drawn from the merge seed), exactly as the written merge will;
2. the provider's architecture is loaded with the shared weights and its layers are wrapped
   with the method's modules (`wrap_layers`, as `upscale_module` does for a folder);
3. the extras `Upscaling.trained` names (the routers) are trained by the one training loop
   (`mergelab.training.train`) on `EntropyExamples`: the Shannon entropy of each task head's
   predictions on that task's unlabelled inputs, summed over tasks (AdaMerging's objective,
   `mergelab.plan.adamerging.prediction_entropy`), everything else fixed;
4. the learned values go to the writer, which writes them in place of the initial ones.

The model runs in eval mode (no dropout): training changes the routers only, and the entropy of
a fixed batch is then a function of the routers alone.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from mergelab.plan.adamerging import prediction_entropy
from mergelab.stats.batches import DataError, TaskData, batch_size, split_batch, to_device
from mergelab.training import FinetuneSettings, train
from mergelab.upscale.load import wrap_layers
from mergelab.upscale.memory import MemoryExtras, planned_extras


@dataclass
class TrainedExtras:
    """What a trainer learned: `extras` (tensor -> key -> value, on the CPU), the loss of every
    step, examples per task, seconds and notes for the merge report; `module`: the upscaled
    model it trained (the provider's architecture, layers wrapped), in eval mode."""

    extras: dict[str, dict[str, torch.Tensor]]
    module: nn.Module | None = None
    entropy_history: list[float] = field(default_factory=list)
    examples: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)


class EntropyExamples:
    """Unlabelled batches of several tasks, as `Examples` for the training loop.

    Example i is a round: batch i of every task (a task with fewer batches cycles through its
    own). Its loss is the sum over tasks of the mean prediction entropy of that task's head on
    its batch i (AdaMerging's and WEMoE's objective); a training batch of several rounds gets
    their mean. Labels in the batches are ignored. `module` is the upscaled model; the
    parameters the loop trains (`TrainedParameters`) are inside it, so `loss` ignores the
    `model` it is handed.
    """

    def __init__(self, module: nn.Module, tasks: Mapping[str, TaskData], device=None):
        self.module, self.device = module, device
        self.forwards = {key: task.logits_fn() for key, task in tasks.items()}
        self.batches: dict[str, list] = {}
        for key, task in tasks.items():
            inputs = [split_batch(batch)[0] for batch in task.iterate()]
            if not inputs:
                raise DataError(f"model {key!r}: its task's data yielded no batch")
            self.batches[key] = inputs
        self.rounds = max(len(b) for b in self.batches.values())

    def __len__(self) -> int:
        return self.rounds

    def examples(self) -> dict[str, int]:
        """Examples per task (one pass over its batches)."""
        return {key: sum(batch_size(b) for b in batches) for key, batches in self.batches.items()}

    def entropy(self, round_index: int) -> torch.Tensor:
        """The summed entropy of round `round_index` (with gradients)."""
        total = None
        for key, batches in self.batches.items():
            inputs = to_device(batches[round_index % len(batches)], self.device)
            value = prediction_entropy(self.forwards[key](self.module, inputs))
            total = value if total is None else total + value
        assert total is not None
        return total

    def loss(self, model: nn.Module, head: nn.Module | None, indices: torch.Tensor) -> torch.Tensor:
        values = [self.entropy(int(i)) for i in indices.tolist()]
        return torch.stack(values).mean()


class TrainedParameters(nn.Module):
    """The parameters to train, collected from the wrapped layers (what the loop optimises)."""

    def __init__(self, parameters: Sequence[nn.Parameter]):
        super().__init__()
        self.trained = nn.ParameterList(parameters)


def _load_shared(module: nn.Module, tensors: Mapping[str, torch.Tensor]) -> None:
    own = module.state_dict()
    unknown = sorted(n for n in tensors if n not in own)
    if unknown:
        raise DataError(
            f"the data stage's architecture has no tensor(s) {unknown[:5]} of the merged "
            f"checkpoint ({len(unknown)} of {len(tensors)}): give the base model's folder"
        )
    with torch.no_grad():
        module.load_state_dict(dict(tensors), strict=False)


def train_routers(plan, provider, options, folders=None) -> TrainedExtras:
    """The data stage of a method with an `Upscaling.trainer` (see the module docstring).

    plan: a MergePlan of such a method; its global parameters give `steps` and `lr`.
    provider: the architecture and each merged source's data and head (DataProvider).
    options: mergelab.stats.stage.CollectOptions (device, progress, and `seed`: the merge
        seed, which also orders the batches).
    Raises DataError on a task without batches, TrainingError when the entropy diverges.
    """
    from mergelab.engine.execute import MemorySink, execute
    from mergelab.stats.stage import task_on_device, working_module

    start = time.perf_counter()
    upscaling = plan.method.upscaling
    params = plan.tasks[0].params if plan.tasks else {}
    device = options.device
    data = {k: task_on_device(provider.task_data(k), device) for k in plan.merged_sources}
    sink, extras = MemorySink(plan), MemoryExtras(upscaling, planned_extras(plan))
    execute(plan, sink, device="cpu" if device is None else device, seed=options.seed,
            progress=False, extras=extras)  # fmt: skip
    module = working_module(provider, device)
    _load_shared(module, sink.tensors)
    module.requires_grad_(False)
    wrapped = wrap_layers(module, upscaling, extras.records, extras.read, "the merged model")
    if device is not None:
        module.to(device)
    learned: list[tuple[str, str, nn.Parameter]] = []
    for tensor, layer in wrapped.items():
        for path, parameter in layer.named_parameters():
            key = path.rpartition(".")[2]
            if key in upscaling.trained:
                learned.append((tensor, key, parameter))
    examples = EntropyExamples(module, data, device)
    steps = int(params.get("steps", 0))
    losses: list[float] = []
    module.eval()
    if steps > 0 and learned:
        settings = FinetuneSettings.checked(
            steps=steps, batch_size=1, learning_rate=float(params["lr"]), warmup_steps=0,
            schedule="constant", optimizer="adam", sampling="epochs", seed=int(options.seed),
            freeze_input_embeddings=False,
        )  # fmt: skip
        losses = train(TrainedParameters([p for _, _, p in learned]), examples, settings,
                       progress=options.progress, description=f"{plan.method.name} routers")  # fmt: skip
    result: dict[str, dict[str, torch.Tensor]] = {}
    for tensor, key, parameter in learned:
        result.setdefault(tensor, {})[key] = parameter.detach().cpu().clone()
    notes = [f"`{plan.method.name}`: {len(wrapped)} layer(s) upscaled; " + (
        f"their routers trained {steps} step(s) on {len(data)} task(s)' unlabelled inputs, "
        f"summed prediction entropy {losses[0]:.4f} -> {losses[-1]:.4f}"
        if losses else "routers untrained (steps 0): the routed merge is the task-arithmetic one"
    )]  # fmt: skip
    return TrainedExtras(extras=result, module=module, entropy_history=losses, examples=examples.examples(),
                         seconds=time.perf_counter() - start, notes=notes)  # fmt: skip
