"""Run under XLA_FLAGS=--xla_force_host_platform_device_count=8 by test_sharding.py: the
forward pass, the gradients (with the XLA and the splash attention kernels; of LoRA adapters; of
packed examples), a train
step (and a LoRA one), and generate
(decoding per layer, as on CPU, and over the stacked layers, as on TPU and GPU) and the
continuous-batching engine (dense models) under several
meshes against one device, and (dense) generate with an image through a vision encoder;
`experts` as argv[1]: a mixture of experts, its experts split
over the `expert` axis (and its train step with the router's losses); `latent`: Mistral Small
4's shape, latent attention and fine-grained experts with a shared one, the first layer dense.
Every model also with its projections quantized (int4 in groups of 32, latent: int8; dense: its generations,
and the LoRA adapters' gradients over the quantized base, QLoRA).
Prints one JSON line of findings; the test asserts on them."""

import dataclasses
import json
import sys

import jax
import numpy as np

from mistral_jax.inference.engine import Engine, Request
from mistral_jax.inference.sampling import Sampler, generate, start
from mistral_jax.model import quantize
from mistral_jax.model.config import LatentAttention, Llama4Scaling, MistralConfig, MoE, Vision, YaRN
from mistral_jax.model.transformer import Mistral, init_params, param_shardings, unstack_layers
from mistral_jax.runtime import platforms
from mistral_jax.runtime.sharding import batch_sharding, make_mesh, under_mesh
from mistral_jax.training import examples, lora, trainer

jax.config.update("jax_numpy_rank_promotion", "raise")
assert jax.device_count() == 8, jax.devices()

EXPERTS, LATENT = sys.argv[1:] in (["experts"], ["latent"]), sys.argv[1:] == ["latent"]
# Layers alternate full attention and a window of 8 (Ministral's two kinds of layer).
CONFIG = MistralConfig(dim=64, n_layers=4, head_dim=16, hidden_dim=128, n_heads=8, n_kv_heads=2, vocab_size=256,
                       sliding_window=(None, 8), max_seq_len=128)
MESHES = ("data=8", "fsdp=8", "data=2,fsdp=2,tensor=2", "fsdp=2,tensor=4")
if EXPERTS:  # 8 experts, top-2, the load-balancing and z-losses in the step
    CONFIG = CONFIG.replace(n_layers=2, moe=MoE(8, 2, router_aux_loss_coef=0.02))
    MESHES = ("expert=8", "fsdp=2,expert=4", "data=2,expert=2,tensor=2", "fsdp=8")
if LATENT:  # 8 experts of 32, top-3, a shared one, after a dense layer; latent attention, YaRN, the query scale
    CONFIG = CONFIG.replace(n_layers=3, sliding_window=None, head_dim=24, n_kv_heads=8,
                            moe=MoE(8, 3, hidden_dim=32, n_shared_experts=1, routed_scaling_factor=1.5,
                                    first_k_dense_replace=1),
                            mla=LatentAttention(32, 16, 8, 12, q_lora_rank=48),
                            yarn=YaRN(8.0, 8, mscale=1.0, mscale_all_dim=1.0), llama_4_scaling=Llama4Scaling(0.1, 8))
Q = "wq_b" if LATENT else "wq"  # the query projection, whose split the findings report
HP = trainer.Hyperparameters(steps=10, batch_size=8, seq_len=24, lr=1e-2, warmup=1, router_z_loss=1e-3)
rng = np.random.default_rng(0)
BATCH = rng.integers(0, 256, (8, 25)).astype(np.int32)
PROMPTS = [rng.integers(3, 256, n).tolist() for n in (3, 11, 20, 6)]
# A vision encoder before the dense model: an image of 2 x 3 image tokens (4 pixels each) in a prompt.
VISION_CONFIG = CONFIG.replace(vision=Vision(dim=32, hidden_dim=64, n_layers=2, n_heads=2, patch_size=2,
                                             image_size=16))
IMAGE = rng.standard_normal((3, 8, 12)).astype(np.float32)
IMAGE_PROMPT = [1, 5] + [10, 10, 10, 12] + [10, 10, 10, 13] + [7, 8]
# Examples packed into 8 rows of 24 with their loss masks (segment ids, restarting positions).
PACKED = examples.stack([examples.row_arrays(row, 24) for row in examples.pack(
    [examples.Example(rng.integers(0, 256, n).astype(np.int32), rng.random(n) < 0.7)
     for n in rng.integers(4, 20, 21)], 24)][:8])


def image_tokens(mesh):
    """generate's tokens for a prompt with an image beside one without, the params born sharded."""
    params = jax.jit(init_params, static_argnums=0, out_shardings=param_shardings(VISION_CONFIG, mesh))(
        VISION_CONFIG, jax.random.key(3))
    return generate(VISION_CONFIG, params, [IMAGE_PROMPT, PROMPTS[1]], 8, eos_id=None, mesh=mesh,
                    images=[[IMAGE], []])


