"""Train state, the jitted train and eval steps, and the FLOP count behind MFU.

One `jax.jit` per step with explicit in/out shardings and the state donated; gradient
accumulation is a `lax.scan` over micro-batches inside it. Nothing in a step syncs with the
host: the loop fetches metrics when it chooses to.
"""

from __future__ import annotations

import dataclasses
import math
import os
import signal
import time
from typing import Any

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import optax
from jax.sharding import NamedSharding, PartitionSpec

from mistral_jax import checkpoint
from mistral_jax.config import MistralConfig
from mistral_jax.loss import cross_entropy
from mistral_jax.metrics import MetricsWriter
from mistral_jax.model import Mistral
from mistral_jax.sharding import batch_sharding, param_shardings, under_mesh


@flax.struct.dataclass
class TrainState:
    step: jax.Array
    params: Any
    opt_state: Any


@dataclasses.dataclass(frozen=True)
class Hyperparameters:
    steps: int = 150
    batch_size: int = 8  # sequences per step, all hosts together
    seq_len: int = 256
    grad_accum: int = 1  # micro-batches per step
    lr: float = 3e-3
    warmup: int = 15
    final_lr_fraction: float = 0.1
    weight_decay: float = 0.1
    clip: float = 1.0
    b1: float = 0.9
    b2: float = 0.95
    z_loss: float = 0.0  # weight of log(Z)^2, which keeps the softmax normaliser near 1
    loss_chunk: int = 128  # sequence positions whose logits the loss holds at a time
    seed: int = 0


def learning_rate(hp: Hyperparameters) -> optax.Schedule:
    """Linear warmup to lr, then cosine decay to lr * final_lr_fraction at the last step."""
    warmup = max(0, min(hp.warmup, hp.steps - 1))
    return optax.warmup_cosine_decay_schedule(0.0, hp.lr, warmup, max(hp.steps, warmup + 1),
                                              end_value=hp.lr * hp.final_lr_fraction)


def decay_mask(params) -> Any:
    """Weight decay on the projection matrices only: not on norms, not on the embedding."""
    return jax.tree_util.tree_map_with_path(
        lambda path, _: path[-1].key not in ("weight", "tok_embeddings"), params)


def clip_by_global_norm(max_norm: float) -> optax.GradientTransformation:
    """Scales gradients by min(1, max_norm / global norm), as optax.clip_by_global_norm, but
    as one multiply by a scalar, which XLA fuses into the Adam update instead of keeping a
    second gradient-sized buffer of clipped gradients (it did on CPU: +3.6 GB per device
    for 7B on 8 devices)."""
    def update(grads, state, params=None):
        del params
        norm = optax.tree.norm(grads)
        scale = jnp.where(norm > max_norm, max_norm / norm, 1.0)
        return jax.tree_util.tree_map(lambda g: g * scale.astype(g.dtype), grads), state

    return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


def make_optimizer(hp: Hyperparameters) -> optax.GradientTransformation:
    return optax.chain(
        clip_by_global_norm(hp.clip),
        optax.adamw(learning_rate(hp), b1=hp.b1, b2=hp.b2, weight_decay=hp.weight_decay, mask=decay_mask))


def loss_fn(params, config: MistralConfig, batch: jax.Array, z_loss: float, chunk: int = 128):
    """Mean next-token cross-entropy of batch [B, T+1] (plus z-loss); returns (loss, ce), ce
    without gradient. The output projection is fused into the loss (loss.cross_entropy)."""
    inputs, targets = batch[:, :-1], batch[:, 1:]
    hidden = Mistral(config, lm_head=False).apply({"params": params}, inputs)
    return cross_entropy(hidden, params["output"].astype(config.dtype), targets, z_loss, chunk)


def _init_params(config: MistralConfig, key: jax.Array):
    return nn.unbox(Mistral(config).init(key, jnp.zeros((1, 1), jnp.int32))["params"])


def abstract_state(config: MistralConfig, tx: optax.GradientTransformation, mesh) -> TrainState:
    """The train state's shapes, dtypes and shardings, with nothing allocated: params per the
    rules table, Adam's moments as their params, scalars (the step, Adam's count) replicated."""
    replicated = NamedSharding(mesh, PartitionSpec())
    params_sharding = param_shardings(config, mesh)
    params = jax.tree_util.tree_map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                                    jax.eval_shape(lambda key: _init_params(config, key), jax.random.key(0)),
                                    params_sharding)
    opt_state = optax.tree_map_params(
        tx, lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), jax.eval_shape(tx.init, params),
        params_sharding, transform_non_params=lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=replicated))
    return TrainState(step=jax.ShapeDtypeStruct((), jnp.int32, sharding=replicated), params=params,
                      opt_state=opt_state)


