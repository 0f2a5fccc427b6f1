"""MistralConfig: one frozen dataclass, named presets, and HF config.json / native params.json I/O."""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import math
import os
from typing import Any

logger = logging.getLogger("mistral_jax")

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
_DEFAULT_MAX_SEQ_LEN = 32768  # what Mistral 7B's HF config.json states; params.json never says


class ConfigError(ValueError):
    """A config file or value that cannot describe a Mistral model."""


def _parser(source: str):
    """The one place where what a malformed dict makes Python raise while it is read (a
    missing key, a string where a number goes, a list as a dict key, a zero divisor) becomes
    a ConfigError saying so; the values read are then checked by MistralConfig itself."""
    def wrap(parse):
        @functools.wraps(parse)
        def parse_or_say_why(cls, d, **overrides):
            if not isinstance(d, dict):
                raise ConfigError(f"{source} must hold a JSON object, got {type(d).__name__}")
            try:
                return parse(cls, d, **overrides)
            except ConfigError:
                raise
            except KeyError as e:
                raise ConfigError(f"{source} lacks required field {e.args[0]!r}") from None
            except (TypeError, ValueError, ArithmeticError, AttributeError) as e:
                raise ConfigError(f"{source} has a malformed field: {e}") from None
        return parse_or_say_why
    return wrap


