"""load_pytorch on what goes wrong with real checkpoint directories, and without torch."""

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from mistral_jax.checkpoints.convert import CheckpointError, load_pytorch
from mistral_jax.checkpoints.tensor_files import SafetensorsFile


def copy_reference(ref, tmp_path):
    out = tmp_path / "ckpt"
    shutil.copytree(ref.dir, out)
    return out


def test_safetensors_reader_matches_safetensors(ref_windowed, tmp_path):
    """Our memory-mapped reader against the safetensors library, bfloat16 included."""
    state = {k: v.to(torch.bfloat16) for k, v in load_file(os.path.join(ref_windowed.dir, "model.safetensors")).items()}
    save_file(state, tmp_path / "bf16.safetensors")
    ours = SafetensorsFile(str(tmp_path / "bf16.safetensors"))
    assert set(ours) == set(state)
    for name, tensor in state.items():
        np.testing.assert_array_equal(np.asarray(ours[name], np.float32), tensor.float().numpy())


def test_safetensors_load_without_torch(ref_windowed):
    code = ("import sys; sys.modules['torch'] = None\n"
            "from mistral_jax.checkpoints.convert import load_pytorch\n"
            f"config, params = load_pytorch({ref_windowed.dir!r})\n"
            "assert 'torch' not in sys.modules or sys.modules['torch'] is None\n"
            "print(params['output'].shape)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert out.stdout.strip() == "(64, 320)"


def test_bfloat16_load_rounds_float32(ref_windowed):
    _, f32 = load_pytorch(ref_windowed.dir, "float32")
    _, bf16 = load_pytorch(ref_windowed.dir, "bfloat16")
    wq32, wq16 = np.asarray(f32["layers"]["attention"]["wq"]), np.asarray(bf16["layers"]["attention"]["wq"])
    assert wq16.dtype.name == "bfloat16"
    np.testing.assert_array_equal(wq16, wq32.astype(wq16.dtype))


def test_truncated_safetensors(ref_windowed, tmp_path):
    ckpt = copy_reference(ref_windowed, tmp_path)
    file = ckpt / "model.safetensors"
    file.write_bytes(file.read_bytes()[:-100])
    with pytest.raises(CheckpointError, match="truncated"):
        load_pytorch(str(ckpt))
    file.write_bytes(b"\x05")
    with pytest.raises(CheckpointError, match="not a complete safetensors file"):
        load_pytorch(str(ckpt))


def test_missing_extra_and_misshapen_tensors(ref_windowed, tmp_path):
    ckpt = copy_reference(ref_windowed, tmp_path)
    state = load_file(ckpt / "model.safetensors")
    save_file({k: v for k, v in state.items() if k != "model.layers.1.mlp.up_proj.weight"}, ckpt / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"lacks 1 tensors .*layers\.1\.mlp\.up_proj"):
        load_pytorch(str(ckpt))
    save_file({**state, "model.layers.3.mlp.up_proj.weight": state["model.norm.weight"].clone()}, ckpt / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"does not know.*layers\.3"):
        load_pytorch(str(ckpt))
    save_file({**state, "model.norm.weight": torch.ones(65)}, ckpt / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"model.norm.weight has shape \(65,\), the config expects \(64,\)"):
        load_pytorch(str(ckpt))


def test_directories_of_neither_layout(ref_windowed, tmp_path):
    with pytest.raises(CheckpointError, match="is not a directory"):
        load_pytorch(str(tmp_path / "absent"))
    with pytest.raises(CheckpointError, match="neither an HF checkpoint"):
        load_pytorch(str(tmp_path))
    ckpt = copy_reference(ref_windowed, tmp_path)
    os.remove(ckpt / "model.safetensors")
    with pytest.raises(CheckpointError, match="neither an HF checkpoint"):
        load_pytorch(str(ckpt))


def test_missing_shard(ref_windowed, tmp_path):
    ref_windowed.model.save_pretrained(tmp_path, max_shard_size="100KB")
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    os.remove(tmp_path / sorted(set(index["weight_map"].values()))[-1])
    with pytest.raises(CheckpointError, match="lists shards that are missing"):
        load_pytorch(str(tmp_path))
