"""Causal sliding-window self-attention through the Pallas splash-attention kernel (TPU).

The kernel works per sequence and per kv head: queries [G, T, d] of one kv head's group
against keys and values [T, d] (its MQA form), vmapped over kv heads and batch. The window
is a LocalMask(left=W-1, right=0), which is causal too; without a window a CausalMask. The
kernel skips the blocks the mask empties, so time is O(T * W).

Under a mesh (`sharding.under_mesh`, as the train and eval steps are traced, or
`jax.set_mesh`) the kernel runs inside `shard_map`: batch split as the rules table says,
kv heads over `tensor` when it divides them (otherwise every tensor device computes all
heads). Off TPU the kernel runs in Pallas interpret mode: slow, but the same program,
which is how the tests check its numbers on CPU.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as splash
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as masks
from jax.sharding import PartitionSpec

from mistral_jax.runtime.platforms import target_platform
from mistral_jax.runtime.sharding import spec_for

BLOCK = 512  # the kernel's q and kv tile, or T when shorter
ALIGN = 128  # T is padded to a multiple of this (TPU lane width)


def _kernel(T: int, G: int, window: int | None, interpret: bool):
    if window is None:
        mask = masks.CausalMask((T, T))
    else:
        mask = masks.LocalMask((T, T), window_size=(window - 1, 0), offset=0)
    block = min(BLOCK, T)
    sizes = splash.BlockSizes(block_q=block, block_kv=block, block_kv_compute=block, block_q_dkv=block,
                              block_kv_dkv=block, block_kv_dkv_compute=block, block_q_dq=block, block_kv_dq=block)
    return splash.make_splash_mqa_single_device(masks.MultiHeadMask([mask] * G), block_sizes=sizes,
                                                interpret=interpret)


def _attention(q: jax.Array, k: jax.Array, v: jax.Array, *segments: jax.Array, window: int | None,
               interpret: bool) -> jax.Array:
    """q [B, T, K, G, d], k, v [B, T, K, d] (and segments [B, T]) -> [B, T, K, G, d], on one
    device's shard."""
    B, T, K, G, d = q.shape
    kernel = _kernel(T, G, window, interpret)

    def one_kv_head(q, k, v, *ids):  # [G, T, d], [T, d], [T, d] (, [T])
        return kernel(q, k, v, segment_ids=splash.SegmentIds(ids[0], ids[0]) if ids else None)

    per_kv_head = jax.vmap(one_kv_head, in_axes=(0, 0, 0) + (None,) * len(segments))
    per_sequence = jax.vmap(per_kv_head)
    out = per_sequence(q.transpose(0, 2, 3, 1, 4), k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3), *segments)
    return out.transpose(0, 3, 1, 2, 4)


def splash_attention(q: jax.Array, k: jax.Array, v: jax.Array, window: int | None,
                     segments: jax.Array | None = None) -> jax.Array:
    """Self-attention at positions 0..T-1; q [B, T, H, d], k, v [B, T, K, d] -> [B, T, H, d];
    with segments [B, T] (packed documents' ids) each query sees its own document's keys only
    (the kernel's SegmentIds)."""
    B, T, H, d = q.shape
    K = k.shape[2]
    padded = -(-T // ALIGN) * ALIGN  # padded keys lie in every real query's future: masked
    pad = [(0, 0), (0, padded - T), (0, 0), (0, 0)]
    q = jnp.pad(q * jnp.asarray(d**-0.5, q.dtype), pad).reshape(B, padded, K, H // K, d)
    k, v = (jnp.pad(x, pad) for x in (k, v))
    segments = () if segments is None else (
        jnp.pad(segments.astype(jnp.int32), [(0, 0), (0, padded - T)], constant_values=-1),)
    interpret = target_platform() != "tpu"
    attend = functools.partial(_attention, window=window, interpret=interpret)

    mesh = jax.sharding.get_abstract_mesh()
    if not mesh.empty:
        kv_spec = spec_for(("batch", None, "kv_heads", None), k.shape, mesh)
        q_spec = PartitionSpec(*kv_spec[:3], None, None)
        in_specs = (q_spec, kv_spec, kv_spec) + (PartitionSpec(kv_spec[0]),) * len(segments)
        attend = jax.shard_map(attend, mesh=mesh, in_specs=in_specs, out_specs=q_spec, check_vma=False)
    return attend(q, k, v, *segments).reshape(B, padded, H, d)[:, :T]
