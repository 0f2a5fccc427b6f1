"""Low-bit weights: every projection of the layers in int8 or int4 with float32 scales,
dequantized inside its product (layers.project), the rest of the model unchanged.

A quantized weight takes its float array's place in the params as {"q": int8 or int4 [the
weight's shape], "scale": float32}. The scale has the weight's axes, each input axis divided
into blocks: the scale of w[i] is scale[i // block] (per axis), blocks of 1 along the output
and leading (layer, expert) axes. Symmetric, exactly:
- int8, per output channel: one block spans all of a channel's inputs, scale = max|w| / 127;
- int4, in groups of `group` consecutive inputs of a channel (along the flattened input axes,
  innermost first; wo's (H, d) with d = 128 and group 128: per head), scale = max|w| / 7;
- q = round(w / scale) (half to even, as NumPy) in [-127, 127] or [-7, 7]; the weight is q · scale.
Other blocks (GGUF's Q8_0: 32 inputs) load and multiply the same way. The scale carries the
weight's logical axes (runtime/sharding.py replicates a dimension its mesh axes do not divide).

Quantized: the projections of the layer stacks (PROJECTIONS: attention, latent attention,
feed-forward, experts, shared experts). Left float: the embedding, the output projection,
the norms, the router and the vision encoder (a small share of a decoder's bytes).
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from mistral_jax.model.config import MistralConfig
from mistral_jax.runtime import platforms
from mistral_jax.runtime.options import QUANTIZATIONS
from mistral_jax.runtime.sharding import reshaped

MODES = QUANTIZATIONS  # "int8", "int4"
QMAX = {"int8": 127, "int4": 7}
STORAGE = {"int8": jnp.int8, "int4": jnp.int4}
DEFAULT_GROUP = 128

# weight name -> (input axes, output axes), input-major; axes before them (layers, experts) are neither
PROJECTIONS = {
    "wq": (1, 2), "wk": (1, 2), "wv": (1, 2), "wo": (2, 1),  # [D, H, d], [D, K, d], [H, d, D]
    "w1": (1, 1), "w3": (1, 1), "w2": (1, 1),  # [D, F], [F, D]; the experts' [E, D, F], [E, F, D]
    "wq_a": (1, 1), "wq_b": (1, 2), "wkv_a_with_mqa": (1, 1), "wkv_b": (1, 2),  # latent attention
}
ROW_BLOCK_BYTES = 8 << 20  # the CPU product's float32 block of a weight: larger or smaller ran slower here


class Quantized(NamedTuple):
    """What layers.param gives for a quantized weight: the integers and their scales."""

    q: jax.Array
    scale: jax.Array

    @property
    def shape(self) -> tuple[int, ...]:
        return self.q.shape


def is_quantized(leaf) -> bool:
    return isinstance(leaf, dict) and set(leaf) == {"q", "scale"}


def block_sizes(shape: tuple[int, ...], name: str, mode: str, group: int | None = None) -> tuple[int, ...]:
    """The scale's block along each axis of weight `name` of this shape: `group` consecutive
    inputs of an output channel (innermost input axis first); group None: int8 a whole channel,
    int4 DEFAULT_GROUP."""
    n_in, n_out = PROJECTIONS[name]
    lead = len(shape) - n_in - n_out
    inputs = shape[lead:lead + n_in]
    if group is not None and (isinstance(group, bool) or not isinstance(group, int) or group < 1):
        raise ValueError(f"the quantization group must be a positive number of inputs, got {group!r}")
    blocks = [1] * len(shape)
    remaining = group or (math.prod(inputs) if mode == "int8" else DEFAULT_GROUP)
    for axis in reversed(range(lead, lead + n_in)):  # innermost first: the block stays consecutive inputs
        size = shape[axis]
        if remaining % size and size % remaining:
            break
        blocks[axis] = min(size, remaining)
        remaining //= blocks[axis]
        if remaining == 1 or blocks[axis] < size:
            break
    if remaining != 1:
        raise ValueError(f"{mode} group of {group or DEFAULT_GROUP} inputs does not tile the inputs "
                         f"{tuple(inputs)} of {name} (choose a group that divides them)")
    return tuple(blocks)


def quantize(w: jax.Array, blocks: tuple[int, ...], mode: str) -> dict:
    """{"q", "scale"} of w (any float dtype; computed in float32) in blocks of `blocks`."""
    qmax = QMAX[mode]
    split = _split(w.astype(jnp.float32), blocks)
    axes = tuple(range(1, split.ndim, 2))
    largest = jnp.max(jnp.abs(split), axis=axes, keepdims=True)
    # Divided by an array whose values XLA cannot see: a divisor it sees broadcast or constant, it
    # replaces by a product with the reciprocal (1 ulp off in the scale, an element off in q).
    scale = largest / jax.lax.optimization_barrier(jnp.full(largest.shape, qmax, jnp.float32))
    divisor = jax.lax.optimization_barrier(jnp.broadcast_to(jnp.where(scale == 0, 1, scale), split.shape))  # as qmax
    q = jnp.clip(jnp.round(split / divisor), -qmax, qmax)
    return {"q": q.reshape(w.shape).astype(STORAGE[mode]), "scale": jnp.squeeze(scale, axes)}


def dequantize(q: jax.Array, scale: jax.Array) -> jax.Array:
    """q · scale in float32, the scale spread over its blocks."""
    blocks = tuple(n // s for n, s in zip(q.shape, scale.shape))
    split = _split(q.astype(jnp.float32), blocks)
    return (split * jnp.expand_dims(scale, tuple(range(1, split.ndim, 2)))).reshape(q.shape)


def _split(x: jax.Array, blocks: tuple[int, ...]) -> jax.Array:
    """x [n0, n1, ...] -> [n0 / b0, b0, n1 / b1, b1, ...]."""
    if any(n % b for n, b in zip(x.shape, blocks)):
        raise ValueError(f"blocks {blocks} do not tile shape {x.shape}")
    return x.reshape(tuple(d for n, b in zip(x.shape, blocks) for d in (n // b, b)))


def product(spec: str, x: jax.Array, w: Quantized, form: str) -> jax.Array:
    """einsum(spec, x, q · scale), w input-major (its contracted axes first), in x's dtype.

    form "dequantize" (TPU, GPU): per group of inputs, (x · q) · scale, accumulated in float32:
    the integers go straight into the matmul and the scales multiply its output, so no float
    copy of the weight exists. (q · scale as the dot's operand left XLA:TPU writing int4's
    grouped weight out in float32, a layer at a time: tests/test_aot.py.) The partial products
    are [rows, groups, outputs]: XLA:TPU keeps them inside the matmul (the QLoRA plans of
    docs/SCALING.md); whether XLA:GPU does at training sizes is not yet measured.
    form "row_blocks" (XLA:CPU, which would write the whole float weight first, and cannot run
    the batched dot above into float32): over blocks of inputs whose float32 copy is at most
    ROW_BLOCK_BYTES, each dequantized and multiplied, accumulated in float32.
    """
    (x_dims, w_dims), out = spec.split("->")[0].split(","), spec.split("->")[1]
    contracted = "".join(c for c in w_dims if c in x_dims)
    rows = x_dims[:len(x_dims) - len(contracted)]
    if not w_dims.startswith(contracted) or x_dims[len(rows):] != contracted or out != rows + w_dims[len(contracted):]:
        raise ValueError(f"a quantized product needs x [..., inputs] and w [inputs, outputs], got {spec}")
    n_in = len(contracted)
    inputs, outputs = math.prod(w.shape[:n_in]), math.prod(w.shape[n_in:])
    x2 = x.reshape(-1, inputs)
    q, scale = w.q.reshape(inputs, outputs), w.scale.reshape(-1, outputs)
    group = inputs // scale.shape[0]
    if form == "dequantize":
        groups = scale.shape[0]
        y = jnp.einsum("Ngk,gko->Ngo", x2.reshape(-1, groups, group), q.reshape(groups, group, outputs).astype(x.dtype),
                       preferred_element_type=jnp.float32)
        return jnp.einsum("Ngo,go->No", y, scale).astype(x.dtype).reshape(x.shape[:len(rows)] + w.shape[n_in:])
    step = _row_block(inputs, outputs, group)
    n = inputs // step
    xs = x2.reshape(-1, n, step).transpose(1, 0, 2)
    qs = q.reshape(n, step, outputs)
    if group >= inputs:  # one scale per channel: every block's
        scales = jnp.broadcast_to(scale, (n, 1, outputs))
    else:
        scales = scale.reshape(n, step // group, outputs)

    def accumulate(acc, block):
        xb, qb, sb = block
        wb = (qb.reshape(sb.shape[0], -1, outputs).astype(jnp.float32) * sb[:, None]).reshape(step, outputs)
        return acc + jnp.dot(xb, wb.astype(x.dtype), preferred_element_type=jnp.float32), None

    y, _ = jax.lax.scan(accumulate, jnp.zeros((x2.shape[0], outputs), jnp.float32), (xs, qs, scales))
    return y.astype(x.dtype).reshape(x.shape[:len(rows)] + w.shape[n_in:])


def _row_block(inputs: int, outputs: int, group: int) -> int:
    """Inputs per block of the CPU product: whole groups, dividing `inputs`, as many as keep the
    block's float32 copy within ROW_BLOCK_BYTES (at least one group, or one input per channel)."""
    unit = 1 if group >= inputs else group
    best = unit
    for m in range(1, inputs // unit + 1):
        if (inputs // unit) % m == 0 and unit * m * outputs * 4 <= ROW_BLOCK_BYTES:
            best = unit * m
    return best


def as_float(w, dtype) -> jax.Array:
    """w itself, or a Quantized weight dequantized, in dtype (for the uses other than project)."""
    return dequantize(w.q, w.scale).astype(dtype) if isinstance(w, Quantized) else w


# ---- whole params -------------------------------------------------------------------------------

def quantizable(config: MistralConfig, keys: tuple[str, ...]) -> str | None:
    """The weight name of a params path (its keys) that quantize_params quantizes, else None."""
    stacks = {name for name, _ in config.stacks}
    if not keys or keys[0] not in stacks or keys[-1] not in PROJECTIONS:
        return None
    return keys[-1]


def quantize_params(config: MistralConfig, params: dict, mode: str, group: int | None = None) -> dict:
    """params (float, layers stacked) with every projection of the layers quantized (group:
    None for the mode's own, int8's per channel and int4's DEFAULT_GROUP); each stacked weight
    a layer at a time, so the float32 temporaries are one layer's."""
    check_mode(mode)

    def convert(path, w):
        name = quantizable(config, tuple(getattr(k, "key", None) for k in path))
        if name is None or is_quantized(w):
            return w
        return quantize_stacked(w, block_sizes(w.shape, name, mode, group), mode)

    return _map_projections(convert, params)


def check_mode(mode: str) -> None:
    if mode not in QMAX:
        raise ValueError(f"unknown quantization {mode!r}; choose one of {', '.join(MODES)}")


def quantize_stacked(w: jax.Array, blocks: tuple[int, ...], mode: str, sharding=None) -> dict:
    """quantize(w, blocks, mode) a leading slice (layer) at a time, onto sharding (the
    weight's: q has it, the scale it reshaped) or where jit puts it."""
    quantized = _quantize_layers(w, tuple(blocks), mode)
    if sharding is None:
        return quantized
    return jax.device_put(quantized, {"q": sharding, "scale": reshaped(sharding, quantized["scale"].shape)})


@functools.partial(jax.jit, static_argnums=(1, 2))
def _quantize_layers(w: jax.Array, blocks: tuple[int, ...], mode: str) -> dict:
    if blocks[0] != 1 or w.ndim < 2:
        return quantize(w, blocks, mode)
    return jax.lax.map(lambda layer: quantize(layer, blocks[1:], mode), w)


def dequantize_params(params: dict, dtype) -> dict:
    """Every quantized weight of params as a float array of dtype."""
    return _map_projections(lambda _, w: dequantize(w["q"], w["scale"]).astype(dtype) if is_quantized(w) else w,
                            params)


def _map_projections(fn, params: dict) -> dict:
    """fn(path, leaf) over params, a quantized weight's {"q", "scale"} taken as one leaf."""
    return jax.tree_util.tree_map_with_path(fn, params, is_leaf=is_quantized)


def held_for(params: dict, platform: str) -> dict:
    """params as the programs of `platform` take them: on XLA:CPU int4 weights as int8, the same
    values in the byte each that XLA:CPU holds int4 in anyway, which its product reads faster
    (BENCHMARKS.md, "Low-bit weights"), and which jax lets into sharded ahead-of-time programs.
    Call it once, outside jit: converting inside would write the weight again at every call."""
    if not platforms.int4_as_int8(platform):
        return params
    return jax.tree_util.tree_map(lambda x: x.astype(jnp.int8) if x.dtype == jnp.int4 else x, params)


def mode_of(params: dict) -> str | None:
    """"int8" or "int4" where params hold quantized weights (the first found), else None."""
    for leaf in jax.tree_util.tree_leaves(params, is_leaf=is_quantized):
        if is_quantized(leaf):
            return jnp.dtype(leaf["q"].dtype).name
    return None


def annotate(boxed: dict, params: dict) -> dict:
    """The boxed abstract params (transformer.abstract_params) shaped as `params` (arrays or
    their shapes) are: each weight params hold quantized becomes {"q", "scale"}, both boxed
    with the weight's logical axis names."""

    def convert(box, leaf):
        if not is_quantized(leaf):
            return box
        return {part: nn.Partitioned(jax.ShapeDtypeStruct(leaf[part].shape, leaf[part].dtype), box.names)
                for part in ("q", "scale")}

    return jax.tree_util.tree_map(convert, boxed, params, is_leaf=lambda v: isinstance(v, nn.Partitioned))


def stored_bytes(params: dict) -> int:
    """Bytes the params take as stored (int4 counted at half a byte, as TPU and GPU hold it)."""
    return sum(x.size * (0.5 if jnp.dtype(x.dtype) == jnp.int4 else jnp.dtype(x.dtype).itemsize)
               for x in jax.tree_util.tree_leaves(params))
