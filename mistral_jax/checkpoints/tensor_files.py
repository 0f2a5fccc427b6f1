"""Tensor files, read and written one tensor at a time: safetensors (no torch needed) and
PyTorch pickles (.bin/.pth, through torch's mmap).

Our own safetensors reader/writer because the safetensors package's numpy backend cannot
express bfloat16 or float8; ml_dtypes can. The format: an 8-byte little-endian header length, a JSON
header {name: {dtype, shape, data_offsets}}, then the raw bytes.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import json
import mmap
import os
import struct
from collections.abc import Callable, Iterator, Mapping

import ml_dtypes
import numpy as np


class TensorFileError(ValueError):
    """A tensor file that cannot be read."""


_DTYPES = {"F64": np.dtype(np.float64), "F32": np.dtype(np.float32), "F16": np.dtype(np.float16),
           "BF16": np.dtype(ml_dtypes.bfloat16), "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
           "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2), "I64": np.dtype(np.int64), "I32": np.dtype(np.int32)}
_DTYPE_NAMES = {v: k for k, v in _DTYPES.items()}


class SafetensorsFile(Mapping):
    """name -> np.memmap of one tensor, mapped when asked for and unmapped when dropped."""

    def __init__(self, path: str):
        self.path = path
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            prefix = f.read(8)
            header_len = struct.unpack("<Q", prefix)[0] if len(prefix) == 8 else size
            if header_len > size - 8:
                raise TensorFileError(f"{path} is not a complete safetensors file (header past end of file)")
            try:
                header = json.loads(f.read(header_len))
            except ValueError:
                raise TensorFileError(f"{path} has a corrupt safetensors header") from None
        if not isinstance(header, dict):
            raise TensorFileError(f"{path} has a corrupt safetensors header")
        header.pop("__metadata__", None)
        self._entries = {}
        for name, info in header.items():
            dtype, shape, begin = self._entry(name, info, 8 + header_len, size)
            self._entries[name] = (dtype, shape, begin)

    def _entry(self, name: str, info, data_start: int, size: int) -> tuple[np.dtype, tuple[int, ...], int]:
        """(dtype, shape, first byte) of a header entry whose offsets span exactly its shape's
        bytes within the file (a header that disagreed converted garbage with rc 0)."""
        if not isinstance(info, dict) or not {"dtype", "shape", "data_offsets"} <= set(info):
            raise TensorFileError(f"{self.path}: tensor {name} has a malformed header entry")
        if info["dtype"] not in _DTYPES:
            raise TensorFileError(f"{self.path}: tensor {name} has unsupported dtype {info['dtype']}")
        shape, offsets = info["shape"], info["data_offsets"]
        if not (isinstance(shape, list) and all(isinstance(n, int) and n >= 0 for n in shape)
                and isinstance(offsets, list) and len(offsets) == 2 and all(isinstance(o, int) for o in offsets)):
            raise TensorFileError(f"{self.path}: tensor {name} has a malformed shape or data_offsets")
        dtype = _DTYPES[info["dtype"]]
        begin, end = data_start + offsets[0], data_start + offsets[1]
        if offsets[1] - offsets[0] != int(np.prod(shape)) * dtype.itemsize or offsets[0] < 0:
            raise TensorFileError(f"{self.path}: tensor {name}'s data_offsets {offsets} do not span its shape "
                                  f"{shape} of {info['dtype']}")
        if end > size:
            raise TensorFileError(f"{self.path} is truncated: tensor {name} ends at byte {end}, file has {size}")
        return dtype, tuple(shape), begin

    def __getitem__(self, name: str) -> np.ndarray:
        dtype, shape, offset = self._entries[name]
        if 0 in shape:
            return np.empty(shape, dtype)
        return np.memmap(self.path, dtype=dtype, mode="r", offset=offset, shape=shape)

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def release(self, name: str) -> None:
        """Nothing to do: a tensor's mapping goes away with its array."""


