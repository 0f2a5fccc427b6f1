"""What every benchmark shares: the reference configs, timing that discards repetitions
disturbed by other processes, the machine's measured limits, HF models to compare with."""

from __future__ import annotations

import dataclasses
import os
import statistics
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from mistral_jax.model.config import LatentAttention, MistralConfig, MoE  # noqa: E402
from mistral_jax.model.presets import PIXTRAL  # noqa: E402

CONFIGS = {
    "tiny": MistralConfig(dim=256, n_layers=8, head_dim=32, hidden_dim=768, n_heads=8, n_kv_heads=2,
                          vocab_size=32000, sliding_window=256, max_seq_len=4096),
    "small": MistralConfig(dim=768, n_layers=12, head_dim=64, hidden_dim=2048, n_heads=12, n_kv_heads=4,
                           vocab_size=32000, sliding_window=512, max_seq_len=4096),
    "default": MistralConfig.preset("mistral-15m"),  # what train.py trains by default
}
# Mixtral-shaped: small's dims with 8 experts, top-2 (bench/experts.py); and the dense model
# with as many parameters active per token (F = 2 x 2048; less the router's D x E).
CONFIGS["small-moe"] = CONFIGS["small"].replace(moe=MoE(8, 2, router_aux_loss_coef=0.02))
CONFIGS["small-active"] = CONFIGS["small"].replace(hidden_dim=2 * CONFIGS["small"].hidden_dim)
# Mistral Small 4 with its attention as it is (32 heads of latent attention, kv_lora_rank 256,
# its YaRN and query scale) and the rest scaled down: 4 layers of width 1024, 32 experts of
# 512 (4 routed, 1 shared), a low-rank query of 256 (bench/latent.py).
# The small model behind the released Pixtral tower's width (1024, 16 heads, patches of 14) cut
# to 4 of its 24 layers (bench/vision.py).
CONFIGS["small-vision"] = CONFIGS["small"].replace(vision=dataclasses.replace(PIXTRAL, n_layers=4))
CONFIGS["small-latent"] = MistralConfig.preset(
    "mistral-small-4", dim=1024, n_layers=4, hidden_dim=3072, vocab_size=32000, max_seq_len=8192,
    mla=LatentAttention(256, 64, 64, 128, q_lora_rank=256), moe=MoE(32, 4, hidden_dim=512, n_shared_experts=1))


def _busy_jiffies() -> tuple[int, int]:
    """(busy jiffies of the whole machine, jiffies of this process and its waited-for children)."""
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    busy = sum(fields) - fields[3] - fields[4]  # minus idle and iowait
    with open("/proc/self/stat") as f:
        own = f.read().rsplit(")", 1)[1].split()
    return busy, sum(int(x) for x in own[11:15])  # utime stime cutime cstime


def timed(fn, reps: int = 5, warmup: int = 1, max_foreign: float = 0.05, max_tries: int = 4) -> float:
    """Median seconds of fn() over reps repetitions after warm-up. A repetition during which
    other processes used more than max_foreign of the machine's CPU time is rerun (up to
    max_tries times each), since these machines are shared."""
    for _ in range(warmup):
        fn()
    cores = os.cpu_count() or 1
    hz = os.sysconf("SC_CLK_TCK")
    times = []
    for _ in range(reps):
        for attempt in range(max_tries):
            busy0, own0 = _busy_jiffies()
            start = time.perf_counter()
            fn()
            seconds = time.perf_counter() - start
            busy1, own1 = _busy_jiffies()
            foreign = max(0, (busy1 - busy0) - (own1 - own0)) / hz
            if foreign <= max(2 / hz, max_foreign * seconds * cores) or attempt == max_tries - 1:  # jiffy noise
                break
            print(f"  (a repetition was disturbed: {foreign:.2f} CPU-s by other processes; rerun)", file=sys.stderr)
        times.append(seconds)
    return statistics.median(times)


def matmul_peak_flops() -> float:
    """Sustained float32 GEMM FLOP/s: best of a few square and rectangular shapes (XLA), each
    the median of 5 undisturbed runs."""
    from mistral_jax.training.metrics import measure_peak_flops

    return measure_peak_flops(((2048, 2048, 2048), (4096, 1024, 4096), (1024, 4096, 1024)),
                              timer=lambda fn: timed(fn, reps=5))


