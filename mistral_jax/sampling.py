"""Sampling: logits -> token, chunked prefill into the rolling cache, a compiled decode loop.

Everything per token happens inside one `jax.lax.while_loop` whose carry (SamplingState)
holds the cache, positions, PRNG key and output buffer: no host round trip per token.
Params are arguments, never closed over. Prompt and output lengths are padded to buckets,
and the true lengths are traced values, so a new prompt length within a bucket does not
recompile.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator, Sequence

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh

from mistral_jax.cache import KVCache
from mistral_jax.config import MistralConfig
from mistral_jax.model import Mistral, layers_stacked
from mistral_jax.sharding import cache_shardings

PREFILL_CHUNK = 512  # prompt tokens per prefill step (at most the window)


@flax.struct.dataclass
class SamplingState:
    cache: KVCache
    tokens: jax.Array  # [B, N] int32: generated tokens; N is the output bucket
    last: jax.Array  # [B] int32: the token to feed next
    position: jax.Array  # [B] int32: its position
    done: jax.Array  # [B] bool: the row has emitted eos
    step: jax.Array  # [] int32: tokens generated so far
    key: jax.Array


def filter_logits(logits: jax.Array, temperature: float, top_k: int | None = None,
                  top_p: float | None = None) -> jax.Array:
    """logits [B, V] / temperature, with -inf outside the top_k, then outside the smallest set
    of tokens whose probability reaches top_p (the most likely token always stays)."""
    logits = logits.astype(jnp.float32) / temperature
    if top_k is not None:
        kth_largest = jax.lax.top_k(logits, top_k)[0][:, -1:]
        logits = jnp.where(logits < kth_largest, -jnp.inf, logits)
    if top_p is not None:
        sorted_logits = -jnp.sort(-logits, axis=-1)
        probs = jax.nn.softmax(sorted_logits, axis=-1)
        keep = jnp.cumsum(probs, axis=-1) - probs < top_p
        threshold = jnp.min(jnp.where(keep, sorted_logits, jnp.inf), axis=-1, keepdims=True)
        logits = jnp.where(logits < threshold, -jnp.inf, logits)
    return logits


def sample_logits(logits: jax.Array, key: jax.Array, temperature: float = 0.0, top_k: int | None = None,
                  top_p: float | None = None) -> jax.Array:
    """logits [B, V] -> tokens [B] int32: greedy at temperature 0, else sampled from
    filter_logits(...)."""
    if temperature == 0.0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    filtered = filter_logits(logits, temperature, top_k, top_p)
    return jax.random.categorical(key, filtered, axis=-1).astype(jnp.int32)


def _chunk_positions(start: jax.Array, chunk: int, lengths: jax.Array) -> jax.Array:
    """[B, chunk] positions start..start+chunk-1, -1 past each row's length."""
    positions = start + jnp.arange(chunk, dtype=jnp.int32)[None, :]
    return jnp.where(positions < lengths[:, None], positions, -1)


@functools.partial(jax.jit, static_argnames=("config", "chunk"))
def prefill(params, config: MistralConfig, prompts: jax.Array, lengths: jax.Array, cache: KVCache,
            chunk: int) -> tuple[jax.Array, KVCache]:
    """Runs prompts [B, P] (right-padded, P a multiple of chunk) through the model `chunk`
    tokens at a time, as far as the longest prompt. Returns the logits [B, V] at each row's
    last prompt token and the filled cache."""
    model = Mistral(config, scan_layers=layers_stacked(params))
    B = prompts.shape[0]

    def body(i, carry):
        last_logits, cache = carry
        start = i * chunk
        tokens = jax.lax.dynamic_slice_in_dim(prompts, start, chunk, axis=1)
        index = lengths - 1 - start  # each row's last token, if it lies in this chunk
        logits, cache = model.apply({"params": params}, tokens, _chunk_positions(start, chunk, lengths), cache,
                                    logits_at=jnp.clip(index, 0, chunk - 1))
        in_chunk = ((index >= 0) & (index < chunk))[:, None]
        return jnp.where(in_chunk, logits[:, 0], last_logits), cache

    n_chunks = (jnp.max(lengths) + chunk - 1) // chunk
    init = (jnp.zeros((B, config.vocab_size), jnp.float32), cache)
    return jax.lax.fori_loop(0, n_chunks, body, init)


@functools.partial(jax.jit, static_argnames=("config", "chunk", "max_tokens", "temperature", "top_k", "top_p",
                                             "eos_id", "mesh"))
