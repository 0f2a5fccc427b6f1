"""mistral_jax: the Mistral transformer family in JAX/Flax.

The library's folders, each importing only those above it (docs/DESIGN.md, "Layers"):
runtime/ (platforms, mesh and sharding, processes, locks, options, CLI helpers), text/
(tokenizers and chat formats), model/ (the config, RoPE, attention, experts, the KV cache,
the Flax modules), checkpoints/ (files on disk both ways: orbax, safetensors and PyTorch
files, conversion, integrity, verification), inference/ (sampling), training/ (data, loss,
LoRA, metrics, the training loop and run), plans/ (programs compiled ahead of time for TPU
slices).

The public names below are importable from here; each loads its module on first use, so
that importing a light module (mistral_jax.runtime.cli, mistral_jax.runtime.platforms) does
not load JAX.
"""

import importlib

_PUBLIC = {
    # the model
    "MistralConfig": "model.config",
    "ConfigError": "model.config",
    "MoE": "model.config",
    "Mistral": "model.transformer",
    "init_params": "model.transformer",
    "abstract_params": "model.transformer",
    "param_shardings": "model.transformer",
    "unstack_layers": "model.transformer",
    "KVCache": "model.cache",
    # tokens
    "Tokenizer": "text.tokenizer",
    "StreamDecoder": "text.streaming",
    # checkpoints
    "load_pytorch": "checkpoints.convert",
    "save_hf": "checkpoints.convert",
    "convert_pytorch_checkpoint": "checkpoints.convert",
    "export_hf_checkpoint": "checkpoints.convert",
    "CheckpointError": "checkpoints.convert",
    "save_checkpoint": "checkpoints.store",
    "load_checkpoint": "checkpoints.store",
    "compare_with_pytorch": "checkpoints.verify",
    # sampling
    "generate": "inference.sampling",
    "generate_stream": "inference.sampling",
    "Sampler": "inference.sampling",
    # training
    "cross_entropy": "training.loss",
    "LoRA": "training.lora",
    "load_peft": "training.lora",
    "save_peft": "training.lora",
    # devices
    "make_mesh": "runtime.sharding",
}
__all__ = list(_PUBLIC)


def __getattr__(name: str):
    if name not in _PUBLIC:
        raise AttributeError(f"module 'mistral_jax' has no attribute {name!r}")
    return getattr(importlib.import_module(f"mistral_jax.{_PUBLIC[name]}"), name)


def __dir__():
    return sorted(set(globals()) | set(_PUBLIC))
