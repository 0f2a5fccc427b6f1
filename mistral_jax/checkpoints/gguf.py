"""GGUF files (llama.cpp, Ollama) -> Flax params: Mistral and Llama models, Q8_0 weights kept as int8.

A GGUF file holds its config as metadata and its tensors under llama.cpp's names (TOP_TENSORS,
LAYER_TENSORS), read through the `gguf` package's memory map (metadata and arrays only: no code
is loaded). Only general.architecture "llama" is read, which llama.cpp writes for Llama and for
every dense Mistral (7B, Nemo, Small, Codestral); what that metadata can say and the model
cannot (rope scaling, partial rotary, experts, split files) is refused in one line.

ggml lists a tensor's dimensions innermost first, so in NumPy's order a weight is [out, in], as
in PyTorch: the layouts of HF checkpoints (layouts.torch_view) apply, with one difference.
llama.cpp's converter permutes HF's attn_q/attn_k rows back to interleaved rope pairs per head,
the Mistral-native order, so they take the native row order (layouts.row_order).

Q8_0 stores each run of 32 consecutive inputs of a row as int8 with one float16 scale: the
layer projections stored so keep their integers as model/quantize.py's int8 weights with blocks
of 32 inputs (bit-exact: gguf dequantizes them as scale · q in float32 too). Every other tensor
and type (F32, F16, BF16, Q4_0 ... Q6_K, IQ*) is dequantized by gguf's own code into the dtype,
one tensor at a time, so the peak is the output plus one tensor in float32.

The tokenizer: a sentencepiece vocabulary (tokenizer.ggml.model "llama") is rebuilt as a
tokenizer.model from its pieces, scores and types; any other (BPE "gpt2", Tekken) is not, and
the caller is told to pass the model's own file (`tokenizer=`).
"""

from __future__ import annotations

import logging
import os
import tempfile
from collections.abc import Callable, Iterator

import flax.linen as nn
import gguf
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from sentencepiece import sentencepiece_model_pb2

from mistral_jax.checkpoints.convert import CheckpointError, set_path
from mistral_jax.checkpoints.layouts import row_order, torch_view
from mistral_jax.checkpoints.store import check_destination, save_checkpoint
from mistral_jax.checkpoints.tensor_files import aligned_empty
from mistral_jax.model import quantize
from mistral_jax.model.config import MistralConfig
from mistral_jax.model.config_groups import ConfigError
from mistral_jax.model.transformer import abstract_params
from mistral_jax.text.tokenizer import Tokenizer, checkpoint_name

logger = logging.getLogger("mistral_jax")
ARCHITECTURE = "llama"
MAGIC = b"GGUF"
TOP_TENSORS = {("tok_embeddings",): "token_embd", ("norm", "weight"): "output_norm", ("output",): "output"}
LAYER_TENSORS = {  # Flax path under `layers` -> llama.cpp's name in block i, blk.{i}.NAME.weight
    ("attention", "wq"): "attn_q", ("attention", "wk"): "attn_k", ("attention", "wv"): "attn_v",
    ("attention", "wo"): "attn_output", ("attention_norm", "weight"): "attn_norm",
    ("ffn_norm", "weight"): "ffn_norm", ("feed_forward", "w1"): "ffn_gate",
    ("feed_forward", "w2"): "ffn_down", ("feed_forward", "w3"): "ffn_up",
}
Q8_BLOCK = 32  # inputs per float16 scale of Q8_0
Type = gguf.GGMLQuantizationType


def is_gguf(path: str) -> bool:
    """Whether path is a file meant as GGUF: named *.gguf, or starting with GGUF's magic."""
    if not os.path.isfile(path):
        return False
    if path.lower().endswith(".gguf"):
        return True
    with open(path, "rb") as f:
        return f.read(4) == MAGIC


