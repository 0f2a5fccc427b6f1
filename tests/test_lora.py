"""LoRA adapters: the base unchanged at B = 0, only adapters differentiated, train.py's
adapter/ loaded by HF PEFT onto the --to-hf base, resume, bad flags."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import peft
import pytest
import torch
import transformers

import sample
from conftest import assert_one_line_error, build_reference, forward, run_script
from mistral_jax import Mistral
from mistral_jax.checkpoints.convert import convert_pytorch_checkpoint, export_hf_checkpoint
from mistral_jax.checkpoints.store import load_checkpoint, save_checkpoint
from mistral_jax.model.cache import KVCache
from mistral_jax.model.config import MoE
from mistral_jax.model.transformer import init_params
from mistral_jax.runtime.sharding import make_mesh
from mistral_jax.training import data, lora, metrics, trainer
from test_train import (TINY, StopAt, dot_flops, hp, losses, run_train, tokenizer_path,  # noqa: F401 (fixtures)
                        tokens, write_small_corpus)

DENSE_TARGETS = lora.model_targets(TINY)  # wq, wk, wv, wo, w1, w2, w3
ALL = ",".join(DENSE_TARGETS)


def adapted(config, params, adapters, spec, ids):
    return Mistral(config).apply(lora.variables(params, adapters, spec), ids)


def pairs(adapters):
    """Every adapter's {"a", "b"}, of every stack, module and target."""
    return [pair for modules in adapters.values() for targets in modules.values() for pair in targets.values()]


def random_adapters(config, spec, seed):
    """Adapters with b as strong as a, so every target changes the logits."""
    fresh = lora.init_adapters(config, spec, jax.random.key(seed))
    keys = iter(jax.random.split(jax.random.key(seed + 1), 100))
    return jax.tree_util.tree_map(lambda x: x + 0.3 * jax.random.normal(next(keys), x.shape), fresh)


@pytest.mark.parametrize("window", [16, None])
def test_fresh_adapters_leave_the_model_unchanged_bit_for_bit(window):
    config = TINY.replace(sliding_window=window)
    params = init_params(config, jax.random.key(0))
    ids = jax.random.randint(jax.random.key(1), (2, 40), 0, config.vocab_size)
    spec = lora.LoRA(4, 16.0, DENSE_TARGETS)
    adapters = lora.init_adapters(config, spec, jax.random.key(2))
    assert all(np.any(pair["a"]) and not np.any(pair["b"]) for pair in pairs(adapters))
    np.testing.assert_array_equal(jax.jit(adapted, static_argnums=(0, 3))(config, params, adapters, spec, ids),
                                  forward(config, params, ids))


MODELS = {  # each kind of layer stack, with the targets it takes
    "dense": (TINY, DENSE_TARGETS),
    "per-layer windows": (TINY.replace(sliding_window=(None, 16)), DENSE_TARGETS),
    "experts": (TINY.replace(moe=MoE(4, 2)), None),  # the default: the attention's
}


@pytest.mark.parametrize("model", MODELS)
def test_merged_weights_and_the_cache_compute_the_adapted_model(model):
    """The adapted model's logits: those of its merged weights, and those of prefilling the
    rolling cache chunk by chunk (the sequence 2.5 windows long) with the adapters unmerged."""
    config, targets = MODELS[model]
    params = init_params(config, jax.random.key(0))
    ids = jax.random.randint(jax.random.key(1), (2, 40), 0, config.vocab_size)
    spec = lora.LoRA(4, 8.0, targets)
    adapters = random_adapters(config, spec, 3)
    logits = adapted(config, params, adapters, spec, ids)
    assert np.abs(logits - forward(config, params, ids)).max() > 1.0  # the adapters matter
    np.testing.assert_allclose(forward(config, lora.merge(params, adapters, spec), ids), logits, atol=1e-4)

    cache, chunks = KVCache.init(config, 2, 40), []
    for start in range(0, 40, 8):
        positions = jnp.broadcast_to(jnp.arange(start, start + 8, dtype=jnp.int32), (2, 8))
        chunk, cache = Mistral(config).apply(lora.variables(params, adapters, spec), ids[:, start:start + 8],
                                             positions, cache)
        chunks.append(chunk)
    np.testing.assert_allclose(np.concatenate(chunks, axis=1), logits, atol=1e-4)


