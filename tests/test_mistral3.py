"""The Mistral 3 generation against transformers 5.24: Ministral3ForCausalLM (YaRN with and
without its magnitude, Llama 4's query scale, a sliding window, tied embeddings), its text model
inside Mistral3ForConditionalGeneration, LlamaForCausalLM; native params.json with "yarn" and
"llama_4_scaling"; FP8 checkpoints in every scale layout; the presets' shapes.

Every sequence runs several times past the original length (conftest.ORIGINAL_LENGTH), where
the query scale and YaRN's interpolation both matter."""

import copy
import dataclasses
import json
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file

import convert_weights
from conftest import ORIGINAL_LENGTH, WINDOW, assert_one_line_error, build_reference, forward, run_script, strengthen
from mistral_jax.checkpoints import fp8
from mistral_jax.checkpoints.convert import load_pytorch
from mistral_jax.inference.sampling import generate
from mistral_jax.model import rope
from mistral_jax.model.config import Llama4Scaling, MistralConfig, YaRN
from mistral_jax.model.transformer import Mistral
from test_family import assert_hf_round_trip
from test_parity import TOL, max_diff, write_native
from test_sampling import decoding, hf_greedy, in_layout, logits_by_chunks, prompts_of  # noqa: F401 (a fixture)

NEW = 3 * WINDOW + 7  # past several original lengths, and wrapping the window's cache


@pytest.fixture(scope="module")
def ministral3(ref_ministral3):
    config, params = load_pytorch(ref_ministral3.dir)
    return ref_ministral3, config, params


@pytest.fixture(scope="module")
def tied(ref_ministral3_tied):
    config, params = load_pytorch(ref_ministral3_tied.dir)
    return ref_ministral3_tied, config, params


def test_config_reads_the_rope_scalings(ministral3, tied):
    _, config, params = ministral3
    assert config.yarn == YaRN(16.0, ORIGINAL_LENGTH, 32.0, 1.0, mscale=1.0, mscale_all_dim=0.0)
    assert config.yarn.cos_sin_scale == pytest.approx(1 + 0.1 * math.log(16))  # YaRN's magnitude, on
    assert config.llama_4_scaling == Llama4Scaling(0.1, ORIGINAL_LENGTH) and config.sliding_window == WINDOW
    assert not config.tied_embeddings and "output" in params
    _, config, params = tied
    assert config.tied_embeddings and "output" not in params and config.yarn.cos_sin_scale == 1.0
    assert config.num_params == sum(x.size for x in jax.tree_util.tree_leaves(params))


@pytest.mark.parametrize("attention,layout", [("xla", "stacked"), ("splash", "stacked"), ("dot_product", "stacked"),
                                              ("xla", "per_layer")])
def test_logits_equal_hf(ministral3, tied, attention, layout):
    """Both models, every kernel and both layer layouts, on prefixes up to 4x the original length."""
    for ref, config, params in (ministral3, tied):
        config, params = in_layout(config.replace(attention=attention), params, layout)
        for length in (ref.tokens.shape[1], 2 * ORIGINAL_LENGTH + 1, ORIGINAL_LENGTH - 1):
            assert max_diff(config, params, ref, length) < TOL, length


def _unjitted_diff(config, params, ref):
    """max |logit difference| from the reference, traced afresh (a patched module is seen)."""
    return np.abs(np.asarray(Mistral(config).apply({"params": params}, ref.tokens)) - ref.logits).max()