def open_gguf(path: str) -> gguf.GGUFReader:
    """A GGUF file's reader (metadata parsed, tensors memory-mapped); CheckpointError if it is none."""
    try:
        with open(path, "rb") as f:
            magic = f.read(4)
    except OSError as e:
        raise CheckpointError(f"cannot read {path}: {e}") from None
    if magic != MAGIC:
        raise CheckpointError(f"{path} is not a GGUF file (it does not start with {MAGIC.decode()})")
    try:
        reader = gguf.GGUFReader(path)
    except (ValueError, IndexError, KeyError, OverflowError, UnicodeDecodeError) as e:
        # A file cut short leaves a tensor's bytes, or the metadata, past its end.
        raise CheckpointError(f"{path} is a damaged or truncated GGUF file ({e})") from None
    splits = _value(reader, "split.count")
    if isinstance(splits, int) and splits > 1:
        raise CheckpointError(f"{path} is one of {splits} split GGUF files: merge them first "
                              "(llama.cpp's llama-gguf-split --merge)")
    return reader


def _value(reader: gguf.GGUFReader, key: str):
    field = reader.get_field(key)
    return None if field is None else field.contents()


def read_config(reader: gguf.GGUFReader, path: str) -> MistralConfig:
    """The MistralConfig of a GGUF file's metadata (llama.cpp's `llama.*` keys)."""
    arch = _value(reader, "general.architecture")
    if arch != ARCHITECTURE:
        raise CheckpointError(f"{path} holds a {arch!r} model; only {ARCHITECTURE!r} GGUF files (Llama, Mistral "
                              "7B, Nemo, Small, Codestral) convert")

    def get(key: str, default=None):
        value = _value(reader, f"{arch}.{key}")
        if value is None and default is None:
            raise CheckpointError(f"{path} lacks the metadata {arch}.{key}")
        return default if value is None else value

    def decimal(key: str, default=None) -> float:  # stored as float32: 1e-5 back as 1e-5, not 9.99999975e-06
        value = get(key, default)
        return float(str(np.float32(value))) if isinstance(value, float) else value

    scaling = _value(reader, f"{arch}.rope.scaling.type") or "none"
    linear = _value(reader, f"{arch}.rope.scale_linear") or 1.0  # the key before rope.scaling
    if scaling != "none" or linear != 1.0:
        raise CheckpointError(f"{path} scales its rope ({scaling if scaling != 'none' else 'linear'}), which the "
                              "model does not express")
    if "rope_freqs.weight" in {t.name for t in reader.tensors}:
        raise CheckpointError(f"{path} has rope_freqs (Llama 3.1's rope scaling), which the model does not express")
    if get("expert_count", 0):
        raise CheckpointError(f"{path} is a mixture of experts (Mixtral): GGUF experts are not read; convert "
                              "the HF checkpoint instead")
    embedding = next((t for t in reader.tensors if t.name == "token_embd.weight"), None)
    if embedding is None or len(embedding.shape) != 2:
        raise CheckpointError(f"{path} lacks the tensor token_embd.weight [dim, vocab]")
    n_heads = get("attention.head_count")
    dim = get("embedding_length")
    head_dim = get("attention.key_length", dim // n_heads if isinstance(dim, int) and isinstance(n_heads, int)
                   and n_heads > 0 else None)
    for key, value in (("attention.value_length", get("attention.value_length", head_dim)),
                       ("rope.dimension_count", get("rope.dimension_count", head_dim))):
        if value != head_dim:
            raise CheckpointError(f"{path}: {arch}.{key} is {value}, not the head dimension {head_dim} (partial "
                                  "rotary or values of another width), which the model does not express")
    if _value(reader, f"{arch}.rope.freq_base") is None:
        logger.warning(f"{path} does not say its rope frequency base: using 10000, as llama.cpp does")
    window = get("attention.sliding_window", 0)
    try:
        return MistralConfig(
            dim=dim, n_layers=get("block_count"), head_dim=head_dim, hidden_dim=get("feed_forward_length"),
            n_heads=n_heads, n_kv_heads=get("attention.head_count_kv", n_heads),
            vocab_size=int(embedding.shape[1]),  # ggml's [dim, vocab]
            norm_eps=decimal("attention.layer_norm_rms_epsilon"), rope_theta=decimal("rope.freq_base", 10000.0),
            sliding_window=window or None, max_seq_len=get("context_length"),
            tied_embeddings="output.weight" not in {t.name for t in reader.tensors})
    except (ConfigError, TypeError) as e:
        raise CheckpointError(f"{path}: {e}") from None


