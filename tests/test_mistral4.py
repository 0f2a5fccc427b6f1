"""Mistral Small 4 and Large 3's architecture against transformers 5.24's Mistral4ForCausalLM
(conftest.ref_mistral4: latent attention with a low-rank query, fine-grained experts, top-3,
a shared expert, a dense first layer, a routed scale, YaRN with mscale² in the softmax, the
query scale; strong random weights): logits, planted bugs, greedy generation, the latent cache
(its decode equal to a full recompute, its bytes per token), Mistral-native files as Large 3
ships them (FP8 block scales), conversion both ways and --verify, the presets' sizes."""

import copy
import dataclasses
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import peft
import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file

import convert_weights
from conftest import MISTRAL4, ORIGINAL_LENGTH, build_reference, forward, run_script, strengthen
from mistral_jax.checkpoints.convert import load_pytorch
from mistral_jax.checkpoints.store import save_checkpoint
from mistral_jax.inference.sampling import Sampler, generate, start
from mistral_jax.model import rope
from mistral_jax.model.cache import KVCache
from mistral_jax.model.config import MistralConfig
from mistral_jax.model.transformer import Mistral
from mistral_jax.training import lora
from test_family import assert_hf_round_trip
from test_mistral3 import dequantized, quantize
from test_parity import TOL, max_diff
from test_sampling import decoding, hf_greedy, in_layout, logits_by_chunks, prompts_of  # noqa: F401 (a fixture)

NEW = 3 * ORIGINAL_LENGTH + 7


@pytest.fixture(scope="module")
def mistral4(ref_mistral4):
    config, params = load_pytorch(ref_mistral4.dir)
    return ref_mistral4, config, params


def test_config_and_params(mistral4):
    _, config, params = mistral4
    m, moe = config.mla, config.moe
    assert (m.q_lora_rank, m.kv_lora_rank, m.qk_nope_head_dim, m.qk_rope_head_dim, m.v_head_dim) == (48, 32, 16, 8, 12)
    assert (moe.n_experts, moe.n_experts_per_tok, moe.hidden_dim, moe.n_shared_experts) == (8, 3, 24, 1)
    assert (moe.first_k_dense_replace, moe.routed_scaling_factor, moe.router_aux_loss_coef) == (1, 1.5, 0.0)
    assert set(params) == {"tok_embeddings", "dense_layers", "layers", "norm", "output"}
    assert params["dense_layers"]["feed_forward"]["w1"].shape == (1, 64, 96)  # intermediate_size
    assert params["layers"]["feed_forward"]["w1"].shape == (2, 8, 64, 24)  # moe_intermediate_size
    assert params["layers"]["feed_forward"]["shared_experts"]["w1"].shape == (2, 64, 24)
    assert params["layers"]["attention"]["wkv_b"].shape == (2, 32, 4, 16 + 12)
    assert config.num_params == sum(x.size for x in jax.tree_util.tree_leaves(params))


@pytest.mark.parametrize("attention,layout", [("xla", "stacked"), ("splash", "stacked"), ("dot_product", "stacked"),
                                              ("xla", "per_layer")])
def test_logits_equal_hf(mistral4, attention, layout):
    """Every kernel (v, narrower than the keys, padded for the two that take one head dim) and
    both layer layouts, on prefixes up to 4x the original length."""
    ref, config, params = mistral4
    config, params = in_layout(config.replace(attention=attention), params, layout)
    for length in (ref.tokens.shape[1], 2 * ORIGINAL_LENGTH + 1, ORIGINAL_LENGTH - 1):
        assert max_diff(config, params, ref, length) < TOL, length


def _unjitted_diff(config, params, ref):
    return np.abs(np.asarray(Mistral(config).apply({"params": params}, ref.tokens)) - ref.logits).max()


