"""The rolling KV cache: fixed-size buffers written at position % cache_len.

Per layer, K and V of shape [B, C, K, d] with C = cache_len = min(window, max length), and
for the whole batch the absolute position held by each slot, [B, C] (-1 while empty). A
model whose layers have different windows (Ministral: full, then three sliding) has one
such cache per kind of layer (config.window_kinds): O(W) slots for the sliding layers, the
whole length for the full ones.
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

from mistral_jax.model.config import MistralConfig
from mistral_jax.runtime.sharding import sharding_for

# Logical axes of k and v, see runtime/sharding.py: [L, B, C, K, d], or [G, n, B, C, K, d] by groups.
KV_AXES = (None, "layers", "batch", "length", "kv_heads", "head_dim")


@flax.struct.dataclass
class KVCache:
    """Per kind of layer (config.window_kinds; of each stack, config.stacks, in order), the K
    and V of its layers, in layer order, laid out as the model's layers are
    (config.scan_layers): stacked, [L_kind, B, C, K, d], or a tuple of L_kind arrays [B, C, K,
    d]; and the positions its slots hold. Stacked with several kinds, each kind's layers are
    grouped as the model scans them, [G, n, B, C, K, d] for G groups of config.layer_pattern
    holding n layers of the kind each: so the scan updates the cache in place (a reshape there
    made XLA copy it). Latent attention caches its latent as K and its rope key as V, one
    "head" each ([.., B, C, 1, kv_lora_rank] and [.., B, C, 1, qk_rope_head_dim])."""

    k: tuple[jax.Array | tuple[jax.Array, ...], ...]
    v: tuple[jax.Array | tuple[jax.Array, ...], ...]
    positions: tuple[jax.Array, ...]  # [B, C] int32 per kind: the position in each slot, -1 if empty

    @classmethod
    def init(cls, config: MistralConfig, batch: int, max_len: int) -> KVCache:
        """An empty cache for sequences of up to max_len tokens (unbounded with a window): an
        entry per kind of layer of each stack (config.stacks), what each layer caches per token
        as config.cache_shape says (latent attention: its latent and rope key, one "head")."""
        dtype = jnp.dtype(config.dtype)
        heads, k_dim, v_dim = config.cache_shape
        k, v, positions = [], [], []
        for _, stack in config.stacks:
            for window in stack.window_kinds:
                C = cache_length(window, max_len)
                n = stack.layer_pattern.count(window)  # per group
                G = stack.n_layers // len(stack.layer_pattern)
                for dim, out in ((k_dim, k), (v_dim, v)):
                    shape = (batch, C, heads, dim)
                    stacked = (G, n, *shape) if stack.grouped_layers else (G, *shape)
                    out.append(jnp.zeros(stacked, dtype) if config.scan_layers
                               else tuple(jnp.zeros(shape, dtype) for _ in range(G * n)))
                positions.append(jnp.full((batch, C), -1, jnp.int32))
        return cls(k=tuple(k), v=tuple(v), positions=tuple(positions))

    def shardings(self, mesh: Mesh) -> KVCache:
        """NamedSharding per array (of this cache or its shapes): rows split like batches, kv
        heads over `tensor` like wk/wv, each device's rows and heads whole in length."""
        def kv(x):
            return sharding_for(KV_AXES[-x.ndim:], x.shape, mesh)
        return KVCache(k=jax.tree_util.tree_map(kv, self.k), v=jax.tree_util.tree_map(kv, self.v),
                       positions=tuple(sharding_for(("batch", "length"), p.shape, mesh) for p in self.positions))


def cache_length(window: int | None, max_len: int) -> int:
    """Slots of a layer with this window for sequences of up to max_len tokens."""
    return max_len if window is None else min(window, max_len)


def write_slots(positions: jax.Array, cache_len: int) -> jax.Array:
    """[B, T] slot of each position; cache_len (out of range, dropped on write) for padding."""
    return jnp.where(positions >= 0, positions % cache_len, cache_len)


def rolling_update(buffer: jax.Array, slots: jax.Array, values: jax.Array) -> jax.Array:
    """buffer [B, C, ...] with values [B, T, ...] written at slots [B, T]."""
    rows = jnp.arange(buffer.shape[0])[:, None]
    return buffer.at[rows, slots].set(values.astype(buffer.dtype), mode="drop")
