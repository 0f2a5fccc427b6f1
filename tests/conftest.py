"""Shared fixtures: reference checkpoints written by HF transformers' PyTorch Mistral."""

import dataclasses
import functools
import gc
import os
import re
import sys

os.environ.setdefault("JAX_PLATFORMS", "cpu")  # libtpu is installed as a compile target only

import jax
import mistral_common
import numpy as np
import pytest

from mistral_jax import Mistral

jax.config.update("jax_numpy_rank_promotion", "raise")


@pytest.fixture(scope="module", autouse=True)
def _release_compiled_programs():
    """After each module, drop JAX's compiled programs: each executable XLA:CPU keeps holds
    memory mappings of its own (~3 per program), and in one process the whole suite's grew
    past 36,000 by 43% of it, toward Linux's 65530 per process (vm.max_map_count); XLA's
    compiler crashed (a segfault) at 83%, twice."""
    yield
    jax.clear_caches()
    gc.collect()


@functools.partial(jax.jit, static_argnums=0)
def forward(config, params, tokens):
    return Mistral(config).apply({"params": params}, tokens)


@dataclasses.dataclass
class Reference:
    """An HF MistralForCausalLM (or Ministral..., Mixtral...) with strong random weights,
    saved, and its logits on `tokens`."""

    dir: str
    model: object  # transformers.MistralForCausalLM
    tokens: np.ndarray  # int [B, T]
    logits: np.ndarray  # float32 [B, T, V]
    window: int | None


# HF's default init (std 0.02, norm weights 1) makes attention nearly uniform, so a wrong
# window or RoPE permutation would hide under the tolerance. These weights make it peaky.
WEIGHT_STD = 0.2


def strengthen(model) -> None:
    """model's weights redrawn strong: norm weights uniform in [0.5, 1.5], the rest N(0, WEIGHT_STD)."""
    import torch

    with torch.no_grad():
        for name, p in model.named_parameters():
            p.uniform_(0.5, 1.5) if name.endswith("norm.weight") else p.normal_(0.0, WEIGHT_STD)


def build_reference(tmp_dir, *, seed, window, seq_len, kind="Mistral", **hf_config) -> Reference:
    import torch
    import transformers

    torch.manual_seed(seed)
    windows = {} if kind == "Mistral4" else {"sliding_window": window}  # Mistral4 attends to every key
    config = getattr(transformers, f"{kind}Config")(**{
        **windows, "attn_implementation": "eager", "tie_word_embeddings": False,
        "max_position_embeddings": 512, **hf_config})
    model = getattr(transformers, f"{kind}ForCausalLM")(config).eval()
    strengthen(model)
    with torch.no_grad():
        model.save_pretrained(tmp_dir)
        tokens = torch.randint(0, config.vocab_size, (2, seq_len))
        logits = model(tokens).logits.float().numpy()
    return Reference(str(tmp_dir), model, tokens.numpy(), logits, window)


WINDOW = 16


@pytest.fixture(scope="session")
def ref_windowed(tmp_path_factory):
    """v0.1-like: sliding window, rope_theta 1e4, GQA 4/2, head_dim != dim / n_heads."""
    return build_reference(tmp_path_factory.mktemp("hf_windowed"), seed=0, window=WINDOW,
                           seq_len=4 * WINDOW + 5, hidden_size=64, num_hidden_layers=3,
                           num_attention_heads=4, num_key_value_heads=2, head_dim=24,
                           intermediate_size=160, vocab_size=320, rope_theta=1e4)


@pytest.fixture(scope="session")
def ref_full(tmp_path_factory):
    """v0.3-like: no window, rope_theta 1e6, a single kv head."""
    return build_reference(tmp_path_factory.mktemp("hf_full"), seed=1, window=None, seq_len=69,
                           hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                           num_key_value_heads=1, head_dim=16, intermediate_size=128,
                           vocab_size=352, rope_theta=1e6)


MINISTRAL_LAYERS = ["full_attention", "sliding_attention", "sliding_attention", "sliding_attention"] * 2


@pytest.fixture(scope="session")
def ref_ministral(tmp_path_factory):
    """Ministral-like: one full-attention layer then three sliding ones, twice; rope_theta 1e8."""
    return build_reference(tmp_path_factory.mktemp("hf_ministral"), seed=2, window=WINDOW, kind="Ministral",
                           layer_types=MINISTRAL_LAYERS, seq_len=4 * WINDOW + 5, hidden_size=64,
                           num_hidden_layers=len(MINISTRAL_LAYERS), num_attention_heads=4, num_key_value_heads=2,
                           head_dim=16, intermediate_size=128, vocab_size=288, rope_theta=1e8,
                           rms_norm_eps=1e-5)


MIXTRAL = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
               intermediate_size=96, vocab_size=256, rope_theta=1e6, router_jitter_noise=0.0)


@pytest.fixture(scope="session")
def ref_mixtral(tmp_path_factory):
    """Mixtral-like: 4 experts, top-2, a sliding window, T > 4W; the router's weights as strong as the rest."""
    return build_reference(tmp_path_factory.mktemp("hf_mixtral"), seed=4, window=WINDOW, kind="Mixtral",
                           seq_len=4 * WINDOW + 5, num_local_experts=4, num_experts_per_tok=2, **MIXTRAL)


