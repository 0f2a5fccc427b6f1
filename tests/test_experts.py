"""Mixtral's experts against transformers' MixtralForCausalLM (strong random weights, the
router's too): logits with top-1, top-2 and top-3, with and without a sliding window, over
several seeds; the native layout; the auxiliary losses and the gradients of the training
loss; greedy generation and the cache; conversion both ways and --verify; planted bugs;
the presets' shapes; training (accumulation, resume, train.py)."""

import copy
import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from safetensors.torch import load_file

from conftest import MIXTRAL, WINDOW, build_reference, forward
from mistral_jax.checkpoints.convert import load_pytorch
from mistral_jax.inference.sampling import generate
from mistral_jax.model import moe
from mistral_jax.model.config import MistralConfig, MoE
from mistral_jax.model.transformer import Mistral
from mistral_jax.runtime.sharding import make_mesh
from mistral_jax.training import data, trainer
from test_parity import TOL, max_diff, write_native
from test_sampling import decoding, hf_greedy, in_layout, logits_by_chunks, prompts_of  # noqa: F401 (a fixture)
from test_family import assert_hf_round_trip
from test_train import TINY, StopAt, assert_exported_model_equals_hf, hp, losses, run_train, tokenizer_path, tokens  # noqa: F401,E501

NEW = 3 * WINDOW + 7


@pytest.fixture(scope="module")
def mixtral(ref_mixtral):
    config, params = load_pytorch(ref_mixtral.dir)
    return ref_mixtral, config, params


def test_config_and_params_hold_the_experts(mixtral):
    _, config, params = mixtral
    assert config.moe == MoE(4, 2, router_aux_loss_coef=0.001)
    assert config.sliding_window == WINDOW
    ffn = params["layers"]["feed_forward"]
    assert ffn["gate"].shape == (2, 64, 4) and ffn["w1"].shape == ffn["w3"].shape == (2, 4, 64, 96)
    assert ffn["w2"].shape == (2, 4, 96, 64)


@pytest.mark.parametrize("kernel,layout", [("tiles", "stacked"), ("ragged_dot", "stacked"), ("tiles", "per_layer")])
def test_logits_equal_hf(mixtral, kernel, layout):
    """Both grouped matmuls (the scan over tiles; XLA's ragged_dot, dense but exact on CPU),
    both layer layouts, on prefixes up to 4W + 5."""
    ref, config, params = mixtral
    config, params = in_layout(config.replace(expert_kernel=kernel), params, layout)
    for length in (ref.tokens.shape[1], 2 * WINDOW + 1, WINDOW - 1):
        assert max_diff(config, params, ref, length) < TOL, length


@pytest.mark.parametrize("seed,experts,k,window", [(5, 8, 1, None), (6, 8, 2, WINDOW), (7, 4, 1, WINDOW),
                                                   (8, 8, 3, None)])
def test_logits_equal_hf_across_seeds_and_k(tmp_path, seed, experts, k, window):
    ref = build_reference(tmp_path, seed=seed, window=window, kind="Mixtral", seq_len=3 * WINDOW + 4,
                          num_local_experts=experts, num_experts_per_tok=k, **MIXTRAL)
    config, params = load_pytorch(ref.dir)
    assert (config.moe.n_experts, config.moe.n_experts_per_tok, config.sliding_window) == (experts, k, window)
    assert max_diff(config, params, ref) < TOL


def test_native_layout(mixtral, tmp_path):
    ref, config, params = mixtral
    write_native(ref, tmp_path, "safetensors")
    names = load_file(tmp_path / "consolidated.safetensors").keys()
    assert {"layers.1.feed_forward.gate.weight", "layers.1.feed_forward.experts.3.w2.weight"} <= names
    assert json.loads((tmp_path / "params.json").read_text())["moe"] == {"num_experts": 4, "num_experts_per_tok": 2}
    native_config, native = load_pytorch(str(tmp_path))
    assert native_config == config.replace(max_seq_len=native_config.max_seq_len, moe=MoE(4, 2))
    for a, b in zip(jax.tree_util.tree_leaves(native), jax.tree_util.tree_leaves(params)):
        np.testing.assert_array_equal(a, b)
    assert max_diff(native_config, native, ref) < TOL


