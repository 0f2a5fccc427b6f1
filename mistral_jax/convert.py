"""PyTorch checkpoints (HF transformers and Mistral-native layouts) -> Flax params, streamed.

Conversion is a rename, a transpose/reshape per tensor, and one permutation: Mistral-native
wq/wk rows rotate interleaved pairs (2i, 2i+1) while the model (rope.py) rotates halves
(i, i + d/2), as HF's rows already do. Tensors are read lazily (safetensors through a
memory map, PyTorch pickles through torch's mmap) and written one stacked parameter at a
time, so the peak is one copy of the output plus one stacked tensor.
"""

from __future__ import annotations

import glob
import json
import os
import re
import struct
from collections.abc import Callable, Mapping

import jax.numpy as jnp
import ml_dtypes
import numpy as np

from mistral_jax.config import MistralConfig


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
TOP_TENSORS = {
    ("tok_embeddings",): ("tok_embeddings", "model.embed_tokens"),
    ("norm", "weight"): ("norm", "model.norm"),
    ("output",): ("output", "lm_head"),
}
_IGNORED = re.compile(r".*rotary_emb\.inv_freq$")  # a buffer older HF .bin files carry


def torch_shape(leaf: str, c: MistralConfig) -> tuple[int, ...]:
    """Shape of a tensor in PyTorch layout ([out, in] for linear weights)."""
    D, F, V, d = c.dim, c.hidden_dim, c.vocab_size, c.head_dim
    return {"wq": (c.n_heads * d, D), "wk": (c.n_kv_heads * d, D), "wv": (c.n_kv_heads * d, D),
            "wo": (D, c.n_heads * d), "w1": (F, D), "w3": (F, D), "w2": (D, F), "weight": (D,),
            "tok_embeddings": (V, D), "output": (V, D)}[leaf]


def torch_to_flax(leaf: str, w: np.ndarray, c: MistralConfig) -> np.ndarray:
    """PyTorch layout -> the model's kernel layout (see model.py)."""
    D, d = c.dim, c.head_dim
    if leaf in ("wq", "wk", "wv"):
        return w.reshape(-1, d, D).transpose(2, 0, 1)  # [N*d, D] -> [D, N, d]
    if leaf == "wo":
        return w.reshape(D, c.n_heads, d).transpose(1, 2, 0)  # [D, H*d] -> [H, d, D]
    if leaf in ("w1", "w2", "w3", "output"):
        return w.T
    return w