def engine_tokens(params, mesh):
    engine = Engine(CONFIG, params, slots=2, max_len=40, eos_id=None, mesh=mesh)
    out = [[] for _ in PROMPTS]
    for prompt, tokens in zip(PROMPTS, out):
        engine.submit(Request(prompt, 12, lambda new, finish, tokens=tokens: tokens.extend(new) or True))
    while engine.step():
        pass
    assert engine._state.cache.k[0][0].sharding.mesh == mesh  # the cache stayed on the mesh
    return out


def quantized_findings(params, mesh, batch):
    """The quantized model's logits, and (dense) its generations and QLoRA gradients, the quantized
    weights placed by their logical axes (the scales' too)."""
    quantized = quantize.quantize_params(CONFIG, params, *(("int8", None) if LATENT else ("int4", 32)))
    quantized = jax.device_put(quantized, param_shardings(CONFIG, mesh, quantized))
    forward = jax.jit(lambda p, t: Mistral(CONFIG).apply({"params": p}, t))
    found = {"logits": np.asarray(forward(quantized, jax.device_put(BATCH[:, :-1], batch_sharding(mesh))))}
    wo = quantized["layers"]["attention"]["wo"]
    found["wo_shards"] = [list(wo[part].addressable_shards[0].data.shape) for part in ("q", "scale")]
    if not EXPERTS:
        found["tokens"] = generate(CONFIG, quantized, PROMPTS, 12, eos_id=None, mesh=mesh)
        found["grads"] = lora_findings(mesh, quantized, batch)[0]
    return found


def run(mesh):
    tx = trainer.make_optimizer(HP)
    state = trainer.init_state(CONFIG, tx, mesh, seed=0)
    params = jax.tree_util.tree_map(np.asarray, state.params)
    forward = jax.jit(lambda p, t: Mistral(CONFIG).apply({"params": p}, t))
    logits = np.asarray(forward(state.params, jax.device_put(BATCH[:, :-1], batch_sharding(mesh))))
    wq = state.params["layers"]["attention"][Q]
    split = {"devices": len(wq.sharding.device_set), "shard": list(wq.addressable_shards[0].data.shape),
             "global": list(wq.shape)}
    if EXPERTS:
        w1 = state.params["layers"]["feed_forward"]["w1"]
        split["w1_shard"] = list(w1.addressable_shards[0].data.shape)
    tokens = generate(CONFIG, state.params, PROMPTS, 12, eos_id=None, mesh=mesh)  # per layer, as on CPU
    if not EXPERTS:  # serve.py --mesh: 4 requests through 2 slots of the sharded engine
        split["engine_tokens_equal"] = engine_tokens(state.params, mesh) == tokens
    if not EXPERTS and not LATENT:
        split["image_tokens"] = image_tokens(mesh)
    if not EXPERTS:  # (the experts' stacked decode is tested on one device: test_experts.py)
        decode_per_layer, platforms.decode_per_layer = platforms.decode_per_layer, lambda platform: False
        split["stacked_tokens_equal"] = generate(CONFIG, state.params, PROMPTS, 12, eos_id=None, mesh=mesh) == tokens
        platforms.decode_per_layer = decode_per_layer
    cache = start(state.params, CONFIG, np.zeros((4, 8), np.int32), np.full(4, 8, np.int32), jax.random.key(0),
                  sampler=Sampler(), eos_id=-1, chunk=8, max_tokens=8, mesh=mesh).cache
    split["cache_shard"] = [list(k.addressable_shards[0].data.shape) for k in cache.k]  # per kind
    _, per_layer = unstack_layers(CONFIG, state.params)  # views of each device's shards
    last = CONFIG.n_layers - 1  # of the last stack (latent: the first layer is dense_layers')
    split["per_layer_wq_shard"] = list(per_layer[f"layers_{last}"]["attention"][Q].addressable_shards[0].data.shape)
    batch = jax.device_put(BATCH, batch_sharding(mesh))
    grads = {"xla": gradients(CONFIG, mesh, state.params, batch)}
    packed = jax.device_put(PACKED, batch_sharding(mesh))
    grads["packed"] = gradients(CONFIG, mesh, state.params, packed)  # segment ids through the window's blocks
    if not EXPERTS:  # the splash kernel (Pallas interpret mode) inside shard_map, its segment ids too
        grads["splash"] = gradients(CONFIG.replace(attention="splash"), mesh, state.params, batch)
        grads["packed_splash"] = gradients(CONFIG.replace(attention="splash"), mesh, state.params, packed)
    if not EXPERTS:
        grads["lora"], metrics_lora = lora_findings(mesh, state.params, batch)
    split["quantized"] = quantized_findings(state.params, mesh, batch)
    if "grads" in split["quantized"]:
        grads["qlora"] = split["quantized"].pop("grads")
    step = trainer.make_train_step(CONFIG, tx, HP, mesh, trainer.state_shardings(state))
    state, metrics = step(state, batch)
    if not EXPERTS:
        metrics["lora_loss"] = metrics_lora["loss"]
    return params, logits, tokens, jax.device_get(metrics), grads, split