@dataclasses.dataclass(frozen=True)
class MistralConfig:
    """Architecture (params.json names) plus how to run it: dtypes, remat policy, attention
    kernel, layer layout.

    Hashable, so it can be a static argument of `jax.jit`.
    """

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
    max_seq_len: int = _DEFAULT_MAX_SEQ_LEN
    # A mixture of experts (Mixtral): each feed-forward is n_experts SwiGLU experts, each
    # token routed to n_experts_per_tok of them; 0 for a dense feed-forward.
    n_experts: int = 0
    n_experts_per_tok: int = 0
    router_aux_loss_coef: float = 0.0  # weight of the load-balancing loss in training (HF's name)
    dtype: str = "float32"  # compute dtype of activations
    param_dtype: str = "float32"  # storage dtype of parameters
    remat: str = "none"  # activation checkpointing policy of each block: a key of REMAT_POLICIES
    attention: str = "auto"  # self-attention kernel of full sequences, see attention.py
    attention_block: int = 128  # queries per block of the "xla" kernel (BENCHMARKS.md: block sizes)
    expert_kernel: str = "auto"  # the experts' grouped matmul, see moe.py
    # The layer stack: one scanned block over params stacked under `layers` (checkpoints,
    # training), or a block per layer over `layers_0` ... (model.unstack_layers; CPU decoding).
    scan_layers: bool = True

    def __post_init__(self):
        for name in ("dim", "n_layers", "head_dim", "hidden_dim", "n_heads", "n_kv_heads",
                     "vocab_size", "max_seq_len", "attention_block"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"{name} must be a positive integer, got {value!r}")
        if self.n_heads % self.n_kv_heads:
            raise ConfigError(f"n_heads ({self.n_heads}) must be a multiple of n_kv_heads ({self.n_kv_heads})")
        if self.head_dim % 2:
            raise ConfigError(f"head_dim must be even for rotary embeddings, got {self.head_dim}")
        object.__setattr__(self, "sliding_window", _window_pattern(self.sliding_window, self.n_layers))
        for name in ("n_experts", "n_experts_per_tok"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ConfigError(f"{name} must be a non-negative integer, got {value!r}")
        if self.n_experts and not 1 <= self.n_experts_per_tok <= self.n_experts:
            raise ConfigError(f"n_experts_per_tok must be between 1 and n_experts ({self.n_experts}), "
                              f"got {self.n_experts_per_tok}")
        if not self.n_experts and self.n_experts_per_tok:
            raise ConfigError(f"n_experts_per_tok is {self.n_experts_per_tok} but the model has no experts")
        for name, low in (("router_aux_loss_coef", "non-negative"), ("norm_eps", "positive"), ("rope_theta", "positive")):
            value = getattr(self, name)
            if (not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value)
                    or value < 0 or (low == "positive" and value == 0)):
                raise ConfigError(f"{name} must be a finite {low} number, got {value!r}")
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
    def num_params(self) -> int:
        return self._count_params(max(self.n_experts, 1))

    @property
    def active_params(self) -> int:
        """The parameters a token's forward pass multiplies by: num_params less the experts
        it is not routed to."""
        return self._count_params(self.n_experts_per_tok or 1)

    def _count_params(self, experts: int) -> int:
        attn = self.dim * self.head_dim * (2 * self.n_heads + 2 * self.n_kv_heads)
        ffn = 3 * self.dim * self.hidden_dim * experts + self.dim * self.n_experts  # experts and router
        per_layer = attn + ffn + 2 * self.dim
        return self.n_layers * per_layer + 2 * self.vocab_size * self.dim + self.dim

    @classmethod
    def preset(cls, name: str, **overrides) -> MistralConfig:
        if name not in PRESETS:
            raise ConfigError(f"unknown preset {name!r}; known: {', '.join(sorted(PRESETS))}")
        return dataclasses.replace(PRESETS[name], **overrides)

    # ---- HF transformers config.json -------------------------------------------------------

    @classmethod
    @_parser("config.json")
    def from_hf_dict(cls, d: dict[str, Any], **overrides) -> MistralConfig:
        """MistralForCausalLM's, MinistralForCausalLM's and MixtralForCausalLM's config.json,
        or the text model of Mistral3ForConditionalGeneration's (its vision tower and
        projector are not read)."""
        model_type = d.get("model_type", "mistral")
        if model_type == "mistral3":
            text = d.get("text_config")
            if not isinstance(text, dict):
                raise ConfigError("config.json has model_type 'mistral3' but no text_config object")
            return cls.from_hf_dict({"model_type": "mistral", **text}, **overrides)
        if not isinstance(model_type, str) or model_type not in _HF_DEFAULT_EPS:
            raise ConfigError(f"config.json has model_type {model_type!r}, expected one of "
                              f"{', '.join(map(repr, _HF_DEFAULT_EPS))} or 'mistral3'")
        if d.get("tie_word_embeddings", False):
            raise ConfigError("config.json sets tie_word_embeddings; Mistral's output projection is untied")
        if d.get("hidden_act", "silu") != "silu":
            raise ConfigError(f"config.json hidden_act {d['hidden_act']!r} is not silu")
        n_heads, n_layers = d["num_attention_heads"], d["num_hidden_layers"]
        fields = dict(
            dim=d["hidden_size"], n_layers=n_layers, head_dim=d.get("head_dim") or d["hidden_size"] // n_heads,
            hidden_dim=d["intermediate_size"], n_heads=n_heads, n_kv_heads=d.get("num_key_value_heads") or n_heads,
            vocab_size=d["vocab_size"],
            norm_eps=_float("rms_norm_eps", d.get("rms_norm_eps", _HF_DEFAULT_EPS[model_type])),
            rope_theta=_hf_rope_theta(d), sliding_window=_hf_windows(d, n_layers),
            max_seq_len=d.get("max_position_embeddings", _DEFAULT_MAX_SEQ_LEN))
        if model_type == "mixtral":
            fields.update(n_experts=d["num_local_experts"], n_experts_per_tok=d["num_experts_per_tok"],
                          router_aux_loss_coef=_float("router_aux_loss_coef", d.get("router_aux_loss_coef", 0.001)))
        return cls(**{**fields, **overrides})

    def to_hf_dict(self) -> dict[str, Any]:
        """MistralForCausalLM's config.json, MixtralForCausalLM's for experts, or
        MinistralForCausalLM's for per-layer windows (beyond those, see hf_expressible: a
        per-layer list that we read and transformers does not)."""
        d = {
            "architectures": ["MistralForCausalLM"], "model_type": "mistral",
            "hidden_size": self.dim, "num_hidden_layers": self.n_layers, "head_dim": self.head_dim,
            "intermediate_size": self.hidden_dim, "num_attention_heads": self.n_heads,
            "num_key_value_heads": self.n_kv_heads, "vocab_size": self.vocab_size,
            "rms_norm_eps": self.norm_eps, "rope_theta": self.rope_theta,
            "sliding_window": self.sliding_window, "max_position_embeddings": self.max_seq_len,
            "hidden_act": "silu", "tie_word_embeddings": False, "bos_token_id": 1, "eos_token_id": 2,
            "torch_dtype": self.param_dtype,
        }
        if self.n_experts:
            d.update(architectures=["MixtralForCausalLM"], model_type="mixtral", num_local_experts=self.n_experts,
                     num_experts_per_tok=self.n_experts_per_tok, router_aux_loss_coef=self.router_aux_loss_coef)
        if not self.hf_expressible:  # beyond HF's configs: the list, as params.json has it
            d["sliding_window"] = list(self.windows)
        elif self.grouped_layers:
            window = next(w for w in self.window_kinds if w is not None)
            d.update(architectures=["MinistralForCausalLM"], model_type="ministral", sliding_window=window,
                     layer_types=["full_attention" if w is None else "sliding_attention" for w in self.windows])
        return d

    @property
    def hf_expressible(self) -> bool:
        """Whether transformers' MistralConfig / MinistralConfig / MixtralConfig can describe
        this model: at most one sliding window besides full attention, and per-layer windows
        (MinistralConfig's layer_types) only without experts."""
        windows = {w for w in self.window_kinds if w is not None}
        return len(windows) <= 1 and not (self.n_experts and self.grouped_layers)

    # ---- Mistral-native params.json ---------------------------------------------------------

    @classmethod
    @_parser("params.json")
    def from_params_dict(cls, d: dict[str, Any], **overrides) -> MistralConfig:
        """mistral-inference's params.json (with "moe" for Mixtral); a multimodal one's
        (Mistral Small 3.1) text model."""
        for key in ("yarn", "llama_4_scaling", "rope_scaling"):
            if d.get(key):
                raise ConfigError(f"params.json asks for RoPE scaling ({key!r}), which is not implemented")
        window = _parse_window(d.get("sliding_window"))
        rope_theta = d.get("rope_theta")
        if rope_theta is None:
            # Official v0.1 params.json omits rope_theta; v0.2+ (no window) use 1e6.
            rope_theta = 10000.0 if window is not None else 1e6
            logger.warning("params.json has no rope_theta; inferred %g from sliding_window=%s", rope_theta, window)
        fields = dict(
            dim=d["dim"], n_layers=d["n_layers"], head_dim=d.get("head_dim") or d["dim"] // d["n_heads"],
            hidden_dim=d["hidden_dim"], n_heads=d["n_heads"], n_kv_heads=d.get("n_kv_heads") or d["n_heads"],
            vocab_size=d["vocab_size"], norm_eps=_float("norm_eps", d.get("norm_eps", 1e-5)),
            rope_theta=_float("rope_theta", rope_theta), sliding_window=window)
        moe = d.get("moe")
        if moe is not None and not isinstance(moe, dict):
            raise ConfigError(f"params.json moe must be an object with num_experts and num_experts_per_tok, "
                              f"got {moe!r}")
        if moe:
            fields.update(n_experts=moe["num_experts"], n_experts_per_tok=moe["num_experts_per_tok"])
        return cls(**{**fields, **overrides})

    def to_params_dict(self) -> dict[str, Any]:
        d = {
            "dim": self.dim, "n_layers": self.n_layers, "head_dim": self.head_dim,
            "hidden_dim": self.hidden_dim, "n_heads": self.n_heads, "n_kv_heads": self.n_kv_heads,
            "norm_eps": self.norm_eps, "vocab_size": self.vocab_size, "rope_theta": self.rope_theta,
            "sliding_window": list(self.windows) if isinstance(self.sliding_window, tuple) else self.sliding_window,
        }
        if self.n_experts:
            d["moe"] = {"num_experts": self.n_experts, "num_experts_per_tok": self.n_experts_per_tok}
        return d

    # ---- files ------------------------------------------------------------------------------

    @classmethod
    def resolve(cls, spec: str, **overrides) -> MistralConfig:
        """A preset name, a config.json / params.json file, or a directory holding one."""
        if os.path.isdir(spec):
            return cls.from_dir(spec, **overrides)
        if os.path.isfile(spec):
            d = _read_json(spec)
            return _from_file(spec, cls.from_params_dict if "dim" in d else cls.from_hf_dict, d, overrides)
        return cls.preset(spec, **overrides)

    @classmethod
    def from_dir(cls, path: str | os.PathLike, **overrides) -> MistralConfig:
        """Reads `config.json` (HF format) or, failing that, `params.json` (Mistral-native)."""
        for name, parse in (("config.json", cls.from_hf_dict), ("params.json", cls.from_params_dict)):
            file = os.path.join(path, name)
            if os.path.isfile(file):
                return _from_file(file, parse, _read_json(file), overrides)
        raise ConfigError(f"{path} has neither config.json nor params.json")

    def save_hf(self, path: str | os.PathLike) -> None:
        _write_json(os.path.join(path, "config.json"), self.to_hf_dict())

    def save_params(self, path: str | os.PathLike) -> None:
        _write_json(os.path.join(path, "params.json"), self.to_params_dict())


