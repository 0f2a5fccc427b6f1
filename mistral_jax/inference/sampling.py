"""Sampling: logits -> token, chunked prefill into the rolling cache, a compiled decode loop.

Everything per token happens inside one `jax.lax.while_loop` whose carry (SamplingState)
holds the cache, positions, PRNG key and output buffer: no host round trip per token.
Params are arguments, never closed over. Prompt and output lengths are padded to buckets,
and the true lengths are traced values, so a new prompt length within a bucket does not
recompile.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Iterator, Sequence

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from mistral_jax.model.cache import KVCache
from mistral_jax.model.config import MistralConfig
from mistral_jax.model.transformer import Mistral, unstack_layers
from mistral_jax.model.vision import ImageFeatures, VisionTower, token_index
from mistral_jax.runtime import platforms
from mistral_jax.runtime.distributed import fetch
from mistral_jax.runtime.options import OptionError, option

PREFILL_CHUNK = 512  # prompt tokens per prefill step (at most the window)


@dataclasses.dataclass(frozen=True)
class Sampler:
    """How each next token is chosen.

    Greedy at temperature 0, else sampled from the logits divided by temperature, keeping
    only the top_k most likely tokens and then the smallest set whose probability reaches
    top_p. Hashable: a static argument of the compiled loop.
    """

    temperature: float = option(0.0, "0 is greedy")
    top_k: int | None = option(None, "keep the k most likely tokens")
    top_p: float | None = option(None, "keep the smallest set of tokens whose probability reaches p")

    def __post_init__(self):
        if not _is_number(self.temperature) or not 0 <= self.temperature < math.inf:  # NaN too
            raise OptionError("temperature", f"must be a finite number >= 0, got {self.temperature!r}")
        if self.top_k is not None and (not _is_int(self.top_k) or self.top_k < 1):
            raise OptionError("top_k", f"must be an integer of at least 1, got {self.top_k!r}")
        if self.top_p is not None and (not _is_number(self.top_p) or not 0 < self.top_p <= 1):
            raise OptionError("top_p", f"must be in (0, 1], got {self.top_p!r}")
        object.__setattr__(self, "temperature", float(self.temperature))


def _is_int(x) -> bool:
    return isinstance(x, (int, np.integer)) and not isinstance(x, bool)


def _is_number(x) -> bool:
    return isinstance(x, (int, float, np.integer, np.floating)) and not isinstance(x, bool)


@flax.struct.dataclass
class SamplingState:
    cache: KVCache
    tokens: jax.Array  # [B, N] int32: generated tokens; N is the output bucket
    last: jax.Array  # [B] int32: the token to feed next
    position: jax.Array  # [B] int32: its position
    done: jax.Array  # [B] bool: the row has emitted eos
    step: jax.Array  # [] int32: tokens generated so far
    key: jax.Array


def filter_logits(logits: jax.Array, temperature, top_k=None, top_p=None) -> jax.Array:
    """logits [B, V] / temperature, with -inf outside the top_k most likely tokens, then outside
    the smallest set of tokens whose probability reaches top_p (the most likely token always
    stays). temperature, top_k and top_p are each one number for every row or an array [B] of
    one per row (top_k 0, top_p 0: that row uncut); None: no cut.

    Both cuts are thresholds found by bisection over the floats' order, exact as a sort would
    find them: XLA:CPU took 105 ms to sort 16 x 32000 logits, 32 counting passes take 5."""
    logits = logits.astype(jnp.float32) / _per_row(temperature, logits)
    if top_k is not None:
        k = _per_row(top_k, logits)
        # The k-th largest: the largest t with at least k logits >= t.
        kth = _bisect(_order(logits), lambda t: jnp.sum(_order(logits) >= t, axis=-1, keepdims=True) >= k)
        logits = jnp.where((k > 0) & (_order(logits) < kth), -jnp.inf, logits)
    if top_p is not None:
        p = _per_row(top_p, logits)
        probs = jax.nn.softmax(logits, axis=-1)
        # A token stays if the tokens above it hold less than p: keys >= the least t where
        # the probability above t is under p (the largest t where it is not, plus one).
        last_short = _bisect(_order(logits), lambda t: jnp.sum(jnp.where(_order(logits) > t, probs, 0.0), axis=-1,
                                                                 keepdims=True) >= p)
        logits = jnp.where((p > 0) & (_order(logits) <= last_short), -jnp.inf, logits)
    return logits


def _per_row(value, logits: jax.Array) -> jax.Array:
    """value as a column [B, 1] (or [1, 1]) against logits [B, V]."""
    value = jnp.asarray(value)
    return value.reshape(-1, 1) if value.ndim else value.reshape(1, 1)


def _order(x: jax.Array) -> jax.Array:
    """int32 keys in the order of the floats x (so a bisection over them is exact)."""
    bits = jax.lax.bitcast_convert_type(x, jnp.int32)
    return jnp.where(bits < 0, bits ^ 0x7FFFFFFF, bits)


def _bisect(keys: jax.Array, holds) -> jax.Array:
    """Per row [B, 1], the largest int32 t for which holds(t) (true at the least int32 and
    false from some t on), in 32 halvings."""
    lo = jnp.full((keys.shape[0], 1), jnp.iinfo(jnp.int32).min, jnp.int32)
    hi = jnp.full((keys.shape[0], 1), jnp.iinfo(jnp.int32).max, jnp.int32)

    def halve(_, bounds):
        lo, hi = bounds
        mid = (lo >> 1) + (hi >> 1) + (lo & hi & 1)  # floor((lo + hi) / 2) without overflow
        ok = holds(mid)
        return jnp.where(ok, mid, lo), jnp.where(ok, hi, mid)

    return jax.lax.fori_loop(0, 32, halve, (lo, hi))[0]


def sample_logits(logits: jax.Array, key: jax.Array, sampler: Sampler) -> jax.Array:
    """logits [B, V] -> tokens [B] int32, as sampler says."""
    if sampler.temperature == 0.0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    filtered = filter_logits(logits, sampler.temperature, sampler.top_k, sampler.top_p)
    return jax.random.categorical(key, filtered, axis=-1).astype(jnp.int32)


def _chunk_positions(start: jax.Array, chunk: int, lengths: jax.Array) -> jax.Array:
    """[B, chunk] positions start..start+chunk-1, -1 past each row's length."""
    positions = start + jnp.arange(chunk, dtype=jnp.int32)[None, :]
    return jnp.where(positions < lengths[:, None], positions, -1)


