"""PyTorch checkpoints (HF transformers and Mistral-native layouts) <-> Flax params, streamed.

Conversion is a rename, a transpose/reshape per tensor, and one permutation: Mistral-native
wq/wk rows rotate interleaved pairs (2i, 2i+1) while the model (model/rope.py) rotates halves
(i, i + d/2), as HF's rows already do. Tensors are read lazily (safetensors through a
memory map per tensor, PyTorch pickles through torch's mmap) and produced one stacked
parameter at a time, so the peak is one copy of the output plus one source tensor.
"""

from __future__ import annotations

import glob
import json
import logging
import os
import re
import shutil
from collections.abc import Callable, Iterator, Mapping

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np

from mistral_jax.checkpoints.store import atomic_directory, check_destination, load_checkpoint, save_checkpoint
from mistral_jax.checkpoints.tensor_files import aligned_empty, read_tensor_file, TensorFileError, to_numpy, write_safetensors
from mistral_jax.model.config import MistralConfig
from mistral_jax.text.tokenizer import checkpoint_name, find_tokenizer, Tokenizer

logger = logging.getLogger("mistral_jax")


class CheckpointError(ValueError):
    """A checkpoint directory or file that cannot be read as a Mistral model."""


# Flax path under `layers` -> (native name, HF name) within layer i, without ".weight".
LAYER_TENSORS = {
    ("attention", "wq"): ("attention.wq", "self_attn.q_proj"),
    ("attention", "wk"): ("attention.wk", "self_attn.k_proj"),
    ("attention", "wv"): ("attention.wv", "self_attn.v_proj"),
    ("attention", "wo"): ("attention.wo", "self_attn.o_proj"),
    ("feed_forward", "w1"): ("feed_forward.w1", "mlp.gate_proj"),
    ("feed_forward", "w2"): ("feed_forward.w2", "mlp.down_proj"),
    ("feed_forward", "w3"): ("feed_forward.w3", "mlp.up_proj"),
    ("attention_norm", "weight"): ("attention_norm", "input_layernorm"),
    ("ffn_norm", "weight"): ("ffn_norm", "post_attention_layernorm"),
}
# With experts (Mixtral) the feed-forward is a router and E experts' SwiGLUs, stacked [E, ...]
# in Flax: expert e's tensors replace {e}.
EXPERT_TENSORS = {
    ("feed_forward", "gate"): ("feed_forward.gate", "block_sparse_moe.gate"),
    ("feed_forward", "w1"): ("feed_forward.experts.{e}.w1", "block_sparse_moe.experts.{e}.w1"),
    ("feed_forward", "w2"): ("feed_forward.experts.{e}.w2", "block_sparse_moe.experts.{e}.w2"),
    ("feed_forward", "w3"): ("feed_forward.experts.{e}.w3", "block_sparse_moe.experts.{e}.w3"),
}
TOP_TENSORS = {
    ("tok_embeddings",): ("tok_embeddings", "model.embed_tokens"),
    ("norm", "weight"): ("norm", "model.norm"),
    ("output",): ("output", "lm_head"),
}
_IGNORED = re.compile(r".*rotary_emb\.inv_freq$")  # a buffer older HF .bin files carry
# Where an HF checkpoint keeps the text model, told by the embedding's name: (prefix of what
# MistralForCausalLM calls "model.", prefix of "lm_head"). Mistral3ForConditionalGeneration
# (Mistral Small 3.1) as transformers >= 5 saves it, and as its hub files (4.x) have it.
HF_TEXT_PREFIXES = {
    "model.embed_tokens.weight": ("model.", ""),
    "model.language_model.embed_tokens.weight": ("model.language_model.", ""),
    "language_model.model.embed_tokens.weight": ("language_model.model.", "language_model."),
}
# What a multimodal checkpoint holds beside its text model (HF and native names), not read.
_VISION = re.compile(r"(model\.)?(vision_tower|multi_modal_projector)\.|"
                     r"(vision_encoder|vision_language_adapter|patch_merger|pre_mm_projector_norm)\.")


def layer_tensors(c: MistralConfig) -> dict[tuple, tuple[str, str]]:
    """LAYER_TENSORS, with EXPERT_TENSORS as the feed-forward of a model with experts."""
    if not c.moe:
        return LAYER_TENSORS
    return {**{path: names for path, names in LAYER_TENSORS.items() if path[0] != "feed_forward"},
            **EXPERT_TENSORS}


