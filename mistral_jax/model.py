"""The Mistral transformer as Flax linen modules.

Shapes: B batch, T sequence (or chunk), C cache slots, D dim, H heads, K kv heads,
d head dim, F hidden dim, V vocab, L layers.

Parameter names are Mistral-native (tok_embeddings, layers/attention/wq, feed_forward/w1,
attention_norm, ffn_norm, norm, output); kernels are stored input-major ([D, H, d] for wq),
and each carries logical axis names for sharding.py. The layer stack is one `nn.scan`, so
every parameter under `layers` has a leading L axis and the block compiles once: the layout
of checkpoints and training. For decoding on CPU, `unstack_layers` gives each layer its own
arrays (`layers_0` ... `layers_{L-1}`) and `Mistral(config, scan_layers=False)` runs them
as L blocks: a scan slices each layer's weights out of the stack, and XLA:CPU copies every
slice before multiplying by it, which adds a copy of every weight to each decode step. (On
TPU, sample.py keeps the stacked layout: see there.)
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec

from mistral_jax.attention import attention_mask, causal_attention, masked_attention
from mistral_jax.cache import KVCache, rolling_update, write_slots
from mistral_jax.config import MistralConfig
from mistral_jax.rope import apply_rope
from mistral_jax.sharding import constrain

ACTIVATIONS = ("batch", "length", None)  # [B, T, D] between blocks: split by rows, whole in D

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
    """Grouped-query self-attention with RoPE and an optional sliding window.

    Without a cache: the full sequence at positions 0..T-1. With a cache: this layer's (k, v)
    [B, C, K, d], the slots [B, T] this chunk writes, and the mask [B, T, S] of the keys it
    reads (built once per call by Mistral), returning the updated (k, v) too.
    """

    config: MistralConfig

    @nn.compact
    def __call__(self, x: jnp.ndarray, positions: jnp.ndarray, cache=None, slots=None, mask=None):
        c = self.config
        D, H, K, d = c.dim, c.n_heads, c.n_kv_heads, c.head_dim
        wq = _param(self, "wq", (D, H, d), ("embed", "heads", "head_dim"), _fan_in(0, (1, 2)))
        wk = _param(self, "wk", (D, K, d), ("embed", "kv_heads", "head_dim"), _fan_in(0, (1, 2)))
        wv = _param(self, "wv", (D, K, d), ("embed", "kv_heads", "head_dim"), _fan_in(0, (1, 2)))
        wo = _param(self, "wo", (H, d, D), ("heads", "head_dim", "embed"), _fan_in((0, 1), 2))
        B, T, _ = x.shape
        tokens = x.reshape(B * T, D)  # see FeedForward
        q = apply_rope(jnp.einsum("ND,DHd->NHd", tokens, wq).reshape(B, T, H, d), positions, c.rope_theta)
        k = apply_rope(jnp.einsum("ND,DKd->NKd", tokens, wk).reshape(B, T, K, d), positions, c.rope_theta)
        v = jnp.einsum("ND,DKd->NKd", tokens, wv).reshape(B, T, K, d)
        if cache is None:
            out = causal_attention(q, k, v, c.sliding_window, c.attention, c.attention_block)
        else:
            k_cache, v_cache = cache
            cache = rolling_update(k_cache, slots, k), rolling_update(v_cache, slots, v)
            if q.shape[1] == 1:  # decode: write, then read the cache (no copy of it)
                out = masked_attention(q, *cache, mask)
            else:  # prefill chunk: read cache ∪ chunk, since early queries need slots later tokens overwrite
                out = masked_attention(q, jnp.concatenate([k_cache, k], axis=1),
                                       jnp.concatenate([v_cache, v], axis=1), mask)
        return jnp.einsum("NHd,HdD->ND", out.reshape(B * T, H, d), wo).reshape(B, T, D), cache


class FeedForward(nn.Module):
    """SwiGLU: w2(silu(w1 x) * w3 x)."""

    config: MistralConfig

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        c = self.config
        w1 = _param(self, "w1", (c.dim, c.hidden_dim), ("embed", "mlp"), _fan_in(0, 1))
        w3 = _param(self, "w3", (c.dim, c.hidden_dim), ("embed", "mlp"), _fan_in(0, 1))
        w2 = _param(self, "w2", (c.hidden_dim, c.dim), ("mlp", "embed"), _fan_in(0, 1))
        # On [B*T, D], not [B, T, D]: each weight gradient then contracts one dimension, not
        # two, which XLA:CPU ran ~1.5x slower (a 6-layer SwiGLU stack's gradient: 870 vs 560 ms).
        tokens = x.reshape(-1, c.dim)
        gate = jax.nn.silu(jnp.einsum("ND,DF->NF", tokens, w1))
        return jnp.einsum("NF,FD->ND", gate * jnp.einsum("ND,DF->NF", tokens, w3), w2).reshape(x.shape)


class Block(nn.Module):
    """Pre-norm transformer block; the (carry, output) signature is what nn.scan expects."""

    config: MistralConfig

    @nn.compact
    def __call__(self, x: jnp.ndarray, positions: jnp.ndarray, cache, slots, mask):
        c = self.config
        attended, cache = Attention(c, name="attention")(
            RMSNorm(c, name="attention_norm")(x), positions, cache, slots, mask)
        h = x + attended
        out = h + FeedForward(c, name="feed_forward")(RMSNorm(c, name="ffn_norm")(h))
        return constrain(out, ACTIVATIONS), cache


class Mistral(nn.Module):
    """tokens int [B, T] -> logits float32 [B, T, V].

    With a KVCache, tokens are a chunk at `positions` [B, T] (-1 marks padding) following
    what the cache holds, and the call returns (logits, updated cache). With logits_at [B]
    (an index into T per row), only those positions are projected onto the vocabulary:
    logits [B, 1, V], what a prefill chunk needs, at 1/T of the output projection's cost.

    scan_layers: one scanned block over params stacked under `layers` (and a cache stacked
    [L, ...]), or, if False, a block per layer over `unstack_layers(params)` (and a cache
    holding a list of L arrays, KVCache.init(..., stacked=False)).

    lm_head: if False, the call returns the final normed states [B, T, D] instead of logits,
    for a caller that applies the `output` projection itself (loss.cross_entropy).
    """

    config: MistralConfig
    scan_layers: bool = True
    lm_head: bool = True

    @nn.compact
    def __call__(self, tokens: jnp.ndarray, positions: jnp.ndarray | None = None, cache: KVCache | None = None,
                 logits_at: jnp.ndarray | None = None):
        c = self.config
        B, T = tokens.shape
        embedding = _param(self, "tok_embeddings", (c.vocab_size, c.dim), ("vocab", "embed"),
                           nn.initializers.normal(1.0))
        x = constrain(jnp.take(embedding, tokens, axis=0), ACTIVATIONS)
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32)[None, :], (B, T))
        layer_caches = slots = mask = new_positions = None
        if cache is not None:
            layer_caches = (cache.k, cache.v)
            slots = write_slots(positions, cache.positions.shape[1])
            new_positions = rolling_update(cache.positions, slots, positions)
            # What every layer reads: after writing for a decode token; cache ∪ chunk for a prefill chunk.
            key_positions = new_positions if T == 1 else jnp.concatenate([cache.positions, positions], axis=1)
            mask = attention_mask(positions, key_positions, c.sliding_window)

        block = Block
        if c.remat != "none":
            block = nn.remat(Block, policy=REMAT_POLICIES[c.remat], prevent_cse=False)
        if self.scan_layers:
            layers = nn.scan(block, variable_axes={"params": 0}, split_rngs={"params": True},
                             in_axes=(nn.broadcast, 0, nn.broadcast, nn.broadcast), length=c.n_layers,
                             metadata_params={nn.PARTITION_NAME: "layers"})
            x, layer_caches = layers(c, name="layers")(x, positions, layer_caches, slots, mask)
        else:
            written = []
            for i in range(c.n_layers):
                layer_cache = None if cache is None else (layer_caches[0][i], layer_caches[1][i])
                x, layer_cache = block(c, name=f"layers_{i}")(x, positions, layer_cache, slots, mask)
                written.append(layer_cache)
            if cache is not None:
                layer_caches = [k for k, _ in written], [v for _, v in written]

        if logits_at is not None:
            x = jnp.take_along_axis(x, logits_at[:, None, None], axis=1)
        x = RMSNorm(c, name="norm")(x)
        if self.lm_head:
            output = _param(self, "output", (c.dim, c.vocab_size), ("embed", "vocab"), _fan_in(0, 1))
            n = x.shape[1]
            x = jnp.einsum("ND,DV->NV", x.reshape(B * n, c.dim), output, preferred_element_type=jnp.float32)
            x = constrain(x.reshape(B, n, c.vocab_size), ("batch", "length", "vocab"))
        if cache is None:
            return x
        k, v = layer_caches
        return x, KVCache(k=k, v=v, positions=new_positions)


def layers_stacked(params: dict) -> bool:
    """Whether params are in the scanned layout (`layers`) rather than unstack_layers'."""
    return "layers" in params


