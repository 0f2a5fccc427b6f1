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

from mistral_jax.checkpoints.convert import find_checkpoint, interleaved_to_rotate_half, read_config, source_names, tensor_names
from mistral_jax.checkpoints.tensor_files import read_tensor_file, to_numpy
from mistral_jax.model.config import MistralConfig
from mistral_jax.model.transformer import Mistral


@dataclasses.dataclass
class Comparison:
    max_abs_diff: float
    logit_scale: float  # max |logit| of the PyTorch model
    top1_agreement: float
    n_tokens: int

    def ok(self, tolerance: float) -> bool:
        """max |diff| within tolerance relative to the logits' scale (at least 1)."""
        return self.max_abs_diff <= tolerance * max(1.0, self.logit_scale)


def pytorch_model(src: str, config: MistralConfig):
    """transformers' MistralForCausalLM (MinistralForCausalLM for per-layer windows,
    MixtralForCausalLM for experts) holding the source checkpoint's (text model's) weights,
    rounded to config.param_dtype and held in float32."""
    import torch
    import transformers

    layout, files = find_checkpoint(src)
    hf_dict = config.to_hf_dict()
    kind = {"ministral": "Ministral", "mixtral": "Mixtral"}.get(hf_dict["model_type"], "Mistral")
    hf_config = getattr(transformers, f"{kind}Config")(**hf_dict, attn_implementation="eager")
    with torch.device("meta"):
        model = getattr(transformers, f"{kind}ForCausalLM")(hf_config)
    contents = [read_tensor_file(file) for file in files]
    present = {name for c in contents for name in c}
    names, _ = source_names(layout, config, present, read_config(src, layout)[1])
    to_hf = {names[key]: hf_name for key, hf_name in tensor_names("hf", config).items()}
    state = {}
    for tensors in contents:
        for name, tensor in tensors.items():
            if name not in to_hf:  # a vision tensor, or HF's rotary buffer
                continue
            w = to_numpy(tensor)
            name = to_hf[name]
            if layout == "native":
                if name.endswith(("q_proj.weight", "k_proj.weight")):
                    n_heads = config.n_heads if "q_proj" in name else config.n_kv_heads
                    w = interleaved_to_rotate_half(w, n_heads)
            rounded = np.asarray(w).astype(jnp.dtype(config.param_dtype)).astype(np.float32)
            state[name] = torch.from_numpy(rounded)
    if config.moe:
        state = _fused_experts(state, config)
    model.load_state_dict(state, strict=True, assign=True)
    # The rotary frequencies are a computed buffer, not a checkpoint tensor: build them for real.
    model.model.rotary_emb = type(model.model.rotary_emb)(config=hf_config)
    return model.eval()


def _fused_experts(state: dict, config: MistralConfig) -> dict:
    """MixtralForCausalLM's hub tensor names (block_sparse_moe.experts.E.w1, ...) -> those of
    its modules in memory (transformers >= 5 holds each layer's experts as one mlp.experts
    tensor: gate_up_proj [E, 2F, D], w1 then w3, and down_proj [E, D, F])."""
    import torch

    for i in range(config.n_layers):
        old = f"model.layers.{i}.block_sparse_moe."
        new = f"model.layers.{i}.mlp."
        experts = [{w: state.pop(f"{old}experts.{e}.{w}.weight") for w in ("w1", "w2", "w3")}
                   for e in range(config.moe.n_experts)]
        state[new + "gate.weight"] = state.pop(old + "gate.weight")
        state[new + "experts.gate_up_proj"] = torch.stack([torch.cat([x["w1"], x["w3"]]) for x in experts])
        state[new + "experts.down_proj"] = torch.stack([x["w2"] for x in experts])
    return state


def compare_with_pytorch(src: str, config: MistralConfig, params, n_tokens: int = 256, seed: int = 0) -> Comparison:
    """Logits of both models on 2 x n_tokens random tokens."""
    import torch

    tokens = np.random.default_rng(seed).integers(0, config.vocab_size, (2, n_tokens), dtype=np.int32)
    with torch.no_grad():
        expected = pytorch_model(src, config)(torch.from_numpy(tokens).long()).logits.numpy()
    f32 = config.replace(dtype="float32", param_dtype="float32")
    params32 = jax.tree_util.tree_map(lambda x: jnp.asarray(x, jnp.float32), params)
    got = np.asarray(jax.jit(Mistral(f32).apply)({"params": params32}, tokens))
    return Comparison(max_abs_diff=float(np.abs(got - expected).max()), logit_scale=float(np.abs(expected).max()),
                      top1_agreement=float((got.argmax(-1) == expected.argmax(-1)).mean()), n_tokens=tokens.size)
