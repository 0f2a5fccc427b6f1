"""Mixtral-shaped experts (small's dims, 8 experts, top-2) against HF transformers'
MixtralForCausalLM: forward (8 x 512), train step (8 x 256, the load-balancing loss in
both) and greedy decode (batch 1, prompt 32 + 64 new tokens); and the dispatch's overhead:
each side's MoE train step and forward timed against the dense model with the same
parameters active per token (small-active: F = 2 x 2048), in the notes as MoE time / dense
time (1.0 would be a free dispatch; HF's loop over the experts is the baseline).
"""

from __future__ import annotations

import os

import numpy as np

from bench.common import CONFIGS, hf_forward_seconds, hf_train_step, our_train_step_seconds, random_hf_model, timed

PROMPT, NEW = 32, 64


def run(bandwidth: float, peak_flops: float, names=("small-moe",), reps: int = 3, side: str = "ours") -> list[dict]:
    del bandwidth
    import torch

    torch.set_num_threads(os.cpu_count())
    rows = []
    for name in names:
        if not CONFIGS[name].moe:
            raise ValueError(f"the experts suite runs configs with experts (small-moe), not {name}")
        moe_seconds = {}
        for model_name in (name, "small-active"):
            config = CONFIGS[model_name]
            hf, (ours_config, params) = random_hf_model(config)
            times = _ours(ours_config, params, reps) if side == "ours" else _hf(hf, config, reps)
            if model_name == name:
                moe_seconds = times
            for workload, tokens in (("forward", 8 * 512), ("train step", 8 * 256), ("decode", NEW)):
                if workload not in times:
                    continue
                size = {"forward": "8x512", "train step": "8x256", "decode": f"batch 1, {PROMPT}+{NEW}"}[workload]
                row = dict(workload=f"{workload} {model_name} {size}", unit="tok/s")
                row["ours" if side == "ours" else "torch"] = tokens / times[workload]
                if model_name != name:
                    row["note"] = (f"{'ours' if side == 'ours' else 'HF'}: {name} takes "
                                   f"{moe_seconds[workload] / times[workload]:.2f}x this")
                rows.append(row)
            del hf, params
    return rows


def _ours(config, params, reps: int) -> dict:
    import jax

    from mistral_jax.inference.sampling import generate
    from mistral_jax.model.transformer import Mistral

    times = {}
    tokens = np.random.default_rng(0).integers(0, config.vocab_size, (8, 512)).astype(np.int32)
    forward = jax.jit(lambda p, t: Mistral(config).apply({"params": p}, t))
    times["forward"] = timed(lambda: forward(params, tokens).block_until_ready(), reps=reps)

    if config.moe:
        prompt = [np.random.default_rng(2).integers(3, config.vocab_size, PROMPT).tolist()]
        times["decode"] = timed(lambda: generate(config, params, prompt, NEW, eos_id=None), reps=reps)

    batch = np.random.default_rng(1).integers(0, config.vocab_size, (8, 257)).astype(np.int32)
    times["train step"] = our_train_step_seconds(config, params, batch, reps)  # last: it donates params
    return times


def _hf(model, config, reps: int) -> dict:
    import torch

    times = {"forward": hf_forward_seconds(model, config, reps)}

    batch = torch.from_numpy(np.random.default_rng(1).integers(0, config.vocab_size, (8, 257))).long()
    step = hf_train_step(model.train(), batch, config.moe.router_aux_loss_coef if config.moe else 0.0)
    times["train step"] = timed(step, reps=reps)
    model.eval()

    if config.moe:
        prompt = torch.tensor([np.random.default_rng(2).integers(3, config.vocab_size, PROMPT).tolist()])

        def decode():
            with torch.no_grad():
                model.generate(prompt, max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False, eos_token_id=None,
                               pad_token_id=0)
        times["decode"] = timed(decode, reps=reps)
    return times