def prefill(params, config: MistralConfig, prompts: jax.Array, lengths: jax.Array, cache: KVCache,
            chunk: int, images: ImageFeatures | None = None) -> tuple[jax.Array, KVCache]:
    """Runs prompts [B, P] (right-padded, P a multiple of chunk) through the model `chunk`
    tokens at a time, as far as the longest prompt, each chunk's image tokens taking their
    images' embeddings (images.index [B, P]). Returns the logits [B, V] at each row's last
    prompt token and the filled cache."""
    model = Mistral(config)
    B = prompts.shape[0]

    def body(i, carry):
        last_logits, cache = carry
        start = i * chunk
        tokens = jax.lax.dynamic_slice_in_dim(prompts, start, chunk, axis=1)
        index = lengths - 1 - start  # each row's last token, if it lies in this chunk
        chunk_images = None if images is None else images._replace(
            index=jax.lax.dynamic_slice_in_dim(images.index, start, chunk, axis=1))
        logits, cache = model.apply({"params": params}, tokens, _chunk_positions(start, chunk, lengths), cache,
                                    logits_at=jnp.clip(index, 0, chunk - 1), images=chunk_images)
        in_chunk = ((index >= 0) & (index < chunk))[:, None]
        return jnp.where(in_chunk, logits[:, 0], last_logits), cache

    n_chunks = (jnp.max(lengths) + chunk - 1) // chunk
    init = (jnp.zeros((B, config.vocab_size), jnp.float32), cache)
    return jax.lax.fori_loop(0, n_chunks, body, init)


