"""The fused cross-entropy's loss and gradients vs HF transformers' PyTorch Mistral autograd."""

import copy

import jax
import numpy as np
import pytest
import torch

from mistral_jax.checkpoints.convert import load_pytorch
from mistral_jax.training import trainer


@pytest.fixture(scope="module")
def hf_gradients(ref_windowed, tmp_path_factory):
    """{z_loss: (loss, ce, gradients as our params)}: HF's autograd, its gradients written as a
    checkpoint and read back by our converter (gradients re-lay out as the weights do)."""
    out = {}
    for z_loss in (0.0, 1e-2):
        model = copy.deepcopy(ref_windowed.model)
        tokens = torch.from_numpy(ref_windowed.tokens).long()
        logits = model(tokens[:, :-1]).logits.float()
        log_z = torch.logsumexp(logits, dim=-1)
        ce = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), tokens[:, 1:].reshape(-1))
        loss = ce + z_loss * (log_z**2).mean()
        loss.backward()
        with torch.no_grad():
            for p in model.parameters():
                p.copy_(p.grad)
        directory = tmp_path_factory.mktemp(f"grads_{z_loss}")
        model.save_pretrained(directory)
        out[z_loss] = loss.item(), ce.item(), load_pytorch(str(directory))[1]
    return out


# T = 68 positions: chunk 16 leaves a padded last chunk, 128 is one chunk longer than T.
@pytest.mark.parametrize("z_loss,chunk", [(0.0, 16), (1e-2, 16), (1e-2, 128), (0.0, 1)])
def test_loss_and_gradients_match_pytorch(ref_windowed, hf_gradients, z_loss, chunk):
    config, params = load_pytorch(ref_windowed.dir)
    grad_fn = jax.jit(jax.value_and_grad(trainer.loss_fn, has_aux=True), static_argnums=(1, 3, 4))
    (loss, metrics), grads = grad_fn(params, config, ref_windowed.tokens, z_loss, chunk)
    ce = metrics["ce"]
    hf_loss, hf_ce, hf_grads = hf_gradients[z_loss]
    assert abs(float(loss) - hf_loss) < 1e-5 * hf_loss and abs(float(ce) - hf_ce) < 1e-5 * hf_ce
    # Undifferentiated (as evaluation runs it), the loss takes the path without the gradients' products.
    undifferentiated = jax.jit(trainer.loss_fn, static_argnums=(1, 3, 4))(params, config, ref_windowed.tokens,
                                                                          z_loss, chunk)
    assert abs(float(undifferentiated[0]) - hf_loss) < 1e-5 * hf_loss
    flat, _ = jax.tree_util.tree_flatten_with_path(grads)
    hf_flat = dict(jax.tree_util.tree_flatten_with_path(hf_grads)[0])
    assert len(flat) == len(hf_flat)
    for path, g in flat:
        hf_g = np.asarray(hf_flat[path])
        assert np.abs(np.asarray(g) - hf_g).max() < 1e-4 * np.abs(hf_g).max(), jax.tree_util.keystr(path)