def interleaved_to_rotate_half(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Permutes wq/wk rows [N*d, D] so that pair (2i, 2i+1) of each head becomes (i, i + d/2).

    The same permutation as transformers' convert_mistral_weights_to_hf.py.
    """
    rows, cols = w.shape
    return w.reshape(n_heads, rows // n_heads // 2, 2, cols).transpose(0, 2, 1, 3).reshape(rows, cols)


# ---- reading tensors ------------------------------------------------------------------------

_SAFETENSORS_DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16,
                       "BF16": ml_dtypes.bfloat16, "I64": np.int64, "I32": np.int32}


def read_safetensors(path: str) -> dict[str, np.ndarray]:
    """Memory-maps every tensor of a .safetensors file; nothing is read until used.

    Our own reader (the format is an 8-byte header length, a JSON header, raw bytes) because
    safetensors' numpy backend cannot express bfloat16; ml_dtypes can.
    """
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        prefix = f.read(8)
        header_len = struct.unpack("<Q", prefix)[0] if len(prefix) == 8 else size
        if header_len > size - 8:
            raise CheckpointError(f"{path} is not a complete safetensors file (header past end of file)")
        try:
            header = json.loads(f.read(header_len))
        except ValueError:
            raise CheckpointError(f"{path} has a corrupt safetensors header") from None
    header.pop("__metadata__", None)
    data = np.memmap(path, dtype=np.uint8, mode="r")
    start = 8 + header_len
    tensors = {}
    for name, info in header.items():
        begin, end = (start + offset for offset in info["data_offsets"])
        if end > size:
            raise CheckpointError(f"{path} is truncated: tensor {name} ends at byte {end}, file has {size}")
        if info["dtype"] not in _SAFETENSORS_DTYPES:
            raise CheckpointError(f"{path}: tensor {name} has unsupported dtype {info['dtype']}")
        tensors[name] = data[begin:end].view(_SAFETENSORS_DTYPES[info["dtype"]]).reshape(info["shape"])
    return tensors


def read_torch(path: str) -> dict[str, object]:
    """Memory-maps a PyTorch pickle (.bin/.pth) state dict; tensors stay torch tensors."""
    try:
        import torch
    except ImportError:
        raise CheckpointError(f"{path} is a PyTorch pickle; reading it needs torch installed") from None
    try:
        state = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    except Exception as e:  # torch raises several types for a bad file
        raise CheckpointError(f"cannot read {path}: {e}") from None
    if not isinstance(state, Mapping):
        raise CheckpointError(f"{path} does not hold a state dict")
    return dict(state)


def to_numpy(tensor) -> np.ndarray:
    """A numpy view of a numpy array or torch tensor, bfloat16 included."""
    if isinstance(tensor, np.ndarray):
        return tensor
    import torch

    if tensor.dtype == torch.bfloat16:
        return tensor.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    return tensor.numpy()


def _read_all(files: list[str]) -> dict[str, object]:
    tensors: dict[str, object] = {}
    for file in files:
        read = read_safetensors if file.endswith(".safetensors") else read_torch
        for name, tensor in read(file).items():
            if name in tensors:
                raise CheckpointError(f"tensor {name} appears in more than one file of {os.path.dirname(file)}")
            tensors[name] = tensor
    return tensors


# ---- finding checkpoints --------------------------------------------------------------------

def find_checkpoint(path: str) -> tuple[str, list[str]]:
    """("hf" | "native", weight files) of a checkpoint directory."""
    if not os.path.isdir(path):
        raise CheckpointError(f"{path} is not a directory")
    in_dir = lambda pattern: sorted(glob.glob(os.path.join(path, pattern)))  # noqa: E731
    if os.path.isfile(os.path.join(path, "config.json")):
        index = os.path.join(path, "model.safetensors.index.json")
        if os.path.isfile(index):
            with open(index) as f:
                names = sorted(set(json.load(f)["weight_map"].values()))
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


# ---- conversion -----------------------------------------------------------------------------

def _source_names(layout: str, c: MistralConfig) -> dict[tuple, str]:
    """Flax path (layer index after 'layers') -> tensor name in the checkpoint."""
    pick = 0 if layout == "native" else 1
    prefix = "layers" if layout == "native" else "model.layers"
    names = {path: names[pick] + ".weight" for path, names in TOP_TENSORS.items()}
    for i in range(c.n_layers):
        for path, layer_names in LAYER_TENSORS.items():
            names[("layers", i) + path] = f"{prefix}.{i}.{layer_names[pick]}.weight"
    return names


def convert_tensors(layout: str, tensors: Mapping[str, object], config: MistralConfig, dtype: str,
                    on_tensor: Callable[[str], None] = lambda name: None) -> dict:
    """Checkpoint tensors (numpy or torch, PyTorch layout) -> nested dict of jax arrays."""
    names = _source_names(layout, config)
    tensors = {k: v for k, v in tensors.items() if not _IGNORED.match(k)}
    missing = sorted(set(names.values()) - set(tensors))
    unexpected = sorted(set(tensors) - set(names.values()))
    if missing:
        raise CheckpointError(f"checkpoint lacks {len(missing)} tensors the config needs, e.g. {missing[:3]}")
    if unexpected:
        raise CheckpointError(f"checkpoint has {len(unexpected)} tensors the config does not know, "
                              f"e.g. {unexpected[:3]}")
    np_dtype = jnp.dtype(dtype)

    def load(path: tuple) -> np.ndarray:
        name, leaf = names[path], path[-1]
        w = to_numpy(tensors[name])
        if tuple(w.shape) != torch_shape(leaf, config):
            raise CheckpointError(f"tensor {name} has shape {tuple(w.shape)}, the config expects "
                                  f"{torch_shape(leaf, config)}")
        if layout == "native" and leaf in ("wq", "wk"):
            w = interleaved_to_rotate_half(w, config.n_heads if leaf == "wq" else config.n_kv_heads)
        on_tensor(name)
        return torch_to_flax(leaf, w, config).astype(np_dtype)

    params: dict = {}
    for path in TOP_TENSORS:
        _set(params, path, jnp.asarray(load(path)))
    for path in LAYER_TENSORS:
        first = load(("layers", 0) + path)
        stacked = np.empty((config.n_layers,) + first.shape, np_dtype)
        stacked[0] = first
        for i in range(1, config.n_layers):
            stacked[i] = load(("layers", i) + path)
        _set(params, ("layers",) + path, jnp.asarray(stacked))
        del stacked
    return params


def _set(tree: dict, path: tuple, value) -> None:
    for key in path[:-1]:
        tree = tree.setdefault(key, {})
    tree[path[-1]] = value


def load_pytorch(path: str, dtype: str = "float32") -> tuple[MistralConfig, dict]:
    """Reads an HF or Mistral-native PyTorch checkpoint directory.

    Args:
      path: a directory with config.json + model*.safetensors / pytorch_model*.bin (HF), or
        params.json + consolidated.safetensors / consolidated.00.pth (Mistral-native).
      dtype: "float32" or "bfloat16": the dtype of the returned params and of the computation.

    Returns:
      (config, params): params is the nested dict for `Mistral(config).apply({"params": params}, ...)`.
    """
    layout, files = find_checkpoint(path)
    config = MistralConfig.from_dir(path) if layout == "hf" else MistralConfig.from_params_dict(
        _read_json(os.path.join(path, "params.json")))
    config = config.replace(dtype=dtype, param_dtype=dtype)
    return config, convert_tensors(layout, _read_all(files), config, dtype)


def _read_json(file: str) -> dict:
    try:
        with open(file) as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        raise CheckpointError(f"cannot read {file}: {e}") from None