def empty_cache(config: MistralConfig, batch: int, max_len: int, mesh: Mesh | None = None) -> KVCache:
    """KVCache.init, born sharded over mesh (KVCache.shardings) when there is one; inside jit."""
    cache = KVCache.init(config, batch, max_len)
    return cache if mesh is None else jax.lax.with_sharding_constraint(cache, cache.shardings(mesh))


@functools.partial(jax.jit, static_argnames=("config", "sampler", "eos_id", "chunk", "max_tokens", "mesh"))
def start(params, config: MistralConfig, prompts: jax.Array, lengths: jax.Array, key: jax.Array, *,
          sampler: Sampler, eos_id: int, chunk: int, max_tokens: int, mesh: Mesh | None = None,
          images: ImageFeatures | None = None) -> SamplingState:
    """Prefills the prompts (with their images' embeddings) and samples the first token;
    max_tokens is the output bucket. With a mesh, the cache is born sharded over it
    (KVCache.shardings)."""
    B, P = prompts.shape
    cache = empty_cache(config, B, P + max_tokens, mesh)
    logits, cache = prefill(params, config, prompts, lengths, cache, chunk, images)
    first = sample_logits(logits, jax.random.fold_in(key, 0), sampler)
    tokens = jnp.zeros((B, max_tokens), jnp.int32).at[:, 0].set(first)
    return SamplingState(cache=cache, tokens=tokens, last=first, position=lengths.astype(jnp.int32),
                         done=first == eos_id, step=jnp.array(1, jnp.int32), key=key)


@functools.partial(jax.jit, static_argnames=("config", "sampler", "eos_id"), donate_argnames=("state",))
def decode(params, config: MistralConfig, state: SamplingState, until_step: jax.Array, *, sampler: Sampler,
           eos_id: int) -> SamplingState:
    """Generates tokens until state.step reaches until_step or every row is done, in one
    compiled loop; state is donated."""
    model = Mistral(config)
    until_step = jnp.minimum(until_step, state.tokens.shape[1])

    def cond(s: SamplingState):
        return (s.step < until_step) & ~jnp.all(s.done)

    def body(s: SamplingState) -> SamplingState:
        logits, cache = model.apply({"params": params}, s.last[:, None], s.position[:, None], s.cache)
        token = sample_logits(logits[:, 0], jax.random.fold_in(s.key, s.step), sampler)
        token = jnp.where(s.done, eos_id, token)
        return SamplingState(cache=cache, tokens=s.tokens.at[:, s.step].set(token), last=token,
                             position=s.position + 1, done=s.done | (token == eos_id), step=s.step + 1, key=s.key)

    return jax.lax.while_loop(cond, body, state)


@functools.partial(jax.jit, static_argnames="config")
def image_embeddings(vision_params, config: MistralConfig, images: list[jax.Array]) -> jax.Array:
    """The embeddings [M, D] of the image tokens of images (arrays [C, H, W], in token order):
    the vision encoder and projector (params["vision"]), run once for a whole prompt (compiled
    per set of sizes)."""
    return VisionTower(config).apply({"params": vision_params}, images)


