"""The Mistral transformer as Flax linen modules.

Shapes: B batch, T sequence (or chunk), C cache slots, D dim, H heads, K kv heads,
d head dim, F hidden dim, V vocab, L layers, E experts.

Parameter names are Mistral-native (tok_embeddings, layers/attention/wq, feed_forward/w1,
attention_norm, ffn_norm, norm, output; with experts feed_forward/gate and
feed_forward/w1 [E, D, F], the experts stacked); kernels are stored input-major ([D, H, d] for wq),
and each carries logical axis names for runtime/sharding.py. Every parameter under `layers` has a
leading L axis, scanned over, so each kind of layer (config.window_kinds) compiles once:
the layout of checkpoints and training. With config.scan_layers False the stack is a block
per layer over `layers_0` ... `layers_{L-1}` (unstack_layers), which decodes faster on CPU
(platforms.decode_per_layer).
"""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from mistral_jax.model import moe, rope
from mistral_jax.model.attention import attention_mask, causal_attention, masked_attention
from mistral_jax.model.cache import KVCache, rolling_update, write_slots
from mistral_jax.model.config import REMAT_POLICIES, MistralConfig
from mistral_jax.runtime.sharding import constrain, logical_shardings

ACTIVATIONS = ("batch", "length", None)  # [B, T, D] between blocks: split by rows, whole in D


def _param(module: nn.Module, name: str, shape: tuple[int, ...], axes: tuple[str, ...],
           init: nn.initializers.Initializer) -> jnp.ndarray:
    """A parameter annotated with logical axes, cast to the compute dtype."""
    c = module.config
    value = module.param(name, nn.with_logical_partitioning(init, axes), shape, jnp.dtype(c.param_dtype))
    return value.astype(c.dtype)


def _project(module: nn.Module, name: str, spec: str, x: jnp.ndarray, w: jnp.ndarray) -> jnp.ndarray:
    """einsum(spec, x, w), plus the low-rank path (x·a)·b where the "lora" collection holds an
    adapter {"a", "b"} of w (training/lora.py): a spans w's contracted dimensions, b its output ones."""
    y = jnp.einsum(spec, x, w)
    if not module.has_variable("lora", name):
        return y
    adapter = module.get_variable("lora", name)
    (x_dims, w_dims), out = spec.split("->")[0].split(","), spec.split("->")[1]
    contracted = "".join(c for c in w_dims if c in x_dims)
    rows, produced = "".join(c for c in x_dims if c not in w_dims), "".join(c for c in w_dims if c not in x_dims)
    low = jnp.einsum(f"{x_dims},{contracted}r->{rows}r", x, adapter["a"].astype(x.dtype))
    return y + jnp.einsum(f"{rows}r,r{produced}->{out}", low, adapter["b"].astype(x.dtype))


def _fan_in(in_axis, out_axis, batch_axis=()) -> nn.initializers.Initializer:
    return nn.initializers.variance_scaling(1.0, "fan_in", "truncated_normal", in_axis=in_axis, out_axis=out_axis,
                                            batch_axis=batch_axis)


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
    """Grouped-query self-attention with RoPE and an optional sliding window (this layer's).

    Without a cache: the full sequence at positions 0..T-1. With a cache: this layer's (k, v)
    [B, C, K, d], the slots [B, T] this chunk writes, and the mask [B, T, S] of the keys it
    reads (built once per call and kind of layer by Mistral), returning the updated (k, v) too.
    """

    config: MistralConfig
    window: int | None

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
        inverse_frequencies, scale = rope.frequencies(d, c.rope_theta, c.yarn)
        q = rope.apply_rope(_project(self, "wq", "ND,DHd->NHd", tokens, wq).reshape(B, T, H, d), positions,
                            inverse_frequencies, scale)
        k = rope.apply_rope(_project(self, "wk", "ND,DKd->NKd", tokens, wk).reshape(B, T, K, d), positions,
                            inverse_frequencies, scale)
        if c.llama_4_scaling is not None:  # queries only, by absolute position
            q = q * rope.query_scale(positions, c.llama_4_scaling)[:, :, None, None].astype(q.dtype)
        v = _project(self, "wv", "ND,DKd->NKd", tokens, wv).reshape(B, T, K, d)
        if cache is None:
            out = causal_attention(q, k, v, self.window, c.attention, c.attention_block)
        else:
            k_cache, v_cache = cache
            cache = rolling_update(k_cache, slots, k), rolling_update(v_cache, slots, v)
            if q.shape[1] == 1:  # decode: write, then read the cache (no copy of it)
                out = masked_attention(q, *cache, mask)
            else:  # prefill chunk: read cache ∪ chunk, since early queries need slots later tokens overwrite
                out = masked_attention(q, jnp.concatenate([k_cache, k], axis=1),
                                       jnp.concatenate([v_cache, v], axis=1), mask)
        return _project(self, "wo", "NHd,HdD->ND", out.reshape(B * T, H, d), wo).reshape(B, T, D), cache


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
        gate = jax.nn.silu(_project(self, "w1", "ND,DF->NF", tokens, w1))
        return _project(self, "w2", "NF,FD->ND", gate * _project(self, "w3", "ND,DF->NF", tokens, w3),
                        w2).reshape(x.shape)


