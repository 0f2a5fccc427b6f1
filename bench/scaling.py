"""How cost grows with length under a sliding window, and with depth at compile time.

- forward of one sequence at T = 4W and T = 16W (tiny: W = 256): a windowed model should
  take ~4x the time and memory for 4x the tokens, not 16x. Memory is the compiled
  program's temporaries (XLA's memory_analysis), for us; HF's is not measured.
- decode step time after a history of 1x, 4x and 16x the window: the rolling cache holds W
  slots, so a step should cost the same however long the history. Ours is timed on the
  compiled decode loop alone; HF's by difference of whole generate calls (noisier).
- compile time of the train step with 4 and 32 layers (tiny's dimensions): the layers are
  one scan, so depth should barely change it. PyTorch has no compile step here.
"""

from __future__ import annotations

import os
import time

import numpy as np

from bench.common import CONFIGS, random_hf_model, timed
from bench.decode import decode_step_seconds, step_roofline_seconds

DECODE_NEW = 64
SUPPORTED = ("tiny", "default")  # small at 16W = 8192 tokens: HF's dense attention alone needs ~3 GB a layer


def run(bandwidth: float, peak_flops: float, names=("tiny",), reps: int = 3, side: str = "ours") -> list[dict]:
    """One side's rows: ours (times, memory, compile time) or torch's (times)."""
    import jax
    import torch

    from mistral_jax.model.transformer import Mistral
    from mistral_jax.runtime.sharding import batch_sharding, make_mesh
    from mistral_jax.training import metrics, trainer

    torch.set_num_threads(os.cpu_count())
    rows = []
    for name in (n for n in names if n in SUPPORTED):
        hf, (config, params) = random_hf_model(CONFIGS[name].replace(max_seq_len=32 * CONFIGS[name].sliding_window))
        W = config.sliding_window
        hf = hf.eval()
        hf.config._attn_implementation = "sdpa"

        forward = jax.jit(lambda p, t: Mistral(config).apply({"params": p}, t))
        times, temps = {}, {}
        for multiple in (4, 16):
            tokens = np.random.default_rng(0).integers(0, config.vocab_size, (1, multiple * W)).astype(np.int32)
            flops = metrics.flops_per_token(config, tokens.size, training=False) * tokens.size
            row = dict(workload=f"forward {name} 1x{multiple * W} ({multiple}W)", unit="tok/s")
            if side == "ours":
                times[multiple] = timed(lambda: forward(params, tokens).block_until_ready(), reps=reps)
                temps[multiple] = forward.lower(params, tokens).compile().memory_analysis().temp_size_in_bytes
                row.update(ours=tokens.size / times[multiple], limit=flops / times[multiple] / peak_flops)
                if multiple == 16:
                    row["note"] = f"16W vs 4W: time {times[16] / times[4]:.2f}x, memory {temps[16] / temps[4]:.2f}x"
            else:
                def hf_forward():
                    with torch.no_grad():
                        hf(torch.from_numpy(tokens).long(), use_cache=False)
                times[multiple] = timed(hf_forward, reps=reps)
                row.update(torch=tokens.size / times[multiple],
                           note=f"HF sdpa attention, at {100 * flops / times[multiple] / peak_flops:.0f}% of peak")
                if multiple == 16:
                    row["note"] += f"; HF 16W vs 4W: time {times[16] / times[4]:.2f}x"
            rows.append(row)

        steps = {}
        for multiple in (1, 4, 16):
            prompt = np.random.default_rng(1).integers(3, config.vocab_size, (1, multiple * W)).astype(np.int32)
            row = dict(workload=f"decode step {name} b1 after {multiple}W", unit="tok/s")
            if side == "ours":
                steps[multiple] = decode_step_seconds(config, params, prompt, DECODE_NEW, reps)
                roofline = step_roofline_seconds(config, 1, bandwidth, peak_flops)
                row.update(ours=1 / steps[multiple], limit=roofline / steps[multiple],
                           note=f"step {1e3 * steps[multiple]:.2f} ms = {steps[multiple] / steps[1]:.2f}x the "
                                f"step after 1W")
            else:
                def hf_generate(n):
                    with torch.no_grad():
                        hf.generate(torch.from_numpy(prompt).long(), max_new_tokens=n, min_new_tokens=n,
                                    do_sample=False, pad_token_id=0)
                hf_step = (timed(lambda: hf_generate(DECODE_NEW), reps=reps)
                           - timed(lambda: hf_generate(1), reps=reps)) / (DECODE_NEW - 1)
                row.update(torch=1 / hf_step, note="HF dynamic cache, by difference of whole generate calls")
            rows.append(row)

        if side != "ours":
            continue
        compile_s = {}
        for n_layers in (4, 32):
            deep = config.replace(n_layers=n_layers)
            hp = trainer.Hyperparameters(batch_size=8, seq_len=256)
            tx = trainer.make_optimizer(hp)
            mesh = make_mesh("", jax.devices()[:1])
            state = trainer.abstract_state(deep, tx, mesh)
            step = trainer.make_train_step(deep, tx, hp, mesh, trainer.state_shardings(state))
            batch = jax.ShapeDtypeStruct((8, 257), np.int32, sharding=batch_sharding(mesh))
            start = time.perf_counter()
            step.lower(state, batch).compile()
            compile_s[n_layers] = time.perf_counter() - start
        rows.append(dict(workload=f"compile train step {name} dims, 32 layers", ours=compile_s[32], unit="s",
                         note=f"4 layers: {compile_s[4]:.1f} s; 32 vs 4 layers: {compile_s[32] / compile_s[4]:.2f}x"))
    return rows
