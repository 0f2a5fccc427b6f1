"""Mistral Small 4's latent attention and fine-grained experts (small-latent: its attention as
it is, the rest scaled down) against HF transformers' Mistral4ForCausalLM: forward (8 x 512),
train step (8 x 256), a cached prefill (4 x 1024 and its first token) and the decode step at
batch 4 after 32 and after 1024 tokens of context; and, ours alone, one layer's decode
attention against a latent cache and against the same cache expanded per head (4 x 4096).

Both sides cache the latent alone per token (kv_lora_rank + qk_rope_head_dim values per layer);
HF expands every cached latent into per-head keys and values at each decode step, ours attends
in the latent space with the up-projections absorbed (layers.LatentAttention), so the step's
cost grows with the context by S·(2r + dr) products per head rather than by an expansion of
S·r·(n + dv) and an attention of S·(n + dr + dv). Decode tokens/s counts B tokens per step: the
step time is the difference of two decode lengths over the extra steps, prefill excluded.
"""

from __future__ import annotations

import os

import numpy as np

from bench.common import (CONFIGS, hf_forward_seconds, hf_train_step, our_train_step_seconds, random_hf_model,
                          timed)

BATCH, CONTEXTS, STEPS = 4, (32, 1024), 16
CACHED = 4096  # the decode attention rows' context


def run(bandwidth: float, peak_flops: float, names=("small-latent",), reps: int = 3, side: str = "ours") -> list[dict]:
    del bandwidth, peak_flops
    import torch

    torch.set_num_threads(os.cpu_count())
    rows = []
    for name in names:
        if CONFIGS[name].mla is None:
            raise ValueError(f"the latent suite runs configs with latent attention (small-latent), not {name}")
        hf, (config, params) = random_hf_model(CONFIGS[name])
        times = _ours(config, params, reps) if side == "ours" else _hf(hf, config, reps)
        mla = config.mla
        latent = 4 * (mla.kv_lora_rank + mla.qk_rope_head_dim)
        expanded = 4 * config.n_heads * (mla.qk_head_dim + mla.v_head_dim)
        for workload, tokens in (("forward 8x512", 8 * 512), ("train step 8x256", 8 * 256),
                                 (f"prefill {BATCH}x{CONTEXTS[-1]} + first token", BATCH * CONTEXTS[-1]),
                                 *((f"decode step b{BATCH} at context {c}", BATCH) for c in CONTEXTS)):
            row = dict(workload=f"{workload} {name}", unit="tok/s", **{side: tokens / times[workload]})
            if workload.startswith("decode") and side == "ours":
                row["note"] = (f"ours: step {1e3 * times[workload]:.1f} ms; cache {latent} B/token/layer "
                               f"(expanded: {expanded} B)")
            elif workload.startswith("decode"):
                row["note"] = f"HF: step {1e3 * times[workload]:.1f} ms"
            rows.append(row)
        if side == "ours":  # one layer's decode attention, each cache as it would be held
            step = {form: times[f"attention {form}"] for form in ("latent", "expanded")}
            for form, per_token in (("latent", latent), ("expanded", expanded)):
                rows.append(dict(workload=f"decode attention of one layer b{BATCH} at context {CACHED}, {form} cache "
                                 f"{name}", unit="tok/s", ours=BATCH / step[form],
                                 note=f"ours: {1e3 * step[form]:.2f} ms, {step[form] / step['latent']:.2f}x the latent "
                                      f"form's; cache {BATCH * CACHED * per_token / 2**20:.0f} MiB"))
        del hf, params
    return rows


def _prompts(config, context: int) -> np.ndarray:
    return np.random.default_rng(context).integers(3, config.vocab_size, (BATCH, context)).astype(np.int32)


def _ours(config, params, reps: int) -> dict:
    import jax

    from bench.decode import decode_step_seconds
    from mistral_jax.inference.sampling import generate
    from mistral_jax.model.transformer import Mistral

    times = {}
    tokens = np.random.default_rng(0).integers(0, config.vocab_size, (8, 512)).astype(np.int32)
    forward = jax.jit(lambda p, t: Mistral(config).apply({"params": p}, t))
    times["forward 8x512"] = timed(lambda: forward(params, tokens).block_until_ready(), reps=reps)

    prompts = _prompts(config, CONTEXTS[-1]).tolist()
    times[f"prefill {BATCH}x{CONTEXTS[-1]} + first token"] = timed(
        lambda: generate(config, params, prompts, 1, eos_id=None), reps=reps)
    for context in CONTEXTS:
        times[f"decode step b{BATCH} at context {context}"] = decode_step_seconds(
            config, params, _prompts(config, context), 8 + STEPS, reps)

    times.update(_decode_attention(config, reps))
    batch = np.random.default_rng(1).integers(0, config.vocab_size, (8, 257)).astype(np.int32)
    times["train step 8x256"] = our_train_step_seconds(config, params, batch, reps)  # last: it donates params
    return times


