"""Low-bit weights (model/quantize.py): the quantization and its products against NumPy;
quantized models against HF transformers run on the dequantized weights (logits and greedy
text; dense, experts, latent attention); quantizing while loading, converting and sampling;
QLoRA (adapters over a frozen int4 base) against LoRA on the dequantized base and HF PEFT."""

import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import peft
import pytest
import torch
import transformers

import convert_weights
import sample
from conftest import REAL_TOKENIZER, assert_one_line_error, run_script
from mistral_jax import Mistral, generate
from mistral_jax.checkpoints.convert import load_pytorch, save_hf
from mistral_jax.checkpoints.store import load_checkpoint
from mistral_jax.model import quantize
from mistral_jax.model.config import LatentAttention, MistralConfig, MoE
from mistral_jax.model.transformer import abstract_params, init_params
from mistral_jax.runtime import platforms
from mistral_jax.runtime.sharding import make_mesh
from mistral_jax.training import lora, trainer
from test_lora import ALL, pairs
from test_sample_cli import convert_with_tokenizer, hf_greedy_ids
from test_train import hp, run_train, write_small_corpus

TOL = 1e-4  # float32 max abs logit difference, as the float model's parity with HF
# (weight, its input axes) of every projection of the layers, input-major after the layer (and expert) axes
INPUT_AXES = {"wq": 1, "wk": 1, "wv": 1, "wo": 2, "w1": 1, "w2": 1, "w3": 1, "wq_a": 1, "wq_b": 1,
              "wkv_a_with_mqa": 1, "wkv_b": 1}
OUTPUT_AXES = {"wq": 2, "wk": 2, "wv": 2, "wo": 1, "wq_b": 2, "wkv_b": 2}  # the rest: 1


