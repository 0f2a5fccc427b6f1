"""RoPE against HF's rotate-half implementation and Mistral's complex-number reference; YaRN's
frequencies and magnitude against transformers' _compute_yarn_parameters; Llama 4's query scale
against worked values around the original length."""

import math

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
from transformers.models.mistral import modeling_mistral

from mistral_jax.checkpoints.layouts import interleaved_to_rotate_half
from mistral_jax.model.config import Llama4Scaling, YaRN
from mistral_jax.model.rope import apply_rope, frequencies, query_scale

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
    got = apply_rope(jnp.asarray(x), jnp.asarray(positions), frequencies(d, theta)[0])
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
    got = apply_rope(jnp.asarray(x[..., perm]), jnp.asarray(positions), frequencies(d, theta)[0])
    np.testing.assert_allclose(got, expected[..., perm], atol=1e-5)


# (head_dim, theta, YaRN): Ministral 3 8B's and Devstral 2's published rope parameters, a short
# original length (the tests' models), no truncation, an explicit attention_factor.
YARNS = [
    (128, 1e6, YaRN(16.0, 16384, 32.0, 1.0, mscale=1.0, mscale_all_dim=1.0)),
    (128, 1e6, YaRN(64.0, 4096, 4.0, 1.0, mscale=1.0, mscale_all_dim=0.0)),
    (16, 1e4, YaRN(16.0, 32, 32.0, 1.0)),
    (24, 1e6, YaRN(8.0, 64, 16.0, 2.0, mscale=0.7, mscale_all_dim=0.9, truncate=False)),
    (64, 1e8, YaRN(4.0, 256, attention_factor=1.25)),
]


@pytest.mark.parametrize("head_dim,theta,yarn", YARNS)
def test_yarn_equals_transformers(head_dim, theta, yarn):
    """The inverse frequencies and the cos/sin factor of transformers' own YaRN (float32)."""
    rope = {"rope_type": "yarn", "rope_theta": theta, "factor": yarn.factor, "beta_fast": yarn.beta_fast,
            "beta_slow": yarn.beta_slow, "original_max_position_embeddings": yarn.original_max_position_embeddings,
            "truncate": yarn.truncate}
    rope.update({k: getattr(yarn, k) for k in ("mscale", "mscale_all_dim", "attention_factor")
                 if getattr(yarn, k) is not None})
    length = int(yarn.factor * yarn.original_max_position_embeddings)
    config = transformers.MistralConfig(hidden_size=head_dim * 4, num_attention_heads=4, head_dim=head_dim,
                                        rope_parameters=rope, max_position_embeddings=length)
    expected, factor = ROPE_INIT_FUNCTIONS["yarn"](config, "cpu")
    inverse, scale = frequencies(head_dim, theta, yarn)
    # Ours are the exact values rounded once to float32; transformers rounds at each float32 step
    # (its pow and the blend of the ramp included), which leaves some up to 4 ulp away.
    np.testing.assert_array_max_ulp(inverse, expected.numpy(), maxulp=4)
    assert scale == pytest.approx(factor, rel=1e-12)
    # The slowest pair is interpolated by the factor, the fastest kept: what a missing ramp loses.
    plain = frequencies(head_dim, theta)[0]
    assert inverse[0] == plain[0] and inverse[-1] == pytest.approx(plain[-1] / yarn.factor, rel=1e-6)


def test_yarn_worked_example():
    """d 16, theta 1e4, original length 32, factor 16: pair i turns 32 * theta^(-2i/16) / (2 pi)
    times over the original length; beta_fast 32 (turned >= 32 times: kept) is pair
    floor(16 ln(32 / 64 pi) / (2 ln 1e4)) = floor(-1.60), clipped to 0, beta_slow 1 (turned once) is pair
    ceil(16 ln(32 / 2 pi) / (2 ln 1e4)) = ceil(1.41) = 2: pair 0 kept, 1 half-way, 2+ divided by 16."""
    inverse, scale = frequencies(16, 1e4, YaRN(16.0, 32))
    plain = 1e4 ** -(np.arange(0, 16, 2) / 16)
    ramp = np.array([0, 0.5, 1, 1, 1, 1, 1, 1])
    np.testing.assert_allclose(inverse, plain / 16 * ramp + plain * (1 - ramp), rtol=1e-6)
    assert scale == pytest.approx(0.1 * math.log(16) + 1)  # no mscale given: YaRN's own magnitude


def test_llama_4_query_scale_worked_values():
    """1 below the original length, 1 + beta ln 2 from it to twice it, then 1 + beta ln 3, ...;
    padding (-1) scaled as position 0."""
    scaling = Llama4Scaling(beta=0.1, original_max_position_embeddings=32)
    positions = jnp.array([[0, 31, 32, 63, 64, 95, 96, 32 * 1000 - 1, -1]])
    expected = 1 + 0.1 * np.log([1, 1, 2, 2, 3, 3, 4, 1000, 1])
    np.testing.assert_allclose(query_scale(positions, scaling)[0], expected, rtol=1e-6)
    # A scale without floor() would move by 1/32 of ln-steps within a period: a planted bug.
    assert not np.allclose(1 + 0.1 * np.log1p(np.asarray(positions[0, :7]) / 32), expected[:7], rtol=1e-3)


def test_rope_scale_multiplies_cos_and_sin():
    """apply_rope(..., scale) is the rotation times scale (YaRN's magnitude on q and on k)."""
    x, positions = inputs(1e4)
    inverse = frequencies(d, 1e4)[0]
    np.testing.assert_allclose(apply_rope(jnp.asarray(x), jnp.asarray(positions), inverse, 1.25),
                               1.25 * np.asarray(apply_rope(jnp.asarray(x), jnp.asarray(positions), inverse)),
                               rtol=1e-6, atol=1e-6)
