"""MistralConfig against the official config files and transformers' own MistralConfig."""

import json

import pytest
import transformers

from mistral_jax.model.config import ConfigError, MistralConfig, YaRN

# Verbatim from the official releases (mistral-inference params.json, HF config.json).
PARAMS_V01 = {"dim": 4096, "n_layers": 32, "head_dim": 128, "hidden_dim": 14336, "n_heads": 32,
              "n_kv_heads": 8, "norm_eps": 1e-05, "sliding_window": 4096, "vocab_size": 32000}
PARAMS_V03 = {"dim": 4096, "n_layers": 32, "head_dim": 128, "hidden_dim": 14336, "n_heads": 32,
              "n_kv_heads": 8, "norm_eps": 1e-05, "vocab_size": 32768, "rope_theta": 1000000.0}
HF_V01 = {"architectures": ["MistralForCausalLM"], "bos_token_id": 1, "eos_token_id": 2,
          "hidden_act": "silu", "hidden_size": 4096, "initializer_range": 0.02,
          "intermediate_size": 14336, "max_position_embeddings": 32768, "model_type": "mistral",
          "num_attention_heads": 32, "num_hidden_layers": 32, "num_key_value_heads": 8,
          "rms_norm_eps": 1e-05, "rope_theta": 10000.0, "sliding_window": 4096,
          "tie_word_embeddings": False, "torch_dtype": "bfloat16",
          "transformers_version": "4.34.0.dev0", "use_cache": True, "vocab_size": 32000}


def test_official_files_give_the_presets(caplog):
    assert MistralConfig.from_hf_dict(HF_V01) == MistralConfig.preset("mistral-7b-v0.1")
    assert MistralConfig.from_params_dict(PARAMS_V03) == MistralConfig.preset("mistral-7b-v0.3")
    with caplog.at_level("WARNING", logger="mistral_jax"):
        assert MistralConfig.from_params_dict(PARAMS_V01) == MistralConfig.preset("mistral-7b-v0.1")
    assert "no rope_theta; inferred 10000" in caplog.text  # said, not silent
    assert MistralConfig.preset("mistral-7b-v0.1").num_params == 7_241_732_096  # the published count


def test_transformers_reads_our_config_json(tmp_path):
    """Our config.json, read by transformers (either version's rope_theta location), and back."""
    config = MistralConfig.preset("mistral-7b-v0.1", head_dim=96, max_seq_len=8192)
    config.save_hf(tmp_path)
    hf = transformers.MistralConfig.from_pretrained(tmp_path)
    assert (hf.hidden_size, hf.num_hidden_layers, hf.head_dim, hf.intermediate_size) == (4096, 32, 96, 14336)
    assert (hf.num_attention_heads, hf.num_key_value_heads, hf.sliding_window) == (32, 8, 4096)
    assert hf.rope_parameters["rope_theta"] == 1e4 and hf.max_position_embeddings == 8192
    hf.save_pretrained(tmp_path)  # transformers 5 rewrites rope_theta under rope_parameters
    assert "rope_parameters" in json.loads((tmp_path / "config.json").read_text())
    assert MistralConfig.from_dir(tmp_path) == config


@pytest.mark.parametrize("name", ["mistral-7b-v0.1", "mistral-7b-v0.2", "mistral-7b-v0.3", "mistral-15m"])
def test_round_trips(tmp_path, name):
    config = MistralConfig.preset(name)
    assert MistralConfig.from_hf_dict(config.to_hf_dict()) == config
    native = MistralConfig.from_params_dict(config.to_params_dict())
    assert native == config.replace(max_seq_len=native.max_seq_len)  # params.json has no max_seq_len
    config.save_params(tmp_path)
    assert MistralConfig.from_dir(tmp_path).replace(max_seq_len=config.max_seq_len) == config
    config.save_hf(tmp_path)  # config.json wins over params.json
    assert MistralConfig.from_dir(tmp_path) == config
    assert hash(config) == hash(MistralConfig.from_hf_dict(config.to_hf_dict()))


@pytest.mark.parametrize("value,expected", [(None, None), (4096, 4096), ("4096", 4096), ("null", None),
                                            ([4096] * 32, 4096), ([None, None], None), (4096.0, 4096)])