def numpy_quantized(w: np.ndarray, name: str, mode: str, group: int | None):
    """(q, scale) by the formula, in NumPy float32, flat: [lead, In / group, group, Out] and [lead, In / group, Out]."""
    n_in, n_out = INPUT_AXES[name], OUTPUT_AXES.get(name, 1)
    lead = w.shape[:w.ndim - n_in - n_out]
    inputs, outputs = int(np.prod(w.shape[len(lead):len(lead) + n_in])), int(np.prod(w.shape[w.ndim - n_out:]))
    group = group or (inputs if mode == "int8" else 128)
    qmax = np.float32(127 if mode == "int8" else 7)
    blocks = w.astype(np.float32).reshape(-1, inputs // group, group, outputs)
    scale = np.abs(blocks).max(axis=2) / qmax
    safe = np.where(scale == 0, np.float32(1), scale)
    q = np.clip(np.round(blocks / safe[:, :, None]), -qmax, qmax)  # np.round: half to even
    return q, scale


def flat_quantized(leaf, name):
    n_in, n_out = INPUT_AXES[name], OUTPUT_AXES.get(name, 1)
    q, scale = np.asarray(leaf["q"]).astype(np.float32), np.asarray(leaf["scale"])
    inputs = int(np.prod(q.shape[q.ndim - n_in - n_out:q.ndim - n_out]))
    outputs = int(np.prod(q.shape[q.ndim - n_out:]))
    groups = int(np.prod(scale.shape[q.ndim - n_in - n_out:q.ndim - n_out]))
    return q.reshape(-1, groups, inputs // groups, outputs), scale.reshape(-1, groups, outputs)


SMALL = MistralConfig(dim=64, n_layers=2, head_dim=16, hidden_dim=128, n_heads=4, n_kv_heads=2, vocab_size=96,
                      sliding_window=8, max_seq_len=64)


MODELS = {  # (config, the (mode, group)s quantized)
    "dense": (SMALL, [("int8", None), ("int8", 32), ("int4", 32), ("int4", 16)]),
    "experts": (SMALL.replace(moe=MoE(4, 2, hidden_dim=64, n_shared_experts=1)), [("int4", 32)]),
    "latent": (SMALL.replace(n_layers=3, n_kv_heads=4, head_dim=24, sliding_window=None,
                             moe=MoE(4, 2, hidden_dim=32, first_k_dense_replace=1),
                             mla=LatentAttention(32, 16, 8, 16, q_lora_rank=32)), [("int8", None), ("int4", 16)]),
}


@pytest.mark.parametrize("model", MODELS)
def test_quantization_is_the_formula(model):
    """Every projection of the layers (and nothing else) quantized as NumPy computes the formula:
    q and scale exactly, an all-zero channel to q = 0, scale 0."""
    config, schemes = MODELS[model]
    rng = np.random.default_rng(0)
    params = jax.tree_util.tree_map(lambda x: rng.standard_normal(x.shape, np.float32),
                                    nn.unbox(abstract_params(config)))
    params["layers"]["attention"]["wq" if not config.mla else "wq_a"][1, :, 3] = 0.0
    for mode, group in schemes:
        check_quantized(config, params, quantize.quantize_params(config, params, mode, group), mode, group)


def check_quantized(config, params, quantized, mode, group):
    seen = set()
    for path, leaf in jax.tree_util.tree_flatten_with_path(quantized, is_leaf=quantize.is_quantized)[0]:
        keys = [k.key for k in path]
        name = keys[-1]
        if keys[0] in ("layers", "dense_layers") and name in INPUT_AXES:
            float_w = params
            for key in keys:
                float_w = float_w[key]
            q, scale = numpy_quantized(np.asarray(float_w), name, mode, group)
            got_q, got_scale = flat_quantized(leaf, name)
            np.testing.assert_array_equal(got_q, q, err_msg="/".join(keys))
            np.testing.assert_array_equal(got_scale, scale, err_msg="/".join(keys))
            assert jnp.dtype(leaf["q"].dtype).name == mode and leaf["scale"].dtype == jnp.float32
            seen.add(name)
        else:
            assert not quantize.is_quantized(leaf) and jnp.issubdtype(leaf.dtype, jnp.floating), keys
    expected = {"wq_a", "wq_b", "wkv_a_with_mqa", "wkv_b", "wo"} if config.mla else {"wq", "wk", "wv", "wo"}
    assert seen == expected | {"w1", "w2", "w3"}


def test_rounding_is_half_to_even_and_a_group_that_does_not_tile_is_refused():
    w = np.zeros((1, 8, 16), np.float32)
    w[0, :, 0] = [7.0, 2.5, 3.5, -2.5, -0.5, 0.5, 1.5, 6.5]  # scale max / 7 = 1: q = w rounded
    q = quantize.quantize_params(SMALL.replace(dim=8, hidden_dim=16), {"layers": {"feed_forward": {"w1": w}}},
                                 "int4", 8)["layers"]["feed_forward"]["w1"]["q"]
    np.testing.assert_array_equal(np.asarray(q[0, :, 0]).astype(np.int8), [7, 2, 4, -2, 0, 0, 2, 6])
    with pytest.raises(ValueError, match=r"int4 group of 24 inputs does not tile the inputs \(4, 16\) of wo"):
        quantize.block_sizes((2, 4, 16, 64), "wo", "int4", 24)


@pytest.mark.parametrize("form", ["row_blocks", "dequantize"])
@pytest.mark.parametrize("spec,shape,name,mode,group", [
    ("ND,DHd->NHd", (1024, 4, 8), "wq", "int8", None),  # two blocks of rows
    ("ND,DHd->NHd", (1024, 4, 8), "wq", "int4", 64),
    ("NHd,HdD->ND", (4, 32, 48), "wo", "int4", 64),  # a group of two heads
    ("NHd,HdD->ND", (4, 32, 48), "wo", "int8", 16),
    ("NF,FD->ND", (96, 40), "w2", "int4", 32)])
def test_quantized_products_equal_numpy(form, spec, shape, name, mode, group):
    """quantize.product in both forms (XLA:CPU's row blocks, TPU and GPU's dequantized operand)
    against NumPy's float64 product with the dequantized weight."""
    rng = np.random.default_rng(0)
    w = rng.standard_normal(shape).astype(np.float32)
    x = rng.standard_normal((5,) + shape[:INPUT_AXES[name]]).astype(np.float32)
    leaf = quantize.quantize_stacked(jnp.asarray(w), quantize.block_sizes(shape, name, mode, group), mode)
    q, scale = flat_quantized(leaf, name)
    dequantized = (q.astype(np.float64) * scale[:, :, None]).reshape(shape)
    n_in = INPUT_AXES[name]
    expected = np.tensordot(x.astype(np.float64), dequantized, axes=(list(range(1, n_in + 1)), list(range(n_in))))
    got = quantize.product(spec, jnp.asarray(x), quantize.Quantized(leaf["q"], leaf["scale"]), form)
    np.testing.assert_allclose(np.asarray(got), expected, rtol=1e-5, atol=1e-5 * np.abs(expected).max())


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """A random HF Mistral (window 8, GQA 4/2, dim 64) with the real v1 tokenizer, converted in float32."""
    return convert_with_tokenizer(tmp_path_factory.mktemp("quantized"), REAL_TOKENIZER, "tokenizer.model", 32000, 7)


def hf_on(tmp_path, config, params, cls=transformers.MistralForCausalLM):
    """The HF model (of class cls) of params' dequantized weights (float32), as save_hf writes it."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    save_hf(str(tmp_path), config, quantize.dequantize_params(params, jnp.float32))
    return cls.from_pretrained(tmp_path, attn_implementation="eager").eval()


def hf_logits(model, tokens):
    with torch.no_grad():
        return model(torch.tensor(np.asarray(tokens))).logits.float().numpy()


@pytest.mark.parametrize("mode,group", [("int8", None), ("int4", 32)])
def test_quantized_model_is_hf_on_the_dequantized_weights(converted, tmp_path, monkeypatch, mode, group):
    """Logits over several windows (in both product forms) and greedy generation of the quantized
    model equal HF's on the dequantized weights; quantization does move the logits."""
    ref, checkpoint = converted
    config, params = load_checkpoint(str(checkpoint))
    quantized = quantize.quantize_params(config, params, mode, group)
    model = hf_on(tmp_path, config, quantized)
    tokens = np.random.default_rng(1).integers(0, config.vocab_size, (2, 37))
    expected = hf_logits(model, tokens)
    float_logits = np.asarray(Mistral(config).apply({"params": params}, tokens))
    assert np.abs(float_logits - expected).max() > 100 * TOL  # the quantization is seen
    for form in ("row_blocks", "dequantize"):
        monkeypatch.setattr(platforms, "quantized_product", lambda form=form: form)
        got = np.asarray(jax.jit(Mistral(config).apply)({"params": quantized}, tokens))
        assert np.abs(got - expected).max() < TOL, form
    monkeypatch.undo()
    held = quantize.held_for(quantized, "cpu")  # as sample.py and serve.py run on CPU: int4 as int8
    for a, b in zip(jax.tree_util.tree_leaves(quantized), jax.tree_util.tree_leaves(held), strict=True):
        assert b.dtype == (jnp.int8 if a.dtype == jnp.int4 else a.dtype)
        assert np.array_equal(np.asarray(a, np.float32), np.asarray(b, np.float32))
    got = np.asarray(jax.jit(Mistral(config).apply)({"params": held}, tokens))
    assert np.abs(got - expected).max() < TOL
    prompt = [1, 415, 5565, 302, 4843, 349]
    assert generate(config, held, [prompt], 20, eos_id=2)[0] == hf_greedy_ids(model, prompt, 20)


@pytest.mark.parametrize("fixture,mode,group", [("ref_mixtral", "int4", 32), ("ref_mistral4", "int8", None)])
def test_quantized_experts_and_latent_attention_are_hf_on_the_dequantized_weights(
        request, tmp_path, fixture, mode, group):
    """Mixtral's experts (int4) and Mistral Small 4's latent attention and fine-grained experts
    (int8; decoding reads its latent cache through the absorbed wkv_b): logits and greedy tokens."""
    ref = request.getfixturevalue(fixture)
    config, params = load_pytorch(ref.dir)
    quantized = quantize.quantize_params(config, params, mode, group)
    model = hf_on(tmp_path, config, quantized, type(ref.model))
    got = np.asarray(jax.jit(Mistral(config).apply)({"params": quantized}, ref.tokens))
    assert np.abs(got - hf_logits(model, ref.tokens)).max() < TOL
    prompt = [1] + [int(t) for t in ref.tokens[0] if t > 2][:8]  # HF's generate masks token 0 as padding
    assert generate(config, quantized, [prompt], 12, eos_id=2)[0] == hf_greedy_ids(model, prompt, 12)


def leaves_equal(a, b):
    return all(x.dtype == y.dtype and np.array_equal(np.asarray(x), np.asarray(y))
               for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b), strict=True))


