"""A mixture of experts built from dense models: mergekit-moe's config format, as a plan.

    base_model: ./mistral-base            # attention, norms, embeddings, head; the router's inputs
    gate_mode: hidden                     # hidden | hidden_avg | cheap_embed | random | uniform_random
    dtype: bfloat16
    experts_per_token: 2
    experts:
      - source_model: ./math
        positive_prompts: ["solve", "equation"]
        negative_prompts: ["poem"]        # optional
        noise_scale: 0.01                 # optional: Gaussian noise added to the expert's MLP
        residual_scale: 0.5               # optional: scales the expert's down projection

The output is a Mixtral checkpoint (transformers' layout: per layer the experts' fused
`gate_up_proj` [experts, 2 x intermediate, hidden] and `down_proj` [experts, hidden,
intermediate], and the router `mlp.gate.weight` [experts, hidden]); with one shared expert (that
has prompts, or `architecture: qwen`) a Qwen-MoE checkpoint (`mlp.experts.N.*_proj.weight`, the
shared expert's MLP `mlp.shared_expert.*` and its gate `mlp.shared_expert_gate.weight`, zero
attention biases where the base has none), as mergekit-moe writes them. Every tensor outside
the MLPs is the base model's. The router rows follow mergekit 0.1.5 (`gate_vectors`): a prompt's vector is
the hidden state at each layer's input (`hidden`: the last token; `hidden_avg`: the mean over
tokens; the base model run in bfloat16), or the normalised sum of the prompts' token embeddings
(`cheap_embed`, the same for every layer); an expert's row is its positive prompts' mean vector
minus its negative prompts', normalised. `random`: standard normal rows; `uniform_random`:
nn.Linear's initialisation. The plan's expert tensors are assembled from the experts' MLP
weights by the engine, streamed layer by layer like a merge.

Not built: DeepSeek-MoE outputs (what mergekit makes of a shared expert without prompts), more
than one shared expert, Qwen3-MoE outputs.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal

import torch
from pydantic import Field, ValidationError, model_validator

from mergelab.errors import ConfigError, validation_problems
from mergelab.plan.layout import TensorSource, split_layer_name
from mergelab.schema import StrictModel

GateMode = Literal["hidden", "hidden_avg", "hidden_last", "cheap_embed", "random", "uniform_random"]
_MLP_PARTS = ("gate_proj", "up_proj", "down_proj")


class ExpertSpec(StrictModel):
    """One dense model whose MLPs become one expert of every layer."""

    source_model: str = Field(description="Path of the expert's checkpoint folder.")
    positive_prompts: list[str] | None = Field(
        default=None, description="Prompts that should be routed to this expert."
    )
    negative_prompts: list[str] | None = Field(
        default=None, description="Prompts that should not (subtracted from its router row)."
    )
    noise_scale: float | None = Field(
        default=None, ge=0, description="Std of Gaussian noise added to the expert's MLP weights."
    )
    residual_scale: float | None = Field(
        default=None, description="Factor on the expert's down projection."
    )


class MoEConfig(StrictModel):
    """mergekit-moe's config: a base model and the experts built from dense models."""

    base_model: str = Field(description="The model every non-MLP tensor comes from.")
    experts: list[ExpertSpec] = Field(min_length=1, description="The experts, in router order.")
    gate_mode: GateMode = Field(default="hidden", description="How the router rows are made.")
    dtype: Literal["float32", "float16", "bfloat16"] | None = Field(
        default=None, description="Output dtype (default: the base model's)."
    )
    experts_per_token: int = Field(default=2, ge=1, description="Experts each token is routed to.")
    shared_experts: list[ExpertSpec] | None = Field(
        default=None, description="One expert every token goes through (a Qwen-MoE output)."
    )
    architecture: str | None = Field(
        default=None, description="Output architecture: mixtral or qwen (default: by the experts)."
    )

    @property
    def output(self) -> Literal["mixtral", "qwen_moe"]:
        """Mixtral without a shared expert, Qwen-MoE with one (validated in `_checks`)."""
        return "qwen_moe" if self.shared_experts else "mixtral"

    @property
    def gated(self) -> list[ExpertSpec]:
        """The experts that get router rows, in row order: the experts, then the shared one
        (its rows are its gate's)."""
        return [*self.experts, *(self.shared_experts or [])]

    @model_validator(mode="after")
    def _checks(self) -> MoEConfig:
        problems = []
        arch = (self.architecture or "").lower()
        random_gates = self.gate_mode in ("random", "uniform_random")
        if self.shared_experts:
            shared = self.shared_experts[0]
            if len(self.shared_experts) > 1:
                problems.append(f"shared_experts: at most one shared expert (a Qwen-MoE output); "
                                f"got {len(self.shared_experts)}")
            elif arch and not "qwen moe".startswith(arch):
                problems.append(f"architecture: a shared expert makes a Qwen-MoE output; got "
                                f"{self.architecture!r}")
            elif not shared.positive_prompts and not (arch and random_gates):
                problems.append(
                    "shared_experts.0.positive_prompts: a shared expert without prompts makes "
                    "mergekit build a DeepSeek-MoE output, which mergelab does not; give it "
                    "prompts for a Qwen-MoE output (or `architecture: qwen` with random gates)"
                )
        elif arch and not "mixtral".startswith(arch):
            problems.append(f"architecture: without a shared expert the output is Mixtral; got "
                            f"{self.architecture!r}")
        if len(self.experts) < self.experts_per_token:
            problems.append(f"experts: {len(self.experts)} expert(s) for experts_per_token "
                            f"{self.experts_per_token}")
        if not random_gates:
            for i, expert in enumerate(self.experts):
                if not expert.positive_prompts:
                    problems.append(f"experts.{i}.positive_prompts: gate_mode {self.gate_mode} "
                                    "needs prompts for every expert")
            prompts = {(tuple(e.positive_prompts or ()), tuple(e.negative_prompts or ()))
                       for e in self.experts}
            if len(self.experts) > 1 and len(prompts) == 1:
                problems.append("experts: every expert has the same prompts, so the router "
                                "cannot tell them apart")
        if problems:
            raise ValueError("\n".join(problems))  # one line each (validation_problems)
        return self