def init_state(config: MistralConfig, tx: optax.GradientTransformation, mesh, seed: int = 0,
               params=None) -> TrainState:
    """A train state born sharded over mesh: fresh params from seed, or the given ones placed."""
    shardings = state_shardings(abstract_state(config, tx, mesh))
    if params is None:
        params = jax.jit(_init_params, static_argnums=0, out_shardings=shardings.params)(config, jax.random.key(seed))
    else:
        params = jax.tree_util.tree_map(lambda x, s: jax.device_put(jnp.asarray(x, config.param_dtype), s),
                                        params, shardings.params)
    opt_state = jax.jit(tx.init, out_shardings=shardings.opt_state)(params)
    return TrainState(step=jax.device_put(jnp.zeros((), jnp.int32), shardings.step), params=params,
                      opt_state=opt_state)


def state_shardings(state: TrainState):
    return jax.tree_util.tree_map(lambda x: x.sharding, state)


def make_train_step(config: MistralConfig, tx: optax.GradientTransformation, hp: Hyperparameters, mesh,
                    shardings):
    """jitted (state, batch [B, T+1]) -> (state, metrics), the state donated."""

    @under_mesh(mesh)
    def train_step(state: TrainState, batch: jax.Array):
        B = batch.shape[0]
        A = hp.grad_accum
        # Row r goes to micro-batch r % A, so each device's rows stay on that device.
        micro = batch.reshape(B // A, A, -1).swapaxes(0, 1)
        grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

        def accumulate(carry, micro_batch):
            grads, loss, ce = carry
            (micro_loss, micro_ce), micro_grads = grad_fn(state.params, config, micro_batch, hp.z_loss,
                                                          hp.loss_chunk)
            return (jax.tree_util.tree_map(jnp.add, grads, micro_grads), loss + micro_loss, ce + micro_ce), None

        zeros = jax.tree_util.tree_map(jnp.zeros_like, state.params)
        (grads, loss, ce), _ = jax.lax.scan(accumulate, (zeros, 0.0, 0.0), micro)
        grads = jax.tree_util.tree_map(lambda g: g / A, grads)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        metrics = {"loss": loss / A, "ce": ce / A, "grad_norm": optax.tree.norm(grads),
                   "lr": learning_rate(hp)(state.step)}
        return TrainState(step=state.step + 1, params=params, opt_state=opt_state), metrics

    return jax.jit(train_step, in_shardings=(shardings, batch_sharding(mesh)), out_shardings=(shardings, None),
                   donate_argnums=0)


def make_eval_step(config: MistralConfig, mesh, param_sharding, loss_chunk: int = 128):
    """jitted (params, batch) -> mean cross-entropy."""
    @under_mesh(mesh)
    def eval_step(params, batch):
        return loss_fn(params, config, batch, 0.0, loss_chunk)[1]

    return jax.jit(eval_step, in_shardings=(param_sharding, batch_sharding(mesh)))


def flops_per_token(config: MistralConfig, seq_len: int, training: bool = True) -> float:
    """Model FLOPs per token: 2 per matmul weight (the embedding is a lookup) plus attention
    as computed under the causal mask and the window (QK^T and PV over the keys each query
    sees, averaged over positions); x3 for forward + backward."""
    matmul_params = config.num_params - config.vocab_size * config.dim - (2 * config.n_layers + 1) * config.dim
    window = config.sliding_window or seq_len
    mean_keys = sum(min(i + 1, window) for i in range(seq_len)) / seq_len
    attention = config.n_layers * 2 * 2 * config.n_heads * config.head_dim * mean_keys
    return (3 if training else 1) * (2 * matmul_params + attention)


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite."""


def fit(config: MistralConfig, hp: Hyperparameters, batches, mesh, out_dir: str, *, params=None,
        resume: bool = False, log_every: int = 10, eval_every: int = 100, eval_batches: int = 4,
        save_every: int = 100, keep: int = 3, peak_flops: float | None = None) -> tuple[TrainState, bool]:
    """Trains from step 0, or from the latest checkpoint in out_dir/checkpoints when resume.

    Returns (state, interrupted): SIGTERM or SIGINT stops the run after the current step with
    a checkpoint saved.
    """
    tx = make_optimizer(hp)
    manager = checkpoint.train_state_manager(os.path.join(out_dir, "checkpoints"), keep)
    if resume and manager.latest_step() is not None:  # read straight onto the shardings; nothing initialised
        state = checkpoint.restore_train_state(manager, abstract_state(config, tx, mesh))
    else:
        state = init_state(config, tx, mesh, hp.seed, params)
    shardings = state_shardings(state)
    train_step = make_train_step(config, tx, hp, mesh, shardings)
    eval_step = make_eval_step(config, mesh, shardings.params, hp.loss_chunk)
    process, processes = jax.process_index(), jax.process_count()
    global_batch = lambda local: jax.make_array_from_process_local_data(batch_sharding(mesh), local)  # noqa: E731
    writer = MetricsWriter(out_dir, enabled=process == 0)
    tokens_per_step = hp.batch_size * hp.seq_len
    flops_per_step = flops_per_token(config, hp.seq_len) * tokens_per_step

    example = jax.ShapeDtypeStruct((hp.batch_size, hp.seq_len + 1), jnp.int32, sharding=batch_sharding(mesh))
    compile_start = time.perf_counter()
    train_step = train_step.lower(state, example).compile()
    if process == 0:
        print(f"compiled the train step in {time.perf_counter() - compile_start:.1f} s", flush=True)

    stop = []
    handlers = {sig: signal.signal(sig, lambda signum, frame: stop.append(signum))
                for sig in (signal.SIGTERM, signal.SIGINT)}
    first = int(state.step)
    last_time, last_step = time.perf_counter(), first
    try:
        for step in range(first, hp.steps):
            state, metrics = train_step(state, global_batch(batches.batch(step, process, processes)))
            done = step + 1
            log = done % log_every == 0 or done == hp.steps or stop
            evaluate = done % eval_every == 0 or done == hp.steps
            save = done % save_every == 0 or done == hp.steps or stop
            if not (log or evaluate or save):
                continue
            metrics = jax.device_get(metrics)  # the only host sync of the loop
            if not math.isfinite(metrics["loss"]):
                good = manager.latest_step()
                raise TrainingDiverged(f"loss became {metrics['loss']} at step {done}; " + (
                    f"the last good checkpoint is step {good} in {os.path.join(out_dir, 'checkpoints')}"
                    if good is not None else "no checkpoint had been saved"))
            now = time.perf_counter()
            seconds_per_step = (now - last_time) / (done - last_step)
            last_time, last_step = now, done
            record = {"step": done, "loss": float(metrics["loss"]), "grad_norm": float(metrics["grad_norm"]),
                      "lr": float(metrics["lr"]), "tokens_per_s": tokens_per_step / seconds_per_step}
            if hp.z_loss:
                record["ce"] = float(metrics["ce"])
            if peak_flops:
                record["mfu"] = flops_per_step / seconds_per_step / peak_flops
            if evaluate:
                losses = jax.device_get([eval_step(state.params, global_batch(b))  # one host sync
                                         for b in batches.validation(eval_batches, process, processes)])
                record["eval_loss"] = float(sum(losses) / len(losses))
                record["eval_ppl"] = math.exp(record["eval_loss"])
                last_time = time.perf_counter()  # evaluation is not training time
            eta = (hp.steps - done) * seconds_per_step
            line = (f"step {done:>{len(str(hp.steps))}}/{hp.steps} | loss {record['loss']:.3f} | "
                    f"{record['tokens_per_s']:,.0f} tok/s"
                    + (f" | MFU {100 * record['mfu']:.0f}%" if peak_flops else "")
                    + (f" | eval {record['eval_loss']:.3f} (ppl {record['eval_ppl']:.1f})" if evaluate else "")
                    + f" | ETA {int(eta // 60)}m{int(eta % 60):02d}s")
            writer.write(record, line)
            if save:
                checkpoint.save_train_state(manager, state)
                last_time = time.perf_counter()  # nor is saving
            if stop:
                break
    finally:
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
        manager.wait_until_finished()
        writer.close()
    return state, bool(stop)
