"""train.py as 2 processes x 4 fake CPU devices (jax.distributed over localhost, gloo) against
1 process x 8 devices: the same losses, and checkpoints that resume across the two layouts."""

import json
import os
import shutil
import socket
import subprocess
import sys

import pytest

from conftest import REPO
from mistral_jax.model.config import MistralConfig

TINY = MistralConfig(dim=32, n_layers=2, head_dim=8, hidden_dim=64, n_heads=4, n_kv_heads=2, vocab_size=512,
                     sliding_window=16, max_seq_len=64)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def train(out, processes: int, *extra, config_dir, cache):
    devices = 8 // processes
    env = {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}", "JAX_PLATFORMS": "cpu",
           "MISTRAL_JAX_CACHE": str(cache)}
    argv = [sys.executable, os.path.join(REPO, "train.py"), "--config", str(config_dir / "config.json"),
            "--out", str(out), "--steps", "6", "--batch-size", "8", "--seq-len", "32", "--log-every", "1",
            "--eval-every", "6", "--save-every", "3", "--mesh", "data=2,fsdp=4", "--samples", "2",
            "--sample-tokens", "8",
            "--peak-flops", "1e11", *extra]
    if processes == 1:
        runs = [subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)]
    else:
        port = free_port()
        runs = [subprocess.Popen(argv + ["--coordinator", f"localhost:{port}", "--num-processes", str(processes),
                                         "--process-id", str(i)], env=env, stdout=subprocess.PIPE,
                                 stderr=subprocess.PIPE, text=True) for i in range(processes)]
    outputs = []
    for run in runs:
        out, err = run.communicate(timeout=300)
        assert run.returncode == 0, err[-3000:]
        outputs.append(out)
    return outputs


def samples(stdout: str) -> list[str]:
    return [line for line in stdout.splitlines() if line.startswith("--- ")]


def losses(out):
    with open(out / "metrics.jsonl") as f:
        return {r["step"]: r["loss"] for r in map(json.loads, f)}  # a resumed run's records win


def forget_last_checkpoint(src, dst):
    shutil.copytree(src, dst)
    shutil.rmtree(dst / "checkpoints" / "6")
    shutil.rmtree(dst / "model")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("multihost")
    TINY.save_hf(root)
    common = dict(config_dir=root, cache=root / "cache")
    stdout = {"one": train(root / "one", 1, **common), "two": train(root / "two", 2, **common)}
    return root, common, stdout


def test_two_processes_match_one(runs):
    root, _, stdout = runs
    one, two = losses(root / "one"), losses(root / "two")
    assert sorted(one) == sorted(two) == list(range(1, 7))
    for step in one:
        assert two[step] == pytest.approx(one[step], rel=1e-5), step
    for name in ("model/params", "model/config.json", "model/tokenizer.model", "checkpoints/6"):
        assert (root / "two" / name).exists(), name
    # The samples, generated over the mesh the params were trained on, are printed by process 0 only.
    (single,), (first, second) = stdout["one"], stdout["two"]
    assert len(samples(single)) == 2 and samples(first) == samples(single) and samples(second) == []


@pytest.mark.parametrize("written_by,resumed_by", [(2, 1), (1, 2)])
def test_checkpoints_resume_across_process_counts(runs, written_by, resumed_by):
    root, common, _ = runs
    source = root / ("one" if written_by == 1 else "two")
    resumed = root / f"{written_by}_then_{resumed_by}"
    forget_last_checkpoint(source, resumed)
    train(resumed, resumed_by, "--resume", **common)
    expected, got = losses(root / "one"), losses(resumed)
    for step in (4, 5, 6):
        assert got[step] == pytest.approx(expected[step], rel=1e-5), step