def torch_shape(leaf: str, c: MistralConfig) -> tuple[int, ...]:
    """Shape of a tensor in PyTorch layout ([out, in] for linear weights; one expert's)."""
    D, F, V, d, E = c.dim, c.hidden_dim, c.vocab_size, c.head_dim, c.moe.n_experts if c.moe else 0
    return {"wq": (c.n_heads * d, D), "wk": (c.n_kv_heads * d, D), "wv": (c.n_kv_heads * d, D),
            "wo": (D, c.n_heads * d), "w1": (F, D), "w3": (F, D), "w2": (D, F), "weight": (D,),
            "gate": (E, D), "tok_embeddings": (V, D), "output": (V, D)}[leaf]


def torch_to_flax(leaf: str, w: np.ndarray, c: MistralConfig) -> np.ndarray:
    """PyTorch layout -> the model's kernel layout (see model/transformer.py)."""
    D, d = c.dim, c.head_dim
    if leaf in ("wq", "wk", "wv"):
        return w.reshape(-1, d, D).transpose(2, 0, 1)  # [N*d, D] -> [D, N, d]
    if leaf == "wo":
        return w.reshape(D, c.n_heads, d).transpose(1, 2, 0)  # [D, H*d] -> [H, d, D]
    if leaf in ("w1", "w2", "w3", "gate", "output"):
        return w.T
    return w


def flax_to_torch(leaf: str, w: np.ndarray, c: MistralConfig) -> np.ndarray:
    """The inverse of torch_to_flax."""
    if leaf in ("wq", "wk", "wv"):
        return w.transpose(1, 2, 0).reshape(-1, c.dim)  # [D, N, d] -> [N*d, D]
    if leaf == "wo":
        return w.transpose(2, 0, 1).reshape(c.dim, -1)  # [H, d, D] -> [D, H*d]
    if leaf in ("w1", "w2", "w3", "gate", "output"):
        return w.T
    return w


