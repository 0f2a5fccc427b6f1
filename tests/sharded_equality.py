"""Run under XLA_FLAGS=--xla_force_host_platform_device_count=8 by test_sharding.py: the
forward pass, one train step (with the XLA and the splash attention kernels) and generate
(decoding per layer, as on CPU, and over the stacked layers, as on TPU and GPU) under several
meshes against one device.
Prints one JSON line of findings; the test asserts on them."""

import json

import jax
import jax.numpy as jnp
import numpy as np

from mistral_jax import platforms, trainer
from mistral_jax.config import MistralConfig
from mistral_jax.model import Mistral, unstack_layers
from mistral_jax.sampling import Sampler, generate, start
from mistral_jax.sharding import batch_sharding, make_mesh

jax.config.update("jax_numpy_rank_promotion", "raise")
assert jax.device_count() == 8, jax.devices()

# Layers alternate full attention and a window of 8 (Ministral's two kinds of layer).
CONFIG = MistralConfig(dim=64, n_layers=4, head_dim=16, hidden_dim=128, n_heads=8, n_kv_heads=2, vocab_size=256,
                       sliding_window=(None, 8), max_seq_len=128)
HP = trainer.Hyperparameters(steps=10, batch_size=8, seq_len=24, lr=1e-2, warmup=1)
rng = np.random.default_rng(0)
BATCH = rng.integers(0, 256, (8, 25)).astype(np.int32)
PROMPTS = [rng.integers(3, 256, n).tolist() for n in (3, 11, 20, 6)]


def run(mesh):
    tx = trainer.make_optimizer(HP)
    state = trainer.init_state(CONFIG, tx, mesh, seed=0)
    params = jax.tree_util.tree_map(np.asarray, state.params)
    forward = jax.jit(lambda p, t: Mistral(CONFIG).apply({"params": p}, t))
    logits = np.asarray(forward(state.params, jax.device_put(BATCH[:, :-1], batch_sharding(mesh))))
    wq = state.params["layers"]["attention"]["wq"]
    split = {"devices": len(wq.sharding.device_set), "shard": list(wq.addressable_shards[0].data.shape),
             "global": list(wq.shape)}
    tokens = generate(CONFIG, state.params, PROMPTS, 12, eos_id=None, mesh=mesh)  # per layer, as on CPU
    decode_per_layer, platforms.decode_per_layer = platforms.decode_per_layer, lambda platform: False
    split["stacked_tokens_equal"] = generate(CONFIG, state.params, PROMPTS, 12, eos_id=None, mesh=mesh) == tokens
    platforms.decode_per_layer = decode_per_layer
    cache = start(state.params, CONFIG, np.zeros((4, 8), np.int32), np.full(4, 8, np.int32), jax.random.key(0),
                  sampler=Sampler(), eos_id=-1, chunk=8, max_tokens=8, mesh=mesh).cache
    split["cache_shard"] = [list(k.addressable_shards[0].data.shape) for k in cache.k]  # per kind
    _, per_layer = unstack_layers(CONFIG, state.params)  # views of each device's shards
    split["per_layer_wq_shard"] = list(per_layer["layers_0"]["attention"]["wq"].addressable_shards[0].data.shape)
    batch = jax.device_put(BATCH, batch_sharding(mesh))
    # The splash kernel (Pallas interpret mode) inside shard_map, from a copy of the state.
    splash_step = trainer.make_train_step(CONFIG.replace(attention="splash"), tx, HP, mesh,
                                          trainer.state_shardings(state))
    splash_state, splash_metrics = splash_step(jax.tree_util.tree_map(jnp.copy, state), batch)
    splash = (jax.device_get(splash_metrics), jax.tree_util.tree_map(np.asarray, splash_state.params))
    step = trainer.make_train_step(CONFIG, tx, HP, mesh, trainer.state_shardings(state))
    state, metrics = step(state, batch)
    return (params, logits, tokens, jax.device_get(metrics), jax.tree_util.tree_map(np.asarray, state.params), split,
            splash)


reference = run(make_mesh("", jax.devices()[:1]))
findings = {}
for spec in ("data=8", "fsdp=8", "data=2,fsdp=2,tensor=2", "fsdp=2,tensor=4"):
    params, logits, tokens, metrics, updated, split, splash = run(make_mesh(spec))
    findings[spec] = {
        "init_max_diff": max(float(np.abs(a - b).max()) for a, b in
                             zip(jax.tree_util.tree_leaves(params), jax.tree_util.tree_leaves(reference[0]))),
        "logits_max_diff": float(np.abs(logits - reference[1]).max()),
        "tokens_equal": tokens == reference[2],
        "loss_diff": abs(float(metrics["loss"]) - float(reference[3]["loss"])),
        "grad_norm_rel_diff": abs(float(metrics["grad_norm"]) / float(reference[3]["grad_norm"]) - 1),
        "updated_max_diff": max(float(np.abs(a - b).max()) for a, b in
                                zip(jax.tree_util.tree_leaves(updated), jax.tree_util.tree_leaves(reference[4]))),
        "splash_loss_diff": abs(float(splash[0]["loss"]) - float(reference[3]["loss"])),
        "splash_updated_max_diff": max(float(np.abs(a - b).max()) for a, b in zip(
            jax.tree_util.tree_leaves(splash[1]), jax.tree_util.tree_leaves(reference[4]))),
        "cache_shard": split.pop("cache_shard"),
        "stacked_tokens_equal": split.pop("stacked_tokens_equal"),
        "per_layer_wq_shard": split.pop("per_layer_wq_shard"),
        "wq": split,
    }
print(json.dumps(findings))
