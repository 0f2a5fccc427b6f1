"""The memory plan of a model on a mesh, checked by compiling it ahead of time.

Lowers and compiles the train step and generate (prefill + decode) from abstract inputs
(nothing of the model's size is allocated) for a mesh of TPU devices described by libtpu's
topologies (`pip install "jax[tpu]"`; no TPU needed) or of this machine's CPU devices
(`XLA_FLAGS=--xla_force_host_platform_device_count=8`, the stand-in for an 8-GPU node, for
which no compiler is available here; one of them for a single 24 GB GPU), and reads per-device
memory from XLA's `memory_analysis()`. Weights may be int8 or int4 (model/quantize.py): all of
them for generate and serve, the frozen base of a LoRA step (QLoRA).

  python -m mistral_jax.plans.aot --target v5e-16 --mesh fsdp=16 --program train --batch 16 --seq 4096
  python -m mistral_jax.plans.aot --target v4-8 --mesh fsdp=4 --program train --lora-rank 16 --largest-batch
  python -m mistral_jax.plans.aot --target v5e-1 --program generate --batch 8 --quantize int4
  python -m mistral_jax.plans.aot --target cpu-24g --program train --batch 1 --lora-rank 16 --base-dtype int8

(`python -m bench.plans --write` compiles every row of docs/SCALING.md and rewrites it.)
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import math
import os
import re
import time

import jax
import jax.numpy as jnp

from mistral_jax.inference import engine, sampling
from mistral_jax.model import quantize
from mistral_jax.model.config import MistralConfig
from mistral_jax.model.presets import PIXTRAL
from mistral_jax.model.transformer import init_params, param_shardings
from mistral_jax.model.vision import ImageFeatures, image_tokens
from mistral_jax.runtime.cli import run as run_cli
from mistral_jax.runtime.sharding import batch_sharding, make_mesh
from mistral_jax.training import lora, trainer

GiB = 2**30


@dataclasses.dataclass(frozen=True)
class Target:
    platform: str
    topology: str | None  # libtpu's topology name
    chip_config: str | None  # "megacore": one device per chip of two TensorCores
    hbm_gib: float  # memory per device
    devices: int
    host_bounds: tuple[int, int, int] = (2, 2, 1)  # libtpu's chips per host (a slice smaller than a host: itself)


TARGETS = {
    "v5e-16": Target("tpu", "v5e:4x4", "default", 16, 16),
    "v5e-8": Target("tpu", "v5e:2x4", "default", 16, 8),
    "v5e-1": Target("tpu", "v5e:1x1", "default", 16, 1, (1, 1, 1)),
    "v4-8": Target("tpu", "v4:2x2x1", "megacore", 32, 4),
    "v5p-8": Target("tpu", "v5:2x2x1", "megacore", 95, 4),
    "v5p-32": Target("tpu", "v5:2x2x4", "megacore", 95, 16),
    "cpu-8": Target("cpu", None, None, 80, 8),  # stand-in for 8 x 80 GB GPUs (A100/H100)
    "cpu-24g": Target("cpu", None, None, 24, 1),  # stand-in for one 24 GB GPU (RTX 4090, L4, A10)
}


def target_devices(name: str) -> list:
    target = TARGETS[name]
    if target.platform == "cpu":
        devices = jax.devices("cpu")
        if len(devices) < target.devices:
            raise RuntimeError(f"target {name} needs {target.devices} CPU devices, this process has {len(devices)}; "
                               f"run with XLA_FLAGS=--xla_force_host_platform_device_count={target.devices}")
        return devices[:target.devices]
    from jax.experimental import topologies
    try:
        topology = topologies.get_topology_desc(platform="tpu", topology_name=target.topology,
                                                chip_config_name=target.chip_config,
                                                chips_per_host_bounds=target.host_bounds, num_slices=1,
                                                wrap=(False, False, False))
    except Exception as e:  # libtpu missing or unable to describe the topology
        raise RuntimeError(f"cannot describe TPU topology {target.topology} ({type(e).__name__}: {e}); "
                           'TPU targets need libtpu: pip install "jax[tpu]==0.10.2"') from None
    return topology.devices


@dataclasses.dataclass
class Report:
    """Bytes per device of one compiled program."""

    program: str
    arguments: int
    outputs: int
    aliased: int  # outputs written into donated arguments
    temporaries: int
    compile_s: float
    params: int = 0  # of the arguments
    optimizer: int = 0  # of the arguments
    error: str | None = None  # the compiler refused: not enough memory
    kernels: tuple[str, ...] = ()  # Pallas (Mosaic) kernels in the compiled program

    @property
    def total(self) -> int:
        return self.arguments + self.outputs - self.aliased + self.temporaries


def memory_report(program: str, compiled, compile_s: float = 0.0, **parts) -> Report:
    """What XLA plans per device for a compiled program (and the Pallas kernels in it)."""
    m = compiled.memory_analysis()
    kernels = tuple(sorted(set(re.findall(r"\bsplash_mqa_\w+", compiled.as_text()))))
    return Report(program, m.argument_size_in_bytes, m.output_size_in_bytes, m.alias_size_in_bytes,
                  m.temp_size_in_bytes, compile_s, kernels=kernels, **parts)


def _bytes_per_device(tree) -> int:
    """Bytes of one device's shards of abstract arrays with shardings (the largest shard; int4
    packed two to a byte)."""
    return sum(math.prod(x.sharding.shard_shape(x.shape)) * jnp.dtype(x.dtype).itemsize
               // (2 if x.dtype == jnp.int4 else 1) for x in jax.tree_util.tree_leaves(tree))


def compile_train_step(config: MistralConfig, hp: trainer.Hyperparameters, mesh, base_dtype: str = "bfloat16",
                       group: int | None = None) -> Report:
    """The train step as train.py builds it: f32 master params and AdamW state (with LoRA,
    hp.lora_spec, those of the adapters, and the frozen base in base_dtype: a float dtype, or
    int8 / int4 for the layers' projections quantized in blocks of `group` inputs and the rest
    bf16, QLoRA), `config`'s compute dtype and remat, a global batch [batch_size, seq_len + 1]."""
    tx = trainer.make_optimizer(hp)
    spec = hp.lora_spec
    state = trainer.abstract_state(config, tx, mesh, spec)
    quantized = base_dtype in quantize.MODES
    base = () if spec is None else (abstract_params(config, mesh, "bfloat16" if quantized else base_dtype,
                                                    base_dtype if quantized else None, group),)
    step = trainer.make_train_step(config, tx, hp, mesh, trainer.state_shardings(state),
                                   *(trainer.state_shardings(b) for b in base))
    batch = jax.ShapeDtypeStruct((hp.batch_size, hp.seq_len + 1), jnp.int32, sharding=batch_sharding(mesh))
    start = time.perf_counter()
    compiled = step.lower(state, batch, *base).compile()
    return memory_report(train_program(hp.lora_rank), compiled, time.perf_counter() - start,
                         params=_bytes_per_device((state.params, base)), optimizer=_bytes_per_device(state.opt_state))