def test_oracle_catches_planted_bugs(mistral4, monkeypatch):
    """No mscale² in the softmax, the shared expert dropped, top-2 for top-3, no routed scale,
    rope rotating the whole head (not its rope slice), the rope rows left interleaved: each
    fails by far."""
    ref, config, params = mistral4
    assert _unjitted_diff(config, params, ref) < TOL
    assert _unjitted_diff(config.replace(yarn=dataclasses.replace(config.yarn, mscale_all_dim=None)), params,
                          ref) > 100 * TOL
    assert _unjitted_diff(config.replace(moe=dataclasses.replace(config.moe, routed_scaling_factor=1.0)), params,
                          ref) > 100 * TOL
    assert _unjitted_diff(config.replace(moe=dataclasses.replace(config.moe, n_experts_per_tok=2)), params,
                          ref) > 100 * TOL
    no_shared = jax.tree_util.tree_map(lambda x: x, params)
    no_shared["layers"]["feed_forward"]["shared_experts"] = jax.tree_util.tree_map(
        jnp.zeros_like, params["layers"]["feed_forward"]["shared_experts"])
    assert _unjitted_diff(config, no_shared, ref) > 100 * TOL
    apply_rope = rope.apply_rope
    with monkeypatch.context() as patch:  # the rope slice rotated as if it were interleaved pairs
        def interleaved(x, positions, *args):
            d = x.shape[-1]
            pairs = np.arange(d).reshape(2, d // 2).T.reshape(-1)  # rotate-half's order read as pairs
            return apply_rope(x[..., pairs], positions, *args)[..., np.argsort(pairs)]
        patch.setattr(rope, "apply_rope", interleaved)
        assert _unjitted_diff(config, params, ref) > 100 * TOL


def test_greedy_equals_hf_generate(mistral4, decoding):
    """A ragged batch through the latent cache, generating across several original lengths."""
    ref, config, params = mistral4
    prompts = prompts_of([5, ORIGINAL_LENGTH - 1, ORIGINAL_LENGTH, 2 * ORIGINAL_LENGTH + 3], config.vocab_size)
    for prompt, tokens in zip(prompts, generate(config, params, prompts, NEW, eos_id=None)):
        assert tokens == hf_greedy(ref.model, prompt, NEW)


@pytest.mark.parametrize("chunk,layout", [(1, "stacked"), (5, "stacked"), (64, "stacked"), (5, "per_layer")])
def test_latent_cache_decode_equals_full_recompute(mistral4, chunk, layout):
    """Chunk by chunk through the latent cache: the full sequence's logits, which are HF's. Chunks
    of 1 and 5 attend in the latent space (the up-projections absorbed); one of 64 expands the
    cache's keys and values, as a long prefill chunk does (layers.LatentAttention)."""
    ref, config, params = mistral4
    cached, cache = logits_by_chunks(*in_layout(config, params, layout), ref.tokens, chunk)
    np.testing.assert_allclose(cached, np.asarray(forward(config, params, ref.tokens)), atol=TOL)
    np.testing.assert_allclose(cached, ref.logits, atol=TOL)


def test_latent_cache_holds_the_latent_and_rope_key_alone(mistral4):
    """Per token and layer, kv_lora_rank + qk_rope_head_dim values: an expanded cache would
    hold heads x (no-rope + rope + value) = 4 x 36."""
    _, config, params = mistral4
    prompt_len, new = 2 * ORIGINAL_LENGTH, 16
    state = start(params, config, np.ones((2, prompt_len), np.int32), np.full(2, prompt_len, np.int32),
                  jax.random.key(0), sampler=Sampler(), eos_id=-1, chunk=ORIGINAL_LENGTH, max_tokens=new)
    cache = state.cache
    per_token = sum(k.nbytes + v.nbytes for k, v in zip(cache.k, cache.v)) / (2 * (prompt_len + new))
    assert per_token == (32 + 8) * config.n_layers * 4  # float32
    assert [k.shape for k in cache.k] == [(1, 2, prompt_len + new, 1, 32), (2, 2, prompt_len + new, 1, 32)]
    assert (4 * (24 + 12)) / (32 + 8) == 3.6  # the expanded cache's share


def write_native_large3(ref, out_dir, fp8_block: int | None = None):
    """The reference's weights as Mistral Large 3 ships them (vLLM's MistralLarge3 remapping:
    renames only, rope rows interleaved in both layouts; experts one tensor each directly under
    the layer), with, given fp8_block, every projection in FP8 with weight_scale blocks."""
    c = ref.model.config
    renames = {"input_layernorm": "attention_norm", "post_attention_layernorm": "ffn_norm",
               "self_attn.q_a_proj": "attention.wq_a", "self_attn.q_a_layernorm": "attention.q_a_norm",
               "self_attn.q_b_proj": "attention.wq_b", "self_attn.kv_a_proj_with_mqa": "attention.wkv_a_with_mqa",
               "self_attn.kv_a_layernorm": "attention.kv_a_norm", "self_attn.kv_b_proj": "attention.wkv_b",
               "self_attn.o_proj": "attention.wo", "mlp.gate_proj": "feed_forward.w1", "mlp.up_proj": "feed_forward.w3",
               "mlp.down_proj": "feed_forward.w2", "mlp.gate": "gate",
               "mlp.shared_experts.gate_proj": "shared_experts.w1",
               "mlp.shared_experts.up_proj": "shared_experts.w3", "mlp.shared_experts.down_proj": "shared_experts.w2"}
    state, hf = {}, {}  # hf: the HF weights as the native files hold them (dequantized by hand)

    def put(name, w):
        if fp8_block and w.dim() == 2 and name.startswith("layers.") and ".gate." not in name:
            # Large 3's FP8: blocks with weight_scale; the router, norms and embeddings kept
            q, scale = quantize(w, "block", block=fp8_block)
            state[name], state[name.removesuffix("weight") + "weight_scale"] = q, scale
            return dequantized(q, scale, block=fp8_block)
        state[name] = w
        return w

    outer = {"model.embed_tokens.weight": "tok_embeddings.weight", "model.norm.weight": "norm.weight",
             "lm_head.weight": "output.weight"}
    for name, w in load_file(os.path.join(ref.dir, "model.safetensors")).items():
        if name in outer:
            hf[name] = put(outer[name], w)
            continue
        layer, hf_name = name.removeprefix("model.layers.").split(".", 1)
        experts = f"layers.{layer}.experts"
        if hf_name == "mlp.experts.gate_up_proj":
            F = w.shape[1] // 2
            hf[name] = torch.stack([torch.cat([put(f"{experts}.{e}.w1.weight", w[e, :F].contiguous()),
                                               put(f"{experts}.{e}.w3.weight", w[e, F:].contiguous())])
                                    for e in range(w.shape[0])])
        elif hf_name == "mlp.experts.down_proj":
            hf[name] = torch.stack([put(f"{experts}.{e}.w2.weight", w[e].contiguous()) for e in range(w.shape[0])])
        else:
            hf[name] = put(f"layers.{layer}.{renames[hf_name.removesuffix('.weight')]}.weight", w)
    rope = c.rope_parameters
    params = {"dim": c.hidden_size, "n_layers": c.num_hidden_layers,
              "head_dim": c.qk_nope_head_dim + c.qk_rope_head_dim,
              "hidden_dim": c.intermediate_size, "n_heads": c.num_attention_heads, "n_kv_heads": c.num_attention_heads,
              "norm_eps": c.rms_norm_eps, "vocab_size": c.vocab_size, "rope_theta": rope["rope_theta"],
              "q_lora_rank": c.q_lora_rank, "kv_lora_rank": c.kv_lora_rank, "qk_nope_head_dim": c.qk_nope_head_dim,
              "qk_rope_head_dim": c.qk_rope_head_dim, "v_head_dim": c.v_head_dim,
              "moe": {"num_experts": c.n_routed_experts, "num_experts_per_tok": c.num_experts_per_tok,
                      "expert_hidden_dim": c.moe_intermediate_size, "num_shared_experts": c.n_shared_experts,
                      "first_k_dense_replace": c.first_k_dense_replace, "routed_scale": c.routed_scaling_factor,
                      "route_every_n": 1, "num_expert_groups": 1, "num_expert_groups_per_tok": 1},
              "yarn": {"factor": rope["factor"], "original_max_position_embeddings":
                       rope["original_max_position_embeddings"], "beta": rope["beta_fast"], "alpha": rope["beta_slow"],
                       "apply_scale": True},  # mscale_all_dim 1: the softmax's mscale² (vLLM's deepseek_yarn)
              "llama_4_scaling": {"beta": rope["llama_4_scaling_beta"],
                                  "original_max_position_embeddings": rope["original_max_position_embeddings"]}}
    if fp8_block:
        params["quantization_config"] = {"quant_method": "compressed-tensors", "config_groups": {
            "group_0": {"weights": {"num_bits": 8, "type": "float", "block_structure": [fp8_block, fp8_block]}}}}
    os.makedirs(out_dir, exist_ok=True)
    (out_dir / "params.json").write_text(json.dumps(params))
    save_file(state, out_dir / "consolidated.safetensors")
    return out_dir, hf


def test_native_large3_files(mistral4, tmp_path):
    """params.json and consolidated.safetensors as Large 3's: the same config and weights as the
    HF files; in FP8 with 16 x 16 block scales, the same logits as the dequantized HF weights."""
    ref, config, params = mistral4
    native_config, native = load_pytorch(str(write_native_large3(ref, tmp_path / "bf16")[0]))
    assert native_config == config.replace(max_seq_len=native_config.max_seq_len)
    for a, b in zip(jax.tree_util.tree_leaves(native), jax.tree_util.tree_leaves(params)):
        np.testing.assert_array_equal(a, b)
    fp8_dir, dequantized_hf = write_native_large3(ref, tmp_path / "fp8", fp8_block=16)
    fp8_config, fp8_params = load_pytorch(str(fp8_dir))
    assert fp8_config == native_config
    model = copy.deepcopy(ref.model)
    model.load_state_dict(dequantized_hf)
    with torch.no_grad():
        expected = model(torch.from_numpy(np.asarray(ref.tokens)).long()).logits.numpy()
    logits = np.asarray(forward(fp8_config, fp8_params, ref.tokens))
    np.testing.assert_allclose(logits, expected, atol=TOL)
    assert np.abs(logits - ref.logits).max() > 100 * TOL  # FP8's rounding is in them


def test_native_yarn_apply_scale(mistral4):
    """params.json's yarn apply_scale for latent attention, as vLLM reads it: true (or absent)
    is the softmax's mscale² with cos and sin as they are (transformers' mscale_all_dim 1, as in
    Small 4's config.json), false no magnitude correction at all; each written back as read."""
    _, config, _ = mistral4
    native = config.to_params_dict()
    assert native["yarn"]["apply_scale"] is True
    for apply_scale, softmax in ((True, 1.0), (False, None)):
        yarn = MistralConfig.from_params_dict({**native, "yarn": {**native["yarn"], "apply_scale": apply_scale}}).yarn
        assert (yarn.cos_sin_scale, yarn.mscale_all_dim) == (1.0, softmax)
        assert MistralConfig.from_params_dict(native).replace(yarn=yarn).to_params_dict()["yarn"] == {
            **native["yarn"], "apply_scale": apply_scale}


def test_rope_interleave_false(tmp_path, capsys):
    """An HF config with rope_interleave false (rotate-half rope rows, as transformers then
    computes): read with the reference's logits, and --verify agrees."""
    ref = build_reference(tmp_path / "src", seed=10, window=None, kind="Mistral4", seq_len=2 * ORIGINAL_LENGTH,
                          **{**MISTRAL4, "rope_interleave": False})
    config, params = load_pytorch(ref.dir)
    np.testing.assert_allclose(np.asarray(forward(config, params, ref.tokens)), ref.logits, atol=TOL)
    status, out, err = run_script(capsys, convert_weights, ref.dir, tmp_path / "jax", "--dtype", "float32", "--verify")
    assert status == 0 and "top-1 agreement 100.00%" in out, err


@pytest.mark.parametrize("change,reason", [
    (dict(yarn=None), "latent attention without YaRN"), (dict(norm_eps=1e-5), "latent attention with norm_eps 1e-05"),
    ("no shared expert", "latent attention with experts and no shared expert")])
def test_configs_transformers_computes_otherwise_are_refused(mistral4, tmp_path, capsys, change, reason):
    """--to-hf refuses in one line a latent-attention config that Mistral4ForCausalLM would
    compute otherwise (its default rope rotates the whole head; its latent norms take eps 1e-6;
    it always has a shared expert), writing nothing."""
    _, config, params = mistral4
    if change == "no shared expert":
        change = dict(moe=dataclasses.replace(config.moe, n_shared_experts=0))
        params = {**params, "layers": {**params["layers"], "feed_forward": {
            k: v for k, v in params["layers"]["feed_forward"].items() if k != "shared_experts"}}}
    save_checkpoint(tmp_path / "jax", config.replace(**change), params)
    status, _, err = run_script(capsys, convert_weights, tmp_path / "jax", tmp_path / "hf", "--to-hf")
    errors = [line for line in err.replace("\r", "\n").splitlines() if line.startswith("error:")]
    assert status != 0 and len(errors) == 1 and reason in errors[0] and "Traceback" not in err, err
    assert not (tmp_path / "hf").exists()


def test_hf_jax_hf_round_trip_and_verify(ref_mistral4, tmp_path, capsys):
    """Converted with --verify against Mistral4ForCausalLM, exported back bit for bit (the
    experts fused, the rope rows interleaved again), which transformers loads with the
    reference's logits."""
    exported = assert_hf_round_trip(ref_mistral4, tmp_path, capsys, transformers.Mistral4ForCausalLM)
    assert exported["model_type"] == "mistral4" and exported["rope_interleave"] is True
    assert exported["first_k_dense_replace"] == 1 and exported["n_shared_experts"] == 1


def test_native_verify(mistral4, tmp_path, capsys):
    """--verify of Large-3-style native files (FP8 blocks): transformers' Mistral4ForCausalLM on
    the same dequantized weights agrees."""
    ref, _, _ = mistral4
    src, _ = write_native_large3(ref, tmp_path / "src", fp8_block=16)
    status, out, err = run_script(capsys, convert_weights, src, tmp_path / "jax", "--dtype", "float32", "--verify")
    assert status == 0 and "top-1 agreement 100.00%" in out, err


def test_mistral3_with_a_mistral4_text_model(tmp_path, capsys):
    """Mistral Small 4 as the hub has it: Mistral3ForConditionalGeneration around a mistral4
    text model (a tiny Pixtral tower beside it). Its text model converts and verifies to the
    wrapper's own logits, and --to-hf writes the wrapper back with them."""
    torch.manual_seed(5)
    vision = transformers.PixtralVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                              num_attention_heads=2, head_dim=16, image_size=32, patch_size=8)
    config = transformers.Mistral3Config(vision_config=vision, text_config=transformers.Mistral4Config(**MISTRAL4),
                                         tie_word_embeddings=False, attn_implementation="eager")
    model = transformers.Mistral3ForConditionalGeneration(config).eval()
    strengthen(model)
    model.save_pretrained(tmp_path / "hf")
    tokens = torch.randint(0, 256, (2, 3 * ORIGINAL_LENGTH))
    with torch.no_grad():
        logits = model(input_ids=tokens).logits.numpy()
    status, out, err = run_script(capsys, convert_weights, tmp_path / "hf", tmp_path / "jax", "--dtype", "float32",
                                  "--verify")
    assert status == 0 and "top-1 agreement 100.00%" in out, err
    converted, params = load_pytorch(str(tmp_path / "hf"))
    assert converted.mla is not None and converted.moe.n_shared_experts == 1
    np.testing.assert_allclose(np.asarray(forward(converted, params, tokens.numpy())), logits, atol=TOL)
    assert run_script(capsys, convert_weights, tmp_path / "jax", tmp_path / "out", "--to-hf")[0] == 0
    exported = transformers.Mistral3ForConditionalGeneration.from_pretrained(tmp_path / "out",
                                                                            attn_implementation="eager")
    assert exported.config.text_config.model_type == "mistral4"
    with torch.no_grad():
        np.testing.assert_allclose(exported(tokens).logits.numpy(), logits, atol=TOL)


