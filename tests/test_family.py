"""The rest of the dense family against transformers: Ministral's per-layer windows
(MinistralForCausalLM), the text model of Mistral3ForConditionalGeneration, and the
presets' shapes."""

import copy
import json
import os
import shutil

import jax
import numpy as np
import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file

import convert_weights
from conftest import WINDOW, forward, run_script, strengthen
from mistral_jax.checkpoints.convert import CheckpointError, load_pytorch, save_hf
from mistral_jax.inference.sampling import Sampler, generate, start
from mistral_jax.model.cache import KVCache
from mistral_jax.model.config import MistralConfig
from mistral_jax.model.transformer import Mistral
from test_parity import TOL, max_diff, write_native
from test_sampling import decoding, hf_greedy, in_layout, logits_by_chunks, prompts_of  # noqa: F401 (a fixture)

NEW = 3 * WINDOW + 7  # generation wraps the sliding layers' caches several times


@pytest.fixture(scope="module")
def ministral(ref_ministral):
    config, params = load_pytorch(ref_ministral.dir)
    return ref_ministral, config, params


def test_config_reads_the_layer_kinds(ministral):
    _, config, _ = ministral
    assert config.sliding_window == (None, WINDOW, WINDOW, WINDOW)  # the repeating group
    assert config.windows == (None, WINDOW, WINDOW, WINDOW) * 2 and config.window_kinds == (None, WINDOW)
    assert config.rope_theta == 1e8