def parse_moe_config(data: Any, source: str | None = None) -> MoEConfig:
    """Validate a mergekit-moe config mapping (every problem at once)."""
    if not isinstance(data, dict):
        raise ConfigError(f"the config must be a mapping; got {type(data).__name__}", source)
    try:
        return MoEConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(validation_problems(exc), source) from None


def mlp_name(layer: int, part: str) -> str:
    return f"model.layers.{layer}.mlp.{part}.weight"


def check_sources(config: MoEConfig, sources: Mapping[str, TensorSource]) -> list[str]:
    """Every expert has the base's layers and MLP shapes, and the base is a Llama/Mistral."""
    problems = []
    base = sources[config.base_model]
    cfg = base.config() or {}
    allowed = ("llama", "mistral") if config.output == "mixtral" else ("llama", "mistral", "qwen2")
    if cfg.get("model_type") not in allowed:
        problems.append(f"base_model: a {config.output} output needs {' or '.join(allowed)} "
                        f"models; {config.base_model!r} is {cfg.get('model_type')!r}")
    layers = cfg.get("num_hidden_layers")
    if not isinstance(layers, int):
        problems.append(f"base_model: {config.base_model!r} has no num_hidden_layers in config.json")
        return problems
    labelled = [(f"experts.{i}", e) for i, e in enumerate(config.experts)]
    labelled += [(f"shared_experts.{i}", e) for i, e in enumerate(config.shared_experts or [])]
    for where, expert in labelled:
        src = sources[expert.source_model]
        model_type = (src.config() or {}).get("model_type")
        if model_type != cfg.get("model_type"):
            problems.append(f"{where}.source_model: {expert.source_model!r} is {model_type!r}, "
                            f"the base is {cfg.get('model_type')!r}")
        for layer in range(layers):
            for part in _MLP_PARTS:
                name = mlp_name(layer, part)
                if src.resolve(name) is None:
                    problems.append(f"{where}: tensor `{name}` is missing from {expert.source_model!r}")
                elif base.resolve(name) is not None and tuple(src.shape(name)) != tuple(base.shape(name)):
                    problems.append(f"{where}: tensor `{name}` has shape {list(src.shape(name))}, "
                                    f"the base's is {list(base.shape(name))}")
    return problems