class Experts(nn.Module):
    """Mixtral's feed-forward: a router `gate` [D, E] and E SwiGLU experts stacked [E, ...],
    each token through config.moe.n_experts_per_tok of them (moe.py). x [B, T, D] -> (y, the
    routing's moe.RouterStats)."""

    config: MistralConfig

    @nn.compact
    def __call__(self, x: jnp.ndarray):
        c = self.config
        E, D, F = c.moe.n_experts, c.dim, c.hidden_dim
        gate = _param(self, "gate", (D, E), ("embed", None), _fan_in(0, 1))
        w1 = _param(self, "w1", (E, D, F), ("expert", "embed", "mlp"), _fan_in(1, 2, 0))
        w3 = _param(self, "w3", (E, D, F), ("expert", "embed", "mlp"), _fan_in(1, 2, 0))
        w2 = _param(self, "w2", (E, F, D), ("expert", "mlp", "embed"), _fan_in(1, 2, 0))
        y, stats = moe.feed_forward(x.reshape(-1, D), gate, w1, w3, w2, c.moe.n_experts_per_tok, c.expert_kernel)
        return y.reshape(x.shape), stats


class Block(nn.Module):
    """Pre-norm transformer block whose attention sees `window` keys (None: all before it):
    x [B, T, D] -> (x, the layer's updated cache, its router's stats: None without experts)."""

    config: MistralConfig
    window: int | None

    @nn.compact
    def __call__(self, x: jnp.ndarray, positions: jnp.ndarray, cache, slots, mask):
        c = self.config
        attended, cache = Attention(c, self.window, name="attention")(
            RMSNorm(c, name="attention_norm")(x), positions, cache, slots, mask)
        h = x + attended
        normed = RMSNorm(c, name="ffn_norm")(h)
        if c.moe:
            mixed, stats = Experts(c, name="feed_forward")(normed)
        else:
            mixed, stats = FeedForward(c, name="feed_forward")(normed), None
        return constrain(h + mixed, ACTIVATIONS), cache, stats


