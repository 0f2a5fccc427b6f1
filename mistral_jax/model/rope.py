"""Rotary position embeddings, in the rotate-half layout.

Layout: within each head, feature i is paired with feature i + d/2 (HF transformers' layout).
Mistral-native checkpoints pair (2i, 2i+1) instead; `checkpoints/convert.py` permutes their wq/wk rows once
so that the model never needs to know which layout a checkpoint came from.
"""

import jax.numpy as jnp
import numpy as np


def inverse_frequencies(head_dim: int, theta: float) -> np.ndarray:
    """[d/2] float32: theta^(-2i/d), the angle per position of pair i."""
    exponents = np.arange(0, head_dim, 2, dtype=np.float64) / head_dim
    return (1.0 / theta**exponents).astype(np.float32)


def apply_rope(x: jnp.ndarray, positions: jnp.ndarray, theta: float) -> jnp.ndarray:
    """Rotates x [B, T, N, d] by the angles of positions [B, T]; computed in float32."""
    inv_freq = inverse_frequencies(x.shape[-1], theta)
    angles = positions.astype(jnp.float32)[:, :, None, None] * inv_freq.reshape(1, 1, 1, -1)  # [B, T, 1, d/2]
    cos, sin = jnp.cos(angles), jnp.sin(angles)
    x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
    rotated = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return rotated.astype(x.dtype)
