"""The 7B, Ministral and Mixtral plans (and 7B serving), checked by compiling them: on 8 fake CPU devices
(the guards on the sharding rules and the layouts) and for a TPU v5e-16 slice through libtpu's topology description (splash attention
really in the program). Each in a subprocess: they need 8 CPU devices or libtpu's backend."""

import json
import os
import subprocess
import sys

import pytest

from conftest import REPO

GiB = 2**30
CHECK = """
import dataclasses, json, sys
from mistral_jax.plans import aot
plan = aot.Plan(*json.loads(sys.argv[1]))
(report,) = aot.run(plan)
print(json.dumps({**dataclasses.asdict(report), "total": report.total,
                  "num_params": aot.config_for(plan).num_params}))
"""


def compile_plan(plan: list) -> dict:
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8", "JAX_PLATFORMS": "cpu",
           "PYTHONPATH": REPO, "ALLOW_MULTIPLE_LIBTPU_LOAD": "1"}  # another compiling process may hold libtpu
    out = subprocess.run([sys.executable, "-c", CHECK, json.dumps(plan)], capture_output=True, text=True, env=env,
                         timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_7b_train_step_fits_16_gib_per_device_on_8_cpu_devices():
    """Mistral 7B, bf16 compute, f32 master params + AdamW, remat, batch 8 x 1024 on
    fsdp=4 x tensor=2: params and optimizer state split 8 ways, and the whole step under
    16 GiB per device. Replicating anything big, or letting activations follow the fsdp
    split, breaks this (each was seen: +3.6 and +11 GB)."""
    r = compile_plan(["cpu-8", "fsdp=4,tensor=2", "train", 8, 1024])
    assert r["params"] == pytest.approx(r["num_params"] * 4 / 8, rel=0.01)
    assert r["optimizer"] == pytest.approx(2 * r["params"], rel=0.01)  # Adam's two moments
    assert r["total"] < 16 * GiB, r["total"] / GiB


def test_ministral_8b_train_step_keeps_one_copy_of_the_weights():
    """Ministral 8B's two kinds of layer cost no memory: the step's temporaries are those of
    a dense model of its shape (7.97 GiB measured). Scanning over groups of 4 layers instead
    saved a second copy of the weights for the backward pass (9.24 GiB)."""
    r = compile_plan(["cpu-8", "fsdp=4,tensor=2", "train", 8, 1024, "ministral-8b"])
    assert r["params"] == pytest.approx(r["num_params"] * 4 / 8, rel=0.01)
    assert r["temporaries"] < 8.5 * GiB, r["temporaries"] / GiB


def test_mixtral_train_step_keeps_one_gradient_of_the_experts():
    """Mixtral 8x7B on fsdp=4 x expert=2: the experts split 8 ways, the rest 4, and the
    step's temporaries (the f32 gradients, 22.5 GiB, and the activations: 29.0 GiB
    measured) hold the experts' gradient once. Differentiated by JAX, the scan over tiles
    kept every tile's slice of the experts (BENCHMARKS.md, "Experts"): tens of GiB more."""
    r = compile_plan(["cpu-8", "fsdp=4,expert=2", "train", 8, 1024, "mixtral-8x7b-v0.1"])
    experts = 32 * 8 * 3 * 4096 * 14336
    assert r["params"] == pytest.approx((experts / 8 + (r["num_params"] - experts) / 4) * 4, rel=0.01)
    assert r["temporaries"] < 1.5 * r["params"], r["temporaries"] / GiB


def _libtpu_installed() -> bool:
    import importlib.util

    return importlib.util.find_spec("libtpu") is not None


@pytest.mark.skipif(not _libtpu_installed(), reason='needs libtpu as a compile target: pip install "jax[tpu]"')
def test_7b_train_step_compiles_for_tpu_v5e_16_with_splash_attention():
    """The same step for a v5e-16 slice (16 chips of 16 GiB), fsdp=16, batch 16 x 4096:
    compiled by the TPU compiler from this CPU machine, the splash kernel (a Mosaic custom
    call, not its interpret-mode emulation) in the program, and it fits."""
    r = compile_plan(["v5e-16", "fsdp=16", "train", 16, 4096])
    assert r["kernels"] == ["splash_mqa_dkv_no_residuals", "splash_mqa_dq_no_residuals", "splash_mqa_fwd_residuals"]
    assert r["params"] == pytest.approx(r["num_params"] * 4 / 16, rel=0.01)
    assert r["total"] < 16 * GiB, r["total"] / GiB


SERVE = """
import dataclasses, json, sys
from mistral_jax.plans import aot
plan = aot.Plan(*json.loads(sys.argv[1]))
print(json.dumps([{**dataclasses.asdict(r), "total": r.total} for r in aot.run(plan)]))
"""


def test_7b_serving_splits_its_slots_over_tensor_on_v5e_8():
    """serve.py's admit and decode step for 128 slots of 4096 tokens on a v5e-8 (tensor=8),
    compiled by the TPU compiler: each chip holds an eighth of the weights and one kv head of
    every slot (4096 x 32 layers x 128 x 2 x 2 bytes = 64 MiB a slot), donated, so the step
    adds next to nothing to them."""
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": REPO, "ALLOW_MULTIPLE_LIBTPU_LOAD": "1"}
    out = subprocess.run([sys.executable, "-c", SERVE, json.dumps(["v5e-8", "tensor=8", "serve", 128, 4096])],
                         capture_output=True, text=True, env=env, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    admit, step = json.loads(out.stdout.strip().splitlines()[-1])
    assert (admit["program"], step["program"]) == ("serve: admit", "serve: step")
    slots = 128 * 4096 * 32 * 128 * 2 * 2
    for r in (admit, step):
        assert r["arguments"] - r["params"] == pytest.approx(slots, rel=0.01), r  # the slots' cache and little else
        assert r["aliased"] == pytest.approx(slots, rel=0.01), r  # written in place
        assert r["total"] < 11 * GiB, r["total"] / GiB