def output_config(config: MoEConfig, base: TensorSource, dtype: str) -> dict:
    """The output's config.json: the base's, as the MoE architecture's config with the experts
    and router settings (what transformers' save_pretrained writes of it)."""
    import transformers

    if base.root is not None and (base.root / "config.json").is_file():
        base = transformers.AutoConfig.from_pretrained(str(base.root), local_files_only=True)
    else:
        base = transformers.AutoConfig.for_model(**(base.config() or {}))
    if config.output == "qwen_moe":
        out = transformers.Qwen2MoeConfig(**base.to_dict())
        out.architectures = ["Qwen2MoeForCausalLM"]
        out.num_experts = len(config.experts)
        out.num_experts_per_tok = config.experts_per_token
        out.decoder_sparse_step = 1
        out.norm_topk_prob = True
        out.sliding_window = None
        out.use_sliding_window = False
        out.shared_expert_intermediate_size = out.intermediate_size
        out.moe_intermediate_size = out.intermediate_size
        out.torch_dtype = dtype
        import json

        return json.loads(out.to_json_string())
    if not isinstance(base, transformers.MistralConfig):
        mistral = transformers.MistralConfig(**base.to_dict())
        mistral.sliding_window = None
        mistral.max_position_embeddings = base.max_position_embeddings
        base = mistral
    out = transformers.MixtralConfig(**base.to_dict())
    out.architectures = ["MixtralForCausalLM"]
    out.num_local_experts = len(config.experts)
    out.num_experts_per_tok = config.experts_per_token
    out.sliding_window = None
    out.torch_dtype = dtype
    import json

    return json.loads(out.to_json_string())  # what save_pretrained writes (non-defaults)


def gate_vectors(
    config: MoEConfig,
    base: TensorSource,
    tokenizer: Any,
    generator: torch.Generator,
    run_model: Callable[[Any], Sequence[torch.Tensor]] | None = None,
) -> torch.Tensor:
    """The router rows [layers, experts (+ the shared expert), hidden] (float32), by
    `config.gate_mode`.

    run_model(tokenized) -> per-layer hidden states [layers, batch, seq, hidden] of the base
    model (default: loaded with transformers, in bfloat16 as mergekit does).
    """
    cfg = base.config() or {}
    layers, hidden, experts = cfg["num_hidden_layers"], cfg["hidden_size"], len(config.gated)
    if config.gate_mode == "random":
        return torch.randn((layers, experts, hidden), generator=generator)
    if config.gate_mode == "uniform_random":
        scale = math.sqrt(1.0 / hidden)
        return torch.rand((layers, experts, hidden), generator=generator) * 2 * scale - scale
    if config.gate_mode == "cheap_embed":
        embed = base.get(base.resolve("model.embed_tokens.weight") or "model.embed_tokens.weight")

        def vector(tokenized) -> torch.Tensor:
            ids, mask = tokenized["input_ids"], tokenized["attention_mask"]
            onehot = torch.nn.functional.one_hot(ids, num_classes=embed.shape[0]).float()
            summed = ((onehot @ embed.float()) * mask.unsqueeze(-1)).sum(dim=1).sum(dim=0, keepdim=True)
            return (summed / summed.norm(dim=-1, keepdim=True).clamp(min=1e-8)).repeat(layers, 1)
    else:
        run = run_model or _hidden_runner(base)
        last = config.gate_mode != "hidden_avg"

        def vector(tokenized) -> torch.Tensor:
            states = torch.stack(list(run(tokenized))[:-1]).float()  # [layers, batch, seq, hidden]
            states = states[:, :, -1, :] if last else states.sum(dim=2) / states.shape[2]
            return states.sum(dim=1) / states.shape[1]

    rows = []
    for expert in config.gated:
        v = vector(_tokenize(expert.positive_prompts or [], tokenizer))
        if expert.negative_prompts:
            v = v - vector(_tokenize(expert.negative_prompts, tokenizer))
        rows.append(v / v.norm(p=2, dim=-1, keepdim=True).clamp(min=1e-8))
    return torch.stack(rows, dim=0).permute(1, 0, 2)