def hf_train_step(model, batch, aux_loss_coef: float = 0.0):
    """One training step of an HF causal LM as its users write it, as a function of no
    arguments: the cross-entropy of batch [B, T+1] (plus, with aux_loss_coef, the router's
    load-balancing loss times it), then hf_optimizer_step over the parameters that require
    gradients (all of them, or PEFT's adapters)."""
    import torch

    router = dict(output_router_logits=True) if aux_loss_coef else {}

    def loss_of():
        out = model(batch[:, :-1], use_cache=False, **router)
        logits = out.logits
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1))
        return loss + aux_loss_coef * out.aux_loss if aux_loss_coef else loss
    return hf_optimizer_step([p for p in model.parameters() if p.requires_grad], loss_of)


def hf_optimizer_step(trained, loss_of):
    """A function of no arguments: loss_of() backward, global-norm clipping at 1.0 and a torch
    AdamW step (β 0.9/0.95, weight decay 0.1) over trained; it returns the loss."""
    import torch

    optimizer = torch.optim.AdamW(trained, lr=1e-4, betas=(0.9, 0.95), weight_decay=0.1)

    def step():
        loss = loss_of()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trained, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss
    return step


def our_train_step_seconds(config: MistralConfig, params, batch, reps: int) -> float:
    """Median seconds of our full train step (trainer.make_train_step, AdamW, one device) on
    batch [B, T+1] from params, as train.py runs it: hf_train_step's counterpart. The step
    donates the params it is given: call it last on them."""
    import jax
    import jax.numpy as jnp

    from mistral_jax.runtime.sharding import make_mesh
    from mistral_jax.training import trainer

    B, T = batch.shape[0], batch.shape[1] - 1
    hp = trainer.Hyperparameters(steps=1000, batch_size=B, seq_len=T, warmup=10)
    tx = trainer.make_optimizer(hp)
    mesh = make_mesh("", jax.devices()[:1])
    state = [trainer.init_state(config, tx, mesh, params=params)]
    step = trainer.make_train_step(config, tx, hp, mesh, trainer.state_shardings(state[0]))
    batch = jnp.asarray(batch)

    def our_step():
        state[0], metrics = step(state[0], batch)
        jax.block_until_ready(metrics["loss"])
    return timed(our_step, reps=reps)


def memory_bandwidth() -> float:
    """Streaming bytes/s of a fused triad a = b + s * c over 3 x 256 MiB, into a reused output.

    (torch's multithreaded kernel: a jitted JAX triad allocates a fresh 256 MiB output per
    call and measures page faults instead, ~2 GB/s here.)"""
    import torch

    n = 64 * 2**20
    a, b, c = torch.empty(n), torch.ones(n), torch.full((n,), 2.0)
    seconds = timed(lambda: torch.add(b, c, alpha=3.0, out=a), reps=7)
    return 3 * 4 * n / seconds


def hf_forward_seconds(model, config: MistralConfig, reps: int) -> float:
    """Median seconds of an HF model's forward over a random [8, 512] batch, no cache, sdpa
    attention (which the model is switched to)."""
    import numpy as np
    import torch

    model.config._attn_implementation = "sdpa"
    tokens = torch.from_numpy(np.random.default_rng(0).integers(0, config.vocab_size, (8, 512))).long()

    def forward():
        with torch.no_grad():
            model(tokens, use_cache=False)
    return timed(forward, reps=reps)


def random_hf_model(config: MistralConfig, seed: int = 0):
    """transformers' model of config (MistralForCausalLM, MixtralForCausalLM with experts,
    Mistral4ForCausalLM with latent attention, Mistral3ForConditionalGeneration with a vision
    encoder, ...) with default random init, and the same weights as our (config, params)."""
    import tempfile

    import torch

    from mistral_jax.checkpoints.convert import load_pytorch
    from mistral_jax.checkpoints.verify import hf_model_class

    torch.manual_seed(seed)
    hf_config, model_class = hf_model_class(config, "sdpa")  # what transformers runs by default
    model = model_class(hf_config).eval()
    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(tmp)
        ours = load_pytorch(tmp, "float32")
    return model, ours
