"""MistralConfig's two file formats: HF transformers' config.json and Mistral-native params.json,
read into the config's fields and written back from a config.

Reading handles what real checkpoints contain: `sliding_window` null, a string or a per-layer
list; HF `layer_types`; `rope_theta` at the top level (transformers < 5), under
`rope_parameters` (>= 5) or, in params.json, absent; YaRN and Llama 4's query scale (HF
`rope_parameters`, native "yarn" and "llama_4_scaling"); tied embeddings; experts in either
format; Llama's config.json; a multimodal checkpoint's vision encoder and projector (HF
`vision_config` of Mistral3ForConditionalGeneration, native "vision_encoder"). Whatever cannot describe
a model is a ConfigError naming the field; a setting not understood is refused, never dropped.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import os
from typing import Any

from mistral_jax.model.config_groups import (ConfigError, LatentAttention, Llama4Scaling, MoE, Vision, YaRN,
                                             to_float, yarn_mscale)

logger = logging.getLogger("mistral_jax")

DEFAULT_MAX_SEQ_LEN = 32768  # what Mistral 7B's HF config.json states; params.json never says
# rms_norm_eps when config.json omits it: transformers' default per model type
HF_DEFAULT_EPS = {"mistral": 1e-5, "ministral": 1e-6, "mixtral": 1e-5, "ministral3": 1e-5, "llama": 1e-6,
                  "mistral4": 1e-6}
HF_LAYER_TYPES = ("full_attention", "sliding_attention")
# max_position_embeddings when config.json omits it, where transformers' default is other than
# Mistral 7B's 32768 (it sets YaRN's factor when rope_parameters has none)
HF_DEFAULT_LENGTH = {"ministral3": 262144, "llama": 2048, "mistral4": 1048576}


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
    MixtralForCausalLM, Ministral3ForCausalLM, Mistral4ForCausalLM (latent attention, fine-grained
    experts), LlamaForCausalLM (the same block without a window), or
    Mistral3ForConditionalGeneration (any of those as its text model, and its vision tower and
    projector: `vision`)."""
    model_type = d.get("model_type", "mistral")
    if model_type == "mistral3":
        text = d.get("text_config")
        if not isinstance(text, dict):
            raise ConfigError("config.json has model_type 'mistral3' but no text_config object")
        # Tied as the top level says (Ministral 3 3B), else as the text model says, else untied:
        # transformers 5.24 would tie a file that says nothing, dropping an lm_head it holds (a
        # 4.x-written Small 3.1); untied, a file without lm_head is a one-line error, not a guess.
        tied = d.get("tie_word_embeddings", text.get("tie_word_embeddings", False))
        fields = hf_fields({"model_type": "mistral", **text, "tie_word_embeddings": tied})
        return {**fields, "vision": _hf_vision(d)}
    if not isinstance(model_type, str) or model_type not in HF_DEFAULT_EPS:
        raise ConfigError(f"config.json has model_type {model_type!r}, expected one of "
                          f"{', '.join(map(repr, HF_DEFAULT_EPS))} or 'mistral3'")
    if d.get("hidden_act", "silu") != "silu":
        raise ConfigError(f"config.json hidden_act {d['hidden_act']!r} is not silu")
    for bias in ("attention_bias", "mlp_bias"):
        if d.get(bias):
            raise ConfigError(f"config.json sets {bias}: Mistral's projections have no bias")
    n_heads, n_layers = d["num_attention_heads"], d["num_hidden_layers"]
    max_seq_len = d.get("max_position_embeddings", HF_DEFAULT_LENGTH.get(model_type, DEFAULT_MAX_SEQ_LEN))
    if model_type == "mistral4":
        return _hf_mistral4_fields(d, max_seq_len)
    fields = dict(
        dim=d["hidden_size"], n_layers=n_layers, head_dim=d.get("head_dim") or d["hidden_size"] // n_heads,
        hidden_dim=d["intermediate_size"], n_heads=n_heads, n_kv_heads=d.get("num_key_value_heads") or n_heads,
        vocab_size=d["vocab_size"],
        norm_eps=to_float("rms_norm_eps", d.get("rms_norm_eps", HF_DEFAULT_EPS[model_type])),
        sliding_window=_hf_windows(d, n_layers), max_seq_len=max_seq_len,
        tied_embeddings=_flag("tie_word_embeddings", d.get("tie_word_embeddings", False)),
        **_hf_rope(d, max_seq_len))
    if model_type == "mixtral":
        fields["moe"] = MoE(d["num_local_experts"], d["num_experts_per_tok"],
                            to_float("router_aux_loss_coef", d.get("router_aux_loss_coef", 0.001)))
    return fields


