"""mistral_jax: the Mistral transformer in JAX/Flax."""

from mistral_jax.checkpoint import load_checkpoint, save_checkpoint
from mistral_jax.config import MistralConfig
from mistral_jax.convert import load_pytorch
from mistral_jax.model import Mistral
from mistral_jax.sampling import generate
from mistral_jax.tokenizer import Tokenizer

__all__ = ["MistralConfig", "Mistral", "Tokenizer", "load_pytorch", "save_checkpoint", "load_checkpoint",
           "generate"]
