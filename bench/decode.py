"""Greedy decode: prompt 32 + 256 new tokens, batch 1 and 8, against HF transformers' generate.

Both sides hold the same random float32 weights and use every core. Ours are the stacked
params load_pytorch returns, passed to the public `generate` as a user would (it lays them
out for decoding itself: sampling.decoding_layout). Tokens/s counts the generated tokens
over the whole call (prefill included, compile excluded); at batch 1 a second row streams
them as sample.py does (generate_stream, 16 decode steps per compiled call). The roofline
fraction compares our per-step decode time (the compiled decode loop alone, see
decode_step_seconds) with the bytes a step must read (every weight except the embedding
table, plus the live part of the KV cache) at the measured bandwidth; at batch 8 the
roofline is max(those bytes / bandwidth, matmul FLOPs / measured peak).
"""

from __future__ import annotations

import os

import numpy as np

from bench.common import CONFIGS, random_hf_model, timed

PROMPT, NEW = 32, 256
STEPS_PER_CALL = 16  # sample.py's default


def decode_step_seconds(config, params, prompts: np.ndarray, new: int, reps: int, decode=None) -> float:
    """Seconds per step of the compiled decode loop (`decode`, default sampling.decode) after
    prefilling prompts [B, P], in the layout generate decodes in: the loop run for `new` and
    for 8 steps from the same prefilled state (copied, since decode donates it), the
    difference divided by the extra steps."""
    import jax
    import jax.numpy as jnp

    from mistral_jax.inference import sampling

    options = dict(sampler=sampling.Sampler(), eos_id=-1)
    config, params = sampling.decoding_layout(config, params)
    B, P = prompts.shape
    state = sampling.start(params, config, prompts, np.full(B, P, np.int32), jax.random.key(0),
                           chunk=sampling.chunk_size(config, P), max_tokens=new, **options)
    decode = decode or sampling.decode

    def run(steps):
        fresh = jax.tree_util.tree_map(jnp.copy, state)
        jax.block_until_ready(decode(params, config, fresh, jnp.array(steps, jnp.int32), **options))
    return (timed(lambda: run(new), reps=reps) - timed(lambda: run(8), reps=reps)) / (new - 8)


def step_roofline_seconds(config, batch: int, bandwidth: float, peak_flops: float) -> float:
    """Mean over the NEW steps of max(bytes read / bandwidth, matmul FLOPs / peak)."""
    matmul_params = config.num_params - config.vocab_size * config.dim  # the embedding is a lookup
    cache_len = min(config.sliding_window or 10**9, PROMPT + NEW)
    per_token_cache_bytes = config.n_layers * 2 * config.n_kv_heads * config.head_dim * 4
    total = 0.0
    for step in range(NEW):
        live = min(PROMPT + step + 1, cache_len)
        read = 4 * matmul_params + batch * live * per_token_cache_bytes
        flops = 2 * batch * (matmul_params + config.n_layers * config.n_heads * config.head_dim * 2 * live)
        total += max(read / bandwidth, flops / peak_flops)
    return total / NEW


def run(bandwidth: float, peak_flops: float, names=("tiny", "small"), reps: int = 3, side: str = "ours") -> list[dict]:
    """One side's rows: ours (tok/s, roofline fraction, step time) or torch's (tok/s, best cache)."""
    import torch

    from mistral_jax.inference.sampling import generate, generate_stream

    torch.set_num_threads(os.cpu_count())
    rows = []
    for name in names:
        hf, (config, params) = random_hf_model(CONFIGS[name])
        for batch in (1, 8):
            prompts = np.random.default_rng(0).integers(3, config.vocab_size, (batch, PROMPT)).astype(np.int32)
            row = dict(workload=f"decode {name} b{batch}", unit="tok/s")
            if side == "ours":
                ours = timed(lambda: generate(config, params, prompts.tolist(), NEW, eos_id=None), reps=reps)
                step = decode_step_seconds(config, params, prompts, NEW, reps)
                roofline = step_roofline_seconds(config, batch, bandwidth, peak_flops)
                row.update(ours=batch * NEW / ours, limit=roofline / step,
                           note=f"our step {1e3 * step:.2f} ms, roofline {1e3 * roofline:.2f} ms")
                if batch == 1:
                    streamed = timed(lambda: list(generate_stream(config, params, prompts.tolist(), NEW, eos_id=None,
                                                                  steps_per_call=STEPS_PER_CALL)), reps=reps)
                    rows += [row, dict(workload=f"decode {name} b1, streamed as sample.py", unit="tok/s",
                                       ours=NEW / streamed, note=f"{STEPS_PER_CALL} steps per compiled call")]
                    continue
            else:
                hf_times = {}
                for cache in ("dynamic", "static"):
                    def hf_generate(cache=cache):
                        with torch.no_grad():
                            hf.generate(torch.tensor(prompts), max_new_tokens=NEW, min_new_tokens=NEW,
                                        do_sample=False, cache_implementation=cache, pad_token_id=0)
                    hf_times[cache] = timed(hf_generate, reps=reps)
                best_cache = min(hf_times, key=hf_times.get)
                row.update(torch=batch * NEW / hf_times[best_cache], note=f"HF best cache: {best_cache}")
            rows.append(row)
    return rows