def router_tokenizer(folder: Any) -> Any:
    """The base tokenizer as the router prompts are tokenized (left padding with the BOS
    token, as mergekit-moe pads), which is also the one written to the output."""
    import transformers

    tok = transformers.AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    tok.padding_side = "left"
    tok.pad_token_id = tok.bos_token_id
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


def _tokenize(prompts: list[str], tokenizer: Any):
    return tokenizer([(tokenizer.bos_token or "") + p for p in prompts], return_tensors="pt",
                     padding=True, add_special_tokens=False)


def _hidden_runner(base: TensorSource) -> Callable[[Any], Sequence[torch.Tensor]]:
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(
        str(base.root), dtype=torch.bfloat16, local_files_only=True
    ).eval()

    def run(tokenized) -> Sequence[torch.Tensor]:
        with torch.no_grad():
            out = model(**tokenized, output_hidden_states=True, return_dict=True)
        return out.hidden_states

    return run


def is_mlp_tensor(name: str) -> bool:
    parts = split_layer_name(name)
    return parts is not None and parts[2].startswith("mlp.")


def build_moe_plan(
    config: MoEConfig,
    sources: dict[str, TensorSource],
    routers: torch.Tensor,
    out_config: dict,
    out_dtype: torch.dtype,
) -> Any:
    """The plan of the MoE checkpoint: the base's non-MLP tensors copied, each layer's expert
    tensors assembled from the experts' MLP weights, the router rows as constants."""
    from mergelab.plan.planner import Assembly, MergePlan, TensorTask

    base_key = config.base_model
    base = sources[base_key]
    layers = out_config["num_hidden_layers"]
    tasks: list[TensorTask] = []
    for name in base.keys():
        if is_mlp_tensor(name):
            continue
        dtype = base.dtype(name)
        tasks.append(TensorTask(
            name=name, shape=tuple(base.shape(name)),
            out_dtype=out_dtype if dtype.is_floating_point else dtype,
            inputs=((base_key, name),), base_index=None, model_params=({},), params={},
            is_float=dtype.is_floating_point, copied=True,
        ))
    keys = [e.source_model for e in config.experts]
    noise = tuple(e.noise_scale or 0.0 for e in config.experts)
    residual = tuple(1.0 if e.residual_scale is None else e.residual_scale for e in config.experts)
    if config.output == "qwen_moe":
        tasks += _qwen_layers(config, sources, routers, out_config, out_dtype)
    for layer in range(layers if config.output == "mixtral" else 0):
        prefix = f"model.layers.{layer}.mlp"
        first = sources[keys[0]]
        inter, hidden = first.shape(mlp_name(layer, "gate_proj"))
        gate_up = tuple((k, sources[k].resolve(mlp_name(layer, part)) or mlp_name(layer, part))
                        for k in keys for part in ("gate_proj", "up_proj"))
        tasks.append(TensorTask(
            name=f"{prefix}.experts.gate_up_proj", shape=(len(keys), 2 * inter, hidden),
            out_dtype=out_dtype, inputs=gate_up, base_index=None,
            model_params=tuple({} for _ in gate_up), params={},
            assembly=Assembly(groups=tuple((2 * i, 2 * i + 1) for i in range(len(keys))),
                              scales=tuple(1.0 for _ in gate_up),
                              noise=tuple(n for n in noise for _ in range(2))),
        ))
        down = tuple((k, sources[k].resolve(mlp_name(layer, "down_proj")) or mlp_name(layer, "down_proj"))
                     for k in keys)
        tasks.append(TensorTask(
            name=f"{prefix}.experts.down_proj", shape=(len(keys), hidden, inter),
            out_dtype=out_dtype, inputs=down, base_index=None,
            model_params=tuple({} for _ in down), params={},
            assembly=Assembly(groups=tuple((i,) for i in range(len(keys))), scales=residual,
                              noise=noise),
        ))
        tasks.append(TensorTask(
            name=f"{prefix}.gate.weight", shape=tuple(routers[layer].shape), out_dtype=out_dtype,
            inputs=(), base_index=None, model_params=(), params={},
            constant=routers[layer].contiguous(),
        ))
    return MergePlan(
        config=None, method=MOE_METHOD, sources=sources, tasks=tasks, merge_dtype=None,
        donor=base_key, tokenizer_donor=base_key, out_config=out_config,
        notes=[f"{'Mixtral' if config.output == 'mixtral' else 'Qwen-MoE'}: {len(keys)} experts "
               f"per layer over {layers} layers"
               + (" and a shared expert" if config.shared_experts else "")
               + f", {config.experts_per_token} per token, router rows by `{config.gate_mode}`"],
    )