def test_oracle_catches_planted_bugs(ministral3, monkeypatch):
    """No ramp (every pair interpolated), no magnitude, the query scale on the keys too, floor()
    dropped from it, no query scale at all: each fails by far."""
    ref, config, params = ministral3
    assert _unjitted_diff(config, params, ref) < TOL
    assert _unjitted_diff(config.replace(yarn=dataclasses.replace(config.yarn, attention_factor=1.0)), params, ref) \
        > 100 * TOL
    assert _unjitted_diff(config.replace(llama_4_scaling=None), params, ref) > 100 * TOL
    frequencies, query_scale, apply_rope = rope.frequencies, rope.query_scale, rope.apply_rope
    with monkeypatch.context() as patch:  # every pair interpolated: no ramp
        patch.setattr(rope, "frequencies", lambda d, theta, yarn: (frequencies(d, theta)[0] / yarn.factor,
                                                                   yarn.cos_sin_scale))
        assert _unjitted_diff(config, params, ref) > 100 * TOL
    with monkeypatch.context() as patch:  # floor dropped
        patch.setattr(rope, "query_scale", lambda positions, s: 1 + s.beta * jnp.log1p(
            jnp.maximum(positions, 0) / s.original_max_position_embeddings))
        assert _unjitted_diff(config, params, ref) > 100 * TOL
    with monkeypatch.context() as patch:  # queries and keys scaled, once each
        patch.setattr(rope, "query_scale", lambda positions, s: jnp.ones(positions.shape))
        patch.setattr(rope, "apply_rope", lambda x, positions, *args: apply_rope(x, positions, *args) * query_scale(
            positions, config.llama_4_scaling)[:, :, None, None].astype(x.dtype))
        assert _unjitted_diff(config, params, ref) > 100 * TOL


def test_greedy_equals_hf_generate(ministral3, tied, decoding):
    """A ragged batch: prompts below, at and past the original length and the window, each
    generating across several original lengths (the window's cache wrapping)."""
    for ref, config, params in (ministral3, tied):
        prompts = prompts_of([5, ORIGINAL_LENGTH - 1, ORIGINAL_LENGTH, 2 * WINDOW + 3], config.vocab_size)
        ours = generate(config, params, prompts, NEW, eos_id=None)
        for prompt, tokens in zip(prompts, ours):
            assert tokens == hf_greedy(ref.model, prompt, NEW)


@pytest.mark.parametrize("chunk,layout", [(1, "stacked"), (5, "stacked"), (WINDOW, "stacked"), (5, "per_layer")])
def test_cached_logits_equal_full_forward(ministral3, chunk, layout):
    """Through the rolling cache chunk by chunk (5 straddles the window's wrap and the original
    length's multiples): the full-sequence logits, which are HF's."""
    ref, config, params = ministral3
    cached, _ = logits_by_chunks(*in_layout(config, params, layout), ref.tokens, chunk)
    np.testing.assert_allclose(cached, np.asarray(forward(config, params, ref.tokens)), atol=TOL)
    np.testing.assert_allclose(cached, ref.logits, atol=TOL)


def test_native_layout(ministral3, tied, tmp_path):
    """params.json with "yarn" (apply_scale true and false), "llama_4_scaling" and
    "tied_embeddings": the same config and weights as the HF files."""
    for i, (ref, config, params) in enumerate((ministral3, tied)):
        os.makedirs(tmp_path / str(i))
        native_config, native = load_pytorch(str(write_native(ref, tmp_path / str(i), "safetensors")))
        assert native_config == config.replace(max_seq_len=native_config.max_seq_len)
        for a, b in zip(jax.tree_util.tree_leaves(native), jax.tree_util.tree_leaves(params)):
            np.testing.assert_array_equal(a, b)
        assert max_diff(native_config, native, ref) < TOL


@pytest.fixture
def tmp_dirs(tmp_path):
    for name in ("a", "b"):
        os.makedirs(tmp_path / name)
    return tmp_path / "a", tmp_path / "b"


def test_hf_jax_hf_round_trips_and_verify(ref_ministral3, ref_ministral3_tied, tmp_dirs, capsys):
    """Converted with --verify against Ministral3ForCausalLM, exported back bit for bit, which
    transformers loads with the reference's logits; the tied model writes no lm_head."""
    for ref, tmp in zip((ref_ministral3, ref_ministral3_tied), tmp_dirs):
        exported = assert_hf_round_trip(ref, tmp, capsys, transformers.Ministral3ForCausalLM)
        assert exported["model_type"] == "ministral3"
        assert exported["rope_parameters"] == {k: v for k, v in ref.model.config.rope_parameters.items()
                                               if k != "type"}
        assert exported["tie_word_embeddings"] == ref.model.config.tie_word_embeddings
    assert "lm_head.weight" not in load_file(tmp_dirs[1] / "back" / "model.safetensors")


