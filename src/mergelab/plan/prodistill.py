"""ProDistill (Xu et al., ICML 2025, https://arxiv.org/abs/2502.12706): merging coefficients
learned layer by layer by distilling each fine-tune's layer outputs; an optimiser whose output
is a plan.

The merged model is theta = theta_0 + sum_k c_k tau_k with one coefficient per task vector
tau_k = theta_k - theta_0 and tensor (the paper learns one per element; a per-tensor coefficient
is what a plain task-arithmetic config can hold). The layers ("blocks") are processed in the
order a forward pass runs them: numbered layers (`encoder.layer.3`, `model.layers.3`,
`blocks.3`...) and every leaf module with parameters outside them (embeddings, final norms),
found as RegMean++ finds them (mergelab.stats.progressive). For block l, with the blocks before
it frozen at their learned coefficients:

- the merged input: task k's examples run through the merged model up to block l (the inputs
  block l receives there are kept, a partial forward pass, no gradients);
- the target: fine-tune k's own output of block l on task k's examples (its own inputs: the
  paper's "dual inputs", the student and the teacher each fed by their own earlier layers);
- the loss: mean squared error between block l with the merged weights on the merged inputs
  and the target, over every output element of the examples drawn, all tasks in one index
  space. Only block l's coefficients train, through the project's one training loop
  (mergelab.training.train: Adam, constant learning rate, shuffled epochs, seeded); then they
  are frozen and the next block is processed.

Tensors no block holds, or that no example ever reaches, keep `init` (the paper keeps the
layers outside its blocks at task arithmetic with its initial coefficient, 0.3). Tensors equal
in every model get no coefficient (their value is the base's), as in AdaMerging.

The result is a task-arithmetic config with each model's `weight` per tensor
(mergelab.plan.adamerging.coefficients_config), which `mergelab merge` runs to the same weights
bit for bit.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.func import functional_call
from torch.utils._pytree import tree_flatten, tree_map

from mergelab.plan.adamerging import coefficient_inputs, coefficients_config
from mergelab.progress import progress_bar
from mergelab.stats.batches import DataError, TaskData, limited, to_device
from mergelab.stats.batches import batch_size as examples_in
from mergelab.stats.gram import StopForward
from mergelab.stats.progressive import block_of, execution_order
from mergelab.stats.stage import load_weights, raw_forward

StateDict = Mapping[str, torch.Tensor]


@dataclass
class BlockFit:
    """What one block's distillation did.

    name: the block's module name; tensors: the tensors whose coefficients it learned (state
    dict names); initial_loss / final_loss: the feature loss over all examples at the initial
    and at the learned coefficients; losses: the loss of every training step (one batch each).
    """

    name: str
    tensors: list[str]
    initial_loss: float
    final_loss: float
    losses: list[float] = field(default_factory=list)


@dataclass
class ProDistillResult:
    """coefficients: [tasks, tensors] in `tasks` and `tensor_names` order; blocks: one BlockFit
    per block trained, in forward order; examples: the examples each task's data gave (at most
    the `examples` parameter); state_dict: the optimiser's own view of the merged weights (the
    engine's, from the config, is the result)."""

    state_dict: dict[str, torch.Tensor]
    coefficients: torch.Tensor
    tasks: list[str]
    tensor_names: list[str]
    blocks: list[BlockFit]
    examples: dict[str, int]
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)


class BlockCoefficients(nn.Module):
    """The coefficients of one block, [tasks, tensors of the block]: the only parameter the
    training loop sees. `weights()` gives the block's merged tensors base + sum_k c_k tau_k
    (by name inside the block), differentiable in the coefficients."""

    def __init__(self, base: Mapping[str, torch.Tensor], vectors: Mapping[str, torch.Tensor], init: float):
        super().__init__()
        self.names = list(vectors)
        tasks = next(iter(vectors.values())).shape[0]
        device = next(iter(vectors.values())).device
        self.coefficients = nn.Parameter(
            torch.full((tasks, len(self.names)), float(init), dtype=torch.float32, device=device)
        )
        # Plain dicts, not buffers: nothing of the models is a parameter of this module.
        self._base = dict(base)
        self._vectors = dict(vectors)

    def weights(self) -> dict[str, torch.Tensor]:
        out = {}
        for j, name in enumerate(self.names):
            tau = self._vectors[name]
            view = self.coefficients[:, j].reshape((-1,) + (1,) * (tau.dim() - 1)).to(tau.dtype)
            out[name] = self._base[name] + (view * tau).sum(0)
        return out