def test_sliding_window_forms(value, expected):
    assert MistralConfig.from_params_dict({**PARAMS_V03, "sliding_window": value}).sliding_window == expected


def test_defaults_of_sparse_files():
    sparse = {k: v for k, v in PARAMS_V03.items() if k not in ("head_dim", "n_kv_heads")}
    config = MistralConfig.from_params_dict(sparse)
    assert (config.head_dim, config.n_kv_heads) == (128, 32)
    assert MistralConfig.from_params_dict({**PARAMS_V03, "rope_theta": None}).rope_theta == 1e6
    hf = {k: v for k, v in HF_V01.items() if k != "rope_theta"}
    assert MistralConfig.from_hf_dict({**hf, "rope_parameters": {"rope_theta": 5e5, "rope_type": "default"}}).rope_theta == 5e5
    assert MistralConfig.from_hf_dict({**HF_V01, "head_dim": None}).head_dim == 128


@pytest.mark.parametrize("changes,message", [
    (dict(n_kv_heads=5), "multiple of n_kv_heads"),
    (dict(sliding_window=0), "sliding_window"),
    (dict(head_dim=7), "head_dim must be even"),
    (dict(dim=-1), "dim must be a positive integer"),
    (dict(norm_eps=0.0), "norm_eps"),
    (dict(dtype="float64"), "dtype must be one of"),
    (dict(remat="sometimes"), "remat must be one of"),
    (dict(rope_theta=1.0, yarn=YaRN(4.0, 64)), "rope_theta must be above 1 with YaRN"),
])
def test_bad_values(changes, message):
    with pytest.raises(ConfigError, match=message):
        MistralConfig.preset("mistral-7b-v0.1", **changes)


@pytest.mark.parametrize("parse,d,message", [
    ("params", {**PARAMS_V01, "sliding_window": [4096] * 5}, "5 values does not repeat over 32 layers"),
    ("params", {**PARAMS_V01, "sliding_window": [4096, 0]}, "positive integer"),
    ("params", {**PARAMS_V03, "yarn": {"factor": 4.0}}, "lacks required field 'original_max_position_embeddings'"),
    ("params", {**PARAMS_V03, "yarn": {"factor": 4.0, "original_max_position_embeddings": 64, "mscale": 2}},
     "yarn has keys this reader does not know: mscale"),
    ("params", {**PARAMS_V03, "yarn": {"factor": 4.0, "original_max_position_embeddings": 64, "apply_scale": 1}},
     "apply_scale must be true or false"),
    ("params", {**PARAMS_V03, "llama_4_scaling": {"beta": 0.1}},
     "lacks required field 'original_max_position_embeddings'"),
    ("params", {**PARAMS_V03, "rope_scaling": {"type": "linear"}}, "RoPE scaling .'rope_scaling'"),
    ("params", {**PARAMS_V03, "rope_theta": "fast"}, "rope_theta must be a number"),
    ("params", {**PARAMS_V01, "sliding_window": "wide"}, "not an integer"),
    ("params", {**PARAMS_V01, "moe": {"num_experts": 8}}, "lacks required field 'num_experts_per_tok'"),
    ("params", {**PARAMS_V01, "moe": {"num_experts": 2, "num_experts_per_tok": 3}},
     "n_experts_per_tok must be between 1 and n_experts"),
    ("params", {**PARAMS_V01, "moe": 8}, "moe must be an object"),
    ("hf", {**HF_V01, "model_type": "mixtral", "num_experts_per_tok": 2}, "lacks required field 'num_local_experts'"),
    ("params", {k: v for k, v in PARAMS_V01.items() if k != "hidden_dim"}, "lacks required field 'hidden_dim'"),
    ("hf", {**HF_V01, "model_type": "gemma"}, "model_type 'gemma'"),
    ("hf", {**HF_V01, "model_type": "llama", "attention_bias": True}, "attention_bias: Mistral's projections"),
    ("hf", {**HF_V01, "tie_word_embeddings": "yes"}, "tie_word_embeddings must be true or false"),
    ("hf", {**HF_V01, "rope_scaling": {"type": "linear", "factor": 2.0}}, "RoPE scaling .linear"),
    ("hf", {**HF_V01, "rope_parameters": {"rope_type": "llama3", "rope_theta": 5e5, "factor": 8.0}},
     "RoPE scaling .llama3"),
    ("hf", {**HF_V01, "rope_parameters": {"rope_theta": 1e6, "factor": 16.0}}, "RoPE scaling .default"),
    ("hf", {**HF_V01, "rope_parameters": {"rope_type": "yarn", "rope_theta": 1e6, "factor": 16.0}},
     "lacks required field 'original_max_position_embeddings'"),
    ("hf", {**HF_V01, "rope_parameters": {"rope_type": "yarn", "rope_theta": 1e6, "factor": -2.0,
                                          "original_max_position_embeddings": 64}}, "factor must be a finite positive"),
    ("hf", {**HF_V01, "rope_parameters": {"rope_theta": 1e6, "llama_4_scaling_beta": 0.1}},
     "llama_4_scaling_beta without original_max_position_embeddings"),
    ("hf", {**HF_V01, "model_type": "ministral", "layer_types": ["full_attention"] * 31}, "list of 32 layer types"),
    ("hf", {**HF_V01, "model_type": "ministral", "layer_types": ["local"] * 32}, "unknown kinds .'local'"),
    ("hf", {"model_type": "mistral3"}, "no text_config"),
    ("hf", {k: v for k, v in HF_V01.items() if k != "rope_theta"}, "no rope_theta"),
])
def test_bad_files(parse, d, message):
    read = MistralConfig.from_params_dict if parse == "params" else MistralConfig.from_hf_dict
    with pytest.raises(ConfigError, match=message):
        read(d)


