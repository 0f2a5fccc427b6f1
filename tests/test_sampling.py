"""Sampling against HF transformers' generate and the full-sequence forward."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from transformers.generation import logits_process

from conftest import WINDOW, forward
from mistral_jax.checkpoints.convert import load_pytorch
from mistral_jax.inference.sampling import (Sampler, decode, decoding_layout, filter_logits, generate, sample_logits,
                                            start)
from mistral_jax.model.cache import KVCache
from mistral_jax.model.transformer import Mistral, unstack_layers
from mistral_jax.runtime import platforms
from mistral_jax.runtime.options import OptionError

NEW = 3 * WINDOW + 7  # generation wraps the cache several times


@pytest.fixture(scope="module")
def windowed(ref_windowed):
    config, params = load_pytorch(ref_windowed.dir)
    return ref_windowed, config, params


@pytest.fixture(scope="module")
def full(ref_full):
    config, params = load_pytorch(ref_full.dir)
    return ref_full, config, params


def prompts_of(lengths, vocab, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(3, vocab, n).tolist() for n in lengths]


def hf_greedy(model, prompt, new):
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt]), max_new_tokens=new, do_sample=False,
                             eos_token_id=None, pad_token_id=0)
    return out[0, len(prompt):].tolist()


def in_layout(config, params, layout):
    return unstack_layers(config, params) if layout == "per_layer" else (config, params)


def assert_views_of_stacked(stacked, per_layer):
    """Each per-layer array is layer i of its stacked array, in the stacked array's memory (CPU)."""
    leaves = jax.tree_util.tree_leaves(stacked["layers"])
    for i in range(leaves[0].shape[0]):
        for whole, layer in zip(leaves, jax.tree_util.tree_leaves(per_layer[f"layers_{i}"])):
            np.testing.assert_array_equal(layer, whole[i])
            offset = i * layer.size * layer.dtype.itemsize
            assert layer.unsafe_buffer_pointer() == whole.unsafe_buffer_pointer() + offset


@pytest.fixture(params=["per_layer", "stacked"])
def decoding(request, monkeypatch):
    """generate as CPUs run it (over per-layer views of the params) and as TPUs and GPUs do
    (one scan over the stacked layers)."""
    if request.param == "stacked":
        monkeypatch.setattr(platforms, "decode_per_layer", lambda platform: False)
    return request.param


@pytest.mark.parametrize("which", ["windowed", "full"])
def test_greedy_equals_hf_generate(request, which, decoding):
    """A ragged batch, prompts shorter and longer than the window, in one call, from the
    params as loaded."""
    ref, config, params = request.getfixturevalue(which)
    prompts = prompts_of([5, WINDOW - 1, WINDOW, 2 * WINDOW + 3], config.vocab_size)
    ours = generate(config, params, prompts, NEW, eos_id=None)
    for prompt, tokens in zip(prompts, ours):
        assert tokens == hf_greedy(ref.model, prompt, NEW)


def test_ragged_batch_equals_one_at_a_time(windowed):
    _, config, params = windowed
    prompts = prompts_of([3, 21, 40, 9], config.vocab_size, seed=1)
    batched = generate(config, params, prompts, 30, eos_id=None)
    assert batched == [generate(config, params, [p], 30, eos_id=None)[0] for p in prompts]