def train_program(lora_rank: int | None) -> str:
    """The program column of a train step's row."""
    return "train" if lora_rank is None else f"train LoRA r{lora_rank}"


def abstract_params(config: MistralConfig, mesh, dtype: str | None = None, quantized: str | None = None,
                    group: int | None = None):
    """The params as abstract arrays in dtype (default config.param_dtype), sharded as
    param_shardings says; with quantized ("int8", "int4") the layers' projections as
    quantize.quantize_params gives them (group: its inputs per scale), held as the mesh's
    platform takes them (quantize.held_for: int4 as int8 on CPU)."""
    params = jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, jnp.dtype(dtype or config.param_dtype)),
                                    jax.eval_shape(lambda key: init_params(config, key), jax.random.key(0)))
    if quantized is not None:
        params = jax.eval_shape(lambda p: quantize.quantize_params(config, p, quantized, group), params)
        params = jax.eval_shape(lambda p: quantize.held_for(p, mesh.devices.flat[0].platform), params)
    return jax.tree_util.tree_map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                                  params, param_shardings(config, mesh, params))


def traced_for(mesh):
    """The context generate's and serve's programs are traced in. For one device, its mesh: what
    the platform decides (platforms.target_platform: the quantized product's form, splash
    compiled rather than interpreted) is then decided for that device, not for this host's CPU,
    and sharding a program over one device changes nothing else. For several, none, as sample.py
    and serve.py trace them; from this CPU host their TPU programs then take the CPU's choices."""
    return jax.sharding.use_abstract_mesh(mesh.abstract_mesh) if mesh.devices.size == 1 else contextlib.nullcontext()


