"""mistral_jax: the Mistral transformer in JAX/Flax."""

from mistral_jax.checkpoint import load_checkpoint, save_checkpoint
from mistral_jax.config import MistralConfig
from mistral_jax.convert import load_pytorch
from mistral_jax.model import Mistral

__all__ = ["MistralConfig", "Mistral", "load_pytorch", "save_checkpoint", "load_checkpoint"]