class Mistral(nn.Module):
    """tokens int [B, T] -> logits float32 [B, T, V].

    With a KVCache, tokens are a chunk at `positions` [B, T] (-1 marks padding) following
    what the cache holds, and the call returns (logits, updated cache). With logits_at [B]
    (an index into T per row), only those positions are projected onto the vocabulary:
    logits [B, 1, V], what a prefill chunk needs, at 1/T of the output projection's cost.

    Each layer attends as its window says (config.windows). The layers are one `lax.scan`
    over the params stacked under `layers` (_scan_over_layers, or with a cache
    _scan_over_groups), so each kind of layer compiles once; or, with config.scan_layers
    False, a block per layer over unstack_layers' params. The cache follows the same layout
    (KVCache.init). With experts, the routers' moe.RouterStats, summed over the layers, are
    sown in the "router" collection (apply with mutable=["router"] to have them).
    With a "lora" collection (lora.variables: adapters stacked [L, ...] under "layers"), each
    adapted projection adds its low-rank path (_project).

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
        # What each kind of layer reads: its slots [B, T] and mask [B, T, S]; None without a cache.
        slots = masks = new_positions = (None,) * len(c.window_kinds)
        if cache is not None:
            slots = tuple(write_slots(positions, held.shape[1]) for held in cache.positions)
            new_positions = tuple(rolling_update(held, s, positions) for held, s in zip(cache.positions, slots))
            # After writing for a decode token; cache ∪ chunk for a prefill chunk.
            key_positions = new_positions if T == 1 else tuple(
                jnp.concatenate([held, positions], axis=1) for held in cache.positions)
            masks = tuple(attention_mask(positions, keys, w) for keys, w in zip(key_positions, c.window_kinds))

        stats = None
        # LoRA adapters of the layers (lora.variables), stacked [L, ...] like the weights.
        adapters = self.get_variable("lora", "layers") if self.has_variable("lora", "layers") else None
        if c.scan_layers:
            layers = self.param("layers", _init_layers, c)
            if cache is None:
                x, stats = _scan_over_layers(c, layers, adapters, x, positions)
            else:
                x, kv = _scan_over_groups(c, layers, adapters, x, positions, (cache.k, cache.v), slots, masks)
        else:
            if adapters is not None:
                raise ValueError("LoRA adapters stacked over the layers need config.scan_layers; merge them into "
                                 "the params first (lora.merge)")
            kv = None if cache is None else tuple(tuple(list(stack) for stack in per_kind)
                                                  for per_kind in (cache.k, cache.v))
            seen = [0] * len(c.window_kinds)
            for i, kind in enumerate(c.layer_kinds):
                n, seen[kind] = seen[kind], seen[kind] + 1  # layer i is the n-th of its kind
                layer_cache = None if cache is None else (kv[0][kind][n], kv[1][kind][n])
                x, layer_cache, layer_stats = _remat(c, Block)(c, c.windows[i], name=f"layers_{i}")(
                    x, positions, layer_cache, slots[kind], masks[kind])
                stats = layer_stats if stats is None else jax.tree_util.tree_map(jnp.add, stats, layer_stats)
                if cache is not None:
                    kv[0][kind][n], kv[1][kind][n] = layer_cache
            if cache is not None:
                kv = tuple(tuple(tuple(stack) for stack in per_kind) for per_kind in kv)

        if stats is not None:  # every layer's, for the auxiliary losses (trainer.loss_fn)
            self.sow("router", "stats", stats)
        if logits_at is not None:
            x = jnp.take_along_axis(x, logits_at[:, None, None], axis=1)
        x = RMSNorm(c, name="norm")(x)
        if self.lm_head:
            n = x.shape[1]
            if c.tied_embeddings:  # the embedding is the output projection
                x = jnp.einsum("ND,VD->NV", x.reshape(B * n, c.dim), embedding, preferred_element_type=jnp.float32)
            else:
                output = _param(self, "output", (c.dim, c.vocab_size), ("embed", "vocab"), _fan_in(0, 1))
                x = jnp.einsum("ND,DV->NV", x.reshape(B * n, c.dim), output, preferred_element_type=jnp.float32)
            x = constrain(x.reshape(B, n, c.vocab_size), ("batch", "length", "vocab"))
        if cache is None:
            return x
        return x, KVCache(k=kv[0], v=kv[1], positions=new_positions)


def _remat(config: MistralConfig, block):
    """The block class or function, rematerialised in the backward pass as config.remat says."""
    if config.remat == "none":
        return block
    policy = getattr(jax.checkpoint_policies, REMAT_POLICIES[config.remat])
    if isinstance(block, type):
        return nn.remat(block, policy=policy, prevent_cse=False)
    return jax.checkpoint(block, policy=policy, prevent_cse=False)


def _init_layers(key: jax.Array, config: MistralConfig):
    """Fresh weights of every layer, stacked [L, ...], boxed with a leading `layers` axis."""
    x, positions = jnp.zeros((1, 1, config.dim), config.dtype), jnp.zeros((1, 1), jnp.int32)
    init = functools.partial(Block(config, None).init, x=x, positions=positions, cache=None, slots=None, mask=None)
    stacked = jax.vmap(lambda k: init(k)["params"])(jax.random.split(key, config.n_layers))
    return jax.tree_util.tree_map(lambda box: box.replace(names=("layers",) + tuple(box.names)), stacked,
                                  is_leaf=lambda v: isinstance(v, nn.Partitioned))


def _scan_over_layers(config: MistralConfig, layers, adapters, x, positions):
    """x through the layers stacked [L, ...] in `layers` (and their LoRA adapters, or None)
    without a cache (training, full sequences) -> (x, the routers' stats summed over the
    layers, None without experts).

    A scan over the L layers, each choosing its kind's block by `lax.switch` (one kind: a
    plain call), the routers' stats summed in its carry. The scan's inputs are the stacked
    weights themselves, which the backward pass reads back rather than saving a copy: the
    grouped form below costs a second copy of the weights here (+3.5 GB per device on the
    7B train plan, docs/SCALING.md)."""
    kinds = [functools.partial(_apply_block, config, w) for w in config.window_kinds]
    kind_of_layer = jnp.array(config.layer_kinds, jnp.int32)

    def block(weights, adapter, x, kind):
        x, _, stats = jax.lax.switch(kind, kinds, weights, x, positions, None, None, None, adapter)
        return x, stats

    def layer(carry, xs):
        weights, adapter, kind = xs
        x, stats = block(weights, adapter, carry[0], kind)
        return (x, None if stats is None else jax.tree_util.tree_map(jnp.add, carry[1], stats)), None

    block = _remat(config, block)
    stats = moe.RouterStats.zeros(config.moe.n_experts) if config.moe else None
    return jax.lax.scan(layer, (x, stats), (layers, adapters, kind_of_layer))[0]


def _scan_over_groups(config: MistralConfig, layers, adapters, x, positions, kv, slots, masks):
    """x through the layers stacked [L, ...] in `layers` (and their LoRA adapters, or None)
    with kv, per kind of layer its caches (k, v) stacked as KVCache.init lays them out ->
    (x, the updated kv).

    A scan over the G groups of P = len(config.layer_pattern) layers, each position of
    the group a block of its own window over its kind's cache, whose sizes
    differ by kind; kv holds each kind's layers grouped, [G, n, ...] (KVCache.init). The
    weights [L, ...] -> [G, P, ...] are a reshape: layer g*P + j is position j of group g.
    One kind (P = 1) scans the layers themselves."""
    pattern = config.layer_pattern
    P, G = len(pattern), config.n_layers // len(pattern)
    kinds = config.layer_kinds[:P]
    index_in_kind = [kinds[:j].count(kind) for j, kind in enumerate(kinds)]  # within the group

    def group(x, xs):
        weights, adapter, caches = xs
        caches = [[list(stack) for stack in per_kind] for per_kind in caches]
        for j, window in enumerate(pattern):
            kind, n = kinds[j], index_in_kind[j]
            layer, layer_adapter = jax.tree_util.tree_map(lambda w: w[j], (weights, adapter))
            x, (caches[0][kind][n], caches[1][kind][n]), _ = _apply_block(
                config, window, layer, x, positions, (caches[0][kind][n], caches[1][kind][n]), slots[kind],
                masks[kind], layer_adapter)
        return x, tuple(tuple(jnp.stack(stack) for stack in per_kind) for per_kind in caches)

    if not config.grouped_layers:  # stored [L, ...]: grouping it cost the cpu-8 7B prefill 5.28 -> 6.91 GiB
        def layer(x, xs):
            weights, adapter, (k, v) = xs
            x, cache, _ = _apply_block(config, pattern[0], weights, x, positions, (k[0], v[0]), slots[0], masks[0],
                                       adapter)
            return x, ((cache[0],), (cache[1],))
        return jax.lax.scan(layer, x, (layers, adapters, kv))
    grouped, adapters = jax.tree_util.tree_map(lambda w: w.reshape(G, P, *w.shape[1:]), (layers, adapters))
    return jax.lax.scan(group, x, (grouped, adapters, kv))


def _apply_block(config: MistralConfig, window: int | None, weights, x, positions, cache, slots, mask,
                 adapter=None):
    variables = {"params": weights} if adapter is None else {"params": weights, "lora": adapter}
    return Block(config, window).apply(variables, x, positions, cache, slots, mask)


def output_matrix(config: MistralConfig, params) -> jnp.ndarray:
    """The output projection [D, V]: `output`, or with tied embeddings tok_embeddings transposed."""
    return params["tok_embeddings"].T if config.tied_embeddings else params["output"]


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