def prompt_images(config: MistralConfig, params, tokens: np.ndarray, images) -> ImageFeatures | None:
    """The ImageFeatures of prompts tokens [B, P] (laid out for prefill) from images, a list per
    prompt of arrays [C, H, W] (None: no images at all); ValueError where they do not fit."""
    if images is None:
        return None
    if config.vision is None:
        raise ValueError("images given to a model without a vision encoder (config.vision is None)")
    if isinstance(images, (str, bytes, np.ndarray)) or not isinstance(images, Sequence) or len(images) != len(tokens):
        raise ValueError(f"images must be a list per prompt ({len(tokens)}) of lists of arrays [C, H, W]")
    flat = []
    for i, row in enumerate(images):
        if isinstance(row, (str, bytes, np.ndarray)) or not isinstance(row, Sequence):
            raise ValueError(f"images[{i}] must be a list of arrays [C, H, W] (empty for none)")
        flat.extend(np.asarray(image, np.float32) for image in row)
    if not flat:
        return None
    embeddings = image_embeddings(params["vision"], config, flat)
    return ImageFeatures(embeddings, token_index(config, tokens, embeddings.shape[0]))


def decoding_layout(config: MistralConfig, params, mesh: Mesh | None = None) -> tuple[MistralConfig, dict]:
    """The (config, params) to decode with: per layer where platforms.decode_per_layer says
    so and the params are stacked (views of them on CPU, nothing copied), else as given."""
    if config.scan_layers and platforms.decode_per_layer(platforms.decode_platform(mesh)):
        return unstack_layers(config, params)
    return config, params


def chunk_size(config: MistralConfig, longest: int, limit: int = PREFILL_CHUNK) -> int:
    """Prefill chunk for prompts of up to `longest` tokens: at most `limit` and the smallest
    window (a chunk must not wrap a rolling cache onto itself)."""
    return min(limit, *(w for w in config.window_kinds if w is not None), bucket(longest))