def test_lora_equals_hf_peft(mistral4, tmp_path):
    """LoRA on latent attention's every projection (the default targets), in both stacks: HF
    PEFT loading the saved adapter onto Mistral4ForCausalLM computes our logits (the lora_B
    rows of the query's and the key's rope features interleaved as HF's weights are), as do the
    merged weights and the latent cache (prefill chunks, then decode steps, wkv_b's adapter
    absorbed); loading the adapter back gives the same adapters."""
    ref, config, params = mistral4
    spec = lora.LoRA(4, 8.0)
    assert spec.targets_of(config) == ("wo", "wq_a", "wq_b", "wkv_a_with_mqa", "wkv_b")
    keys = iter(jax.random.split(jax.random.key(1), 100))
    adapters = jax.tree_util.tree_map(lambda x: x + 0.1 * jax.random.normal(next(keys), x.shape),
                                      lora.init_adapters(config, spec, jax.random.key(0)))
    assert set(adapters) == {"dense_layers", "layers"}
    lora.save_peft(str(tmp_path / "adapter"), config, adapters, spec)
    assert json.loads((tmp_path / "adapter" / lora.CONFIG_FILE).read_text())["target_modules"] == [
        "kv_a_proj_with_mqa", "kv_b_proj", "o_proj", "q_a_proj", "q_b_proj"]
    with torch.no_grad():
        with_peft = peft.PeftModel.from_pretrained(copy.deepcopy(ref.model), tmp_path / "adapter").eval()
        expected = with_peft(torch.from_numpy(np.asarray(ref.tokens)).long()).logits.numpy()
    assert np.abs(expected - ref.logits).max() > 1.0  # the adapters matter

    variables = lora.variables(params, adapters, spec)
    np.testing.assert_allclose(np.asarray(Mistral(config).apply(variables, ref.tokens)), expected, atol=TOL)
    np.testing.assert_allclose(np.asarray(forward(config, lora.merge(params, adapters, spec), ref.tokens)),
                               expected, atol=TOL)

    @jax.jit
    def chunk(cache, tokens, start):
        positions = jnp.broadcast_to(start + jnp.arange(tokens.shape[1], dtype=jnp.int32), tokens.shape)
        return Mistral(config).apply(variables, tokens, positions, cache)

    B, T = ref.tokens.shape
    prefill = 2 * ORIGINAL_LENGTH
    cache, pieces = KVCache.init(config, B, T), []
    for start in [0, prefill, *range(2 * prefill, T)]:  # two prefill chunks, then decode steps
        logits, cache = chunk(cache, ref.tokens[:, start:start + (prefill if start < 2 * prefill else 1)], start)
        pieces.append(logits)
    np.testing.assert_allclose(np.concatenate(pieces, axis=1), expected, atol=TOL)

    loaded_spec, loaded = lora.load_peft(str(tmp_path / "adapter"), config)
    assert loaded_spec == lora.LoRA(4, 8.0, spec.targets_of(config))
    jax.tree_util.tree_map(np.testing.assert_array_equal, loaded, jax.tree_util.tree_map(np.asarray, adapters))