def _floats(tree: Any) -> list[torch.Tensor]:
    return [x for x in tree_flatten(tree)[0] if isinstance(x, torch.Tensor) and x.is_floating_point()]


def _rows(tree: Any, rows: torch.Tensor, n: int) -> Any:
    """The examples `rows` of every tensor in `tree` whose first dimension is the batch (`n`);
    other tensors (shared by the batch) and non-tensors are kept as they are."""
    return tree_map(
        lambda x: x.index_select(0, rows.to(x.device))
        if isinstance(x, torch.Tensor) and x.dim() > 0 and x.shape[0] == n else x,
        tree,
    )


def _detached(tree: Any) -> Any:
    return tree_map(lambda x: x.detach() if isinstance(x, torch.Tensor) else x, tree)


@dataclass
class _Chunk:
    """One batch of one task's examples: the model's inputs, and what block l sees of them."""

    task: int
    inputs: Any
    rows: int
    block_args: tuple = ()
    block_kwargs: dict = field(default_factory=dict)
    target: Any = None


class BlockExamples:
    """One block's distillation data, an `Examples` of the training loop (mergelab.training).

    The index space is every example of every task (task by task, batch by batch). The loss of
    a batch of indices is the mean squared error, over every floating output element of those
    examples, between the block with `model.weights()` on the merged inputs and the fine-tune's
    output (`_Chunk.target`). Examples of one data batch run through the block together (they
    share its padding); the block runs in eval mode (no dropout).
    """

    def __init__(self, block: nn.Module, name: str, chunks: Sequence[_Chunk]):
        self.block, self.name, self.chunks = block, name, list(chunks)
        owner, local = [], []
        for c, chunk in enumerate(self.chunks):
            owner += [c] * chunk.rows
            local += list(range(chunk.rows))
        self.owner, self.local = torch.tensor(owner), torch.tensor(local)

    def __len__(self) -> int:
        return int(self.owner.numel())

    def loss(self, model: nn.Module, head: nn.Module | None, indices: torch.Tensor) -> torch.Tensor:
        if not isinstance(model, BlockCoefficients):
            raise TypeError("BlockExamples trains a BlockCoefficients")
        weights = model.weights()
        owners, locals_ = self.owner[indices], self.local[indices]
        total = model.coefficients.new_zeros(())
        count = 0
        for c in torch.unique(owners).tolist():
            chunk = self.chunks[c]
            rows = locals_[owners == c]
            whole = rows.numel() == chunk.rows and bool((rows == torch.arange(chunk.rows)).all())
            args, kwargs, target = chunk.block_args, chunk.block_kwargs, chunk.target
            if not whole:
                args, kwargs = _rows(args, rows, chunk.rows), _rows(kwargs, rows, chunk.rows)
                target = _rows(target, rows, chunk.rows)
            output = functional_call(self.block, weights, tuple(args), kwargs, strict=False)
            produced, expected = _floats(output), _floats(target)
            if len(produced) != len(expected) or any(
                p.shape != e.shape for p, e in zip(produced, expected, strict=False)
            ):
                raise DataError(
                    f"block `{self.name}`: the merged block's output "
                    f"{[tuple(p.shape) for p in produced]} does not match the fine-tune's "
                    f"{[tuple(e.shape) for e in expected]}"
                )
            for p, e in zip(produced, expected, strict=True):
                total = total + (p.float() - e.float()).pow(2).sum()
                count += p.numel()
        return total / max(count, 1)


