"""XLA:CPU's matrix products with few rows, with and without YNNPACK fusions: the evidence for
sampling.FEW_ROWS (on CPU, decode of fewer rows per device is compiled without them).

  python -m bench.few_rows

1. Chains of products of the benchmark configs' shapes ([rows, D] x [D, F], then x [F, D]),
   --rows (default 1 to 256), float32: GFLOP/s in XLA's default (YNNPACK) and in its Eigen
   kernels, both compiled in one process and timed one after the other.
2. Decode steps of the benchmark configs at batch 1 and 8, float32 and bfloat16, as the decode
   benchmark times them (bench.decode.decode_step_seconds): the two compiled decode loops
   (sampling.decode_loop, decode_loop_few_rows_cpu) from the same prefilled state.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from bench.common import CONFIGS, machine_description, timed, versions
from bench.decode import NEW, PROMPT, decode_step_seconds
from mistral_jax import sampling, trainer
from mistral_jax.model import unstack_layers

NO_YNN = {"xla_cpu_experimental_ynn_fusion_type": ""}
SHAPES = {"tiny feed-forward": (256, 768), "small feed-forward": (768, 2048), "small output": (768, 32000)}
LAYERS = 12


def product_chains(rows_list, reps: int) -> None:
    print("| shapes | rows | YNNPACK GFLOP/s | Eigen GFLOP/s | Eigen / YNNPACK |\n|---|---:|---:|---:|---:|")
    rng = np.random.default_rng(0)
    for name, (d, f) in SHAPES.items():
        layers = 1 if f > 4 * d else LAYERS  # the output projection once; feed-forwards as a stack
        weights = [(jnp.asarray(rng.standard_normal((d, f), np.float32) * d**-0.5),
                    jnp.asarray(rng.standard_normal((f, d), np.float32) * f**-0.5)) for _ in range(layers)]

        def chain(x, weights):
            for up, down in weights:
                x = x + jnp.tanh(x @ up) @ down
            return x

        programs = [jax.jit(chain), jax.jit(chain, compiler_options=NO_YNN)]
        for rows in rows_list:
            x = jnp.asarray(rng.standard_normal((rows, d), np.float32))
            seconds = [timed(lambda p=p: p(x, weights).block_until_ready(), reps=reps) for p in programs]
            flops = 2 * rows * 2 * d * f * layers
            print(f"| {name} | {rows} | {flops / seconds[0] / 1e9:.1f} | {flops / seconds[1] / 1e9:.1f} | "
                  f"{seconds[0] / seconds[1]:.2f}x |", flush=True)


def decode_steps(names, reps: int) -> None:
    print("\n| decode step | YNNPACK ms | Eigen ms | Eigen / YNNPACK |\n|---|---:|---:|---:|")
    for name in names:
        for dtype in ("float32", "bfloat16"):
            config = dataclasses.replace(CONFIGS[name], dtype=dtype, param_dtype=dtype)
            params = unstack_layers(trainer._init_params(config, jax.random.key(0)))
            for batch in (1, 8):
                prompts = np.random.default_rng(0).integers(3, config.vocab_size, (batch, PROMPT)).astype(np.int32)
                ms = [1e3 * decode_step_seconds(config, params, prompts, NEW, reps, program)
                      for program in (sampling.decode_loop, sampling.decode_loop_few_rows_cpu)]
                print(f"| {name} {dtype} b{batch} | {ms[0]:.2f} | {ms[1]:.2f} | {ms[0] / ms[1]:.2f}x |", flush=True)


def main() -> None:
    import argparse

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", nargs="+", type=int, default=[1, 8, 16, 32, 48, 64, 128, 256])
    p.add_argument("--configs", nargs="*", choices=sorted(CONFIGS), default=["tiny", "small", "default"],
                   help="decode steps of these configs (none: product chains only)")
    p.add_argument("--reps", type=int, default=3)
    args = p.parse_args()
    print(f"{machine_description()}; {versions()}\n")
    product_chains(args.rows, args.reps)
    if args.configs:
        decode_steps(args.configs, args.reps)


if __name__ == "__main__":
    from mistral_jax.cli import reexec_with_huge_pages, run
    reexec_with_huge_pages()
    run(main)