# The Mistral 3 generation's rope: YaRN over a short original length (so every test sequence runs
# several times past it), with YaRN's magnitude on (mscale_all_dim 0, as Devstral 2) and Llama 4's
# query scale.
ORIGINAL_LENGTH = 16
MINISTRAL3_ROPE = {"rope_type": "yarn", "rope_theta": 1e6, "factor": 16.0, "beta_fast": 32.0, "beta_slow": 1.0,
                   "original_max_position_embeddings": ORIGINAL_LENGTH, "mscale": 1.0, "mscale_all_dim": 0.0,
                   "llama_4_scaling_beta": 0.1}


@pytest.fixture(scope="session")
def ref_ministral3(tmp_path_factory):
    """Ministral 3-like (Devstral Small 2's shape, scaled down): YaRN and the query scale, a sliding
    window, T > 4 original lengths."""
    return build_reference(tmp_path_factory.mktemp("hf_ministral3"), seed=5, window=WINDOW, kind="Ministral3",
                           seq_len=4 * WINDOW + 5, hidden_size=64, num_hidden_layers=3, num_attention_heads=4,
                           num_key_value_heads=2, head_dim=16, intermediate_size=128, vocab_size=288,
                           rope_parameters=MINISTRAL3_ROPE, max_position_embeddings=256)


@pytest.fixture(scope="session")
def ref_ministral3_tied(tmp_path_factory):
    """Ministral 3 3B-like: tied embeddings, no window, YaRN with no magnitude (mscale =
    mscale_all_dim = 1, as the released 3B/8B/14B), the query scale over a longer original length."""
    rope = {**MINISTRAL3_ROPE, "original_max_position_embeddings": 24, "mscale_all_dim": 1.0, "factor": 8.0}
    return build_reference(tmp_path_factory.mktemp("hf_ministral3_tied"), seed=6, window=None, kind="Ministral3",
                           seq_len=4 * WINDOW + 5, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                           num_key_value_heads=1, head_dim=16, intermediate_size=128, vocab_size=320,
                           rope_parameters=rope, tie_word_embeddings=True, max_position_embeddings=192)


# Mistral Small 4's shape, scaled down: latent attention (q through a low-rank bottleneck; v
# narrower than the keys), 8 fine-grained experts, top-3, a shared expert, the first layer dense,
# a routed scale, YaRN with mscale² in the softmax and the query scale past a short original length.
MISTRAL4 = dict(hidden_size=64, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=4, vocab_size=256,
                q_lora_rank=48, kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=12,
                intermediate_size=96, moe_intermediate_size=24, n_routed_experts=8, num_experts_per_tok=3,
                n_shared_experts=1, first_k_dense_replace=1, routed_scaling_factor=1.5,
                max_position_embeddings=256,
                rope_parameters={"rope_type": "yarn", "rope_theta": 1e4, "factor": 16.0, "beta_fast": 32.0,
                                 "beta_slow": 1.0, "original_max_position_embeddings": ORIGINAL_LENGTH,
                                 "mscale": 1.0, "mscale_all_dim": 1.0, "llama_4_scaling_beta": 0.1})


@pytest.fixture(scope="session")
def ref_mistral4(tmp_path_factory):
    """Mistral4ForCausalLM (Mistral Small 4's text model, scaled down), T > 4 original lengths."""
    return build_reference(tmp_path_factory.mktemp("hf_mistral4"), seed=9, window=None, kind="Mistral4",
                           seq_len=4 * ORIGINAL_LENGTH + 5, **MISTRAL4)


@pytest.fixture(params=["ref_windowed", "ref_full"])
def reference(request) -> Reference:
    return request.getfixturevalue(request.param)


REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BUNDLED = os.path.join(os.path.dirname(mistral_common.__file__), "data")  # mistral-common's copies of the releases
REAL_TOKENIZER = os.path.join(BUNDLED, "tokenizer.model.v1")


def run_script(capsys, script, *argv):
    """A CLI script's main() in this process, as `python script.py argv...` runs it:
    (exit status, stdout, stderr)."""
    from mistral_jax.runtime import cli

    def exit_here(status):  # cli.run ends a failed process whose library threads linger; not pytest's
        raise SystemExit(status)

    sys_argv, sys.argv = sys.argv, [script.__name__ + ".py", *map(str, argv)]
    os_exit, cli.os._exit = cli.os._exit, exit_here  # that path runs for real in a subprocess test
    try:
        with pytest.raises(SystemExit) as exit_:
            cli.run(script.main)
    finally:
        sys.argv, cli.os._exit = sys_argv, os_exit
    out = capsys.readouterr()
    return exit_.value.code, out.out, out.err


def assert_one_line_error(status, err, pattern):
    """A failed run that said why in one line starting with "error: ", and no traceback."""
    assert status != 0
    assert "Traceback" not in err
    last = err.strip().splitlines()[-1]
    assert last.startswith("error: ") and re.search(pattern, last), err
