"""Rotary position embeddings in the rotate-half layout, with their scalings: YaRN's frequencies
and magnitude, and Llama 4's query scale.

Layout: within each head, feature i is paired with feature i + d/2 (HF transformers' layout).
Mistral-native checkpoints pair (2i, 2i+1) instead; checkpoints/convert.py permutes their wq/wk
rows once so that the model never needs to know which layout a checkpoint came from.

The scalings are data computed once from the config (`frequencies`, `query_scale`), as
transformers' modeling_rope_utils keeps one function per rope type: the model never branches
on the type.
"""

import functools
import math

import jax.numpy as jnp
import numpy as np

from mistral_jax.model.config_groups import Llama4Scaling, YaRN


@functools.lru_cache(maxsize=None)
def frequencies(rotary_dim: int, theta: float, yarn: YaRN | None = None) -> tuple[np.ndarray, float]:
    """(inverse frequencies float32 [rotary_dim/2], what cos and sin are multiplied by).

    Without scaling: theta^(-2i/d), the angle per position of pair i, and 1. With YaRN
    (transformers' _compute_yarn_parameters): pair i turns at inv_inter·(1 − m_i) + inv_extra·m_i,
    inv_extra = theta^(−2i/d) and inv_inter = inv_extra / factor, where m_i = 1 − clamp((i −
    low) / (high − low), 0, 1) is 1 for the fast pairs (kept) and 0 for the slow ones
    (interpolated); low and high are the pairs that turn beta_fast and beta_slow times over
    the original length, rounded down and up (truncate) and clipped to [0, d − 1].
    """
    exponents = np.arange(0, rotary_dim, 2, dtype=np.float64) / rotary_dim
    extrapolated = 1.0 / theta**exponents
    if yarn is None:
        return extrapolated.astype(np.float32), 1.0

    def pair_turning(turns: float) -> float:  # the (fractional) pair index that turns `turns` times
        return rotary_dim * math.log(yarn.original_max_position_embeddings / (turns * 2 * math.pi)) / (
            2 * math.log(theta))

    low, high = pair_turning(yarn.beta_fast), pair_turning(yarn.beta_slow)
    if yarn.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, rotary_dim - 1)
    if low == high:
        high += 0.001  # as transformers: no division by zero
    ramp = np.clip((np.arange(rotary_dim // 2, dtype=np.float64) - low) / (high - low), 0, 1)
    kept = 1 - ramp
    inverse = extrapolated / yarn.factor * (1 - kept) + extrapolated * kept
    return inverse.astype(np.float32), yarn.cos_sin_scale


def apply_rope(x: jnp.ndarray, positions: jnp.ndarray, inverse_frequencies: np.ndarray,
               scale: float = 1.0) -> jnp.ndarray:
    """Rotates x [B, T, N, d] by the angles of positions [B, T] (cos and sin times scale);
    computed in float32."""
    angles = positions.astype(jnp.float32)[:, :, None, None] * inverse_frequencies.reshape(1, 1, 1, -1)
    return _rotate(x, angles, scale)


def apply_rope_2d(x: jnp.ndarray, rows: jnp.ndarray, columns: jnp.ndarray, theta: float) -> jnp.ndarray:
    """Rotates x [B, T, N, d] by 2-D positions (the Pixtral encoder's, over an image's patches):
    of the d/2 pairs, the first d/4 turn by the row [B, T] at the even-indexed frequencies
    theta^(-2i/d), the last d/4 by the column at the odd-indexed ones (mistral-inference's
    precompute_freqs_cis_2d, in the rotate-half layout as transformers' Pixtral)."""
    inverse, _ = frequencies(x.shape[-1], theta)
    angles = jnp.concatenate([rows.astype(jnp.float32)[:, :, None] * inverse[0::2],
                              columns.astype(jnp.float32)[:, :, None] * inverse[1::2]], axis=-1)
    return _rotate(x, angles[:, :, None, :])


def _rotate(x: jnp.ndarray, angles: jnp.ndarray, scale: float = 1.0) -> jnp.ndarray:
    """x [B, T, N, d] with pair (i, i + d/2) turned by angles [B, T, 1, d/2], in float32."""
    cos, sin = jnp.cos(angles), jnp.sin(angles)
    if scale != 1.0:
        cos, sin = cos * scale, sin * scale
    x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
    rotated = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return rotated.astype(x.dtype)


def query_scale(positions: jnp.ndarray, scaling: Llama4Scaling) -> jnp.ndarray:
    """float32 [B, T]: 1 + beta·ln(1 + floor(position / original length)) (Llama 4's, on the
    queries after RoPE); padding (position −1) gets the scale of position 0."""
    periods = jnp.maximum(positions, 0) // scaling.original_max_position_embeddings  # exact in integers
    return 1 + scaling.beta * jnp.log1p(periods.astype(jnp.float32))