@functools.partial(jax.jit, static_argnums=(0, 3))
def logits_by_chunks(config, params, tokens, chunk):
    """Every position's logits, fed through the cache `chunk` tokens at a time."""
    B, T = tokens.shape
    n = -(-T // chunk)
    pieces = jnp.pad(tokens, [(0, 0), (0, n * chunk - T)]).reshape(B, n, chunk).transpose(1, 0, 2)

    def step(cache, i):
        positions = i * chunk + jnp.arange(chunk, dtype=jnp.int32)[None, :]
        positions = jnp.broadcast_to(jnp.where(positions < T, positions, -1), (B, chunk))
        logits, cache = Mistral(config).apply({"params": params}, pieces[i], positions, cache)
        return cache, logits

    cache, logits = jax.lax.scan(step, KVCache.init(config, B, T), jnp.arange(n))
    return logits.transpose(1, 0, 2, 3).reshape(B, n * chunk, -1)[:, :T], cache


# chunk 1 is decode; 5 straddles the cache's wrap
@pytest.mark.parametrize("chunk,layout", [(1, "stacked"), (5, "stacked"), (WINDOW, "stacked"), (1, "per_layer"),
                                          (5, "per_layer")])
def test_cached_logits_equal_full_forward(windowed, chunk, layout):
    ref, config, params = windowed
    T = ref.tokens.shape[1]
    cached, cache = logits_by_chunks(*in_layout(config, params, layout), ref.tokens, chunk)
    full = np.asarray(forward(config, params, ref.tokens))
    np.testing.assert_allclose(cached, full, atol=1e-4)  # the float32 parity tolerance
    np.testing.assert_allclose(cached, ref.logits, atol=1e-4)
    assert all(k.shape[-3] == WINDOW for k in jax.tree_util.tree_leaves(cache.k))  # never past the window
    (positions,) = cache.positions  # one kind of layer
    np.testing.assert_array_equal(np.sort(positions, axis=1), np.tile(np.arange(T - WINDOW, T), (2, 1)))


def test_logits_at_projects_only_the_asked_positions(windowed):
    """What prefill uses: the logits of one position per row, against HF's."""
    ref, config, params = windowed
    at = np.array([3, ref.tokens.shape[1] - 1], np.int32)
    logits = jax.jit(lambda p, t, i: Mistral(config).apply({"params": p}, t, logits_at=i))(params, ref.tokens, at)
    assert logits.shape == (2, 1, config.vocab_size)
    np.testing.assert_allclose(logits[:, 0], ref.logits[[0, 1], at], atol=1e-4)


def test_cache_worked_example():
    """The example in model/cache.py's docstring: window 3, prompts of lengths [5, 2], chunks of 3."""
    from mistral_jax.model.config import MistralConfig

    config = MistralConfig(dim=8, n_layers=1, head_dim=4, hidden_dim=8, n_heads=2, n_kv_heads=1,
                           vocab_size=10, sliding_window=3)
    model = Mistral(config)
    params = jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, 1), jnp.int32))["params"]
    apply = jax.jit(model.apply)
    lengths = np.array([5, 2])
    cache = KVCache.init(config, 2, 100)
    for start_, expected in [(0, [[0, 1, 2], [0, 1, -1]]), (3, [[3, 4, 2], [0, 1, -1]])]:
        positions = start_ + np.arange(3)[None, :]
        positions = np.where(positions < lengths[:, None], positions, -1).astype(np.int32)
        _, cache = apply({"params": params}, np.zeros((2, 3), np.int32), positions, cache)
        np.testing.assert_array_equal(cache.positions[0], expected)


def test_prefill_chunk_size_does_not_change_tokens(windowed):
    _, config, params = windowed
    prompts = prompts_of([50, 7], config.vocab_size, seed=2)
    from mistral_jax.inference.sampling import generate_stream

    def run(chunk):
        pieces = generate_stream(config, params, prompts, 20, eos_id=None, prefill_chunk=chunk)
        return np.concatenate(list(pieces), axis=1)

    np.testing.assert_array_equal(run(3), run(WINDOW))


def test_streamed_steps_equal_one_call(windowed):
    _, config, params = windowed
    from mistral_jax.inference.sampling import generate_stream

    prompts = prompts_of([10, 4], config.vocab_size, seed=3)
    pieces = list(generate_stream(config, params, prompts, 25, sampler=Sampler(temperature=0.8), seed=5, eos_id=None,
                                  steps_per_call=4))
    assert [p.shape[1] for p in pieces] == [1, 4, 4, 4, 4, 4, 4]
    assert np.concatenate(pieces, axis=1).tolist() == generate(config, params, prompts, 25, temperature=0.8,
                                                               seed=5, eos_id=None)


def test_seeds_top_k_one_and_eos(windowed):
    _, config, params = windowed
    prompts = prompts_of([6, 30], config.vocab_size, seed=4)
    sample = functools.partial(generate, config, params, prompts, 24, eos_id=None)
    assert sample(temperature=1.0, seed=1) == sample(temperature=1.0, seed=1)
    assert sample(temperature=1.0, seed=1) != sample(temperature=1.0, seed=2)
    assert sample(temperature=1.0, top_k=1, seed=3) == sample(temperature=0.0)
    assert sample(temperature=1.0, top_p=1e-6, seed=3) == sample(temperature=0.0)

    greedy = sample(temperature=0.0)
    eos = next(t for t in greedy[0][1:] if t not in greedy[1])  # only row 0 ever emits it
    stopped = generate(config, params, prompts, 24, eos_id=eos)
    assert stopped[0] == greedy[0][:greedy[0].index(eos)]  # stops before eos...
    assert stopped[1] == greedy[1]  # ...while the other row goes on


