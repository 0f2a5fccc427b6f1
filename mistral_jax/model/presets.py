"""Named configs of the released models: MistralConfig's fields of each (MistralConfig.preset).

Each is read off its release's config.json / params.json; tests/test_config.py checks each
parameter count against transformers' own model of that config.
"""

from __future__ import annotations

from typing import Any

from mistral_jax.model.config_groups import LatentAttention, Llama4Scaling, MoE, Vision, YaRN

_MISTRAL_7B = dict(dim=4096, n_layers=32, head_dim=128, hidden_dim=14336, n_heads=32, n_kv_heads=8,
                   vocab_size=32000, norm_eps=1e-5, rope_theta=1e4, sliding_window=4096)
_MIXTRAL_8X22B = dict(dim=6144, n_layers=56, head_dim=128, hidden_dim=16384, n_heads=48, n_kv_heads=8,
                      vocab_size=32000, rope_theta=1e6, max_seq_len=65536, moe=MoE(8, 2, router_aux_loss_coef=0.001))

_MINISTRAL_3 = dict(head_dim=128, n_heads=32, n_kv_heads=8, vocab_size=131072, norm_eps=1e-5, rope_theta=1e6,
                    max_seq_len=262144, yarn=YaRN(16.0, 16384, mscale=1.0, mscale_all_dim=1.0),
                    llama_4_scaling=Llama4Scaling(0.1, 16384))

# Mistral Small 4 and Large 3: DeepSeek-V3's block (model/layers.LatentAttention, fine-grained
# experts) with Mistral's vocabulary and Llama 4's query scale.
_MISTRAL_LARGE_3_KIND = dict(n_heads=32, vocab_size=131072, norm_eps=1e-6, rope_theta=1e4,
                             llama_4_scaling=Llama4Scaling(0.1, 8192))

