"""MistralConfig's two file formats: HF transformers' config.json and Mistral-native params.json,
read into the config's fields and written back from a config.

Reading handles what real checkpoints contain: `sliding_window` null, a string or a per-layer
list; HF `layer_types`; `rope_theta` at the top level (transformers < 5), under
`rope_parameters` (>= 5) or, in params.json, absent; experts in either format; the text model
of a multimodal checkpoint. Whatever cannot describe a model is a ConfigError naming the field.
"""

from __future__ import annotations

import functools
import json
import logging
import os
from typing import Any

from mistral_jax.model.config_groups import ConfigError, MoE, to_float

logger = logging.getLogger("mistral_jax")

DEFAULT_MAX_SEQ_LEN = 32768  # what Mistral 7B's HF config.json states; params.json never says
HF_DEFAULT_EPS = {"mistral": 1e-5, "ministral": 1e-6, "mixtral": 1e-5}  # rms_norm_eps when config.json omits it
HF_LAYER_TYPES = ("full_attention", "sliding_attention")


def parser(source: str):
    """Decorates a classmethod that reads a dict of `source` (config.json, params.json): the
    one place where what a malformed dict makes Python raise while it is read (a missing key,
    a string where a number goes, a list as a dict key, a zero divisor) becomes a ConfigError
    saying so; the values read are then checked by the config itself."""
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


# ---- HF transformers config.json ------------------------------------------------------------

def hf_fields(d: dict[str, Any]) -> dict[str, Any]:
    """MistralConfig's fields from the config.json of MistralForCausalLM, MinistralForCausalLM,
    MixtralForCausalLM, or the text model of Mistral3ForConditionalGeneration (its vision tower
    and projector are not read)."""
    model_type = d.get("model_type", "mistral")
    if model_type == "mistral3":
        text = d.get("text_config")
        if not isinstance(text, dict):
            raise ConfigError("config.json has model_type 'mistral3' but no text_config object")
        return hf_fields({"model_type": "mistral", **text})
    if not isinstance(model_type, str) or model_type not in HF_DEFAULT_EPS:
        raise ConfigError(f"config.json has model_type {model_type!r}, expected one of "
                          f"{', '.join(map(repr, HF_DEFAULT_EPS))} or 'mistral3'")
    if d.get("tie_word_embeddings", False):
        raise ConfigError("config.json sets tie_word_embeddings; Mistral's output projection is untied")
    if d.get("hidden_act", "silu") != "silu":
        raise ConfigError(f"config.json hidden_act {d['hidden_act']!r} is not silu")
    n_heads, n_layers = d["num_attention_heads"], d["num_hidden_layers"]
    fields = dict(
        dim=d["hidden_size"], n_layers=n_layers, head_dim=d.get("head_dim") or d["hidden_size"] // n_heads,
        hidden_dim=d["intermediate_size"], n_heads=n_heads, n_kv_heads=d.get("num_key_value_heads") or n_heads,
        vocab_size=d["vocab_size"],
        norm_eps=to_float("rms_norm_eps", d.get("rms_norm_eps", HF_DEFAULT_EPS[model_type])),
        rope_theta=_hf_rope_theta(d), sliding_window=_hf_windows(d, n_layers),
        max_seq_len=d.get("max_position_embeddings", DEFAULT_MAX_SEQ_LEN))
    if model_type == "mixtral":
        fields["moe"] = MoE(d["num_local_experts"], d["num_experts_per_tok"],
                            to_float("router_aux_loss_coef", d.get("router_aux_loss_coef", 0.001)))
    return fields


def hf_dict(config) -> dict[str, Any]:
    """config.json of MistralForCausalLM, of MixtralForCausalLM with experts, or of
    MinistralForCausalLM with per-layer windows; beyond those (config.hf_expressible False: a
    per-layer list that we read and transformers does not), the list as params.json has it."""
    d = {
        "architectures": ["MistralForCausalLM"], "model_type": "mistral",
        "hidden_size": config.dim, "num_hidden_layers": config.n_layers, "head_dim": config.head_dim,
        "intermediate_size": config.hidden_dim, "num_attention_heads": config.n_heads,
        "num_key_value_heads": config.n_kv_heads, "vocab_size": config.vocab_size,
        "rms_norm_eps": config.norm_eps, "rope_theta": config.rope_theta,
        "sliding_window": config.sliding_window, "max_position_embeddings": config.max_seq_len,
        "hidden_act": "silu", "tie_word_embeddings": False, "bos_token_id": 1, "eos_token_id": 2,
        "torch_dtype": config.param_dtype,
    }
    if config.moe is not None:
        d.update(architectures=["MixtralForCausalLM"], model_type="mixtral", num_local_experts=config.moe.n_experts,
                 num_experts_per_tok=config.moe.n_experts_per_tok,
                 router_aux_loss_coef=config.moe.router_aux_loss_coef)
    if not config.hf_expressible:
        d["sliding_window"] = list(config.windows)
    elif config.grouped_layers:
        window = next(w for w in config.window_kinds if w is not None)
        d.update(architectures=["MinistralForCausalLM"], model_type="ministral", sliding_window=window,
                 layer_types=["full_attention" if w is None else "sliding_attention" for w in config.windows])
    return d