@pytest.mark.parametrize("top_k,top_p", [(5, None), (None, 0.3), (None, 0.9), (40, 0.8)])
def test_filter_matches_hf_warpers(top_k, top_p):
    logits = np.random.default_rng(0).normal(size=(4, 100)).astype(np.float32) * 3
    ours = np.asarray(filter_logits(jnp.asarray(logits), 0.7, top_k, top_p))
    expected = torch.tensor(logits)
    warpers = [logits_process.TemperatureLogitsWarper(0.7)]
    if top_k is not None:
        warpers.append(logits_process.TopKLogitsWarper(top_k))
    if top_p is not None:
        warpers.append(logits_process.TopPLogitsWarper(top_p))
    for warper in warpers:
        expected = warper(None, expected)
    np.testing.assert_array_equal(np.isinf(ours), np.isinf(expected.numpy()))
    np.testing.assert_allclose(ours[~np.isinf(ours)], expected.numpy()[~np.isinf(ours)], rtol=1e-6)


def test_sampling_frequencies_follow_the_filtered_distribution():
    logits = jnp.log(jnp.array([[0.5, 0.3, 0.15, 0.05]]))
    keys = jax.random.split(jax.random.key(0), 4000)
    draws = np.asarray(jax.jit(jax.vmap(lambda k: sample_logits(logits, k, Sampler(1.0, None, 0.7))))(keys))[:, 0]
    # top_p 0.7 keeps {0.5, 0.3}: renormalised 0.625 / 0.375.
    assert set(draws.tolist()) == {0, 1}
    assert abs((draws == 0).mean() - 0.625) < 0.03


def test_no_recompile_within_a_bucket(windowed):
    _, config, params = windowed
    generate(config, params, prompts_of([20, 9], config.vocab_size), 10)
    compiled = [p._cache_size() for p in (start, decode)]
    generate(config, params, prompts_of([27, 3], config.vocab_size, seed=9), 13)
    assert [p._cache_size() for p in (start, decode)] == compiled


def test_generate_decodes_over_views_of_stacked_params_on_cpu(windowed, monkeypatch):
    """What generate decodes with on CPU: a block per layer over views of the stacked params
    as loaded, each layer's weights in the stacked array's memory (nothing copied per call)."""
    _, config, params = windowed
    from mistral_jax.inference import sampling

    compiled = []  # the configs generate's compiled loops were traced for
    decode_fn = sampling.decode

    def recording_decode(params, config, *args, **kwargs):
        compiled.append(config)
        return decode_fn(params, config, *args, **kwargs)

    monkeypatch.setattr(sampling, "decode", recording_decode)
    generate(config, params, prompts_of([5, 9], config.vocab_size), 4)
    assert compiled and not any(c.scan_layers for c in compiled)  # generate itself took the per-layer layout
    per_layer_config, per_layer = decoding_layout(config, params)
    assert not per_layer_config.scan_layers and config.scan_layers
    assert_views_of_stacked(params, per_layer)
    again_config, again = decoding_layout(per_layer_config, per_layer)  # already per layer: as given
    assert again_config == per_layer_config and again is per_layer


@pytest.mark.parametrize("prompts,new,options,message", [
    ([], 5, {}, "no prompts"), ([[1, 2], []], 5, {}, r"prompts\[1\] is empty"),
    ([[1] * 600], 5, {}, "more than the model's max_seq_len"), ([[1, 400]], 5, {}, "outside"),
    ([[1, 2]], 10**9, {}, "with max_new_tokens 1000000000 that is more than the model's max_seq_len"),
    ([[1, 2]], 0, {}, "max_new_tokens must be a positive integer, got 0"),
    ([[1, 2]], 3.0, {}, "max_new_tokens must be a positive integer, got 3.0"),
    ([[1, 2]], 5, {"temperature": -1.0}, "temperature must be a finite number >= 0, got -1.0"),
    ([[1, 2]], 5, {"temperature": float("nan")}, "temperature must be a finite number >= 0, got nan"),
    ([[1, 2]], 5, {"temperature": float("inf")}, "temperature must be a finite number >= 0, got inf"),
    ([[1, 2]], 5, {"top_k": 0}, "top_k must be an integer of at least 1, got 0"),
    ([[1, 2]], 5, {"top_k": 2.5}, "top_k must be an integer of at least 1, got 2.5"),
    ([[1, 2]], 5, {"top_k": 400}, r"top_k must be in \[1, 320\]"),
    ([[1, 2]], 5, {"top_p": 0.0}, r"top_p must be in \(0, 1\]"),
    ([[1, 2]], 5, {"seed": 2**64}, r"seed must be an integer in \[0, 2\*\*63\)"),
    ("12", 5, {}, "prompts must be a list of token-id lists, got str"),
    (["ab"], 5, {}, r"prompts\[0\] must be a list of token ids, got str"),
])
def test_bad_arguments(windowed, prompts, new, options, message):
    _, config, params = windowed
    with pytest.raises((ValueError, TypeError), match=message):
        generate(config, params, prompts, new, **options)


def test_sampler_names_the_bad_field():
    with pytest.raises(OptionError) as e:
        Sampler(top_p=2.0)
    assert e.value.field == "top_p"
