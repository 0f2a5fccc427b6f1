"""Images in: the Pixtral vision encoder and the Mistral 3 projector (config.vision), whose
outputs replace the embeddings of a prompt's image tokens (transformer.Mistral).

Shapes: N images, P an image's patches (h·w, row-major; padded to the most of any image), Dv
the encoder's width, H its heads, d its head dim, F its feed-forward width, s the spatial merge,
M the image tokens of all images (Σ h·w / s²), D the text model's width.

An image is a float32 array [C, H, W] as mistral-common's ImageEncoder makes it (resized so
that H and W are multiples of patch_size·s, normalised); its tokens in the prompt are (h/s)·(w/s)
`[IMG]`, row by row, each row closed by `[IMG_BREAK]` and the last by `[IMG_END]`. The encoder
runs every image as one row of a batch, each attending only within itself; each image's merged
patches, row-major, fill its `[IMG]` tokens in order (transformers' masked_scatter: the images
of the first row, then the next row's).

Parameters, under `vision` (checkpoints/layouts.py names them in both PyTorch layouts):
`encoder/patch_conv` [C, p, p, Dv], `encoder/ln_pre`, `encoder/layers/...` (stacked [L, ...], a
block like the text model's: attention wq/wk/wv [Dv, H, d], wo [H, d, Dv], feed_forward w1/w3
[Dv, F], w2 [F, Dv], attention_norm, ffn_norm), `norm`, `projector/merging_layer` [Dv·s², Dv]
(its rows channel-major: row c·s² + i·s + j is channel c of the patch at (i, j) of the block,
as torch's unfold lays them), `projector/w_in` [Dv, D], `projector/w_out` [D, D].
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from mistral_jax.model import rope
from mistral_jax.model.attention import masked_attention
from mistral_jax.model.config import MistralConfig
from mistral_jax.model.layers import RMSNorm, fan_in, param, project

ENCODER_EPS = 1e-5  # the encoder's norms' (Pixtral's, whatever the text model's norm_eps)


class ImageFeatures(NamedTuple):
    """What a prompt's images put in place of its image tokens: a chunk of the prompt can take
    them (sampling.prefill) without running the encoder again."""

    embeddings: jax.Array  # [M, D]: every image token's embedding, images in order
    index: jax.Array  # [B, T] int32: which embedding each token takes; -1: its own


class VisionBlock(nn.Module):
    """The encoder's pre-norm block: attention with 2-D RoPE among an image's own patches, then
    the gated feed-forward. x [N, P, Dv] -> (x, None), for nn.scan."""

    config: MistralConfig

    @nn.compact
    def __call__(self, x, rows, columns, mask):
        N, P, Dv = x.shape
        h = RMSNorm(self.config, eps=ENCODER_EPS, name="attention_norm")(x).reshape(N * P, Dv)
        x = x + _Attention(self.config, name="attention")(h, rows, columns, mask).reshape(N, P, Dv)
        h = RMSNorm(self.config, eps=ENCODER_EPS, name="ffn_norm")(x).reshape(N * P, Dv)
        return x + _FeedForward(self.config, name="feed_forward")(h).reshape(N, P, Dv), None


class _Attention(nn.Module):
    """Multi-head attention (no grouping) with 2-D RoPE; x [N·P, Dv] -> [N·P, Dv]."""

    config: MistralConfig

    @nn.compact
    def __call__(self, x, rows, columns, mask):
        v = self.config.vision
        Dv, H, d = v.dim, v.n_heads, v.head_dim
        N, P = rows.shape
        wq = param(self, "wq", (Dv, H, d), ("embed", "heads", "head_dim"), fan_in(0, (1, 2)))
        wk = param(self, "wk", (Dv, H, d), ("embed", "heads", "head_dim"), fan_in(0, (1, 2)))
        wv = param(self, "wv", (Dv, H, d), ("embed", "heads", "head_dim"), fan_in(0, (1, 2)))
        wo = param(self, "wo", (H, d, Dv), ("heads", "head_dim", "embed"), fan_in((0, 1), 2))
        q, k = (rope.apply_rope_2d(project(self, name, "ND,DHd->NHd", x, w).reshape(N, P, H, d), rows, columns,
                                   v.rope_theta) for name, w in (("wq", wq), ("wk", wk)))
        values = project(self, "wv", "ND,DHd->NHd", x, wv).reshape(N, P, H, d)
        out = masked_attention(q, k, values, mask)
        return project(self, "wo", "NHd,HdD->ND", out.reshape(N * P, H, d), wo)


class _FeedForward(nn.Module):
    """w2(act(w1 x) * w3 x), act SiLU or exact GELU (Vision.act)."""

    config: MistralConfig

    @nn.compact
    def __call__(self, x):
        v = self.config.vision
        w1 = param(self, "w1", (v.dim, v.hidden_dim), ("embed", "mlp"), fan_in(0, 1))
        w3 = param(self, "w3", (v.dim, v.hidden_dim), ("embed", "mlp"), fan_in(0, 1))
        w2 = param(self, "w2", (v.hidden_dim, v.dim), ("mlp", "embed"), fan_in(0, 1))
        act = jax.nn.silu if v.act == "silu" else lambda y: jax.nn.gelu(y, approximate=False)
        return project(self, "w2", "NF,FD->ND", act(project(self, "w1", "ND,DF->NF", x, w1))
                       * project(self, "w3", "ND,DF->NF", x, w3), w2)


class VisionTower(nn.Module):
    """images (a sequence of N arrays [C, H, W], their sizes static) -> the embeddings [M, D] of
    their image tokens, in order: the encoder, then the projector."""

    config: MistralConfig

    @nn.compact
    def __call__(self, images: Sequence[jax.Array]) -> jax.Array:
        c, v = self.config, self.config.vision
        s = v.spatial_merge_size
        grids = [image_grid(c, np.shape(image)) for image in images]  # (h, w) patches of each
        x = _Encoder(c, name="encoder")(images, grids)
        x = RMSNorm(c, name="norm")(x)  # the projector's: the text model's eps, as transformers
        blocks = [merge_blocks(x[n, :h * w], h, w, s) for n, (h, w) in enumerate(grids)]
        return _Projector(c, name="projector")(jnp.concatenate(blocks))


class _Encoder(nn.Module):
    """Pixtral: images -> x [N, P, Dv], each image's patches row-major, padded to P."""

    config: MistralConfig

    @nn.compact
    def __call__(self, images, grids):
        c, v = self.config, self.config.vision
        p = v.patch_size
        P = max(h * w for h, w in grids)
        conv = param(self, "patch_conv", (v.num_channels, p, p, v.dim), (None, None, None, "embed"),
                     fan_in((0, 1, 2), 3))
        patches = []
        for image, (h, w) in zip(images, grids):  # the convolution, stride p: one product per patch
            pixels = jnp.asarray(image).astype(c.dtype).reshape(v.num_channels, h, p, w, p)
            embedded = jnp.einsum("cxuyv,cuvD->xyD", pixels, conv).reshape(h * w, v.dim)
            patches.append(jnp.pad(embedded, ((0, P - h * w), (0, 0))))
        rows, columns, mask = _layout(grids, P)
        x = RMSNorm(c, eps=ENCODER_EPS, name="ln_pre")(jnp.stack(patches))
        layers = nn.scan(VisionBlock, variable_axes={"params": 0}, split_rngs={"params": True},
                         in_axes=(nn.broadcast, nn.broadcast, nn.broadcast), length=v.n_layers,
                         metadata_params={nn.PARTITION_NAME: "layers"})
        return layers(c, name="layers")(x, rows, columns, mask)[0]


