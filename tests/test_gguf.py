"""GGUF files in (checkpoints/gguf.py, convert_weights.py): files written here as llama.cpp's
convert_hf_to_gguf.py writes them (its names, its q/k permutation, its metadata keys), checked
against gguf's own dequantization, HF transformers' logits and the real v1 tokenizer."""

import copy
import os

import gguf
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import sentencepiece
import torch
import transformers
from gguf import GGMLQuantizationType as Q

import convert_weights
from conftest import BUNDLED, REAL_TOKENIZER, assert_one_line_error, forward, run_script, strengthen
from mistral_jax import Tokenizer
from mistral_jax.checkpoints.convert import load_pytorch
from mistral_jax.checkpoints.gguf import LAYER_TENSORS, load_gguf
from mistral_jax.checkpoints.layouts import LAYER_TENSORS as HF_LAYER_TENSORS
from mistral_jax.checkpoints.store import load_checkpoint
from mistral_jax.model import quantize

# Every input a multiple of 256 (k-quants' super-block), n_kv_heads < n_heads, head_dim 64 (so
# Q8_0's blocks of 32 split each head of wo's inputs in two).
HF = dict(hidden_size=256, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=64,
          intermediate_size=512, vocab_size=384, rope_theta=1e6, rms_norm_eps=1e-5, max_position_embeddings=512)
HF_TO_GGUF = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
              "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
              "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}
TOP_TO_GGUF = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
               "lm_head.weight": "output.weight"}
TEXTS = ["Hello world", "  two  spaces,\ttabs\tand\nnewlines\n\n", "digits 1234567 and 3.14159, 10^6",
         "unicode: héllo wörld 東京 Ωμέγα ∑∫ 🚀🦙", "byte fallback: \x01\x7f 𝔘𝔫𝔦𝔠𝔬𝔡𝔢 ꙮ", " leading space", ""]


def run(capsys, *argv):
    return run_script(capsys, convert_weights, *argv)


def permute(w, n_head):
    """llama.cpp's LlamaModel.permute: HF's rotate-half rows -> interleaved pairs per head."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def unpermute(w, n_head):
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def q6_k_blocks(shape, rng):
    """Valid Q6_K bytes of a tensor of shape [out, in] (random 6-bit values and int8 sub-scales,
    a float16 super-block scale that keeps the weights near 0.2): gguf.quants cannot quantize k-quants."""
    blocks = rng.integers(0, 256, (shape[0] * shape[1] // 256, 210), dtype=np.uint8)
    blocks[:, -2:] = np.full((len(blocks), 1), 0.2 / (32 * 128), np.float16).view(np.uint8)
    return blocks.reshape(shape[0], -1)


def gguf_tensors(state: dict, n_heads: int, n_kv_heads: int) -> dict:
    """HF tensors (numpy float32) by llama.cpp's names, q/k rows permuted as llama.cpp does."""
    out = {}
    for name, w in state.items():
        if name in TOP_TO_GGUF:
            out[TOP_TO_GGUF[name]] = w
            continue
        _, _, i, module = name.removesuffix(".weight").split(".", 3)
        w = permute(w, n_heads) if module == "self_attn.q_proj" else permute(w, n_kv_heads) \
            if module == "self_attn.k_proj" else w
        out[f"blk.{i}.{HF_TO_GGUF[module]}.weight"] = w
    return out