def prompt_layout(config: MistralConfig, longest: int, limit: int = PREFILL_CHUNK) -> tuple[int, int]:
    """(chunk, padded length) of a prefill of prompts of up to `longest` tokens: chunk_size's
    chunk and a power of two of chunks, the lengths that share one compiled program."""
    chunk = chunk_size(config, longest, limit)
    return chunk, chunk * bucket(-(-longest // chunk))


def bucket(n: int) -> int:
    """Next power of two: the padded lengths that share one compiled program."""
    return 1 << max(0, (n - 1).bit_length())


def _validate(config: MistralConfig, prompts, max_new_tokens, sampler: Sampler, seed) -> None:
    """A ValueError (TypeError for a wrong type) naming the first bad argument of generate;
    the compiled loop would otherwise clamp ids, allocate without bound or fail in XLA's words."""
    if isinstance(prompts, (str, bytes, np.ndarray)) or not isinstance(prompts, Sequence):
        raise TypeError(f"prompts must be a list of token-id lists, got {type(prompts).__name__}")
    if not prompts:
        raise ValueError("no prompts given")
    if not _is_int(max_new_tokens) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be a positive integer, got {max_new_tokens!r}")
    if not _is_int(seed) or not 0 <= seed < 2**63:
        raise ValueError(f"seed must be an integer in [0, 2**63), got {seed!r}")
    for i, prompt in enumerate(prompts):
        if isinstance(prompt, (str, bytes)) or not isinstance(prompt, (Sequence, np.ndarray)):
            raise TypeError(f"prompts[{i}] must be a list of token ids, got {type(prompt).__name__}")
        if len(prompt) == 0:
            raise ValueError(f"prompts[{i}] is empty")
        if not all(map(_is_int, prompt)):
            raise TypeError(f"prompts[{i}] must hold integer token ids")
        if min(prompt) < 0 or max(prompt) >= config.vocab_size:
            raise ValueError(f"prompts[{i}] has token ids outside [0, {config.vocab_size})")
        if len(prompt) + max_new_tokens > config.max_seq_len:
            raise ValueError(f"prompts[{i}] has {len(prompt)} tokens: with max_new_tokens {max_new_tokens} that is "
                             f"more than the model's max_seq_len {config.max_seq_len}")
    if sampler.top_k is not None and sampler.top_k > config.vocab_size:
        raise ValueError(f"top_k must be in [1, {config.vocab_size}], got {sampler.top_k}")


def generate_stream(config: MistralConfig, params, prompts: Sequence[Sequence[int]], max_new_tokens: int, *,
                    sampler: Sampler = Sampler(), seed: int = 0, eos_id: int | None = 2,
                    steps_per_call: int | None = None, prefill_chunk: int = PREFILL_CHUNK,
                    mesh: Mesh | None = None, images=None) -> Iterator[np.ndarray]:
    """Like generate, but yields the tokens [B, n] generated by each compiled call of
    steps_per_call decode steps (default: all at once), the first yield holding the first
    token. Rows that are done carry eos_id (or 0 without one)."""
    _validate(config, prompts, max_new_tokens, sampler, seed)
    config, params = decoding_layout(config, params, mesh)
    longest = max(len(p) for p in prompts)
    chunk, padded_len = prompt_layout(config, longest, prefill_chunk)
    tokens = np.zeros((len(prompts), padded_len), np.int32)
    for row, prompt in enumerate(prompts):
        tokens[row, :len(prompt)] = prompt
    lengths = np.array([len(p) for p in prompts], np.int32)
    eos_id = -1 if eos_id is None else eos_id
    features = prompt_images(config, params, tokens, images)

    state = start(params, config, tokens, lengths, jax.random.key(seed), sampler=sampler, eos_id=eos_id,
                  chunk=chunk, max_tokens=bucket(max_new_tokens), mesh=mesh, images=features)
    emitted = 0
    while True:
        tokens, step, done = fetch(state.tokens, state.step, state.done)  # one host sync per call
        yield tokens[:, emitted:step]
        emitted = int(step)
        if emitted >= max_new_tokens or done.all():
            return
        until = min(max_new_tokens, step + (steps_per_call or max_new_tokens))
        state = decode(params, config, state, jnp.array(until, jnp.int32), sampler=sampler, eos_id=eos_id)


def generate(config: MistralConfig, params, prompts: Sequence[Sequence[int]], max_new_tokens: int, *,
             temperature: float = 0.0, top_k: int | None = None, top_p: float | None = None, seed: int = 0,
             eos_id: int | None = 2, mesh: Mesh | None = None, images=None) -> list[list[int]]:
    """Generates up to max_new_tokens after each prompt, in one batch.

    Args:
      config, params: the model, e.g. from load_checkpoint or load_pytorch. On CPU, stacked
        params are decoded over per-layer views of them (decoding_layout; nothing is copied).
      prompts: token ids per prompt, of any lengths (BOS included if the model expects it).
      max_new_tokens: the most tokens generated per prompt.
      temperature: 0 for greedy decoding; otherwise logits are divided by it and sampled.
      top_k, top_p: keep only the k most likely tokens / the smallest set reaching
        probability p (applied in that order); None to disable.
      seed: the PRNG seed; the same seed gives the same samples.
      eos_id: a row stops after emitting it (None: never stop early).
      mesh: the mesh params are sharded over, if any: the KV cache is then sharded over it
        too (KVCache.shardings) rather than left to the compiler. The mesh may span
        processes; every process then calls generate, with the same arguments.
      images: with a vision encoder (config.vision), per prompt the list of its images
        (float32 [C, H, W], as Tokenizer.encode_multimodal_chat gives them with the prompt's
        ids), in the order of their image tokens; an empty list for a prompt without.

    Returns:
      The generated tokens of each prompt, stopping before eos_id.
    """
    sampler = Sampler(temperature, top_k, top_p)
    pieces = list(generate_stream(config, params, prompts, max_new_tokens, sampler=sampler, seed=seed,
                                  eos_id=eos_id, mesh=mesh, images=images))
    out = np.concatenate(pieces, axis=1)[:, :max_new_tokens]
    return [until_eos(row, eos_id) for row in out.tolist()]


def until_eos(tokens: list[int], eos_id: int | None) -> list[int]:
    """The tokens before the first eos_id."""
    return tokens[:tokens.index(eos_id)] if eos_id in tokens else tokens