def test_only_the_adapters_are_differentiated():
    """The LoRA step's program multiplies by each frozen weight twice (forward, and the gradient
    of its input), never a third time for a gradient of its own: against full training it
    saves exactly those products and adds the adapters' 3x, as metrics.flops_per_token counts
    (both programs also recompute each block's scores in the backward pass, which the count
    leaves out). The optimizer state holds the adapters' moments only; the base is left as it
    was."""
    config = TINY.replace(attention="xla", attention_block=1)  # one-query blocks: exactly the keys seen
    h = hp(batch_size=2, seq_len=32, lora_rank=4, lora_targets=ALL)
    spec, mesh = h.lora_spec, make_mesh("")
    base = init_params(config, jax.random.key(0))
    batch = jax.random.randint(jax.random.key(1), (2, 33), 0, config.vocab_size)
    adapters = lora.init_adapters(config, spec, jax.random.key(2))
    n_adapter = sum(x.size for x in jax.tree_util.tree_leaves(adapters))

    def lora_grad(adapters, base, batch):
        return jax.grad(lambda a: trainer.loss_fn(base, config, batch, 0.0, 32, adapters=a, spec=spec)[0])(adapters)

    def full_grad(params, batch):
        return jax.grad(lambda p: trainer.loss_fn(p, config, batch, 0.0, 32)[0])(params)

    saved = dot_flops(jax.make_jaxpr(full_grad)(base, batch).jaxpr) - dot_flops(
        jax.make_jaxpr(lora_grad)(adapters, base, batch).jaxpr)
    counted = metrics.flops_per_token(config, 32) - metrics.flops_per_token(config, 32, lora_params=n_adapter)
    assert saved == pytest.approx(2 * 32 * counted, rel=1e-9) and saved > 0

    tx = trainer.make_optimizer(h)
    state = trainer.init_state(config, tx, mesh, 0, spec=spec)
    moments = [x.shape for x in jax.tree_util.tree_leaves(state.opt_state) if x.ndim]
    assert sorted(moments) == sorted(2 * [x.shape for x in jax.tree_util.tree_leaves(adapters)])
    step = trainer.make_train_step(config, tx, h, mesh, trainer.state_shardings(state),
                                   trainer.param_shardings(config, mesh))
    before = jax.tree_util.tree_map(np.array, base)
    for _ in range(3):
        state, _ = step(state, batch, base)
    jax.tree_util.tree_map(np.testing.assert_array_equal, jax.tree_util.tree_map(np.asarray, base), before)
    assert all(np.any(pair["b"]) for pair in pairs(state.params))


def test_resume_equals_an_uninterrupted_lora_run(tokens, tmp_path):
    batches = data.TokenBatches(tokens, 32, 8)
    mesh, base = make_mesh(""), init_params(TINY, jax.random.key(7))
    kwargs = dict(schedule=trainer.Schedule(log_every=1, eval_every=100, save_every=4), params=base)
    h = hp(lora_rank=4, lora_alpha=8.0, lora_targets="wq,wv,w2", lr=1e-2)
    whole, _ = trainer.fit(TINY, h, batches, mesh, str(tmp_path / "a"), **kwargs)
    state, interrupted = trainer.fit(TINY, h, StopAt(batches, 6), mesh, str(tmp_path / "b"), **kwargs)
    assert interrupted and int(state.step) == 7
    resumed, _ = trainer.fit(TINY, h, batches, mesh, str(tmp_path / "b"), resume=True, **kwargs)
    uninterrupted, again = losses(tmp_path / "a"), losses(tmp_path / "b")
    assert sorted(again) == list(range(1, 13)) and uninterrupted[12] < uninterrupted[1]
    assert all(again[step] == uninterrupted[step] for step in range(8, 13))  # bit-identical
    jax.tree_util.tree_map(np.testing.assert_array_equal, resumed.params, whole.params)


@pytest.fixture(scope="module")
def hf_base(tmp_path_factory, tokenizer_path):
    """An HF MistralForCausalLM with strong random weights and its conversion: (hf dir, jax dir)."""
    root = tmp_path_factory.mktemp("lora_base")
    build_reference(root / "hf", seed=11, window=16, seq_len=4, hidden_size=32, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2, head_dim=8, intermediate_size=64,
                    vocab_size=512, rope_theta=1e4)
    (root / "hf" / "tokenizer.model").write_bytes(open(tokenizer_path, "rb").read())
    convert_pytorch_checkpoint(str(root / "hf"), str(root / "jax"), "float32")
    return root / "hf", root / "jax"


