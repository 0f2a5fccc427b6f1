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
    faster paths. Logits and softmax in float32. The products are plain batched matmuls
    over B*K, with each kv head's G query heads and T queries as the rows: q, k and v
    (O(T*d) each) are transposed to fit, never the [T, S] scores. Written as one einsum
    over [B, T, K, G, d], XLA:CPU transposed the scores and probabilities instead, and the
    forward and backward took 1.3-1.4x longer.
    """
    B, T, H, d = q.shape
    S, K = k.shape[1], k.shape[2]
    G = H // K
    q = (q * jnp.asarray(d**-0.5, q.dtype)).reshape(B, T, K, G, d)  # scaling q: T*d products, not T*S
    q = q.transpose(0, 2, 3, 1, 4).reshape(B * K, G * T, d)
    k = k.transpose(0, 2, 3, 1).reshape(B * K, d, S)
    v = v.transpose(0, 2, 1, 3).reshape(B * K, S, d)
    logits = jnp.einsum("nmd,nds->nms", q, k, preferred_element_type=jnp.float32).reshape(B, K, G, T, S)
    logits = jnp.where(mask[:, None, None], logits, _MASKED)
    probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype).reshape(B * K, G * T, S)
    out = jnp.einsum("nms,nsd->nmd", probs, v).reshape(B, K, G, T, d)
    return out.transpose(0, 3, 1, 2, 4).reshape(B, T, H, d)


def blocked_attention(q: jnp.ndarray, k: jnp.ndarray, v: jnp.ndarray, window: int | None,
                      block: int) -> jnp.ndarray:
    """Causal (sliding-window) self-attention at positions 0..T-1, `block` queries at a time.

    Block n reads the keys ending at its last query that its queries may see: the (n+1)Q
    keys up to there, or, with a window, at most span = Q + W - 1 of them (the W-1 before its
    first query on). Blocks that read a full span are one `lax.map`; the first ones (every
    block but the last without a window) each read their own static (n+1)Q keys, so causal
    attention computes about half of T x T rather than all of it, and time is O(T * span),
    linear in T, under a window. Each block is a `jax.checkpoint`, recomputed in the backward
    pass, so no T x T (or T x W) matrix is ever held: memory is O(block * span). T is padded
    up to a multiple of the block; padded keys lie in the future of every real query, so the
    causal mask hides them. A sequence of at most one block is one dense masked_attention,
    not recomputed.
    """
    B, T, H, d = q.shape
    Q = min(block, T)
    N = -(-T // Q)
    padded = N * Q
    span = padded if window is None else min(padded, Q + window - 1)
    pad = [(0, 0), (0, padded - T), (0, 0), (0, 0)]
    q, k, v = (jnp.pad(x, pad) for x in (q, k, v))

    def one_block(q_n, n, keys: int):  # q_n [B, Q, H, d] of block n -> [B, Q, H, d], over `keys` keys
        first_key = (n + 1) * Q - keys
        k_n, v_n = (jax.lax.dynamic_slice_in_dim(x, first_key, keys, axis=1) for x in (k, v))
        mask = attention_mask(n * Q + jnp.arange(Q), first_key + jnp.arange(keys), window)
        return masked_attention(q_n, k_n, v_n, jnp.broadcast_to(mask, (B, Q, keys)))

    if N == 1:
        return one_block(q, 0, Q)[:, :T]
    blocks = q.reshape(B, N, Q, H, d).swapaxes(0, 1)
    ramp = min(N, -(-span // Q) - 1)  # blocks 0..ramp-1 see fewer than span keys
    outs = [jax.checkpoint(functools.partial(one_block, n=n, keys=(n + 1) * Q))(blocks[n]) for n in range(ramp)]
    if ramp < N:
        full = jax.lax.map(lambda args: jax.checkpoint(one_block, static_argnums=2)(*args, span),
                           (blocks[ramp:], jnp.arange(ramp, N)))
        outs.append(full.swapaxes(0, 1).reshape(B, (N - ramp) * Q, H, d))
    return jnp.concatenate(outs, axis=1)[:, :T]


def target_platform() -> str:
    """The platform being compiled for: the mesh's in a mesh context, else the default backend."""
    mesh = jax.sharding.get_abstract_mesh()
    return jax.default_backend() if mesh.empty else mesh.abstract_device.platform


def causal_attention(q: jnp.ndarray, k: jnp.ndarray, v: jnp.ndarray, window: int | None, kernel: str,
                     block: int) -> jnp.ndarray:
    """Self-attention of a full sequence at positions 0..T-1; q [B, T, H, d], k, v [B, T, K, d].

    kernel: "xla" blocked_attention (any platform); "dot_product" jax.nn.dot_product_attention
    with a local window (cuDNN's fused kernel on GPU for bf16/f16 inputs, a dense XLA form
    elsewhere); "splash" the Pallas splash-attention kernel with a LocalMask (TPU; Pallas
    interpret mode elsewhere); "auto" dot_product on GPU, splash on TPU, xla otherwise.
    """
    if kernel == "auto":
        kernel = {"gpu": "dot_product", "tpu": "splash"}.get(target_platform(), "xla")
    if kernel == "dot_product":
        return jax.nn.dot_product_attention(
            q, k, v, is_causal=True, local_window_size=None if window is None else (window - 1, 0))
    if kernel == "splash":
        from mistral_jax.splash import splash_attention
        return splash_attention(q, k, v, window)
    return blocked_attention(q, k, v, window, block)