def test_bad_directories(tmp_path):
    with pytest.raises(ConfigError, match="neither config.json nor params.json"):
        MistralConfig.from_dir(tmp_path)
    (tmp_path / "params.json").write_text("{not json")
    with pytest.raises(ConfigError, match="cannot read"):
        MistralConfig.from_dir(tmp_path)
    with pytest.raises(ConfigError, match="unknown preset"):
        MistralConfig.preset("mistral-70b")


def test_per_layer_windows_in_both_formats(tmp_path):
    """Ministral's kinds of layer: HF layer_types (which transformers reads back), native
    lists (per layer, or one group repeated as mistral-inference reads it)."""
    config = MistralConfig.preset("ministral-8b")
    assert config.windows == (None, 32768, 32768, 32768) * 9 and config.window_kinds == (None, 32768)
    config.save_hf(tmp_path)
    hf = transformers.MinistralConfig.from_pretrained(tmp_path)
    assert hf.layer_types == ["full_attention", "sliding_attention", "sliding_attention", "sliding_attention"] * 9
    assert hf.sliding_window == 32768 and hf.rope_parameters["rope_theta"] == 1e8
    assert MistralConfig.from_dir(tmp_path) == config
    native = config.to_params_dict()
    assert native["sliding_window"] == [None, 32768, 32768, 32768] * 9
    group = {**native, "sliding_window": [None, 32768, 32768, 32768]}
    assert MistralConfig.from_params_dict(group) == MistralConfig.from_params_dict(native) == config
    # Two window sizes: our files keep the list; transformers has no such model.
    two = MistralConfig.from_params_dict({**PARAMS_V03, "sliding_window": [131072, 32768]})
    assert two.windows == (131072, 32768) * 16 and not two.hf_expressible and config.hf_expressible
    assert MistralConfig.from_hf_dict(two.to_hf_dict()) == two


def test_yarn_with_a_null_factor_takes_transformers_default_length():
    """transformers' YaRN: a null factor is max_position_embeddings over the original length,
    and Ministral3Config's max_position_embeddings is 262144 when config.json omits it."""
    d = {**HF_V01, "model_type": "ministral3", "rope_parameters": {
        "rope_type": "yarn", "rope_theta": 1e6, "factor": None, "original_max_position_embeddings": 16384}}
    del d["max_position_embeddings"], d["rope_theta"]
    config = MistralConfig.from_hf_dict(d)
    assert config.max_seq_len == transformers.Ministral3Config().max_position_embeddings == 262144
    assert config.yarn.factor == 16.0
    del d["rope_parameters"]["factor"]  # absent, as transformers' own check refuses it
    with pytest.raises(ConfigError, match="lacks required field 'factor'"):
        MistralConfig.from_hf_dict(d)
