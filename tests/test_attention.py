"""Masks with exact expected arrays; the blocked kernel against the O(T^2) reference, forward and
backward, and its memory linear in T under a window."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mistral_jax.model.attention import attention_mask, blocked_attention, causal_attention, masked_attention


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


blocked = jax.jit(blocked_attention, static_argnums=(3, 4))


def qkv(T, H=4, K=2, d=8, seed=0):
    rng = np.random.default_rng(seed)
    q = 2 * rng.normal(size=(2, T, H, d)).astype(np.float32)
    k = 2 * rng.normal(size=(2, T, K, d)).astype(np.float32)
    return q, k, rng.normal(size=(2, T, K, d)).astype(np.float32)


# (window, T, block): one block, several with T a multiple of the block or not, windows
# shorter, equal to and longer than the block, no window.
CASES = [(4, 12, 4), (4, 13, 4), (4, 3, 4), (4, 5, 4), (5, 23, 4), (1, 7, 2), (7, 1, 4), (None, 9, 4),
         (None, 9, 16), (3, 17, 8), (6, 20, 3), (16, 40, 8)]


@pytest.mark.parametrize("window,T,block", CASES)
def test_blocked_equals_reference(window, T, block):
    q, k, v = qkv(T, H=6, K=3)
    np.testing.assert_allclose(blocked(q, k, v, window, block), reference(q, k, v, window), atol=1e-5)


@pytest.mark.parametrize("window,T,block", [(5, 23, 4), (None, 9, 4)])
def test_blocked_gradients_equal_reference(window, T, block):
    q, k, v = qkv(T)
    cotangent = np.random.default_rng(1).normal(size=q.shape).astype(np.float32)
    grads = [jax.jit(jax.grad(lambda *qkv: jnp.vdot(f(*qkv), cotangent), argnums=(0, 1, 2)))(q, k, v)
             for f in (lambda q, k, v: blocked_attention(q, k, v, window, block),
                       lambda q, k, v: reference(q, k, v, window))]
    for got, want in zip(*grads):
        np.testing.assert_allclose(got, want, atol=1e-4)


def test_blocked_memory_is_linear_in_length():
    """Under a window, the compiled forward+backward's temporary memory grows with T, not T^2:
    4x the length takes at most ~4x the memory (dense would take 16x)."""
    def temp_bytes(T):
        q, k, v = (jax.ShapeDtypeStruct(x.shape, x.dtype) for x in qkv(T))
        loss = jax.grad(lambda q, k, v: blocked_attention(q, k, v, 64, 64).sum(), argnums=(0, 1, 2))
        return jax.jit(loss).lower(q, k, v).compile().memory_analysis().temp_size_in_bytes

    small, large = temp_bytes(1024), temp_bytes(4096)
    assert large <= 4.5 * small, (small, large)
    assert large < 2 * 4 * 4096 * 4096 * 4 / 8  # an eighth of one dense f32 [B, H, T, T] matrix


@pytest.mark.parametrize("window,T", [(64, 200), (None, 130)])
def test_splash_and_dot_product_kernels_equal_reference(window, T):
    """The Pallas splash kernel (interpret mode here, the same program TPUs compile) and
    jax.nn.dot_product_attention (XLA here, cuDNN on GPU): outputs and gradients. T is not
    a multiple of the kernel's 128-row tiles, so padding is exercised."""
    q, k, v = qkv(T, H=4, K=2, d=32)
    cotangent = np.random.default_rng(1).normal(size=q.shape).astype(np.float32)

    @functools.partial(jax.jit, static_argnums=0)
    def out_and_grads(kernel, q, k, v):
        out, vjp = jax.vjp(lambda q, k, v: causal_attention(q, k, v, window, kernel, 64), q, k, v)
        return (out, *vjp(cotangent))

    want = out_and_grads("xla", q, k, v)
    for kernel in ("splash", "dot_product"):
        got = out_and_grads(kernel, q, k, v)
        for name, g, w in zip(("out", "dq", "dk", "dv"), got, want):
            np.testing.assert_allclose(g, w, atol=2e-5, err_msg=f"{kernel} {name}")