def test_quantized_checkpoints_convert_load_and_sample(converted, tmp_path, capsys):
    """load_checkpoint(quantize=) and convert_weights.py --quantize give quantize_params' arrays,
    bit for bit; the quantized checkpoint loads as stored and is smaller; sample.py --quantize
    prints HF's greedy completion on the dequantized weights; --to-hf writes those; bad input
    is one line."""
    ref, checkpoint = converted
    config, params = load_checkpoint(str(checkpoint))
    expected = quantize.quantize_params(config, params, "int4", 32)
    assert leaves_equal(load_checkpoint(str(checkpoint), quantize="int4", group=32)[1], expected)

    out = tmp_path / "int4"
    status, stdout, stderr = run_script(capsys, convert_weights, ref.dir, out, "--dtype", "float32",
                                        "--quantize", "int4", "--quant-group", 32)
    assert status == 0, stderr
    assert "(int4 projections)" in stdout
    stored_config, stored = load_checkpoint(str(out))
    assert leaves_equal(stored, expected) and stored_config.param_dtype == "float32"
    # The projections: half a byte and a float32 scale per 32, 5/32 of float32's bytes; the norms stay float32.
    norms = 2 * 2 * 64 * 4
    assert quantize.stored_bytes(stored["layers"]) == 5 / 32 * (quantize.stored_bytes(params["layers"]) - norms) + norms

    model = hf_on(tmp_path / "hf", config, expected)
    prompt = "The capital of France is"
    from mistral_common.tokens.tokenizers.sentencepiece import SentencePieceTokenizer
    spm = SentencePieceTokenizer(REAL_TOKENIZER)
    text = spm.decode(hf_greedy_ids(model, spm.encode(prompt, bos=True, eos=False), 16))
    for argv in (["--checkpoint", checkpoint, "--quantize", "int4", "--quant-group", 32], ["--checkpoint", out]):
        status, stdout, stderr = run_script(capsys, sample, *argv, "--prompt", prompt, "--max-new-tokens", 16)
        assert status == 0 and stdout == text + "\n", stderr

    status, _, stderr = run_script(capsys, convert_weights, out, tmp_path / "back", "--to-hf")
    assert status == 0, stderr
    back = transformers.MistralForCausalLM.from_pretrained(tmp_path / "back").state_dict()
    for name, weight in model.state_dict().items():
        np.testing.assert_array_equal(back[name].float().numpy(), weight.numpy(), err_msg=name)

    for script, argv, message in [
        (convert_weights, [ref.dir, tmp_path / "bad", "--quantize", "int4"],
         r"int4 group of 128 inputs does not tile the inputs \(64,\) of w[kq]"),
        (convert_weights, [ref.dir, tmp_path / "bad", "--quant-group", "32"], "--quant-group needs --quantize"),
        (convert_weights, [ref.dir, tmp_path / "bad", "--quantize", "int8", "--verify"], "--verify holds"),
        (sample, ["--checkpoint", checkpoint, "--quantize", "int4", "--quant-group", "24", "--prompt", "x"],
         r"int4 group of 24 inputs does not tile"),
        (sample, ["--checkpoint", out, "--quantize", "int8", "--prompt", "x"],
         "stored quantized to int4; it cannot be requantized to int8"),
        (sample, ["--checkpoint", checkpoint, "--quant-group", "0", "--prompt", "x"],
         "--quant-group must be a positive"),
    ]:
        status, _, stderr = run_script(capsys, script, *map(str, argv))
        if message.startswith("--") and script is convert_weights:  # argparse's usage, then "prog: error: ..."
            assert status == 2 and "Traceback" not in stderr and message in stderr.splitlines()[-1]
        else:
            assert_one_line_error(status, stderr, message)
    assert not (tmp_path / "bad").exists()


