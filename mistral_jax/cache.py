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
from jax.sharding import Mesh

from mistral_jax.config import MistralConfig
from mistral_jax.sharding import sharding_for

KV_AXES = ("layers", "batch", "length", "kv_heads", "head_dim")  # logical axes of k and v, see sharding.py


@flax.struct.dataclass
class KVCache:
    """The layers' K and V laid out as the model's layers are (config.scan_layers): stacked,
    [L, B, C, K, d], or a tuple of L arrays [B, C, K, d]."""

    k: jax.Array | tuple[jax.Array, ...]
    v: jax.Array | tuple[jax.Array, ...]
    positions: jax.Array  # [B, C] int32: the absolute position in each slot, -1 if empty

    @classmethod
    def init(cls, config: MistralConfig, batch: int, max_len: int) -> KVCache:
        """An empty cache for sequences of up to max_len tokens (unbounded with a window)."""
        C = cache_length(config, max_len)
        shape = (batch, C, config.n_kv_heads, config.head_dim)
        dtype = jnp.dtype(config.dtype)

        def empty():
            if config.scan_layers:
                return jnp.zeros((config.n_layers, *shape), dtype)
            return tuple(jnp.zeros(shape, dtype) for _ in range(config.n_layers))
        return cls(k=empty(), v=empty(), positions=jnp.full((batch, C), -1, jnp.int32))

    def shardings(self, mesh: Mesh) -> KVCache:
        """NamedSharding per array (of this cache or its shapes): rows split like batches, kv
        heads over `tensor` like wk/wv, each device's rows and heads whole in length."""
        def kv(x):
            return sharding_for(KV_AXES[-x.ndim:], x.shape, mesh)
        return KVCache(k=jax.tree_util.tree_map(kv, self.k), v=jax.tree_util.tree_map(kv, self.v),
                       positions=sharding_for(("batch", "length"), self.positions.shape, mesh))


def cache_length(config: MistralConfig, max_len: int) -> int:
    return max_len if config.sliding_window is None else min(config.sliding_window, max_len)


def write_slots(positions: jax.Array, cache_len: int) -> jax.Array:
    """[B, T] slot of each position; cache_len (out of range, dropped on write) for padding."""
    return jnp.where(positions >= 0, positions % cache_len, cache_len)


def rolling_update(buffer: jax.Array, slots: jax.Array, values: jax.Array) -> jax.Array:
    """buffer [B, C, ...] with values [B, T, ...] written at slots [B, T]."""
    rows = jnp.arange(buffer.shape[0])[:, None]
    return buffer.at[rows, slots].set(values.astype(buffer.dtype), mode="drop")
