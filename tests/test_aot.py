"""The 7B, Ministral and Mixtral plans (and 7B serving), checked by compiling them: on 8 fake CPU devices
(the guards on the sharding rules and the layouts) and for a TPU v5e-16 slice through libtpu's topology
description (splash attention really in the program); and int8 / int4 weights read by the TPU's matmuls
as integers (the optimized HLO of one v5e chip's programs). Each in a subprocess: they need 8 CPU devices
or libtpu's backend."""

import json
import os
import re
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


QUANTIZED_PROGRAMS = """
import json
import jax, jax.numpy as jnp
from mistral_jax.inference import sampling
from mistral_jax.model.config import MistralConfig
from mistral_jax.plans import aot
from mistral_jax.runtime.sharding import make_mesh
mesh = make_mesh("", aot.target_devices("v5e-1"))
config = MistralConfig(dim=512, n_layers=2, head_dim=64, hidden_dim=1536, n_heads=8, n_kv_heads=2, vocab_size=1024,
                       dtype="bfloat16", param_dtype="bfloat16", attention="splash")
replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
arg = lambda shape, dtype: jax.ShapeDtypeStruct(shape, dtype, sharding=replicated)
options = dict(sampler=sampling.Sampler(), eos_id=2)
hlo = {}
for mode in ("int8", "int4"):
    params = aot.abstract_params(config, mesh, quantized=mode)
    with aot.traced_for(mesh):
        prefill = sampling.start.lower(params, config, arg((8, 256), jnp.int32), arg((8,), jnp.int32),
                                       arg((), jax.random.key(0).dtype), chunk=128, max_tokens=256, mesh=mesh,
                                       **options).compile()
        state = jax.tree_util.tree_map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                                       prefill.out_info, prefill.output_shardings)
        decode = sampling.decode.lower(params, config, state, arg((), jnp.int32), **options).compile()
    hlo[mode] = {"prefill": prefill.as_text(), "decode": decode.as_text()}
print(json.dumps(hlo))
"""
INTEGER = ("s8[", "s4[")


def hlo_computations(hlo: str) -> dict[str, list[tuple[str, str, str, str]]]:
    """Optimized HLO text -> {computation: [(name, type, opcode, operands and attributes)]}."""
    computations, current = {}, None
    for line in hlo.splitlines():
        header = re.match(r"(?:ENTRY )?%([\w.\-]+) \(.*\{$", line)
        if header:
            current = computations.setdefault(header.group(1), [])
        elif line == "}":
            current = None
        elif current is not None and (instruction := re.match(r"\s*(?:ROOT )?%([\w.\-]+) = (.+?) ([\w\-]+)\((.*)$",
                                                               line)):
            current.append(instruction.groups())
    return computations


def integer_weights_in_matmuls(hlo: str) -> tuple[int, list[str]]:
    """(matmuls that read int8/int4 values, the instructions that turn them into floats elsewhere).

    Each instruction outside a fused computation is a unit of the compiled program: a fusion
    with everything it calls, or the instruction alone; what a unit writes goes to memory, what
    stays inside it does not. A unit that converts int8/int4 values to floats without a
    convolution or dot in it writes a float copy of a weight (or of a piece of it)."""
    computations = hlo_computations(hlo)
    types = {name: type_ for body in computations.values() for name, type_, _, _ in body}
    calls = {name: re.findall(r"calls=%([\w.\-]+)", rest) for body in computations.values()
             for name, _, opcode, rest in body if opcode == "fusion"}
    fused = {called for names in calls.values() for called in names}

    def unit(name: str, body: list) -> list:
        todo, seen = list(calls.get(name, ())), set()
        while todo:
            if (computation := todo.pop()) not in seen:
                seen.add(computation)
                todo += [c for n, _, op, _ in computations[computation] if op == "fusion" for c in calls[n]]
        return [i for c in seen for i in computations[c]] or [i for i in body if i[0] == name]

    matmuls, copies = 0, []
    for computation, body in computations.items():
        if computation in fused:
            continue
        for name, type_, opcode, _ in body:
            inside = unit(name, body)
            products = sum(op in ("convolution", "dot") for _, _, op, _ in inside)
            dequantized = [i for i in inside if i[2] == "convert" and not i[1].startswith(INTEGER)
                           and types.get(i[3].split(")")[0].strip("% "), "").startswith(INTEGER)]
            if products and any(t.startswith(INTEGER) for _, t, _, _ in inside):
                matmuls += products
            elif dequantized:
                copies.append(f"{computation}: %{name} = {type_.split('{')[0]} {opcode}")
    return matmuls, copies


@pytest.mark.skipif(not _libtpu_installed(), reason='needs libtpu as a compile target: pip install "jax[tpu]"')
def test_quantized_weights_enter_the_tpu_matmuls_as_integers():
    """Prefill and decode (generate's two programs, as the plans compile them) of a 2-layer model
    (dim 512, hidden 1536, GQA 8/2) with int8 (per channel) and int4 (groups of 128) weights,
    compiled for one TPU v5e chip: in the optimized HLO every product with a quantized weight
    reads its integers inside the matmul's own fusion, and nothing else turns them into floats,
    so no float copy of a weight is written, per step or ever. Each layer's 7 projections are
    such matmuls (the layers are one scanned body). With q · scale as the dot's operand, XLA:TPU
    wrote each int4 weight out in float32 (dynamic-slice_convert_fusion f32[1,512,1536] per layer
    and step) before the matmul read it."""
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": REPO, "ALLOW_MULTIPLE_LIBTPU_LOAD": "1"}
    out = subprocess.run([sys.executable, "-c", QUANTIZED_PROGRAMS], capture_output=True, text=True, env=env,
                         timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    for mode, programs in json.loads(out.stdout.strip().splitlines()[-1]).items():
        for program, hlo in programs.items():
            matmuls, copies = integer_weights_in_matmuls(hlo)
            assert not copies, (mode, program, copies)
            assert matmuls >= 7, (mode, program, matmuls)