def test_qlora_trains_adapters_over_a_frozen_int4_base():
    """The adapters' loss and gradients over the int4 base are LoRA's over its dequantized
    float weights; train steps leave the base bit for bit and move the adapters."""
    config = SMALL.replace(sliding_window=None)
    h = hp(batch_size=2, seq_len=32, lora_rank=4, lora_targets=ALL)
    spec, mesh = h.lora_spec, make_mesh("")
    base = quantize.quantize_params(config, init_params(config, jax.random.key(0)), "int4", 32)
    dequantized = quantize.dequantize_params(base, jnp.float32)
    batch = jax.random.randint(jax.random.key(1), (2, 33), 0, config.vocab_size)
    keys = iter(jax.random.split(jax.random.key(3), 100))
    adapters = jax.tree_util.tree_map(lambda x: x + 0.05 * jax.random.normal(next(keys), x.shape),
                                      lora.init_adapters(config, spec, jax.random.key(2)))

    def loss_and_grad(base):
        return jax.jit(jax.value_and_grad(
            lambda a: trainer.loss_fn(base, config, batch, 0.0, 32, adapters=a, spec=spec)[0]))(adapters)

    (loss, grads), (expected_loss, expected_grads) = loss_and_grad(base), loss_and_grad(dequantized)
    assert abs(float(loss) - float(expected_loss)) < 1e-5
    for got, want in zip(jax.tree_util.tree_leaves(grads), jax.tree_util.tree_leaves(expected_grads)):
        assert np.abs(got - want).max() <= 1e-5 * np.abs(want).max()

    tx = trainer.make_optimizer(h)
    state = trainer.init_state(config, tx, mesh, 0, spec=spec)
    step = trainer.make_train_step(config, tx, h, mesh, trainer.state_shardings(state),
                                   trainer.param_shardings(config, mesh, base))
    before = jax.tree_util.tree_map(np.array, base)
    for _ in range(3):
        state, metrics = step(state, batch, base)
    assert leaves_equal(base, before) and np.isfinite(float(metrics["loss"]))
    assert all(np.any(pair["b"]) for pair in pairs(state.params))