@pytest.mark.parametrize("attention,block,layout", [
    ("xla", WINDOW // 2, "stacked"), ("xla", 3 * WINDOW, "stacked"), ("splash", None, "stacked"),
    ("dot_product", None, "stacked"), ("xla", None, "per_layer")])
def test_logits_equal_hf(ministral, attention, block, layout):
    """Full and sliding layers, on sequences over 4x the window, with every kernel and both
    layer layouts; prefixes too (HF is causal)."""
    ref, config, params = ministral
    config = config.replace(attention=attention, attention_block=block or config.attention_block)
    config, params = in_layout(config, params, layout)
    for length in (ref.tokens.shape[1], 2 * WINDOW + 1, WINDOW - 1):
        assert max_diff(config, params, ref, length) < TOL, length


def test_native_layout_with_a_list_of_windows(ministral, tmp_path):
    ref, config, params = ministral
    native_config, native = load_pytorch(str(write_native(ref, tmp_path, "safetensors")))
    assert json.loads((tmp_path / "params.json").read_text())["sliding_window"][:4] == [None, WINDOW, WINDOW, WINDOW]
    assert native_config == config.replace(max_seq_len=native_config.max_seq_len)
    for a, b in zip(jax.tree_util.tree_leaves(native), jax.tree_util.tree_leaves(params)):
        np.testing.assert_array_equal(a, b)
    assert max_diff(native_config, native, ref) < TOL


def test_oracle_catches_wrong_layer_kinds(ministral):
    ref, config, params = ministral
    assert max_diff(config.replace(sliding_window=WINDOW), params, ref) > 100 * TOL  # every layer sliding
    assert max_diff(config.replace(sliding_window=None), params, ref) > 100 * TOL  # every layer full
    assert max_diff(config.replace(sliding_window=(None,) + (WINDOW + 1,) * 3), params, ref) > 100 * TOL
    assert max_diff(config.replace(sliding_window=(WINDOW, None, WINDOW, WINDOW)), params, ref) > 100 * TOL


def test_greedy_equals_hf_generate(ministral, decoding):
    """A ragged batch, prompts shorter and longer than the window, in one call."""
    ref, config, params = ministral
    prompts = prompts_of([5, WINDOW - 1, WINDOW, 2 * WINDOW + 3], config.vocab_size)
    ours = generate(config, params, prompts, NEW, eos_id=None)
    for prompt, tokens in zip(prompts, ours):
        assert tokens == hf_greedy(ref.model, prompt, NEW)


@pytest.mark.parametrize("chunk,layout", [(1, "stacked"), (5, "stacked"), (WINDOW, "stacked"), (1, "per_layer"),
                                          (5, "per_layer")])
def test_cached_logits_equal_full_forward(ministral, chunk, layout):
    """Fed through the cache in chunks (1: decode; 5 straddles the sliding caches' wrap): the
    logits of one full-sequence forward; and what the cache holds, per kind of layer."""
    ref, config, params = ministral
    B, T = ref.tokens.shape
    cached, cache = logits_by_chunks(*in_layout(config, params, layout), ref.tokens, chunk)
    np.testing.assert_allclose(cached, np.asarray(forward(config, params, ref.tokens)), atol=TOL)
    np.testing.assert_allclose(cached, ref.logits, atol=TOL)
    layers = [len(k) if isinstance(k, tuple) else int(np.prod(k.shape[:-4])) for k in cache.k]
    assert layers == [2, 6]  # layers of each kind: a tuple of them, or stacked [G, n, ...]
    full, sliding = (jax.tree_util.tree_leaves(k) for k in cache.k)
    assert all(k.shape[-3] == T for k in full) and all(k.shape[-3] == WINDOW for k in sliding)
    np.testing.assert_array_equal(np.sort(cache.positions[0], axis=1), np.tile(np.arange(T), (B, 1)))
    np.testing.assert_array_equal(np.sort(cache.positions[1], axis=1), np.tile(np.arange(T - WINDOW, T), (B, 1)))


def test_cache_holds_window_slots_for_sliding_layers(ministral):
    """The sampler's cache: 2 full layers x the whole length, 6 sliding layers x W slots,
    each kind's grouped as the model scans them ([G, n, B, C, K, d])."""
    _, config, params = ministral
    prompt_len, new = 2 * WINDOW, 64
    state = start(params, config, np.ones((2, prompt_len), np.int32), np.full(2, prompt_len, np.int32),
                  jax.random.key(0), sampler=Sampler(), eos_id=-1, chunk=WINDOW, max_tokens=new)
    full, sliding = state.cache.k
    assert full.shape == (2, 1, 2, prompt_len + new, 2, 16) and sliding.shape == (2, 3, 2, WINDOW, 2, 16)
    uniform = KVCache.init(config.replace(sliding_window=None), 2, prompt_len + new)
    assert sum(k.nbytes for k in state.cache.k) / sum(k.nbytes for k in uniform.k) == (2 * 96 + 6 * 16) / (8 * 96)


def assert_hf_round_trip(ref, tmp_path, capsys, hf_class) -> dict:
    """The reference's checkpoint converted (--verify passing), exported back with --to-hf
    bit for bit, and loaded by hf_class with the reference's logits; returns the exported
    config.json."""
    src = tmp_path / "src"
    copy.deepcopy(ref.model).save_pretrained(src)
    status, out, _ = run_script(capsys, convert_weights, src, tmp_path / "jax", "--dtype", "float32", "--verify")
    assert status == 0 and "top-1 agreement 100.00%" in out
    assert run_script(capsys, convert_weights, tmp_path / "jax", tmp_path / "back", "--to-hf")[0] == 0
    before, after = load_file(src / "model.safetensors"), load_file(tmp_path / "back" / "model.safetensors")
    assert before.keys() == after.keys()
    for name in before:
        assert torch.equal(before[name], after[name]), name
    reloaded = hf_class.from_pretrained(tmp_path / "back", attn_implementation="eager")
    with torch.no_grad():
        np.testing.assert_array_equal(reloaded(torch.tensor(ref.tokens)).logits.numpy(), ref.logits)
    return json.loads((tmp_path / "back" / "config.json").read_text())


def test_hf_jax_hf_round_trip_and_verify(ref_ministral, tmp_path, capsys):
    exported = assert_hf_round_trip(ref_ministral, tmp_path, capsys, transformers.MinistralForCausalLM)
    assert exported["model_type"] == "ministral" and exported["layer_types"] == ref_ministral.model.config.layer_types


# ---- Mistral3ForConditionalGeneration's text model -------------------------------------------

@pytest.fixture(scope="module")
def mistral3(tmp_path_factory):
    """A Mistral Small 3.1-shaped multimodal model (a tiny Pixtral tower), saved as
    transformers does (the hub's `language_model.model.*` names), and its text logits."""
    torch.manual_seed(3)
    text = transformers.MistralConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                      num_key_value_heads=2, head_dim=16, intermediate_size=128, vocab_size=256,
                                      rope_theta=1e9, sliding_window=None, max_position_embeddings=512)
    vision = transformers.PixtralVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                              num_attention_heads=2, head_dim=16, image_size=32, patch_size=8)
    config = transformers.Mistral3Config(vision_config=vision, text_config=text, tie_word_embeddings=False,
                                         attn_implementation="eager")
    model = transformers.Mistral3ForConditionalGeneration(config).eval()
    strengthen(model)
    out = tmp_path_factory.mktemp("mistral3")
    model.save_pretrained(out)
    tokens = torch.randint(0, 256, (2, 40))
    with torch.no_grad():
        logits = model(input_ids=tokens).logits.numpy()
    return out, model, tokens.numpy(), logits


