"""The rolling KV cache: fixed-size buffers written at position % cache_len.

Per layer, K and V of shape [B, C, K, d] with C = cache_len = min(window, max length), and
for the whole batch the absolute position held by each slot, [B, C] (-1 while empty).
Masks are built from those positions, never from slot indices, so they stay right after
the buffer wraps. Memory is O(window) however long generation runs.

Writes are scatters at slot = position % C, with padding tokens (position -1) sent to the
out-of-range slot C and dropped. (`dynamic_update_slice` would clamp a chunk that crosses
the end of the buffer instead of wrapping it.) A chunk of T <= C tokens covers T distinct
slots, so a scatter never writes one slot twice.

Worked example, window 3 (C = 3), a batch of two prompts of lengths [5, 2], prefilled in
chunks of 3:
  chunk 1: positions [[0, 1, 2], [0, 1, -1]]  -> slots [[0, 1, 2], [0, 1, 3=dropped]]
           slot positions become [[0, 1, 2], [0, 1, -1]]
  chunk 2: positions [[3, 4, -1], [-1, -1, -1]] -> slots [[0, 1, dropped], [dropped] * 3]
           slot positions become [[3, 4, 2], [0, 1, -1]]
Row 0's next token (position 5) then sees positions 3, 4 and itself: window 3.
"""

from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp

from mistral_jax.config import MistralConfig


@flax.struct.dataclass
class KVCache:
    k: jax.Array | list[jax.Array]  # [L, B, C, K, d], or L arrays [B, C, K, d] (see Mistral.scan_layers)
    v: jax.Array | list[jax.Array]  # as k
    positions: jax.Array  # [B, C] int32: the absolute position in each slot, -1 if empty

    @classmethod
    def init(cls, config: MistralConfig, batch: int, max_len: int, stacked: bool = True) -> KVCache:
        """An empty cache for sequences of up to max_len tokens (unbounded with a window):
        layers stacked in one array per K and V, or (stacked=False) an array per layer."""
        C = cache_length(config, max_len)
        shape = (batch, C, config.n_kv_heads, config.head_dim)
        def empty():
            if stacked:
                return jnp.zeros((config.n_layers, *shape), jnp.dtype(config.dtype))
            return [jnp.zeros(shape, jnp.dtype(config.dtype)) for _ in range(config.n_layers)]
        return cls(k=empty(), v=empty(), positions=jnp.full((batch, C), -1, jnp.int32))


def cache_length(config: MistralConfig, max_len: int) -> int:
    return max_len if config.sliding_window is None else min(config.sliding_window, max_len)


def write_slots(positions: jax.Array, cache_len: int) -> jax.Array:
    """[B, T] slot of each position; cache_len (out of range, dropped on write) for padding."""
    return jnp.where(positions >= 0, positions % cache_len, cache_len)


def rolling_update(buffer: jax.Array, slots: jax.Array, values: jax.Array) -> jax.Array:
    """buffer [B, C, ...] with values [B, T, ...] written at slots [B, T]."""
    rows = jnp.arange(buffer.shape[0])[:, None]
    return buffer.at[rows, slots].set(values.astype(buffer.dtype), mode="drop")