def start(params, config: MistralConfig, prompts: jax.Array, lengths: jax.Array, key: jax.Array, *, chunk: int,
          max_tokens: int, temperature: float, top_k: int | None, top_p: float | None,
          eos_id: int, mesh: Mesh | None = None) -> SamplingState:
    """Prefills the prompts and samples the first token; max_tokens is the output bucket.
    With a mesh, the cache is born sharded over it (cache_shardings)."""
    B, P = prompts.shape
    cache = KVCache.init(config, B, P + max_tokens, stacked=layers_stacked(params))
    if mesh is not None:
        cache = jax.lax.with_sharding_constraint(cache, cache_shardings(mesh, cache))
    logits, cache = prefill(params, config, prompts, lengths, cache, chunk)
    first = sample_logits(logits, jax.random.fold_in(key, 0), temperature, top_k, top_p)
    tokens = jnp.zeros((B, max_tokens), jnp.int32).at[:, 0].set(first)
    return SamplingState(cache=cache, tokens=tokens, last=first, position=lengths.astype(jnp.int32),
                         done=first == eos_id, step=jnp.array(1, jnp.int32), key=key)


def _decode_loop(params, config: MistralConfig, state: SamplingState, until_step: jax.Array, *, temperature: float,
                 top_k: int | None, top_p: float | None, eos_id: int) -> SamplingState:
    model = Mistral(config, scan_layers=layers_stacked(params))
    until_step = jnp.minimum(until_step, state.tokens.shape[1])

    def cond(s: SamplingState):
        return (s.step < until_step) & ~jnp.all(s.done)

    def body(s: SamplingState) -> SamplingState:
        logits, cache = model.apply({"params": params}, s.last[:, None], s.position[:, None], s.cache)
        token = sample_logits(logits[:, 0], jax.random.fold_in(s.key, s.step), temperature, top_k, top_p)
        token = jnp.where(s.done, eos_id, token)
        return SamplingState(cache=cache, tokens=s.tokens.at[:, s.step].set(token), last=token,
                             position=s.position + 1, done=s.done | (token == eos_id), step=s.step + 1, key=s.key)

    return jax.lax.while_loop(cond, body, state)


# A decode step multiplies [rows, D] activations by every weight. XLA:CPU hands those products
# to YNNPACK, whose kernels are slow for few rows: on this project's 2-core AMD EPYC, chains
# of the benchmark configs' products ran 1.0-2.6x faster with 1-48 rows in XLA's Eigen
# kernels, and from 64 rows up neither won throughout; small's decode step at batch 8 took
# 1.29-1.36x less time (`python -m bench.few_rows`, BENCHMARKS.md). So on CPU, decode of
# fewer rows per device than FEW_ROWS is compiled without YNNPACK fusions.
FEW_ROWS = 64
_jit_decode = functools.partial(jax.jit, static_argnames=("config", "temperature", "top_k", "top_p", "eos_id"),
                                donate_argnames=("state",))
decode_loop = _jit_decode(_decode_loop)
decode_loop_few_rows_cpu = _jit_decode(_decode_loop, compiler_options={"xla_cpu_experimental_ynn_fusion_type": ""})


def decode_program(state: SamplingState):
    """The jitted decode loop for state's rows per device and platform: decode_loop_few_rows_cpu
    or decode_loop."""
    sharding = getattr(state.last, "sharding", None)
    if sharding is None:  # an abstract state without a sharding: default device, whole batch
        platform, rows = jax.default_backend(), state.last.shape[0]
    else:
        platform, rows = next(iter(sharding.device_set)).platform, sharding.shard_shape(state.last.shape)[0]
    return decode_loop_few_rows_cpu if platform == "cpu" and rows < FEW_ROWS else decode_loop


def decode(params, config: MistralConfig, state: SamplingState, until_step: jax.Array, *, temperature: float,
           top_k: int | None, top_p: float | None, eos_id: int) -> SamplingState:
    """Generates tokens until state.step reaches until_step or every row is done, in one
    compiled call (decode_program(state)); state is donated."""
    program = decode_program(state)
    return program(params, config, state, until_step, temperature=temperature, top_k=top_k, top_p=top_p, eos_id=eos_id)


def chunk_size(config: MistralConfig, longest: int, limit: int = PREFILL_CHUNK) -> int:
    """Prefill chunk for prompts of up to `longest` tokens: at most `limit` and the window."""
    return min(limit, config.sliding_window or limit, _bucket(longest))


def _bucket(n: int) -> int:
    """Next power of two: the padded lengths that share one compiled program."""
    return 1 << max(0, (n - 1).bit_length())