def test_oracle_catches_planted_bugs(mixtral, monkeypatch):
    """Top-1 for top-2, and weights not renormalised over the k, each fail by far."""
    ref, config, params = mixtral
    assert max_diff(config.replace(moe=MoE(4, 1)), params, ref) > 100 * TOL
    route = moe.route

    def unnormalised(x, gate, k):
        _, experts, stats = route(x, gate, k)
        probs = jax.nn.softmax(jnp.einsum("ND,DE->NE", x, gate, preferred_element_type=jnp.float32), axis=-1)
        return jnp.take_along_axis(probs, experts, axis=1), experts, stats

    monkeypatch.setattr(moe, "route", unnormalised)
    logits = np.asarray(Mistral(config).apply({"params": params}, ref.tokens))  # traced afresh, not jit's cache
    assert np.abs(logits - ref.logits).max() > 100 * TOL


def test_routing_equals_mistral_inference(mixtral):
    """Renormalised top-k probabilities are mistral-inference's softmax over the top-k logits."""
    _, _, params = mixtral
    x = jax.random.normal(jax.random.key(0), (50, 64))
    gate = params["layers"]["feed_forward"]["gate"][0]
    weights, experts, _ = moe.route(x, gate, 2)
    logits = x @ gate
    top_logits, top_experts = jax.lax.top_k(logits, 2)
    np.testing.assert_array_equal(experts, top_experts)
    np.testing.assert_allclose(weights, jax.nn.softmax(top_logits, axis=-1), rtol=1e-6, atol=1e-7)


def test_auxiliary_losses_equal_hf(mixtral):
    """The load-balancing loss is HF's aux_loss (load_balancing_loss_func over every layer's
    router logits); the z-loss the mean logsumexp^2 of those logits."""
    ref, config, params = mixtral
    with torch.no_grad():
        out = ref.model(torch.tensor(ref.tokens), output_router_logits=True)
    router_logits = torch.cat(out.router_logits)
    hf_z = (torch.logsumexp(router_logits.float(), dim=-1) ** 2).mean().item()
    _, sown = Mistral(config).apply({"params": params}, ref.tokens, mutable=["router"])
    (stats,) = sown["router"]["stats"]
    assert float(stats.tokens) == router_logits.shape[0] == config.n_layers * ref.tokens.size
    assert abs(float(stats.load_balancing_loss()) - out.aux_loss.item()) < 1e-6 * out.aux_loss.item()
    assert abs(float(stats.z_loss()) - hf_z) < 1e-5 * hf_z


@pytest.fixture(scope="module")
def hf_training_loss(ref_mixtral, tmp_path_factory):
    """(loss, ce, aux, gradients as our params) of HF's autograd: ce + 0.1 * aux + 0.01 * z,
    the gradients written as a checkpoint and read back by our converter."""
    model = copy.deepcopy(ref_mixtral.model)
    tokens = torch.from_numpy(ref_mixtral.tokens).long()
    out = model(tokens[:, :-1], output_router_logits=True)
    logits = out.logits.float()
    ce = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), tokens[:, 1:].reshape(-1))
    z = (torch.logsumexp(torch.cat(out.router_logits).float(), dim=-1) ** 2).mean()
    loss = ce + 0.1 * out.aux_loss + 0.01 * z
    loss.backward()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(p.grad)
    directory = tmp_path_factory.mktemp("mixtral_grads")
    model.save_pretrained(directory)
    return loss.item(), ce.item(), out.aux_loss.item(), load_pytorch(str(directory))[1]


