"""LoRA: the train step (8 x 256) with rank-16 adapters on all seven projections, the base
frozen, against the full train step of the same model, and against HF transformers +
PEFT training the same adapters (get_peft_model, torch AdamW over the adapters). Both sides
keep the base in float32 (XLA:CPU has no fast bf16 matmul); the notes give each side's
LoRA time as a fraction of its full step and, for ours, the memory XLA plans for each step
(arguments + outputs - donated + temporaries, `compiled.memory_analysis()`).
"""

from __future__ import annotations

import os

import numpy as np

from bench.common import CONFIGS, hf_train_step, random_hf_model, timed

RANK = 16


def run(bandwidth: float, peak_flops: float, names=("small",), reps: int = 3, side: str = "ours") -> list[dict]:
    del bandwidth
    import torch

    from mistral_jax.plans import aot
    from mistral_jax.training import metrics

    torch.set_num_threads(os.cpu_count())
    rows = []
    for name in names:
        hf, (config, params) = random_hf_model(CONFIGS[name])
        batch = np.random.default_rng(1).integers(0, config.vocab_size, (8, 257)).astype(np.int32)
        ours = side == "ours"
        times, memory, n_adapter = _ours(config, params, batch, reps) if ours else _hf(config, hf, batch, reps)
        full_flops = metrics.flops_per_token(config, 256) * 8 * 256
        lora_flops = metrics.flops_per_token(config, 256, lora_params=n_adapter) * 8 * 256
        who = "ours" if side == "ours" else "HF + PEFT"
        for kind, flops in (("full", full_flops), ("lora", lora_flops)):
            workload = f"train step {name} 8x256" + ("" if kind == "full" else f", LoRA r{RANK} on all 7")
            row = dict(workload=workload, unit="tok/s")
            row["ours" if side == "ours" else "torch"] = 8 * 256 / times[kind]
            if side == "ours":
                row["limit"] = flops / times[kind] / peak_flops
            if kind == "lora":
                row["note"] = f"{who}: {times['lora'] / times['full']:.2f}x the time of its full step" + (
                    f", {memory['lora'] / aot.GiB:.2f} vs {memory['full'] / aot.GiB:.2f} GiB planned by XLA"
                    if memory else "")
            rows.append(row)
    return rows


def _ours(config, params, batch, reps: int):
    import jax
    import jax.numpy as jnp

    from mistral_jax.plans import aot
    from mistral_jax.runtime.sharding import make_mesh
    from mistral_jax.training import lora, trainer

    mesh = make_mesh("", jax.devices()[:1])
    batch = jnp.asarray(batch)
    times, memory = {}, {}
    n_adapter = None
    for kind in ("lora", "full"):  # full last: its step donates the params it is given
        adapters = {} if kind == "full" else dict(lora_rank=RANK, lora_targets=",".join(lora.model_targets(config)))
        hp = trainer.Hyperparameters(steps=1000, batch_size=8, seq_len=256, warmup=10, **adapters)
        tx = trainer.make_optimizer(hp)
        spec = hp.lora_spec
        state = [trainer.init_state(config, tx, mesh, params=None if spec else params, spec=spec)]
        base = () if spec is None else (params,)
        step = trainer.make_train_step(config, tx, hp, mesh, trainer.state_shardings(state[0]),
                                       *(trainer.state_shardings(b) for b in base)).lower(
            state[0], batch, *base).compile()
        memory[kind] = aot.memory_report(kind, step).total
        if spec is not None:
            n_adapter = sum(x.size for x in jax.tree_util.tree_leaves(state[0].params))

        def our_step(step=step, state=state, base=base):
            state[0], metrics = step(state[0], batch, *base)
            jax.block_until_ready(metrics["loss"])
        times[kind] = timed(our_step, reps=reps)
    return times, memory, n_adapter


def _hf(config, model, batch, reps: int):
    import peft
    import torch

    from mistral_jax.training import lora

    model.config._attn_implementation = "sdpa"
    batch = torch.from_numpy(batch).long()
    times = {"full": timed(hf_train_step(model.train(), batch), reps=reps)}
    modules = [lora.PEFT_NAMES[target].split(".")[-1] for target in lora.model_targets(config)]
    adapted = peft.get_peft_model(model, peft.LoraConfig(r=RANK, lora_alpha=RANK, lora_dropout=0.0,
                                                         target_modules=modules)).train()
    times["lora"] = timed(hf_train_step(adapted, batch), reps=reps)
    return times, {}, sum(p.numel() for p in adapted.parameters() if p.requires_grad)