# ---- the text model of Mistral3ForConditionalGeneration -----------------------------------------

@pytest.fixture(scope="module")
def mistral3_ministral3(tmp_path_factory):
    """Ministral 3 3B-shaped, scaled down: a ministral3 text model with a tiny Pixtral tower, its
    output tied to the embedding (Mistral3Config's own default, at the top level), saved by
    transformers 5.24, and its text logits."""
    torch.manual_seed(7)
    text = transformers.Ministral3Config(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                         num_key_value_heads=2, head_dim=16, intermediate_size=128, vocab_size=256,
                                         rope_parameters=dict(
                                             rope_type="yarn", rope_theta=1e6, factor=16.0, beta_fast=32.0,
                                             beta_slow=1.0, original_max_position_embeddings=ORIGINAL_LENGTH,
                                             mscale=1.0, mscale_all_dim=1.0, llama_4_scaling_beta=0.1),
                                         max_position_embeddings=256)
    vision = transformers.PixtralVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                              num_attention_heads=2, head_dim=16, image_size=32, patch_size=8)
    config = transformers.Mistral3Config(vision_config=vision, text_config=text, attn_implementation="eager")
    model = transformers.Mistral3ForConditionalGeneration(config).eval()
    strengthen(model)
    out = tmp_path_factory.mktemp("mistral3_ministral3")
    model.save_pretrained(out)
    tokens = torch.randint(0, 256, (2, 4 * ORIGINAL_LENGTH + 3))
    with torch.no_grad():
        logits = model(input_ids=tokens).logits.numpy()
    return out, tokens.numpy(), logits


def test_mistral3_with_a_ministral3_text_model(mistral3_ministral3, tmp_path, capsys):
    """Its text model equals HF's, --verify passes (text, and images), and --to-hf writes a
    Mistral3ForConditionalGeneration around a Ministral3 text model that transformers loads to the
    same logits."""
    out, tokens, logits = mistral3_ministral3
    vision = [n for n in load_file(out / "model.safetensors") if "vision_tower" in n or "multi_modal" in n]
    config, params = load_pytorch(str(out))
    assert len(jax.tree_util.tree_leaves(params["vision"])) == len(vision) and config.vision.act == "gelu"
    assert config.yarn is not None and config.llama_4_scaling is not None and config.tied_embeddings
    assert np.abs(np.asarray(forward(config, params, tokens)) - logits).max() < TOL
    status, stdout, _ = run_script(capsys, convert_weights, out, tmp_path / "jax", "--dtype", "float32", "--verify")
    assert status == 0 and "top-1 agreement 100.00%" in stdout
    assert run_script(capsys, convert_weights, tmp_path / "jax", tmp_path / "hf", "--to-hf")[0] == 0
    exported = transformers.Mistral3ForConditionalGeneration.from_pretrained(tmp_path / "hf",
                                                                            attn_implementation="eager")
    assert exported.config.text_config.model_type == "ministral3"
    with torch.no_grad():
        assert np.abs(exported(torch.tensor(tokens)).logits.numpy() - logits).max() < TOL


# ---- LlamaForCausalLM ----------------------------------------------------------------------------

def test_llama_checkpoints_load_and_export(tmp_path, capsys):
    """A tied LlamaForCausalLM (Llama's own rms_norm_eps default, no window): its logits, and
    --to-hf's MistralForCausalLM (the same block) computes them too."""
    ref = build_reference(tmp_path / "llama", seed=8, window=None, kind="Llama", seq_len=40, hidden_size=64,
                          num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                          intermediate_size=128, vocab_size=256, rope_theta=5e5, tie_word_embeddings=True)
    config, params = load_pytorch(ref.dir)
    assert config.tied_embeddings and config.norm_eps == 1e-6 and config.rope_theta == 5e5
    assert max_diff(config, params, ref) < TOL
    status, stdout, _ = run_script(capsys, convert_weights, ref.dir, tmp_path / "jax", "--dtype", "float32",
                                   "--verify")
    assert status == 0 and "top-1 agreement 100.00%" in stdout
    assert run_script(capsys, convert_weights, tmp_path / "jax", tmp_path / "hf", "--to-hf")[0] == 0
    mistral = transformers.MistralForCausalLM.from_pretrained(tmp_path / "hf", attn_implementation="eager")
    with torch.no_grad():
        np.testing.assert_array_equal(mistral(torch.tensor(ref.tokens)).logits.numpy(), ref.logits)