_HF_DEFAULT_EPS = {"mistral": 1e-5, "ministral": 1e-6, "mixtral": 1e-5}  # rms_norm_eps when config.json omits it
_HF_LAYER_TYPES = ("full_attention", "sliding_attention")


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


def _parse_window(value: Any) -> int | None | list[int | None]:
    """sliding_window as real files write it: null, an int, a string, or a list of those
    (per layer, repeating: null is a full-attention layer)."""
    if isinstance(value, (list, tuple)):
        return [_parse_window(v) for v in value]
    if value is None or isinstance(value, bool):
        return None
    if isinstance(value, str):
        if value.strip().lower() in ("", "none", "null"):
            return None
        try:
            value = int(value)
        except ValueError:
            raise ConfigError(f"sliding_window {value!r} is not an integer") from None
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if not isinstance(value, int) or value < 1:
        raise ConfigError(f"sliding_window must be a positive integer or null, got {value!r}")
    return value


def _hf_windows(d: dict[str, Any], n_layers: int) -> int | None | list[int | None]:
    """config.json's sliding_window, per layer where layer_types says which layers slide."""
    window = _parse_window(d.get("sliding_window"))
    layer_types = d.get("layer_types")
    if layer_types is None:
        return window
    if isinstance(window, list):
        raise ConfigError("config.json has both layer_types and a list of sliding windows")
    if not isinstance(layer_types, list) or len(layer_types) != n_layers:
        raise ConfigError(f"config.json layer_types must be a list of {n_layers} layer types")
    unknown = sorted(set(map(str, layer_types)) - set(_HF_LAYER_TYPES))
    if unknown:
        raise ConfigError(f"config.json layer_types has unknown kinds {unknown}; known: {', '.join(_HF_LAYER_TYPES)}")
    return [window if kind == "sliding_attention" else None for kind in layer_types]


