"""Attention masks and kernels for grouped-query attention with an optional sliding window.

Shapes: B batch, T query length, S key length, H query heads, K kv heads, G = H/K,
d head dim, W window, N number of query blocks.

The window W means W keys including the query itself: query position i attends to key
positions j with i - W < j <= i. This is HF transformers' definition. (Mistral's
one_file_ref lets prefill see W+1 keys and decode W; we do not copy that.)
"""

import jax
import jax.numpy as jnp
import numpy as np

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


def masked_attention(q: jnp.ndarray, k: jnp.ndarray, v: jnp.ndarray, mask: jnp.ndarray) -> jnp.ndarray:
    """softmax(q k^T / sqrt(d)) v under mask [B, T, S]; q [B, T, H, d], k, v [B, S, K, d].

    The O(T*S) reference form: used for decoding against a cache and as the oracle of the
    faster paths. Logits and softmax in float32.
    """
    B, T, H, d = q.shape
    K = k.shape[2]
    q = q.reshape(B, T, K, H // K, d)
    logits = jnp.einsum("BTKGd,BSKd->BKGTS", q, k, preferred_element_type=jnp.float32) * d**-0.5
    logits = jnp.where(mask[:, None, None], logits, _MASKED)
    probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    out = jnp.einsum("BKGTS,BSKd->BTKGd", probs, v)
    return out.reshape(B, T, H, d)


def banded_attention(q: jnp.ndarray, k: jnp.ndarray, v: jnp.ndarray, window: int) -> jnp.ndarray:
    """Causal sliding-window self-attention over positions 0..T-1 in O(T*W) time and memory.

    The sequence is cut into N blocks of W queries; block n attends to key blocks n-1 and n
    (2W keys), which hold every key its queries may see. T is padded up to N*W; padded keys
    lie in the future of every real query, so the causal mask hides them.
    """
    B, T, H, d = q.shape
    K = k.shape[2]
    W = window
    N = -(-T // W)
    pad = [(0, 0), (0, N * W - T), (0, 0), (0, 0)]
    q, k, v = (jnp.pad(x, pad) for x in (q, k, v))
    q = q.reshape(B, N, W, K, H // K, d)

    def with_previous_block(x):  # [B, N*W, K, d] -> [B, N, 2W, K, d]
        x = x.reshape(B, N, W, K, d)
        previous = jnp.pad(x, [(0, 0), (1, 0), (0, 0), (0, 0), (0, 0)])[:, :-1]
        return jnp.concatenate([previous, x], axis=2)

    k, v = with_previous_block(k), with_previous_block(v)
    q_pos = np.arange(N * W).reshape(N, W)
    k_pos = q_pos[:, :1] - W + np.arange(2 * W)  # keys of block n start at n*W - W
    mask = attention_mask(q_pos, k_pos, W)  # [N, W, 2W], static

    logits = jnp.einsum("BNTKGd,BNSKd->BNKGTS", q, k, preferred_element_type=jnp.float32) * d**-0.5
    logits = jnp.where(mask[None, :, None, None], logits, _MASKED)
    probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    out = jnp.einsum("BNKGTS,BNSKd->BNTKGd", probs, v)
    return out.reshape(B, N * W, H, d)[:, :T]


def causal_attention(q: jnp.ndarray, k: jnp.ndarray, v: jnp.ndarray, window: int | None) -> jnp.ndarray:
    """Self-attention of a full sequence at positions 0..T-1; q [B, T, H, d], k, v [B, T, K, d].

    Banded when the window is much shorter than the sequence (the band then costs less than
    the T^2 causal form); otherwise `jax.nn.dot_product_attention`, which dispatches to
    cuDNN on GPU.
    """
    T = q.shape[1]
    if window is not None and T > 2 * window:
        return banded_attention(q, k, v, window)
    return jax.nn.dot_product_attention(
        q, k, v, is_causal=True, local_window_size=None if window is None else (window - 1, 0))
