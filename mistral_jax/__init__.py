"""mistral_jax: the Mistral transformer in JAX/Flax.

The public names below load their modules on first use, so that importing a light module
(mistral_jax.cli, mistral_jax.platforms) does not load JAX.
"""

import importlib

_PUBLIC = {
    "MistralConfig": "mistral_jax.config",
    "Mistral": "mistral_jax.model",
    "Tokenizer": "mistral_jax.tokenizer",
    "load_pytorch": "mistral_jax.convert",
    "save_checkpoint": "mistral_jax.checkpoint",
    "load_checkpoint": "mistral_jax.checkpoint",
    "generate": "mistral_jax.sampling",
}
__all__ = list(_PUBLIC)


def __getattr__(name: str):
    if name not in _PUBLIC:
        raise AttributeError(f"module 'mistral_jax' has no attribute {name!r}")
    return getattr(importlib.import_module(_PUBLIC[name]), name)


def __dir__():
    return sorted(set(globals()) | set(_PUBLIC))
