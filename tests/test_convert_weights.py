"""convert_weights.py and checkpoints/store.py, with HF transformers as the oracle."""

import copy
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file

import convert_weights
from conftest import REAL_TOKENIZER, REPO, assert_one_line_error, forward, run_script
from mistral_jax.checkpoints.convert import load_pytorch, save_hf
from mistral_jax.checkpoints.store import atomic_directory, load_checkpoint, save_checkpoint
from mistral_jax.checkpoints.verify import compare_with_pytorch
from test_parity import write_native

def run(capsys, *argv):
    return run_script(capsys, convert_weights, *argv)


def rounded(model, dtype):
    """A float32 copy of model with its weights rounded to dtype. (Not .to(dtype).float():
    that also rounds HF's rotary inv_freq buffer, which is no checkpoint tensor.)"""
    model = copy.deepcopy(model)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(p.to(getattr(torch, dtype)).float())
    return model


def hf_logits(model, tokens):
    with torch.no_grad():
        return model(torch.tensor(tokens)).logits.float().numpy()


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_converted_logits_match_hf(ref_windowed, tmp_path, capsys, dtype):
    status, out, _ = run(capsys, ref_windowed.dir, tmp_path / "jax", f"--dtype={dtype}")
    assert status == 0 and f"parameters, {dtype}" in out
    config, params = load_checkpoint(str(tmp_path / "jax"), dtype="float32")
    # The oracle: the HF model with its weights rounded to the converted dtype.
    expected = hf_logits(rounded(ref_windowed.model, dtype), ref_windowed.tokens)
    assert np.abs(np.asarray(forward(config, params, ref_windowed.tokens)) - expected).max() < 1e-4


def test_native_pth_with_tokenizer(ref_full, tmp_path, capsys):
    (tmp_path / "native").mkdir()
    src = write_native(ref_full, tmp_path / "native", "pth")
    (src / "tokenizer.model.v1").write_bytes(open(REAL_TOKENIZER, "rb").read())
    status, out, _ = run(capsys, src, tmp_path / "jax", "--dtype", "float32", "--verify", "--verify-tokens", "40")
    assert status == 0, out
    assert "top-1 agreement 100.00%" in out
    assert (tmp_path / "jax" / "tokenizer.model.v1").read_bytes() == open(REAL_TOKENIZER, "rb").read()  # its name kept
    config, params = load_checkpoint(str(tmp_path / "jax"))
    assert np.abs(np.asarray(forward(config, params, ref_full.tokens)) - ref_full.logits).max() < 1e-4


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_hf_jax_hf_round_trip_is_bit_identical(ref_windowed, tmp_path, capsys, dtype):
    src = tmp_path / "src"
    copy.deepcopy(ref_windowed.model).to(getattr(torch, dtype)).save_pretrained(src)
    assert run(capsys, src, tmp_path / "jax", "--dtype", dtype)[0] == 0
    assert run(capsys, tmp_path / "jax", tmp_path / "back", "--to-hf")[0] == 0
    before, after = load_file(src / "model.safetensors"), load_file(tmp_path / "back" / "model.safetensors")
    assert before.keys() == after.keys()
    for name in before:
        assert before[name].dtype == after[name].dtype and torch.equal(before[name], after[name]), name
    # transformers loads the export and computes the same logits.
    reloaded = transformers.MistralForCausalLM.from_pretrained(tmp_path / "back", dtype=torch.float32,
                                                               attn_implementation="eager")
    np.testing.assert_array_equal(hf_logits(reloaded, ref_windowed.tokens),
                                  hf_logits(rounded(ref_windowed.model, dtype), ref_windowed.tokens))


def test_sharded_export_loads_in_transformers(ref_windowed, tmp_path):
    config, params = load_pytorch(ref_windowed.dir)
    written = save_hf(str(tmp_path), config, params, max_shard_bytes=200_000)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1 and "model.safetensors.index.json" in written
    reloaded = transformers.MistralForCausalLM.from_pretrained(tmp_path, attn_implementation="eager")
    np.testing.assert_array_equal(hf_logits(reloaded, ref_windowed.tokens), ref_windowed.logits)


def test_verify_fails_on_a_wrong_conversion(ref_windowed, tmp_path, capsys):
    config, params = load_pytorch(ref_windowed.dir)
    assert compare_with_pytorch(ref_windowed.dir, config, params, 64).ok(1e-4)
    params["layers"]["ffn_norm"]["weight"] = params["layers"]["ffn_norm"]["weight"] * 1.01
    assert not compare_with_pytorch(ref_windowed.dir, config, params, 64).ok(1e-4)
    status, _, err = run(capsys, ref_windowed.dir, tmp_path / "jax", "--verify", "--verify-tol", "0")
    assert_one_line_error(status, err, "logits differ by more than 0")


