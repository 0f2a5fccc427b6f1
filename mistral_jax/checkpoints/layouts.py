"""What each parameter is called and how it is laid out in the two PyTorch layouts (HF
transformers, Mistral-native), against the model's (model/transformer.py).

Conversion is a rename, a transpose/reshape per tensor, and one permutation: Mistral-native
wq/wk rows rotate interleaved pairs (2i, 2i+1) while the model (model/rope.py) rotates halves
(i, i + d/2), as HF's rows already do.
"""

from __future__ import annotations

import re

import numpy as np

from mistral_jax.model.config import MistralConfig

# Flax path under `layers` -> (native name, HF name) within layer i, without ".weight".
LAYER_TENSORS = {
    ("attention", "wq"): ("attention.wq", "self_attn.q_proj"),
    ("attention", "wk"): ("attention.wk", "self_attn.k_proj"),
    ("attention", "wv"): ("attention.wv", "self_attn.v_proj"),
    ("attention", "wo"): ("attention.wo", "self_attn.o_proj"),
    ("feed_forward", "w1"): ("feed_forward.w1", "mlp.gate_proj"),
    ("feed_forward", "w2"): ("feed_forward.w2", "mlp.down_proj"),
    ("feed_forward", "w3"): ("feed_forward.w3", "mlp.up_proj"),
    ("attention_norm", "weight"): ("attention_norm", "input_layernorm"),
    ("ffn_norm", "weight"): ("ffn_norm", "post_attention_layernorm"),
}
# With experts (Mixtral) the feed-forward is a router and E experts' SwiGLUs, stacked [E, ...]
# in Flax: expert e's tensors replace {e}.
EXPERT_TENSORS = {
    ("feed_forward", "gate"): ("feed_forward.gate", "block_sparse_moe.gate"),
    ("feed_forward", "w1"): ("feed_forward.experts.{e}.w1", "block_sparse_moe.experts.{e}.w1"),
    ("feed_forward", "w2"): ("feed_forward.experts.{e}.w2", "block_sparse_moe.experts.{e}.w2"),
    ("feed_forward", "w3"): ("feed_forward.experts.{e}.w3", "block_sparse_moe.experts.{e}.w3"),
}
TOP_TENSORS = {
    ("tok_embeddings",): ("tok_embeddings", "model.embed_tokens"),
    ("norm", "weight"): ("norm", "model.norm"),
    ("output",): ("output", "lm_head"),
}
IGNORED = re.compile(r".*rotary_emb\.inv_freq$")  # a buffer older HF .bin files carry
# Where an HF checkpoint keeps the text model, told by the embedding's name: (prefix of what
# MistralForCausalLM calls "model.", prefix of "lm_head"). Mistral3ForConditionalGeneration
# (Mistral Small 3.1, Ministral 3) as transformers >= 5 saves it, and as its hub files (4.x) have it.
HF_TEXT_PREFIXES = {
    "model.embed_tokens.weight": ("model.", ""),
    "model.language_model.embed_tokens.weight": ("model.language_model.", ""),
    "language_model.model.embed_tokens.weight": ("language_model.model.", "language_model."),
}
# What a multimodal checkpoint holds beside its text model (HF and native names), not read.
VISION = re.compile(r"(model\.)?(vision_tower|multi_modal_projector)\.|"
                    r"(vision_encoder|vision_language_adapter|patch_merger|pre_mm_projector_norm)\.")


def top_tensors(c: MistralConfig) -> dict[tuple, tuple[str, str]]:
    """TOP_TENSORS, without `output` when it is the embedding (tied)."""
    return {path: names for path, names in TOP_TENSORS.items() if not (c.tied_embeddings and path == ("output",))}


def layer_tensors(c: MistralConfig) -> dict[tuple, tuple[str, str]]:
    """LAYER_TENSORS, with EXPERT_TENSORS as the feed-forward of a model with experts."""
    if not c.moe:
        return LAYER_TENSORS
    return {**{path: names for path, names in LAYER_TENSORS.items() if path[0] != "feed_forward"},
            **EXPERT_TENSORS}


def tensor_names(layout: str, c: MistralConfig, hf_prefixes: tuple[str, str] = ("model.", "")
                 ) -> dict[tuple[tuple, tuple], str]:
    """(Flax param path, index into it) -> tensor name in a checkpoint of layout; the index
    is () for a top-level param, (layer,) under `layers`, (layer, expert) for an expert's.
    An HF text model under hf_prefixes (HF_TEXT_PREFIXES)."""
    pick = 0 if layout == "native" else 1
    prefix = "layers" if layout == "native" else "model.layers"
    names = {(path, ()): names[pick] + ".weight" for path, names in top_tensors(c).items()}
    for i in range(c.n_layers):
        for path, layer_names in layer_tensors(c).items():
            name = f"{prefix}.{i}.{layer_names[pick]}.weight"
            if "{e}" not in name:
                names[("layers",) + path, (i,)] = name
            for e in range(c.moe.n_experts if "{e}" in name else 0):
                names[("layers",) + path, (i, e)] = name.format(e=e)
    if layout == "hf" and hf_prefixes != ("model.", ""):
        body, head = hf_prefixes
        names = {key: body + name.removeprefix("model.") if name.startswith("model.") else head + name
                 for key, name in names.items()}
    return names