def _hf_rope_theta(d: dict[str, Any]) -> float:
    """rope_theta from the top level (transformers < 5) or rope_parameters (>= 5); any RoPE
    scaling (YaRN, llama-4's) is refused rather than dropped."""
    rope = d.get("rope_parameters") or {}
    scaling = d.get("rope_scaling") or {}
    for params in (rope, scaling):
        if not isinstance(params, dict):
            raise ConfigError("config.json rope_parameters / rope_scaling must be objects")
        kind = params.get("rope_type", params.get("type", "default"))
        extra = sorted(k for k in params if k.startswith("llama_4") or k in ("factor", "beta_fast", "beta_slow"))
        if kind != "default" or extra:
            raise ConfigError(f"config.json asks for RoPE scaling ({kind}{', ' + ', '.join(extra) if extra else ''}), "
                              "which is not implemented")
    rope_theta = rope.get("rope_theta", d.get("rope_theta"))
    if rope_theta is None:
        raise ConfigError("config.json has no rope_theta (neither top level nor rope_parameters)")
    return _float("rope_theta", rope_theta)


def _float(name: str, value: Any) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{name} must be a number, got {value!r}") from None


def _from_file(file: str, parse, d: dict[str, Any], overrides: dict[str, Any]) -> MistralConfig:
    """parse(d), its errors naming the file (not just "config.json")."""
    try:
        return parse(d, **overrides)
    except ConfigError as e:
        name, message = os.path.basename(file), str(e)
        raise ConfigError(file + message[len(name):] if message.startswith(name) else f"{file}: {message}") from None