def test_checkpoint_restores_onto_shardings_of_8_devices(ref_windowed, tmp_path):
    """Each array is restored split over a mesh of 8 (fake CPU) devices, values intact."""
    config, params = load_pytorch(ref_windowed.dir)
    save_checkpoint(str(tmp_path / "ckpt"), config, params)
    code = f"""
import jax, numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from mistral_jax.checkpoints.convert import load_pytorch
from mistral_jax.checkpoints.store import load_checkpoint
mesh = Mesh(np.array(jax.devices()).reshape(8), ("fsdp",))
_, expected = load_pytorch({ref_windowed.dir!r})
sharding = jax.tree_util.tree_map(lambda x: NamedSharding(mesh, P(*[None] * (x.ndim - 1), "fsdp")), expected)
config, params = load_checkpoint({str(tmp_path / "ckpt")!r}, shardings=sharding)
wq = params["layers"]["attention"]["wq"]
assert len(wq.sharding.device_set) == 8 and wq.addressable_shards[0].data.shape == (3, 64, 4, 3)
for a, b in zip(jax.tree_util.tree_leaves(params), jax.tree_util.tree_leaves(expected)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
print("ok")
"""
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8", "JAX_PLATFORMS": "cpu",
           "PYTHONPATH": REPO}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert out.stdout.strip() == "ok", out.stderr[-2000:]


# ---- bad input ------------------------------------------------------------------------------

def test_bad_sources(ref_windowed, tmp_path, capsys):
    assert_one_line_error(*run(capsys, tmp_path / "absent", tmp_path / "out")[::2], "absent is not a directory")
    assert_one_line_error(*run(capsys, tmp_path, tmp_path / "out")[::2], "neither an HF checkpoint")

    src = tmp_path / "src"
    ref_windowed.model.save_pretrained(src)
    state = load_file(src / "model.safetensors")
    bad = {
        "missing": {k: v for k, v in state.items() if k != "lm_head.weight"},
        "extra": {**state, "model.layers.9.mlp.up_proj.weight": torch.zeros(3)},
        "shape": {**state, "model.norm.weight": torch.ones(65)},
    }
    for kind, pattern in [("missing", "lacks 1 tensors"), ("extra", "does not know"), ("shape", r"shape \(65,\)")]:
        save_file(bad[kind], src / "model.safetensors")
        assert_one_line_error(*run(capsys, src, tmp_path / "out")[::2], pattern)
    ref_windowed.model.save_pretrained(src)
    data = (src / "model.safetensors").read_bytes()
    (src / "model.safetensors").write_bytes(data[: len(data) // 2])
    assert_one_line_error(*run(capsys, src, tmp_path / "out")[::2], "truncated")
    (src / "config.json").write_text("{")
    assert_one_line_error(*run(capsys, src, tmp_path / "out")[::2], "cannot read .*config.json")
    assert_one_line_error(*run(capsys, ref_windowed.dir, tmp_path / "out", "--to-hf")[::2],
                          "no params/ directory: not a mistral_jax checkpoint")
    assert not (tmp_path / "out").exists()


def test_existing_destination(ref_windowed, tmp_path, capsys):
    dst = tmp_path / "dst"
    dst.mkdir()
    (dst / "keep.txt").write_text("mine")
    assert_one_line_error(*run(capsys, ref_windowed.dir, dst)[::2], "exists and is not empty.*--overwrite")
    assert (dst / "keep.txt").read_text() == "mine"
    status, _, _ = run(capsys, ref_windowed.dir, dst, "--overwrite")
    assert status == 0 and sorted(os.listdir(dst)) == ["checksums.json", "config.json", "params"]
    assert run(capsys, ref_windowed.dir, tmp_path / "empty_ok")[0] == 0


def test_disk_full_leaves_nothing_behind(ref_windowed, tmp_path):
    """Writes fail past 100 kB (RLIMIT_FSIZE, as a full disk would): one line, no partial output."""
    # ulimit -f counts 1024-byte blocks; an ignored SIGXFSZ makes write() fail with EFBIG instead.
    command = (f"ulimit -f 100; trap '' XFSZ; exec {sys.executable} {REPO}/convert_weights.py "
               f"{ref_windowed.dir} {tmp_path / 'out'} --dtype float32")
    out = subprocess.run(["bash", "-c", command], capture_output=True, text=True)
    assert out.returncode != 0
    assert "Traceback" not in out.stderr and out.stderr.strip().splitlines()[-1].startswith("error: "), out.stderr
    assert os.listdir(tmp_path) == []


def test_interrupted_write_leaves_nothing_behind(tmp_path):
    with pytest.raises(KeyboardInterrupt):
        with atomic_directory(str(tmp_path / "out")) as tmp:
            open(os.path.join(tmp, "half"), "w").write("x")
            raise KeyboardInterrupt
    assert os.listdir(tmp_path) == []