# ---- tensors -------------------------------------------------------------------------------

def tensor_names(config: MistralConfig) -> dict[tuple[tuple, tuple], str]:
    """(Flax param path, index into it: () or (layer,)) -> its tensor's name in a GGUF file."""
    names = {(path, ()): f"{name}.weight" for path, name in TOP_TENSORS.items()
             if not (config.tied_embeddings and path == ("output",))}
    for i in range(config.n_layers):
        names.update({(("layers",) + path, (i,)): f"blk.{i}.{name}.weight" for path, name in LAYER_TENSORS.items()})
    return names


def float_rows(tensor) -> np.ndarray:
    """A GGUF tensor as a float array in NumPy's order ([out, in]): F32 and F16 as stored, BF16
    viewed as such, any quantized type dequantized by gguf into float32."""
    kind = tensor.tensor_type
    if kind in (Type.F32, Type.F16, Type.F64):
        return tensor.data
    if kind == Type.BF16:
        return tensor.data.view(ml_dtypes.bfloat16)
    if kind in (Type.I8, Type.I16, Type.I32, Type.I64):
        raise CheckpointError(f"tensor {tensor.name} is {kind.name}: weights are floating point or quantized")
    try:
        return gguf.quants.dequantize(tensor.data, kind)
    except NotImplementedError:
        raise CheckpointError(f"tensor {tensor.name} is {kind.name}, which the gguf package cannot dequantize"
                              ) from None


def q8_rows(tensor) -> tuple[np.ndarray, np.ndarray]:
    """(int8 q [out, in], float32 scale [out, in / 32]) of a Q8_0 tensor: its blocks of 34 bytes
    are a float16 scale then 32 int8 values."""
    out = tensor.data.shape[0]
    blocks = tensor.data.reshape(out, -1, 2 + Q8_BLOCK)
    scale = np.ascontiguousarray(blocks[..., :2]).view(np.float16)[..., 0].astype(np.float32)
    return blocks[..., 2:].view(np.int8).reshape(out, -1), scale