PRESETS: dict[str, dict[str, Any]] = {
    "mistral-7b-v0.1": _MISTRAL_7B,
    "mistral-7b-v0.2": {**_MISTRAL_7B, "rope_theta": 1e6, "sliding_window": None},
    "mistral-7b-v0.3": {**_MISTRAL_7B, "rope_theta": 1e6, "sliding_window": None, "vocab_size": 32768},
    # mistralai/Ministral-8B-Instruct-2410 (one full-attention layer, then three with a 32k
    # window; max_position_embeddings 32768, the model card's context 128k).
    "ministral-8b": dict(dim=4096, n_layers=36, head_dim=128, hidden_dim=12288, n_heads=32, n_kv_heads=8,
                         vocab_size=131072, rope_theta=1e8, sliding_window=(None, 32768, 32768, 32768),
                         max_seq_len=32768),
    # mistralai/Mistral-Nemo-Base-2407 (head_dim 128 != 5120 / 32).
    "mistral-nemo-12b": dict(dim=5120, n_layers=40, head_dim=128, hidden_dim=14336, n_heads=32, n_kv_heads=8,
                             vocab_size=131072, rope_theta=1e6, max_seq_len=1024000),
    # mistralai/Mistral-Small-24B-Base-2501.
    "mistral-small-24b": dict(dim=5120, n_layers=40, head_dim=128, hidden_dim=32768, n_heads=32, n_kv_heads=8,
                              vocab_size=131072, rope_theta=1e8, max_seq_len=32768),
    # mistralai/Codestral-22B-v0.1.
    "codestral-22b": dict(dim=6144, n_layers=56, head_dim=128, hidden_dim=16384, n_heads=48, n_kv_heads=8,
                          vocab_size=32768, rope_theta=1e6, max_seq_len=32768),
    # mistralai/Mixtral-8x7B-v0.1: eight experts of Mistral 7B's feed-forward, two per token.
    "mixtral-8x7b-v0.1": {**_MISTRAL_7B, "rope_theta": 1e6, "sliding_window": None,
                          "moe": MoE(8, 2, router_aux_loss_coef=0.02)},
    # mistralai/Mixtral-8x22B-v0.1; v0.3 is the same model with v3's vocabulary of 32768 (Mistral's
    # mixtral-8x22B-v0.3 release, and the HF files of Mixtral-8x22B-Instruct-v0.1).
    "mixtral-8x22b-v0.1": _MIXTRAL_8X22B,
    "mixtral-8x22b-v0.3": {**_MIXTRAL_8X22B, "vocab_size": 32768},
    # The Mistral 3 generation (December 2025 on): Mistral's dense block with YaRN and Llama 4's
    # query scale, 131k Tekken vocabulary. No mistralai config.json or params.json could be read
    # here (no network): the values are those of transformers' Ministral3Config defaults (written
    # against Ministral-3-8B-Base-2512), the Ministral 3 paper (arXiv 2601.08584: widths, depths,
    # tied 3B) and converters that mirror the released files (Megatron-Bridge's providers,
    # tt-metal's Devstral 2 model args); each count is tested against transformers' own model of
    # the config and the model cards' rounded sizes (tests/test_mistral3.py). Not verified: the
    # 14B's YaRN (the family's 16 x 16384 assumed), Devstral Small 2's max_position_embeddings
    # (8192 x 48 inferred), Devstral 2's untied output (the 125.0B it gives is its card's "123B"
    # class; tied would be 123.4B).
    "ministral-3-3b": dict(dim=3072, n_layers=26, hidden_dim=9216, tied_embeddings=True, **_MINISTRAL_3),
    "ministral-3-8b": dict(dim=4096, n_layers=34, hidden_dim=14336, **_MINISTRAL_3),
    "ministral-3-14b": dict(dim=5120, n_layers=40, hidden_dim=16384, **{**_MINISTRAL_3, "rope_theta": 1e9}),
    # mistralai/Devstral-Small-2-24B-Instruct-2512: Mistral Small 3's shape with Ministral 3's rope.
    "devstral-small-2-24b": dict(dim=5120, n_layers=40, hidden_dim=32768, **{
        **_MINISTRAL_3, "rope_theta": 1e8, "max_seq_len": 393216,
        "yarn": YaRN(48.0, 8192, mscale=1.0, mscale_all_dim=1.0), "llama_4_scaling": Llama4Scaling(0.1, 8192)}),
    # mistralai/Devstral-2-123B-Instruct-2512: YaRN's magnitude on (mscale_all_dim 0), beta_fast 4,
    # no query scale (beta 0).
    "devstral-2-123b": dict(dim=12288, n_layers=88, hidden_dim=28672, **{
        **_MINISTRAL_3, "n_heads": 96, "yarn": YaRN(64.0, 4096, beta_fast=4.0, mscale=1.0, mscale_all_dim=0.0),
        "llama_4_scaling": Llama4Scaling(0.0, 4096)}),
    # mistralai/Mistral-Small-4-119B-2603 (transformers' Mistral4Config defaults are its
    # config.json): latent attention with a low-rank query, 128 fine-grained experts (4 routed, 1
    # shared) in every layer, YaRN over half of each query/key head (the rope slice).
    "mistral-small-4": dict(dim=4096, n_layers=36, hidden_dim=12288, head_dim=128, n_kv_heads=32,
                            **_MISTRAL_LARGE_3_KIND,
                            mla=LatentAttention(256, 64, 64, 128, q_lora_rank=1024), max_seq_len=1048576,
                            moe=MoE(128, 4, hidden_dim=2048, n_shared_experts=1),
                            yarn=YaRN(128.0, 8192, mscale=1.0, mscale_all_dim=1.0)),
    # mistralai/Mistral-Large-3-675B-Instruct-2512's language model (DeepSeek-V3's shape with
    # 128 wider experts, 4 routed; three dense layers first; vLLM's MistralLarge3ForCausalLM
    # reads its params.json): the card's 675B less its 2.5B vision encoder. max_seq_len is the
    # card's 256k (vLLM's default --max-model-len).
    "mistral-large-3": dict(dim=7168, n_layers=61, hidden_dim=16384, head_dim=192, n_kv_heads=128,
                            **{**_MISTRAL_LARGE_3_KIND, "n_heads": 128},
                            mla=LatentAttention(512, 128, 64, 128, q_lora_rank=1536), max_seq_len=262144,
                            moe=MoE(128, 4, hidden_dim=4096, n_shared_experts=1, first_k_dense_replace=3),
                            yarn=YaRN(36.0, 8192, mscale=1.0, mscale_all_dim=1.0)),
    # The default model of train.py: ~15.7M parameters, trained on a laptop CPU in minutes.
    "mistral-15m": dict(dim=384, n_layers=6, head_dim=64, hidden_dim=1024, n_heads=6, n_kv_heads=2,
                        vocab_size=8192, rope_theta=1e4, sliding_window=256, max_seq_len=1024),
}

# The Pixtral vision encoder (0.4B) and Mistral 3 projector of Mistral Small 3.1 and of the
# Ministral 3 family (each card's "0.4B vision encoder"): transformers' Mistral3Config vision
# defaults with the SiLU the released files state. A preset is a text model; a vision model is
# `MistralConfig.preset(name, vision=PIXTRAL)`.
PIXTRAL = Vision(dim=1024, hidden_dim=4096, n_layers=24, n_heads=16, patch_size=14, image_size=1540, act="silu")
