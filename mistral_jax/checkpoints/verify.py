"""Checks a conversion by running the PyTorch model of the source checkpoint beside ours.

Needs torch and transformers. Both sides compute in float32 on the same weights (the
source rounded to the converted dtype), so a difference above float32 noise means a
conversion error, whatever dtype was converted to.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from mistral_jax.checkpoints import fp8
from mistral_jax.checkpoints.convert import find_source
from mistral_jax.checkpoints.layouts import rows_of, source_names, tensor_names
from mistral_jax.checkpoints.tensor_files import read_tensor_file, to_numpy
from mistral_jax.model.config import MistralConfig
from mistral_jax.model.transformer import Mistral


@dataclasses.dataclass
class Comparison:
    max_abs_diff: float
    logit_scale: float  # max |logit| of the PyTorch model
    top1_agreement: float
    n_tokens: int
    n_images: int = 0  # images in the prompts compared

    def ok(self, tolerance: float) -> bool:
        """max |diff| within tolerance relative to the logits' scale (at least 1)."""
        return self.max_abs_diff <= tolerance * max(1.0, self.logit_scale)


def pytorch_model(src: str, config: MistralConfig):
    """transformers' model of the source checkpoint's weights: MistralForCausalLM,
    MinistralForCausalLM for per-layer windows, MixtralForCausalLM for experts,
    Ministral3ForCausalLM for Llama 4's query scale, Mistral4ForCausalLM for latent attention,
    Mistral3ForConditionalGeneration around one of them with a vision encoder, as
    config.to_hf_dict says; each weight read from the source on its own (FP8 ones dequantized,
    rope rows put in HF's order), rounded to config.param_dtype and held in float32."""
    import torch

    if config.hf_obstacle:
        raise ValueError(f"--verify needs a transformers model of the checkpoint, and there is none: "
                         f"{config.hf_obstacle}")
    source = find_source(src)
    hf_config, model_class = hf_model_class(config)
    with torch.device("meta"):
        model = model_class(hf_config)
    contents = {name: tensors for tensors in map(read_tensor_file, source.files) for name in tensors}
    names, _ = source_names(source.layout, config, set(contents))
    scales, _ = fp8.scales_of(contents)

    def source_rows(key: tuple) -> np.ndarray:
        """A parameter as the source holds it, dequantized, its rows in HF's order."""
        tensor, path = names[key], key[0]
        w = tensor.rows(to_numpy(contents[tensor.name][tensor.name]))
        if w.dtype in fp8.FLOAT8:
            scale = scales[tensor.name]
            w = fp8.dequantize(scale, w, to_numpy(contents[scale][scale]), source.fp8_block)
        # The model built here interleaves its rope rows (to_hf_dict), whatever the source does.
        model_order = rows_of(path, config, source.layout, source.rope_interleave)
        hf_order = rows_of(path, config, "hf")
        if model_order is not None:
            w = np.asarray(w)[np.argsort(model_order)]  # the model's row order, as the converter writes it
        return w if hf_order is None else np.asarray(w)[..., hf_order, :]

    parts: dict[str, dict[int, np.ndarray]] = {}
    in_memory = ("model.", "") if config.vision is None else ("model.language_model.", "")  # the modules' names
    for (path, index), hf in tensor_names("hf", config, in_memory).items():
        if (path, index) in names:
            w = source_rows((path, index))
        else:  # HF's every expert in one tensor, the source's one per expert
            w = np.stack([source_rows((path, index + (e,))) for e in range(config.stacks[-1][1].moe.n_experts)])
        parts.setdefault(hf.name, {})[hf.part] = np.asarray(w).astype(jnp.dtype(config.param_dtype)).astype(np.float32)
    state = {name: torch.from_numpy(np.concatenate([p[k] for k in sorted(p)], axis=-2) if len(p) > 1 else p[0])
             for name, p in parts.items()}
    text_model = model.model if config.vision is None else model.model.language_model
    body = "model." if config.vision is None else "model.language_model."
    if config.tied_embeddings:
        state["lm_head.weight"] = state[body + "embed_tokens.weight"]
    if config.moe and config.mla is None:
        state = _fused_experts(state, config, body)
    model.load_state_dict(state, strict=True, assign=True)
    # The rotary frequencies are computed buffers, not checkpoint tensors: build them for real.
    text_model.rotary_emb = type(text_model.rotary_emb)(config=text_model.config)
    if config.vision is not None:
        tower = model.model.vision_tower
        tower.patch_positional_embedding = type(tower.patch_positional_embedding)(config=tower.config)
    return model.eval()