def _decode_attention(config, reps: int) -> dict:
    """Seconds of one layer's attention for one new token per row over CACHED cached tokens:
    against the latent cache (the model's path: the keys' up-projection absorbed into the
    queries, attention.latent_attention, the values' after) and against the cache those latents
    expand to (per-head keys of n + dr and values of dv, attention.masked_attention); random
    float32 values of config's shapes."""
    import jax
    import jax.numpy as jnp

    from mistral_jax.model.attention import latent_attention, masked_attention

    m, H = config.mla, config.n_heads
    r, n, dr, dv = m.kv_lora_rank, m.qk_nope_head_dim, m.qk_rope_head_dim, m.v_head_dim
    keys = iter(jax.random.split(jax.random.key(0), 8))
    normal = lambda *shape: jax.random.normal(next(keys), shape, jnp.float32)  # noqa: E731
    q_nope, q_rope, wkv_b = normal(BATCH, 1, H, n), normal(BATCH, 1, H, dr), normal(r, H, n + dv) * r**-0.5
    latents, rope_keys = normal(BATCH, CACHED, 1, r), normal(BATCH, CACHED, 1, dr)
    kv = jnp.einsum("BSr,rHd->BSHd", latents[:, :, 0], wkv_b)
    k = jnp.concatenate([kv[..., :n], jnp.broadcast_to(rope_keys, (BATCH, CACHED, H, dr))], axis=-1)
    v = kv[..., n:]
    mask = jnp.ones((BATCH, 1, CACHED), bool)

    @jax.jit
    def latent_form(q_nope, q_rope, latents, rope_keys, wkv_b):
        q_latent = jnp.einsum("BTHn,rHn->BTHr", q_nope, wkv_b[..., :n])
        out = latent_attention(q_latent, q_rope, latents, rope_keys, mask, (n + dr) ** -0.5)
        return jnp.einsum("BTHr,rHv->BTHv", out, wkv_b[..., n:])

    @jax.jit
    def expanded_form(q_nope, q_rope, k, v):
        return masked_attention(jnp.concatenate([q_nope, q_rope], axis=-1), k, v, mask)

    latent_out = latent_form(q_nope, q_rope, latents, rope_keys, wkv_b)
    np.testing.assert_allclose(latent_out, expanded_form(q_nope, q_rope, k, v), rtol=1e-4, atol=1e-4)  # one function
    return {"attention latent": timed(lambda: latent_form(q_nope, q_rope, latents, rope_keys, wkv_b)
                                      .block_until_ready(), reps=reps),
            "attention expanded": timed(lambda: expanded_form(q_nope, q_rope, k, v).block_until_ready(), reps=reps)}


def _hf(model, config, reps: int) -> dict:
    import torch

    times = {"forward 8x512": hf_forward_seconds(model, config, reps)}

    def generate(prompts, new):
        with torch.no_grad():
            model.generate(prompts, max_new_tokens=new, min_new_tokens=new, do_sample=False, eos_token_id=None,
                           pad_token_id=0)

    prompts = torch.from_numpy(_prompts(config, CONTEXTS[-1])).long()
    times[f"prefill {BATCH}x{CONTEXTS[-1]} + first token"] = timed(lambda: generate(prompts, 1), reps=reps)
    for context in CONTEXTS:
        prompts = torch.from_numpy(_prompts(config, context)).long()
        times[f"decode step b{BATCH} at context {context}"] = (
            timed(lambda: generate(prompts, 1 + STEPS), reps=reps) - timed(lambda: generate(prompts, 1), reps=reps)
        ) / STEPS

    batch = torch.from_numpy(np.random.default_rng(1).integers(0, config.vocab_size, (8, 257))).long()
    times["train step 8x256"] = timed(hf_train_step(model.train(), batch), reps=reps)
    model.eval()
    return times
