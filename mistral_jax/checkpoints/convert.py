"""PyTorch checkpoints (HF transformers and Mistral-native layouts) <-> Flax params, streamed.

What each tensor is called and how its layout maps onto the model's is layouts.py; FP8
weights are dequantized as they are read (fp8.py). Tensors are read lazily (safetensors
through a memory map per tensor, PyTorch pickles through torch's mmap) and produced one
stacked parameter at a time, so the peak is one copy of the output plus one source tensor.
"""

from __future__ import annotations

import dataclasses
import glob
import json
import os
import shutil
from collections.abc import Callable, Iterator, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np

from mistral_jax.checkpoints import fp8
from mistral_jax.checkpoints.layouts import IGNORED, rows_of, source_names, tensor_names, torch_view
from mistral_jax.checkpoints.store import atomic_directory, check_destination, load_checkpoint, save_checkpoint
from mistral_jax.checkpoints.tensor_files import (TensorFileError, aligned_empty, read_tensor_file, to_numpy,
                                                  write_safetensors)
from mistral_jax.model import quantize as quantization
from mistral_jax.model.config import MistralConfig
from mistral_jax.model.transformer import abstract_params
from mistral_jax.text.tokenizer import Tokenizer, checkpoint_name, find_tokenizer


class CheckpointError(ValueError):
    """A checkpoint directory or file that cannot be read as a Mistral model."""


@dataclasses.dataclass(frozen=True)
class Source:
    """A PyTorch checkpoint directory, found and its config read."""

    path: str
    layout: str  # "hf" or "native"
    files: tuple[str, ...]  # the weight files
    config: MistralConfig
    fp8_block: tuple[int, int]  # the block of FP8 block scales (fp8.py)
    rope_interleave: bool = True  # latent attention's rope rows stored as interleaved pairs


def find_source(path: str) -> Source:
    layout, files = find_checkpoint(path)
    file = os.path.join(path, "config.json" if layout == "hf" else "params.json")
    d = _read_json(file)
    if not isinstance(d, dict):
        raise CheckpointError(f"{file} does not hold a JSON object")
    config = MistralConfig.from_hf_dict(d) if layout == "hf" else MistralConfig.from_params_dict(d)
    try:
        block = fp8.block_size(d.get("quantization_config"))
    except fp8.ScaleError as e:
        raise CheckpointError(f"{file}: {e}") from None
    text = d.get("text_config") if isinstance(d.get("text_config"), dict) else d
    interleave = text.get("rope_interleave", True) if layout == "hf" else True
    if interleave is not None and not isinstance(interleave, bool):
        raise CheckpointError(f"{file}: rope_interleave must be true or false, got {interleave!r}")
    return Source(path, layout, tuple(files), config, block, bool(interleave))  # null: as transformers


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

def iter_flax_params(source: Source, sources: Mapping[str, Mapping[str, object]], config: MistralConfig,
                     dtype: str, on_tensor: Callable[[str], None] = lambda name: None
                     ) -> Iterator[tuple[tuple, np.ndarray]]:
    """Yields (Flax path, numpy array in dtype) per parameter, layers stacked, one at a time.

    sources maps each tensor name to the file mapping that holds it; a tensor is mapped
    from its file only while it is converted. FP8 weights are dequantized with their scales.
    """
    present = {k for k in sources if not IGNORED.match(k)}
    names, skipped = source_names(source.layout, config, present)
    scales, activation_scales = fp8.scales_of(present)
    unread = set(skipped) | {scale for weight, scale in scales.items() if weight in skipped}  # with their scales
    scales = {weight: scale for weight, scale in scales.items() if weight not in unread}
    present -= unread | set(scales.values()) | set(activation_scales)
    wanted = {tensor.name for tensor in names.values()}
    missing, unexpected = sorted(wanted - present), sorted(present - wanted)
    if missing:
        raise CheckpointError(f"checkpoint lacks {len(missing)} tensors the config needs, e.g. {missing[:3]}")
    if unexpected:
        raise CheckpointError(f"checkpoint has {len(unexpected)} tensors the config does not know, "
                              f"e.g. {unexpected[:3]}")
    orphans = sorted(set(scales) - present)
    if orphans:
        raise CheckpointError(f"checkpoint has scales of no weight: {scales[orphans[0]]}")
    np_dtype = jnp.dtype(dtype)

    def load(key: tuple[tuple, tuple], kernel: np.ndarray) -> None:
        tensor, path = names[key], key[0]
        name = tensor.name
        w = tensor.rows(to_numpy(sources[name][name]))
        view = torch_view(path[-1], kernel)  # the kernel in PyTorch's layout: what is written there lands in it
        if tuple(w.shape) != view.shape:
            raise CheckpointError(f"tensor {name} has shape {tuple(w.shape)}, the config expects {view.shape}")
        order = rows_of(path, config, source.layout, source.rope_interleave)  # where each source row goes
        into = lambda rows: rows if order is None else order[rows]  # noqa: E731
        if w.dtype in fp8.FLOAT8:
            if name not in scales:
                raise CheckpointError(f"tensor {name} is {w.dtype} but has no scale beside it")
            scale = to_numpy(sources[scales[name]][scales[name]])
            try:
                for rows, values in fp8.dequantized_rows(scales[name], w, scale, source.fp8_block):
                    view[into(rows)] = values
            except fp8.ScaleError as e:
                raise CheckpointError(str(e)) from None
        elif name in scales:
            raise CheckpointError(f"tensor {name} has a scale but is {w.dtype}, not float8")
        elif np.issubdtype(w.dtype, np.floating) or w.dtype == ml_dtypes.bfloat16:
            view[into(slice(None))] = w  # reads the mapped source, permutes and casts, with no intermediate copy
        else:
            raise CheckpointError(f"tensor {name} has dtype {w.dtype}: weights are real floating point")
        sources[name].release(name)
        on_tensor(name)

    indices: dict[tuple, list[tuple]] = {}  # each param's (layer, expert) indices, in order
    for path, index in names:
        indices.setdefault(path, []).append(index)
    shapes = dict(jax.tree_util.tree_flatten_with_path(nn.unbox(abstract_params(config)))[0])
    for path, index_list in indices.items():
        kernel = aligned_empty(shapes[tuple(jax.tree_util.DictKey(k) for k in path)].shape, np_dtype)
        for index in index_list:
            load((path, index), kernel[index])
        yield path, kernel