def test_train_py_lora_against_hf_peft(hf_base, tmp_path, capsys, monkeypatch):
    """train.py --lora-rank on all seven projections: HF PEFT loading adapter/ onto the
    --to-hf export of the base computes our logits, as does model/ (merged); sample.py
    --adapter on the base samples what model/ does. The float32 base is trained on in
    bfloat16 (the default --base-dtype), yet model/ holds it as stored plus the adapters."""
    monkeypatch.setenv("MISTRAL_JAX_CACHE", str(tmp_path / "cache"))
    _, base_dir = hf_base
    write_small_corpus(tmp_path / "notes.txt")
    out = tmp_path / "run"
    flags = ["--init-from", base_dir, "--data", tmp_path / "notes.txt", "--out", out, "--batch-size", 4,
             "--seq-len", 32, "--lora-rank", 4, "--lora-alpha", 8, "--lora-targets", ALL]
    status, stdout, stderr = run_train(capsys, *flags, "--steps", 8, "--lr", 3e-2, "--warmup", 1,
                                       "--log-every", 2, "--eval-every", 4,
                                       "--save-every", 4, "--samples", 1, "--sample-tokens", 8)
    assert status == 0, stderr
    assert "saved" in stdout and "--- " in stdout
    assert json.loads((out / "adapter" / "adapter_config.json").read_text())["target_modules"] == sorted(
        ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])

    export_hf_checkpoint(str(base_dir), str(tmp_path / "hf_base"))
    hf = transformers.MistralForCausalLM.from_pretrained(tmp_path / "hf_base", attn_implementation="eager")
    ids = np.random.default_rng(0).integers(0, 512, (2, 40))
    with torch.no_grad():
        base_logits = hf(torch.tensor(ids)).logits.numpy()
        with_peft = peft.PeftModel.from_pretrained(hf, out / "adapter").eval()
        peft_logits = with_peft(torch.tensor(ids)).logits.numpy()
    assert np.abs(peft_logits - base_logits).max() > 1e-2  # eight steps moved the adapters
    merged_by_peft = with_peft.merge_and_unload().state_dict()  # the float32 base + scale * B @ A
    export_hf_checkpoint(str(out / "model"), str(tmp_path / "hf_model"))
    ours = transformers.MistralForCausalLM.from_pretrained(tmp_path / "hf_model").state_dict()
    assert sorted(ours) == sorted(merged_by_peft)
    for name, weight in merged_by_peft.items():  # a bfloat16-rounded base would be ~1e-3 off
        np.testing.assert_allclose(ours[name].float().numpy(), weight.numpy(), rtol=1e-6, atol=1e-6, err_msg=name)

    config, base = load_checkpoint(str(base_dir))
    spec, adapters = lora.load_peft(str(out / "adapter"), config)
    assert (spec.rank, spec.scale, spec.targets) == (4, 2.0, DENSE_TARGETS)
    np.testing.assert_allclose(np.asarray(adapted(config, base, adapters, spec, ids)), peft_logits, atol=1e-4)
    merged_config, merged = load_checkpoint(str(out / "model"))
    assert {x.dtype for x in jax.tree_util.tree_leaves(merged)} == {jnp.dtype(jnp.float32)}
    np.testing.assert_allclose(np.asarray(forward(merged_config, merged, ids)), peft_logits, atol=1e-4)

    status, from_adapter, stderr = run_script(capsys, sample, "--checkpoint", base_dir, "--adapter", out / "adapter",
                                              "--prompt", "The", "--max-new-tokens", 12)
    assert status == 0, stderr
    status, from_model, stderr = run_script(capsys, sample, "--checkpoint", out / "model", "--prompt", "The",
                                            "--max-new-tokens", 12)
    assert status == 0 and from_adapter == from_model and from_model.strip(), stderr

    # Resuming with other adapters than the run's is refused, naming both.
    status, _, stderr = run_train(capsys, *flags[:-2], "--lora-targets", "wq,wv", "--steps", 10, "--resume")
    assert_one_line_error(status, stderr, r"trains LoRA adapters \(--lora-rank 4 --lora-alpha 8 --lora-targets "
                                          r"wq,wk,wv,wo,w1,w2,w3\), these flags LoRA adapters .*wq,wv\)")


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory, tokenizer_path):
    path = tmp_path_factory.mktemp("tiny") / "ckpt"
    save_checkpoint(str(path), TINY, init_params(TINY, jax.random.key(0)),
                    extra_files={"tokenizer.model": tokenizer_path})
    return path


