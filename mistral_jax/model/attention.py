"""Attention masks and kernels for grouped-query attention with an optional sliding window.

Shapes: B batch, T query length, S key length, H query heads, K kv heads, G = H/K,
d head dim, W window, N number of query blocks.

The window W means W keys including the query itself: query position i attends to key
positions j with i - W < j <= i. This is HF transformers' definition. (Mistral's
one_file_ref lets prefill see W+1 keys and decode W; we do not copy that.)
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np

from mistral_jax.model.splash import splash_attention
from mistral_jax.runtime.platforms import attention_kernel

_MASKED = float(np.finfo(np.float32).min)


def attention_mask(q_pos: jnp.ndarray, k_pos: jnp.ndarray, window: int | None) -> jnp.ndarray:
    """bool [..., T, S] from absolute positions q_pos [..., T] and k_pos [..., S].

    A negative key position marks an empty slot (e.g. of a cache not yet filled).
    """
    q, k = q_pos[..., :, None], k_pos[..., None, :]
    mask = (k >= 0) & (k <= q)
    if window is not None:
        mask &= q - k < window
    return mask


def masked_attention(q: jnp.ndarray, k: jnp.ndarray, v: jnp.ndarray, mask: jnp.ndarray | None) -> jnp.ndarray:
    """softmax(q k^T / sqrt(d)) v under mask [B, T, S] (None: every key); q [B, T, H, d], k [B, S, K, d],
    v [B, S, K, dv].

    The O(T*S) reference form: used against the KV cache, by a prefill chunk, by the vision
    encoder, and as the oracle of the faster paths. Logits and softmax in float32. A decode
    step (T = 1) reads the cache in its own layout, so each compiler picks its layouts:
    transposing k and v to heads-major there would copy the whole cache (docs/DESIGN.md,
    "Attention"). Several queries (a prefill chunk, whose keys are a fresh concatenation anyway)
    go heads-major, each head's products one batched matmul: 2-2.5x faster on XLA:CPU
    (BENCHMARKS.md, "Images in").
    """
    B, T, H, d = q.shape
    K = k.shape[2]
    q = (q * jnp.asarray(d**-0.5, q.dtype)).reshape(B, T, K, H // K, d)  # scaling q: T*d products, not T*S
    if T == 1:
        logits = jnp.einsum("BTKGd,BSKd->BKGTS", q, k, preferred_element_type=jnp.float32)
        probs = _masked_softmax(logits, mask if mask is None else mask[:, None, None]).astype(v.dtype)
        return jnp.einsum("BKGTS,BSKd->BTKGd", probs, v).reshape(B, T, H, v.shape[-1])
    q, k, v = q.transpose(0, 2, 3, 1, 4), k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)
    logits = jnp.einsum("BKGTd,BKSd->BKGTS", q, k, preferred_element_type=jnp.float32)
    probs = _masked_softmax(logits, mask if mask is None else mask[:, None, None]).astype(v.dtype)
    out = jnp.einsum("BKGTS,BKSd->BKGTd", probs, v)
    return out.transpose(0, 3, 1, 2, 4).reshape(B, T, H, v.shape[-1])


def latent_attention(q_latent: jnp.ndarray, q_rope: jnp.ndarray, latent: jnp.ndarray, rope_key: jnp.ndarray,
                     mask: jnp.ndarray, scale: float) -> jnp.ndarray:
    """Latent attention in its absorbed form: softmax(scale · (q_latent · latent + q_rope ·
    rope_key)) latent under mask [B, T, S]; q_latent [B, T, H, r] (the no-rope queries through
    the keys' up-projection), q_rope [B, T, H, dr], latent [B, S, 1, r], rope_key [B, S, 1, dr]
    (as the cache holds them) -> [B, T, H, r], for the values' up-projection to expand. Every
    head reads the one latent: the cache is read once, never expanded per head."""
    q_latent, q_rope = (x * jnp.asarray(scale, x.dtype) for x in (q_latent, q_rope))
    latent, rope_key = latent[:, :, 0], rope_key[:, :, 0]
    logits = (jnp.einsum("BTHr,BSr->BHTS", q_latent, latent, preferred_element_type=jnp.float32)
              + jnp.einsum("BTHd,BSd->BHTS", q_rope, rope_key, preferred_element_type=jnp.float32))
    probs = _masked_softmax(logits, mask[:, None]).astype(latent.dtype)
    return jnp.einsum("BHTS,BSr->BTHr", probs, latent)


def _masked_softmax(logits: jnp.ndarray, mask: jnp.ndarray | None) -> jnp.ndarray:
    return jax.nn.softmax(logits if mask is None else jnp.where(mask, logits, _MASKED), axis=-1)


def same_segment(q_segments: jnp.ndarray, k_segments: jnp.ndarray) -> jnp.ndarray:
    """bool [B, T, S]: whether query and key lie in one packed document (segment ids [B, T], [B, S])."""
    return q_segments[:, :, None] == k_segments[:, None, :]


def blocked_attention(q: jnp.ndarray, k: jnp.ndarray, v: jnp.ndarray, window: int | None,
                      block: int, segments: jnp.ndarray | None = None) -> jnp.ndarray:
    """Causal (sliding-window) self-attention at positions 0..T-1, `block` queries at a time;
    with segments [B, T], a query sees only the keys of its own segment.

    Block n reads the keys ending at its last query that its queries may see: the (n+1)Q
    keys up to there, or, with a window, at most span = Q + W - 1 of them (the W-1 before its
    first query on). Blocks that read a full span are one `lax.map`; the first ones (every
    block but the last without a window) each read their own static (n+1)Q keys, so causal
    attention computes about half of T x T rather than all of it, and time is O(T * span),
    linear in T, under a window. Each block is a `jax.checkpoint`, recomputed in the backward
    pass, so no T x T (or T x W) matrix is ever held: memory is O(block * span). T is padded
    up to a multiple of the block; padded keys lie in the future of every real query, so the
    causal mask hides them. A sequence of at most one block is one block, not recomputed.

    q, k and v are put heads-major once ([B, K, G, T, d], [B, K, T, d]), so each block's
    products are plain batched matmuls over B*K with G*Q rows; left as einsums over
    [B, T, K, G, d], XLA:CPU transposed the [Q, S] scores and probabilities instead
    (BENCHMARKS.md, "Forward and train step").
    """
    B, T, H, d = q.shape
    K, dv = k.shape[2], v.shape[-1]
    G = H // K
    Q = min(block, T)
    N = -(-T // Q)
    padded = N * Q
    span = padded if window is None else min(padded, Q + window - 1)
    q = (q * jnp.asarray(d**-0.5, q.dtype)).reshape(B, T, K, G, d).transpose(0, 2, 3, 1, 4)
    k, v = (x.transpose(0, 2, 1, 3) for x in (k, v))
    q = jnp.pad(q, [(0, 0), (0, 0), (0, 0), (0, padded - T), (0, 0)])
    k, v = (jnp.pad(x, [(0, 0), (0, 0), (0, padded - T), (0, 0)]) for x in (k, v))
    if segments is not None:  # padding is a segment of its own, in every query's future anyway
        segments = jnp.pad(segments, [(0, 0), (0, padded - T)], constant_values=-1)

    def one_block(q_n, n, keys: int):  # q_n [B, K, G, Q, d] of block n -> [B, K, G, Q, d], over `keys` keys
        first_key = (n + 1) * Q - keys
        k_n, v_n = (jax.lax.dynamic_slice_in_dim(x, first_key, keys, axis=2).reshape(B * K, keys, x.shape[-1])
                    for x in (k, v))
        logits = jnp.einsum("nmd,nsd->nms", q_n.reshape(B * K, G * Q, d), k_n, preferred_element_type=jnp.float32)
        mask = attention_mask(n * Q + jnp.arange(Q), first_key + jnp.arange(keys), window)[None]
        if segments is not None:
            mask &= same_segment(jax.lax.dynamic_slice_in_dim(segments, n * Q, Q, axis=1),
                                 jax.lax.dynamic_slice_in_dim(segments, first_key, keys, axis=1))
        probs = _masked_softmax(logits.reshape(B, K, G, Q, keys), mask[:, None, None]).astype(v.dtype)
        return jnp.einsum("nms,nsd->nmd", probs.reshape(B * K, G * Q, keys), v_n).reshape(B, K, G, Q, dv)

    if N == 1:
        out = one_block(q, 0, Q)
    else:
        blocks = q.reshape(B, K, G, N, Q, d)
        ramp = min(N, -(-span // Q) - 1)  # blocks 0..ramp-1 see fewer than span keys
        outs = [jax.checkpoint(functools.partial(one_block, n=n, keys=(n + 1) * Q))(blocks[:, :, :, n])
                for n in range(ramp)]
        if ramp < N:
            full = jax.lax.map(lambda args: jax.checkpoint(one_block, static_argnums=2)(*args, span),
                               (jnp.moveaxis(blocks[:, :, :, ramp:], 3, 0), jnp.arange(ramp, N)))
            outs.append(jnp.moveaxis(full, 0, 3).reshape(B, K, G, (N - ramp) * Q, dv))
        out = jnp.concatenate(outs, axis=3)
    return out.transpose(0, 3, 1, 2, 4).reshape(B, padded, H, dv)[:, :T]


def causal_attention(q: jnp.ndarray, k: jnp.ndarray, v: jnp.ndarray, window: int | None, kernel: str,
                     block: int, segments: jnp.ndarray | None = None) -> jnp.ndarray:
    """Self-attention of a full sequence at positions 0..T-1; q [B, T, H, d], k [B, T, K, d], v
    [B, T, K, dv] (dv other than d for latent attention). With segments [B, T] (int ids of the
    documents packed in a row, in order) a query sees only its own document's keys; the window
    counts positions in the row, which within one document are the document's own.

    kernel: "xla" blocked_attention (any platform); "dot_product" jax.nn.dot_product_attention
    with a local window (cuDNN's fused kernel on GPU for bf16/f16 inputs, a dense XLA form
    elsewhere); "splash" the Pallas splash-attention kernel with a LocalMask (TPU; Pallas
    interpret mode elsewhere); "auto" as platforms.attention_kernel chooses for the target.
    """
    kernel = attention_kernel(kernel)
    dv = v.shape[-1]
    if kernel != "xla" and dv < q.shape[-1]:  # these kernels take one head dim: v padded with zeros
        pad = [(0, 0)] * 3 + [(0, q.shape[-1] - dv)]
        return causal_attention(q, k, jnp.pad(v, pad), window, kernel, block, segments)[..., :dv]
    if dv > q.shape[-1]:
        kernel = "xla"
    if kernel == "dot_product":  # segments as a boolean mask, which cuDNN's kernel takes too
        return jax.nn.dot_product_attention(
            q, k, v, mask=None if segments is None else same_segment(segments, segments)[:, None], is_causal=True,
            local_window_size=None if window is None else (window - 1, 0))
    if kernel == "splash":
        return splash_attention(q, k, v, window, segments)
    return blocked_attention(q, k, v, window, block, segments)
