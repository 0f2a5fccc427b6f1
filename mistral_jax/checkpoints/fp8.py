"""FP8 checkpoints: weights stored as float8 (e4m3) with scales, dequantized as they are read.

A weight `{base}.weight` in float8 has one scale tensor beside it, by the name its writer
gives it: `{base}.weight_scale_inv` (transformers' fine-grained FP8), `{base}.weight_scale`
(compressed-tensors; Mistral Large 3's native blocks) or `{base}.qscale_weight` (Mistral-native,
per tensor). Each multiplies: w = q · s, with s one per tensor ([] or [1]), one per output
channel ([out] or [out, 1]), or one per block of b0 × b1 ([ceil(out / b0), ceil(in / b1)];
the scale of w[r, c] is s[r // b0, c // b1], edge blocks cropped). Activation and KV-cache
scales (`input_scale`, `activation_scale`, `qscale_act`, `k_scale`, `v_scale`) are for
computing in FP8, not for the weights: they are not read.

Dequantization runs over `ROWS` rows at a time, in float32, so it adds nothing to the
converter's peak memory but a few MB.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Iterator

import ml_dtypes
import numpy as np

SCALE_SUFFIXES = ("weight_scale_inv", "weight_scale", "qscale_weight")
ACTIVATION_SCALE = re.compile(r".*\.(input_scale|activation_scale|qscale_act|k_scale|v_scale)$")
FLOAT8 = (np.dtype(ml_dtypes.float8_e4m3fn), np.dtype(ml_dtypes.float8_e5m2))
DEFAULT_BLOCK = (128, 128)  # transformers' fine-grained FP8, and every Mistral FP8 release
ROWS = 128  # rows dequantized at a time


class ScaleError(ValueError):
    """A scale that does not fit its weight."""


def scales_of(names: Iterable[str]) -> tuple[dict[str, str], list[str]]:
    """({weight name: its scale's name}, the activation scales) among a checkpoint's tensor names."""
    names = set(names)
    scales = {}
    for name in names:
        base, _, suffix = name.rpartition(".")
        if suffix in SCALE_SUFFIXES:
            scales[f"{base}.weight"] = name
    return scales, sorted(n for n in names if ACTIVATION_SCALE.match(n))


def block_size(quantization: dict | None) -> tuple[int, int]:
    """The block of an HF config's quantization_config (fine-grained FP8's weight_block_size,
    compressed-tensors' block_structure), or DEFAULT_BLOCK."""
    if not isinstance(quantization, dict):
        return DEFAULT_BLOCK
    block = quantization.get("weight_block_size")
    groups = quantization.get("config_groups")
    for group in groups.values() if isinstance(groups, dict) else ():
        weights = group.get("weights") if isinstance(group, dict) else None
        block = block or (weights.get("block_structure") if isinstance(weights, dict) else None)
    if not block:
        return DEFAULT_BLOCK
    if (not isinstance(block, (list, tuple)) or len(block) != 2
            or not all(isinstance(b, int) and not isinstance(b, bool) and b > 0 for b in block)):
        raise ScaleError(f"quantization_config's weight block size {block!r} is not two positive integers")
    return block[0], block[1]


def _scale_rows(name: str, weight_shape: tuple[int, ...], scale: np.ndarray, block: tuple[int, int]):
    """A function rows (a slice starting on a block's first row) -> the scale of each element of
    those rows, broadcastable to them; ScaleError naming the tensor when the scale fits none of
    the layouts."""
    scale = np.asarray(scale, np.float32)
    rows, cols = weight_shape[0], math.prod(weight_shape[1:])
    blocks = (math.ceil(rows / block[0]), math.ceil(cols / block[1]))
    if scale.size == 1:
        return lambda r: scale.reshape(())
    if scale.shape in ((rows,), (rows, 1)):
        return lambda r: scale.reshape(rows, 1)[r]
    if scale.shape == blocks and len(weight_shape) == 2:
        def per_block(r: slice) -> np.ndarray:
            first, last = r.start // block[0], -(-r.stop // block[0])
            expanded = np.repeat(np.repeat(scale[first:last], block[0], axis=0), block[1], axis=1)
            return expanded[:r.stop - r.start, :cols]  # edge blocks cropped
        return per_block
    raise ScaleError(f"scale {name} has shape {list(scale.shape)}, which fits none of the layouts of a weight of "
                     f"shape {list(weight_shape)}: one per tensor, per output channel ({rows}), or per block of "
                     f"{block[0]} x {block[1]} {list(blocks)}")


def dequantized_rows(name: str, weight: np.ndarray, scale: np.ndarray, block: tuple[int, int] = DEFAULT_BLOCK
                     ) -> Iterator[tuple[slice, np.ndarray]]:
    """(rows, float32 q · s of those rows of the weight), ROWS rows at a time (a multiple of the
    block's rows, so no block straddles two pieces)."""
    scale_of = _scale_rows(name, tuple(weight.shape), scale, block)
    step = max(ROWS // block[0], 1) * block[0]
    for start in range(0, weight.shape[0], step):
        rows = slice(start, min(start + step, weight.shape[0]))
        yield rows, weight[rows].astype(np.float32) * scale_of(rows)


def dequantize(name: str, weight: np.ndarray, scale: np.ndarray, block: tuple[int, int] = DEFAULT_BLOCK
               ) -> np.ndarray:
    """The whole weight, float32."""
    out = np.empty(weight.shape, np.float32)
    for rows, values in dequantized_rows(name, weight, scale, block):
        out[rows] = values
    return out
