"""What train.py sets up around the loop: the mesh, the model config, the tokenizer (trained
on first use), the tokenized data, initial weights; and what it does after: the final model
and a few samples."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import time

import jax
import numpy as np

from mistral_jax import data
from mistral_jax.checkpoint import barrier, load_checkpoint, save_checkpoint
from mistral_jax.config import MistralConfig
from mistral_jax.sharding import make_mesh, param_shardings
from mistral_jax.tokenizer import Tokenizer

CACHE_DIR = os.environ.get("MISTRAL_JAX_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "mistral_jax"))
DEFAULT_CONFIG = "mistral-15m"
SAMPLE_PROMPTS = ("The", "A function", "In Python,", "When the", "This module")


@dataclasses.dataclass
class Run:
    config: MistralConfig
    mesh: jax.sharding.Mesh
    tokenizer_path: str
    tokens: np.ndarray
    params: dict | None  # initial weights of --init-from
    peak_flops: float | None


def resolve_config(spec: str) -> MistralConfig:
    """A preset name, or a config.json / params.json file."""
    if os.path.isfile(spec):
        with open(spec) as f:
            d = json.load(f)
        return MistralConfig.from_params_dict(d) if "dim" in d else MistralConfig.from_hf_dict(d)
    return MistralConfig.preset(spec)


def measure_peak_flops(shapes=((1024, 1024, 1024),), timer=None) -> float:
    """Sustained float32 matmul FLOP/s of one device: the best over (m, k, n) GEMM shapes,
    each timed by timer(fn) -> seconds (default: the fastest of 5 runs after a warm-up).
    train.py's MFU denominator, and the benchmarks' (which pass more shapes and a timer
    that discards disturbed runs)."""
    import jax.numpy as jnp

    def fastest_of_5(fn):
        fn()
        best = float("inf")
        for _ in range(5):
            start = time.perf_counter()
            fn()
            best = min(best, time.perf_counter() - start)
        return best

    timer = timer or fastest_of_5
    best = 0.0
    for m, k, n in shapes:
        a, b = jnp.ones((m, k), jnp.float32), jnp.ones((k, n), jnp.float32)
        matmul = jax.jit(lambda a, b: a @ b)
        best = max(best, 2 * m * k * n / timer(lambda: matmul(a, b).block_until_ready()))
    return best


def initialize_distributed(coordinator: str | None, num_processes: int | None, process_id: int | None) -> None:
    """jax.distributed.initialize for a multi-process run. Without arguments it detects the
    cluster (TPU pod slices, SLURM, ...); CPU processes talk through gloo."""
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=coordinator, num_processes=num_processes, process_id=process_id)


def prepare_run(args) -> Run:
    if min(args.seq_len, args.batch_size, args.steps, args.grad_accum, args.loss_chunk) < 1:
        raise ValueError("--steps, --batch-size, --seq-len, --grad-accum and --loss-chunk must be positive")
    mesh = make_mesh(args.mesh)
    shards = mesh.shape["data"] * mesh.shape["fsdp"]
    if args.batch_size % (args.grad_accum * shards) or args.batch_size % jax.process_count():
        raise ValueError(f"--batch-size {args.batch_size} must divide into --grad-accum {args.grad_accum} "
                         f"micro-batches, each split over data x fsdp = {shards} devices")
    primary = jax.process_index() == 0
    os.makedirs(args.out, exist_ok=True)
    has_run = os.path.isdir(os.path.join(args.out, "checkpoints"))
    barrier("checked for a previous run")  # before any process writes into --out
    if has_run and not (args.resume or args.overwrite):
        raise ValueError(f"{args.out} holds a run: pass --resume to continue it or --overwrite to start afresh")
    if args.overwrite and not args.resume and primary:  # afresh: the tokenizer too, as the data may differ
        for name in ("checkpoints", "model", "metrics.jsonl", "tensorboard", "loss.png", "tokenizer.model"):
            path = os.path.join(args.out, name)
            if os.path.isdir(path):
                shutil.rmtree(path)
            elif os.path.exists(path):
                os.remove(path)

    params = None
    tokenizer_path = os.path.join(args.out, "tokenizer.model")
    if args.init_from:
        if not os.path.isdir(args.init_from):
            raise FileNotFoundError(f"checkpoint {args.init_from} not found")
        base = MistralConfig.from_dir(args.init_from)
        if args.config and _shape(resolve_config(args.config)) != _shape(base):
            raise ValueError(f"--init-from {args.init_from} has a different shape than --config {args.config}")
        # Read straight onto the mesh: no device (or host) ever holds the whole model.
        config, params = load_checkpoint(args.init_from, "float32", shardings=param_shardings(base, mesh))
        source = args.tokenizer or os.path.join(args.init_from, "tokenizer.model")
        if not os.path.isfile(source):
            raise ValueError(f"{args.init_from} has no tokenizer.model; pass --tokenizer")
        if primary:
            _copy_if_other(source, tokenizer_path)
    else:
        config = resolve_config(args.config or DEFAULT_CONFIG)
        if args.tokenizer and primary:
            _copy_if_other(args.tokenizer, tokenizer_path)
        elif not os.path.isfile(tokenizer_path) and primary:
            print(f"training a {config.vocab_size}-piece tokenizer on the data", flush=True)
            data.train_tokenizer(args.data, tokenizer_path, config.vocab_size)
    barrier("tokenizer ready")
    if args.seq_len > config.max_seq_len:
        raise ValueError(f"--seq-len {args.seq_len} is longer than the model's max_seq_len {config.max_seq_len}")
    config = config.replace(dtype=args.dtype, param_dtype="float32", remat=args.remat)
    tokenizer = Tokenizer(tokenizer_path)
    if tokenizer.vocab_size != config.vocab_size:
        raise ValueError(f"tokenizer has {tokenizer.vocab_size} pieces, the model's vocabulary is {config.vocab_size}")
    tokens = data.tokenize(args.data, tokenizer_path, os.path.join(CACHE_DIR, "tokens"))
    if primary:
        config.save_hf(args.out)
    # MFU is over the whole job. A process's CPU devices share its cores, which one device's
    # matmul already uses all of: counting each fake device as a machine understated MFU 8x.
    units = jax.process_count() if jax.default_backend() == "cpu" else jax.device_count()
    peak = (args.peak_flops or measure_peak_flops()) * units
    return Run(config, mesh, tokenizer_path, tokens, params, peak)


def _shape(c: MistralConfig) -> tuple:
    return (c.dim, c.n_layers, c.head_dim, c.hidden_dim, c.n_heads, c.n_kv_heads, c.vocab_size)


def _copy_if_other(source: str, destination: str) -> None:
    if os.path.abspath(source) != os.path.abspath(destination):
        shutil.copyfile(source, destination)


def save_final_model(out_dir: str, run: Run, params) -> str:
    """out_dir/model: what sample.py and convert_weights.py --to-hf read."""
    path = os.path.join(out_dir, "model")
    save_checkpoint(path, run.config.replace(dtype="float32"), params, overwrite=True,
                    extra_files={"tokenizer.model": run.tokenizer_path})
    if jax.process_index() == 0:
        print(f"saved {path}", flush=True)
    return path


def print_samples(run: Run, params, n: int, max_new_tokens: int, seed: int) -> None:
    """Samples from the params where they lie, sharded over run.mesh, and prints on process 0
    (every process must call this: generating runs on all of their devices)."""
    from mistral_jax.sampling import generate

    tokenizer = Tokenizer(run.tokenizer_path)
    prompts = [tokenizer.encode(SAMPLE_PROMPTS[i % len(SAMPLE_PROMPTS)]) for i in range(n)]
    outputs = generate(run.config, params, prompts, max_new_tokens, temperature=0.8, top_p=0.95, seed=seed,
                       eos_id=tokenizer.eos_id, mesh=run.mesh)
    if jax.process_index() != 0:
        return
    for prompt, tokens in zip(prompts, outputs):
        print(f"--- {tokenizer.decode(prompt + tokens)}")  # decoded whole, so the joining space survives