def _traced_for_mesh(compile_programs):
    @functools.wraps(compile_programs)
    def compile_on(config: MistralConfig, mesh, *args, **kwargs) -> list[Report]:
        with traced_for(mesh):
            return compile_programs(config, mesh, *args, **kwargs)
    return compile_on


@_traced_for_mesh
def compile_generate(config: MistralConfig, mesh, batch: int, prompt_len: int, new_tokens: int,
                     image: int | None = None, quantized: str | None = None, group: int | None = None
                     ) -> list[Report]:
    """Prefill of prompts [batch, prompt_len] then the decode loop up to new_tokens, params in
    config.param_dtype (or their projections quantized: abstract_params) and the layers stacked
    (as accelerators decode), the KV cache sharded as KVCache.shardings says. With image
    (config.vision), each prompt shows an image of image x image pixels (as mistral-common
    sizes it): the encoder's program on the batch's images, then the prefill takes their
    embeddings."""
    params = abstract_params(config, mesh, quantized=quantized, group=group)
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    prompts = jax.ShapeDtypeStruct((batch, prompt_len), jnp.int32, sharding=replicated)
    lengths = jax.ShapeDtypeStruct((batch,), jnp.int32, sharding=replicated)
    key = jax.ShapeDtypeStruct((), jax.random.key(0).dtype, sharding=replicated)
    options = dict(sampler=sampling.Sampler(), eos_id=2)
    chunk = sampling.chunk_size(config, prompt_len)
    reports, images = [], None
    if image is not None:
        side = -(-image // config.vision.pixels_per_token) * config.vision.pixels_per_token
        pixels = [jax.ShapeDtypeStruct((config.vision.num_channels, side, side), jnp.float32, sharding=replicated)
                  ] * batch
        start = time.perf_counter()
        encode = sampling.image_embeddings.lower(params["vision"], config, pixels).compile()
        reports.append(memory_report(f"encode {batch} x {side}²", encode, time.perf_counter() - start,
                                     params=_bytes_per_device(params["vision"])))
        embeddings = jax.ShapeDtypeStruct((batch * image_tokens(config, pixels[0].shape), config.dim),
                                          jnp.dtype(config.dtype), sharding=replicated)
        images = ImageFeatures(embeddings, prompts)

    start = time.perf_counter()
    prefill_options = dict(chunk=chunk, max_tokens=new_tokens, mesh=mesh, **options)
    try:
        prefill = sampling.start.lower(params, config, prompts, lengths, key, images=images, **prefill_options
                                       ).compile()
    except jax.errors.JaxRuntimeError as e:  # refused: the decode loop is compiled all the same, from the
        # state's shapes (the cache sharded as decode keeps it, the small rest replicated)
        reports.append(refused("prefill", e))
        state = jax.eval_shape(lambda p, *args, images: sampling.start(p, config, *args, images=images,
                                                                       **prefill_options),
                               params, prompts, lengths, key, images=images)
        state = jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=replicated),
                                       state.replace(cache=None)).replace(cache=jax.tree_util.tree_map(
                                           lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                                           state.cache, state.cache.shardings(mesh)))
    else:
        reports.append(memory_report("prefill", prefill, time.perf_counter() - start,
                                     params=_bytes_per_device(params)))
        state = jax.tree_util.tree_map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                                       prefill.out_info, prefill.output_shardings)
    start = time.perf_counter()
    until_step = jax.ShapeDtypeStruct((), jnp.int32, sharding=replicated)
    try:
        decode = sampling.decode.lower(params, config, state, until_step, **options).compile()
    except jax.errors.JaxRuntimeError as e:
        return reports + [refused("decode", e)]
    reports.append(memory_report("decode", decode, time.perf_counter() - start, params=_bytes_per_device(params)))
    return reports