def _read_json(file: str) -> dict[str, Any]:
    try:
        with open(file, encoding="utf-8") as f:
            d = json.load(f)
    except (OSError, ValueError, RecursionError) as e:  # ValueError: invalid JSON or UTF-8
        raise ConfigError(f"cannot read {file}: {e}") from None
    if not isinstance(d, dict):
        raise ConfigError(f"{file} does not hold a JSON object")
    return d


def _write_json(file: str, d: dict[str, Any]) -> None:
    with open(file, "w") as f:
        json.dump(d, f, indent=2)
        f.write("\n")


_MISTRAL_7B = MistralConfig(dim=4096, n_layers=32, head_dim=128, hidden_dim=14336, n_heads=32,
                            n_kv_heads=8, vocab_size=32000, norm_eps=1e-5, rope_theta=1e4,
                            sliding_window=4096)
_MIXTRAL_8X22B = MistralConfig(dim=6144, n_layers=56, head_dim=128, hidden_dim=16384, n_heads=48, n_kv_heads=8,
                               vocab_size=32000, rope_theta=1e6, max_seq_len=65536, n_experts=8,
                               n_experts_per_tok=2, router_aux_loss_coef=0.001)

PRESETS: dict[str, MistralConfig] = {
    "mistral-7b-v0.1": _MISTRAL_7B,
    "mistral-7b-v0.2": _MISTRAL_7B.replace(rope_theta=1e6, sliding_window=None),
    "mistral-7b-v0.3": _MISTRAL_7B.replace(rope_theta=1e6, sliding_window=None, vocab_size=32768),
    # The rest of the family, each from its HF config.json (tests/test_config.py checks the
    # parameter counts against transformers' own models of these configs):
    # mistralai/Ministral-8B-Instruct-2410 (one full-attention layer, then three with a 32k
    # window; max_position_embeddings 32768, the model card's context 128k).
    "ministral-8b": MistralConfig(dim=4096, n_layers=36, head_dim=128, hidden_dim=12288, n_heads=32,
                                  n_kv_heads=8, vocab_size=131072, rope_theta=1e8,
                                  sliding_window=(None, 32768, 32768, 32768), max_seq_len=32768),
    # mistralai/Mistral-Nemo-Base-2407 (head_dim 128 != 5120 / 32).
    "mistral-nemo-12b": MistralConfig(dim=5120, n_layers=40, head_dim=128, hidden_dim=14336, n_heads=32,
                                      n_kv_heads=8, vocab_size=131072, rope_theta=1e6, max_seq_len=1024000),
    # mistralai/Mistral-Small-24B-Base-2501.
    "mistral-small-24b": MistralConfig(dim=5120, n_layers=40, head_dim=128, hidden_dim=32768, n_heads=32,
                                       n_kv_heads=8, vocab_size=131072, rope_theta=1e8, max_seq_len=32768),
    # mistralai/Codestral-22B-v0.1.
    "codestral-22b": MistralConfig(dim=6144, n_layers=56, head_dim=128, hidden_dim=16384, n_heads=48,
                                   n_kv_heads=8, vocab_size=32768, rope_theta=1e6, max_seq_len=32768),
    # mistralai/Mixtral-8x7B-v0.1: eight experts of Mistral 7B's feed-forward, two per token.
    "mixtral-8x7b-v0.1": _MISTRAL_7B.replace(rope_theta=1e6, sliding_window=None, n_experts=8, n_experts_per_tok=2,
                                              router_aux_loss_coef=0.02),
    # mistralai/Mixtral-8x22B-v0.1; v0.3 is the same model with v3's vocabulary of 32768 (Mistral's
    # mixtral-8x22B-v0.3 release, and the HF files of Mixtral-8x22B-Instruct-v0.1).
    "mixtral-8x22b-v0.1": _MIXTRAL_8X22B,
    "mixtral-8x22b-v0.3": _MIXTRAL_8X22B.replace(vocab_size=32768),
    # The default model of train.py: ~15.7M parameters, trained on a laptop CPU in minutes.
    "mistral-15m": MistralConfig(dim=384, n_layers=6, head_dim=64, hidden_dim=1024, n_heads=6,
                                 n_kv_heads=2, vocab_size=8192, rope_theta=1e4, sliding_window=256,
                                 max_seq_len=1024),
}
