"""What each parameter is called and how it is laid out in the two PyTorch layouts (HF
transformers, Mistral-native), against the model's (model/layers.py).

Conversion is a rename, a view of the model's kernel in PyTorch's layout (`torch_view`, which
reading writes into and writing reads from), and one permutation: Mistral-native wq/wk rows,
and both layouts' rope rows of latent attention, rotate interleaved pairs (2i, 2i+1) while the
model (model/rope.py) rotates halves (i, i + d/2), as HF's wq/wk rows already do. A tensor may
hold several parameters' rows: HF's fused experts, gate_up_proj [E, 2F, D], are w1 then w3.
"""

from __future__ import annotations

import re
from typing import NamedTuple

import numpy as np

from mistral_jax.model.config import MistralConfig

# Flax path under a stack -> (native name, HF name) within layer i, without ".weight".
ATTENTION_TENSORS = {
    ("attention", "wq"): ("attention.wq", "self_attn.q_proj"),
    ("attention", "wk"): ("attention.wk", "self_attn.k_proj"),
    ("attention", "wv"): ("attention.wv", "self_attn.v_proj"),
    ("attention", "wo"): ("attention.wo", "self_attn.o_proj"),
}
LATENT_ATTENTION_TENSORS = {
    ("attention", "wq_a"): ("attention.wq_a", "self_attn.q_a_proj"),
    ("attention", "q_a_norm", "weight"): ("attention.q_a_norm", "self_attn.q_a_layernorm"),
    ("attention", "wq_b"): ("attention.wq_b", "self_attn.q_b_proj"),
    ("attention", "wkv_a_with_mqa"): ("attention.wkv_a_with_mqa", "self_attn.kv_a_proj_with_mqa"),
    ("attention", "kv_a_norm", "weight"): ("attention.kv_a_norm", "self_attn.kv_a_layernorm"),
    ("attention", "wkv_b"): ("attention.wkv_b", "self_attn.kv_b_proj"),
    ("attention", "wo"): ("attention.wo", "self_attn.o_proj"),
}
FEED_FORWARD_TENSORS = {
    ("feed_forward", "w1"): ("feed_forward.w1", "mlp.gate_proj"),
    ("feed_forward", "w2"): ("feed_forward.w2", "mlp.down_proj"),
    ("feed_forward", "w3"): ("feed_forward.w3", "mlp.up_proj"),
}
NORM_TENSORS = {
    ("attention_norm", "weight"): ("attention_norm", "input_layernorm"),
    ("ffn_norm", "weight"): ("ffn_norm", "post_attention_layernorm"),
}
LAYER_TENSORS = {**ATTENTION_TENSORS, **FEED_FORWARD_TENSORS, **NORM_TENSORS}  # a dense layer's
# Mixtral's experts, stacked [E, ...] in Flax: expert e's tensors replace {e}.
EXPERT_TENSORS = {
    ("feed_forward", "gate"): ("feed_forward.gate", "block_sparse_moe.gate"),
    ("feed_forward", "w1"): ("feed_forward.experts.{e}.w1", "block_sparse_moe.experts.{e}.w1"),
    ("feed_forward", "w2"): ("feed_forward.experts.{e}.w2", "block_sparse_moe.experts.{e}.w2"),
    ("feed_forward", "w3"): ("feed_forward.experts.{e}.w3", "block_sparse_moe.experts.{e}.w3"),
}
# Fine-grained experts (Mistral Small 4, Large 3): native directly under the layer, an expert
# per tensor; HF's every expert in one tensor (an "@" names the whole tensor, no ".weight"),
# w1 and w3 as the two halves of gate_up_proj's rows.
FINE_GRAINED_EXPERT_TENSORS = {
    ("feed_forward", "gate"): ("gate", "mlp.gate"),
    ("feed_forward", "w1"): ("experts.{e}.w1", "@mlp.experts.gate_up_proj:0"),
    ("feed_forward", "w2"): ("experts.{e}.w2", "@mlp.experts.down_proj"),
    ("feed_forward", "w3"): ("experts.{e}.w3", "@mlp.experts.gate_up_proj:1"),
}
SHARED_EXPERT_TENSORS = {
    ("feed_forward", "shared_experts", "w1"): ("shared_experts.w1", "mlp.shared_experts.gate_proj"),
    ("feed_forward", "shared_experts", "w2"): ("shared_experts.w2", "mlp.shared_experts.down_proj"),
    ("feed_forward", "shared_experts", "w3"): ("shared_experts.w3", "mlp.shared_experts.up_proj"),
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
# The vision encoder's and projector's (model/vision.py), under `vision`: Flax path -> (native
# name, HF name, without the prefix of Mistral3ForConditionalGeneration's model: `vision_prefix`).
VISION_TENSORS = {
    ("encoder", "patch_conv"): ("vision_encoder.patch_conv", "vision_tower.patch_conv"),
    ("encoder", "ln_pre", "weight"): ("vision_encoder.ln_pre", "vision_tower.ln_pre"),
    ("norm", "weight"): ("pre_mm_projector_norm", "multi_modal_projector.norm"),
    ("projector", "merging_layer"): ("patch_merger.merging_layer", "multi_modal_projector.patch_merger.merging_layer"),
    ("projector", "w_in"): ("vision_language_adapter.w_in", "multi_modal_projector.linear_1"),
    ("projector", "w_out"): ("vision_language_adapter.w_out", "multi_modal_projector.linear_2"),
}
# An encoder layer's, under native `vision_encoder.transformer.layers.i.` and HF
# `vision_tower.transformer.layers.i.`: the text block's native names, HF's own projections' names.
VISION_LAYER_TENSORS = {
    ("attention", "wq"): ("attention.wq", "attention.q_proj"),
    ("attention", "wk"): ("attention.wk", "attention.k_proj"),
    ("attention", "wv"): ("attention.wv", "attention.v_proj"),
    ("attention", "wo"): ("attention.wo", "attention.o_proj"),
    ("feed_forward", "w1"): ("feed_forward.w1", "feed_forward.gate_proj"),
    ("feed_forward", "w2"): ("feed_forward.w2", "feed_forward.down_proj"),
    ("feed_forward", "w3"): ("feed_forward.w3", "feed_forward.up_proj"),
    ("attention_norm", "weight"): ("attention_norm", "attention_norm"),
    ("ffn_norm", "weight"): ("ffn_norm", "ffn_norm"),
}


class Tensor(NamedTuple):
    """Where a parameter (one layer's, one expert's) lies in a checkpoint: a tensor, and the
    share of its rows (axis −2) when it holds several parameters: `part` of `parts`."""

    name: str
    part: int = 0
    parts: int = 1

    def rows(self, w: np.ndarray) -> np.ndarray:
        """This parameter's rows of the tensor w (a view)."""
        if self.parts == 1:
            return w
        n = w.shape[-2] // self.parts
        return w[..., self.part * n:(self.part + 1) * n, :]


def top_tensors(c: MistralConfig) -> dict[tuple, tuple[str, str]]:
    """TOP_TENSORS, without `output` when it is the embedding (tied)."""
    return {path: names for path, names in TOP_TENSORS.items() if not (c.tied_embeddings and path == ("output",))}


def layer_tensors(c: MistralConfig) -> dict[tuple, tuple[str, str]]:
    """A layer's tensors, for a stack's config: its attention (grouped-query or latent), norms
    and feed-forward (dense, Mixtral's experts, or fine-grained ones with shared experts)."""
    if c.mla is None:
        attention = ATTENTION_TENSORS
    else:
        attention = {path: names for path, names in LATENT_ATTENTION_TENSORS.items()
                     if c.mla.q_lora_rank is not None or path[1] not in ("wq_a", "q_a_norm", "wq_b")}
        if c.mla.q_lora_rank is None:
            attention = {("attention", "wq"): ATTENTION_TENSORS[("attention", "wq")], **attention}
    if c.moe is None:
        feed_forward = FEED_FORWARD_TENSORS
    elif c.mla is None and not c.moe.n_shared_experts:
        feed_forward = EXPERT_TENSORS
    else:
        feed_forward = {**FINE_GRAINED_EXPERT_TENSORS, **(SHARED_EXPERT_TENSORS if c.moe.n_shared_experts else {})}
    return {**attention, **NORM_TENSORS, **feed_forward}


def tensor_names(layout: str, c: MistralConfig, hf_prefixes: tuple[str, str] | None = None
                 ) -> dict[tuple[tuple, tuple], Tensor]:
    """(Flax param path, index into it) -> its Tensor in a checkpoint of layout. The index is ()
    for a top-level param, (layer,) under a stack, (layer, expert) for an expert's; a tensor of
    every expert (HF's fused ones) has the index (layer,). Layers are numbered across the
    stacks (config.stacks); an HF text model lies under hf_prefixes (HF_TEXT_PREFIXES; by
    default MistralForCausalLM's, or with a vision encoder Mistral3ForConditionalGeneration's as
    transformers' save_pretrained writes it, the hub's names), its vision encoder beside it."""
    if hf_prefixes is None:
        hf_prefixes = ("language_model.model.", "language_model.") if c.vision else ("model.", "")
    pick = 0 if layout == "native" else 1
    prefix = "layers" if layout == "native" else "model.layers"
    names = {(path, ()): Tensor(names[pick] + ".weight") for path, names in top_tensors(c).items()}
    first = 0
    for stack_name, stack in c.stacks:
        for i in range(stack.n_layers):
            for path, layer_names in layer_tensors(stack).items():
                key, name = (stack_name,) + path, layer_names[pick]
                if name.startswith("@"):  # every expert in one tensor, maybe one part of its rows
                    name, _, part = name[1:].partition(":")
                    names[key, (i,)] = Tensor(f"{prefix}.{first + i}.{name}", int(part or 0), 2 if part else 1)
                elif "{e}" in name:
                    for e in range(stack.moe.n_experts):
                        names[key, (i, e)] = Tensor(f"{prefix}.{first + i}.{name.format(e=e)}.weight")
                else:
                    names[key, (i,)] = Tensor(f"{prefix}.{first + i}.{name}.weight")
        first += stack.n_layers
    if layout == "hf" and hf_prefixes != ("model.", ""):
        body, head = hf_prefixes
        names = {key: t._replace(name=body + t.name.removeprefix("model.") if t.name.startswith("model.")
                                 else head + t.name) for key, t in names.items()}
    if c.vision is not None:
        names.update(vision_tensor_names(layout, c, vision_prefix(hf_prefixes)))
    return names


def vision_prefix(hf_prefixes: tuple[str, str]) -> str:
    """Where an HF checkpoint keeps the vision tower and projector, beside its text model: under
    "model." with the text model under "model.language_model." (transformers' modules in
    memory), at the top with it under "language_model.model." (the hub's files, as save_pretrained
    writes them)."""
    return "model." if hf_prefixes[0].startswith("model.") else ""


def vision_tensor_names(layout: str, c: MistralConfig, prefix: str) -> dict[tuple[tuple, tuple], Tensor]:
    """tensor_names' entries of the vision encoder and projector (config.vision)."""
    pick = 0 if layout == "native" else 1
    prefix = "" if layout == "native" else prefix
    names = {(("vision",) + path, ()): Tensor(prefix + pair[pick] + ".weight") for path, pair in VISION_TENSORS.items()}
    layers = "vision_encoder.transformer.layers" if layout == "native" else "vision_tower.transformer.layers"
    for i in range(c.vision.n_layers):
        for path, pair in VISION_LAYER_TENSORS.items():
            names[("vision", "encoder", "layers") + path, (i,)] = Tensor(f"{prefix}{layers}.{i}.{pair[pick]}.weight")
    return names


def source_names(layout: str, config: MistralConfig, present
                 ) -> tuple[dict[tuple[tuple, tuple], Tensor], list[str]]:
    """(tensor_names' keys -> the Tensor of each among `present`, the present tensors not read:
    a tied model's copy of its embedding as lm_head)."""
    prefixes = ("model.", "")
    if layout == "hf":
        prefixes = next((p for embedding, p in HF_TEXT_PREFIXES.items() if embedding in present), prefixes)
    names = tensor_names(layout, config, prefixes)
    skipped = set()
    if config.tied_embeddings:  # some writers keep the tied copy too; the model reads the embedding
        head = (prefixes[1] + "lm_head" if layout == "hf" else "output") + ".weight"
        skipped |= {head} & set(present)
    return names, sorted(skipped)


def torch_view(leaf: str, kernel: np.ndarray) -> np.ndarray:
    """A view of the model's (C-contiguous) kernel of a parameter in PyTorch's layout ([out,
    in]; [E, out, in] for every expert's): writing the tensor into it, or any of its rows, writes
    the kernel; reading it gives the tensor."""
    if leaf in ("wq", "wk", "wv", "wq_b", "wkv_b"):
        return kernel.reshape(kernel.shape[0], -1).T  # [in, N, d] as [N*d, in]
    if leaf == "wo":
        return kernel.reshape(-1, kernel.shape[-1]).T  # [H, d, D] as [D, H*d]
    if leaf in ("w1", "w2", "w3", "gate", "output", "wq_a", "wkv_a_with_mqa", "merging_layer", "w_in", "w_out"):
        return np.swapaxes(kernel, -1, -2)
    if leaf == "patch_conv":
        return np.moveaxis(kernel, -1, 0)  # [C, p, p, Dv] as torch's Conv2d weight [Dv, C, p, p]
    return kernel


def rows_of(path: tuple, config: MistralConfig, layout: str, rope_interleave: bool = True) -> np.ndarray | None:
    """row_order of the parameter at Flax path: the vision encoder's native wq/wk rotate
    interleaved pairs of its heads as the text model's do."""
    if path[0] != "vision":
        return row_order(path[-1], config, layout, rope_interleave)
    v = config.vision
    if layout != "native" or path[-1] not in ("wq", "wk"):
        return None
    return rotate_half_rows(v.dim, v.n_heads)


def row_order(leaf: str, config: MistralConfig, layout: str, rope_interleave: bool = True) -> np.ndarray | None:
    """Where each row of a checkpoint's tensor goes in the model's order: the rotate-half
    place of each rope row stored as interleaved pairs (native wq/wk; latent attention's query
    and key rope rows, in both layouts unless an HF config says rope_interleave false), or None
    (rows in place)."""
    m = config.mla
    if m is not None and not rope_interleave:
        return None
    if m is None:
        if layout != "native" or leaf not in ("wq", "wk"):
            return None
        heads = config.n_heads if leaf == "wq" else config.n_kv_heads
        return rotate_half_rows(heads * config.head_dim, heads)
    if leaf in ("wq", "wq_b"):  # per head: its no-rope rows, then its rope rows
        order = np.arange(config.n_heads * m.qk_head_dim).reshape(config.n_heads, m.qk_head_dim)
        order[:, m.qk_nope_head_dim:] = order[:, m.qk_nope_head_dim:][:, rotate_half_rows(m.qk_rope_head_dim, 1)]
        return order.reshape(-1)
    if leaf == "wkv_a_with_mqa":  # the latent's rows, then the shared key's rope rows
        order = np.arange(m.kv_lora_rank + m.qk_rope_head_dim)
        order[m.kv_lora_rank:] = order[m.kv_lora_rank:][rotate_half_rows(m.qk_rope_head_dim, 1)]
        return order
    return None


def rotate_half_rows(n_rows: int, n_heads: int) -> np.ndarray:
    """[N*d] the row each row of an interleaved rope layout (Mistral-native wq/wk, latent
    attention's rope rows: row_order) goes to: pair (2i, 2i+1) of each head
    becomes (i, i + d/2), the same permutation as transformers' convert_mistral_weights_to_hf.py."""
    half = n_rows // n_heads // 2
    head, pair, member = np.unravel_index(np.arange(n_rows), (n_heads, half, 2))
    return head * 2 * half + member * half + pair


def interleaved_to_rotate_half(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Mistral-native wq/wk rows [N*d, D] in the model's rotate-half order (rotate_half_rows)."""
    out = np.empty_like(w)
    out[rotate_half_rows(len(w), n_heads)] = w
    return out
