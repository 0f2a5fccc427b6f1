"""The Mistral transformer as Flax linen modules.

Shapes: B batch, T sequence (or chunk), C cache slots, D dim, H heads, K kv heads,
d head dim, F hidden dim, V vocab, L layers.

Parameter names are Mistral-native (tok_embeddings, layers/attention/wq, feed_forward/w1,
attention_norm, ffn_norm, norm, output); kernels are stored input-major ([D, H, d] for wq),
and each carries logical axis names for sharding.py. The layer stack is one `nn.scan`, so
every parameter under `layers` has a leading L axis and the block compiles once: the layout
of checkpoints and training. With config.scan_layers False the stack is a block per layer
over `layers_0` ... `layers_{L-1}` (unstack_layers), which decodes faster on CPU
(platforms.decode_per_layer).
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from mistral_jax.attention import attention_mask, causal_attention, masked_attention
from mistral_jax.cache import KVCache, rolling_update, write_slots
from mistral_jax.config import REMAT_POLICIES, MistralConfig
from mistral_jax.rope import apply_rope
from mistral_jax.sharding import constrain, logical_shardings

ACTIVATIONS = ("batch", "length", None)  # [B, T, D] between blocks: split by rows, whole in D


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
        # two, which XLA:CPU runs far slower (BENCHMARKS.md, "projections on [B, T, D]").
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

    The layers are one scanned block over params stacked under `layers`, or with
    config.scan_layers False a block per layer over unstack_layers' params; the cache
    follows the same layout (KVCache.init).

    lm_head: if False, the call returns the final normed states [B, T, D] instead of logits,
    for a caller that applies the `output` projection itself (loss.cross_entropy).
    """

    config: MistralConfig
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
            block = nn.remat(Block, policy=getattr(jax.checkpoint_policies, REMAT_POLICIES[c.remat]),
                             prevent_cse=False)
        if c.scan_layers:
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
                layer_caches = tuple(k for k, _ in written), tuple(v for _, v in written)

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


def abstract_params(config: MistralConfig):
    """The params' shapes and dtypes, boxed with their logical axis names (nn.Partitioned), with
    nothing allocated."""
    return jax.eval_shape(Mistral(config).init, jax.random.key(0), jnp.zeros((1, 1), jnp.int32))["params"]


def init_params(config: MistralConfig, key: jax.Array):
    """Fresh params of Mistral(config) (unboxed); jit it with out_shardings=param_shardings(...)
    to have them born sharded."""
    return nn.unbox(Mistral(config).init(key, jnp.zeros((1, 1), jnp.int32))["params"])


def param_shardings(config: MistralConfig, mesh: Mesh):
    """NamedSharding per parameter over mesh, from the logical axes the model declares."""
    return logical_shardings(abstract_params(config), mesh)


def unstack_layers(config: MistralConfig, params: dict) -> tuple[MistralConfig, dict]:
    """(config, params) with the layers stacked under `layers` -> the same model with a block
    per layer: config.scan_layers False, `layers_i` holding layer i's weights. Each weight
    keeps its sharding less the layer axis. On CPU each is a view of the stacked array's
    memory, so nothing is copied; elsewhere each is a copy."""
    if not config.scan_layers:
        raise ValueError("the params are already laid out per layer (config.scan_layers is False)")
    params = dict(params)
    leaves, treedef = jax.tree_util.tree_flatten(params.pop("layers"))
    per_layer = zip(*(_layer_arrays(stacked) for stacked in leaves))
    params.update({f"layers_{i}": jax.tree_util.tree_unflatten(treedef, w) for i, w in enumerate(per_layer)})
    return config.replace(scan_layers=False), params


def _layer_arrays(stacked: jax.Array) -> list[jax.Array]:
    """stacked [L, ...] -> L arrays [...]: per device, a view of each layer of its shard, which
    aliases the shard's memory where it is host memory (np.asarray and device_put copy nothing)."""
    stacked = jnp.asarray(stacked)
    sharding = stacked.sharding
    if isinstance(sharding, NamedSharding):
        spec = tuple(sharding.spec) + (None,) * (stacked.ndim - len(sharding.spec))
        sharding = NamedSharding(sharding.mesh, PartitionSpec(*spec[1:]))  # the layer axis is never split
    shards = stacked.addressable_shards
    views = [[jax.device_put(layer, shard.device, may_alias=True) for layer in np.asarray(shard.data)]
             for shard in shards]
    return [jax.make_array_from_single_device_arrays(stacked.shape[1:], sharding, [v[i] for v in views])
            for i in range(stacked.shape[0])]
