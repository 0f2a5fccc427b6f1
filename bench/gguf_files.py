"""GGUF files of an HF Mistral model for llama.cpp (bench/quantized.py's baseline), written as
llama.cpp's convert_hf_to_gguf.py writes them: its tensor names, its q/k row permutation, its
metadata keys, a sentencepiece vocabulary (mistral-common's bundled v1 tokenizer's pieces) so
that llama.cpp loads the file. The layers' projections in F16, Q8_0 or Q4_0 (gguf's own
quantization); the embedding and the output F16, the norms F32, as our int8/int4 models keep
those float (the same writer as tests/test_gguf.py's)."""

from __future__ import annotations

import os

import numpy as np

LAYER_NAMES = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
               "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
               "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}
TOP_NAMES = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
             "lm_head.weight": "output.weight"}
FILE_TYPES = {"F16": "MOSTLY_F16", "Q8_0": "MOSTLY_Q8_0", "Q4_0": "MOSTLY_Q4_0"}


def permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's LlamaModel.permute: HF's rotate-half rows -> interleaved pairs per head."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def gguf_tensors(state: dict, config) -> dict[str, np.ndarray]:
    """An HF state dict (name -> torch tensor) as float32 arrays [out, in] by llama.cpp's names."""
    out = {}
    for name, tensor in state.items():
        w = tensor.detach().float().numpy()
        if name in TOP_NAMES:
            out[TOP_NAMES[name]] = w
            continue
        _, _, i, module = name.removesuffix(".weight").split(".", 3)
        if module == "self_attn.q_proj":
            w = permute(w, config.n_heads)
        elif module == "self_attn.k_proj":
            w = permute(w, config.n_kv_heads)
        out[f"blk.{i}.{LAYER_NAMES[module]}.weight"] = w
    if config.tied_embeddings:
        out.pop("output.weight", None)
    return out


def sentencepiece_vocab(vocab_size: int) -> dict:
    """The first vocab_size pieces of mistral-common's tokenizer.model.v1 (32000), as
    convert_hf_to_gguf.py's _set_vocab_sentencepiece writes them."""
    import gguf
    import mistral_common
    import sentencepiece

    sp = sentencepiece.SentencePieceProcessor(
        model_file=os.path.join(os.path.dirname(mistral_common.__file__), "data", "tokenizer.model.v1"))
    if vocab_size > sp.vocab_size():
        raise ValueError(f"a vocabulary of {vocab_size} is larger than the v1 tokenizer's {sp.vocab_size()}")
    kinds = [(sp.IsUnknown, gguf.TokenType.UNKNOWN), (sp.IsControl, gguf.TokenType.CONTROL),
             (sp.IsUnused, gguf.TokenType.UNUSED), (sp.IsByte, gguf.TokenType.BYTE)]
    types = [next((kind for test, kind in kinds if test(i)), gguf.TokenType.NORMAL) for i in range(vocab_size)]
    return dict(tokens=[sp.IdToPiece(i).encode() for i in range(vocab_size)],
                scores=[sp.GetScore(i) for i in range(vocab_size)], types=types,
                bos=sp.bos_id(), eos=sp.eos_id(), unk=sp.unk_id())


def write(path: str, config, tensors: dict[str, np.ndarray], kind: str) -> int:
    """Writes the GGUF file of a dense model `config` with the layers' projections in kind
    ("F16", "Q8_0", "Q4_0"); returns the bytes of its tensors a decode step reads (all but
    token_embd, unless the embeddings are tied)."""
    import gguf

    Q = gguf.GGMLQuantizationType
    w = gguf.GGUFWriter(path, "llama")
    w.add_block_count(config.n_layers)
    w.add_context_length(config.max_seq_len)
    w.add_embedding_length(config.dim)
    w.add_feed_forward_length(config.hidden_dim)
    w.add_head_count(config.n_heads)
    w.add_head_count_kv(config.n_kv_heads)
    w.add_rope_freq_base(config.rope_theta)
    w.add_layer_norm_rms_eps(config.norm_eps)
    w.add_key_length(config.head_dim)
    w.add_value_length(config.head_dim)
    w.add_rope_dimension_count(config.head_dim)
    w.add_file_type(getattr(gguf.LlamaFileType, FILE_TYPES[kind]))
    w.add_vocab_size(config.vocab_size)
    vocab = sentencepiece_vocab(config.vocab_size)
    w.add_tokenizer_model("llama")
    w.add_tokenizer_pre("default")
    w.add_token_list(vocab["tokens"])
    w.add_token_scores(vocab["scores"])
    w.add_token_types(vocab["types"])
    w.add_bos_token_id(vocab["bos"])
    w.add_eos_token_id(vocab["eos"])
    w.add_unk_token_id(vocab["unk"])
    w.add_add_bos_token(True)
    w.add_add_eos_token(False)
    read = 0
    for name, t in tensors.items():
        if t.ndim == 1:
            data, raw = t.astype(np.float32), None
        elif kind == "F16" or not name.startswith("blk."):
            data, raw = t.astype(np.float16), None
        else:
            raw = getattr(Q, kind)
            data = gguf.quants.quantize(t, raw)
        w.add_tensor(name, data, raw_dtype=raw)
        if name != "token_embd.weight" or config.tied_embeddings:
            read += data.nbytes
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return read
