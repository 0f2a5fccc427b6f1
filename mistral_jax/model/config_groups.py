"""The parts of MistralConfig that only some models have, each a small frozen dataclass that
checks itself: a mixture of experts (`MoE`), latent attention (`LatentAttention`), YaRN rope
scaling (`YaRN`) and Llama 4's query scale (`Llama4Scaling`). And what every part of the config raises on a bad value,
`ConfigError`, with the checks they share.

A model without such a part has None in its place (`config.moe is None`: a dense feed-forward),
so a reader of the model code sees at once which kind of model a branch is for.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any


class ConfigError(ValueError):
    """A config file or value that cannot describe a Mistral model."""


def check_int(owner: Any, *names: str, low: int = 1) -> None:
    """Raises ConfigError for the first of these fields of owner that is not an int >= low."""
    for name in names:
        value = getattr(owner, name)
        if not isinstance(value, int) or isinstance(value, bool) or value < low:
            kind = "a positive integer" if low == 1 else f"an integer >= {low}"
            raise ConfigError(f"{name} must be {kind}, got {value!r}")


def check_number(owner: Any, name: str, positive: bool = False) -> None:
    """Raises ConfigError unless the field is a finite number >= 0 (> 0 if positive)."""
    value = getattr(owner, name)
    if (not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value)
            or value < 0 or (positive and value == 0)):
        raise ConfigError(f"{name} must be a finite {'positive' if positive else 'non-negative'} number, "
                          f"got {value!r}")


def to_float(name: str, value: Any) -> float:
    """A number read from a file, as a float; ConfigError naming the field otherwise."""
    try:
        return float(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{name} must be a number, got {value!r}") from None


@dataclasses.dataclass(frozen=True)
class MoE:
    """A mixture of experts in place of the dense feed-forward (model/moe.py): n_experts SwiGLU
    experts, each token routed to n_experts_per_tok of them by softmax, top-k, weights
    renormalised over the k and times routed_scaling_factor. Mixtral: experts of the config's
    hidden_dim in every layer. Fine-grained (Mistral Small 4, Large 3): narrower experts
    (hidden_dim), n_shared_experts always on beside them (one SwiGLU n_shared_experts x
    hidden_dim wide), and the first first_k_dense_replace layers dense (of the config's
    hidden_dim). params.json's "moe" block; HF's num_local_experts / n_routed_experts, ..."""

    n_experts: int
    n_experts_per_tok: int
    router_aux_loss_coef: float = 0.0  # weight of the load-balancing loss in training (HF's name)
    hidden_dim: int | None = None  # each expert's width; None: the config's hidden_dim (Mixtral)
    n_shared_experts: int = 0
    routed_scaling_factor: float = 1.0
    first_k_dense_replace: int = 0

    def __post_init__(self):
        check_int(self, "n_experts")
        if (not isinstance(self.n_experts_per_tok, int) or isinstance(self.n_experts_per_tok, bool)
                or not 1 <= self.n_experts_per_tok <= self.n_experts):
            raise ConfigError(f"n_experts_per_tok must be between 1 and n_experts ({self.n_experts}), "
                              f"got {self.n_experts_per_tok!r}")
        check_number(self, "router_aux_loss_coef")
        if self.hidden_dim is not None:
            check_int(self, "hidden_dim")
        check_int(self, "n_shared_experts", "first_k_dense_replace", low=0)
        check_number(self, "routed_scaling_factor", positive=True)


@dataclasses.dataclass(frozen=True)
class LatentAttention:
    """Multi-head latent attention (DeepSeek-V3's MLA: Mistral Small 4, Large 3). Queries come
    through a low-rank q_lora_rank bottleneck (or directly, when None), split per head into
    qk_nope_head_dim features without position and qk_rope_head_dim rotated ones; keys and
    values come from one latent of kv_lora_rank per token (expanded per head into no-rope keys
    and values of v_head_dim) plus one rotated key of qk_rope_head_dim shared by the heads.
    Decoding caches the latent and that key alone (model/cache.py)."""

    kv_lora_rank: int
    qk_nope_head_dim: int
    qk_rope_head_dim: int
    v_head_dim: int
    q_lora_rank: int | None = None

    def __post_init__(self):
        check_int(self, "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim")
        if self.q_lora_rank is not None:
            check_int(self, "q_lora_rank")
        if self.qk_rope_head_dim % 2:
            raise ConfigError(f"qk_rope_head_dim must be even for rotary embeddings, got {self.qk_rope_head_dim}")

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim


@dataclasses.dataclass(frozen=True)
class YaRN:
    """YaRN rope scaling (Ministral 3, Devstral 2, Mistral Small 4, Large 3): rotary frequencies
    blended between the original ones and those interpolated by `factor`, by a linear ramp
    between the dimensions that turn beta_fast and beta_slow times over
    original_max_position_embeddings; cos and sin times `attention_factor` (model/rope.py).
    transformers' rope_parameters names (_compute_yarn_parameters); params.json's "yarn" block."""

    factor: float
    original_max_position_embeddings: int
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    # What cos and sin are multiplied by (cos_sin_scale): attention_factor, or by HF's rule from
    # factor, mscale and mscale_all_dim.
    mscale: float | None = None
    mscale_all_dim: float | None = None
    attention_factor: float | None = None
    truncate: bool = True  # the correction dimensions rounded down and up to integers

    def __post_init__(self):
        check_number(self, "factor", positive=True)
        check_int(self, "original_max_position_embeddings")
        check_number(self, "beta_fast", positive=True)
        check_number(self, "beta_slow", positive=True)
        for name in ("mscale", "mscale_all_dim", "attention_factor"):
            if getattr(self, name) is not None:
                check_number(self, name)
        if not isinstance(self.truncate, bool):
            raise ConfigError(f"truncate must be true or false, got {self.truncate!r}")

    @property
    def cos_sin_scale(self) -> float:
        """What cos and sin are multiplied by: attention_factor when given, else
        yarn_mscale(factor, mscale) / yarn_mscale(factor, mscale_all_dim) when both are set
        and non-zero, else yarn_mscale(factor) (transformers' _compute_yarn_parameters)."""
        if self.attention_factor is not None:
            return float(self.attention_factor)
        if self.mscale and self.mscale_all_dim:
            return yarn_mscale(self.factor, self.mscale) / yarn_mscale(self.factor, self.mscale_all_dim)
        return yarn_mscale(self.factor)


def yarn_mscale(factor: float, mscale: float = 1.0) -> float:
    """YaRN's magnitude correction for a context `factor` times longer: 0.1·mscale·ln(factor) + 1."""
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


@dataclasses.dataclass(frozen=True)
class Llama4Scaling:
    """Llama 4's query scale (Ministral 3, Devstral 2, Large 3): after RoPE, each query times
    1 + beta·ln(1 + floor(position / original_max_position_embeddings)), which is 1 below that
    length (model/rope.py). params.json's "llama_4_scaling" block; HF's llama_4_scaling_beta."""

    beta: float
    original_max_position_embeddings: int

    def __post_init__(self):
        check_number(self, "beta")
        check_int(self, "original_max_position_embeddings")


VISION_ACTIVATIONS = ("silu", "gelu")  # the encoder feed-forward's (HF hidden_act; native: silu)


@dataclasses.dataclass(frozen=True)
class Vision:
    """The Pixtral vision encoder and the Mistral 3 projector in front of the text model
    (Mistral Small 3.1 on, Ministral 3, Small 4; model/vision.py): images cut
    into patch_size patches, a transformer of n_layers blocks (dim wide, n_heads heads, a gated
    feed-forward hidden_dim wide with `act`) with 2-D RoPE over each patch's (row, column), then
    RMSNorm, a learned merge of each spatial_merge_size² block of patches, and linear → GELU →
    linear into the text model's width. Each image token (image_token_id) of the prompt takes
    one merged patch's embedding. HF's vision_config and Mistral3Config; params.json's
    "vision_encoder" block."""

    dim: int
    hidden_dim: int
    n_layers: int
    n_heads: int
    patch_size: int
    image_size: int  # the longest side an image is resized to, in pixels (mistral-common's max_image_size)
    rope_theta: float = 10000.0
    num_channels: int = 3
    act: str = "silu"
    spatial_merge_size: int = 2
    image_token_id: int = 10
    image_break_token_id: int = 12  # the image's row ends and its end: text model tokens, as mistral-common writes
    image_end_token_id: int = 13

    def __post_init__(self):
        check_int(self, "dim", "hidden_dim", "n_layers", "n_heads", "patch_size", "image_size", "num_channels",
                  "spatial_merge_size")
        check_int(self, "image_token_id", "image_break_token_id", "image_end_token_id", low=0)
        check_number(self, "rope_theta", positive=True)
        if self.dim % self.n_heads or (self.dim // self.n_heads) % 4:
            raise ConfigError(f"the vision encoder's dim ({self.dim}) must be n_heads ({self.n_heads}) heads of a "
                              "multiple of 4 features (2-D rotary embeddings rotate pairs by row and by column)")
        if self.act not in VISION_ACTIVATIONS:
            raise ConfigError(f"the vision encoder's activation must be one of {VISION_ACTIVATIONS}, got {self.act!r}")

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def pixels_per_token(self) -> int:
        """The side in pixels of the square an image token covers: patch_size × spatial_merge_size."""
        return self.patch_size * self.spatial_merge_size

    def num_params(self, text_dim: int) -> int:
        encoder = self.n_layers * (4 * self.dim * self.dim + 3 * self.dim * self.hidden_dim + 2 * self.dim)
        patches = self.num_channels * self.patch_size**2 * self.dim + self.dim
        projector = self.dim + self.spatial_merge_size**2 * self.dim * self.dim + self.dim * text_dim + text_dim**2
        return encoder + patches + projector