def unstack_layers(params: dict, free_stacked: bool = False) -> dict:
    """params of Mistral(config) -> params of Mistral(config, scan_layers=False): `layers_i`
    holds layer i's weights where `layers` held all of them stacked on a leading axis. Each
    weight keeps its sharding (less the unsharded layer axis). With free_stacked, each
    stacked array is deleted once split (params must not be used afterwards), so the peak
    memory is the params plus one stacked weight rather than twice the params."""
    if not layers_stacked(params):
        raise ValueError("params have no stacked `layers`: already per layer?")
    params = dict(params)
    leaves, treedef = jax.tree_util.tree_flatten(params.pop("layers"))
    per_layer = [[] for _ in range(leaves[0].shape[0])]
    for stacked in leaves:
        for layer, weight in zip(per_layer, _split_leading_axis(stacked)):
            layer.append(weight)
        if free_stacked and isinstance(stacked, jax.Array):
            stacked.delete()
    params.update({f"layers_{i}": jax.tree_util.tree_unflatten(treedef, w) for i, w in enumerate(per_layer)})
    return params


def _split_leading_axis(stacked: jax.Array) -> tuple[jax.Array, ...]:
    sharding = getattr(stacked, "sharding", None)
    if isinstance(sharding, NamedSharding):
        spec = tuple(sharding.spec) + (None,) * (stacked.ndim - len(sharding.spec))
        sharding = NamedSharding(sharding.mesh, PartitionSpec(*spec[1:]))
    return jax.jit(lambda w: tuple(w), out_shardings=sharding)(stacked)