def write_gguf(path, tensors: dict, hp: dict, types=lambda name: Q.F16, arch="llama", meta=None, vocab=None):
    """A GGUF file as convert_hf_to_gguf.py writes it: norms F32, the rest as types(name) says."""
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(hp["num_hidden_layers"])
    w.add_context_length(hp["max_position_embeddings"])
    w.add_embedding_length(hp["hidden_size"])
    w.add_feed_forward_length(hp["intermediate_size"])
    w.add_head_count(hp["num_attention_heads"])
    w.add_head_count_kv(hp["num_key_value_heads"])
    w.add_rope_freq_base(hp["rope_theta"])
    w.add_layer_norm_rms_eps(hp["rms_norm_eps"])
    w.add_key_length(hp["head_dim"])
    w.add_value_length(hp["head_dim"])
    w.add_file_type(gguf.LlamaFileType.MOSTLY_F16)
    w.add_vocab_size(hp["vocab_size"])
    w.add_rope_dimension_count(hp["head_dim"])
    for key, value in (meta or {}).items():
        getattr(w, f"add_{key}")(value)
    if vocab is None:  # a BPE vocabulary ("gpt2"), as llama.cpp writes for Tekken-based models
        vocab = dict(model="gpt2", tokens=[f"t{i}" for i in range(hp["vocab_size"])],
                     types=[gguf.TokenType.NORMAL] * hp["vocab_size"], scores=None)
    w.add_tokenizer_model(vocab["model"])
    w.add_tokenizer_pre("default")
    w.add_token_list(vocab["tokens"])
    w.add_token_types(vocab["types"])
    if vocab["scores"] is not None:
        w.add_token_scores(vocab["scores"])
    for key in ("bos_token_id", "eos_token_id", "unk_token_id", "add_bos_token", "add_eos_token"):
        if key in vocab:
            getattr(w, f"add_{key}")(vocab[key])
    rng = np.random.default_rng(0)
    for name, t in tensors.items():
        kind = Q.F32 if t.ndim == 1 else types(name)
        if kind in (Q.F32, Q.F16):
            w.add_tensor(name, t.astype(np.float32 if kind == Q.F32 else np.float16))
        elif kind == Q.Q6_K:
            w.add_tensor(name, q6_k_blocks(t.shape, rng), raw_dtype=kind)
        else:
            w.add_tensor(name, gguf.quants.quantize(t, kind), raw_dtype=kind)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return str(path)


def mixed_type(name):
    """A Q4_K_M-like mix: k-quant projections, a few other types, one stack (ffn_down) of mixed types."""
    return {"token_embd.weight": Q.Q8_0, "output.weight": Q.BF16, "blk.0.ffn_down.weight": Q.Q8_0,
            "blk.1.attn_v.weight": Q.Q4_0}.get(name, Q.Q6_K)


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    """An HF MistralForCausalLM with strong random weights rounded to float16 (what an F16 GGUF
    holds exactly), saved, its GGUF tensors and files in F16, Q8_0 and a mix with a k-quant."""
    torch.manual_seed(0)
    hf = transformers.MistralForCausalLM(transformers.MistralConfig(
        **HF, sliding_window=None, attn_implementation="eager", tie_word_embeddings=False)).eval()
    strengthen(hf)
    with torch.no_grad():
        for p in hf.parameters():
            p.copy_(p.half().float())
    root = tmp_path_factory.mktemp("gguf")
    hf.save_pretrained(root / "hf")
    tensors = gguf_tensors({k: v.numpy() for k, v in hf.state_dict().items()}, HF["num_attention_heads"],
                           HF["num_key_value_heads"])
    files = {"f16": write_gguf(root / "f16.gguf", tensors, HF),
             "q8_0": write_gguf(root / "q8_0.gguf", tensors, HF, lambda name: Q.Q8_0),
             "mixed": write_gguf(root / "mixed.gguf", tensors, HF, mixed_type)}
    tokens = torch.randint(0, HF["vocab_size"], (2, 40))
    with torch.no_grad():
        logits = hf(tokens).logits.float().numpy()
    return dict(hf=hf, dir=str(root / "hf"), files=files, tokens=tokens.numpy(), logits=logits)


@pytest.fixture(scope="module")
def loaded(model):
    return {kind: load_gguf(file) for kind, file in model["files"].items()}


def our_layout(name: str, w: np.ndarray):
    """(Flax path, index, w [out, in] of GGUF tensor `name` in the model's layout), written out
    here apart from the library: llama.cpp's q/k permutation undone, then HF's layout."""
    D, H, K, d = HF["hidden_size"], HF["num_attention_heads"], HF["num_key_value_heads"], HF["head_dim"]
    top = {"token_embd.weight": (("tok_embeddings",), w), "output_norm.weight": (("norm", "weight"), w),
           "output.weight": (("output",), w.T)}
    if name in top:
        return top[name][0], (), top[name][1]
    _, i, module, _ = name.split(".")
    layer = {"attn_q": (("attention", "wq"), lambda: unpermute(w, H).T.reshape(D, H, d)),
             "attn_k": (("attention", "wk"), lambda: unpermute(w, K).T.reshape(D, K, d)),
             "attn_v": (("attention", "wv"), lambda: w.T.reshape(D, K, d)),
             "attn_output": (("attention", "wo"), lambda: w.T.reshape(H, d, D)),
             "ffn_gate": (("feed_forward", "w1"), lambda: w.T), "ffn_up": (("feed_forward", "w3"), lambda: w.T),
             "ffn_down": (("feed_forward", "w2"), lambda: w.T),
             "attn_norm": (("attention_norm", "weight"), lambda: w),
             "ffn_norm": (("ffn_norm", "weight"), lambda: w)}[module]
    return ("layers",) + layer[0], (int(i),), layer[1]()