# ---- presets -------------------------------------------------------------------------------------

# Total and active parameters (billions, as published): Small 4 119B / 6.5B, Large 3's language
# model 673B / 39B (its card: 675B with the 2.5B vision encoder, 41B active).
PUBLISHED = {"mistral-small-4": (119, 6.6), "mistral-large-3": (673, 40)}


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_presets_equal_transformers_models(name):
    """Each preset's parameter count (total, and active per token) equals that of transformers'
    Mistral4ForCausalLM of its config.json, built on the meta device; both files give it back."""
    config = MistralConfig.preset(name)
    hf = config.to_hf_dict()
    with torch.device("meta"):
        model = transformers.Mistral4ForCausalLM(transformers.Mistral4Config(**hf))
    counts = {name: p.numel() for name, p in model.named_parameters()}
    assert config.num_params == sum(counts.values())
    experts = sum(n for name, n in counts.items() if ".experts." in name) // config.moe.n_experts
    active = sum(counts.values()) - experts * (config.moe.n_experts - config.moe.n_experts_per_tok)
    assert config.active_params == active
    total, per_token = PUBLISHED[name]
    assert round(config.num_params / 1e9) == total and round(config.active_params / 1e9, 1 if per_token < 10 else 0) \
        == per_token
    assert MistralConfig.from_hf_dict(hf) == config
    assert MistralConfig.from_params_dict(config.to_params_dict()) == config
