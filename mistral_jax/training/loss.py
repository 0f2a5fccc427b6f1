"""Next-token cross-entropy fused with the output projection.

The logits [B, T, V] are never held whole: sequence positions are taken `chunk` at a time
(a lax.scan), and each chunk is projected onto the vocabulary and reduced at once to log Z
and the target's logit. Differentiated, the forward pass also turns each chunk into its
share of the gradients for the hidden states and the output matrix, since the loss is a
scalar whose cotangent only scales them: the backward pass is one multiply. The matrix
products are the three autodiff would do (logits, then both gradients), but every pass over
the logits is over one chunk, in cache on CPU, and training no longer holds the logits and
their gradient (float32 [B, T, V] each: 4.2 GB apiece at 8 x 4096 with V = 32000).
"""

import functools

import jax
import jax.numpy as jnp

from mistral_jax.runtime.sharding import constrain


def cross_entropy(hidden: jax.Array, output: jax.Array, targets: jax.Array, z_loss: float = 0.0,
                  chunk: int = 128, output_trained: bool = True,
                  weights: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
    """Mean over [B, T] of -log softmax(hidden @ output)[target] + z_loss * log(Z)^2 (with
    weights, their weighted sum).

    Args:
      hidden: [B, T, D], the model's final normed states (Mistral(config, lm_head=False)).
      output: [D, V], the output projection, in the compute dtype.
      targets: int [B, T].
      z_loss: weight of log(Z)^2, a static float.
      chunk: sequence positions projected at a time (a static int); T need not divide.
      output_trained: whether output gets a gradient (static); False for a frozen output (LoRA),
        whose gradient the forward pass then does not compute (its cotangent is zero).
      weights: float32 [B, T], each position's share of the loss (a loss mask over the count of
        trained tokens); default 1 / (B * T) each.
    Returns:
      (loss, ce): ce is the cross-entropy alone, a diagnostic that carries no gradient.
    """
    B, T = targets.shape
    weights = jnp.full((B, T), 1.0 / (B * T), jnp.float32) if weights is None else weights.astype(jnp.float32)
    loss, ce = _fused(hidden, output, targets, jax.lax.stop_gradient(weights), float(z_loss), int(chunk),
                      bool(output_trained))
    return loss, jax.lax.stop_gradient(ce)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6))
def _fused(hidden, output, targets, weights, z_loss, chunk, output_trained):
    return _scan(hidden, output, targets, weights, z_loss, chunk, grads=False)[0]


def _fused_fwd(hidden, output, targets, weights, z_loss, chunk, output_trained):
    losses, d_hidden, d_output = _scan(hidden, output, targets, weights, z_loss, chunk, grads=True,
                                       output_grad=output_trained)
    return losses, (d_hidden, d_output if output_trained else output)  # output: held anyway


def _fused_bwd(z_loss, chunk, output_trained, residuals, cotangents):
    d_hidden, d_output = residuals
    g_loss, _ = cotangents  # ce's gradient is stopped by cross_entropy, the only caller
    if not output_trained:  # frozen: a zero cotangent, which nothing reads
        d_output = jnp.zeros_like(d_output)
    return (g_loss * d_hidden).astype(d_hidden.dtype), (g_loss * d_output).astype(d_output.dtype), None, None


_fused.defvjp(_fused_fwd, _fused_bwd)


def _scan(hidden, output, targets, weights, z_loss, chunk, grads, output_grad=True):
    """((loss, ce), d loss/d hidden, d loss/d output), the gradients only if grads (that of
    output only if output_grad too: None otherwise)."""
    B, T, D = hidden.shape
    n = -(-T // chunk)

    def split(x):  # [B, T, ...] -> [n, B, chunk, ...], zero-padded
        x = jnp.pad(x, [(0, 0), (0, n * chunk - T)] + [(0, 0)] * (x.ndim - 2))
        return x.reshape(B, n, chunk, *x.shape[2:]).swapaxes(0, 1)

    weights = split(weights)  # each token's share of the loss; 0 on padding

    def body(d_output, xs):
        h, t, w = xs
        logits = constrain(jnp.einsum("BTD,DV->BTV", h, output, preferred_element_type=jnp.float32),
                           ("batch", "length", "vocab"))
        top = jnp.max(logits, axis=-1, keepdims=True)
        exp = jnp.exp(logits - top)
        total = jnp.sum(exp, axis=-1)
        log_z = top[..., 0] + jnp.log(total)
        is_target = t[..., None] == jax.lax.broadcasted_iota(jnp.int32, logits.shape, 2)
        target_logit = jnp.sum(jnp.where(is_target, logits, 0.0), axis=-1)
        sums = jnp.sum(w * (log_z - target_logit)), jnp.sum(w * log_z**2)
        if not grads:
            return d_output, sums
        # d loss / d logits = w * (softmax * (1 + 2 z_loss log Z) - onehot(target))
        d_logits = exp * (w * (1 + 2 * z_loss * log_z) / total)[..., None] - jnp.where(is_target, w[..., None], 0.0)
        d_logits = d_logits.astype(output.dtype)
        d_h = jnp.einsum("BTV,DV->BTD", d_logits, output, preferred_element_type=jnp.float32)
        if output_grad:
            d_output = constrain(d_output + jnp.einsum("BTD,BTV->DV", h, d_logits, preferred_element_type=jnp.float32),
                                 ("embed", "vocab"))
        return d_output, (sums, d_h.astype(hidden.dtype))

    xs = split(hidden), split(targets), weights
    if not grads:
        _, (ce, z) = jax.lax.scan(body, None, xs)
        return _total(ce, z, z_loss), None, None
    d_output = constrain(jnp.zeros(output.shape, jnp.float32), ("embed", "vocab")) if output_grad else None
    d_output, ((ce, z), d_hidden) = jax.lax.scan(body, d_output, xs)
    d_hidden = d_hidden.swapaxes(0, 1).reshape(B, n * chunk, D)[:, :T]
    return _total(ce, z, z_loss), d_hidden, None if d_output is None else d_output.astype(output.dtype)


def _total(ce, z, z_loss):
    ce = jnp.sum(ce)
    return ce + z_loss * jnp.sum(z), ce


def sequence_logprobs(hidden: jax.Array, output: jax.Array, targets: jax.Array, mask: jax.Array,
                      chunk: int = 128) -> jax.Array:
    """float32 [B]: each row's sum over positions where mask [B, T] is 1 of
    log softmax(hidden @ output)[target] (hidden [B, T, D], output [D, V], targets [B, T]): a
    sequence's log-probability, what preference losses compare (DPO). Differentiable as it is:
    `chunk` positions' logits at a time, each chunk recomputed in the backward pass, so the
    logits [B, T, V] are never held whole."""
    B, T, D = hidden.shape
    n = -(-T // chunk)

    def split(x):
        x = jnp.pad(x, [(0, 0), (0, n * chunk - T)] + [(0, 0)] * (x.ndim - 2))
        return x.reshape(B, n, chunk, *x.shape[2:]).swapaxes(0, 1)

    @jax.checkpoint
    def one_chunk(h, t, m):
        logits = jnp.einsum("BTD,DV->BTV", h, output, preferred_element_type=jnp.float32)
        target_logit = jnp.take_along_axis(logits, t[..., None], axis=-1)[..., 0]
        return jnp.sum(m * (target_logit - jax.nn.logsumexp(logits, axis=-1)), axis=-1)

    def body(total, xs):
        return total + one_chunk(*xs), None

    xs = split(hidden), split(targets), split(mask.astype(jnp.float32))
    return jax.lax.scan(body, jnp.zeros((B,), jnp.float32), xs)[0]