@pytest.mark.parametrize("argv,message", [
    (["--lora-rank", "0"], "--lora-rank must be a positive integer, got 0"),
    (["--lora-rank", "4", "--lora-targets", "wq,wx"], "--lora-targets must be distinct names among wq, wk, wv, wo, "
                                                      "wq_a, wq_b, wkv_a_with_mqa, wkv_b, w1, w2, w3, got wq,wx"),
    (["--lora-rank", "4", "--lora-targets", "wq,wkv_b"], "--lora-targets wkv_b: not a projection of this model; its "
                                                         "layers have wq, wk, wv, wo, w1, w2, w3"),
    (["--lora-rank", "4", "--lora-targets", "wq,wq"], "--lora-targets must be distinct names"),
    (["--lora-rank", "4", "--lora-alpha", "0"], "--lora-alpha must be a positive number, got 0.0"),
    (["--lora-alpha", "8"], "--lora-alpha needs --lora-rank"),
    (["--lora-targets", "wq"], "--lora-targets needs --lora-rank"),
    (["--no-init", "--lora-rank", "4"], "--lora-rank needs --init-from"),
    (["--base-dtype", "bfloat16"], "--base-dtype is the frozen base's dtype of LoRA"),
])
def test_bad_lora_flags(tiny_checkpoint, tmp_path, capsys, monkeypatch, argv, message):
    monkeypatch.setenv("MISTRAL_JAX_CACHE", str(tmp_path / "cache"))
    init = [] if "--no-init" in argv else ["--init-from", tiny_checkpoint]
    status, stdout, stderr = run_train(capsys, *init, "--out", tmp_path / "run", "--steps", 2, "--batch-size", 8,
                                       "--seq-len", 32, *(a for a in argv if a != "--no-init"))
    assert_one_line_error(status, stderr, message)
    assert "step 1/" not in stdout


def test_experts_take_adapters_on_their_attention_only():
    moe = TINY.replace(moe=MoE(4, 2))
    assert set(lora.abstract_adapters(moe, lora.LoRA(4, targets=("wq", "wo")))["layers"]) == {"attention"}
    with pytest.raises(ValueError, match="w1,w3: a model with experts has no dense feed-forward; its layers have "
                                         "wq, wk, wv, wo"):
        lora.abstract_adapters(moe, lora.LoRA(4, targets=("wq", "w1", "w3")))


def test_bad_adapter_directories(tiny_checkpoint, tmp_path, capsys):
    config = load_checkpoint(str(tiny_checkpoint))[0]
    spec = lora.LoRA(2, targets=("wq", "wo"))
    good = tmp_path / "good"
    lora.save_peft(str(good), config, lora.init_adapters(config, spec, jax.random.key(0)), spec)
    assert lora.load_peft(str(good), config)[0] == lora.LoRA(2, 2, ("wq", "wo"))

    def broken(name, change):
        path = tmp_path / name
        path.mkdir()
        peft_config = json.loads((good / lora.CONFIG_FILE).read_text())
        (path / lora.CONFIG_FILE).write_text(json.dumps(change(peft_config) or peft_config))
        (path / lora.WEIGHTS_FILE).write_bytes((good / lora.WEIGHTS_FILE).read_bytes())
        return path

    cases = [
        (broken("dora", lambda c: c.update(use_dora=True)), "sets use_dora = True: only plain LoRA"),
        (broken("prefix", lambda c: c.update(peft_type="PREFIX_TUNING")), "is not a LoRA adapter"),
        (broken("lm_head", lambda c: c.update(target_modules=["q_proj", "lm_head"])), "target_modules"),
        (broken("rank", lambda c: c.update(r=3)), r"lora_A.weight has shape \[2, 32\], this model's is \[3, 32\]"),
        (broken("fewer", lambda c: c.update(target_modules=["q_proj"])), "holds tensors this model has no place for"),
        (tmp_path / "missing", "has no adapter_config.json"),
    ]
    for path, message in cases:
        status, _, stderr = run_script(capsys, sample, "--checkpoint", tiny_checkpoint, "--adapter", path,
                                       "--prompt", "The")
        assert_one_line_error(status, stderr, message)