@_traced_for_mesh
def compile_serve(config: MistralConfig, mesh, slots: int, max_len: int, steps_per_call: int = 4,
                  quantized: str | None = None, group: int | None = None) -> list[Report]:
    """serve.py's two programs (inference/engine.py) for `slots` slots of max_len tokens: admit
    of prompts of max_len / 2 tokens, as many as its default prefill budget takes at once (at
    least one), and the decode step of every slot; the slots' cache sharded as
    KVCache.shardings says and held across calls (donated, so both write it in place)."""
    params = abstract_params(config, mesh, quantized=quantized, group=group)
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    state = jax.eval_shape(functools.partial(engine.empty_slots, config, slots=slots, max_len=max_len))
    cache_shardings = state.cache.shardings(mesh)
    state = jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=replicated), state)
    state = state.replace(cache=jax.tree_util.tree_map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), state.cache, cache_shardings))

    chunk, prompt_len = sampling.prompt_layout(config, max_len // 2)
    new = max(1, engine.PREFILL_BUDGET // prompt_len)

    def admitted(dtype, *shape):
        return jax.ShapeDtypeStruct((new, *shape), dtype, sharding=replicated)

    seeds = admitted(jnp.uint32, *jax.random.key_data(jax.random.key(0)).shape)
    start = time.perf_counter()
    admit = engine.admit.lower(params, config, state, admitted(jnp.int32, prompt_len), admitted(jnp.int32),
                               admitted(jnp.int32), seeds, admitted(jnp.int32), admitted(jnp.float32),
                               admitted(jnp.int32), admitted(jnp.float32), max_len=max_len, chunk=chunk, eos_id=2,
                               mesh=mesh).compile()
    reports = [memory_report("serve: admit", admit, time.perf_counter() - start, params=_bytes_per_device(params))]
    start = time.perf_counter()
    every_slot = jax.ShapeDtypeStruct((slots,), jnp.int32, sharding=replicated)
    step = engine.advance.lower(params, config, state, every_slot, steps=steps_per_call, eos_id=2).compile()
    reports.append(memory_report("serve: step", step, time.perf_counter() - start, params=_bytes_per_device(params)))
    return reports


@dataclasses.dataclass(frozen=True)
class Plan:
    """One row of docs/SCALING.md."""

    target: str
    mesh: str
    program: str  # "train", "generate" or "serve" (batch: slots, seq: the tokens each holds)
    batch: int
    seq: int  # train: tokens per sequence; generate: context = prompt + new tokens, half each
    preset: str = "mistral-7b-v0.1"
    lora_rank: int | None = None  # train LoRA adapters of this rank on every projection of each layer
    # (lora.model_targets), the base frozen in bf16
    image: int | None = None  # generate: each prompt shows an image this many pixels square (the PIXTRAL tower)
    quantize: str | None = None  # "int8" / "int4": the layers' projections so (generate, serve; LoRA: the base)
    quant_group: int | None = None  # inputs per scale (None: int8 per channel, int4 128)

    @property
    def model(self) -> str:
        """The model column: the preset, its vision tower, its quantized weights."""
        group = self.quant_group or (quantize.DEFAULT_GROUP if self.quantize == "int4" else None)
        weights = f" {self.quantize}" + (f" g{group}" if group else "") if self.quantize else ""
        return self.preset + (" + vision" if self.image else "") + weights


def config_for(plan: Plan) -> MistralConfig:
    """bf16 compute, remat of every block for training with f32 master params (and AdamW
    state), bf16 params for generation; splash attention on TPU, the blocked XLA kernel on
    the CPU stand-in."""
    tpu = TARGETS[plan.target].platform == "tpu"
    training = plan.program == "train"
    return MistralConfig.preset(plan.preset, dtype="bfloat16", param_dtype="float32" if training else "bfloat16",
                                remat="full" if training else "none", attention="splash" if tpu else "xla",
                                vision=PIXTRAL if plan.image else None)


def run(plan: Plan) -> list[Report]:
    """Compiles the plan; a compiler that refuses for lack of memory gives a report saying so."""
    mesh = make_mesh(plan.mesh, target_devices(plan.target))
    config = config_for(plan)
    quantized = dict(quantized=plan.quantize, group=plan.quant_group)
    try:
        if plan.program == "train":
            if plan.quantize and plan.lora_rank is None:
                raise ValueError("a quantized train step is QLoRA's: give lora_rank (the base quantized)")
            adapters = {} if plan.lora_rank is None else dict(lora_rank=plan.lora_rank,
                                                               lora_targets=",".join(lora.model_targets(config)))
            hp = trainer.Hyperparameters(batch_size=plan.batch, seq_len=plan.seq, **adapters)
            return [compile_train_step(config, hp, mesh, plan.quantize or "bfloat16", plan.quant_group)]
        if plan.program == "serve":
            return compile_serve(config, mesh, plan.batch, plan.seq, **quantized)
        return compile_generate(config, mesh, plan.batch, plan.seq // 2, plan.seq // 2, plan.image, **quantized)
    except jax.errors.JaxRuntimeError as e:
        return [refused(train_program(plan.lora_rank) if plan.program == "train" else plan.program, e)]


def refused(program: str, error: jax.errors.JaxRuntimeError) -> Report:
    """The report of a program the compiler refused for lack of memory; any other error raised."""
    if "RESOURCE_EXHAUSTED" not in str(error):
        raise error
    return Report(program, 0, 0, 0, 0, 0.0, error=str(error).split("RESOURCE_EXHAUSTED: ")[-1].split("\n")[0])


def fits(plan: Plan, report: Report) -> str:
    """yes / tight (within 5% of the device's memory, part of which the runtime keeps) / no."""
    capacity = TARGETS[plan.target].hbm_gib * GiB
    if report.error or report.total > capacity:
        return "no"
    return "yes" if report.total <= 0.95 * capacity else "tight"


def largest_batch(plan: Plan, limit: int = 4096) -> tuple[Plan | None, Plan | None]:
    """(the plan at the largest global batch that fits with room to spare, fits() "yes"; the
    plan at the next batch, which does not), the batch a multiple of the devices it is split
    over; None for no fitting batch (the first) or none refused up to limit (the second).

    Memory grows linearly in the batch, so two compiles (1 and 2 units) predict the boundary;
    compiling on either side of it confirms it, walking a unit at a time where the prediction
    was off."""
    mesh = make_mesh(plan.mesh, target_devices(plan.target))
    unit = mesh.shape["data"] * mesh.shape["fsdp"] * mesh.shape["expert"]
    totals: dict[int, int | None] = {}

    def sized(units: int) -> Plan:
        return dataclasses.replace(plan, batch=units * unit)

    def fit(units: int) -> bool:
        if units not in totals:
            report = run(sized(units))[0]
            print(format_row(sized(units), report), flush=True)
            totals[units] = None if fits(sized(units), report) != "yes" else report.total
        return totals[units] is not None

    if not fit(1):
        return None, sized(1)
    if not fit(2):
        return sized(1), sized(2)
    per_unit = totals[2] - totals[1]
    room = 0.95 * TARGETS[plan.target].hbm_gib * GiB - totals[1]
    units = max(2, min(limit // unit, 1 + int(room // per_unit)) if per_unit > 0 else limit // unit)
    while units * unit < limit and fit(units):
        units += 1
    while not fit(units):
        units -= 1
    return sized(units), sized(units + 1) if (units + 1) * unit <= limit else None


HEADER = ("| model | target | mesh | program | batch x context | params | optimizer | temporaries | total | device "
          "| fits |\n|---|---|---|---|---|---:|---:|---:|---:|---:|---|")


def format_row(plan: Plan, r: Report) -> str:
    device = f"{TARGETS[plan.target].hbm_gib:g}"
    head = f"| {plan.model} | {plan.target} | {plan.mesh} | {r.program} | {plan.batch} x {plan.seq} |"
    if r.error:
        return head + f" | | | | {device} | no: {r.error} |"
    return head + (f" {r.params / GiB:.2f} | {r.optimizer / GiB:.2f} | {r.temporaries / GiB:.2f} | "
                   f"{r.total / GiB:.2f} | {device} | {fits(plan, r)} |")


def compile_only_environment() -> None:
    """Compiling needs no accelerator: CPU as the backend (with 8 devices for the cpu-8
    stand-in), TPUs only as compile targets. Call it before JAX starts a backend."""
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    # Compiling touches no TPU, so a second process doing the same may load libtpu too
    # (otherwise libtpu's lockfile refuses it while another holds it).
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
        flags = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
        os.environ["XLA_FLAGS"] = flags.strip()


def compile_rows(plans) -> list[str]:
    """Compiles each plan and prints its rows (a program each) as they come; returns them."""
    rows = []
    for plan in plans:
        for report in run(plan):
            rows.append(format_row(plan, report))
            print(rows[-1], "(refused by the compiler)" if report.error else f"(compiled in {report.compile_s:.0f} s)",
                  flush=True)
    return rows


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--target", choices=sorted(TARGETS), default="cpu-8")
    p.add_argument("--mesh", default="", help="e.g. fsdp=16 or data=2,tensor=8 (default: all devices on fsdp)")
    p.add_argument("--program", choices=["train", "generate", "serve"], default="train")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=4096, help="train: sequence length; generate: prompt + new tokens")
    p.add_argument("--preset", default="mistral-7b-v0.1")
    p.add_argument("--lora-rank", type=int, help="train: LoRA adapters of this rank on every projection of each layer, "
                                                 "the base frozen in bf16 (or --base-dtype)")
    p.add_argument("--quantize", choices=quantize.MODES, help="generate, serve: the layers' projections in int8 "
                                                              "(per channel) or int4 (groups of --quant-group)")
    p.add_argument("--base-dtype", choices=quantize.MODES, help="train with --lora-rank: the frozen base's projections "
                                                                "quantized (QLoRA), the rest bf16")
    p.add_argument("--quant-group", type=int, help="inputs per scale of --quantize / --base-dtype (default: int8 a "
                                                   "whole channel, int4 128)")
    p.add_argument("--largest-batch", action="store_true",
                   help="search for the largest batch that fits (compiling at each batch tried; --batch ignored)")
    args = p.parse_args(argv)
    training = args.program == "train"
    if (args.quantize and training) or (args.base_dtype and (not training or args.lora_rank is None)):
        p.error("--quantize is for generate and serve, --base-dtype for train with --lora-rank")
    if args.quant_group and not (args.quantize or args.base_dtype):
        p.error("--quant-group is the group of --quantize or --base-dtype")
    compile_only_environment()
    print(HEADER)
    plan = Plan(args.target, args.mesh, args.program, args.batch, args.seq, args.preset, args.lora_rank,
                quantize=args.quantize or args.base_dtype, quant_group=args.quant_group)
    if not args.largest_batch:
        compile_rows([plan])
        return
    good, bad = largest_batch(plan)
    print(f"largest batch that fits: {good.batch if good else 'none'}"
          + (f" (not {bad.batch})" if good and bad else ""), flush=True)


if __name__ == "__main__":
    run_cli(main)