def leaf(params, path):
    for key in path:
        params = params[key]
    return params


def as_float(value):
    return np.asarray(quantize.dequantize(value["q"], value["scale"])) if quantize.is_quantized(value) \
        else np.asarray(value, np.float32)


def relative(a, b):
    return np.abs(np.asarray(a) - b).max() / np.abs(b).max()


def test_names_cover_every_parameter_of_a_dense_layer():
    assert set(LAYER_TENSORS) == set(HF_LAYER_TENSORS)


def test_config_from_the_metadata(loaded):
    config, _ = loaded["f16"]
    assert (config.dim, config.n_layers, config.n_heads, config.n_kv_heads, config.head_dim, config.hidden_dim,
            config.vocab_size, config.max_seq_len) == (256, 2, 4, 2, 64, 512, 384, 512)
    assert config.norm_eps == 1e-5 and config.rope_theta == 1e6  # float32 in the file, the decimal back
    assert config.sliding_window is None and not config.tied_embeddings


def test_f16_params_are_load_pytorchs(model, loaded):
    """The F16 file gives exactly what load_pytorch gives for the same weights (the HF directory)."""
    _, params = loaded["f16"]
    _, expected = load_pytorch(model["dir"], "float32")
    flat, want = jax.tree_util.tree_flatten_with_path(params)[0], jax.tree_util.tree_flatten_with_path(expected)[0]
    assert [p for p, _ in flat] == [p for p, _ in want]
    for (path, got), (_, value) in zip(flat, want):
        assert got.dtype == jnp.float32 and np.array_equal(got, value), jax.tree_util.keystr(path)


@pytest.mark.parametrize("kind", ["f16", "q8_0", "mixed"])
def test_each_weight_is_ggufs_dequantization(model, loaded, kind):
    """Every tensor of the file, dequantized by gguf itself and laid out as the model's, equals the
    converted weight: Q8_0 projections through quantize.dequantize of the kept int8."""
    _, params = loaded[kind]
    for tensor in gguf.GGUFReader(model["files"][kind]).tensors:
        path, index, expected = our_layout(tensor.name, gguf.quants.dequantize(tensor.data, tensor.tensor_type))
        got = as_float(leaf(params, path))[index]
        assert got.shape == expected.shape and np.array_equal(got, expected), tensor.name


def test_f16_logits_match_hf(model, loaded):
    config, params = loaded["f16"]
    assert relative(forward(config, params, model["tokens"]), model["logits"]) < 1e-4


def hf_logits_of(model, file):
    """The HF model's logits with the weights of a GGUF file, dequantized by gguf."""
    hf, state = copy.deepcopy(model["hf"]), {}
    H, K = HF["num_attention_heads"], HF["num_key_value_heads"]
    from_gguf = {v: k for k, v in TOP_TO_GGUF.items()}
    for tensor in gguf.GGUFReader(file).tensors:
        w = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
        if tensor.name in from_gguf:
            state[from_gguf[tensor.name]] = w
            continue
        _, i, module, _ = tensor.name.split(".")
        name = {v: k for k, v in HF_TO_GGUF.items()}[module]
        w = unpermute(w, H) if module == "attn_q" else unpermute(w, K) if module == "attn_k" else w
        state[f"model.layers.{i}.{name}.weight"] = w
    hf.load_state_dict({k: torch.from_numpy(np.array(v, np.float32)) for k, v in state.items()})
    with torch.no_grad():
        return hf(torch.from_numpy(model["tokens"])).logits.float().numpy()


