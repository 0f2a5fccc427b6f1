"""The experts' feed-forward (Mixtral's, and Mistral Small 4's fine-grained ones): routing,
and a dispatch whose cost follows the tokens each expert receives.

Routing (HF MixtralSparseMoeBlock; Mistral4TopkRouter with one group): router logits x @ gate
in float32, softmax over all E experts, the top k, their weights renormalised over the k (and
times routed_scaling_factor). Every token reaches its k experts: no capacity, nothing dropped.

Dispatch: the N * k (token, expert) assignments are scattered, grouped by expert, into a
buffer where each expert's rows start on a tile boundary (zero rows pad its last tile), so
each tile of rows belongs to one expert. The SwiGLU then runs tile by tile against its
expert's weights: with `jax.lax.ragged_dot`, the grouped matmul XLA:TPU implements, or as a
`lax.scan` over the tiles, one [tile, D] x [D, F] product each, skipping the tiles the
bound leaves empty; XLA:CPU and XLA:GPU lower ragged_dot to a product of every row with
every expert, E times the work (BENCHMARKS.md, "Experts").

Expert parallelism: under a mesh whose `expert` axis divides E, each device holds E / ep
experts (the rules table's `expert` row). The devices along `expert` gather one another's
tokens, each runs the assignments to its own experts, and the partial outputs are summed
and scattered back to the tokens' devices: along `expert` activations move, experts'
weights do not (over `fsdp` the experts' model dimension is gathered like any weight's).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from mistral_jax.runtime.platforms import expert_kernel
from mistral_jax.runtime.sharding import spec_for

TILE = 128  # rows of a tile of the scan kernel (fewer when there are fewer assignments)


class RouterStats(NamedTuple):
    """What the auxiliary losses need of the routing, summed over tokens (and layers)."""

    assigned: jax.Array  # [E]: top-k assignments per expert
    probability: jax.Array  # [E]: router probabilities per expert
    z: jax.Array  # (): logsumexp(router logits)^2
    tokens: jax.Array  # (): tokens routed (times layers)

    @classmethod
    def zeros(cls, n_experts: int) -> "RouterStats":
        return cls(jnp.zeros(n_experts), jnp.zeros(n_experts), jnp.float32(0), jnp.float32(0))

    def load_balancing_loss(self) -> jax.Array:
        """HF's load_balancing_loss_func (Switch Transformer's): E * sum_e f_e * P_e, f_e the
        fraction of assignments and P_e the mean probability of expert e over every token of
        every layer."""
        E = self.assigned.shape[-1]
        return E * jnp.sum(self.assigned / self.tokens * (self.probability / self.tokens))

    def z_loss(self) -> jax.Array:
        """ST-MoE's router z-loss: the mean of logsumexp(router logits)^2."""
        return self.z / self.tokens


def route(x: jax.Array, gate: jax.Array, k: int) -> tuple[jax.Array, jax.Array, RouterStats]:
    """x [N, D], gate [D, E] -> (weights float32 [N, k], experts int32 [N, k], stats)."""
    logits = jnp.einsum("ND,DE->NE", x, gate, preferred_element_type=jnp.float32)
    probs = jax.nn.softmax(logits, axis=-1)
    top, experts = jax.lax.top_k(probs, k)
    E = gate.shape[1]
    stats = RouterStats(assigned=jnp.sum(jax.nn.one_hot(experts, E, dtype=jnp.float32), axis=(0, 1)),
                        probability=jnp.sum(probs, axis=0),
                        z=jnp.sum(jax.nn.logsumexp(logits, axis=-1) ** 2),
                        tokens=jnp.float32(x.shape[0]))
    return top / jnp.sum(top, axis=-1, keepdims=True), experts, stats


def feed_forward(x: jax.Array, gate: jax.Array, w1: jax.Array, w3: jax.Array, w2: jax.Array, k: int,
                 kernel: str = "auto", scale: float = 1.0) -> tuple[jax.Array, RouterStats]:
    """x [N, D] through its k experts: sum over them of weight * w2(silu(w1 x) * w3 x), the
    weights times scale (routed_scaling_factor).

    gate [D, E]; w1, w3 [E, D, F]; w2 [E, F, D]. Under a mesh (sharding.under_mesh) with
    the experts split over `expert`, as the module docstring says; returns (y [N, D], stats).
    """
    weights, experts, stats = route(x, gate, k)
    if scale != 1.0:
        weights = weights * scale
    kernel = expert_kernel(kernel)
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or "expert" not in mesh.axis_names:
        return dispatch(x, weights, experts, w1, w3, w2, 0, kernel), stats

    tokens = spec_for(("batch", None), x.shape, mesh)
    w_in = spec_for(("expert", None, "mlp"), w1.shape, mesh)  # the model dim whole: gathered over fsdp
    w_out = spec_for(("expert", "mlp", None), w2.shape, mesh)
    split_experts, split_hidden = w_in[0] is not None, w_in[2] is not None
    token_axes = tokens[0] if isinstance(tokens[0], tuple) else (tokens[0],)
    gather_tokens = split_experts and "expert" in token_axes

    def local(x, weights, experts, w1, w3, w2):
        first = jax.lax.axis_index("expert") * w1.shape[0] if split_experts else 0
        if gather_tokens:  # the tokens of every device along `expert`, for this device's experts
            x, weights, experts = (jax.lax.all_gather(a, "expert", tiled=True) for a in (x, weights, experts))
        y = dispatch(x, weights, experts, w1, w3, w2, first, kernel)
        if split_hidden:  # each device along `tensor` summed its share of F
            y = jax.lax.psum(y, "tensor")
        if gather_tokens:
            return jax.lax.psum_scatter(y, "expert", scatter_dimension=0, tiled=True)
        return jax.lax.psum(y, "expert") if split_experts else y

    routed = jax.sharding.PartitionSpec(tokens[0], None)
    y = jax.shard_map(local, mesh=mesh, in_specs=(tokens, routed, routed, w_in, w_in, w_out), out_specs=tokens,
                      check_vma=False)(x, weights, experts, w1, w3, w2)
    return y, stats