def _capture(module: nn.Module, forward, inputs, block: nn.Module, *, output: bool) -> Any:
    """Run `forward(module, inputs)` (no gradients) until `block` is first called; return the
    (args, kwargs) it is called with, or (with `output`) what it returns. The rest of the
    model does not run."""
    captured: list[Any] = []
    if output:
        def hook(_m, _args, result):
            captured.append(_detached(result))
            raise StopForward

        handle = block.register_forward_hook(hook)
    else:
        def hook(_m, args, kwargs):
            captured.append((_detached(args), _detached(kwargs)))
            raise StopForward

        handle = block.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        with torch.no_grad():
            forward(module, inputs)
    except StopForward:
        pass
    finally:
        handle.remove()
    return captured[0] if captured else None


def _check(module: nn.Module, base: StateDict, finetuned: Mapping[str, StateDict],
           data: Mapping[str, TaskData], examples: int) -> None:  # fmt: skip
    """Every problem of the inputs at once, before any data runs."""
    problems: list[str] = []
    missing = sorted(set(finetuned) - set(data))
    extra = sorted(set(data) - set(finetuned))
    if missing:
        problems.append(f"no data for {missing}")
    if extra:
        problems.append(f"data for unknown model(s) {extra}")
    if examples < 1:
        problems.append(f"`examples` must be at least 1; got {examples}")
    own = module.state_dict()
    lacking = sorted(k for k, v in base.items() if v.is_floating_point() and k not in own)
    if lacking:
        problems.append(f"the architecture has no tensor(s) {lacking[:8]}"
                        + (f" and {len(lacking) - 8} more" if len(lacking) > 8 else "")
                        + " of the models: its layers do not match theirs")  # fmt: skip
    for key, value in base.items():
        if key in own and tuple(own[key].shape) != tuple(value.shape):
            problems.append(f"`{key}`: shape {list(value.shape)} in the models, "
                            f"{list(own[key].shape)} in the architecture")  # fmt: skip
        for task, state in finetuned.items():
            if key not in state:
                problems.append(f"model {task!r} lacks `{key}`")
            elif tuple(state[key].shape) != tuple(value.shape):
                problems.append(f"model {task!r}: `{key}` has shape {list(state[key].shape)}, "
                                f"the base {list(value.shape)}")  # fmt: skip
    if problems:
        raise DataError("ProDistill cannot start: " + "; ".join(problems))