class _Projector(nn.Module):
    """Merged blocks [M, Dv·s²] -> [M, D]: the merging layer, then linear -> GELU -> linear."""

    config: MistralConfig

    @nn.compact
    def __call__(self, blocks):
        c, v = self.config, self.config.vision
        merging = param(self, "merging_layer", (blocks.shape[-1], v.dim), (None, "embed"), fan_in(0, 1))
        w_in = param(self, "w_in", (v.dim, c.dim), (None, "embed"), fan_in(0, 1))
        w_out = param(self, "w_out", (c.dim, c.dim), (None, "embed"), fan_in(0, 1))
        return jax.nn.gelu((blocks @ merging) @ w_in, approximate=False) @ w_out


def merge_blocks(patches: jax.Array, h: int, w: int, s: int) -> jax.Array:
    """An image's patches [h·w, Dv] (row-major) -> each s x s block of them as one vector
    [h/s · w/s, Dv·s²], channel-major (transformers' unfold): element c·s² + i·s + j is channel c
    of the block's patch (i, j)."""
    grid = patches.reshape(h // s, s, w // s, s, -1)
    return grid.transpose(0, 2, 4, 1, 3).reshape(h // s * (w // s), -1)


def image_grid(config: MistralConfig, shape: tuple[int, ...]) -> tuple[int, int]:
    """(rows, columns) of patches of an image [C, H, W]; ValueError for one the encoder cannot take."""
    v = config.vision
    side = v.pixels_per_token
    if len(shape) != 3 or shape[0] != v.num_channels or shape[1] % side or shape[2] % side or 0 in shape:
        raise ValueError(f"an image must be an array [{v.num_channels}, H, W] with H and W positive multiples of "
                         f"{side} (patch_size x spatial_merge_size), as mistral-common's ImageEncoder makes it; "
                         f"got shape {tuple(shape)}")
    return shape[1] // v.patch_size, shape[2] // v.patch_size


def _layout(grids: list[tuple[int, int]], P: int) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Each patch's row and column [N, P] and which keys each query reads [N, P, P]: its own
    image's (the rest is padding); None when no image is padded (every key)."""
    rows, columns = np.zeros((len(grids), P), np.int32), np.zeros((len(grids), P), np.int32)
    mask = np.zeros((len(grids), P, P), bool)
    for n, (h, w) in enumerate(grids):
        rows[n, :h * w], columns[n, :h * w] = np.divmod(np.arange(h * w), w)
        mask[n, :, :h * w] = True
    return rows, columns, None if mask.all() else mask


def image_tokens(config: MistralConfig, shape: tuple[int, ...]) -> int:
    """How many image tokens an image [C, H, W] fills."""
    h, w = image_grid(config, shape)
    s = config.vision.spatial_merge_size
    return h // s * (w // s)


def flatten_images(images, rows: int) -> list:
    """The images of a batch in token order: `images` is a sequence of arrays [C, H, W] (the
    images of a single row) or, per row, a sequence of them."""
    if isinstance(images, (np.ndarray, jax.Array)) or not isinstance(images, Sequence):
        raise TypeError(f"images must be a list of arrays [C, H, W] (or a list of them per row), got "
                        f"{type(images).__name__}")
    if all(isinstance(i, Sequence) and not isinstance(i, (str, bytes)) for i in images) and len(images):
        if len(images) != rows:
            raise ValueError(f"images has {len(images)} lists for {rows} rows of tokens")
        return [image for row in images for image in row]
    if rows != 1 and images:
        raise ValueError(f"images for a batch of {rows} rows must be a list per row")
    return list(images)


def token_index(config: MistralConfig, tokens: jax.Array, n_embeddings: int) -> jax.Array:
    """[B, T] int32: for each image token its embedding's index (the image tokens counted
    through the batch in order), -1 elsewhere. Concrete tokens are checked to hold exactly
    n_embeddings image tokens."""
    if not isinstance(tokens, jax.core.Tracer):
        check_image_tokens(config, np.asarray(tokens), n_embeddings)
    is_image = tokens == config.vision.image_token_id
    order = jnp.cumsum(is_image.reshape(-1)).reshape(tokens.shape) - 1
    return jnp.where(is_image, order, -1).astype(jnp.int32)


def check_image_tokens(config: MistralConfig, tokens: np.ndarray, n_embeddings: int) -> None:
    """ValueError unless tokens hold exactly n_embeddings image tokens (numpy: on the host)."""
    count = int(np.sum(tokens == config.vision.image_token_id))
    if count != n_embeddings:
        raise ValueError(f"the tokens hold {count} image tokens ([IMG], id {config.vision.image_token_id}) but "
                         f"the images fill {n_embeddings}")


def merge_images(x: jax.Array, images: ImageFeatures) -> jax.Array:
    """Token embeddings x [B, T, D] with each image token's replaced by its image embedding."""
    taken = jnp.take(images.embeddings, jnp.maximum(images.index, 0), axis=0).astype(x.dtype)
    return jnp.where(images.index[..., None] >= 0, taken, x)
