"""MistralConfig: one frozen dataclass of the architecture (params.json's names) and how to run
it, its named presets, and its files (config.json, params.json: config_files.py).

The fields every model has are MistralConfig's own; the parts only some models have are groups
(config_groups.py), None where a model has no such part: `moe` (experts), `mla` (latent
attention), `yarn` and `llama_4_scaling` (the Mistral 3 generation's rope scalings). One window
or a per-layer pattern of them is `sliding_window` itself, as params.json writes it; the
properties below say what it implies for the layer stack.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

from mistral_jax.model import config_files
from mistral_jax.model.config_files import DEFAULT_MAX_SEQ_LEN, parser
from mistral_jax.model.config_groups import (ConfigError, LatentAttention, Llama4Scaling, MoE, Vision, YaRN,
                                             check_int, check_number)
from mistral_jax.model.presets import PRESETS


DTYPES = ("float32", "bfloat16", "float16")
# Remat policy -> the jax.checkpoint_policies member saying what each block keeps for the
# backward pass (the rest is recomputed); "none": no rematerialisation.
REMAT_POLICIES = {
    "none": None,
    "full": "nothing_saveable",
    "dots": "checkpoint_dots",
    "dots_no_batch": "dots_with_no_batch_dims_saveable",
}
ATTENTION_KERNELS = ("auto", "xla", "dot_product", "splash")  # see attention.causal_attention
EXPERT_KERNELS = ("auto", "tiles", "ragged_dot")  # see moe.py


@dataclasses.dataclass(frozen=True)
class MistralConfig:
    """Architecture (params.json names) plus how to run it: dtypes, remat policy, attention
    kernel, layer layout.

    Hashable, so it can be a static argument of `jax.jit`.
    """

    # ---- the architecture every model has
    dim: int
    n_layers: int
    head_dim: int
    hidden_dim: int
    n_heads: int
    n_kv_heads: int
    vocab_size: int
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    # Keys each query sees (itself included): one window for every layer, None for full causal
    # attention, or a tuple of per-layer windows repeated over the layers (Ministral: (None,
    # W, W, W)), as params.json writes it; kept in its shortest repeating form.
    sliding_window: int | None | tuple[int | None, ...] = None
    max_seq_len: int = DEFAULT_MAX_SEQ_LEN
    tied_embeddings: bool = False  # the output projection is tok_embeddings transposed (Ministral 3 3B)
    # ---- what only some models have (config_groups.py); None: not this model
    moe: MoE | None = None  # experts in place of the dense feed-forward (Mixtral, Mistral Small 4)
    mla: LatentAttention | None = None  # latent attention in place of grouped-query attention (Small 4)
    yarn: YaRN | None = None  # rope frequencies scaled for long context (Ministral 3)
    llama_4_scaling: Llama4Scaling | None = None  # queries scaled by position (Ministral 3)
    vision: Vision | None = None  # images in: a vision encoder and projector (Small 3.1, Ministral 3, ...)
    # ---- how to run it
    dtype: str = "float32"  # compute dtype of activations
    param_dtype: str = "float32"  # storage dtype of parameters
    remat: str = "none"  # activation checkpointing policy of each block: a key of REMAT_POLICIES
    attention: str = "auto"  # self-attention kernel of full sequences, see attention.py
    attention_block: int = 128  # queries per block of the "xla" kernel (BENCHMARKS.md: block sizes)
    expert_kernel: str = "auto"  # the experts' grouped matmul, see moe.py
    # The layer stack: one scanned block over params stacked under `layers` (checkpoints,
    # training), or a block per layer over `layers_0` ... (transformer.unstack_layers; CPU decoding).
    scan_layers: bool = True

    def __post_init__(self):
        check_int(self, "dim", "n_layers", "head_dim", "hidden_dim", "n_heads", "n_kv_heads", "vocab_size",
                  "max_seq_len", "attention_block")
        if self.n_heads % self.n_kv_heads:
            raise ConfigError(f"n_heads ({self.n_heads}) must be a multiple of n_kv_heads ({self.n_kv_heads})")
        if self.head_dim % 2:
            raise ConfigError(f"head_dim must be even for rotary embeddings, got {self.head_dim}")
        object.__setattr__(self, "sliding_window", _window_pattern(self.sliding_window, self.n_layers))
        for name, group in (("moe", MoE), ("mla", LatentAttention), ("yarn", YaRN), ("llama_4_scaling", Llama4Scaling),
                            ("vision", Vision)):
            if getattr(self, name) is not None and not isinstance(getattr(self, name), group):
                raise ConfigError(f"{name} must be a {group.__name__} or None, got {getattr(self, name)!r}")
        if self.mla is not None and (self.head_dim, self.n_kv_heads) != (self.mla.qk_head_dim, self.n_heads):
            raise ConfigError(f"with latent attention head_dim must be qk_nope_head_dim + qk_rope_head_dim "
                              f"({self.mla.qk_head_dim}) and n_kv_heads n_heads ({self.n_heads}), got "
                              f"{self.head_dim} and {self.n_kv_heads}")
        if self.moe is not None and self.moe.first_k_dense_replace:
            if self.moe.first_k_dense_replace >= self.n_layers:
                raise ConfigError(f"first_k_dense_replace ({self.moe.first_k_dense_replace}) leaves none of the "
                                  f"{self.n_layers} layers to the experts")
            if self.grouped_layers:
                raise ConfigError("dense-first layers (first_k_dense_replace) with per-layer windows are not supported")
        if self.vision is not None and self.vision.image_token_id >= self.vocab_size:
            raise ConfigError(f"image_token_id ({self.vision.image_token_id}) is outside the vocabulary "
                              f"({self.vocab_size})")
        if not isinstance(self.tied_embeddings, bool):
            raise ConfigError(f"tied_embeddings must be true or false, got {self.tied_embeddings!r}")
        check_number(self, "norm_eps", positive=True)
        check_number(self, "rope_theta", positive=True)
        if self.yarn is not None and self.rope_theta <= 1:  # its ramp divides by ln(rope_theta)
            raise ConfigError(f"rope_theta must be above 1 with YaRN, got {self.rope_theta!r}")
        for name in ("dtype", "param_dtype"):
            if getattr(self, name) not in DTYPES:
                raise ConfigError(f"{name} must be one of {DTYPES}, got {getattr(self, name)!r}")
        if self.remat not in REMAT_POLICIES:
            raise ConfigError(f"remat must be one of {tuple(REMAT_POLICIES)}, got {self.remat!r}")
        if self.attention not in ATTENTION_KERNELS:
            raise ConfigError(f"attention must be one of {ATTENTION_KERNELS}, got {self.attention!r}")
        if self.expert_kernel not in EXPERT_KERNELS:
            raise ConfigError(f"expert_kernel must be one of {EXPERT_KERNELS}, got {self.expert_kernel!r}")

    def replace(self, **changes) -> MistralConfig:
        return dataclasses.replace(self, **changes)

    @classmethod
    def preset(cls, name: str, **overrides) -> MistralConfig:
        if name not in PRESETS:
            raise ConfigError(f"unknown preset {name!r}; known: {', '.join(sorted(PRESETS))}")
        return cls(**{**PRESETS[name], **overrides})

    # ---- the layer stack ----------------------------------------------------------------------

    @property
    def layer_pattern(self) -> tuple[int | None, ...]:
        """The windows of one repeating group of layers: (W,) or (None,) for a uniform stack."""
        window = self.sliding_window
        return window if isinstance(window, tuple) else (window,)

    @property
    def windows(self) -> tuple[int | None, ...]:
        """Each layer's window (None: full attention)."""
        return self.layer_pattern * (self.n_layers // len(self.layer_pattern))

    @property
    def window_kinds(self) -> tuple[int | None, ...]:
        """The distinct windows, in order of first appearance: each is one compiled kind of
        attention layer with its own KV cache (cache.KVCache)."""
        return tuple(dict.fromkeys(self.layer_pattern))

    @property
    def layer_kinds(self) -> tuple[int, ...]:
        """Each layer's kind: its index into window_kinds."""
        return tuple(self.window_kinds.index(w) for w in self.windows)

    @property
    def grouped_layers(self) -> bool:
        """Whether the stacked layers run (with a cache) as a scan over groups of
        layer_pattern, each kind's cache stored [G, n, ...] (KVCache.init); otherwise, one
        kind, a scan over the layers themselves."""
        return len(self.layer_pattern) > 1

    @property
    def stacks(self) -> tuple[tuple[str, MistralConfig], ...]:
        """The layer stacks in order, (params key, the config of its layers): each a scanned stack
        compiled once per kind of layer. One, `layers`, but with dense-first experts:
        `dense_layers` (the first k, a dense feed-forward) then `layers` (the rest, experts)."""
        k = self.moe.first_k_dense_replace if self.moe else 0
        if not k:
            return (("layers", self),)
        experts = dataclasses.replace(self.moe, first_k_dense_replace=0)
        return (("dense_layers", self.replace(n_layers=k, moe=None)),
                ("layers", self.replace(n_layers=self.n_layers - k, moe=experts)))

    @property
    def cache_shape(self) -> tuple[int, int, int]:
        """(heads, key features, value features) a layer caches per token: grouped-query
        attention's kv heads, keys and values; latent attention's one latent and rope key."""
        if self.mla is not None:
            return 1, self.mla.kv_lora_rank, self.mla.qk_rope_head_dim
        return self.n_kv_heads, self.head_dim, self.head_dim

    # ---- sizes --------------------------------------------------------------------------------

    @property
    def num_params(self) -> int:
        vision = 0 if self.vision is None else self.vision.num_params(self.dim)
        return self._count_params(self.moe.n_experts if self.moe else 1) + vision

    @property
    def active_params(self) -> int:
        """The parameters a token's forward pass multiplies by: num_params less the experts
        it is not routed to and the vision encoder."""
        return self._count_params(self.moe.n_experts_per_tok if self.moe else 1)

    def _count_params(self, experts: int) -> int:
        embeddings = (1 if self.tied_embeddings else 2) * self.vocab_size * self.dim
        return sum(c.n_layers * c._layer_params(experts) for _, c in self.stacks) + embeddings + self.dim

    def _layer_params(self, experts: int) -> int:
        """One layer's parameters, with `experts` of its routed experts."""
        D, H, m = self.dim, self.n_heads, self.mla
        if m is None:
            attention = D * self.head_dim * (2 * H + 2 * self.n_kv_heads)
        else:
            query = D * H * m.qk_head_dim if m.q_lora_rank is None else m.q_lora_rank * (D + 1 + H * m.qk_head_dim)
            attention = (query + D * (m.kv_lora_rank + m.qk_rope_head_dim) + m.kv_lora_rank
                         + m.kv_lora_rank * H * (m.qk_nope_head_dim + m.v_head_dim) + H * m.v_head_dim * D)
        if self.moe is None:
            ffn = 3 * D * self.hidden_dim
        else:
            width = self.moe.hidden_dim or self.hidden_dim
            ffn = (3 * D * width * (min(experts, self.moe.n_experts) + self.moe.n_shared_experts)
                   + D * self.moe.n_experts)
        return attention + ffn + 2 * D

    # ---- HF transformers config.json and Mistral-native params.json (config_files.py) --------

    @classmethod
    @parser("config.json")
    def from_hf_dict(cls, d: dict[str, Any], **overrides) -> MistralConfig:
        """The config.json of MistralForCausalLM, MinistralForCausalLM, MixtralForCausalLM,
        Ministral3ForCausalLM, Mistral4ForCausalLM or LlamaForCausalLM, or of the text model of
        Mistral3ForConditionalGeneration (its vision tower and projector are not read)."""
        return cls(**{**config_files.hf_fields(d), **overrides})

    def to_hf_dict(self) -> dict[str, Any]:
        """MistralForCausalLM's config.json, MixtralForCausalLM's for experts,
        MinistralForCausalLM's for per-layer windows, Ministral3ForCausalLM's for Llama 4's
        query scale, Mistral4ForCausalLM's for latent attention (beyond those, see hf_obstacle:
        what we read back and transformers does not)."""
        return config_files.hf_dict(self)

    @property
    def hf_obstacle(self) -> str | None:
        """Why no transformers model (MistralForCausalLM, MinistralForCausalLM,
        MixtralForCausalLM, Ministral3ForCausalLM, Mistral4ForCausalLM) computes this one, or None."""
        windows = sorted({w for w in self.window_kinds if w is not None})
        if len(windows) > 1:
            return f"windows {windows} in one model: transformers' MinistralConfig has a single sliding_window"
        if self.mla is not None:
            if windows:
                return "latent attention with a sliding window: transformers' Mistral4 attends to every key"
            if self.llama_4_scaling is None:
                return "latent attention without Llama 4's query scale: transformers' Mistral4 always applies it"
            if self.yarn is None:  # its default rope ignores partial_rotary_factor
                return "latent attention without YaRN: transformers' Mistral4 would rotate the whole of each head"
            if self.norm_eps != 1e-6:
                return (f"latent attention with norm_eps {self.norm_eps:g}: transformers' Mistral4 norms the "
                        "latents with 1e-6 whatever rms_norm_eps says")
            if self.moe and not self.moe.n_shared_experts:
                return "latent attention with experts and no shared expert: transformers' Mistral4 always has one"
        elif self.moe and (self.moe.hidden_dim or self.moe.n_shared_experts or self.moe.first_k_dense_replace
                           or self.moe.routed_scaling_factor != 1.0):
            return ("fine-grained experts (their own width, shared experts, dense-first layers or a routed scale) "
                    "without latent attention: transformers has them in Mistral4ForCausalLM only")
        if self.moe and self.grouped_layers:
            return "experts with per-layer windows: transformers' MixtralConfig has one sliding_window for every layer"
        if self.llama_4_scaling and self.mla is None and (self.moe or self.grouped_layers):
            return ("Llama 4's query scale with experts or per-layer windows: transformers applies it in "
                    "Ministral3ForCausalLM and Mistral4ForCausalLM only, which have neither without latent attention")
        if (self.llama_4_scaling and self.yarn and self.yarn.original_max_position_embeddings
                != self.llama_4_scaling.original_max_position_embeddings):
            return ("YaRN and Llama 4's query scale over different original lengths: transformers' rope_parameters "
                    "holds one original_max_position_embeddings")
        return None

    @property
    def hf_expressible(self) -> bool:
        return self.hf_obstacle is None

    @classmethod
    @parser("params.json")
    def from_params_dict(cls, d: dict[str, Any], **overrides) -> MistralConfig:
        """mistral-inference's params.json (with "moe" for Mixtral, "yarn" and
        "llama_4_scaling" for the Mistral 3 generation); a multimodal one's text model."""
        return cls(**{**config_files.params_fields(d), **overrides})

    def to_params_dict(self) -> dict[str, Any]:
        return config_files.params_dict(self)

    @classmethod
    def resolve(cls, spec: str, **overrides) -> MistralConfig:
        """A preset name, a config.json / params.json file, or a directory holding one."""
        if os.path.isdir(spec):
            return cls.from_dir(spec, **overrides)
        if os.path.isfile(spec):
            d = config_files.read_json(spec)
            parse = cls.from_params_dict if "dim" in d else cls.from_hf_dict
            return config_files.from_file(spec, parse, d, overrides)
        return cls.preset(spec, **overrides)

    @classmethod
    def from_dir(cls, path: str | os.PathLike, **overrides) -> MistralConfig:
        """Reads `config.json` (HF format) or, failing that, `params.json` (Mistral-native)."""
        for name, parse in (("config.json", cls.from_hf_dict), ("params.json", cls.from_params_dict)):
            file = os.path.join(path, name)
            if os.path.isfile(file):
                return config_files.from_file(file, parse, config_files.read_json(file), overrides)
        raise ConfigError(f"{path} has neither config.json nor params.json")

    def save_hf(self, path: str | os.PathLike) -> None:
        config_files.write_json(os.path.join(path, "config.json"), self.to_hf_dict())

    def save_params(self, path: str | os.PathLike) -> None:
        config_files.write_json(os.path.join(path, "params.json"), self.to_params_dict())


def _window_pattern(value: Any, n_layers: int) -> int | None | tuple[int | None, ...]:
    """sliding_window in canonical form: one window, or the shortest repeating tuple of them."""
    if not isinstance(value, (list, tuple)):
        return _window(value)
    pattern = tuple(_window(w) for w in value)
    if not pattern or n_layers % len(pattern):
        raise ConfigError(f"a per-layer sliding_window of {len(pattern)} values does not repeat over "
                          f"{n_layers} layers")
    period = next(p for p in range(1, len(pattern) + 1)
                  if len(pattern) % p == 0 and pattern == pattern[:p] * (len(pattern) // p))
    return pattern[0] if period == 1 else pattern[:period]


def _window(value: Any) -> int | None:
    if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
        raise ConfigError(f"sliding_window must be a positive integer or None, got {value!r}")
    return value