# Mistral3Config's settings whose only implemented value is what every release has.
_HF_PROJECTOR_FIXED = {"projector_hidden_act": "gelu", "multimodal_projector_bias": False, "vision_feature_layer": -1}


def _hf_vision(d: dict[str, Any]) -> Vision:
    """Mistral3ForConditionalGeneration's vision tower (a PixtralVisionConfig) and projector."""
    v = d.get("vision_config")
    if not isinstance(v, dict):
        raise ConfigError("config.json has model_type 'mistral3' but no vision_config object")
    if v.get("model_type", "pixtral") != "pixtral":
        raise ConfigError(f"config.json vision_config has model_type {v['model_type']!r}, expected 'pixtral'")
    for key, plain in _HF_PROJECTOR_FIXED.items():
        if d.get(key, plain) not in (plain, [plain]):
            raise ConfigError(f"config.json sets {key} {d[key]!r}: only {plain!r} (every release's) is implemented")
    rope = v.get("rope_parameters") or {}
    if not isinstance(rope, dict) or rope.get("rope_type", "axial") not in ("axial", "default"):
        raise ConfigError(f"config.json vision_config rope_parameters {rope!r}: the Pixtral encoder's rope is axial")
    dim, heads = v.get("hidden_size", 1024), v.get("num_attention_heads", 16)
    if v.get("head_dim") not in (None, dim // heads):  # transformers sets it so, whatever the file says
        raise ConfigError(f"config.json vision_config head_dim {v['head_dim']!r} is not hidden_size / "
                          f"num_attention_heads ({dim // heads}), which the Pixtral encoder uses")
    return Vision(dim=dim, hidden_dim=v.get("intermediate_size", 4096), n_layers=v.get("num_hidden_layers", 24),
                  n_heads=heads, patch_size=v.get("patch_size", 16), image_size=v.get("image_size", 1024),
                  rope_theta=to_float("vision rope_theta", rope.get("rope_theta", v.get("rope_theta", 10000.0))),
                  num_channels=v.get("num_channels", 3), act=v.get("hidden_act", "gelu"),
                  spatial_merge_size=d.get("spatial_merge_size", 2),
                  image_token_id=d.get("image_token_index", d.get("image_token_id", 10)))


def _hf_vision_dict(config, text: dict[str, Any]) -> dict[str, Any]:
    """Mistral3ForConditionalGeneration's config.json around the text model's."""
    v = config.vision
    text = {k: value for k, value in text.items() if k not in ("architectures", "torch_dtype")}
    return {
        "architectures": ["Mistral3ForConditionalGeneration"], "model_type": "mistral3", "text_config": text,
        "vision_config": {"model_type": "pixtral", "hidden_size": v.dim, "intermediate_size": v.hidden_dim,
                          "num_hidden_layers": v.n_layers, "num_attention_heads": v.n_heads,
                          "head_dim": v.head_dim, "num_channels": v.num_channels, "image_size": v.image_size,
                          "patch_size": v.patch_size, "hidden_act": v.act,
                          "rope_parameters": {"rope_type": "axial", "rope_theta": v.rope_theta}},
        "image_token_index": v.image_token_id, "spatial_merge_size": v.spatial_merge_size,
        **_HF_PROJECTOR_FIXED, "tie_word_embeddings": config.tied_embeddings, "torch_dtype": config.param_dtype,
    }


def _hf_mistral4_fields(d: dict[str, Any], max_seq_len: Any) -> dict[str, Any]:
    """Mistral4ForCausalLM's config.json (Mistral Small 4's text model): latent attention and
    fine-grained experts with shared ones, its first first_k_dense_replace layers dense."""
    for key, plain in (("n_group", 1), ("topk_group", 1), ("norm_topk_prob", True)):
        if d.get(key, plain) != plain:
            raise ConfigError(f"config.json sets {key} {d[key]!r}: only {key} {plain!r} (every Mistral release's) "
                              "is implemented")
    mla = LatentAttention(d["kv_lora_rank"], d["qk_nope_head_dim"], d["qk_rope_head_dim"], d["v_head_dim"],
                          d.get("q_lora_rank"))
    n_layers, dense = d["num_hidden_layers"], d.get("first_k_dense_replace") or 0
    moe = None if dense >= n_layers else MoE(
        d["n_routed_experts"], d["num_experts_per_tok"], hidden_dim=d["moe_intermediate_size"],
        n_shared_experts=d.get("n_shared_experts") or 0,
        routed_scaling_factor=to_float("routed_scaling_factor", d.get("routed_scaling_factor", 1.0)),
        first_k_dense_replace=dense)
    return dict(
        dim=d["hidden_size"], n_layers=n_layers, head_dim=mla.qk_head_dim, hidden_dim=d["intermediate_size"],
        n_heads=d["num_attention_heads"], n_kv_heads=d["num_attention_heads"], vocab_size=d["vocab_size"],
        norm_eps=to_float("rms_norm_eps", d.get("rms_norm_eps", HF_DEFAULT_EPS["mistral4"])), max_seq_len=max_seq_len,
        tied_embeddings=_flag("tie_word_embeddings", d.get("tie_word_embeddings", False)), mla=mla, moe=moe,
        **_hf_rope(d, max_seq_len, rotary=mla.qk_rope_head_dim / mla.qk_head_dim))


def hf_dict(config) -> dict[str, Any]:
    """config.json of MistralForCausalLM, of MixtralForCausalLM with experts, of
    MinistralForCausalLM with per-layer windows, or of Ministral3ForCausalLM with Llama 4's query
    scale; RoPE scaling under rope_parameters. Beyond what transformers expresses
    (config.hf_obstacle), what we read back: a per-layer window list as params.json has it, the
    query scale on another model type."""
    d = {
        "architectures": ["MistralForCausalLM"], "model_type": "mistral",
        "hidden_size": config.dim, "num_hidden_layers": config.n_layers, "head_dim": config.head_dim,
        "intermediate_size": config.hidden_dim, "num_attention_heads": config.n_heads,
        "num_key_value_heads": config.n_kv_heads, "vocab_size": config.vocab_size,
        "rms_norm_eps": config.norm_eps, "rope_theta": config.rope_theta,
        "sliding_window": config.sliding_window, "max_position_embeddings": config.max_seq_len,
        "hidden_act": "silu", "tie_word_embeddings": config.tied_embeddings, "bos_token_id": 1, "eos_token_id": 2,
        "torch_dtype": config.param_dtype,
    }
    if config.yarn is not None or config.llama_4_scaling is not None:
        d["rope_parameters"] = _hf_rope_parameters(config)
        del d["rope_theta"]
    if config.vision is not None:
        return _hf_vision_dict(config, hf_dict(config.replace(vision=None)))
    if config.mla is not None:
        return _hf_mistral4_dict(config, d)
    if config.moe is not None:
        d.update(architectures=["MixtralForCausalLM"], model_type="mixtral", num_local_experts=config.moe.n_experts,
                 num_experts_per_tok=config.moe.n_experts_per_tok,
                 router_aux_loss_coef=config.moe.router_aux_loss_coef)
    if config.grouped_layers and (config.moe or len({w for w in config.window_kinds if w is not None}) > 1):
        d["sliding_window"] = list(config.windows)  # no layer_types can say it: params.json's list
    elif config.grouped_layers:
        window = next(w for w in config.window_kinds if w is not None)
        d.update(architectures=["MinistralForCausalLM"], model_type="ministral", sliding_window=window,
                 layer_types=["full_attention" if w is None else "sliding_attention" for w in config.windows])
    elif config.llama_4_scaling is not None and config.moe is None:
        d.update(architectures=["Ministral3ForCausalLM"], model_type="ministral3")
    return d


def _hf_mistral4_dict(config, d: dict[str, Any]) -> dict[str, Any]:
    """Mistral4ForCausalLM's config.json: latent attention, experts (none: every layer dense)."""
    m, moe = config.mla, config.moe
    if "rope_parameters" not in d:
        d["rope_parameters"] = {"rope_type": "default", "rope_theta": d.pop("rope_theta")}
    d["rope_parameters"]["partial_rotary_factor"] = m.qk_rope_head_dim / m.qk_head_dim
    d.update(architectures=["Mistral4ForCausalLM"], model_type="mistral4", head_dim=m.qk_head_dim,
             num_key_value_heads=config.n_heads, q_lora_rank=m.q_lora_rank, kv_lora_rank=m.kv_lora_rank,
             qk_nope_head_dim=m.qk_nope_head_dim, qk_rope_head_dim=m.qk_rope_head_dim, v_head_dim=m.v_head_dim,
             rope_interleave=True, n_group=1, topk_group=1, norm_topk_prob=True)
    del d["sliding_window"]
    if moe is None:  # transformers' way of none: every layer before the first with experts
        d.update(n_routed_experts=1, num_experts_per_tok=1, n_shared_experts=0, moe_intermediate_size=config.hidden_dim,
                 first_k_dense_replace=config.n_layers, routed_scaling_factor=1.0)
    else:
        d.update(n_routed_experts=moe.n_experts, num_experts_per_tok=moe.n_experts_per_tok,
                 n_shared_experts=moe.n_shared_experts, moe_intermediate_size=moe.hidden_dim or config.hidden_dim,
                 first_k_dense_replace=moe.first_k_dense_replace, routed_scaling_factor=moe.routed_scaling_factor)
    return d


_YARN_KEYS = ("factor", "original_max_position_embeddings", "beta_fast", "beta_slow", "mscale", "mscale_all_dim",
              "attention_factor", "truncate")
# Where the query scale's length is kept when it differs from YaRN's (rope_parameters has one
# original_max_position_embeddings): a key of ours, which transformers does not read.
_LLAMA_4_LENGTH = "llama_4_scaling_original_max_position_embeddings"


def _hf_rope(d: dict[str, Any], max_seq_len: Any, rotary: float = 1.0) -> dict[str, Any]:
    """rope_theta, yarn and llama_4_scaling from rope_parameters (transformers >= 5) or the
    top level and rope_scaling (< 5). Any other RoPE scaling (linear, dynamic, longrope,
    llama3) is refused rather than dropped, as is a partial_rotary_factor other than the
    model's (`rotary`: 1, or latent attention's rope share of the head)."""
    rope = {}
    for key in ("rope_scaling", "rope_parameters"):
        params = d.get(key) or {}
        if not isinstance(params, dict):
            raise ConfigError("config.json rope_parameters / rope_scaling must be objects")
        rope.update(params)
    kind = rope.get("rope_type", rope.get("type", "default"))
    partial = rope.get("partial_rotary_factor", d.get("partial_rotary_factor"))
    if partial is not None and not math.isclose(to_float("partial_rotary_factor", partial), rotary):
        raise ConfigError(f"config.json's partial_rotary_factor {partial!r}: this model rotates {rotary:g} of each "
                          "head, which is all a Mistral release does")
    rope_theta = rope.get("rope_theta", d.get("rope_theta"))
    if rope_theta is None:
        raise ConfigError("config.json has no rope_theta (neither top level nor rope_parameters)")
    fields: dict[str, Any] = {"rope_theta": to_float("rope_theta", rope_theta)}
    if kind == "yarn":
        factor = rope["factor"]
        if factor is None:  # transformers: the ratio of the context lengths
            factor = max_seq_len / rope["original_max_position_embeddings"]
        fields["yarn"] = YaRN(
            to_float("factor", factor), rope["original_max_position_embeddings"],
            to_float("beta_fast", rope.get("beta_fast") or 32), to_float("beta_slow", rope.get("beta_slow") or 1),
            *(None if rope.get(k) is None else to_float(k, rope[k]) for k in ("mscale", "mscale_all_dim",
                                                                              "attention_factor")),
            truncate=_flag("truncate", rope.get("truncate", True)))
    elif kind != "default" or any(k in rope for k in ("factor", "beta_fast", "beta_slow")):
        raise ConfigError(f"config.json asks for RoPE scaling ({kind}), which is not implemented")
    if rope.get("llama_4_scaling_beta") is not None:
        length = rope.get(_LLAMA_4_LENGTH, rope.get("original_max_position_embeddings"))
        if length is None:
            raise ConfigError("config.json sets llama_4_scaling_beta without original_max_position_embeddings")
        fields["llama_4_scaling"] = Llama4Scaling(to_float("llama_4_scaling_beta", rope["llama_4_scaling_beta"]),
                                                  length)
    return fields


def _hf_rope_parameters(config) -> dict[str, Any]:
    rope: dict[str, Any] = {"rope_type": "default", "rope_theta": config.rope_theta}
    yarn, llama_4 = config.yarn, config.llama_4_scaling
    if yarn is not None:
        rope.update(rope_type="yarn", **{k: getattr(yarn, k) for k in _YARN_KEYS if getattr(yarn, k) is not None})
        if yarn.truncate:
            del rope["truncate"]  # transformers' default
    if llama_4 is not None:
        rope["llama_4_scaling_beta"] = llama_4.beta
        length = rope.setdefault("original_max_position_embeddings", llama_4.original_max_position_embeddings)
        if length != llama_4.original_max_position_embeddings:
            rope[_LLAMA_4_LENGTH] = llama_4.original_max_position_embeddings
    return rope


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


# ---- Mistral-native params.json -------------------------------------------------------------

def params_fields(d: dict[str, Any]) -> dict[str, Any]:
    """MistralConfig's fields from mistral-inference's params.json (with "moe" for Mixtral,
    "yarn" and "llama_4_scaling" for the Mistral 3 generation), or a multimodal one's text model."""
    if d.get("rope_scaling"):
        raise ConfigError("params.json asks for RoPE scaling ('rope_scaling'), which is not implemented")
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
        rope_theta=to_float("rope_theta", rope_theta), sliding_window=window,
        tied_embeddings=_flag("tied_embeddings", d.get("tied_embeddings", False)))
    length = d.get("max_position_embeddings", d.get("max_seq_len"))
    if length is not None:
        fields["max_seq_len"] = length
    if d.get("qk_nope_head_dim"):  # latent attention (Mistral Large 3, Small 4)
        fields["mla"] = LatentAttention(d["kv_lora_rank"], d["qk_nope_head_dim"], d["qk_rope_head_dim"],
                                        d["v_head_dim"], d.get("q_lora_rank"))
        fields.update(head_dim=fields["mla"].qk_head_dim, n_kv_heads=d["n_heads"])
    moe = d.get("moe")
    if moe is not None and not isinstance(moe, dict):
        raise ConfigError(f"params.json moe must be an object with num_experts and num_experts_per_tok, got {moe!r}")
    if moe := _block(d, "moe", _NATIVE_MOE_KEYS):
        for key, plain in _NATIVE_MOE_FIXED.items():
            if moe.get(key, plain) != plain:
                raise ConfigError(f"params.json moe {key} {moe[key]!r}: only {plain!r} (every release's) is "
                                  "implemented")
        given = {field: moe[key] for key, field in _NATIVE_MOE.items() if key in moe}
        if "routed_scaling_factor" in given:
            given["routed_scaling_factor"] = to_float("moe routed_scale", given["routed_scaling_factor"])
        fields["moe"] = MoE(moe["num_experts"], moe["num_experts_per_tok"], **given)
    if yarn := _block(d, "yarn", {"factor", "original_max_position_embeddings", "beta", "alpha", "apply_scale"}):
        # beta and alpha are beta_fast and beta_slow (vLLM's Mistral config remapper). apply_scale
        # (default true) is YaRN's magnitude correction: for grouped-query attention, cos and sin
        # times it (transformers' conversion writes mscale 1, mscale_all_dim 0), false: times 1
        # (mscale_all_dim 1); for latent attention, the softmax's scale times its square (vLLM's
        # deepseek_yarn: mscale_all_dim 1, as Small 4's config.json), false: no correction at all.
        apply_scale = _flag("yarn apply_scale", yarn.get("apply_scale", True))
        if "mla" in fields:
            correction = dict(mscale=1.0, mscale_all_dim=1.0) if apply_scale else dict(attention_factor=1.0)
        else:
            correction = dict(mscale=1.0, mscale_all_dim=0.0 if apply_scale else 1.0)
        fields["yarn"] = YaRN(to_float("yarn factor", yarn["factor"]), yarn["original_max_position_embeddings"],
                              to_float("yarn beta", yarn.get("beta", 32)), to_float("yarn alpha", yarn.get("alpha", 1)),
                              **correction)
    if scaling := _block(d, "llama_4_scaling", {"beta", "original_max_position_embeddings"}):
        fields["llama_4_scaling"] = Llama4Scaling(to_float("llama_4_scaling beta", scaling["beta"]),
                                                  scaling["original_max_position_embeddings"])
    if vision := _block(d, "vision_encoder", {*_NATIVE_VISION, *_NATIVE_VISION_FIXED, "image_size",
                                              "max_image_size"}):
        for key, plain in _NATIVE_VISION_FIXED.items():
            if vision.get(key, plain) != plain:
                raise ConfigError(f"params.json vision_encoder {key} {vision[key]!r}: only {plain!r} (every "
                                  "Mistral 3 release's) is implemented")
        size = vision.get("max_image_size", vision.get("image_size"))
        if "image_size" in vision and vision["image_size"] != size:
            raise ConfigError(f"params.json vision_encoder has image_size {vision['image_size']!r} and "
                              f"max_image_size {size!r}: one longest side is implemented")
        given = {field: vision[key] for key, field in _NATIVE_VISION.items() if key in vision}
        if "rope_theta" in given:
            given["rope_theta"] = to_float("vision_encoder rope_theta", given["rope_theta"])
        fields["vision"] = Vision(image_size=size, act="silu", **given)  # the native encoder's is SiLU
    return fields