def _hf_windows(d: dict[str, Any], n_layers: int) -> int | None | list[int | None]:
    """config.json's sliding_window, per layer where layer_types says which layers slide."""
    window = parse_window(d.get("sliding_window"))
    layer_types = d.get("layer_types")
    if layer_types is None:
        return window
    if isinstance(window, list):
        raise ConfigError("config.json has both layer_types and a list of sliding windows")
    if not isinstance(layer_types, list) or len(layer_types) != n_layers:
        raise ConfigError(f"config.json layer_types must be a list of {n_layers} layer types")
    unknown = sorted(set(map(str, layer_types)) - set(HF_LAYER_TYPES))
    if unknown:
        raise ConfigError(f"config.json layer_types has unknown kinds {unknown}; known: {', '.join(HF_LAYER_TYPES)}")
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
    return to_float("rope_theta", rope_theta)


# ---- Mistral-native params.json -------------------------------------------------------------

def params_fields(d: dict[str, Any]) -> dict[str, Any]:
    """MistralConfig's fields from mistral-inference's params.json (with "moe" for Mixtral), or
    a multimodal one's (Mistral Small 3.1) text model."""
    for key in ("yarn", "llama_4_scaling", "rope_scaling"):
        if d.get(key):
            raise ConfigError(f"params.json asks for RoPE scaling ({key!r}), which is not implemented")
    window = parse_window(d.get("sliding_window"))
    rope_theta = d.get("rope_theta")
    if rope_theta is None:
        # Official v0.1 params.json omits rope_theta; v0.2+ (no window) use 1e6.
        rope_theta = 10000.0 if window is not None else 1e6
        logger.warning("params.json has no rope_theta; inferred %g from sliding_window=%s", rope_theta, window)
    fields = dict(
        dim=d["dim"], n_layers=d["n_layers"], head_dim=d.get("head_dim") or d["dim"] // d["n_heads"],
        hidden_dim=d["hidden_dim"], n_heads=d["n_heads"], n_kv_heads=d.get("n_kv_heads") or d["n_heads"],
        vocab_size=d["vocab_size"], norm_eps=to_float("norm_eps", d.get("norm_eps", 1e-5)),
        rope_theta=to_float("rope_theta", rope_theta), sliding_window=window)
    moe = d.get("moe")
    if moe is not None and not isinstance(moe, dict):
        raise ConfigError(f"params.json moe must be an object with num_experts and num_experts_per_tok, got {moe!r}")
    if moe:
        fields["moe"] = MoE(moe["num_experts"], moe["num_experts_per_tok"])
    return fields


def params_dict(config) -> dict[str, Any]:
    d = {
        "dim": config.dim, "n_layers": config.n_layers, "head_dim": config.head_dim,
        "hidden_dim": config.hidden_dim, "n_heads": config.n_heads, "n_kv_heads": config.n_kv_heads,
        "norm_eps": config.norm_eps, "vocab_size": config.vocab_size, "rope_theta": config.rope_theta,
        "sliding_window": list(config.windows) if isinstance(config.sliding_window, tuple) else config.sliding_window,
    }
    if config.moe is not None:
        d["moe"] = {"num_experts": config.moe.n_experts, "num_experts_per_tok": config.moe.n_experts_per_tok}
    return d


def parse_window(value: Any) -> int | None | list[int | None]:
    """sliding_window as real files write it: null, an int, a string, or a list of those
    (per layer, repeating: null is a full-attention layer)."""
    if isinstance(value, (list, tuple)):
        return [parse_window(v) for v in value]
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


# ---- files ----------------------------------------------------------------------------------

def from_file(file: str, parse, d: dict[str, Any], overrides: dict[str, Any]):
    """parse(d), its errors naming the file (not just "config.json")."""
    try:
        return parse(d, **overrides)
    except ConfigError as e:
        name, message = os.path.basename(file), str(e)
        raise ConfigError(file + message[len(name):] if message.startswith(name) else f"{file}: {message}") from None


def read_json(file: str) -> dict[str, Any]:
    try:
        with open(file, encoding="utf-8") as f:
            d = json.load(f)
    except (OSError, ValueError, RecursionError) as e:  # ValueError: invalid JSON or UTF-8
        raise ConfigError(f"cannot read {file}: {e}") from None
    if not isinstance(d, dict):
        raise ConfigError(f"{file} does not hold a JSON object")
    return d


def write_json(file: str, d: dict[str, Any]) -> None:
    with open(file, "w") as f:
        json.dump(d, f, indent=2)
        f.write("\n")