def test_q8_0_projections_stay_int8(model, loaded):
    config, params = loaded["q8_0"]
    L, D, H, K, d, F = 2, 256, 4, 2, 64, 512
    scales = {"wq": (L, D // 32, H, d), "wk": (L, D // 32, K, d), "wv": (L, D // 32, K, d),
              "wo": (L, H, d // 32, D), "w1": (L, D // 32, F), "w3": (L, D // 32, F), "w2": (L, F // 32, D)}
    layers = {**params["layers"]["attention"], **params["layers"]["feed_forward"]}
    for name, shape in scales.items():
        w = layers[name]
        assert quantize.is_quantized(w) and w["q"].dtype == jnp.int8 and w["scale"].dtype == jnp.float32, name
        assert w["scale"].shape == shape, name
        assert quantize.block_sizes(w["q"].shape, name, "int8", 32) == tuple(
            n // s for n, s in zip(w["q"].shape, shape)), name
    for path in (("tok_embeddings",), ("output",)):  # Q8_0 too, but no projection of the layers: float
        assert leaf(params, path).dtype == jnp.float32
    # The model runs the int8 weights as the float model runs them dequantized.
    dequantized = quantize.dequantize_params(params, jnp.float32)
    expected = np.asarray(forward(config, dequantized, model["tokens"]))
    got = forward(config, params, model["tokens"])
    assert relative(got, expected) < 1e-4
    # And as transformers runs the weights gguf dequantizes, llama.cpp's permutation undone.
    assert relative(got, hf_logits_of(model, model["files"]["q8_0"])) < 1e-4


def test_other_types_are_dequantized_whole_stacks(loaded):
    _, params = loaded["mixed"]
    ffn = params["layers"]["feed_forward"]
    assert not any(quantize.is_quantized(w) for w in jax.tree_util.tree_leaves(params, is_leaf=quantize.is_quantized))
    assert ffn["w2"].dtype == jnp.float32  # Q8_0 in layer 0, Q6_K in layer 1: one stacked float weight


def test_cli_converts_to_bfloat16_keeping_int8(model, loaded, tmp_path, capsys):
    status, out, err = run(capsys, model["files"]["q8_0"], tmp_path / "jax")
    assert status == 0, err
    assert "parameters, bfloat16" in out and "--tokenizer" in out
    assert not any(f.startswith("tokenizer") for f in os.listdir(tmp_path / "jax"))
    config, params = load_checkpoint(str(tmp_path / "jax"))
    _, expected = loaded["q8_0"]
    assert config.param_dtype == "bfloat16"
    for (path, got), (_, value) in zip(jax.tree_util.tree_flatten_with_path(params)[0],
                                       jax.tree_util.tree_flatten_with_path(expected)[0]):
        cast = value if value.dtype != jnp.float32 or path[-1].key == "scale" else value.astype(jnp.bfloat16)
        assert got.dtype == cast.dtype and np.array_equal(got, cast), jax.tree_util.keystr(path)


# ---- the tokenizer ---------------------------------------------------------------------------

def sentencepiece_vocab(file: str, model="llama") -> dict:
    """A sentencepiece file's vocabulary as convert_hf_to_gguf.py's _set_vocab_sentencepiece writes it."""
    sp = sentencepiece.SentencePieceProcessor(model_file=file)
    types = []
    for i in range(sp.vocab_size()):
        types.append(gguf.TokenType.UNKNOWN if sp.IsUnknown(i) else gguf.TokenType.CONTROL if sp.IsControl(i)
                     else gguf.TokenType.UNUSED if sp.IsUnused(i) else gguf.TokenType.BYTE if sp.IsByte(i)
                     else gguf.TokenType.NORMAL)
    return dict(model=model, tokens=[sp.IdToPiece(i).encode() for i in range(sp.vocab_size())],
                scores=[sp.GetScore(i) for i in range(sp.vocab_size())], types=types, bos_token_id=sp.bos_id(),
                eos_token_id=sp.eos_id(), unk_token_id=sp.unk_id(), add_bos_token=True, add_eos_token=False)


TINY = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1, head_dim=16,
            intermediate_size=64, vocab_size=32000, rope_theta=1e4, rms_norm_eps=1e-5, max_position_embeddings=64)


def tiny_tensors(hp=TINY, output=True):
    """Random weights by llama.cpp's names (no permutation needed: they are random)."""
    rng = np.random.default_rng(1)
    D, F, V, Hd, Kd = (hp["hidden_size"], hp["intermediate_size"], hp["vocab_size"],
                       hp["num_attention_heads"] * hp["head_dim"], hp["num_key_value_heads"] * hp["head_dim"])
    shapes = {"token_embd.weight": (V, D), "output_norm.weight": (D,), "output.weight": (V, D)}
    for i in range(hp["num_hidden_layers"]):
        shapes.update({f"blk.{i}.{n}.weight": s for n, s in {
            "attn_q": (Hd, D), "attn_k": (Kd, D), "attn_v": (Kd, D), "attn_output": (D, Hd), "ffn_gate": (F, D),
            "ffn_up": (F, D), "ffn_down": (D, F), "attn_norm": (D,), "ffn_norm": (D,)}.items()})
    if not output:
        del shapes["output.weight"]
    return {name: rng.normal(0, 0.2, shape).astype(np.float32) for name, shape in shapes.items()}


@pytest.fixture(scope="module")
def v1_gguf(tmp_path_factory):
    return write_gguf(tmp_path_factory.mktemp("v1") / "v1.gguf", tiny_tensors(), TINY,
                      vocab=sentencepiece_vocab(REAL_TOKENIZER))


def test_sentencepiece_tokenizer_is_rebuilt(v1_gguf, tmp_path, capsys):
    status, out, err = run(capsys, v1_gguf, tmp_path / "jax", "--dtype", "float32")
    assert status == 0, err
    assert "tokenizer.model rebuilt" in out
    rebuilt, original = Tokenizer(str(tmp_path / "jax" / "tokenizer.model")), Tokenizer(REAL_TOKENIZER)
    assert (rebuilt.vocab_size, rebuilt.bos_id, rebuilt.eos_id) == (original.vocab_size, 1, 2)
    pieces = [original.decode([i]) for i in range(3, original.vocab_size, 997)]
    for text in TEXTS + ["".join(pieces), " ".join(pieces)]:
        assert rebuilt.encode(text) == original.encode(text), text
        assert rebuilt.decode(original.encode(text)) == original.decode(original.encode(text)), text


def test_other_tokenizers_need_the_flag(tmp_path, capsys):
    src = write_gguf(tmp_path / "bpe.gguf", tiny_tensors(), TINY, vocab=sentencepiece_vocab(REAL_TOKENIZER, "gpt2"))
    status, out, err = run(capsys, src, tmp_path / "none")
    assert status == 0, err
    assert "'gpt2'" in out and "pass --tokenizer FILE" in out
    assert sorted(os.listdir(tmp_path / "none")) == ["checksums.json", "config.json", "params"]
    status, out, err = run(capsys, src, tmp_path / "given", "--tokenizer", REAL_TOKENIZER)
    assert status == 0, err
    assert (tmp_path / "given" / "tokenizer.model.v1").read_bytes() == open(REAL_TOKENIZER, "rb").read()
    tekken = os.path.join(BUNDLED, "tekken_240911.json")  # 131072 tokens, more than the model's 32000
    assert_one_line_error(*run(capsys, src, tmp_path / "big", "--tokenizer", tekken)[::2], "more than the model's")
    assert not (tmp_path / "big").exists()


def test_metadata_window_and_tied_embeddings(tmp_path):
    src = write_gguf(tmp_path / "tied.gguf", tiny_tensors(output=False), TINY, meta={"sliding_window": 16})
    config, params = load_gguf(src)
    assert config.sliding_window == 16 and config.tied_embeddings and "output" not in params


# ---- bad files -------------------------------------------------------------------------------

def test_bad_files(model, tmp_path, capsys):
    f16 = open(model["files"]["f16"], "rb").read()
    (tmp_path / "text.gguf").write_text("not a model\n")
    (tmp_path / "cut.gguf").write_bytes(f16[:len(f16) // 2])
    tensors = tiny_tensors()
    cases = {
        str(tmp_path / "text.gguf"): "is not a GGUF file",
        str(tmp_path / "cut.gguf"): "damaged or truncated GGUF file",
        write_gguf(tmp_path / "qwen.gguf", tensors, TINY, arch="qwen2"): "holds a 'qwen2' model; only 'llama'",
        write_gguf(tmp_path / "yarn.gguf", tensors, TINY, meta={"rope_scaling_type": gguf.RopeScalingType.YARN}):
            "scales its rope .yarn.",
        write_gguf(tmp_path / "moe.gguf", tensors, TINY, meta={"expert_count": 8}): "mixture of experts",
        write_gguf(tmp_path / "lacking.gguf", {k: v for k, v in tensors.items() if k != "blk.0.ffn_up.weight"},
                   TINY): r"lacks 1 tensors .*blk\.0\.ffn_up\.weight",
    }
    for src, pattern in cases.items():
        assert_one_line_error(*run(capsys, src, tmp_path / "out")[::2], pattern)
        assert not (tmp_path / "out").exists() and not (tmp_path / ".out.partial").exists()
    assert_one_line_error(*run(capsys, model["files"]["f16"], tmp_path / "out", "--verify")[::2],
                          "GGUF source has none")
