"""The Mistral transformer: the embedding, the stacks of blocks (layers.py), the final norm and
the output projection, as a Flax linen module; its params made, laid out and sharded.

Shapes: B batch, T sequence (or chunk), C cache slots, D dim, V vocab, L layers.

Parameter names are Mistral-native (tok_embeddings, layers/attention/wq, feed_forward/w1,
attention_norm, ffn_norm, norm, output; with experts feed_forward/gate and
feed_forward/w1 [E, D, F], the experts stacked). Every parameter under a stack (`layers`; with
dense-first experts `dense_layers` before it: config.stacks) has a leading L axis, scanned over,
so each kind of layer (config.window_kinds) compiles once: the layout of checkpoints and
training. With config.scan_layers False the stacks are a block per layer over `layers_0` ...
`layers_{L-1}` (unstack_layers), which decodes faster on CPU (platforms.decode_per_layer).
"""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from mistral_jax.model import moe, quantize
from mistral_jax.model.attention import attention_mask
from mistral_jax.model.cache import KVCache, rolling_update, write_slots
from mistral_jax.model.config import REMAT_POLICIES, MistralConfig
from mistral_jax.model.layers import ACTIVATIONS, Block, RMSNorm, fan_in, param
from mistral_jax.model.vision import ImageFeatures, VisionTower, flatten_images, merge_images, token_index
from mistral_jax.runtime.sharding import constrain, logical_shardings


class Mistral(nn.Module):
    """tokens int [B, T] -> logits float32 [B, T, V].

    With a KVCache, tokens are a chunk at `positions` [B, T] (-1 marks padding) following
    what the cache holds, and the call returns (logits, updated cache). With logits_at [B]
    (an index into T per row), only those positions are projected onto the vocabulary:
    logits [B, 1, V], what a prefill chunk needs, at 1/T of the output projection's cost.

    Each layer attends as its window says (config.windows). Each stack of layers
    (config.stacks) is one `lax.scan` over its params stacked under its name (_scan_over_layers,
    or with a cache _scan_over_groups), so each kind of layer compiles once; or, with
    config.scan_layers False, a block per layer over unstack_layers' params. The cache follows
    the same layout (KVCache.init). With experts, the routers' moe.RouterStats, summed over the
    layers, are sown in the "router" collection (apply with mutable=["router"] to have them).
    With a "lora" collection (lora.variables: adapters stacked [L, ...] under each stack's
    name), each adapted projection adds its low-rank path (layers.project).

    lm_head: if False, the call returns the final normed states [B, T, D] instead of logits,
    for a caller that applies the `output` projection itself (loss.cross_entropy).

    images (config.vision): the images whose embeddings replace the tokens' image tokens
    (vision.py): for one row a list of arrays [C, H, W] in order, else a list of them per row;
    or their ImageFeatures, made once by VisionTower for a prompt fed in chunks.

    segments int [B, T] (without a cache): the documents packed in each row, a token attending
    only to its own document's (training on packed examples, whose positions restart at 0 in
    each: the caller gives those too).
    """

    config: MistralConfig
    lm_head: bool = True

    @nn.compact
    def __call__(self, tokens: jnp.ndarray, positions: jnp.ndarray | None = None, cache: KVCache | None = None,
                 logits_at: jnp.ndarray | None = None, images=None, segments: jnp.ndarray | None = None):
        c = self.config
        B, T = tokens.shape
        embedding = param(self, "tok_embeddings", (c.vocab_size, c.dim), ("vocab", "embed"),
                           nn.initializers.normal(1.0))
        x = jnp.take(embedding, tokens, axis=0)
        if c.vision is not None:
            tower = VisionTower(c, name="vision")
            if images is not None and not isinstance(images, ImageFeatures):
                images = flatten_images(images, B)
                embeddings = tower(images) if images else jnp.zeros((0, c.dim), c.dtype)
                images = ImageFeatures(embeddings, token_index(c, tokens, embeddings.shape[0]))
            elif self.is_initializing():  # its params, made with the rest
                side = c.vision.pixels_per_token
                tower([jnp.zeros((c.vision.num_channels, side, side), jnp.float32)])
        elif images is not None:
            raise ValueError("images given to a model without a vision encoder (config.vision is None)")
        if images is not None:
            x = merge_images(x, images)
        x = constrain(x, ACTIVATIONS)
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32)[None, :], (B, T))
        # What each kind of layer of each stack reads (its cache entry): slots [B, T] and mask
        # [B, T, S]; None without a cache.
        n_kinds = len(c.window_kinds)
        slots = masks = new_positions = (None,) * (len(c.stacks) * n_kinds)
        if segments is not None:
            if cache is not None:
                raise ValueError("segments (packed documents) are for full sequences, not a cached prefill")
            masks = (segments,) * len(masks)  # what restricts attention without a cache (layers.Attention)
        if cache is not None:
            slots = tuple(write_slots(positions, held.shape[1]) for held in cache.positions)
            new_positions = tuple(rolling_update(held, s, positions) for held, s in zip(cache.positions, slots))
            # After writing for a decode token; cache ∪ chunk for a prefill chunk.
            key_positions = new_positions if T == 1 else tuple(
                jnp.concatenate([held, positions], axis=1) for held in cache.positions)
            masks = tuple(attention_mask(positions, keys, c.window_kinds[i % n_kinds])
                          for i, keys in enumerate(key_positions))

        stats, kv, first = None, ([], []), 0
        for s, (name, stack) in enumerate(c.stacks):
            entries = slice(s * n_kinds, (s + 1) * n_kinds)  # this stack's entries of the cache
            # LoRA adapters of the stack's layers (lora.variables), stacked [L, ...] like the weights.
            adapters = self.get_variable("lora", name) if self.has_variable("lora", name) else None
            if c.scan_layers:
                stored = self.get_variable("params", name) if self.has_variable("params", name) else None
                # Quantized layers as they are: Flax's shape check would pair q and scale with the float weights.
                layers = stored if quantize.mode_of(stored) else self.param(name, _init_layers, stack)
                if cache is None:
                    x, stack_stats = _scan_over_layers(stack, layers, adapters, x, positions, segments)
                else:
                    stack_stats = None
                    x, (k, v) = _scan_over_groups(stack, layers, adapters, x, positions,
                                                  (cache.k[entries], cache.v[entries]), slots[entries], masks[entries])
                    kv[0].extend(k)
                    kv[1].extend(v)
            else:
                if adapters is not None:
                    raise ValueError("LoRA adapters stacked over the layers need config.scan_layers; merge them into "
                                     "the params first (lora.merge)")
                x, stack_stats, stack_kv = _per_layer(stack, first, x, positions, cache and (
                    cache.k[entries], cache.v[entries]), slots[entries], masks[entries])
                if cache is not None:
                    kv[0].extend(stack_kv[0])
                    kv[1].extend(stack_kv[1])
            if stack_stats is not None:
                stats = stack_stats if stats is None else jax.tree_util.tree_map(jnp.add, stats, stack_stats)
            first += stack.n_layers

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
                output = param(self, "output", (c.dim, c.vocab_size), ("embed", "vocab"), fan_in(0, 1))
                x = jnp.einsum("ND,DV->NV", x.reshape(B * n, c.dim), output, preferred_element_type=jnp.float32)
            x = constrain(x.reshape(B, n, c.vocab_size), ("batch", "length", "vocab"))
        if cache is None:
            return x
        return x, KVCache(k=tuple(kv[0]), v=tuple(kv[1]), positions=new_positions)