LORA_HP = dataclasses.replace(HP, lora_rank=4, lora_targets=",".join(lora.model_targets(CONFIG)))


def lora_findings(mesh, base, batch):
    """LoRA on every projection of each layer over the frozen base: the adapters' gradients at random
    adapters (b not zero, so every path of the low-rank product carries gradient), and a
    train step's loss from fresh ones."""
    spec = LORA_HP.lora_spec
    tx = trainer.make_optimizer(LORA_HP)
    state = trainer.init_state(CONFIG, tx, mesh, seed=1, spec=spec)
    shardings = trainer.state_shardings(state)
    # Random and small: shifting every entry by 0.1 made the activations so large and coherent
    # that float32 rounding alone moved the gradients by 2e-3 (relative) on every mesh.
    keys = iter(jax.random.split(jax.random.key(2), 100))
    adapters = jax.tree_util.tree_map(lambda x, s: jax.device_put(x + 0.05 * jax.random.normal(next(keys), x.shape), s),
                                      state.params, shardings.params)

    def grad(adapters, base, batch):
        return jax.grad(lambda a: trainer.loss_fn(base, CONFIG, batch, 0.0, 128, adapters=a, spec=spec)[0])(adapters)

    grads = jax.tree_util.tree_map(np.asarray, jax.jit(under_mesh(mesh)(grad))(adapters, base, batch))
    step = trainer.make_train_step(CONFIG, tx, LORA_HP, mesh, shardings, trainer.state_shardings(base))
    _, metrics = step(state, batch, base)
    return grads, jax.device_get(metrics)


def gradients(config, mesh, params, batch):
    """The train step's gradients (the loss's, with the router's losses), as numpy arrays."""
    def grad(params, batch):
        return jax.grad(lambda p: trainer.loss_fn(p, config, batch, 0.0, 128, *trainer.router_weights(config, HP))[0])(
            params)

    return jax.tree_util.tree_map(np.asarray, jax.jit(under_mesh(mesh)(grad))(params, batch))


def max_rel_diff(tree, reference):
    return max(float(np.abs(a - b).max() / np.abs(b).max())
               for a, b in zip(jax.tree_util.tree_leaves(tree), jax.tree_util.tree_leaves(reference)))


# what one device's they equal
SAME_GRADIENTS = {"lora": "lora", "qlora": "qlora", "packed": "packed", "packed_splash": "packed"}
reference = run(make_mesh("", jax.devices()[:1]))
findings = {}
for spec in MESHES:
    params, logits, tokens, metrics, grads, split = run(make_mesh(spec))
    quantized, quantized_reference = split.pop("quantized"), reference[5]["quantized"]
    findings[spec] = {
        "quantized_logits_max_diff": float(np.abs(quantized["logits"] - quantized_reference["logits"]).max()),
        "quantized_tokens_equal": quantized.get("tokens") == quantized_reference.get("tokens"),
        "quantized_wo_shards": quantized["wo_shards"],
        "init_max_diff": max(float(np.abs(a - b).max()) for a, b in
                             zip(jax.tree_util.tree_leaves(params), jax.tree_util.tree_leaves(reference[0]))),
        "logits_max_diff": float(np.abs(logits - reference[1]).max()),
        "tokens_equal": tokens == reference[2],
        "loss_diff": abs(float(metrics["loss"]) - float(reference[3]["loss"])),
        "grad_norm_rel_diff": abs(float(metrics["grad_norm"]) / float(reference[3]["grad_norm"]) - 1),
        "grads_max_rel_diff": {kernel: max_rel_diff(g, reference[4][SAME_GRADIENTS.get(kernel, "xla")])
                               for kernel, g in grads.items()},
        "lora_loss_diff": abs(float(metrics.get("lora_loss", 0)) - float(reference[3].get("lora_loss", 0))),
        "aux_loss_diff": abs(float(metrics.get("aux_loss", 0)) - float(reference[3].get("aux_loss", 0))),
        "aux_loss": float(metrics.get("aux_loss", 0)),
        "cache_shard": split.pop("cache_shard"),
        "stacked_tokens_equal": split.pop("stacked_tokens_equal", None),
        "engine_tokens_equal": split.pop("engine_tokens_equal", None),
        "image_tokens_equal": split.pop("image_tokens", None) == reference[5].get("image_tokens"),
        "per_layer_wq_shard": split.pop("per_layer_wq_shard"),
        "wq": split,
    }

print(json.dumps(findings))