def iter_gguf_params(reader: gguf.GGUFReader, config: MistralConfig, dtype: str,
                     on_tensor: Callable[[str], None] = lambda name: None) -> Iterator[tuple[tuple, object]]:
    """Yields (Flax path, value) per parameter, layers stacked, one at a time: a numpy array in
    dtype, or {"q": int8, "scale": float32} for a layer projection stored Q8_0 in every layer."""
    tensors = {t.name: t for t in reader.tensors}
    names = tensor_names(config)
    wanted = set(names.values())
    missing, unexpected = sorted(wanted - set(tensors)), sorted(set(tensors) - wanted)
    if missing:
        raise CheckpointError(f"the GGUF file lacks {len(missing)} tensors the config needs, e.g. {missing[:3]}")
    if unexpected:
        raise CheckpointError(f"the GGUF file has {len(unexpected)} tensors the config does not know, "
                              f"e.g. {unexpected[:3]}")
    indices: dict[tuple, list[tuple]] = {}
    for path, index in names:
        indices.setdefault(path, []).append(index)
    shapes = dict(jax.tree_util.tree_flatten_with_path(nn.unbox(abstract_params(config)))[0])
    np_dtype = jnp.dtype(dtype)

    def place(view_of, path: tuple, index: tuple, rows: np.ndarray, name: str) -> None:
        view = view_of(index)
        if rows.shape != view.shape:
            raise CheckpointError(f"tensor {name} has shape {list(rows.shape)} (as [out, in]), the config expects "
                                  f"{list(view.shape)}")
        order = row_order(path[-1], config, "native")  # attn_q/attn_k rows: interleaved pairs, as native ones
        view[slice(None) if order is None else order] = rows

    for path, index_list in indices.items():
        shape = shapes[tuple(jax.tree_util.DictKey(k) for k in path)].shape
        sources = [tensors[names[path, index]] for index in index_list]
        blocks = _q8_blocks(path, shape, sources)
        if blocks is not None:
            q = aligned_empty(shape, np.int8)
            scale = aligned_empty(tuple(n // b for n, b in zip(shape, blocks)), np.float32)
            for index, tensor in zip(index_list, sources):
                q_rows, scale_rows = q8_rows(tensor)
                place(lambda i: torch_view(path[-1], q[i]), path, index, q_rows, tensor.name)
                place(lambda i: torch_view(path[-1], scale[i]), path, index, scale_rows, tensor.name)
                on_tensor(tensor.name)
            yield path, {"q": q, "scale": scale}
            continue
        kernel = aligned_empty(shape, np_dtype)
        for index, tensor in zip(index_list, sources):
            place(lambda i: torch_view(path[-1], kernel[i]), path, index, float_rows(tensor), tensor.name)
            on_tensor(tensor.name)
        yield path, kernel


def _q8_blocks(path: tuple, shape: tuple[int, ...], sources: list) -> tuple[int, ...] | None:
    """The int8 scale blocks of a stacked layer projection whose every layer is Q8_0 and whose
    runs of 32 inputs tile its input axes (quantize.block_sizes), else None: read as float."""
    if path[0] != "layers" or path[-1] not in quantize.PROJECTIONS:
        return None
    if any(t.tensor_type != Type.Q8_0 for t in sources):
        return None
    try:
        return quantize.block_sizes(shape, path[-1], "int8", Q8_BLOCK)
    except ValueError:
        return None


def load_gguf(path: str, dtype: str = "float32") -> tuple[MistralConfig, dict]:
    """Reads a GGUF file as load_pytorch reads a PyTorch checkpoint.

    Args:
      path: a GGUF file of general.architecture "llama".
      dtype: "float32" or "bfloat16": the dtype of the float params and of the computation.

    Returns:
      (config, params): params is the nested dict for `Mistral(config).apply({"params": params}, ...)`,
      its Q8_0 layer projections {"q": int8, "scale": float32} (model/quantize.py).
    """
    reader = open_gguf(path)
    config = read_config(reader, path).replace(dtype=dtype, param_dtype=dtype)
    params: dict = {}
    for param_path, value in iter_gguf_params(reader, config, dtype):
        set_path(params, param_path, jax.tree_util.tree_map(lambda a: jax.device_put(a, may_alias=True), value))
    return config, params


# ---- the tokenizer -------------------------------------------------------------------------

def sentencepiece_model(reader: gguf.GGUFReader) -> bytes | None:
    """A sentencepiece model (serialized ModelProto) of the GGUF's vocabulary when it is one
    (tokenizer.ggml.model "llama"), else None. The pieces, scores, types and special ids are the
    file's; what GGUF does not carry is as Llama's and Mistral's sentencepiece files have it:
    BPE, identity normalization, a dummy prefix unless add_space_prefix says not, byte fallback
    where there are byte pieces."""
    if _value(reader, "tokenizer.ggml.model") != "llama":
        return None
    pieces = _value(reader, "tokenizer.ggml.tokens") or []
    scores = _value(reader, "tokenizer.ggml.scores") or [0.0] * len(pieces)
    kinds = _value(reader, "tokenizer.ggml.token_type") or [int(gguf.TokenType.NORMAL)] * len(pieces)
    proto = sentencepiece_model_pb2.ModelProto()
    for piece, score, kind in zip(pieces, scores, kinds):
        proto.pieces.add(piece=piece, score=score, type=kind)  # GGUF's token types are sentencepiece's
    spec = proto.trainer_spec
    spec.model_type = sentencepiece_model_pb2.TrainerSpec.BPE
    spec.vocab_size = len(pieces)
    spec.byte_fallback = int(gguf.TokenType.BYTE) in kinds
    spec.split_digits = spec.allow_whitespace_only_pieces = True
    for special in ("unk", "bos", "eos", "pad"):
        key = "unknown" if special == "unk" else "padding" if special == "pad" else special
        token = _value(reader, f"tokenizer.ggml.{key}_token_id")
        token = token if isinstance(token, int) and 0 <= token < len(pieces) else -1
        setattr(spec, f"{special}_id", token)
        if token >= 0:
            setattr(spec, f"{special}_piece", pieces[token])
    normalizer = proto.normalizer_spec
    normalizer.name = "identity"
    normalizer.add_dummy_prefix = _value(reader, "tokenizer.ggml.add_space_prefix") is not False
    normalizer.remove_extra_whitespaces = False
    normalizer.escape_whitespaces = True
    return proto.SerializeToString()


def _tokenizer_file(reader: gguf.GGUFReader, src: str, given: str | None, config: MistralConfig,
                    tmp: str) -> tuple[str | None, str]:
    """(the tokenizer file to put beside the weights or None, a line saying which and why)."""
    if given is not None:
        try:
            size = Tokenizer(given).vocab_size
        except ValueError as e:
            raise CheckpointError(f"{given} is no tokenizer ({e})") from None
        if size > config.vocab_size:
            raise CheckpointError(f"{given} has {size} tokens, more than the model's {config.vocab_size}")
        return given, f"tokenizer: {checkpoint_name(given)} copied from {given}"
    try:
        rebuilt = sentencepiece_model(reader)
    except ValueError as e:  # a token type sentencepiece does not know
        raise CheckpointError(f"{src}'s sentencepiece vocabulary makes no tokenizer ({e}); pass --tokenizer FILE"
                              ) from None
    if rebuilt is None:
        kind = _value(reader, "tokenizer.ggml.model")
        return None, (f"tokenizer: none written: {src}'s tokenizer is {kind!r}, which is not rebuilt as a file; "
                      "pass --tokenizer FILE (the model's tekken.json or tokenizer.model) to include one")
    file = os.path.join(tmp, "tokenizer.model")
    with open(file, "wb") as f:
        f.write(rebuilt)
    try:
        Tokenizer(file)
    except ValueError as e:
        raise CheckpointError(f"{src}'s sentencepiece vocabulary makes no tokenizer ({e}); pass --tokenizer FILE"
                              ) from None
    return file, "tokenizer: tokenizer.model rebuilt from the GGUF's sentencepiece vocabulary"


def convert_gguf(src: str, dst: str, dtype: str = "bfloat16", overwrite: bool = False,
                 tokenizer: str | None = None, on_start: Callable[[int], None] = lambda n: None,
                 on_tensor: Callable[[str], None] = lambda name: None) -> tuple[MistralConfig, str]:
    """A GGUF file -> a mistral_jax checkpoint (orbax params, config.json, a tokenizer: the file
    `tokenizer`, else one rebuilt from the GGUF's sentencepiece vocabulary). Returns (config, a
    line saying what tokenizer dst got, or why none)."""
    check_destination(dst, overwrite)
    reader = open_gguf(src)
    config = read_config(reader, src).replace(dtype=dtype, param_dtype=dtype)
    with tempfile.TemporaryDirectory() as tmp:
        file, said = _tokenizer_file(reader, src, tokenizer, config, tmp)
        on_start(len(tensor_names(config)))
        params: dict = {}
        for path, value in iter_gguf_params(reader, config, dtype, on_tensor):
            set_path(params, path, jax.tree_util.tree_map(lambda a: jax.device_put(a, may_alias=True), value))
        save_checkpoint(dst, config, params, overwrite=overwrite,
                        extra_files={checkpoint_name(file): file} if file else None)
    return config, said