# params.json's "vision_encoder" keys -> Vision's fields (vLLM's VisionEncoderArgs), and the keys
# whose only implemented value is what every Mistral 3 release has (HF's Mistral3 projector).
_NATIVE_VISION = {"hidden_size": "dim", "intermediate_size": "hidden_dim", "num_hidden_layers": "n_layers",
                  "num_attention_heads": "n_heads", "patch_size": "patch_size", "rope_theta": "rope_theta",
                  "num_channels": "num_channels", "spatial_merge_size": "spatial_merge_size",
                  "image_token_id": "image_token_id", "image_break_token_id": "image_break_token_id",
                  "image_end_token_id": "image_end_token_id"}
_NATIVE_VISION_FIXED = {"adapter_bias": False, "add_pre_mm_projector_layer_norm": True,
                        "mm_projector_id": "patch_merge"}


# params.json's "moe" keys -> MoE's fields (vLLM's Mistral config remapper), and the keys whose
# only implemented value is what every release has (parallelism hints are not read).
_NATIVE_MOE = {"expert_hidden_dim": "hidden_dim", "num_shared_experts": "n_shared_experts",
               "routed_scale": "routed_scaling_factor", "first_k_dense_replace": "first_k_dense_replace"}
_NATIVE_MOE_FIXED = {"route_every_n": 1, "num_expert_groups": 1, "num_expert_groups_per_tok": 1,
                     "use_load_balancing_bias": False, "renorm_strategy": "WEIGHTS"}
