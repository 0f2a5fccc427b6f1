"""Forward pass (batch 8 x 512) and train step (fwd + bwd + AdamW, batch 8 x 256) against HF
transformers' MistralForCausalLM with torch.optim.AdamW, best of its eager/sdpa attention.

MFU counts useful FLOPs: 2 per matmul weight per token (x3 with the backward pass) plus
attention as computed under the causal mask and the window; against the measured peak.
"""

from __future__ import annotations

import os

import numpy as np

from bench.common import CONFIGS, hf_train_step, our_train_step_seconds, random_hf_model, timed


def _hf_with_attention(hf, attention: str):
    hf.config._attn_implementation = attention
    return hf


def run(bandwidth: float, peak_flops: float, names=("tiny", "small"), reps: int = 3, side: str = "ours") -> list[dict]:
    """One side's rows: ours (tok/s, fraction of peak) or torch's (tok/s, note)."""
    import jax
    import torch

    from mistral_jax.model.transformer import Mistral
    from mistral_jax.training import metrics

    torch.set_num_threads(os.cpu_count())
    rows = []
    for name in names:
        base = CONFIGS[name]
        hf, (config, params) = random_hf_model(base)

        # Forward, batch 8 x 512.
        tokens = np.random.default_rng(0).integers(0, config.vocab_size, (8, 512)).astype(np.int32)
        flops = metrics.flops_per_token(config, 512, training=False) * tokens.size
        row = dict(workload=f"forward {name} 8x512", unit="tok/s")
        if side == "ours":
            forward = jax.jit(lambda p, t: Mistral(config).apply({"params": p}, t))
            seconds = timed(lambda: forward(params, tokens).block_until_ready(), reps=reps)
            row.update(ours=tokens.size / seconds, limit=flops / seconds / peak_flops)
        else:
            hf_times = {}
            for attention in ("eager", "sdpa"):
                model = _hf_with_attention(hf, attention).eval()

                def hf_forward(model=model):
                    with torch.no_grad():
                        model(torch.from_numpy(tokens).long(), use_cache=False)
                hf_times[attention] = timed(hf_forward, reps=reps)
            best = min(hf_times, key=hf_times.get)
            row.update(torch=tokens.size / hf_times[best],
                       note=f"HF {best} attention; HF at {100 * flops / hf_times[best] / peak_flops:.0f}% of peak")
        rows.append(row)

        # Train step, batch 8 x 256.
        batch = np.random.default_rng(1).integers(0, config.vocab_size, (8, 257)).astype(np.int32)
        n_tokens = 8 * 256
        flops = metrics.flops_per_token(config, 256) * n_tokens
        row = dict(workload=f"train step {name} 8x256", unit="tok/s")
        if side == "ours":
            seconds = our_train_step_seconds(config, params, batch, reps)
            row.update(ours=n_tokens / seconds, limit=flops / seconds / peak_flops)
        else:
            hf_times = {}
            torch_batch = torch.from_numpy(batch).long()
            for attention in ("eager", "sdpa"):
                model = _hf_with_attention(hf, attention).train()
                hf_times[attention] = timed(hf_train_step(model, torch_batch), reps=reps)
            best = min(hf_times, key=hf_times.get)
            share = 100 * flops / hf_times[best] / peak_flops
            row.update(torch=n_tokens / hf_times[best],
                       note=f"HF {best} attention + torch AdamW; HF at {share:.0f}% of peak")
        rows.append(row)
    return rows
