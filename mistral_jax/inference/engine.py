"""Continuous batching: requests come and go through a fixed number of slots of one batched
rolling cache (JetStream's prefill / insert / generate split).

Two compiled programs:
- `admit` prefills a batch of new prompts (chunked, as generate does) into a fresh cache of
  their own and writes its rows into free slots of the batched one, sampling each first token;
- `advance` runs `steps_per_call` decode steps of the busy slots, gathered and padded to a
  power of two (or all slots in place); a free or finished slot feeds position -1 (padding:
  nothing written, nothing attended).
Their shapes depend only on how many requests there are, in buckets, never on which slots
they hold: Engine.compile compiles advance for every bucket before requests come; admit
compiles once per bucket of batch and prompt length, as it first meets one.

A request's tokens do not depend on its neighbours: each slot samples with its own settings
and its own key, fold_in(key(seed), i) for its i-th token, as generate() does for one prompt,
so greedy and seeded runs give what generate() gives for the request alone.

The Engine is driven by one thread (`run`, or `step` in a loop); `submit`, and setting a
request's `cancelled`, may be done from any thread. Tokens go back through each request's `emit` callback, on the
engine's thread.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import threading
from collections.abc import Callable

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from mistral_jax.inference.sampling import (PREFILL_CHUNK, Sampler, bucket, decoding_layout, empty_cache,
                                            filter_logits, image_embeddings, prefill, prompt_layout)
from mistral_jax.model.cache import KVCache
from mistral_jax.model.config import MistralConfig
from mistral_jax.model.transformer import Mistral
from mistral_jax.model.vision import ImageFeatures, check_image_tokens, image_tokens, token_index

FREE = -1  # SlotState.position of a slot with no request
PREFILL_BUDGET = 2 * PREFILL_CHUNK  # prompt tokens (padded) admitted at most between two decode calls


@flax.struct.dataclass
class SlotState:
    """What the device holds per slot, S slots."""

    cache: KVCache  # S rows
    last: jax.Array  # [S] int32: the token to feed next
    position: jax.Array  # [S] int32: its position
    count: jax.Array  # [S] int32: tokens the slot's request has generated (its next key index)
    budget: jax.Array  # [S] int32: the most tokens it may generate
    live: jax.Array  # [S] bool: decoding (busy, not finished)
    keys: jax.Array  # [S] PRNG keys, key(seed) of each request
    temperature: jax.Array  # [S] float32, 0 greedy
    top_k: jax.Array  # [S] int32, 0 off
    top_p: jax.Array  # [S] float32, 0 off


@dataclasses.dataclass
class Request:
    """A prompt and how to continue it. `emit(tokens, finish)` receives the new tokens (eos
    excluded) after each engine step, with finish None while it runs, then "stop" (eos) or
    "length" (max_tokens reached); it returns False to end the request there (a stop string
    was seen, the client left). Its tokens are drawn with key(seed), greedy at temperature 0.
    With a vision encoder, `images` (float32 [C, H, W], Tokenizer.encode_multimodal_chat's)
    fill the prompt's image tokens, in order."""

    prompt: list[int]
    max_tokens: int
    emit: Callable[[list[int], str | None], bool]
    sampler: Sampler = Sampler()
    seed: int = 0
    cancelled: bool = False
    generated: int = 0
    images: list[np.ndarray] = dataclasses.field(default_factory=list)


def choose(logits: jax.Array, keys: jax.Array, temperature: jax.Array, top_k: jax.Array,
           top_p: jax.Array) -> jax.Array:
    """sampling.sample_logits with settings per row: logits [B, V] -> tokens [B]. A row's token
    is the one sample_logits gives that row alone with Sampler(temperature, top_k or None,
    top_p or None) and its key: the same filter_logits on the same values, a draw per row."""
    greedy = jnp.argmax(logits, axis=-1).astype(jnp.int32)

    def sampled():
        scale = jnp.where(temperature > 0, temperature, 1.0)
        cut = jnp.any((top_k > 0) | (top_p > 0))  # a row without cuts is left as filter_logits leaves it
        x = jax.lax.cond(cut, lambda: filter_logits(logits, scale, top_k, top_p), lambda: filter_logits(logits, scale))
        # One row at a time as generate draws it for a batch of one: the same noise.
        draw = jax.vmap(lambda key, row: jax.random.categorical(key, row[None], axis=-1)[0])(keys, x)
        return jnp.where(temperature > 0, draw.astype(jnp.int32), greedy)

    return jax.lax.cond(jnp.any(temperature > 0), sampled, lambda: greedy)


def _batch_axis(x: jax.Array, path) -> int:
    """The slot axis of a SlotState leaf: k and v are [..., S, C, K, d], the rest [S, ...]."""
    return x.ndim - 4 if len(path) > 1 and path[0].name == "cache" and path[1].name in ("k", "v") else 0


def put_rows(state, rows: jax.Array, new):
    """state (a SlotState or KVCache) with new's rows written at slots rows (S: dropped)."""
    def put(path, big, small):
        index = (slice(None),) * _batch_axis(big, path) + (rows,)
        return big.at[index].set(small if small.dtype == big.dtype else small.astype(big.dtype), mode="drop")
    return jax.tree_util.tree_map_with_path(put, state, new)


def take_rows(state: SlotState, rows: jax.Array) -> SlotState:
    """The slots rows of state (S: a copy of the last slot, to be dropped by put_rows)."""
    rows = jnp.minimum(rows, state.last.shape[0] - 1)
    return jax.tree_util.tree_map_with_path(lambda path, x: jnp.take(x, rows, axis=_batch_axis(x, path)), state)


@functools.partial(jax.jit, static_argnames=("config", "slots", "max_len", "mesh"))
def empty_slots(config: MistralConfig, *, slots: int, max_len: int, mesh: Mesh | None = None) -> SlotState:
    """Every slot free, its cache empty (sharded over mesh as KVCache.shardings says)."""
    cache = empty_cache(config, slots, max_len, mesh)
    zeros = jnp.zeros((slots,), jnp.int32)
    return SlotState(cache=cache, last=zeros, position=zeros + FREE, count=zeros, budget=zeros,
                     live=jnp.zeros((slots,), bool), keys=jax.random.split(jax.random.key(0), slots),
                     temperature=jnp.zeros((slots,), jnp.float32), top_k=zeros,
                     top_p=jnp.zeros((slots,), jnp.float32))


@functools.partial(jax.jit, static_argnames=("config", "max_len", "chunk", "eos_id", "mesh"),
                   donate_argnames=("state",))
def admit(params, config: MistralConfig, state: SlotState, prompts: jax.Array, lengths: jax.Array,
          rows: jax.Array, seeds: jax.Array, budget: jax.Array, temperature: jax.Array, top_k: jax.Array,
          top_p: jax.Array, *, max_len: int, chunk: int, eos_id: int, mesh: Mesh | None = None,
          images: ImageFeatures | None = None) -> tuple[SlotState, jax.Array]:
    """Prefills prompts [b, P] (right-padded to a multiple of chunk; rows of length 0 are
    padding; their image tokens taking images' embeddings) into slots `rows` [b] (S for a
    padding row) and samples each first token [b]."""
    cache = empty_cache(config, prompts.shape[0], max_len, mesh)
    logits, cache = prefill(params, config, prompts, lengths, cache, chunk, images)
    keys = jax.random.wrap_key_data(seeds)
    first = choose(logits, jax.vmap(jax.random.fold_in, (0, None))(keys, 0), temperature, top_k, top_p)

    new = SlotState(cache=cache, last=first, position=lengths, count=jnp.ones_like(lengths), budget=budget,
                    live=(first != eos_id) & (budget > 1), keys=keys, temperature=temperature, top_k=top_k, top_p=top_p)
    return put_rows(state, rows, new), first


@functools.partial(jax.jit, static_argnames=("config", "steps", "eos_id"), donate_argnames=("state",))
def advance(params, config: MistralConfig, state: SlotState, rows: jax.Array, *, steps: int,
            eos_id: int) -> tuple[SlotState, jax.Array]:
    """Up to `steps` decode steps of the live slots among rows [b] (S pads; b = S: every slot in
    order, the slots not listed given S). Returns the state and the tokens [b, steps] of each
    row, -1 where it generated none. A b below S decodes only those rows (gathered, then put
    back): a step's work follows the busy slots, one program per b."""
    model = Mistral(config)
    S, b = state.last.shape[0], rows.shape[0]
    active = take_rows(state, rows) if b < S else state
    active = active.replace(live=active.live & (rows < S))

    def cond(carry):
        i, s, _ = carry
        return (i < steps) & jnp.any(s.live)

    def body(carry):
        i, s, out = carry
        logits, cache = model.apply({"params": params}, s.last[:, None], jnp.where(s.live, s.position, FREE)[:, None],
                                    s.cache)
        keys = jax.vmap(jax.random.fold_in)(s.keys, s.count)
        token = choose(logits[:, 0], keys, s.temperature, s.top_k, s.top_p)
        count = s.count + s.live
        finished = s.live & ((token == eos_id) | (count >= s.budget))
        s = s.replace(cache=cache, last=jnp.where(s.live, token, s.last), position=s.position + s.live,
                      count=count, live=s.live & ~finished)
        return i + 1, s, out.at[:, i].set(jnp.where(carry[1].live, token, -1))

    _, active, out = jax.lax.while_loop(cond, body, (0, active, jnp.full((b, steps), -1, jnp.int32)))
    return (put_rows(state, rows, active) if b < S else active), out


class Engine:
    """Continuous batching over `slots` rows of one rolling cache of `max_len` tokens each (a
    request needs len(prompt) + max_tokens <= max_len). Requests are admitted between decode
    calls of `steps_per_call` steps, in order, as many at once as there are free slots and as
    fit in prefill_budget tokens (padded; the first always goes in): the budget bounds how long
    an admission holds up the requests decoding, and how long a burst's first arrivals wait for
    the last ones' prefill."""

    def __init__(self, config: MistralConfig, params, *, slots: int = 8, max_len: int | None = None,
                 steps_per_call: int = 4, eos_id: int | None = 2, prefill_chunk: int = PREFILL_CHUNK,
                 prefill_budget: int = PREFILL_BUDGET, mesh: Mesh | None = None):
        max_len = config.max_seq_len if max_len is None else max_len
        if not 2 <= max_len <= config.max_seq_len:
            raise ValueError(f"max_len must be in [2, the model's max_seq_len {config.max_seq_len}], got {max_len}")
        if min(slots, steps_per_call, prefill_budget) < 1:
            raise ValueError(f"slots, steps_per_call and prefill_budget must be positive, got {slots}, "
                             f"{steps_per_call} and {prefill_budget}")
        self.config, self.params = decoding_layout(config, params, mesh)
        self.slots, self.max_len, self.steps_per_call = slots, max_len, steps_per_call
        self.eos_id, self.prefill_chunk, self.mesh = -1 if eos_id is None else eos_id, prefill_chunk, mesh
        self.prefill_budget = prefill_budget
        self._state = empty_slots(self.config, slots=slots, max_len=max_len, mesh=mesh)
        self._busy: list[Request | None] = [None] * slots
        self._pending: collections.deque[Request] = collections.deque()
        self._wake = threading.Condition()

    def check(self, request: Request) -> None:
        """A ValueError saying why the engine cannot run request (generate's checks, and this
        engine's max_len)."""
        prompt = request.prompt
        if not prompt or not all(isinstance(t, (int, np.integer)) for t in prompt):
            raise ValueError("a prompt is a non-empty list of token ids")
        if min(prompt) < 0 or max(prompt) >= self.config.vocab_size:
            raise ValueError(f"the prompt has token ids outside [0, {self.config.vocab_size})")
        if request.max_tokens < 1:
            raise ValueError(f"max_tokens must be at least 1, got {request.max_tokens}")
        if len(prompt) + request.max_tokens > self.max_len:
            raise ValueError(f"the prompt's {len(prompt)} tokens and max_tokens {request.max_tokens} are more than "
                             f"the {self.max_len} tokens a slot holds")
        if request.sampler.top_k is not None and request.sampler.top_k > self.config.vocab_size:
            raise ValueError(f"top_k must be in [1, {self.config.vocab_size}], got {request.sampler.top_k}")
        if request.images and self.config.vision is None:
            raise ValueError("images given to a model without a vision encoder")
        if self.config.vision is not None:  # the prompt's image tokens are its images' to the last
            filled = sum(image_tokens(self.config, np.shape(image)) for image in request.images)
            check_image_tokens(self.config, np.asarray(prompt), filled)

    def submit(self, request: Request) -> None:
        """Queues request (checked first); any thread."""
        self.check(request)
        with self._wake:
            self._pending.append(request)
            self._wake.notify()

    @property
    def pending(self) -> int:
        return len(self._pending)

    @property
    def active(self) -> int:
        return sum(r is not None for r in self._busy)

    def wake(self) -> None:
        """Ends a `run` loop's wait for work (after setting its stop condition)."""
        with self._wake:
            self._wake.notify_all()

    def run(self, stop: Callable[[], bool]) -> None:
        """Steps until stop() is true, waiting while there is nothing to do (whoever makes stop()
        true then calls wake())."""
        while True:
            with self._wake:  # stop() is read under the lock wake() takes: its notify cannot be missed
                while not stop() and not self._pending and not self.active:
                    self._wake.wait()
                if stop():
                    return
            self.step()

    def step(self) -> bool:
        """Admits what fits, then one decode call. Returns whether requests remain."""
        self._drop_cancelled()
        free = [slot for slot, r in enumerate(self._busy) if r is None]
        new: list[Request] = []
        with self._wake:
            while self._pending and len(new) < len(free):
                longest = max(len(r.prompt) for r in [*new, self._pending[0]])
                padded = prompt_layout(self.config, longest, self.prefill_chunk)[1]
                if new and min(bucket(len(new) + 1), self.slots) * padded > self.prefill_budget:
                    break
                new.append(self._pending.popleft())
        if new:
            self._admit(new, free[:len(new)])
        busy = [slot for slot, r in enumerate(self._busy) if r is not None]
        if busy:
            self._state, out = advance(self.params, self.config, self._state, self._rows(busy),
                                       steps=self.steps_per_call, eos_id=self.eos_id)
            out = np.asarray(out)
            for i, slot in enumerate(busy if len(out) < self.slots else range(self.slots)):
                if self._busy[slot] is not None:
                    self._emit(slot, [int(t) for t in out[i] if t >= 0])
        return bool(self.active or self._pending)

    def _rows(self, busy: list[int]) -> np.ndarray:
        """advance's rows for these busy slots: the busy ones padded to a bucket, or with every
        slot, each slot in order, the free ones given S."""
        b = min(bucket(len(busy)), self.slots)
        if b == self.slots:
            return np.array([s if self._busy[s] is not None else self.slots for s in range(self.slots)], np.int32)
        return np.array(busy + [self.slots] * (b - len(busy)), np.int32)

    def compile(self) -> None:
        """Compiles the decode program of each bucket of busy slots (1, 2, 4, ..., slots), so none
        compiles while requests come and go."""
        b = 1
        while True:
            self._state, _ = advance(self.params, self.config, self._state, np.full(b, self.slots, np.int32),
                                     steps=self.steps_per_call, eos_id=self.eos_id)
            if b == self.slots:
                return
            b = min(2 * b, self.slots)

    def _drop_cancelled(self) -> None:
        for slot, request in enumerate(self._busy):
            if request is not None and request.cancelled:
                self._busy[slot] = None
        with self._wake:
            if any(r.cancelled for r in self._pending):
                self._pending = collections.deque(r for r in self._pending if not r.cancelled)

    def _admit(self, requests: list[Request], slots: list[int]) -> None:
        chunk, padded = prompt_layout(self.config, max(len(r.prompt) for r in requests), self.prefill_chunk)
        b = min(bucket(len(requests)), self.slots)
        prompts = np.zeros((b, padded), np.int32)
        lengths, rows = np.zeros(b, np.int32), np.full(b, self.slots, np.int32)
        seeds = np.zeros((b, *jax.random.key_data(jax.random.key(0)).shape), np.uint32)
        budget, top_k = np.zeros(b, np.int32), np.zeros(b, np.int32)
        temperature, top_p = np.zeros(b, np.float32), np.zeros(b, np.float32)
        for i, (request, slot) in enumerate(zip(requests, slots)):
            prompts[i, :len(request.prompt)] = request.prompt
            lengths[i], rows[i], budget[i] = len(request.prompt), slot, request.max_tokens
            seeds[i] = jax.random.key_data(jax.random.key(request.seed))
            temperature[i] = request.sampler.temperature
            top_k[i], top_p[i] = request.sampler.top_k or 0, request.sampler.top_p or 0.0
            self._busy[slot] = request
        self._state, first = admit(self.params, self.config, self._state, prompts, lengths, rows, seeds, budget,
                                   temperature, top_k, top_p, max_len=self.max_len, chunk=chunk, eos_id=self.eos_id,
                                   mesh=self.mesh, images=self._images(requests, prompts))
        first = np.asarray(first)
        for i, slot in enumerate(slots[:len(requests)]):
            self._emit(slot, [int(first[i])])

    def _images(self, requests: list[Request], prompts: np.ndarray) -> ImageFeatures | None:
        """The admitted prompts' image embeddings (the encoder run on their images now, compiled
        per set of image sizes), padded to a power of two of rows so admit compiles per bucket."""
        flat = [np.asarray(image, np.float32) for request in requests for image in request.images]
        if not flat:
            return None
        embeddings = image_embeddings(self.params["vision"], self.config, flat)
        index = token_index(self.config, prompts, embeddings.shape[0])
        rows = bucket(embeddings.shape[0])
        return ImageFeatures(jnp.pad(embeddings, ((0, rows - embeddings.shape[0]), (0, 0))), index)

    def _emit(self, slot: int, tokens: list[int]) -> None:
        """Hands a slot's new tokens to its request, freeing the slot when it is done."""
        request = self._busy[slot]
        finish = None
        if self.eos_id in tokens:
            tokens, finish = tokens[:tokens.index(self.eos_id)], "stop"
        request.generated += len(tokens)
        if finish is None and request.generated >= request.max_tokens:
            finish = "length"
        if not request.emit(tokens, finish) or finish is not None or request.cancelled:
            self._busy[slot] = None