def read_pytorch(path: str, dtype: str = "float32",
                 on_tensor: Callable[[str], None] = lambda name: None
                 ) -> tuple[MistralConfig, str, int, Iterator[tuple[tuple, np.ndarray]]]:
    """(config, layout, number of tensors, iterator of (Flax path, numpy array)) of a checkpoint dir."""
    source = find_source(path)
    config = source.config.replace(dtype=dtype, param_dtype=dtype)
    sources = _read_all(list(source.files))
    arrays = iter_flax_params(source, sources, config, dtype, on_tensor)
    return config, source.layout, len(tensor_names(source.layout, config)), arrays


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
    as transformers' MistralForCausalLM (Ministral..., Mixtral..., Ministral3..., Mistral4...,
    Mistral3ForConditionalGeneration with a vision encoder) .from_pretrained reads them. Returns the files written."""
    if config.hf_obstacle:
        raise CheckpointError(f"{config.hf_obstacle}, so no HF model holds this one")
    np_dtype = jnp.dtype(dtype) if dtype else None
    arrays = jax.tree_util.tree_map(np.asarray, params)  # zero-copy views on CPU
    parts: dict[str, list] = {}  # tensor name -> its parameters' (rows' part, path, index), in order
    for (path, index), tensor in tensor_names("hf", config).items():
        parts.setdefault(tensor.name, []).append((tensor.part, path, index))

    def piece(path: tuple, index: tuple) -> np.ndarray:
        """A parameter in PyTorch's layout, its rope rows as HF stores them."""
        leaf = arrays
        for key in path:
            leaf = leaf[key]
        view, order = torch_view(path[-1], leaf[index]), rows_of(path, config, "hf")
        return view if order is None else view[order]

    entries = []
    for name, pieces in parts.items():
        pieces = sorted(pieces)
        first = piece(*pieces[0][1:])
        shape = first.shape if len(pieces) == 1 else first.shape[:-2] + (first.shape[-2] * len(pieces),
                                                                         first.shape[-1])

        def make(pieces=pieces, name=name):
            on_tensor(name)
            made = [piece(path, index) for _, path, index in pieces]
            return made[0] if len(made) == 1 else np.concatenate(made, axis=-2)

        entries.append((name, shape, np_dtype or first.dtype, make))

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
                               on_tensor: Callable[[str], None] = lambda name: None,
                               quantize: str | None = None, group: int | None = None) -> MistralConfig:
    """A PyTorch checkpoint directory -> a mistral_jax checkpoint (orbax params, config.json,
    and src's tokenizer file, under its own name, when it has one). Holds one copy of the params;
    with quantize ("int8", "int4"; group as quantize.block_sizes), the layers' projections
    quantized as each is read, so that copy is the quantized one."""
    if quantize is not None:
        quantization.check_mode(quantize)
    check_destination(dst, overwrite)
    config, _, n_tensors, arrays = read_pytorch(src, dtype, on_tensor)
    if quantize is not None:  # a bad group is said before anything is read
        for path, box in jax.tree_util.tree_flatten_with_path(nn.unbox(abstract_params(config)))[0]:
            if name := quantization.quantizable(config, tuple(k.key for k in path)):
                quantization.block_sizes(box.shape, name, quantize, group)
    on_start(n_tensors)
    params: dict = {}
    for path, array in arrays:
        value = jax.device_put(array, may_alias=True)  # orbax saves jax arrays faster
        if quantize is not None and (name := quantization.quantizable(config, path)):
            value = quantization.quantize_stacked(value, quantization.block_sizes(value.shape, name, quantize, group),
                                                  quantize)
        set_path(params, path, value)
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
    params = quantization.dequantize_params(params, config.param_dtype)  # HF holds float weights
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
