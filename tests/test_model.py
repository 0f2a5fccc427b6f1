"""Model properties against references: bf16 against PyTorch's own bf16, remat against no
remat, parameter count against HF, the layer stack compiled once."""

import copy
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from conftest import forward
from mistral_jax import Mistral, MistralConfig
from mistral_jax.checkpoints.convert import load_pytorch


def test_bfloat16_is_as_accurate_as_pytorch_bfloat16(ref_windowed):
    """bf16 compute stays within a stated tolerance of the float32 reference logits.

    Tolerance: mean |error| at most 1.25x that of HF transformers running the same model in
    bfloat16, and at most 5% of the logits' standard deviation. (These strong random weights
    make the model chaotic, so a trained model fares better than this.)
    """
    with torch.no_grad():
        hf_bf16 = copy.deepcopy(ref_windowed.model).to(torch.bfloat16)
        torch_logits = hf_bf16(torch.tensor(ref_windowed.tokens)).logits.float().numpy()
    torch_error = np.abs(torch_logits - ref_windowed.logits).mean()

    config, params = load_pytorch(ref_windowed.dir, "float32")
    mixed = np.asarray(forward(config.replace(dtype="bfloat16"), params, ref_windowed.tokens))
    config16, params16 = load_pytorch(ref_windowed.dir, "bfloat16")
    assert jax.tree_util.tree_leaves(params16)[0].dtype == jnp.bfloat16
    pure = np.asarray(forward(config16, params16, ref_windowed.tokens))
    assert mixed.dtype == pure.dtype == np.float32  # logits always float32
    # Casting weights at use or at storage gives the same bits.
    np.testing.assert_array_equal(mixed, pure)

    error = np.abs(pure - ref_windowed.logits).mean()
    assert error <= 1.25 * torch_error, (error, torch_error)
    assert error <= 0.05 * ref_windowed.logits.std()


def test_parameter_count_matches_hf(reference):
    config, params = load_pytorch(reference.dir)
    count = sum(x.size for x in jax.tree_util.tree_leaves(params))
    assert count == config.num_params == reference.model.num_parameters()


def test_initialised_params_match_converted_structure(ref_windowed):
    """init() and the converter produce the same tree, shapes and logical axes per leaf."""
    config, converted = load_pytorch(ref_windowed.dir)
    boxed = jax.eval_shape(Mistral(config).init, jax.random.key(0), jnp.zeros((1, 4), jnp.int32))["params"]
    shapes = jax.tree_util.tree_map(lambda x: x.shape, nn.unbox(boxed))
    assert shapes == jax.tree_util.tree_map(lambda x: x.shape, converted)
    axes = nn.get_partition_spec(boxed)
    assert axes["layers"]["attention"]["wq"] == jax.sharding.PartitionSpec("layers", "embed", "heads", "head_dim")
    assert axes["layers"]["attention"]["wk"] == jax.sharding.PartitionSpec("layers", "embed", "kv_heads", "head_dim")
    assert axes["output"] == jax.sharding.PartitionSpec("embed", "vocab")


@pytest.mark.parametrize("policy", ["full", "dots", "dots_no_batch"])
def test_remat_changes_memory_not_math(ref_windowed, policy):
    config, params = load_pytorch(ref_windowed.dir)
    tokens = jnp.asarray(ref_windowed.tokens)

    @functools.partial(jax.jit, static_argnums=1)
    def grads(params, remat):
        def loss(params):
            logits = Mistral(config.replace(remat=remat)).apply({"params": params}, tokens)
            return -jnp.mean(jax.nn.log_softmax(logits)[..., 0])
        return jax.grad(loss)(params)

    assert "remat" in str(jax.make_jaxpr(grads.__wrapped__, static_argnums=1)(params, policy))
    assert "remat" not in str(jax.make_jaxpr(grads.__wrapped__, static_argnums=1)(params, "none"))
    for a, b in zip(jax.tree_util.tree_leaves(grads(params, "none")), jax.tree_util.tree_leaves(grads(params, policy))):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_layer_stack_compiles_once():
    """nn.scan: the program does not grow with depth."""
    def program_size(n_layers):
        config = MistralConfig.preset("mistral-15m", n_layers=n_layers)
        params = jax.eval_shape(Mistral(config).init, jax.random.key(0), jnp.zeros((1, 8), jnp.int32))
        return len(jax.jit(Mistral(config).apply).lower(params, jax.ShapeDtypeStruct((1, 8), jnp.int32)).as_text())

    assert program_size(24) < 1.05 * program_size(2)