def test_train_py_qlora_against_hf_peft(converted, tmp_path, capsys, monkeypatch):
    """train.py --base-dtype int4: HF PEFT loading adapter/ onto the HF model of the int4 base's
    dequantized weights computes our QLoRA logits; model/ is the float base plus the adapters,
    as PEFT merges them; adapter/ is the same PEFT export a bfloat16 base gives."""
    monkeypatch.setenv("MISTRAL_JAX_CACHE", str(tmp_path / "cache"))
    _, checkpoint = converted
    write_small_corpus(tmp_path / "notes.txt")
    out = tmp_path / "run"
    flags = ["--init-from", checkpoint, "--data", tmp_path / "notes.txt", "--batch-size", 4, "--seq-len", 32,
             "--lora-rank", 4, "--lora-alpha", 8, "--lora-targets", ALL, "--steps", 6, "--lr", 3e-2, "--warmup", 1,
             "--log-every", 2, "--samples", 0]
    status, stdout, stderr = run_train(capsys, *flags, "--out", out, "--base-dtype", "int4", "--quant-group", 32)
    assert status == 0, stderr

    config, params = load_checkpoint(str(checkpoint))
    base = quantize.quantize_params(config, params, "int4", 32)
    spec, adapters = lora.load_peft(str(out / "adapter"), config)
    ids = np.random.default_rng(0).integers(0, config.vocab_size, (2, 24))
    ours = np.asarray(Mistral(config).apply(lora.variables(base, adapters, spec), ids))
    hf = hf_on(tmp_path / "hf_int4", config, base)
    base_logits = hf_logits(hf, ids)
    with_peft = peft.PeftModel.from_pretrained(hf, out / "adapter").eval()  # wraps hf in place
    assert np.abs(hf_logits(with_peft, ids) - base_logits).max() > 1e-2  # the adapters moved
    assert np.abs(hf_logits(with_peft, ids) - ours).max() < TOL

    hf_float = hf_on(tmp_path / "hf_float", config, params)
    merged = peft.PeftModel.from_pretrained(hf_float, out / "adapter").merge_and_unload().state_dict()
    model_config, model = load_checkpoint(str(out / "model"))
    hf_model = hf_on(tmp_path / "hf_model", model_config, model).state_dict()
    for name, weight in merged.items():
        np.testing.assert_allclose(hf_model[name].numpy(), weight.numpy(), rtol=1e-6, atol=1e-6, err_msg=name)

    status, _, stderr = run_train(capsys, *flags, "--out", tmp_path / "bf16", "--steps", 2)
    assert status == 0, stderr
    assert (json.loads((out / "adapter" / "adapter_config.json").read_text())
            == json.loads((tmp_path / "bf16" / "adapter" / "adapter_config.json").read_text()))
    for flag, message in [(["--base-dtype", "int4", "--quant-group", "0"], "--quant-group must be a positive"),
                          (["--quant-group", "32"], "--quant-group is the scales' group of an int8 or int4"),
                          (["--base-dtype", "int4"], r"int4 group of 128 inputs does not tile")]:
        status, _, stderr = run_train(capsys, *flags, "--out", tmp_path / "bad", *flag)
        assert_one_line_error(status, stderr, message)
