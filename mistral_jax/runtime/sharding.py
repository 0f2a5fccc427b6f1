"""Device mesh and the one table that maps logical axis names to mesh axes.

Mesh axes: `data` (pure data parallelism), `fsdp` (data parallelism with weights, gradients
and optimizer state sharded), `expert` (a mixture's experts split across devices, which are
data parallel elsewhere: model/moe.py), `tensor` (heads / mlp / vocab split across devices).
The logical names are declared where the arrays are made (model/layers.py and
model/transformer.py for parameters, model/cache.py for the KV cache); this module only maps them.

Rule for dimensions that do not divide: a tensor dimension is split over its mesh axes only
when their size divides it; otherwise that dimension is replicated. So with GQA and
n_kv_heads smaller than the tensor axis (8 kv heads, tensor=16), wk/wv and the KV cache keep
whole kv heads on every device while wq/wo stay split by query head.
"""

from __future__ import annotations

import functools
import math

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "expert", "tensor")

# logical axis -> mesh axes                   where it appears
RULES: dict[str, str | tuple[str, ...] | None] = {
    "batch": ("data", "fsdp", "expert"),  # tokens [B, T], activations [B, T, D], cache [L, B, C, K, d]
    "length": None,  # T of activations, C of the cache
    "layers": None,  # the leading L axis of every scanned weight
    "embed": "fsdp",  # D of tok_embeddings [V, D], wq [D, H, d], w1 [D, F], norms [D], output [D, V]
    "vocab": "tensor",  # V of tok_embeddings [V, D] and output [D, V]
    "heads": "tensor",  # H of wq [D, H, d] and wo [H, d, D]
    "kv_heads": "tensor",  # K of wk, wv [D, K, d] and of the cache
    "head_dim": None,  # d
    "mlp": "tensor",  # F of w1, w3 [D, F] and w2 [F, D], and of the experts' [E, D, F], [E, F, D]
    "expert": "expert",  # E of the experts' w1, w3 [E, D, F] and w2 [E, F, D]
    "q_lora": None,  # Q of latent attention's wq_a [D, Q] and wq_b [Q, H, d]: small, whole
    "kv_lora": None,  # r of its wkv_a_with_mqa [D, r + dr], wkv_b [r, H, d] and latent cache [.., 1, r]
}


def parse_mesh_spec(spec: str, n_devices: int) -> dict[str, int]:
    """"data=2,fsdp=2,tensor=2" -> sizes per axis; one axis may be -1 ("the rest"); axes not
    named are 1. Default "" puts every device on fsdp."""
    sizes = {axis: 1 for axis in MESH_AXES}
    named = {}
    for part in filter(None, (p.strip() for p in (spec or f"fsdp={n_devices}").split(","))):
        axis, _, value = part.partition("=")
        if axis not in sizes:
            raise ValueError(f"unknown mesh axis {axis!r} in {spec!r}; axes are {', '.join(MESH_AXES)}")
        try:
            named[axis] = int(value)
        except ValueError:
            raise ValueError(f"mesh axis {axis} needs an integer size, got {value!r}") from None
    rest = [axis for axis, size in named.items() if size == -1]
    if len(rest) > 1 or any(size == 0 or size < -1 for size in named.values()):
        raise ValueError(f"bad mesh {spec!r}: sizes must be positive, with at most one -1")
    sizes.update(named)
    known = math.prod(size for size in sizes.values() if size != -1)
    if rest:
        if n_devices % known:
            raise ValueError(f"mesh {spec!r} does not divide the {n_devices} devices")
        sizes[rest[0]] = n_devices // known
    if math.prod(sizes.values()) != n_devices:
        raise ValueError(f"mesh {spec!r} has {math.prod(sizes.values())} devices but there are {n_devices}")
    return sizes


def make_mesh(spec: str = "", devices=None) -> Mesh:
    """A mesh over all devices (or `devices`), laid out along the physical topology on TPU."""
    devices = jax.devices() if devices is None else devices
    sizes = parse_mesh_spec(spec, len(devices))
    shape = tuple(sizes[axis] for axis in MESH_AXES)
    if list(devices) == jax.devices():
        auto = (jax.sharding.AxisType.Auto,) * len(MESH_AXES)  # shardings by annotation, as in pjit
        return jax.make_mesh(shape, MESH_AXES, axis_types=auto, devices=devices)
    return Mesh(np.array(devices).reshape(shape), MESH_AXES)


def spec_for(names: tuple[str | None, ...], shape: tuple[int, ...], mesh: Mesh) -> PartitionSpec:
    """PartitionSpec of an array with these logical axis names, replicating any dimension its
    mesh axes do not divide."""
    parts = []
    for name, size in zip(names, shape):
        axes = RULES.get(name) if name else None
        if axes is not None:
            axes_tuple = (axes,) if isinstance(axes, str) else axes
            if size % math.prod(mesh.shape[a] for a in axes_tuple):
                axes = None
        parts.append(axes)
    return PartitionSpec(*parts)


def sharding_for(names, shape, mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, spec_for(tuple(names), tuple(shape), mesh))


def reshaped(sharding, shape: tuple[int, ...]):
    """A weight's sharding for an array along the same axes but of another shape (its
    quantization scales): each dimension its mesh axes do not divide replicated."""
    if not isinstance(sharding, NamedSharding):
        return sharding
    spec = tuple(sharding.spec) + (None,) * (len(shape) - len(sharding.spec))
    parts = [axes if axes is None or not size % math.prod(
        sharding.mesh.shape[a] for a in ((axes,) if isinstance(axes, str) else axes)) else None
        for axes, size in zip(spec, shape)]
    return NamedSharding(sharding.mesh, PartitionSpec(*parts))


def under_mesh(mesh: Mesh):
    """Decorates a function to be traced with mesh as the abstract mesh: how `constrain` and
    kernels that run under shard_map (splash attention) learn the mesh inside jit."""
    def decorate(fn):
        @functools.wraps(fn)
        def traced(*args, **kwargs):
            with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
                return fn(*args, **kwargs)
        return traced
    return decorate


def constrain(x: jax.Array, names: tuple[str | None, ...]) -> jax.Array:
    """x laid out by the rules table over the mesh being traced under (`under_mesh`), if
    any; unchanged outside a mesh context. Activations need this: left to itself, the
    partitioner may follow the weights' fsdp split of `embed` into the activations and
    gather the batch instead (docs/DESIGN.md, "Sharding")."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or not set(MESH_AXES) <= set(mesh.axis_names):
        return x
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec_for(names, x.shape, mesh)))


def logical_shardings(boxed, mesh: Mesh):
    """NamedSharding per leaf of a tree of nn.Partitioned (what `init` returns, or its
    jax.eval_shape), from the logical axis names each carries."""
    return jax.tree_util.tree_map(lambda p: sharding_for(p.names, p.value.shape, mesh), boxed,
                                  is_leaf=lambda x: isinstance(x, nn.Partitioned))


def batch_sharding(mesh: Mesh, ndim: int = 2) -> NamedSharding:
    """Batches [B, T, ...] split over data x fsdp x expert."""
    return NamedSharding(mesh, PartitionSpec(RULES["batch"], *[None] * (ndim - 1)))