def write_safetensors(path: str, entries: list[tuple[str, tuple[int, ...], np.dtype, Callable[[], np.ndarray]]],
                      metadata: dict[str, str] | None = None) -> None:
    """Writes tensors (name, shape, dtype, make_array) in order, making one array at a time."""
    header: dict = {"__metadata__": metadata or {"format": "pt"}}
    offset = 0
    for name, shape, dtype, _ in entries:
        nbytes = int(np.prod(shape)) * np.dtype(dtype).itemsize
        header[name] = {"dtype": _DTYPE_NAMES[np.dtype(dtype)], "shape": list(shape),
                        "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)  # keeps the data 8-byte aligned
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(encoded)) + encoded)
        for name, shape, dtype, make_array in entries:
            array = np.ascontiguousarray(make_array(), dtype=dtype)
            if array.shape != tuple(shape):
                raise ValueError(f"tensor {name} has shape {array.shape}, header says {tuple(shape)}")
            f.write(array.reshape(-1).view(np.uint8).data)  # bytes view: bfloat16 has no buffer format


class TorchFile(Mapping):
    """name -> torch tensor of a PyTorch pickle (.bin/.pth), memory-mapped by torch.

    The whole file is mapped at once, so pages read stay resident until released: call
    release(name) once a tensor has been copied out.
    """

    def __init__(self, path: str):
        try:
            import torch
        except ImportError:
            raise TensorFileError(f"{path} is a PyTorch pickle; reading it needs torch installed") from None
        try:
            state = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
        except Exception as e:  # torch raises several types for a bad file
            raise TensorFileError(f"cannot read {path}: {e}") from None
        if not isinstance(state, Mapping):
            raise TensorFileError(f"{path} does not hold a state dict")
        self.path, self._state = path, dict(state)

    def __getitem__(self, name: str):
        return self._state[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._state)

    def __len__(self) -> int:
        return len(self._state)

    def release(self, name: str) -> None:
        tensor = self._state[name]
        _drop_file_pages(tensor.data_ptr(), tensor.numel() * tensor.element_size())


_libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
_MADV_DONTNEED = 4  # Linux


def _drop_file_pages(address: int, nbytes: int) -> None:
    """Drops the resident pages of a read-only, file-backed private mapping (torch's mmap):
    they are clean, so the kernel re-reads them from the file if they are touched again."""
    page = mmap.PAGESIZE
    start, end = -(-address // page) * page, (address + nbytes) // page * page
    if end > start:
        _libc.madvise(ctypes.c_void_p(start), ctypes.c_size_t(end - start), _MADV_DONTNEED)


def read_tensor_file(path: str) -> Mapping[str, object]:
    return SafetensorsFile(path) if path.endswith(".safetensors") else TorchFile(path)


def aligned_empty(shape: tuple[int, ...], dtype) -> np.ndarray:
    """np.empty aligned to 64 bytes, which lets jax.device_put on CPU use it without a copy."""
    dtype = np.dtype(dtype)
    nbytes = int(np.prod(shape)) * dtype.itemsize
    raw = np.empty(nbytes + 64, np.uint8)
    offset = -raw.ctypes.data % 64
    return raw[offset:offset + nbytes].view(dtype).reshape(shape)


def to_numpy(tensor) -> np.ndarray:
    """A numpy view of a numpy array or torch tensor, bfloat16 and float8 included."""
    if isinstance(tensor, np.ndarray):
        return tensor
    import torch

    # numpy has no bfloat16 or float8: the same bits, viewed as ml_dtypes' types
    special = {torch.bfloat16: (torch.int16, ml_dtypes.bfloat16),
               torch.float8_e4m3fn: (torch.uint8, ml_dtypes.float8_e4m3fn),
               torch.float8_e5m2: (torch.uint8, ml_dtypes.float8_e5m2)}
    if tensor.dtype in special:
        bits, dtype = special[tensor.dtype]
        return tensor.view(bits).numpy().view(dtype)
    return tensor.numpy()
