"""MistralConfig: one frozen dataclass, named presets, and HF config.json / native params.json I/O."""

from __future__ import annotations

import dataclasses
import json
import logging
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
_DEFAULT_MAX_SEQ_LEN = 32768  # what Mistral 7B's HF config.json states; params.json never says


class ConfigError(ValueError):
    """A config file or value that cannot describe a Mistral model."""


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
    sliding_window: int | None = None  # None: full causal attention
    max_seq_len: int = _DEFAULT_MAX_SEQ_LEN
    dtype: str = "float32"  # compute dtype of activations
    param_dtype: str = "float32"  # storage dtype of parameters
    remat: str = "none"  # activation checkpointing policy of each block: a key of REMAT_POLICIES
    attention: str = "auto"  # self-attention kernel of full sequences, see attention.py
    attention_block: int = 128  # queries per block of the "xla" kernel (BENCHMARKS.md: block sizes)
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
        if self.sliding_window is not None and (
                not isinstance(self.sliding_window, int) or self.sliding_window < 1):
            raise ConfigError(f"sliding_window must be a positive integer or None, got {self.sliding_window!r}")
        if not self.norm_eps > 0:
            raise ConfigError(f"norm_eps must be positive, got {self.norm_eps!r}")
        if not self.rope_theta > 0:
            raise ConfigError(f"rope_theta must be positive, got {self.rope_theta!r}")
        for name in ("dtype", "param_dtype"):
            if getattr(self, name) not in DTYPES:
                raise ConfigError(f"{name} must be one of {DTYPES}, got {getattr(self, name)!r}")
        if self.remat not in REMAT_POLICIES:
            raise ConfigError(f"remat must be one of {tuple(REMAT_POLICIES)}, got {self.remat!r}")
        if self.attention not in ATTENTION_KERNELS:
            raise ConfigError(f"attention must be one of {ATTENTION_KERNELS}, got {self.attention!r}")

    def replace(self, **changes) -> MistralConfig:
        return dataclasses.replace(self, **changes)

    @property
    def num_params(self) -> int:
        attn = self.dim * self.head_dim * (2 * self.n_heads + 2 * self.n_kv_heads)
        ffn = 3 * self.dim * self.hidden_dim
        per_layer = attn + ffn + 2 * self.dim
        return self.n_layers * per_layer + 2 * self.vocab_size * self.dim + self.dim

    @classmethod
    def preset(cls, name: str, **overrides) -> MistralConfig:
        if name not in PRESETS:
            raise ConfigError(f"unknown preset {name!r}; known: {', '.join(sorted(PRESETS))}")
        return dataclasses.replace(PRESETS[name], **overrides)

    # ---- HF transformers config.json -------------------------------------------------------

    @classmethod
    def from_hf_dict(cls, d: dict[str, Any], **overrides) -> MistralConfig:
        model_type = d.get("model_type", "mistral")
        if model_type != "mistral":
            raise ConfigError(f"config.json has model_type {model_type!r}, expected 'mistral'")
        if d.get("tie_word_embeddings", False):
            raise ConfigError("config.json sets tie_word_embeddings; Mistral's output projection is untied")
        if d.get("hidden_act", "silu") != "silu":
            raise ConfigError(f"config.json hidden_act {d['hidden_act']!r} is not silu")
        rope = d.get("rope_parameters") or {}  # transformers >= 5 nests rope_theta here
        if rope.get("rope_type", "default") != "default" or d.get("rope_scaling"):
            raise ConfigError("config.json asks for RoPE scaling, which Mistral does not use")
        rope_theta = rope.get("rope_theta", d.get("rope_theta"))
        if rope_theta is None:
            raise ConfigError("config.json has no rope_theta (neither top level nor rope_parameters)")
        try:
            n_heads = d["num_attention_heads"]
            fields = dict(
                dim=d["hidden_size"], n_layers=d["num_hidden_layers"],
                head_dim=d.get("head_dim") or d["hidden_size"] // n_heads,
                hidden_dim=d["intermediate_size"], n_heads=n_heads,
                n_kv_heads=d.get("num_key_value_heads") or n_heads,
                vocab_size=d["vocab_size"], norm_eps=float(d.get("rms_norm_eps", 1e-5)),
                rope_theta=float(rope_theta), sliding_window=_parse_window(d.get("sliding_window")),
                max_seq_len=d.get("max_position_embeddings", _DEFAULT_MAX_SEQ_LEN))
        except KeyError as e:
            raise ConfigError(f"config.json lacks required field {e.args[0]!r}") from None
        return cls(**{**fields, **overrides})

    def to_hf_dict(self) -> dict[str, Any]:
        return {
            "architectures": ["MistralForCausalLM"], "model_type": "mistral",
            "hidden_size": self.dim, "num_hidden_layers": self.n_layers, "head_dim": self.head_dim,
            "intermediate_size": self.hidden_dim, "num_attention_heads": self.n_heads,
            "num_key_value_heads": self.n_kv_heads, "vocab_size": self.vocab_size,
            "rms_norm_eps": self.norm_eps, "rope_theta": self.rope_theta,
            "sliding_window": self.sliding_window, "max_position_embeddings": self.max_seq_len,
            "hidden_act": "silu", "tie_word_embeddings": False, "bos_token_id": 1, "eos_token_id": 2,
            "torch_dtype": self.param_dtype,
        }

    # ---- Mistral-native params.json ---------------------------------------------------------

    @classmethod
    def from_params_dict(cls, d: dict[str, Any], **overrides) -> MistralConfig:
        if d.get("moe"):
            raise ConfigError("params.json describes a mixture-of-experts model, which is not supported")
        try:
            window = _parse_window(d.get("sliding_window"))
            rope_theta = d.get("rope_theta")
            if rope_theta is None:
                # Official v0.1 params.json omits rope_theta; v0.2+ (no window) use 1e6.
                rope_theta = 10000.0 if window is not None else 1e6
                logger.warning("params.json has no rope_theta; inferred %g from sliding_window=%s",
                               rope_theta, window)
            fields = dict(
                dim=d["dim"], n_layers=d["n_layers"], head_dim=d.get("head_dim") or d["dim"] // d["n_heads"],
                hidden_dim=d["hidden_dim"], n_heads=d["n_heads"], n_kv_heads=d.get("n_kv_heads") or d["n_heads"],
                vocab_size=d["vocab_size"], norm_eps=float(d.get("norm_eps", 1e-5)),
                rope_theta=float(rope_theta), sliding_window=window)
        except KeyError as e:
            raise ConfigError(f"params.json lacks required field {e.args[0]!r}") from None
        return cls(**{**fields, **overrides})

    def to_params_dict(self) -> dict[str, Any]:
        return {
            "dim": self.dim, "n_layers": self.n_layers, "head_dim": self.head_dim,
            "hidden_dim": self.hidden_dim, "n_heads": self.n_heads, "n_kv_heads": self.n_kv_heads,
            "norm_eps": self.norm_eps, "vocab_size": self.vocab_size, "rope_theta": self.rope_theta,
            "sliding_window": self.sliding_window,
        }

    # ---- files ------------------------------------------------------------------------------

    @classmethod
    def resolve(cls, spec: str, **overrides) -> MistralConfig:
        """A preset name, a config.json / params.json file, or a directory holding one."""
        if os.path.isdir(spec):
            return cls.from_dir(spec, **overrides)
        if os.path.isfile(spec):
            d = _read_json(spec)
            return cls.from_params_dict(d, **overrides) if "dim" in d else cls.from_hf_dict(d, **overrides)
        return cls.preset(spec, **overrides)

    @classmethod
    def from_dir(cls, path: str | os.PathLike, **overrides) -> MistralConfig:
        """Reads `config.json` (HF format) or, failing that, `params.json` (Mistral-native)."""
        for name, parse in (("config.json", cls.from_hf_dict), ("params.json", cls.from_params_dict)):
            file = os.path.join(path, name)
            if os.path.isfile(file):
                return parse(_read_json(file), **overrides)
        raise ConfigError(f"{path} has neither config.json nor params.json")

    def save_hf(self, path: str | os.PathLike) -> None:
        _write_json(os.path.join(path, "config.json"), self.to_hf_dict())

    def save_params(self, path: str | os.PathLike) -> None:
        _write_json(os.path.join(path, "params.json"), self.to_params_dict())


def _parse_window(value: Any) -> int | None:
    """sliding_window as real checkpoints write it: null, an int, a string, or one value per layer."""
    if isinstance(value, (list, tuple)):
        values = {_parse_window(v) for v in value}
        if len(values) != 1:
            raise ConfigError(f"per-layer sliding_window with different values {sorted(values, key=str)} "
                              "is not supported (all layers share one compiled block)")
        return values.pop()
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


def _read_json(file: str) -> dict[str, Any]:
    try:
        with open(file) as f:
            d = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
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

PRESETS: dict[str, MistralConfig] = {
    "mistral-7b-v0.1": _MISTRAL_7B,
    "mistral-7b-v0.2": _MISTRAL_7B.replace(rope_theta=1e6, sliding_window=None),
    "mistral-7b-v0.3": _MISTRAL_7B.replace(rope_theta=1e6, sliding_window=None, vocab_size=32768),
    # The default model of train.py: ~15.7M parameters, trained on a laptop CPU in minutes.
    "mistral-15m": MistralConfig(dim=384, n_layers=6, head_dim=64, hidden_dim=1024, n_heads=6,
                                 n_kv_heads=2, vocab_size=8192, rope_theta=1e4, sliding_window=256,
                                 max_seq_len=1024),
}
