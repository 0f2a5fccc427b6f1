"""RoPE against HF's rotate-half implementation and Mistral's complex-number reference."""

import jax.numpy as jnp
import numpy as np
import torch
from transformers.models.mistral import modeling_mistral

from mistral_jax.checkpoints.convert import interleaved_to_rotate_half
from mistral_jax.model.rope import apply_rope

B, T, N, d = 2, 11, 3, 8


def inputs(theta):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(B, T, N, d)).astype(np.float32)
    positions = np.stack([np.arange(T), np.arange(100, 100 + T)]).astype(np.int32)  # offset row too
    return x, positions


def test_rope_matches_hf():
    theta = 1e6
    x, positions = inputs(theta)
    inv_freq = 1.0 / theta ** (torch.arange(0, d, 2, dtype=torch.float32) / d)
    angles = torch.tensor(positions, dtype=torch.float32)[..., None] * inv_freq  # [B, T, d/2]
    emb = torch.cat([angles, angles], dim=-1)
    xt = torch.tensor(x).transpose(1, 2)  # HF works on [B, N, T, d]
    expected, _ = modeling_mistral.apply_rotary_pos_emb(xt, xt, emb.cos(), emb.sin())
    got = apply_rope(jnp.asarray(x), jnp.asarray(positions), theta)
    np.testing.assert_allclose(got, expected.transpose(1, 2).numpy(), atol=1e-5)


def test_rope_matches_mistral_reference_after_permutation():
    """Mistral's one_file_ref rotates interleaved pairs as complex numbers; permuting the
    features with the converter's permutation turns that into our rotate-half form."""
    theta = 1e4
    x, positions = inputs(theta)
    freqs = 1.0 / theta ** (torch.arange(0, d, 2).float() / d)
    freqs_cis = torch.polar(torch.ones(B, T, d // 2), torch.tensor(positions).float()[..., None] * freqs)
    x_complex = torch.view_as_complex(torch.tensor(x).reshape(B, T, N, d // 2, 2))
    expected = torch.view_as_real(x_complex * freqs_cis[:, :, None]).flatten(3).numpy()

    # The permutation acts on rows of wq (output features): apply it to the feature axis.
    perm = interleaved_to_rotate_half(np.arange(d)[:, None], n_heads=1)[:, 0]
    got = apply_rope(jnp.asarray(x[..., perm]), jnp.asarray(positions), theta)
    np.testing.assert_allclose(got, expected[..., perm], atol=1e-5)