def test_training_loss_and_gradients_equal_hf(mixtral, hf_training_loss):
    """trainer.loss_fn with the router's losses: the loss, its parts, and every gradient
    (the router's too) as HF's autograd has them."""
    ref, config, params = mixtral
    grad_fn = jax.jit(jax.value_and_grad(trainer.loss_fn, has_aux=True), static_argnums=(1, 3, 4, 5, 6))
    (loss, metrics), grads = grad_fn(params, config, ref.tokens, 0.0, 128, 0.1, 0.01)
    hf_loss, hf_ce, hf_aux, hf_grads = hf_training_loss
    assert abs(float(loss) - hf_loss) < 1e-5 * hf_loss and abs(float(metrics["ce"]) - hf_ce) < 1e-5 * hf_ce
    assert abs(float(metrics["aux_loss"]) - hf_aux) < 1e-5 * hf_aux
    hf_flat = dict(jax.tree_util.tree_flatten_with_path(hf_grads)[0])
    for path, g in jax.tree_util.tree_flatten_with_path(grads)[0]:
        hf_g = np.asarray(hf_flat[path])
        assert np.abs(np.asarray(g) - hf_g).max() < 1e-4 * np.abs(hf_g).max(), jax.tree_util.keystr(path)
    assert np.abs(np.asarray(grads["layers"]["feed_forward"]["gate"])).max() > 0


def test_greedy_equals_hf_generate(mixtral, decoding):
    """A ragged batch, prompts shorter and longer than the window, in one call."""
    ref, config, params = mixtral
    prompts = prompts_of([5, WINDOW - 1, WINDOW, 2 * WINDOW + 3], config.vocab_size)
    ours = generate(config, params, prompts, NEW, eos_id=None)
    for prompt, tokens in zip(prompts, ours):
        assert tokens == hf_greedy(ref.model, prompt, NEW)


@pytest.mark.parametrize("chunk", [1, 5, WINDOW])
def test_cached_logits_equal_full_forward(mixtral, chunk):
    """Decode (one token per row: a few rows per expert) and prefill chunks straddling the
    cache's wrap take the same dispatch and give a full forward's logits."""
    ref, config, params = mixtral
    cached, _ = logits_by_chunks(config, params, ref.tokens, chunk)
    np.testing.assert_allclose(cached, np.asarray(forward(config, params, ref.tokens)), atol=TOL)
    np.testing.assert_allclose(cached, ref.logits, atol=TOL)


def test_hf_jax_hf_round_trip_and_verify(ref_mixtral, tmp_path, capsys):
    exported = assert_hf_round_trip(ref_mixtral, tmp_path, capsys, transformers.MixtralForCausalLM)
    assert (exported["model_type"], exported["num_local_experts"], exported["num_experts_per_tok"]) == ("mixtral", 4, 2)


# Parameter counts as the model cards round them (billions): total, active per token.
PUBLISHED = {"mixtral-8x7b-v0.1": (46.7, 12.9), "mixtral-8x22b-v0.1": (141, 39), "mixtral-8x22b-v0.3": (141, 39)}


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_preset_shapes_equal_transformers_models(name):
    config = MistralConfig.preset(name)
    hf = config.to_hf_dict()
    with torch.device("meta"):
        model = transformers.MixtralForCausalLM(transformers.MixtralConfig(**hf))
    assert config.num_params == sum(p.numel() for p in model.parameters())
    total, active = PUBLISHED[name]
    digits = 1 if total < 100 else 0
    assert round(config.num_params / 1e9, digits) == total and round(config.active_params / 1e9, digits) == active
    assert MistralConfig.from_hf_dict(hf) == config
    native = MistralConfig.from_params_dict(config.to_params_dict())
    assert native == config.replace(max_seq_len=native.max_seq_len,
                                   moe=dataclasses.replace(config.moe, router_aux_loss_coef=0.0))


# ---- training ---------------------------------------------------------------------------------

TINY_MOE = TINY.replace(moe=MoE(4, 2, router_aux_loss_coef=0.02))


