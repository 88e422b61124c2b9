"""A miniature modality-specific (VLMo-style) transformer and its modality-agnostic twin.

Sung et al. 2023, "An Empirical Study of Multimodal Model Merging" (EMNLP Findings,
https://arxiv.org/abs/2304.14933; code: github.com/ylsung/vl-merging) merge the modality copies
of a VLMo-style transformer (Bao et al. 2022, "VLMo: Unified Vision-Language Pre-Training with
Mixture-of-Modality-Experts", https://arxiv.org/abs/2111.02358) into one modality-agnostic
transformer. This module is that family in miniature:

- a *modality-specific* model keeps, in every block, a vision (`v`) and a language (`l`) copy of
  the layer norms, attention projections and MLP, and in its top `vl_layers` blocks also a
  vision-language (`vl`) copy; embeddings, the final norm and the pre-training heads are shared;
- the *modality-agnostic* model has one copy per block, used by every token.

Routing (VLMo): an image alone goes through the `v` copies of every block, a text alone through
the `l` copies; an image-text pair is one joint sequence (image tokens, then text tokens) whose
bottom blocks send image tokens through `v` and text tokens through `l`, attention running over
the whole sequence, and whose top `vl_layers` blocks send every token through `vl`.

Names (the contract the `mergelab-mini` preset of `mergelab.plan.expert_groups` matches): block i
of a specific model holds `blocks.{i}.norm1_{m}`, `blocks.{i}.attn_{m}.qkv`, `blocks.{i}.attn_{m}.proj`,
`blocks.{i}.norm2_{m}`, `blocks.{i}.mlp_{m}.fc1`, `blocks.{i}.mlp_{m}.fc2`; the agnostic model
has the same names without the `_{m}` suffix. Every other tensor has one name in both. All
layers are plain `nn.Linear` / `nn.LayerNorm`, so Gram hooks (`mergelab.stats`) on an expert's
linear see exactly the tokens routed to it, which is what RegMean needs.

Seed pre-training hands over to modality-specific pre-training through `expand_to_specific`
(every expert starts as a copy of the shared weights); a specific model built from scratch has
independently initialised experts (the paper's "naive" setting).
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, replace

import torch
import torch.nn.functional as F
from torch import nn

from mergelab.errors import MergeLabError

StateDict = dict[str, torch.Tensor]

VISION, LANGUAGE, VISION_LANGUAGE = "v", "l", "vl"
# Sub-modules of a block that exist once per expert; their names carry the `_{m}` suffix.
EXPERT_PARTS = ("norm1", "attn", "norm2", "mlp")
IMAGE_TYPE, TEXT_TYPE = 0, 1
_EXPERT_KEY = re.compile(r"^blocks\.(\d+)\.(norm1|attn|norm2|mlp)(?:_(v|l|vl))?\.(.+)$")


@dataclass(frozen=True)
class FamilyConfig:
    """Shape of one model of the family. Every field is part of cache keys.

    vl_layers: how many top blocks carry a vision-language expert (specific model only; the
        agnostic twin keeps the value so that the two configs match).
    image_size: (height, width) of the single-channel input image; both divisible by
        `patch_size`.
    max_text_length: text positions, the leading [CLS] included.
    embed_dim: width of the contrastive (image-text matching) embeddings.
    """

    dim: int = 96
    depth: int = 4
    heads: int = 4
    mlp_ratio: float = 4.0
    vl_layers: int = 1
    image_size: tuple[int, int] = (32, 32)
    patch_size: int = 8
    vocab_size: int = 4096
    max_text_length: int = 24
    embed_dim: int = 64
    modality_specific: bool = True

    def __post_init__(self) -> None:
        problems = []
        if self.dim % self.heads:
            problems.append(f"`dim` ({self.dim}) must be divisible by `heads` ({self.heads})")
        if not 0 <= self.vl_layers <= self.depth:
            problems.append(f"`vl_layers` must be in [0, depth={self.depth}]; got {self.vl_layers}")
        height, width = self.image_size
        if height % self.patch_size or width % self.patch_size:
            problems.append(
                f"`image_size` {self.image_size} must be divisible by `patch_size` ({self.patch_size})"
            )
        if self.max_text_length < 2:
            problems.append(f"`max_text_length` must be at least 2; got {self.max_text_length}")
        if problems:
            raise MergeLabError("invalid FamilyConfig: " + "; ".join(problems))

    @property
    def num_patches(self) -> int:
        return (self.image_size[0] // self.patch_size) * (self.image_size[1] // self.patch_size)

    @property
    def patch_pixels(self) -> int:
        return self.patch_size * self.patch_size

    @property
    def mlp_hidden(self) -> int:
        return int(round(self.dim * self.mlp_ratio))

    def experts(self, block: int) -> tuple[str, ...]:
        """Expert names of `block` ("" is the single shared copy of an agnostic model)."""
        if not self.modality_specific:
            return ("",)
        if block >= self.depth - self.vl_layers:
            return (VISION, LANGUAGE, VISION_LANGUAGE)
        return (VISION, LANGUAGE)

    def to_dict(self) -> dict:
        return asdict(self)


def _suffix(expert: str) -> str:
    return f"_{expert}" if expert else ""


class Attention(nn.Module):
    """The two linear maps of one expert's self-attention. The attention itself runs over the
    joint sequence in `Block`, since tokens of different experts attend to each other."""

    def __init__(self, dim: int):
        super().__init__()
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


# A route sends tokens [start, stop) of the sequence through one expert.
Route = tuple[str, int, int]


class Block(nn.Module):
    """A pre-norm transformer block with one copy of its layers per expert."""

    def __init__(self, config: FamilyConfig, experts: Sequence[str]):
        super().__init__()
        self.heads = config.heads
        self.experts = tuple(experts)
        for expert in self.experts:
            s = _suffix(expert)
            self.add_module(f"norm1{s}", nn.LayerNorm(config.dim))
            self.add_module(f"attn{s}", Attention(config.dim))
            self.add_module(f"norm2{s}", nn.LayerNorm(config.dim))
            self.add_module(f"mlp{s}", Mlp(config.dim, config.mlp_hidden))

    def _part(self, part: str, expert: str) -> nn.Module:
        return getattr(self, f"{part}{_suffix(expert)}")

    def _routed(self, x: torch.Tensor, routes: Sequence[Route], part: str, *attribute: str) -> torch.Tensor:
        pieces = []
        for expert, start, stop in routes:
            module = self._part(part, expert)
            for name in attribute:
                module = getattr(module, name)
            pieces.append(module(x if len(routes) == 1 else x[:, start:stop]))
        return pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim=1)

    def forward(
        self, x: torch.Tensor, routes: Sequence[Route], attention_mask: torch.Tensor | None
    ) -> torch.Tensor:
        """x: [B, N, D]; routes cover 0..N in order; attention_mask: bool [B, 1, 1, N], True
        where a key may be attended to (None: every key)."""
        batch, tokens, dim = x.shape
        h = self._routed(x, routes, "norm1")
        qkv = self._routed(h, routes, "attn", "qkv")
        q, k, v = qkv.view(batch, tokens, 3, self.heads, dim // self.heads).permute(2, 0, 3, 1, 4)
        attended = F.scaled_dot_product_attention(q, k, v, attn_mask=attention_mask)
        attended = attended.transpose(1, 2).reshape(batch, tokens, dim)
        x = x + self._routed(attended, routes, "attn", "proj")
        return x + self._routed(self._routed(x, routes, "norm2"), routes, "mlp")


class MultimodalTransformer(nn.Module):
    """One model of the family: modality-specific (VLMo experts) or modality-agnostic.

    Inputs: `pixels` float [B, 1, H, W] in [0, 1]; `input_ids` long [B, L] starting with the
    [CLS] id, padded with `pad_id` (0). Outputs are the final-norm hidden states; the CLS vector
    of an image or a pair is position 0, of a text position 0 as well.
    """

    pad_id = 0

    def __init__(self, config: FamilyConfig):
        super().__init__()
        self.config = config
        d = config.dim
        self.patch_embed = nn.Linear(config.patch_pixels, d)
        self.image_cls = nn.Parameter(torch.zeros(1, 1, d))
        self.image_mask_token = nn.Parameter(torch.zeros(1, 1, d))
        self.image_pos = nn.Parameter(torch.zeros(1, 1 + config.num_patches, d))
        self.token_embed = nn.Embedding(config.vocab_size, d)
        self.text_pos = nn.Parameter(torch.zeros(1, config.max_text_length, d))
        self.type_embed = nn.Embedding(2, d)
        self.blocks = nn.ModuleList(Block(config, config.experts(i)) for i in range(config.depth))
        self.norm = nn.LayerNorm(d)
        # Pre-training heads (shared by every expert, as in VLMo).
        self.mim_head = nn.Linear(d, config.patch_pixels)
        self.mlm_head = nn.Linear(d, config.vocab_size)
        self.itm_head = nn.Linear(d, 2)
        self.itc_image = nn.Linear(d, config.embed_dim)
        self.itc_text = nn.Linear(d, config.embed_dim)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))
        self.reset_parameters()

    # --- initialisation -------------------------------------------------------------------------

    def reset_parameters(self) -> None:
        """Truncated-normal (std 0.02) weights and zero biases, as ViT/BEiT; layer norms at
        identity. Parameters are drawn in module order, so a seeded global RNG (or
        `torch.manual_seed` before construction) reproduces a model; every expert is drawn
        separately (the naive setting's independent initialisation)."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=0.02)
                nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Embedding):
                nn.init.trunc_normal_(module.weight, std=0.02)
            elif isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
        for parameter in (self.image_cls, self.image_mask_token, self.image_pos, self.text_pos):
            nn.init.trunc_normal_(parameter, std=0.02)
        with torch.no_grad():
            self.logit_scale.fill_(math.log(1 / 0.07))

    # --- embeddings ----------------------------------------------------------------------------

    def patchify(self, pixels: torch.Tensor) -> torch.Tensor:
        """[B, 1, H, W] -> [B, num_patches, patch_size**2], patches in row-major order."""
        p = self.config.patch_size
        batch, channels, height, width = pixels.shape
        if channels != 1 or (height, width) != tuple(self.config.image_size):
            raise MergeLabError(
                f"pixels must be [B, 1, {self.config.image_size[0]}, {self.config.image_size[1]}]; "
                f"got {tuple(pixels.shape)}"
            )
        patches = pixels.reshape(batch, height // p, p, width // p, p).permute(0, 1, 3, 2, 4)
        return patches.reshape(batch, -1, p * p)

    def embed_image(self, pixels: torch.Tensor, patch_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Patch embeddings + [image CLS] + positions + type; masked patches (bool [B, P], for
        masked image modelling) are replaced by the learned mask token."""
        x = self.patch_embed(self.patchify(pixels) * 2 - 1)
        if patch_mask is not None:
            x = torch.where(patch_mask.unsqueeze(-1), self.image_mask_token.to(x.dtype), x)
        x = torch.cat([self.image_cls.expand(x.shape[0], -1, -1), x], dim=1)
        return x + self.image_pos + self.type_embed.weight[IMAGE_TYPE]

    def embed_text(self, input_ids: torch.Tensor) -> torch.Tensor:
        length = input_ids.shape[1]
        if length > self.config.max_text_length:
            raise MergeLabError(
                f"input_ids hold {length} positions; the model takes at most "
                f"{self.config.max_text_length}"
            )
        x = self.token_embed(input_ids) + self.text_pos[:, :length]
        return x + self.type_embed.weight[TEXT_TYPE]

    # --- routing -------------------------------------------------------------------------------

    def routes(self, block: int, image_tokens: int, text_tokens: int) -> list[Route]:
        """Which expert each token of block `block` goes through (VLMo's routing)."""
        total = image_tokens + text_tokens
        if not self.config.modality_specific:
            return [("", 0, total)]
        if text_tokens == 0:
            return [(VISION, 0, total)]
        if image_tokens == 0:
            return [(LANGUAGE, 0, total)]
        if VISION_LANGUAGE in self.config.experts(block):
            return [(VISION_LANGUAGE, 0, total)]
        return [(VISION, 0, image_tokens), (LANGUAGE, image_tokens, total)]

    def forward(
        self,
        pixels: torch.Tensor | None = None,
        input_ids: torch.Tensor | None = None,
        patch_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Hidden states after the final norm: [B, 1 + P, D] for an image, [B, L, D] for a
        text, [B, 1 + P + L, D] for a pair (image tokens first)."""
        if pixels is None and input_ids is None:
            raise MergeLabError("give `pixels`, `input_ids` or both")
        parts, key_valid = [], []
        if pixels is not None:
            image = self.embed_image(pixels, patch_mask)
            parts.append(image)
            key_valid.append(torch.ones(image.shape[:2], dtype=torch.bool, device=image.device))
        if input_ids is not None:
            parts.append(self.embed_text(input_ids))
            key_valid.append(input_ids != self.pad_id)
        if len(parts) == 2 and parts[0].shape[0] != parts[1].shape[0]:
            raise MergeLabError(
                f"{parts[0].shape[0]} images for {parts[1].shape[0]} texts in one pair batch"
            )
        x = parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)
        valid = key_valid[0] if len(key_valid) == 1 else torch.cat(key_valid, dim=1)
        mask = None if bool(valid.all()) else valid[:, None, None, :]
        image_tokens = parts[0].shape[1] if pixels is not None else 0
        text_tokens = x.shape[1] - image_tokens
        for index, block in enumerate(self.blocks):
            x = block(x, self.routes(index, image_tokens, text_tokens), mask)
        return self.norm(x)

    # --- CLS outputs ---------------------------------------------------------------------------

    def encode_image(self, pixels: torch.Tensor) -> torch.Tensor:
        """The image CLS vector [B, D] (vision experts only)."""
        return self(pixels=pixels)[:, 0]

    def encode_text(self, input_ids: torch.Tensor) -> torch.Tensor:
        """The text CLS vector [B, D] (language experts only)."""
        return self(input_ids=input_ids)[:, 0]

    def encode_pair(self, pixels: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
        """The joint CLS vector [B, D] of image-text pairs (the image CLS position)."""
        return self(pixels=pixels, input_ids=input_ids)[:, 0]

    def image_embedding(self, pixels: torch.Tensor) -> torch.Tensor:
        """L2-normalised contrastive image embedding [B, embed_dim]."""
        return F.normalize(self.itc_image(self.encode_image(pixels)), dim=-1)

    def text_embedding(self, input_ids: torch.Tensor) -> torch.Tensor:
        """L2-normalised contrastive text embedding [B, embed_dim]."""
        return F.normalize(self.itc_text(self.encode_text(input_ids)), dim=-1)

    # --- the twins -----------------------------------------------------------------------------

    def agnostic_twin(self) -> MultimodalTransformer:
        """A fresh modality-agnostic model of this model's shape (weights freshly drawn)."""
        return MultimodalTransformer(agnostic_config(self.config))

    def expand_to_specific(self, agnostic_state: Mapping[str, torch.Tensor]) -> StateDict:
        """`expand_to_specific(agnostic_state, self.config)`; see there."""
        return expand_to_specific(agnostic_state, self.config)


def agnostic_config(config: FamilyConfig) -> FamilyConfig:
    return replace(config, modality_specific=False)


def specific_config(config: FamilyConfig) -> FamilyConfig:
    return replace(config, modality_specific=True)


def expand_to_specific(
    agnostic_state: Mapping[str, torch.Tensor], config: FamilyConfig
) -> StateDict:
    """The state dict of a specific model whose every expert is a copy of the shared weights.

    This is how seed pre-training hands over to modality-specific pre-training: the specific
    model then computes exactly what the agnostic one did, on every kind of input. Shared
    tensors keep their names. Tensors are cloned (the result shares no storage with the input).
    Raises MergeLabError when a key is already expert-suffixed or names a block outside
    `config.depth`.
    """
    config = specific_config(config)
    out: StateDict = {}
    problems = []
    for name, tensor in agnostic_state.items():
        match = _EXPERT_KEY.match(name)
        if match is None:
            out[name] = tensor.detach().clone()
            continue
        block, part, expert, rest = match.groups()
        if expert is not None:
            problems.append(f"`{name}` already belongs to expert `{expert}`")
            continue
        if int(block) >= config.depth:
            problems.append(f"`{name}`: block {block} is outside depth {config.depth}")
            continue
        for expert_name in config.experts(int(block)):
            out[f"blocks.{block}.{part}_{expert_name}.{rest}"] = tensor.detach().clone()
    if problems:
        raise MergeLabError("expand_to_specific: " + "; ".join(sorted(problems)))
    return out


def expert_tensor_names(config: FamilyConfig, expert: str) -> list[str]:
    """Names of every tensor of `expert` in a specific model of `config`, block by block, in a
    fixed order (v and l give the same order, so their lists line up element by element)."""
    model_names = [
        "norm1.weight", "norm1.bias", "attn.qkv.weight", "attn.qkv.bias", "attn.proj.weight",
        "attn.proj.bias", "norm2.weight", "norm2.bias", "mlp.fc1.weight", "mlp.fc1.bias",
        "mlp.fc2.weight", "mlp.fc2.bias",
    ]  # fmt: skip
    names = []
    for block in range(config.depth):
        if expert not in specific_config(config).experts(block):
            continue
        for local in model_names:
            part, rest = local.split(".", 1)
            names.append(f"blocks.{block}.{part}_{expert}.{rest}")
    return names


def agnostic_name(expert_name: str) -> str:
    """`blocks.3.attn_v.qkv.weight` -> `blocks.3.attn.qkv.weight`; other names unchanged."""
    match = _EXPERT_KEY.match(expert_name)
    if match is None or match.group(3) is None:
        return expert_name
    block, part, _, rest = match.groups()
    return f"blocks.{block}.{part}.{rest}"


def build_model(config: FamilyConfig, seed: int) -> MultimodalTransformer:
    """A freshly initialised model, drawn from `seed` without touching the global RNG."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return MultimodalTransformer(config)