def prodistill(
    module: nn.Module,
    base: StateDict,
    finetuned: Mapping[str, StateDict],
    data: Mapping[str, TaskData],
    *,
    examples: int = 64,
    steps: int = 100,
    lr: float = 0.01,
    init: float = 0.3,
    batch_size: int = 32,
    seed: int = 0,
    device: str | torch.device | None = None,
    progress: bool = False,
) -> ProDistillResult:
    """Learn ProDistill's per-task, per-tensor coefficients block by block (module docstring).

    module: the architecture (copied; the caller's module is not modified). base: theta_0,
        the same keys and shapes as every fine-tuned state dict and as the module's.
    data: per task (the names of `finetuned`): its batches; only the inputs are used (no
        labels, no head); `forward(module, inputs)` (default: call the module) runs the model.
    examples: at most this many examples of each task's data (the first ones) are used.
    steps: training steps per block; batch_size: examples per step (at most all of them);
        lr: Adam's learning rate; init: every coefficient's starting value; seed: the order in
        which examples are drawn (one stream over all blocks).
    Raises DataError before any data runs when data is missing for a model or given for an
    unknown one, or the architecture's tensors do not match the models'; and when a task's
    data holds no example, before any block trains.
    """
    from mergelab.training import FinetuneSettings, train

    start = time.perf_counter()
    tasks = list(finetuned)
    _check(module, base, finetuned, data, examples)
    dev = torch.device(device) if device is not None else None
    on = (lambda x: x.to(dev)) if dev is not None else (lambda x: x)
    vectors: dict[str, torch.Tensor] = {}
    for key, value in base.items():
        if not value.is_floating_point():
            continue
        stacked = torch.stack([finetuned[t][key].to(value.dtype) - value for t in tasks])
        if bool(stacked.any()):
            vectors[key] = on(stacked)
    base_on = {k: on(v) for k, v in base.items()}
    work = copy.deepcopy(module)
    work = work.to(dev) if dev is not None else work
    work.eval().requires_grad_(False)

    chunks: list[_Chunk] = []
    counts: dict[str, int] = {}
    for i, task in enumerate(tasks):
        counts[task] = 0
        for inputs, _ in limited(data[task].iterate(), examples):
            n = examples_in(inputs)
            if n:
                chunks.append(_Chunk(task=i, inputs=to_device(inputs, dev), rows=n))
                counts[task] += n
    empty = [t for t in tasks if counts[t] == 0]
    if empty:
        raise DataError(f"ProDistill: the data of {empty} holds no example (it needs a few per task)")
    forwards = [raw_forward(data[t]) for t in tasks]

    merged = {k: base_on[k] + float(init) * vectors[k].sum(0) for k in vectors}
    load_weights(work, {**base_on, **merged})
    order = execution_order(work, data[tasks[0]], dev)
    blocks: dict[str, None] = {}
    for leaf in order:
        blocks.setdefault(block_of(leaf), None)
    named = dict(work.named_modules())
    owner: dict[str, str] = {}
    for key in vectors:
        for name in blocks:
            if key.startswith(name + "."):
                owner.setdefault(key, name)
    trained_blocks = [b for b in blocks if any(owner.get(k) == b for k in vectors)]

    tensor_names = list(vectors)
    coefficients = torch.full((len(tasks), len(tensor_names)), float(init), dtype=torch.float32)
    column = {k: j for j, k in enumerate(tensor_names)}
    total_examples = sum(c.rows for c in chunks)
    settings = FinetuneSettings.checked(
        steps=steps, batch_size=min(batch_size, total_examples), learning_rate=lr,
        warmup_steps=0, schedule="constant", optimizer="adam", weight_decay=0.0,
        sampling="epochs", freeze_input_embeddings=False, seed=seed,
    )  # fmt: skip
    generator = torch.Generator().manual_seed(seed)
    fits: list[BlockFit] = []
    notes: list[str] = []
    if settings.batch_size < batch_size:
        notes.append(f"ProDistill: `batch_size` {batch_size} exceeds the {total_examples} "
                     f"examples; every step uses all of them")  # fmt: skip
    finetuned_on = [{**base_on, **{k: on(v) for k, v in finetuned[t].items()}} for t in tasks]
    with progress_bar("ProDistill", steps * len(trained_blocks), progress) as advance:
        for name in trained_blocks:
            block = named[name]
            keys = [k for k in vectors if owner.get(k) == name]
            local = {k[len(name) + 1:]: k for k in keys}
            # Targets: fine-tune k's own output of this block on task k's examples.
            for i in range(len(tasks)):
                load_weights(work, finetuned_on[i])
                for chunk in (c for c in chunks if c.task == i):
                    chunk.target = _capture(work, forwards[i], chunk.inputs, block, output=True)
            # Inputs: what this block receives in the merged model (earlier blocks learned).
            load_weights(work, {**base_on, **merged})
            for chunk in chunks:
                captured = _capture(work, forwards[chunk.task], chunk.inputs, block, output=False)
                if captured is None or chunk.target is None:
                    raise DataError(f"ProDistill: block `{name}` did not run on the data of "
                                    f"{tasks[chunk.task]!r}")  # fmt: skip
                chunk.block_args, chunk.block_kwargs = captured
            coefficient_module = BlockCoefficients(
                {n: base_on[k] for n, k in local.items()}, {n: vectors[k] for n, k in local.items()}, init
            )
            block_examples = BlockExamples(block, name, chunks)
            everything = torch.arange(len(block_examples))
            with torch.no_grad():
                initial = float(block_examples.loss(coefficient_module, None, everything))
            losses = train(coefficient_module, block_examples, settings, generator=generator,
                           progress=advance, description=f"ProDistill {name}")  # fmt: skip
            with torch.no_grad():
                final = float(block_examples.loss(coefficient_module, None, everything))
                learned = coefficient_module.weights()
            if not torch.isfinite(coefficient_module.coefficients).all():
                raise DataError(f"ProDistill: the coefficients of block `{name}` became non-finite")
            for n, key in local.items():
                merged[key] = learned[n].detach()
                coefficients[:, column[key]] = coefficient_module.coefficients.detach()[
                    :, coefficient_module.names.index(n)
                ].cpu()
            fits.append(BlockFit(name, keys, initial, final, losses))
            for chunk in chunks:  # the next block needs other activations
                chunk.block_args, chunk.block_kwargs, chunk.target = (), {}, None
    untouched = [k for k in vectors if k not in owner]
    if untouched:
        shown = ", ".join(untouched[:6]) + (" ..." if len(untouched) > 6 else "")
        notes.append(f"ProDistill: {len(untouched)} tensor(s) outside every block that runs keep "
                     f"the initial coefficient {init:g}: {shown}")  # fmt: skip
    state = {}
    for key, value in base.items():
        value_merged = merged.get(key)
        state[key] = value.clone() if value_merged is None else value_merged.detach().to(value.device, value.dtype)
    return ProDistillResult(
        state_dict=state,
        coefficients=coefficients,
        tasks=tasks,
        tensor_names=tensor_names,
        blocks=fits,
        examples=counts,
        seconds=time.perf_counter() - start,
        notes=notes,
    )