def test_mistral3_text_model_equals_hf(mistral3, tmp_path):
    out, model, tokens, logits = mistral3
    names = load_file(out / "model.safetensors").keys()
    assert any(name.startswith("language_model.model.") for name in names)
    vision = [n for n in names if n.startswith(("vision_tower.", "multi_modal_projector."))]
    assert len(vision) + 3 + 2 * 9 == len(names)  # nothing else beside the text model
    config, params = load_pytorch(str(out))
    assert config.vision.n_layers == 1 and len(jax.tree_util.tree_leaves(params["vision"])) == len(vision)
    assert config.rope_theta == 1e9 and config.norm_eps == 1e-6 and config.sliding_window is None
    assert np.abs(np.asarray(forward(config, params, tokens)) - logits).max() < TOL
    # The same weights under the names transformers >= 5 uses in memory (model.language_model.*).
    shutil.copy(out / "config.json", tmp_path)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, tmp_path / "model.safetensors")
    assert any(k.startswith("model.language_model.") for k in load_file(tmp_path / "model.safetensors"))
    _, renamed = load_pytorch(str(tmp_path))
    for a, b in zip(jax.tree_util.tree_leaves(renamed), jax.tree_util.tree_leaves(params)):
        np.testing.assert_array_equal(a, b)


def test_mistral3_converts_verifies_and_exports(mistral3, tmp_path, capsys):
    out, _, tokens, logits = mistral3
    status, stdout, _ = run_script(capsys, convert_weights, out, tmp_path / "jax", "--dtype", "float32", "--verify")
    assert status == 0 and "top-1 agreement 100.00%" in stdout and "with images" in stdout
    assert run_script(capsys, convert_weights, tmp_path / "jax", tmp_path / "hf", "--to-hf")[0] == 0
    exported = transformers.Mistral3ForConditionalGeneration.from_pretrained(tmp_path / "hf",
                                                                            attn_implementation="eager")
    with torch.no_grad():
        assert np.abs(exported(torch.tensor(tokens)).logits.numpy() - logits).max() < TOL


# ---- presets ----------------------------------------------------------------------------------

# Parameter counts as the model cards round them (billions).
PUBLISHED = {"ministral-8b": 8.02, "mistral-nemo-12b": 12.2, "mistral-small-24b": 23.6, "codestral-22b": 22.2,
             "mistral-7b-v0.3": 7.25}


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_preset_shapes_equal_transformers_models(name):
    """Each preset's parameter count equals that of transformers' own model of its config.json
    (built on the meta device: no memory), and the model card's rounded figure."""
    config = MistralConfig.preset(name)
    hf = config.to_hf_dict()
    kind = "Ministral" if hf["model_type"] == "ministral" else "Mistral"
    with torch.device("meta"):
        model = getattr(transformers, f"{kind}ForCausalLM")(getattr(transformers, f"{kind}Config")(**hf))
    assert config.num_params == sum(p.numel() for p in model.parameters())
    digits = 2 if PUBLISHED[name] < 10 else 1
    assert round(config.num_params / 1e9, digits) == PUBLISHED[name]
    assert MistralConfig.from_hf_dict(hf) == config
    assert MistralConfig.from_params_dict(config.to_params_dict()) == config  # max_position_embeddings kept



def test_each_kind_of_layer_compiles_once(ministral):
    """The traced program does not grow with depth: 8 layers and 16 (2 and 4 groups) trace
    to the same size (but for the digits of the shapes), for the forward pass and for a
    decode step through the cache."""
    _, config, _ = ministral
    tokens = np.zeros((2, 8), np.int32)

    def program_sizes(n_layers):
        c = config.replace(n_layers=n_layers)
        params = jax.eval_shape(lambda: Mistral(c).init(jax.random.key(0), tokens)["params"])
        cache = jax.eval_shape(lambda: KVCache.init(c, 2, 64))
        forward_ = jax.make_jaxpr(lambda p: Mistral(c).apply({"params": p}, tokens))(params)
        decode_ = jax.make_jaxpr(lambda p, k: Mistral(c).apply({"params": p}, tokens[:, :1], tokens[:, :1], k))(
            params, cache)
        return len(str(forward_)), len(str(decode_))

    for shallow, deep in zip(program_sizes(8), program_sizes(16)):
        assert abs(deep - shallow) < 0.01 * shallow  # only the shapes' digits differ; unrolled, 2x


def test_hf_export_refuses_two_window_sizes(ministral, tmp_path):
    """Windows [16, 8, ...]: our checkpoints keep them (test_config.py), no HF model holds them."""
    _, config, params = ministral
    two = config.replace(sliding_window=(WINDOW, 8))
    with pytest.raises(CheckpointError, match=r"windows \[8, 16\] in one model"):
        save_hf(str(tmp_path), two, params)
    assert not os.listdir(tmp_path)