_NATIVE_MOE_KEYS = {"num_experts", "num_experts_per_tok", "expert_parallel", "expert_model_parallel",
                    *_NATIVE_MOE, *_NATIVE_MOE_FIXED}


def params_dict(config) -> dict[str, Any]:
    d = {
        "dim": config.dim, "n_layers": config.n_layers, "head_dim": config.head_dim,
        "hidden_dim": config.hidden_dim, "n_heads": config.n_heads, "n_kv_heads": config.n_kv_heads,
        "norm_eps": config.norm_eps, "vocab_size": config.vocab_size, "rope_theta": config.rope_theta,
        "sliding_window": list(config.windows) if isinstance(config.sliding_window, tuple) else config.sliding_window,
        "max_position_embeddings": config.max_seq_len,
    }
    if config.tied_embeddings:
        d["tied_embeddings"] = True
    if (m := config.mla) is not None:
        d.update(q_lora_rank=m.q_lora_rank, kv_lora_rank=m.kv_lora_rank, qk_nope_head_dim=m.qk_nope_head_dim,
                 qk_rope_head_dim=m.qk_rope_head_dim, v_head_dim=m.v_head_dim)
    if (moe := config.moe) is not None:
        d["moe"] = {"num_experts": moe.n_experts, "num_experts_per_tok": moe.n_experts_per_tok}
        d["moe"].update({key: getattr(moe, field) for key, field in _NATIVE_MOE.items()
                         if getattr(moe, field) != MoE.__dataclass_fields__[field].default})
    if (yarn := config.yarn) is not None:
        scale = yarn.cos_sin_scale
        if config.mla is not None:  # apply_scale: the softmax's mscale² (from_params_dict)
            sayable, apply_scale = scale == 1.0 and yarn.mscale_all_dim in (None, 0.0, 1.0), bool(yarn.mscale_all_dim)
        else:
            sayable, apply_scale = scale in (1.0, yarn_mscale(yarn.factor)), scale != 1.0
        if not sayable or not yarn.truncate:
            raise ConfigError(f"params.json's yarn block cannot say this YaRN (cos and sin times {scale:g}, "
                              f"mscale_all_dim {yarn.mscale_all_dim}{', untruncated' if not yarn.truncate else ''}): "
                              "write config.json")
        d["yarn"] = {"factor": yarn.factor, "original_max_position_embeddings": yarn.original_max_position_embeddings,
                     "beta": yarn.beta_fast, "alpha": yarn.beta_slow, "apply_scale": apply_scale}
    if (scaling := config.llama_4_scaling) is not None:
        d["llama_4_scaling"] = {"beta": scaling.beta,
                                "original_max_position_embeddings": scaling.original_max_position_embeddings}
    if (vision := config.vision) is not None:
        if vision.act != "silu":
            raise ConfigError(f"params.json's vision_encoder cannot say the encoder's {vision.act} (the native "
                              "encoder's feed-forward is SiLU): write config.json")
        d["vision_encoder"] = {key: getattr(vision, field) for key, field in _NATIVE_VISION.items()}
        d["vision_encoder"].update(image_size=vision.image_size, max_image_size=vision.image_size,
                                   **_NATIVE_VISION_FIXED)
    return d


def _block(d: dict[str, Any], key: str, known: set[str]) -> dict[str, Any] | None:
    """params.json's block `key` (None when absent or empty), refused when it holds other keys
    than `known`: a setting not understood is not dropped."""
    block = d.get(key)
    if not block:
        return None
    if not isinstance(block, dict):
        raise ConfigError(f"params.json {key} must be an object, got {block!r}")
    unknown = sorted(map(str, set(block) - known))
    if unknown:
        raise ConfigError(f"params.json {key} has keys this reader does not know: {', '.join(unknown)}")
    return block


def _flag(name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise ConfigError(f"{name} must be true or false, got {value!r}")
    return value


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
