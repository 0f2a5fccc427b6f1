"""Decode steps of the benchmark configs in each way runtime/platforms.py could run them on CPU: the
evidence for its choices (BENCHMARKS.md, "Decode on CPU: layouts and YNNPACK").

  python -m bench.decode_variants [--configs tiny small default] [--reps 3]

For batch 1 and 8 (prompt 32, steps 8 to 256, as bench.decode times them), float32:
- stacked: one scan over the stacked layers (what TPUs and GPUs run);
- per layer: a block per layer over views of the stacked weights (what CPUs run);
- per layer, no YNNPACK: the same program compiled with XLA:CPU's YNNPACK fusions off.
Each variant is compiled and timed in this one process, one after the other.
"""

from __future__ import annotations

import argparse

import jax
import numpy as np

from bench.common import CONFIGS
from bench.decode import NEW, PROMPT, decode_step_seconds
from bench.report import machine_description, versions
from mistral_jax.inference import sampling
from mistral_jax.model.transformer import init_params
from mistral_jax.runtime import platforms

DECODE_WITHOUT_YNN = jax.jit(sampling.decode.__wrapped__, static_argnames=("config", "sampler", "eos_id"),
                             donate_argnames=("state",),
                             compiler_options={"xla_cpu_experimental_ynn_fusion_type": ""})


def step_ms(config, params, prompts, reps: int, per_layer: bool, decode=None) -> float:
    """decode_step_seconds with platforms.decode_per_layer answering per_layer."""
    decode_per_layer = platforms.decode_per_layer
    platforms.decode_per_layer = lambda platform: per_layer
    try:
        return 1e3 * decode_step_seconds(config, params, prompts, NEW, reps, decode)
    finally:
        platforms.decode_per_layer = decode_per_layer


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--configs", nargs="+", choices=sorted(CONFIGS), default=["tiny", "small", "default"])
    p.add_argument("--reps", type=int, default=3)
    args = p.parse_args()
    print(f"{machine_description()}; {versions()}\n")
    print("| decode step | stacked ms | per layer ms | per layer, no YNNPACK ms | stacked / per layer | "
          "no YNNPACK / YNNPACK |\n|---|---:|---:|---:|---:|---:|")
    for name in args.configs:
        config = CONFIGS[name]
        params = init_params(config, jax.random.key(0))
        for batch in (1, 8):
            prompts = np.random.default_rng(0).integers(3, config.vocab_size, (batch, PROMPT)).astype(np.int32)
            stacked = step_ms(config, params, prompts, args.reps, per_layer=False)
            per_layer = step_ms(config, params, prompts, args.reps, per_layer=True)
            no_ynn = step_ms(config, params, prompts, args.reps, per_layer=True, decode=DECODE_WITHOUT_YNN)
            print(f"| {name} b{batch} | {stacked:.2f} | {per_layer:.2f} | {no_ynn:.2f} | {stacked / per_layer:.2f}x | "
                  f"{no_ynn / per_layer:.2f}x |", flush=True)


if __name__ == "__main__":
    from mistral_jax.runtime.cli import run

    platforms.restart_with_huge_pages()
    run(main)