def _qwen_layers(config: MoEConfig, sources: dict[str, TensorSource], routers: torch.Tensor,
                 out_config: dict, out_dtype: torch.dtype) -> list:
    """Qwen-MoE's per-layer tensors: each expert's and the shared expert's MLP under their own
    names, the routers, and zero attention biases where the base has none (Qwen-MoE has them)."""
    from mergelab.plan.planner import Assembly, TensorTask

    base = sources[config.base_model]
    experts = len(config.experts)
    heads, kv_heads = out_config["num_attention_heads"], out_config["num_key_value_heads"]
    head_dim = out_config["hidden_size"] // heads
    tasks = []

    def copy(name: str, expert: ExpertSpec, out_name: str) -> TensorTask:
        src = sources[expert.source_model]
        actual = src.resolve(name) or name
        scale = expert.residual_scale if "down_proj" in name and expert.residual_scale is not None else 1.0
        return TensorTask(
            name=out_name, shape=tuple(src.shape(actual)), out_dtype=out_dtype,
            inputs=((expert.source_model, actual),), base_index=None, model_params=({},), params={},
            assembly=Assembly(groups=((0,),), scales=(scale,), noise=(expert.noise_scale or 0.0,),
                              stack=False),
        )

    for layer in range(out_config["num_hidden_layers"]):
        for part in _MLP_PARTS:
            name = mlp_name(layer, part)
            for i, expert in enumerate(config.experts):
                tasks.append(copy(name, expert, f"model.layers.{layer}.mlp.experts.{i}.{part}.weight"))
            tasks.append(copy(name, config.shared_experts[0],
                              f"model.layers.{layer}.mlp.shared_expert.{part}.weight"))
        for proj, count in (("q_proj", heads), ("k_proj", kv_heads), ("v_proj", kv_heads)):
            name = f"model.layers.{layer}.self_attn.{proj}.bias"
            if base.resolve(name) is None:
                tasks.append(TensorTask(
                    name=name, shape=(count * head_dim,), out_dtype=out_dtype, inputs=(),
                    base_index=None, model_params=(), params={},
                    constant=torch.zeros(count * head_dim),
                ))
        for name, rows in ((f"model.layers.{layer}.mlp.gate.weight", routers[layer, :experts]),
                           (f"model.layers.{layer}.mlp.shared_expert_gate.weight",
                            routers[layer, experts:experts + 1])):
            tasks.append(TensorTask(
                name=name, shape=tuple(rows.shape), out_dtype=out_dtype, inputs=(),
                base_index=None, model_params=(), params={}, constant=rows.contiguous(),
            ))
    return tasks


def _no_kernel(_merge: Any) -> torch.Tensor:
    raise RuntimeError("a MoE plan has no merged tensors: its tasks are copies, assemblies and "
                       "constants")


def _moe_method():
    from mergelab.methods.registry import MergeMethod

    # Not in the registry: the plan's tasks never call a kernel; the declaration names what the
    # plan does in reports and in the written checkpoint's metadata.
    return MergeMethod(name="moe", title="Mixture of experts from dense models",
                       paper="mergekit-moe (Goddard et al., 2024)",
                       url="https://arxiv.org/abs/2403.13257", kernel=_no_kernel)


MOE_METHOD = _moe_method()