def interleaved_to_rotate_half(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Permutes wq/wk rows [N*d, D] so that pair (2i, 2i+1) of each head becomes (i, i + d/2).

    The same permutation as transformers' convert_mistral_weights_to_hf.py.
    """
    rows, cols = w.shape
    return w.reshape(n_heads, rows // n_heads // 2, 2, cols).transpose(0, 2, 1, 3).reshape(rows, cols)


# ---- finding checkpoints --------------------------------------------------------------------

def find_checkpoint(path: str) -> tuple[str, list[str]]:
    """("hf" | "native", weight files) of a PyTorch checkpoint directory."""
    if not os.path.isdir(path):
        raise CheckpointError(f"{path} is not a directory")
    in_dir = lambda pattern: sorted(glob.glob(os.path.join(path, pattern)))  # noqa: E731
    if os.path.isfile(os.path.join(path, "config.json")):
        index = os.path.join(path, "model.safetensors.index.json")
        if os.path.isfile(index):
            weight_map = _read_json(index).get("weight_map")
            if not isinstance(weight_map, dict) or not all(isinstance(n, str) for n in weight_map.values()):
                raise CheckpointError(f"{index} has no weight_map of tensor names to shard files")
            names = sorted(set(weight_map.values()))
            outside = [n for n in names if os.path.basename(n) != n or n in ("", ".", "..")]
            if outside:  # HF's shards lie beside the index; a path could read any file
                raise CheckpointError(f"{index} names a shard that is not a file beside it: {outside[0]!r}")
            files = [os.path.join(path, n) for n in names]
            missing = [n for n, f in zip(names, files) if not os.path.isfile(f)]
            if missing:
                raise CheckpointError(f"{index} lists shards that are missing: {', '.join(missing)}")
            return "hf", files
        files = [f for f in in_dir("*.safetensors") if not os.path.basename(f).startswith("consolidated")]
        if files or (files := in_dir("pytorch_model*.bin")):
            return "hf", files
    if os.path.isfile(os.path.join(path, "params.json")):
        if os.path.isfile(os.path.join(path, "consolidated.safetensors")):
            return "native", [os.path.join(path, "consolidated.safetensors")]
        shards = in_dir("consolidated.*.pth")
        if len(shards) > 1:
            raise CheckpointError(f"{path} holds a tensor-parallel checkpoint ({len(shards)} consolidated.*.pth "
                                  "files); only single-file native checkpoints are supported")
        if shards:
            return "native", shards
    raise CheckpointError(f"{path} is neither an HF checkpoint (config.json + *.safetensors or "
                          "pytorch_model*.bin) nor a Mistral-native one (params.json + "
                          "consolidated.safetensors or consolidated.00.pth)")


def _read_all(files: list[str]) -> dict[str, Mapping[str, object]]:
    """Tensor name -> the (lazy) file mapping that holds it."""
    sources: dict[str, Mapping[str, object]] = {}
    for file in files:
        try:
            contents = read_tensor_file(file)
        except TensorFileError as e:
            raise CheckpointError(str(e)) from None
        for name in contents:
            if name in sources:
                raise CheckpointError(f"tensor {name} appears in more than one file of {os.path.dirname(file)}")
            sources[name] = contents
    return sources


# ---- PyTorch -> Flax ------------------------------------------------------------------------

def tensor_names(layout: str, c: MistralConfig, hf_prefixes: tuple[str, str] = ("model.", "")
                 ) -> dict[tuple[tuple, tuple], str]:
    """(Flax param path, index into it) -> tensor name in a checkpoint of layout; the index
    is () for a top-level param, (layer,) under `layers`, (layer, expert) for an expert's.
    An HF text model under hf_prefixes (HF_TEXT_PREFIXES)."""
    pick = 0 if layout == "native" else 1
    prefix = "layers" if layout == "native" else "model.layers"
    names = {(path, ()): names[pick] + ".weight" for path, names in TOP_TENSORS.items()}
    for i in range(c.n_layers):
        for path, layer_names in layer_tensors(c).items():
            name = f"{prefix}.{i}.{layer_names[pick]}.weight"
            if "{e}" not in name:
                names[("layers",) + path, (i,)] = name
            for e in range(c.moe.n_experts if "{e}" in name else 0):
                names[("layers",) + path, (i, e)] = name.format(e=e)
    if layout == "hf" and hf_prefixes != ("model.", ""):
        body, head = hf_prefixes
        names = {key: body + name.removeprefix("model.") if name.startswith("model.") else head + name
                 for key, name in names.items()}
    return names


def source_names(layout: str, config: MistralConfig, present, multimodal: bool = False
                 ) -> tuple[dict[tuple[tuple, tuple], str], list[str]]:
    """(tensor_names' keys -> the name of each tensor among `present`, the present tensors not read:
    a multimodal checkpoint's vision encoder and projector)."""
    skipped = sorted(name for name in present if multimodal and _VISION.match(name))
    prefixes = ("model.", "")
    if layout == "hf":
        prefixes = next((p for embedding, p in HF_TEXT_PREFIXES.items() if embedding in present), prefixes)
    return tensor_names(layout, config, prefixes), skipped


def iter_flax_params(layout: str, sources: Mapping[str, Mapping[str, object]], config: MistralConfig, dtype: str,
                     on_tensor: Callable[[str], None] = lambda name: None, multimodal: bool = False
                     ) -> Iterator[tuple[tuple, np.ndarray]]:
    """Yields (Flax path, numpy array in dtype) per parameter, layers stacked, one at a time.

    sources maps each tensor name to the file mapping that holds it; a tensor is mapped
    from its file only while it is converted. multimodal: the checkpoint's text model is
    read, its vision tensors skipped (said).
    """
    present = {k for k in sources if not _IGNORED.match(k)}
    names, skipped = source_names(layout, config, present, multimodal)
    if skipped:
        logger.warning("reading the text model of a multimodal checkpoint; skipping its %d vision encoder "
                       "and projector tensors", len(skipped))
    present -= set(skipped)
    missing = sorted(set(names.values()) - present)
    unexpected = sorted(present - set(names.values()))
    if missing:
        raise CheckpointError(f"checkpoint lacks {len(missing)} tensors the config needs, e.g. {missing[:3]}")
    if unexpected:
        raise CheckpointError(f"checkpoint has {len(unexpected)} tensors the config does not know, "
                              f"e.g. {unexpected[:3]}")
    np_dtype = jnp.dtype(dtype)

    def load(key: tuple[tuple, tuple], out: np.ndarray | None = None) -> np.ndarray:
        name, leaf = names[key], key[0][-1]
        source = sources[name]
        w = to_numpy(source[name])
        if not (np.issubdtype(w.dtype, np.floating) or w.dtype == ml_dtypes.bfloat16):
            raise CheckpointError(f"tensor {name} has dtype {w.dtype}: weights are real floating point")
        if tuple(w.shape) != torch_shape(leaf, config):
            raise CheckpointError(f"tensor {name} has shape {tuple(w.shape)}, the config expects "
                                  f"{torch_shape(leaf, config)}")
        if layout == "native" and leaf in ("wq", "wk"):
            w = interleaved_to_rotate_half(w, config.n_heads if leaf == "wq" else config.n_kv_heads)
        w = torch_to_flax(leaf, w, config)
        if out is None:
            out = aligned_empty(w.shape, np_dtype)
        out[...] = w  # reads the mapped source and casts, with no intermediate copy
        source.release(name)
        on_tensor(name)
        return out

    for path in TOP_TENSORS:
        yield path, load((path, ()))
    for path, layer_names in layer_tensors(config).items():
        stack = (config.n_layers, config.moe.n_experts) if "{e}" in layer_names[0] else (config.n_layers,)
        one = torch_to_flax(path[-1], np.empty(torch_shape(path[-1], config), np.int8), config).shape
        stacked = aligned_empty(stack + one, np_dtype)
        for index in np.ndindex(stack):
            load((("layers",) + path, index), stacked[index])
        yield ("layers",) + path, stacked


def read_pytorch(path: str, dtype: str = "float32",
                 on_tensor: Callable[[str], None] = lambda name: None
                 ) -> tuple[MistralConfig, str, int, Iterator[tuple[tuple, np.ndarray]]]:
    """(config, layout, number of tensors, iterator of (Flax path, numpy array)) of a checkpoint dir."""
    layout, files = find_checkpoint(path)
    config, multimodal = read_config(path, layout)
    config = config.replace(dtype=dtype, param_dtype=dtype)
    sources = _read_all(files)
    arrays = iter_flax_params(layout, sources, config, dtype, on_tensor, multimodal)
    return config, layout, len(tensor_names(layout, config)), arrays


def read_config(path: str, layout: str) -> tuple[MistralConfig, bool]:
    """(the config of a checkpoint dir of layout, whether it is a multimodal model's)."""
    file = os.path.join(path, "config.json" if layout == "hf" else "params.json")
    d = _read_json(file)
    if not isinstance(d, dict):
        raise CheckpointError(f"{file} does not hold a JSON object")
    if layout == "hf":
        return MistralConfig.from_hf_dict(d), d.get("model_type") == "mistral3"
    return MistralConfig.from_params_dict(d), bool(d.get("vision_encoder"))


def load_pytorch(path: str, dtype: str = "float32") -> tuple[MistralConfig, dict]:
    """Reads an HF or Mistral-native PyTorch checkpoint directory.

    Args:
      path: a directory with config.json + model*.safetensors / pytorch_model*.bin (HF), or
        params.json + consolidated.safetensors / consolidated.00.pth (Mistral-native).
      dtype: "float32" or "bfloat16": the dtype of the returned params and of the computation.

    Returns:
      (config, params): params is the nested dict for `Mistral(config).apply({"params": params}, ...)`.
    """
    config, _, _, arrays = read_pytorch(path, dtype)
    params: dict = {}
    for param_path, array in arrays:
        set_path(params, param_path, jax.device_put(array, may_alias=True))  # no copy on CPU
    return config, params


def set_path(tree: dict, path: tuple, value) -> None:
    for key in path[:-1]:
        tree = tree.setdefault(key, {})
    tree[path[-1]] = value


# ---- Flax -> HF -----------------------------------------------------------------------------

HF_SHARD_BYTES = 5 * 2**30  # what transformers' save_pretrained uses


def save_hf(out_dir: str, config: MistralConfig, params: dict, dtype: str | None = None,
            max_shard_bytes: int = HF_SHARD_BYTES, on_tensor: Callable[[str], None] = lambda name: None
            ) -> list[str]:
    """Writes config.json and model.safetensors (sharded with an index above max_shard_bytes),
    as transformers' MistralForCausalLM (Ministral..., Mixtral...) .from_pretrained reads
    them. Returns the files written."""
    if not config.hf_expressible:
        if config.moe and config.grouped_layers:
            raise CheckpointError("experts with per-layer windows: transformers' MixtralConfig has one "
                                  "sliding_window for every layer, so no HF model holds this one")
        raise CheckpointError(f"windows {sorted({w for w in config.windows if w})} in one model: transformers' "
                              "MinistralConfig has a single sliding_window, so no HF model holds this one")
    np_dtype = jnp.dtype(dtype) if dtype else None
    arrays = jax.tree_util.tree_map(np.asarray, params)  # zero-copy views on CPU
    entries = []
    for (path, index), name in tensor_names("hf", config).items():
        leaf = arrays
        for key in path:
            leaf = leaf[key]
        shape = torch_shape(path[-1], config)
        out_dtype = np_dtype or leaf.dtype

        def make(leaf=leaf, index=index, kind=path[-1], name=name):
            on_tensor(name)
            return flax_to_torch(kind, leaf[index], config)

        entries.append((name, shape, out_dtype, make))

    shards, size = [[]], 0
    for entry in entries:
        nbytes = int(np.prod(entry[1])) * np.dtype(entry[2]).itemsize
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(entry)
        size += nbytes
    written = []
    if len(shards) == 1:
        write_safetensors(os.path.join(out_dir, "model.safetensors"), shards[0])
        written.append("model.safetensors")
    else:
        weight_map = {}
        for k, shard in enumerate(shards):
            file = f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
            write_safetensors(os.path.join(out_dir, file), shard)
            weight_map.update({entry[0]: file for entry in shard})
            written.append(file)
        total = sum(int(np.prod(e[1])) * np.dtype(e[2]).itemsize for e in entries)
        with open(os.path.join(out_dir, "model.safetensors.index.json"), "w") as f:
            json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
        written.append("model.safetensors.index.json")
    config.replace(param_dtype=np.dtype(entries[0][2]).name).save_hf(out_dir)
    return written + ["config.json"]


# ---- whole directories ----------------------------------------------------------------------

def convert_pytorch_checkpoint(src: str, dst: str, dtype: str = "bfloat16", overwrite: bool = False,
                               on_start: Callable[[int], None] = lambda n: None,
                               on_tensor: Callable[[str], None] = lambda name: None) -> MistralConfig:
    """A PyTorch checkpoint directory -> a mistral_jax checkpoint (orbax params, config.json,
    and src's tokenizer file, under its own name, when it has one). Holds one copy of the params."""
    check_destination(dst, overwrite)
    config, _, n_tensors, arrays = read_pytorch(src, dtype, on_tensor)
    on_start(n_tensors)
    params: dict = {}
    for path, array in arrays:
        set_path(params, path, jax.device_put(array, may_alias=True))  # orbax saves jax arrays faster
    tokenizer = _tokenizer_file(src)
    save_checkpoint(dst, config, params, overwrite=overwrite,
                    extra_files={checkpoint_name(tokenizer): tokenizer} if tokenizer else None)
    return config


def export_hf_checkpoint(ckpt: str, dst: str, dtype: str | None = None, overwrite: bool = False,
                         on_start: Callable[[int], None] = lambda n: None,
                         on_tensor: Callable[[str], None] = lambda name: None) -> MistralConfig:
    """A mistral_jax checkpoint -> an HF transformers directory (config.json, safetensors)."""
    check_destination(dst, overwrite)
    config, params = load_checkpoint(ckpt, dtype)
    on_start(len(tensor_names("hf", config)))
    tokenizer = _tokenizer_file(ckpt)
    with atomic_directory(dst, overwrite) as tmp:
        save_hf(tmp, config, params, on_tensor=on_tensor)
        if tokenizer:
            shutil.copyfile(tokenizer, os.path.join(tmp, checkpoint_name(tokenizer)))
    return config


def _tokenizer_file(directory: str) -> str | None:
    """directory's tokenizer file to copy beside the weights, checked to be one: a symlink
    (an HF cache's files all are) is followed, but what it points to must parse as a
    tokenizer, so no other file's contents travel into the output under its name."""
    tokenizer = find_tokenizer(directory)
    if tokenizer is not None:
        try:
            Tokenizer(tokenizer)
        except ValueError as e:
            raise CheckpointError(f"{tokenizer} is no tokenizer ({e})") from None
    return tokenizer


def _read_json(file: str) -> dict:
    try:
        with open(file) as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        raise CheckpointError(f"cannot read {file}: {e}") from None