def test_grad_accumulation_averages_the_micro_batches(tokens):
    """With experts the load-balancing loss is a product of means, so, as in HF's training,
    each micro-batch has its own: the accumulated step is the mean of the micro-batches'
    losses and gradients (computed here one by one)."""
    mesh = make_mesh("")
    batch = jnp.asarray(data.TokenBatches(tokens, 32, 8).batch(0))
    h = hp(grad_accum=4, router_z_loss=1e-3)
    tx = trainer.make_optimizer(h)
    state = trainer.init_state(TINY_MOE, tx, mesh, seed=0)
    params = jax.device_get(state.params)
    step = trainer.make_train_step(TINY_MOE, tx, h, mesh, trainer.state_shardings(state))
    _, metrics = jax.device_get(step(state, batch))
    grad_fn = jax.jit(jax.value_and_grad(trainer.loss_fn, has_aux=True), static_argnums=(1, 3, 4, 5, 6))
    parts = [grad_fn(params, TINY_MOE, batch[i::4], 0.0, h.loss_chunk, 0.02, 1e-3) for i in range(4)]
    loss = np.mean([float(p[0][0]) for p in parts])
    aux = np.mean([float(p[0][1]["aux_loss"]) for p in parts])
    grads = jax.tree_util.tree_map(lambda *g: sum(g) / 4, *[p[1] for p in parts])
    assert abs(metrics["loss"] - loss) < 1e-6 * loss and abs(metrics["aux_loss"] - aux) < 1e-6 * aux
    norm = float(np.sqrt(sum(np.sum(np.square(g)) for g in jax.tree_util.tree_leaves(grads))))
    assert abs(metrics["grad_norm"] - norm) < 1e-5 * norm


def test_training_goes_down_and_resumes_exactly(tokens, tmp_path):
    batches = data.TokenBatches(tokens, 32, 8)
    mesh = make_mesh("")
    kwargs = dict(schedule=trainer.Schedule(log_every=1, eval_every=100, save_every=4), peak_flops=None)
    trainer.fit(TINY_MOE, hp(steps=40), batches, mesh, str(tmp_path / "long"), **kwargs)
    records = [json.loads(line) for line in open(tmp_path / "long" / "metrics.jsonl")]
    for r in records:  # the loss holds the load-balancing loss at the config's coefficient
        assert abs(r["loss"] - (r["ce"] + 0.02 * r["aux_loss"])) < 1e-5 * r["loss"]
    assert np.mean([r["loss"] for r in records[-5:]]) < np.mean([r["loss"] for r in records[:5]]) - 1.0
    trainer.fit(TINY_MOE, hp(), batches, mesh, str(tmp_path / "a"), **kwargs)
    state, interrupted = trainer.fit(TINY_MOE, hp(), StopAt(batches, 6), mesh, str(tmp_path / "b"), **kwargs)
    assert interrupted and int(state.step) == 7
    trainer.fit(TINY_MOE, hp(), batches, mesh, str(tmp_path / "b"), resume=True, **kwargs)
    uninterrupted, resumed = losses(tmp_path / "a"), losses(tmp_path / "b")
    for step in range(8, 13):
        assert resumed[step] == uninterrupted[step], step  # bit-identical


def test_train_py_trains_and_exports_a_mixtral(tmp_path, capsys, monkeypatch):
    """train.py with the router's losses as flags, its metrics, and the final model in
    MixtralForCausalLM."""
    monkeypatch.setenv("MISTRAL_JAX_CACHE", str(tmp_path / "cache"))
    TINY_MOE.save_hf(tmp_path)
    out = tmp_path / "run"
    status, stdout, stderr = run_train(capsys, "--config", tmp_path / "config.json", "--out", out, "--steps", 6,
                                       "--batch-size", 8, "--seq-len", 32, "--log-every", 3, "--eval-every", 6,
                                       "--save-every", 6, "--samples", 0, "--router-aux-loss", 0.05,
                                       "--router-z-loss", 1e-3)
    assert status == 0, stderr
    records = [json.loads(line) for line in open(out / "metrics.jsonl")]
    assert [r["step"] for r in records] == [3, 6]
    for r in records:  # the flags' weights, not the config's 0.02
        assert r["aux_loss"] > 0 and r["router_z_loss"] > 0
        assert abs(r["loss"] - (r["ce"] + 0.05 * r["aux_loss"] + 1e-3 * r["router_z_loss"])) < 1e-5 * r["loss"]
    config = assert_exported_model_equals_hf(out / "model", tmp_path / "hf", transformers.MixtralForCausalLM)
    assert (config.moe.n_experts, config.moe.n_experts_per_tok) == (4, 2)