def _per_layer(config: MistralConfig, first: int, x, positions, kv, slots, masks):
    """x through a stack's layers as a block per layer (config.scan_layers False), over params
    `layers_{first}` ... and, with a cache, kv: per kind its caches, a tuple of the kind's
    layers -> (x, the routers' stats summed, the updated kv)."""
    kv = None if kv is None else tuple(tuple(list(per_kind) for per_kind in part) for part in kv)
    stats = None
    seen = [0] * len(config.window_kinds)
    for i, kind in enumerate(config.layer_kinds):
        n, seen[kind] = seen[kind], seen[kind] + 1  # layer i is the n-th of its kind
        layer_cache = None if kv is None else (kv[0][kind][n], kv[1][kind][n])
        x, layer_cache, layer_stats = _remat(config, Block)(config, config.windows[i], name=f"layers_{first + i}")(
            x, positions, layer_cache, slots[kind], masks[kind])
        stats = layer_stats if stats is None else jax.tree_util.tree_map(jnp.add, stats, layer_stats)
        if kv is not None:
            kv[0][kind][n], kv[1][kind][n] = layer_cache
    return x, stats, None if kv is None else tuple(tuple(tuple(per_kind) for per_kind in part) for part in kv)


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


def _scan_over_layers(config: MistralConfig, layers, adapters, x, positions, segments=None):
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
        x, _, stats = jax.lax.switch(kind, kinds, weights, x, positions, None, None, segments, adapter)
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


def param_shardings(config: MistralConfig, mesh: Mesh, like=None):
    """NamedSharding per parameter over mesh, from the logical axes the model declares; shaped
    as the params `like` (arrays or their shapes) where they hold quantized weights: q and scale
    each by the weight's axes (model/quantize.py)."""
    boxed = abstract_params(config)
    return logical_shardings(boxed if like is None else quantize.annotate(boxed, like), mesh)


def unstack_layers(config: MistralConfig, params: dict) -> tuple[MistralConfig, dict]:
    """(config, params) with the layers stacked under `layers` (and `dense_layers`) -> the same
    model with a block per layer: config.scan_layers False, `layers_i` holding layer i's weights. Each weight
    keeps its sharding less the layer axis. On CPU each is a view of the stacked array's
    memory, so nothing is copied; elsewhere each is a copy."""
    if not config.scan_layers:
        raise ValueError("the params are already laid out per layer (config.scan_layers is False)")
    params, first = dict(params), 0
    for name, stack in config.stacks:  # numbered across the stacks, in order
        leaves, treedef = jax.tree_util.tree_flatten(params.pop(name))
        per_layer = zip(*(_layer_arrays(stacked) for stacked in leaves))
        params.update({f"layers_{first + i}": jax.tree_util.tree_unflatten(treedef, w)
                       for i, w in enumerate(per_layer)})
        first += stack.n_layers
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