def source_names(layout: str, config: MistralConfig, present, multimodal: bool = False
                 ) -> tuple[dict[tuple[tuple, tuple], str], list[str]]:
    """(tensor_names' keys -> the name of each tensor among `present`, the present tensors not
    read: a multimodal checkpoint's vision encoder and projector; a tied model's copy of its
    embedding as lm_head)."""
    prefixes = ("model.", "")
    if layout == "hf":
        prefixes = next((p for embedding, p in HF_TEXT_PREFIXES.items() if embedding in present), prefixes)
    names = tensor_names(layout, config, prefixes)
    skipped = {name for name in present if multimodal and VISION.match(name)}
    if config.tied_embeddings:  # some writers keep the tied copy too; the model reads the embedding
        head = (prefixes[1] + "lm_head" if layout == "hf" else "output") + ".weight"
        skipped |= {head} & set(present)
    return names, sorted(skipped)


def torch_shape(leaf: str, c: MistralConfig) -> tuple[int, ...]:
    """Shape of a tensor in PyTorch layout ([out, in] for linear weights; one expert's)."""
    D, F, V, d, E = c.dim, c.hidden_dim, c.vocab_size, c.head_dim, c.moe.n_experts if c.moe else 0
    return {"wq": (c.n_heads * d, D), "wk": (c.n_kv_heads * d, D), "wv": (c.n_kv_heads * d, D),
            "wo": (D, c.n_heads * d), "w1": (F, D), "w3": (F, D), "w2": (D, F), "weight": (D,),
            "gate": (E, D), "tok_embeddings": (V, D), "output": (V, D)}[leaf]


def flax_shape(leaf: str, c: MistralConfig) -> tuple[int, ...]:
    """Shape of the model's kernel (one layer's, one expert's) of a tensor."""
    rows, *cols = torch_shape(leaf, c)
    if leaf in ("wq", "wk", "wv"):
        return cols[0], rows // c.head_dim, c.head_dim  # [N*d, D] -> [D, N, d]
    if leaf == "wo":
        return c.n_heads, c.head_dim, rows  # [D, H*d] -> [H, d, D]
    if leaf in ("w1", "w2", "w3", "gate", "output"):
        return cols[0], rows
    return (rows, *cols)


def torch_view(leaf: str, kernel: np.ndarray) -> np.ndarray:
    """A view of the model's (C-contiguous) kernel of a tensor in PyTorch layout: writing the
    tensor into it, or any of its rows, writes the kernel."""
    if leaf in ("wq", "wk", "wv"):
        return kernel.reshape(kernel.shape[0], -1).T  # [D, N, d] as [N*d, D]
    if leaf == "wo":
        return kernel.reshape(-1, kernel.shape[-1]).T  # [H, d, D] as [D, H*d]
    if leaf in ("w1", "w2", "w3", "gate", "output"):
        return kernel.T
    return kernel


def flax_to_torch(leaf: str, w: np.ndarray, c: MistralConfig) -> np.ndarray:
    """The model's kernel of a tensor in PyTorch layout (for writing it)."""
    if leaf in ("wq", "wk", "wv"):
        return w.transpose(1, 2, 0).reshape(-1, c.dim)  # [D, N, d] -> [N*d, D]
    if leaf == "wo":
        return w.transpose(2, 0, 1).reshape(c.dim, -1)  # [H, d, D] -> [D, H*d]
    if leaf in ("w1", "w2", "w3", "gate", "output"):
        return w.T
    return w


def rotate_half_rows(n_rows: int, n_heads: int) -> np.ndarray:
    """[N*d] the row each row of a Mistral-native wq/wk goes to: pair (2i, 2i+1) of each head
    becomes (i, i + d/2), the same permutation as transformers' convert_mistral_weights_to_hf.py."""
    half = n_rows // n_heads // 2
    head, pair, member = np.unravel_index(np.arange(n_rows), (n_heads, half, 2))
    return head * 2 * half + member * half + pair


def interleaved_to_rotate_half(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Mistral-native wq/wk rows [N*d, D] in the model's rotate-half order (rotate_half_rows)."""
    out = np.empty_like(w)
    out[rotate_half_rows(len(w), n_heads)] = w
    return out