def dispatch(x: jax.Array, weights: jax.Array, experts: jax.Array, w1: jax.Array, w3: jax.Array, w2: jax.Array,
             first: int | jax.Array, kernel: str) -> jax.Array:
    """x [N, D] through the experts first .. first + E_l - 1 whose weights w1, w3 [E_l, D, F]
    and w2 [E_l, F, D] are given, as experts [N, k] and weights [N, k] route it; assignments
    to other experts (another device's) add nothing. -> [N, D]."""
    N, D = x.shape
    k = experts.shape[1]
    E = w1.shape[0]
    M = N * k
    tile = min(TILE, max(8, 1 << (M - 1).bit_length()))  # decode: a few rows
    n_tiles = M // tile + E  # at most M / tile full tiles plus one partial tile per expert
    group = experts.reshape(M) - first
    group = jnp.where((group >= 0) & (group < E), group, E)  # E: not one of these experts
    one_hot = jax.nn.one_hot(group, E + 1, dtype=jnp.int32)
    rank = jnp.take_along_axis(jnp.cumsum(one_hot, axis=0), group[:, None], axis=1)[:, 0] - 1  # within its expert
    sizes = jnp.sum(one_hot, axis=0)[:E]
    tiles = -(-sizes // tile)
    tile_end = jnp.cumsum(tiles)
    start = jnp.append((tile_end - tiles) * tile, n_tiles * tile)  # each expert's first row; past the end for E
    row = start[group] + rank  # of each assignment in the buffer (out of range: dropped)
    buffer = jnp.zeros((n_tiles * tile, D), x.dtype).at[row].set(jnp.repeat(x, k, axis=0), mode="drop")

    if kernel == "ragged_dot":
        sizes = tiles * tile
        h = jax.nn.silu(jax.lax.ragged_dot(buffer, w1, sizes)) * jax.lax.ragged_dot(buffer, w3, sizes)
        y = jax.lax.ragged_dot(h, w2, sizes)
    else:
        tile_expert = jnp.minimum(jnp.searchsorted(tile_end, jnp.arange(n_tiles), side="right"), E - 1)
        used = jnp.arange(n_tiles) < tile_end[-1]
        y = _tiles(buffer.reshape(n_tiles, tile, D), tile_expert, used, w1, w3, w2).reshape(n_tiles * tile, D)

    out = y.at[row].get(mode="fill", fill_value=0).reshape(N, k, D)
    return jnp.einsum("NkD,Nk->ND", out, weights.astype(out.dtype))


def _tiles(rows: jax.Array, tile_expert: jax.Array, used: jax.Array, w1, w3, w2) -> jax.Array:
    """rows [n, tile, D], each tile through its expert's SwiGLU; unused tiles are zeros."""
    h = jax.nn.silu(_grouped(rows, w1, tile_expert, used)) * _grouped(rows, w3, tile_expert, used)
    return _grouped(h, w2, tile_expert, used)


@jax.custom_vjp
def _grouped(x: jax.Array, w: jax.Array, tile_expert: jax.Array, used: jax.Array) -> jax.Array:
    """x [n, tile, K] @ w[tile_expert] [K, N] per tile -> [n, tile, N] (zeros where not used):
    a scan over the tiles. Its gradient is two more such scans, by hand: differentiated by
    JAX, the scan kept each tile's slice of w for the backward pass, a copy of the experts
    per tile (the small-moe train step's temporaries: 15.6 GiB, BENCHMARKS.md "Experts")."""
    def body(_, xs):
        x, e, use = xs
        return None, jax.lax.cond(use, lambda: x @ w[e], lambda: jnp.zeros((x.shape[0], w.shape[2]), x.dtype))

    return jax.lax.scan(body, None, (x, tile_expert, used))[1]


def _grouped_fwd(x, w, tile_expert, used):
    return _grouped(x, w, tile_expert, used), (x, w, tile_expert, used)


def _grouped_bwd(residuals, dy):
    x, w, tile_expert, used = residuals

    def body(dw, xs):
        x, dy, e, use = xs
        dx = jax.lax.cond(use, lambda: dy @ w[e].T, lambda: jnp.zeros_like(x))
        dw = jax.lax.cond(use, lambda: dw.at[e].add((x.T @ dy).astype(dw.dtype)), lambda: dw)
        return dw, dx

    dw, dx = jax.lax.scan(body, jnp.zeros_like(w), (x, dy, tile_expert, used))
    return dx, dw, None, None


_grouped.defvjp(_grouped_fwd, _grouped_bwd)