def _validate(config: MistralConfig, prompts, max_new_tokens, temperature, top_k, top_p) -> None:
    if not prompts:
        raise ValueError("no prompts given")
    for i, prompt in enumerate(prompts):
        if len(prompt) == 0:
            raise ValueError(f"prompts[{i}] is empty")
        if len(prompt) > config.max_seq_len:
            raise ValueError(f"prompts[{i}] has {len(prompt)} tokens, more than the model's max_seq_len "
                             f"{config.max_seq_len}")
        if min(prompt) < 0 or max(prompt) >= config.vocab_size:
            raise ValueError(f"prompts[{i}] has token ids outside [0, {config.vocab_size})")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if top_k is not None and not 1 <= top_k <= config.vocab_size:
        raise ValueError(f"top_k must be in [1, {config.vocab_size}], got {top_k}")
    if top_p is not None and not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")


def generate_stream(config: MistralConfig, params, prompts: Sequence[Sequence[int]], max_new_tokens: int, *,
                    temperature: float = 0.0, top_k: int | None = None, top_p: float | None = None,
                    seed: int = 0, eos_id: int | None = 2, steps_per_call: int | None = None,
                    prefill_chunk: int = PREFILL_CHUNK, mesh: Mesh | None = None) -> Iterator[np.ndarray]:
    """Like generate, but yields the tokens [B, n] generated by each compiled call of
    steps_per_call decode steps (default: all at once), the first yield holding the first
    token. Rows that are done carry eos_id (or 0 without one)."""
    _validate(config, prompts, max_new_tokens, temperature, top_k, top_p)
    longest = max(len(p) for p in prompts)
    chunk = chunk_size(config, longest, prefill_chunk)
    padded_len = chunk * _bucket(-(-longest // chunk))
    tokens = np.zeros((len(prompts), padded_len), np.int32)
    for row, prompt in enumerate(prompts):
        tokens[row, :len(prompt)] = prompt
    lengths = np.array([len(p) for p in prompts], np.int32)
    sampling = dict(temperature=float(temperature), top_k=top_k, top_p=top_p,
                    eos_id=-1 if eos_id is None else eos_id)

    state = start(params, config, tokens, lengths, jax.random.key(seed), chunk=chunk,
                  max_tokens=_bucket(max_new_tokens), mesh=mesh, **sampling)
    emitted = 0
    while True:
        tokens, step, done = _fetch(state.tokens, state.step, state.done)  # one host sync per call
        yield tokens[:, emitted:step]
        emitted = int(step)
        if emitted >= max_new_tokens or done.all():
            return
        until = min(max_new_tokens, step + (steps_per_call or max_new_tokens))
        state = decode(params, config, state, jnp.array(until, jnp.int32), **sampling)


def _fetch(*arrays: jax.Array) -> tuple[np.ndarray, ...]:
    """Host copies, whole, also of arrays spread over other processes' devices (then a
    collective: every process must fetch, as every process runs the computation)."""
    if all(a.is_fully_addressable for a in arrays):
        return jax.device_get(arrays)
    return tuple(multihost_utils.process_allgather(arrays, tiled=True))


def generate(config: MistralConfig, params, prompts: Sequence[Sequence[int]], max_new_tokens: int, *,
             temperature: float = 0.0, top_k: int | None = None, top_p: float | None = None, seed: int = 0,
             eos_id: int | None = 2, mesh: Mesh | None = None) -> list[list[int]]:
    """Generates up to max_new_tokens after each prompt, in one batch.

    Args:
      config, params: the model, e.g. from load_checkpoint or load_pytorch; params stacked
        as loaded, or per layer (model.unstack_layers), which decodes faster on CPU.
      prompts: token ids per prompt, of any lengths (BOS included if the model expects it).
      max_new_tokens: the most tokens generated per prompt.
      temperature: 0 for greedy decoding; otherwise logits are divided by it and sampled.
      top_k, top_p: keep only the k most likely tokens / the smallest set reaching
        probability p (applied in that order); None to disable.
      seed: the PRNG seed; the same seed gives the same samples.
      eos_id: a row stops after emitting it (None: never stop early).
      mesh: the mesh params are sharded over, if any: the KV cache is then sharded over it
        too (sharding.cache_shardings) rather than left to the compiler. The mesh may span
        processes; every process then calls generate, with the same arguments.

    Returns:
      The generated tokens of each prompt, stopping before eos_id.
    """
    pieces = list(generate_stream(config, params, prompts, max_new_tokens, temperature=temperature,
                                  top_k=top_k, top_p=top_p, seed=seed, eos_id=eos_id, mesh=mesh))
    out = np.concatenate(pieces, axis=1)[:, :max_new_tokens]
    return [until_eos(row, eos_id) for row in out.tolist()]


def until_eos(tokens: list[int], eos_id: int | None) -> list[int]:
    """The tokens before the first eos_id."""
    return tokens[:tokens.index(eos_id)] if eos_id in tokens else tokens
