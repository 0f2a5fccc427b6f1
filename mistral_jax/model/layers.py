"""The transformer block and what it is made of, as Flax linen modules: RMSNorm, grouped-query
attention and latent attention (with RoPE, its scalings and an optional sliding window), the
SwiGLU feed-forward and the experts. transformer.py stacks them into the model.

Shapes: B batch, T sequence (or chunk), C cache slots, D dim, H heads, K kv heads, d head dim,
F hidden dim, E experts, N = B*T tokens; latent attention: r kv_lora_rank, Q q_lora_rank,
n / dr / v its no-rope, rope and value head dims.

Parameters carry Mistral-native names (attention/wq, feed_forward/w1, attention_norm, ...;
latent attention's wq_a, q_a_norm, wq_b, wkv_a_with_mqa, kv_a_norm, wkv_b, wo), stored
input-major ([D, H, d] for wq), each with logical axis names for runtime/sharding.py.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp

from mistral_jax.model import moe, quantize, rope
from mistral_jax.model.attention import causal_attention, latent_attention, masked_attention
from mistral_jax.model.cache import rolling_update
from mistral_jax.model.config import MistralConfig
from mistral_jax.model.config_groups import yarn_mscale
from mistral_jax.runtime import platforms
from mistral_jax.runtime.sharding import constrain

ACTIVATIONS = ("batch", "length", None)  # [B, T, D] between blocks: split by rows, whole in D


def param(module: nn.Module, name: str, shape: tuple[int, ...], axes: tuple[str, ...],
           init: nn.initializers.Initializer) -> jnp.ndarray:
    """A parameter annotated with logical axes, cast to the compute dtype; a weight the params
    hold quantized (model/quantize.py) as quantize.Quantized, for project to multiply."""
    c = module.config
    stored = module.get_variable("params", name) if module.has_variable("params", name) else None
    if quantize.is_quantized(stored):
        if stored["q"].shape != shape:
            raise ValueError(f"quantized {module.path}/{name} has shape {stored['q'].shape}; the model expects {shape}")
        return quantize.Quantized(stored["q"], stored["scale"])
    value = module.param(name, nn.with_logical_partitioning(init, axes), shape, jnp.dtype(c.param_dtype))
    return value.astype(c.dtype)


def project(module: nn.Module, name: str, spec: str, x: jnp.ndarray, w: jnp.ndarray) -> jnp.ndarray:
    """einsum(spec, x, w), plus the low-rank path (x·a)·b where the "lora" collection holds an
    adapter {"a", "b"} of w (training/lora.py): a spans w's contracted dimensions, b its output ones.
    A quantized w is dequantized in the product, in the form the platform runs fastest."""
    if isinstance(w, quantize.Quantized):
        y = quantize.product(spec, x, w, platforms.quantized_product())
    else:
        y = jnp.einsum(spec, x, w)
    if not module.has_variable("lora", name):
        return y
    adapter = module.get_variable("lora", name)
    (x_dims, w_dims), out = spec.split("->")[0].split(","), spec.split("->")[1]
    contracted = "".join(c for c in w_dims if c in x_dims)
    rows, produced = "".join(c for c in x_dims if c not in w_dims), "".join(c for c in w_dims if c not in x_dims)
    low = jnp.einsum(f"{x_dims},{contracted}r->{rows}r", x, adapter["a"].astype(x.dtype))
    return y + jnp.einsum(f"{rows}r,r{produced}->{out}", low, adapter["b"].astype(x.dtype))


def adapted(module: nn.Module, name: str, w: jnp.ndarray) -> jnp.ndarray:
    """w [in..., out...] with its LoRA adapter's update a·b added where the "lora"
    collection holds one: for a weight used other than as a projection of x (latent
    attention's absorbed wkv_b); a quantized w dequantized."""
    w = quantize.as_float(w, module.config.dtype)
    if not module.has_variable("lora", name):
        return w
    a, b = (module.get_variable("lora", name)[k].astype(w.dtype) for k in ("a", "b"))
    r = a.shape[-1]
    delta = a.reshape(-1, r) @ b.reshape(r, -1)
    return w + delta.reshape(w.shape)


def fan_in(in_axis, out_axis, batch_axis=()) -> nn.initializers.Initializer:
    return nn.initializers.variance_scaling(1.0, "fan_in", "truncated_normal", in_axis=in_axis, out_axis=out_axis,
                                            batch_axis=batch_axis)


class RMSNorm(nn.Module):
    """x / rms(x) in float32, cast back to the compute dtype, then times weight (as the reference);
    its weight's logical axis is `axis` (the model dimension, or a latent one); eps: the config's
    norm_eps unless given (the vision encoder's own)."""

    config: MistralConfig
    axis: str = "embed"
    eps: float | None = None

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        weight = param(self, "weight", (x.shape[-1],), (self.axis,), nn.initializers.ones)
        x32 = x.astype(jnp.float32)
        eps = self.config.norm_eps if self.eps is None else self.eps
        normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
        return normed.astype(self.config.dtype) * weight.reshape((1,) * (x.ndim - 1) + (-1,))


class Attention(nn.Module):
    """Grouped-query self-attention with RoPE and an optional sliding window (this layer's).

    Without a cache: full sequences, causal; mask then None or the segment ids [B, T] of the
    documents packed in each row (a token sees only its own document). With a cache: this
    layer's (k, v) [B, C, K, d], the slots [B, T] this chunk writes, and the mask [B, T, S] of
    the keys it reads (built once per call and kind of layer by Mistral), returning the updated
    (k, v) too.
    """

    config: MistralConfig
    window: int | None

    @nn.compact
    def __call__(self, x: jnp.ndarray, positions: jnp.ndarray, cache=None, slots=None, mask=None):
        c = self.config
        D, H, K, d = c.dim, c.n_heads, c.n_kv_heads, c.head_dim
        wq = param(self, "wq", (D, H, d), ("embed", "heads", "head_dim"), fan_in(0, (1, 2)))
        wk = param(self, "wk", (D, K, d), ("embed", "kv_heads", "head_dim"), fan_in(0, (1, 2)))
        wv = param(self, "wv", (D, K, d), ("embed", "kv_heads", "head_dim"), fan_in(0, (1, 2)))
        wo = param(self, "wo", (H, d, D), ("heads", "head_dim", "embed"), fan_in((0, 1), 2))
        B, T, _ = x.shape
        tokens = x.reshape(B * T, D)  # see FeedForward
        inverse_frequencies, scale = rope.frequencies(d, c.rope_theta, c.yarn)
        q = rope.apply_rope(project(self, "wq", "ND,DHd->NHd", tokens, wq).reshape(B, T, H, d), positions,
                            inverse_frequencies, scale)
        k = rope.apply_rope(project(self, "wk", "ND,DKd->NKd", tokens, wk).reshape(B, T, K, d), positions,
                            inverse_frequencies, scale)
        if c.llama_4_scaling is not None:  # queries only, by absolute position
            q = q * rope.query_scale(positions, c.llama_4_scaling)[:, :, None, None].astype(q.dtype)
        v = project(self, "wv", "ND,DKd->NKd", tokens, wv).reshape(B, T, K, d)
        if cache is None:
            out = causal_attention(q, k, v, self.window, c.attention, c.attention_block, segments=mask)
        else:
            k_cache, v_cache = cache
            cache = rolling_update(k_cache, slots, k), rolling_update(v_cache, slots, v)
            if q.shape[1] == 1:  # decode: write, then read the cache (no copy of it)
                out = masked_attention(q, *cache, mask)
            else:  # prefill chunk: read cache ∪ chunk, since early queries need slots later tokens overwrite
                out = masked_attention(q, jnp.concatenate([k_cache, k], axis=1),
                                       jnp.concatenate([v_cache, v], axis=1), mask)
        return project(self, "wo", "NHd,HdD->ND", out.reshape(B * T, H, d), wo).reshape(B, T, D), cache


class FeedForward(nn.Module):
    """SwiGLU: w2(silu(w1 x) * w3 x)."""

    config: MistralConfig

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        c = self.config
        w1 = param(self, "w1", (c.dim, c.hidden_dim), ("embed", "mlp"), fan_in(0, 1))
        w3 = param(self, "w3", (c.dim, c.hidden_dim), ("embed", "mlp"), fan_in(0, 1))
        w2 = param(self, "w2", (c.hidden_dim, c.dim), ("mlp", "embed"), fan_in(0, 1))
        # On [B*T, D], not [B, T, D]: each weight gradient then contracts one dimension, not
        # two, which XLA:CPU runs far slower (BENCHMARKS.md, "projections on [B, T, D]").
        tokens = x.reshape(-1, c.dim)
        gate = jax.nn.silu(project(self, "w1", "ND,DF->NF", tokens, w1))
        return project(self, "w2", "NF,FD->ND", gate * project(self, "w3", "ND,DF->NF", tokens, w3),
                        w2).reshape(x.shape)


class LatentAttention(nn.Module):
    """Multi-head latent attention (config.mla; DeepSeek-V3's MLA, transformers' Mistral4Attention).

    Queries: wq_b(RMSNorm(wq_a x)) (or wq x), per head n no-rope and dr rope features. Keys and
    values: wkv_a_with_mqa x gives a latent (r) and one rope key (dr) shared by the heads; the
    latent, normed, is expanded by wkv_b into per-head no-rope keys (n) and values (v). RoPE on
    the rope features only; softmax scale (n + dr)^-0.5 times YaRN's mscale(mscale_all_dim)²;
    Llama 4's scale on the whole query.

    Without a cache (a full sequence: training) the keys and values are expanded and attend as
    any others (causal_attention; mask the packed documents' segment ids, as Attention's). With
    a cache, it holds each token's normed latent and rotated rope key ([B, C, 1, r] and
    [B, C, 1, dr]: config.cache_shape), and attention runs in the
    latent space (attention.latent_attention): the keys' up-projection absorbed into the queries
    and the values' applied after, so no per-head key or value is ever made of the cache. Per
    query and head that reads S keys with S·(2r + dr) products against the expanded form's
    S·(n + dr + dv), which costs S·r·(n + dv) per head once per chunk to expand: a chunk of T
    queries expands when T·(2r - n - dv) > r·(n + dv) (Small 4: T > 153), as a long prefill
    chunk does; decode (T = 1) never does. (Left out: the absorbed form's own T·r·(n + dv) per
    head, which only favours expanding.)
    """

    config: MistralConfig
    window: int | None

    @nn.compact
    def __call__(self, x: jnp.ndarray, positions: jnp.ndarray, cache=None, slots=None, mask=None):
        c, m = self.config, self.config.mla
        D, H, r, n, dr, dv = c.dim, c.n_heads, m.kv_lora_rank, m.qk_nope_head_dim, m.qk_rope_head_dim, m.v_head_dim
        B, T, _ = x.shape
        tokens = x.reshape(B * T, D)
        if m.q_lora_rank is None:
            wq = param(self, "wq", (D, H, n + dr), ("embed", "heads", "head_dim"), fan_in(0, (1, 2)))
            q = project(self, "wq", "ND,DHd->NHd", tokens, wq)
        else:
            wq_a = param(self, "wq_a", (D, m.q_lora_rank), ("embed", "q_lora"), fan_in(0, 1))
            wq_b = param(self, "wq_b", (m.q_lora_rank, H, n + dr), ("q_lora", "heads", "head_dim"), fan_in(0, (1, 2)))
            low = RMSNorm(c, "q_lora", name="q_a_norm")(project(self, "wq_a", "ND,DQ->NQ", tokens, wq_a))
            q = project(self, "wq_b", "NQ,QHd->NHd", low, wq_b)
        wkv_a = param(self, "wkv_a_with_mqa", (D, r + dr), ("embed", "kv_lora"), fan_in(0, 1))
        wkv_b = param(self, "wkv_b", (r, H, n + dv), ("kv_lora", "heads", "head_dim"), fan_in(0, (1, 2)))
        wo = param(self, "wo", (H, dv, D), ("heads", "head_dim", "embed"), fan_in((0, 1), 2))

        compressed = project(self, "wkv_a_with_mqa", "ND,DR->NR", tokens, wkv_a)
        latent = RMSNorm(c, "kv_lora", name="kv_a_norm")(compressed[:, :r]).reshape(B, T, 1, r)
        inverse_frequencies, cos_sin = rope.frequencies(dr, c.rope_theta, c.yarn)
        rope_key = rope.apply_rope(compressed[:, r:].reshape(B, T, 1, dr), positions, inverse_frequencies, cos_sin)
        q = q.reshape(B, T, H, n + dr)
        q_nope, q_rope = q[..., :n], rope.apply_rope(q[..., n:], positions, inverse_frequencies, cos_sin)
        # The softmax's scale beyond (n + dr)^-0.5, and Llama 4's per position: on the queries.
        mscale = yarn_mscale(c.yarn.factor, c.yarn.mscale_all_dim) ** 2 if c.yarn and c.yarn.mscale_all_dim else 1.0
        factor = jnp.full((B, T), mscale, jnp.float32)
        if c.llama_4_scaling is not None:
            factor = factor * rope.query_scale(positions, c.llama_4_scaling)
        q_nope, q_rope = (part * factor[:, :, None, None].astype(part.dtype) for part in (q_nope, q_rope))

        if cache is None:
            kv = project(self, "wkv_b", "NR,RHd->NHd", latent.reshape(B * T, r), wkv_b).reshape(B, T, H, n + dv)
            out = causal_attention(jnp.concatenate([q_nope, q_rope], axis=-1), *_keys_values(kv, rope_key, n),
                                   self.window, c.attention, c.attention_block, segments=mask)
        else:
            latent_cache, rope_cache = cache
            cache = rolling_update(latent_cache, slots, latent), rolling_update(rope_cache, slots, rope_key)
            if T == 1:  # decode: write, then read the cache
                keys = cache
            else:  # prefill chunk: cache ∪ chunk, as Attention
                keys = (jnp.concatenate([latent_cache, latent], axis=1),
                        jnp.concatenate([rope_cache, rope_key], axis=1))
            w = adapted(self, "wkv_b", wkv_b)
            if T * (2 * r - n - dv) > r * (n + dv):  # a long prefill chunk: expanding its S keys costs less
                latents, rope_keys = keys
                kv = jnp.einsum("BSr,rHd->BSHd", latents[:, :, 0], w)
                q = jnp.concatenate([q_nope, q_rope], axis=-1)
                out = masked_attention(q, *_keys_values(kv, rope_keys, n), mask)
            else:
                q_latent = jnp.einsum("BTHn,rHn->BTHr", q_nope, w[..., :n])  # the keys' up-projection, absorbed
                out_latent = latent_attention(q_latent, q_rope, *keys, mask, (n + dr) ** -0.5)
                out = jnp.einsum("BTHr,rHv->BTHv", out_latent, w[..., n:])  # the values' up-projection
        return project(self, "wo", "NHv,HvD->ND", out.reshape(B * T, H, dv), wo).reshape(B, T, D), cache


def _keys_values(kv: jnp.ndarray, rope_key: jnp.ndarray, n: int) -> tuple[jnp.ndarray, jnp.ndarray]:
    """Latent attention's expanded keys and values from the latents through wkv_b, kv [B, S, H, n
    + dv], and the shared rope key [B, S, 1, dr]: keys [B, S, H, n + dr] (each head's no-rope part
    beside the rope key), values [B, S, H, dv]."""
    rope_keys = jnp.broadcast_to(rope_key, kv.shape[:-1] + rope_key.shape[-1:])
    return jnp.concatenate([kv[..., :n], rope_keys], axis=-1), kv[..., n:]


class Experts(nn.Module):
    """The experts' feed-forward (moe.py): a router `gate` [D, E] and E SwiGLU experts stacked
    [E, ...] (of moe.hidden_dim, else the config's), each token through config.moe.n_experts_per_tok
    of them, their weights times routed_scaling_factor; plus, with n_shared_experts, one SwiGLU
    `shared_experts` n_shared_experts x as wide that every token goes through. x [B, T, D] ->
    (y, the routing's moe.RouterStats)."""

    config: MistralConfig

    @nn.compact
    def __call__(self, x: jnp.ndarray):
        c, experts = self.config, self.config.moe
        E, D, F = experts.n_experts, c.dim, experts.hidden_dim or c.hidden_dim
        gate = param(self, "gate", (D, E), ("embed", None), fan_in(0, 1))
        w1 = param(self, "w1", (E, D, F), ("expert", "embed", "mlp"), fan_in(1, 2, 0))
        w3 = param(self, "w3", (E, D, F), ("expert", "embed", "mlp"), fan_in(1, 2, 0))
        w2 = param(self, "w2", (E, F, D), ("expert", "mlp", "embed"), fan_in(1, 2, 0))
        tokens = x.reshape(-1, D)
        w1, w3, w2 = (quantize.as_float(w, c.dtype) for w in (w1, w3, w2))  # dequantized whole: see quantize.py
        y, stats = moe.feed_forward(tokens, gate, w1, w3, w2, experts.n_experts_per_tok, c.expert_kernel,
                                    experts.routed_scaling_factor)
        if experts.n_shared_experts:
            shared = c.replace(hidden_dim=F * experts.n_shared_experts, moe=None)
            y = y + FeedForward(shared, name="shared_experts")(tokens)
        return y.reshape(x.shape), stats


class Block(nn.Module):
    """Pre-norm transformer block whose attention sees `window` keys (None: all before it):
    x [B, T, D] -> (x, the layer's updated cache, its router's stats: None without experts)."""

    config: MistralConfig
    window: int | None

    @nn.compact
    def __call__(self, x: jnp.ndarray, positions: jnp.ndarray, cache, slots, mask):
        c = self.config
        attention = LatentAttention if c.mla else Attention
        attended, cache = attention(c, self.window, name="attention")(
            RMSNorm(c, name="attention_norm")(x), positions, cache, slots, mask)
        h = x + attended
        normed = RMSNorm(c, name="ffn_norm")(h)
        if c.moe:
            mixed, stats = Experts(c, name="feed_forward")(normed)
        else:
            mixed, stats = FeedForward(c, name="feed_forward")(normed), None
        return constrain(h + mixed, ACTIVATIONS), cache, stats