# ---- FP8 checkpoints -----------------------------------------------------------------------------

def quantize(w: torch.Tensor, layout: str, block: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    """w as float8 e4m3 and its scale, by hand: per tensor, per output channel, or per block
    (edge blocks cropped), each scale max |w| / 448 of what it covers."""
    if layout == "tensor":
        scale = w.abs().max() / 448
        return (w / scale).to(torch.float8_e4m3fn), scale.reshape(())
    if layout == "channel":
        scale = w.abs().amax(dim=1, keepdim=True) / 448
        return (w / scale).to(torch.float8_e4m3fn), scale
    rows, cols = -(-w.shape[0] // block), -(-w.shape[1] // block)
    scale = torch.zeros(rows, cols)
    for r in range(rows):
        for c in range(cols):
            scale[r, c] = w[r * block:(r + 1) * block, c * block:(c + 1) * block].abs().max() / 448
    expanded = scale.repeat_interleave(block, 0).repeat_interleave(block, 1)[:w.shape[0], :w.shape[1]]
    return (w / expanded).to(torch.float8_e4m3fn), scale


def dequantized(q: torch.Tensor, scale: torch.Tensor, block: int = 128) -> torch.Tensor:
    """By hand in PyTorch: q times the scale of each element (float32)."""
    if scale.dim() == 2 and scale.shape[1] != 1:
        scale = scale.repeat_interleave(block, 0).repeat_interleave(block, 1)[:q.shape[0], :q.shape[1]]
    return q.float() * scale


# (scale tensor's name, how it covers the weight, the config's quantization_config)
FP8 = {"fine-grained blocks": ("weight_scale_inv", "block", {"quant_method": "fp8", "weight_block_size": [16, 16]}),
       "compressed-tensors per tensor": ("weight_scale", "tensor", {"quant_method": "compressed-tensors"}),
       "compressed-tensors per channel": ("weight_scale", "channel", {"quant_method": "compressed-tensors"})}


@pytest.fixture
def small_pieces(monkeypatch):
    """Dequantization in pieces of 32 rows (two blocks of 16), so the tiny matrices take several."""
    monkeypatch.setattr(fp8, "ROWS", 32)


@pytest.mark.parametrize("kind", sorted(FP8))
def test_fp8_checkpoints_dequantize_as_pytorch(ref_ministral3, tmp_path, kind, small_pieces):
    """The reference's projections stored in float8 with scales (blocks of 16 x 16 here, so the
    tiny matrices hold several and cropped ones, read 32 rows at a time): converted to what
    dequantizing by hand in PyTorch gives, bit for bit in float32 and bfloat16; activation
    scales beside them unread."""
    suffix, layout, quantization = FP8[kind]
    state, expected = {}, {}
    for name, w in load_file(os.path.join(ref_ministral3.dir, "model.safetensors")).items():
        if name.endswith("proj.weight"):
            q, scale = quantize(w, layout, block=16)
            state[name], state[name.removesuffix("weight") + suffix] = q, scale
            state[name.removesuffix("weight") + "input_scale"] = torch.tensor(1.0)  # activations: not read
            expected[name] = dequantized(q, scale, block=16)
        else:
            state[name] = expected[name] = w
    config = json.loads(open(os.path.join(ref_ministral3.dir, "config.json")).read())
    (tmp_path / "config.json").write_text(json.dumps({**config, "quantization_config": quantization}))
    save_file(state, tmp_path / "model.safetensors")
    by_hand = tmp_path / "by_hand"
    os.makedirs(by_hand)
    (by_hand / "config.json").write_text(json.dumps(config))
    save_file(expected, by_hand / "model.safetensors")
    for dtype in ("float32", "bfloat16"):
        _, ours = load_pytorch(str(tmp_path), dtype)
        _, theirs = load_pytorch(str(by_hand), dtype)  # the hand-dequantized weights, as any checkpoint
        for a, b in zip(jax.tree_util.tree_leaves(ours), jax.tree_util.tree_leaves(theirs)):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_native_fp8_qscale_weight(ministral3, tmp_path, small_pieces):
    """Mistral-native FP8 (qscale_weight, qscale_act unread) on interleaved wq/wk, their scales
    per output channel (so each row's scale must travel with it to its rotate-half place): the
    hand-dequantized weights, in the model's order."""
    ref, config, params = ministral3
    os.makedirs(tmp_path / "f32")
    native = write_native(ref, tmp_path / "f32", "safetensors")
    state, expected = {}, {}
    for name, w in load_file(native / "consolidated.safetensors").items():
        if name.endswith(("wq.weight", "wk.weight", "w1.weight", "w2.weight")):
            q, scale = quantize(w, "channel" if name.endswith(("wq.weight", "wk.weight")) else "tensor")
            state[name], state[name.replace("weight", "qscale_weight")] = q, scale
            state[name.replace("weight", "qscale_act")] = torch.tensor(0.5)
            w = dequantized(q, scale)
        state.setdefault(name, w)
        expected[name] = w
    os.makedirs(tmp_path / "fp8")
    os.makedirs(tmp_path / "by_hand")
    for directory, tensors in (("fp8", state), ("by_hand", expected)):
        save_file(tensors, tmp_path / directory / "consolidated.safetensors")
        (tmp_path / directory / "params.json").write_text((native / "params.json").read_text())
    _, ours = load_pytorch(str(tmp_path / "fp8"))
    _, theirs = load_pytorch(str(tmp_path / "by_hand"))
    for a, b in zip(jax.tree_util.tree_leaves(ours), jax.tree_util.tree_leaves(theirs)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_fp8_scales_that_do_not_fit_are_one_line_errors(ref_ministral3, tmp_path, capsys):
    """A block scale of the wrong shape, a float8 weight without a scale, a scale without a
    weight: one line naming the tensor, a non-zero exit, nothing left behind."""
    config = json.loads(open(os.path.join(ref_ministral3.dir, "config.json")).read())
    weights = load_file(os.path.join(ref_ministral3.dir, "model.safetensors"))
    name = "model.layers.1.mlp.down_proj.weight"
    q, scale = quantize(weights[name], "block", block=16)
    cases = {"fits none of the layouts": {name: q, name + "_scale_inv": torch.ones(3, 3)},
             "weight block size": {name: q, name + "_scale_inv": scale},
             "has no scale": {name: q},
             "scales of no weight": {"model.layers.9.mlp.up_proj.weight_scale_inv": scale}}
    for i, (message, changes) in enumerate(cases.items()):
        src = tmp_path / f"src{i}"
        os.makedirs(src)
        block = "sixteen" if message == "weight block size" else [16, 16]
        (src / "config.json").write_text(json.dumps({**config, "quantization_config": {"weight_block_size": block}}))
        save_file({**weights, **changes}, src / "model.safetensors")
        status, _, err = run_script(capsys, convert_weights, src, tmp_path / "out", "--dtype", "float32")
        assert_one_line_error(status, err, message)
        assert not os.path.exists(tmp_path / "out") and not [p for p in os.listdir(tmp_path) if p.startswith(".")]


# ---- presets -------------------------------------------------------------------------------------

PRESETS = ["ministral-3-3b", "ministral-3-8b", "ministral-3-14b", "devstral-small-2-24b", "devstral-2-123b"]
# Sizes as published (billions, rounded), where a source seen here gave one: the Ministral 3
# paper's 14B language model, Devstral Small 2's Mistral Small 3 shape (23.6B, as its card).
PUBLISHED = {"ministral-3-14b": 13.5, "devstral-small-2-24b": 23.6}


@pytest.mark.parametrize("name", PRESETS)
def test_presets_equal_transformers_models(name):
    """Each preset's parameter count equals that of transformers' Ministral3ForCausalLM of its
    config.json (built on the meta device), the published size where known, and both files give
    the preset back."""
    config = MistralConfig.preset(name)
    hf = config.to_hf_dict()
    assert hf["model_type"] == "ministral3"
    with torch.device("meta"):
        model = transformers.Ministral3ForCausalLM(transformers.Ministral3Config(**hf))
    assert config.num_params == sum(p.numel() for p in model.parameters())
    if name in PUBLISHED:
        assert round(config.num_params / 1e9, 1) == PUBLISHED[name]
    assert MistralConfig.from_hf_dict(hf) == config
    assert MistralConfig.from_params_dict(config.to_params_dict()) == config


def test_loss_and_gradients_equal_pytorch_autograd(ref_ministral3, ref_ministral3_tied, tmp_path):
    """Training through the scalings and the tied embedding (whose gradient sums both its uses):
    the loss and every gradient of HF's autograd, written as a checkpoint and read back."""
    from mistral_jax.training import trainer

    for i, ref in enumerate((ref_ministral3, ref_ministral3_tied)):
        model = copy.deepcopy(ref.model)
        # Ministral3Config's pad token (11) is nn.Embedding's padding_idx, whose row PyTorch
        # leaves out of the lookup's gradient (a layer's quirk, not the model's math): not in the input.
        tokens = torch.from_numpy(np.where(ref.tokens == model.config.pad_token_id, 12, ref.tokens)).long()
        logits = model(tokens[:, :-1]).logits.float()
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), tokens[:, 1:].reshape(-1))
        loss.backward()
        with torch.no_grad():
            for p in model.parameters():
                p.copy_(p.grad)
        model.save_pretrained(tmp_path / str(i))
        _, expected = load_pytorch(str(tmp_path / str(i)))
        config, params = load_pytorch(ref.dir)
        (ours, _), grads = jax.value_and_grad(trainer.loss_fn, has_aux=True)(params, config, tokens.numpy(), 0.0, 16)
        assert abs(float(ours) - loss.item()) < 1e-5 * loss.item()
        flat, hf_flat = (dict(jax.tree_util.tree_flatten_with_path(tree)[0]) for tree in (grads, expected))
        assert flat.keys() == hf_flat.keys()
        for path, g in flat.items():
            assert np.abs(np.asarray(g) - hf_flat[path]).max() < 1e-4 * np.abs(hf_flat[path]).max(), path


def test_a_tied_native_fp8_checkpoint_with_a_copy_of_its_output(tied, tmp_path):
    """A tied model's native files holding an FP8 copy of the embedding as `output` (with its
    scale): the copy and its scale are not read; the model is the embedding's."""
    ref, config, params = tied
    native = write_native(ref, tmp_path, "safetensors")
    state = load_file(native / "consolidated.safetensors")
    q, scale = quantize(state["tok_embeddings.weight"], "tensor")
    state["output.weight"], state["output.qscale_weight"] = q, scale
    save_file(state, native / "consolidated.safetensors")
    native_config, native_params = load_pytorch(str(native))
    assert native_config.tied_embeddings and "output" not in native_params
    for a, b in zip(jax.tree_util.tree_leaves(native_params), jax.tree_util.tree_leaves(params)):
        np.testing.assert_array_equal(a, b)


def test_verify_refuses_what_no_transformers_model_computes(ministral3):
    """YaRN and the query scale over different original lengths: no transformers model holds
    them, so --verify says so rather than comparing against a model that drops one."""
    from mistral_jax.checkpoints.verify import compare_with_pytorch

    ref, config, params = ministral3
    other = config.replace(llama_4_scaling=Llama4Scaling(0.1, 2 * ORIGINAL_LENGTH))
    with pytest.raises(ValueError, match="holds one original_max_position_embeddings"):
        compare_with_pytorch(ref.dir, other, params)