def optimise(plan, provider, options, folders=None):
    """The `prodistill` optimisation stage: learn the coefficients on the provider's data and
    return (the task-arithmetic config that applies them, the ProDistillResult)."""
    params, tasks, base, finetuned = coefficient_inputs(plan)
    examples = int(params["examples"])
    if options.max_examples is not None:
        examples = min(examples, int(options.max_examples))
    if provider is None:
        raise DataError("ProDistill learns from data: it needs the data of every model")
    data = {k: provider.task_data(k) for k in tasks}
    result = prodistill(
        provider.module(),
        base,
        finetuned,
        data,
        examples=examples,
        steps=int(params["steps"]),
        lr=float(params["lr"]),
        init=float(params["init"]),
        batch_size=int(params["batch_size"]),
        seed=int(params["seed"]),
        device=options.device,
        progress=options.progress,
    )
    return coefficients_config(plan.config, tasks, result.coefficients, result.tensor_names), result


def describe(plan) -> dict:
    """What a dry run reports of the `prodistill` stage (nothing is run): the examples per task
    it will use, the blocks, and the forward passes that costs."""
    params = plan.tasks[0].params if plan.tasks else {}
    data = plan.config.data
    examples = int(params.get("examples", 0))
    if data is not None:
        examples = min(examples, data.examples)
    steps, batch = int(params.get("steps", 0)), int(params.get("batch_size", 0))
    tasks = len(plan.merged_sources)
    batch = min(batch, examples * tasks) if examples else batch
    owners = {t.name.rpartition(".")[0] for t in plan.tasks if t.is_float}
    blocks = len({block_of(o) for o in owners if o})
    partial = 2 * tasks * examples  # per block: the fine-tunes' outputs and the merged inputs
    scored = 2 * tasks * examples  # per block: the loss over all examples before and after
    return {
        "output": "a task_arithmetic config with the learned per-model, per-tensor weights",
        "examples": examples,
        "estimated_forward_passes": blocks * (steps * batch + partial + scored),
        "cost": f"about {blocks} blocks x ({steps} steps x {batch} examples through one block, "
        f"forward and backward; {partial} partial forward passes: {tasks} task(s) x {examples} "
        f"examples through the fine-tune and through the merged model; {scored} through the "
        "block to score the loss before and after)",
    }
