"""The Mistral transformer as Flax linen modules.

Shapes: B batch, T sequence, D dim, H heads, K kv heads, d head dim, F hidden dim,
V vocab, L layers.

Parameter names are Mistral-native (tok_embeddings, layers/attention/wq, feed_forward/w1,
attention_norm, ffn_norm, norm, output); kernels are stored input-major ([D, H, d] for wq),
and each carries logical axis names for sharding.py. The layer stack is one `nn.scan`, so
every parameter under `layers` has a leading L axis and the block compiles once.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp

from mistral_jax.attention import causal_attention
from mistral_jax.config import MistralConfig
from mistral_jax.rope import apply_rope

REMAT_POLICIES = {
    "full": None,  # save nothing: recompute the whole block in the backward pass
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


def _param(module: nn.Module, name: str, shape: tuple[int, ...], axes: tuple[str, ...],
           init: nn.initializers.Initializer) -> jnp.ndarray:
    """A parameter annotated with logical axes, cast to the compute dtype."""
    c = module.config
    value = module.param(name, nn.with_logical_partitioning(init, axes), shape, jnp.dtype(c.param_dtype))
    return value.astype(c.dtype)


def _fan_in(in_axis, out_axis) -> nn.initializers.Initializer:
    return nn.initializers.variance_scaling(1.0, "fan_in", "truncated_normal", in_axis=in_axis, out_axis=out_axis)


class RMSNorm(nn.Module):
    """x / rms(x) in float32, cast back to the compute dtype, then times weight (as the reference)."""

    config: MistralConfig

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        weight = _param(self, "weight", (x.shape[-1],), ("embed",), nn.initializers.ones)
        x32 = x.astype(jnp.float32)
        normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.config.norm_eps)
        return normed.astype(self.config.dtype) * weight.reshape((1,) * (x.ndim - 1) + (-1,))


class Attention(nn.Module):
    """Grouped-query self-attention with RoPE and an optional sliding window."""

    config: MistralConfig

    @nn.compact
    def __call__(self, x: jnp.ndarray, positions: jnp.ndarray) -> jnp.ndarray:
        c = self.config
        D, H, K, d = c.dim, c.n_heads, c.n_kv_heads, c.head_dim
        wq = _param(self, "wq", (D, H, d), ("embed", "heads", "head_dim"), _fan_in(0, (1, 2)))
        wk = _param(self, "wk", (D, K, d), ("embed", "kv_heads", "head_dim"), _fan_in(0, (1, 2)))
        wv = _param(self, "wv", (D, K, d), ("embed", "kv_heads", "head_dim"), _fan_in(0, (1, 2)))
        wo = _param(self, "wo", (H, d, D), ("heads", "head_dim", "embed"), _fan_in((0, 1), 2))
        q = apply_rope(jnp.einsum("BTD,DHd->BTHd", x, wq), positions, c.rope_theta)
        k = apply_rope(jnp.einsum("BTD,DKd->BTKd", x, wk), positions, c.rope_theta)
        v = jnp.einsum("BTD,DKd->BTKd", x, wv)
        out = causal_attention(q, k, v, c.sliding_window)
        return jnp.einsum("BTHd,HdD->BTD", out, wo)


class FeedForward(nn.Module):
    """SwiGLU: w2(silu(w1 x) * w3 x)."""

    config: MistralConfig

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        c = self.config
        w1 = _param(self, "w1", (c.dim, c.hidden_dim), ("embed", "mlp"), _fan_in(0, 1))
        w3 = _param(self, "w3", (c.dim, c.hidden_dim), ("embed", "mlp"), _fan_in(0, 1))
        w2 = _param(self, "w2", (c.hidden_dim, c.dim), ("mlp", "embed"), _fan_in(0, 1))
        gate = jax.nn.silu(jnp.einsum("BTD,DF->BTF", x, w1))
        return jnp.einsum("BTF,FD->BTD", gate * jnp.einsum("BTD,DF->BTF", x, w3), w2)


class Block(nn.Module):
    """Pre-norm transformer block; the (carry, output) signature is what nn.scan expects."""

    config: MistralConfig

    @nn.compact
    def __call__(self, x: jnp.ndarray, positions: jnp.ndarray) -> tuple[jnp.ndarray, None]:
        c = self.config
        h = x + Attention(c, name="attention")(RMSNorm(c, name="attention_norm")(x), positions)
        out = h + FeedForward(c, name="feed_forward")(RMSNorm(c, name="ffn_norm")(h))
        return out, None


class Mistral(nn.Module):
    """tokens int [B, T] -> logits float32 [B, T, V]."""

    config: MistralConfig

    @nn.compact
    def __call__(self, tokens: jnp.ndarray) -> jnp.ndarray:
        c = self.config
        B, T = tokens.shape
        embedding = _param(self, "tok_embeddings", (c.vocab_size, c.dim), ("vocab", "embed"),
                           nn.initializers.normal(1.0))
        x = jnp.take(embedding, tokens, axis=0)
        positions = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32)[None, :], (B, T))

        block = Block
        if c.remat != "none":
            block = nn.remat(Block, policy=REMAT_POLICIES[c.remat], prevent_cse=False)
        layers = nn.scan(block, variable_axes={"params": 0}, split_rngs={"params": True},
                         in_axes=nn.broadcast, length=c.n_layers,
                         metadata_params={nn.PARTITION_NAME: "layers"})
        x, _ = layers(c, name="layers")(x, positions)

        x = RMSNorm(c, name="norm")(x)
        output = _param(self, "output", (c.dim, c.vocab_size), ("embed", "vocab"), _fan_in(0, 1))
        return jnp.einsum("BTD,DV->BTV", x, output, preferred_element_type=jnp.float32)
