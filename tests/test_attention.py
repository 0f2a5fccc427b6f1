"""Masks with exact expected arrays; banded and dense kernels against the O(T^2) reference."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mistral_jax.attention import attention_mask, banded_attention, causal_attention, masked_attention


def test_window_mask_exact():
    # W = 3: position i sees i-2, i-1, i (W keys including itself), never the future.
    pos = jnp.arange(5)
    expected = np.array([[1, 0, 0, 0, 0],
                         [1, 1, 0, 0, 0],
                         [1, 1, 1, 0, 0],
                         [0, 1, 1, 1, 0],
                         [0, 0, 1, 1, 1]], bool)
    np.testing.assert_array_equal(attention_mask(pos, pos, 3), expected)
    np.testing.assert_array_equal(attention_mask(pos, pos, None), np.tril(np.ones((5, 5), bool)))


def test_mask_from_positions_of_a_wrapped_cache():
    # A cache of 4 slots after writing positions 0..5: slot = pos % 4 holds [4, 5, 2, 3].
    # Query at position 6 with W = 4 sees 3, 4, 5 (and itself, written before reading).
    slots = jnp.array([4, 5, 2, 3])
    np.testing.assert_array_equal(attention_mask(jnp.array([5]), slots, 4), [[1, 1, 1, 1]])
    np.testing.assert_array_equal(attention_mask(jnp.array([6]), slots, 4), [[1, 1, 0, 1]])
    np.testing.assert_array_equal(attention_mask(jnp.array([2]), jnp.array([0, 1, 2, -1]), 4), [[1, 1, 1, 0]])


@functools.partial(jax.jit, static_argnums=3)
def reference(q, k, v, window):
    pos = jnp.broadcast_to(jnp.arange(q.shape[1])[None, :], q.shape[:2])
    return masked_attention(q, k, v, attention_mask(pos, pos, window))


banded = jax.jit(banded_attention, static_argnums=3)
causal = jax.jit(causal_attention, static_argnums=3)


def qkv(T, H=4, K=2, d=8, seed=0):
    rng = np.random.default_rng(seed)
    q = 2 * rng.normal(size=(2, T, H, d)).astype(np.float32)
    k = 2 * rng.normal(size=(2, T, K, d)).astype(np.float32)
    return q, k, rng.normal(size=(2, T, K, d)).astype(np.float32)


@pytest.mark.parametrize("window,T", [(4, 12), (4, 13), (4, 3), (4, 4), (4, 5), (5, 23), (1, 7), (7, 1)])
def test_banded_equals_reference(window, T):
    q, k, v = qkv(T)
    np.testing.assert_allclose(banded(q, k, v, window), reference(q, k, v, window), atol=1e-5)


@pytest.mark.parametrize("window,T", [(None, 9), (4, 8), (4, 6), (4, 9), (3, 17)])
def test_causal_attention_equals_reference(window, T):
    # (4, 8) and (4, 6) take jax.nn.dot_product_attention with a local window; (4, 9) and (3, 17) the band.
    q, k, v = qkv(T, H=6, K=3)
    np.testing.assert_allclose(causal(q, k, v, window), reference(q, k, v, window), atol=1e-5)


def test_banded_is_linear_in_length():
    """No intermediate of the banded program has a T x T (or larger) attention matrix."""
    T, W = 256, 16
    q, k, v = qkv(T)
    jaxpr = jax.make_jaxpr(lambda q, k, v: causal_attention(q, k, v, W))(q, k, v)
    sizes = [np.prod(var.aval.shape) for eqn in jaxpr.eqns for var in eqn.outvars]
    largest_dense = 2 * 4 * T * T  # B * H * T * T of the dense form
    assert max(sizes) <= 2 * 4 * T * 2 * W < largest_dense
