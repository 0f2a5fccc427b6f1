"""Logits of converted checkpoints vs HF transformers' PyTorch MistralForCausalLM."""

import json
import os
import re
import shutil

import jax
import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import WINDOW, forward
from mistral_jax.checkpoints.convert import load_pytorch
from mistral_jax.model.transformer import unstack_layers
from test_sampling import assert_views_of_stacked

TOL = 1e-4  # float32 max abs logit difference


def max_diff(config, params, ref, length=None):
    length = length or ref.tokens.shape[1]
    logits = np.asarray(forward(config, params, ref.tokens[:, :length]))
    return np.abs(logits - ref.logits[:, :length]).max()


def test_hf_safetensors(reference):
    config, params = load_pytorch(reference.dir)
    assert config.sliding_window == reference.window
    # HF is causal, so the logits of a prefix are a prefix of the logits.
    T = reference.tokens.shape[1]
    for length in (T, 2 * WINDOW + 1, WINDOW + 1, WINDOW - 1):
        assert max_diff(config, params, reference, length) < TOL, length


@pytest.mark.parametrize("attention,block", [("xla", WINDOW // 2), ("xla", 3 * WINDOW), ("splash", None),
                                             ("dot_product", None)])
def test_every_attention_kernel(ref_windowed, attention, block):
    """The whole model with each kernel: blocked with blocks shorter and longer than the
    window, splash (Pallas interpret mode), jax.nn.dot_product_attention."""
    config, params = load_pytorch(ref_windowed.dir)
    config = config.replace(attention=attention, attention_block=block or config.attention_block)
    assert max_diff(config, params, ref_windowed) < TOL


def test_per_layer_layout(reference):
    """Mistral(config.replace(scan_layers=False)) over unstack_layers' params: a block per
    layer, over views of the stacked weights."""
    config, params = load_pytorch(reference.dir)
    per_layer_config, per_layer = unstack_layers(config, params)
    assert not per_layer_config.scan_layers
    assert "layers" not in per_layer and len([k for k in per_layer if k.startswith("layers_")]) == config.n_layers
    assert_views_of_stacked(params, per_layer)
    assert max_diff(per_layer_config, per_layer, reference) < TOL


@pytest.mark.parametrize("fmt", ["sharded_safetensors", "bin"])
def test_hf_other_formats(ref_windowed, tmp_path, fmt):
    if fmt == "bin":
        # transformers 5 ignores safe_serialization=False; write the pickle ourselves.
        shutil.copy(os.path.join(ref_windowed.dir, "config.json"), tmp_path)
        torch.save(ref_windowed.model.state_dict(), tmp_path / "pytorch_model.bin")
    else:
        ref_windowed.model.save_pretrained(tmp_path, max_shard_size="100KB")
        assert (tmp_path / "model.safetensors.index.json").exists()
    config, params = load_pytorch(str(tmp_path))
    assert max_diff(config, params, ref_windowed) < TOL


def write_native(ref, out_dir, fmt, dtype=torch.float32, permute=True):
    """The reference's weights in Mistral-native layout, as mistral-inference ships them.

    wq/wk rows go back from HF's rotate-half order to interleaved pairs: the inverse of
    `permute` in transformers' convert_mistral_weights_to_hf.py, written out here
    independently of the library.
    """
    c = ref.model.config

    def unpermute(w, n_heads):
        rows, cols = w.shape
        return w.view(n_heads, 2, rows // n_heads // 2, cols).transpose(1, 2).reshape(rows, cols)

    renames = {"self_attn.q_proj": "attention.wq", "self_attn.k_proj": "attention.wk",
               "self_attn.v_proj": "attention.wv", "self_attn.o_proj": "attention.wo",
               "mlp.gate_proj": "feed_forward.w1", "mlp.down_proj": "feed_forward.w2",
               "mlp.up_proj": "feed_forward.w3", "input_layernorm": "attention_norm",
               "post_attention_layernorm": "ffn_norm"}
    state = {}
    # The hub's tensor names (MixtralForCausalLM's in memory differ), as save_pretrained wrote them.
    for name, w in load_file(os.path.join(ref.dir, "model.safetensors")).items():
        if name == "model.embed_tokens.weight":
            name = "tok_embeddings.weight"
        elif name == "model.norm.weight":
            name = "norm.weight"
        elif name == "lm_head.weight":
            name = "output.weight"
        else:
            layer, hf_name = name.removeprefix("model.layers.").removesuffix(".weight").split(".", 1)
            native = re.sub(r"block_sparse_moe\.(experts\.\d+\.w\d|gate)", r"feed_forward.\1", hf_name)
            name = f"layers.{layer}.{renames.get(hf_name, native)}.weight"
            if hf_name == "self_attn.q_proj" and permute:
                w = unpermute(w, c.num_attention_heads)
            elif hf_name == "self_attn.k_proj" and permute:
                w = unpermute(w, c.num_key_value_heads)
        state[name] = w.to(dtype).contiguous()

    # As the official files: v0.1's params.json has no rope_theta, v0.3's no sliding_window.
    params = {"dim": c.hidden_size, "n_layers": c.num_hidden_layers, "head_dim": c.head_dim,
              "hidden_dim": c.intermediate_size, "n_heads": c.num_attention_heads,
              "n_kv_heads": c.num_key_value_heads, "norm_eps": c.rms_norm_eps, "vocab_size": c.vocab_size}
    if getattr(c, "model_type", "") == "mixtral":
        params["moe"] = {"num_experts": c.num_local_experts, "num_experts_per_tok": c.num_experts_per_tok}
    if getattr(c, "model_type", "") == "ministral":  # per-layer windows as a list, null = full attention
        params["sliding_window"] = [None if t == "full_attention" else c.sliding_window for t in c.layer_types]
        params["rope_theta"] = c.rope_parameters["rope_theta"]
    elif c.sliding_window is not None and c.rope_parameters["rope_theta"] == 1e4:
        params["sliding_window"] = c.sliding_window  # and no rope_theta: what the loader must infer
    else:
        if c.sliding_window is not None:
            params["sliding_window"] = c.sliding_window
        params["rope_theta"] = c.rope_parameters["rope_theta"]
    if getattr(c, "model_type", "") == "ministral3":  # as vLLM's Mistral config remapper reads them
        rope = c.rope_parameters
        params["yarn"] = {"factor": rope["factor"], "original_max_position_embeddings":
                          rope["original_max_position_embeddings"], "beta": rope["beta_fast"],
                          "alpha": rope["beta_slow"], "apply_scale": not (rope["mscale"] and rope["mscale_all_dim"])}
        params["llama_4_scaling"] = {"beta": rope["llama_4_scaling_beta"],
                                     "original_max_position_embeddings": rope["original_max_position_embeddings"]}
    if c.tie_word_embeddings:
        params["tied_embeddings"] = True
    (out_dir / "params.json").write_text(json.dumps(params))
    if fmt == "safetensors":
        save_file(state, out_dir / "consolidated.safetensors")
    else:
        torch.save(state, out_dir / "consolidated.00.pth")
    return out_dir


@pytest.mark.parametrize("fmt", ["safetensors", "pth"])
def test_native_layout(reference, tmp_path, fmt):
    config, params = load_pytorch(str(write_native(reference, tmp_path, fmt)))
    assert config.sliding_window == reference.window
    assert max_diff(config, params, reference) < TOL


def test_native_and_hf_give_identical_params(ref_windowed, tmp_path):
    _, hf = load_pytorch(ref_windowed.dir)
    _, native = load_pytorch(str(write_native(ref_windowed, tmp_path, "safetensors")))
    for (path, a), (_, b) in zip(_leaves(hf), _leaves(native)):
        np.testing.assert_array_equal(a, b, err_msg=path)


def _leaves(tree):
    return sorted(((jax.tree_util.keystr(p), np.asarray(x)) for p, x in
                   jax.tree_util.tree_flatten_with_path(tree)[0]), key=lambda t: t[0])


def test_oracle_catches_planted_bugs(ref_windowed, tmp_path):
    """The reference weights are strong enough that the classic mistakes fail by far."""
    config, params = load_pytorch(ref_windowed.dir)
    # The one_file_ref off-by-one: W+1 keys.
    assert max_diff(config.replace(sliding_window=WINDOW + 1), params, ref_windowed) > 100 * TOL
    # Native weights whose wq/wk rows were never put in interleaved order.
    config, params = load_pytorch(str(write_native(ref_windowed, tmp_path, "safetensors", permute=False)))
    assert max_diff(config, params, ref_windowed) > 100 * TOL