def hf_model_class(config: MistralConfig, attention: str = "eager"):
    """(transformers' config of config.to_hf_dict() with that attention implementation, the model
    class that computes it): MistralForCausalLM, ..., Mistral3ForConditionalGeneration around one."""
    import transformers

    hf_dict = config.to_hf_dict()
    if config.vision is None:
        kind = HF_CLASSES[hf_dict["model_type"]]
        return (getattr(transformers, f"{kind}Config")(**hf_dict, attn_implementation=attention),
                getattr(transformers, f"{kind}ForCausalLM"))
    text = hf_dict["text_config"]
    text_config = getattr(transformers, f"{HF_CLASSES[text['model_type']]}Config")(**text)
    return (transformers.Mistral3Config(**{**hf_dict, "text_config": text_config}, attn_implementation=attention),
            transformers.Mistral3ForConditionalGeneration)


# config.json's model_type -> the transformers class that computes it
HF_CLASSES = {"mistral": "Mistral", "ministral": "Ministral", "mixtral": "Mixtral", "ministral3": "Ministral3",
              "mistral4": "Mistral4"}


def _fused_experts(state: dict, config: MistralConfig, body: str) -> dict:
    """MixtralForCausalLM's hub tensor names (block_sparse_moe.experts.E.w1, ...) -> those of
    its modules in memory (transformers >= 5 holds each layer's experts as one mlp.experts
    tensor: gate_up_proj [E, 2F, D], w1 then w3, and down_proj [E, D, F])."""
    import torch

    for i in range(config.n_layers):
        old = f"{body}layers.{i}.block_sparse_moe."
        new = f"{body}layers.{i}.mlp."
        experts = [{w: state.pop(f"{old}experts.{e}.{w}.weight") for w in ("w1", "w2", "w3")}
                   for e in range(config.moe.n_experts)]
        state[new + "gate.weight"] = state.pop(old + "gate.weight")
        state[new + "experts.gate_up_proj"] = torch.stack([torch.cat([x["w1"], x["w3"]]) for x in experts])
        state[new + "experts.down_proj"] = torch.stack([x["w2"] for x in experts])
    return state


def compare_with_pytorch(src: str, config: MistralConfig, params, n_tokens: int = 256, seed: int = 0) -> Comparison:
    """Logits of both models on 2 x n_tokens random tokens; with a vision encoder, on those
    tokens again with an image of its own size in each row (image_prompts), as well."""
    import torch

    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, config.vocab_size, (2, n_tokens), dtype=np.int32)
    f32 = config.replace(dtype="float32", param_dtype="float32")
    params32 = jax.tree_util.tree_map(lambda x: jnp.asarray(x, jnp.float32), params)
    model = pytorch_model(src, config)
    runs = [(tokens, None)]
    if config.vision is not None and n_tokens > IMAGE_TOKENS:
        runs.append(image_prompts(config, tokens, rng))
    forward = jax.jit(Mistral(f32).apply)
    got, expected = [], []
    for tokens, images in runs:
        with torch.no_grad():
            expected.append(model(torch.from_numpy(tokens).long(), **_pixels(images)).logits.numpy())
        got.append(np.asarray(forward({"params": params32}, tokens, images=images)))
    got, expected = np.stack(got), np.stack(expected)
    return Comparison(max_abs_diff=float(np.abs(got - expected).max()), logit_scale=float(np.abs(expected).max()),
                      top1_agreement=float((got.argmax(-1) == expected.argmax(-1)).mean()),
                      n_tokens=got.shape[0] * tokens.size, n_images=2 * (len(runs) - 1))


IMAGE_TOKENS = 12  # what image_prompts puts in a row: 2 x 3 or 3 x 2 image tokens, a break after each row


def image_prompts(config: MistralConfig, tokens: np.ndarray, rng: np.random.Generator
                  ) -> tuple[np.ndarray, list[list[np.ndarray]]]:
    """tokens [2, T] with an image's tokens laid out as mistral-common does ([IMG] row by row, each
    row closed by [IMG_BREAK], the last by [IMG_END]) after the first token of each row (T >
    IMAGE_TOKENS), and the images: random pixels [C, H, W], 2 x 3 image tokens in the first row
    and 3 x 2 in the second."""
    v = config.vision
    tokens = np.where(tokens == v.image_token_id, (v.image_token_id + 1) % config.vocab_size, tokens)
    images = []
    for row, (h, w) in enumerate([(2, 3), (3, 2)]):
        block = ([v.image_token_id] * w + [v.image_break_token_id]) * h
        block[-1] = v.image_end_token_id
        tokens[row, 1:1 + len(block)] = block
        side = v.pixels_per_token
        images.append([rng.standard_normal((v.num_channels, h * side, w * side), dtype=np.float32)])
    return tokens, images


def _pixels(images) -> dict:
    """transformers' pixel_values (the images padded to the largest, stacked) and image_sizes."""
    import torch

    if images is None:
        return {}
    flat = [image for row in images for image in row]
    H, W = max(i.shape[1] for i in flat), max(i.shape[2] for i in flat)
    pixels = np.zeros((len(flat), flat[0].shape[0], H, W), np.float32)
    for n, image in enumerate(flat):
        pixels[n, :, :image.shape[1], :image.shape[2]] = image
    return {"pixel_values": torch.from_numpy(pixels), "image_sizes": torch.tensor([i.shape[1:] for i in flat])}
