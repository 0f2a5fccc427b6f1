"""Hyperparameters, train state, the jitted train and eval steps, and the training loop.

One `jax.jit` per step with explicit in/out shardings and the state donated; gradient
accumulation is a `lax.scan` over micro-batches inside it. Nothing in a step syncs with the
host: the loop fetches metrics when it chooses to.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
import signal
import time
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import optax
from jax.sharding import NamedSharding, PartitionSpec

from mistral_jax.checkpoints import store
from mistral_jax.model import quantize
from mistral_jax.model.config import MistralConfig
from mistral_jax.model.transformer import Mistral, abstract_params, init_params, output_matrix, param_shardings
from mistral_jax.runtime import platforms
from mistral_jax.runtime.distributed import is_primary
from mistral_jax.runtime.options import OptionError, option, require_positive
from mistral_jax.runtime.sharding import batch_sharding, logical_shardings, under_mesh
from mistral_jax.training import lora
from mistral_jax.training.loss import cross_entropy, sequence_logprobs
from mistral_jax.training.metrics import MetricsWriter, Peak, flops_per_token, format_line


@flax.struct.dataclass
class TrainState:
    """What a step updates: the step count, the trained params (the model's, or with LoRA its
    adapters, the base frozen outside the state) and their optimizer state."""

    step: jax.Array
    params: Any
    opt_state: Any


OBJECTIVES = ("sft", "dpo")


@dataclasses.dataclass(frozen=True)
class Hyperparameters:
    """What a train step computes and how the run's steps go (train.py's flags of the same names)."""

    steps: int = option(200, "optimizer steps")
    batch_size: int = option(8, "sequences per step, all processes together")
    seq_len: int = option(256, "tokens per sequence")
    grad_accum: int = option(1, "micro-batches per step")
    lr: float = option(3e-3, "peak learning rate")
    warmup: int = option(20, "steps of linear warmup, then cosine decay")
    final_lr_fraction: float = option(0.1, "the learning rate at the last step, as a fraction of --lr")
    weight_decay: float = option(0.1, "AdamW weight decay, on projection matrices only")
    clip: float = option(1.0, "global gradient norm clipping")
    b1: float = option(0.9, "Adam beta1")
    b2: float = option(0.95, "Adam beta2")
    z_loss: float = option(0.0, "weight of log(Z)^2, which keeps the softmax normaliser near 1")
    router_aux_loss: float | None = option(None, "experts: weight of the load-balancing loss (default: the "
                                                 "config's router_aux_loss_coef)")
    router_z_loss: float = option(0.0, "experts: weight of the router z-loss, the mean logsumexp(router logits)^2")
    loss_chunk: int = option(128, "sequence positions whose logits the loss holds at a time")
    seed: int = option(0, "seed of the initial weights and of the data order")
    skip_nonfinite: int = option(0, "steps whose loss or gradient norm is NaN or infinite that are skipped (their "
                                    "update not applied) before the run stops as diverged")
    lora_rank: int | None = option(None, "LoRA: train adapters of this rank on the frozen --init-from model "
                                         "(default: train every weight)")
    lora_alpha: float | None = option(None, "LoRA: the adapters' scale is alpha / rank (default: the rank, a scale of 1)")
    lora_targets: str | None = option(None, "LoRA: the projections adapted, comma-separated: grouped-query "
                                            "attention's wq,wk,wv,wo, latent attention's "
                                            "wq_a,wq_b,wkv_a_with_mqa,wkv_b,wo, a dense feed-forward's w1,w2,w3 "
                                            "(default: every projection of the attention)")
    objective: str = option("sft", "sft: next-token cross-entropy on the trained targets (all of text, the "
                                   "assistant's of conversations); dpo: direct preference optimisation on "
                                   "prompt/chosen/rejected pairs, against the starting model", choices=OBJECTIVES)
    dpo_beta: float = option(0.1, "DPO: β, how far the trained model may move from the reference")

    def __post_init__(self):
        require_positive(self, "steps", "batch_size", "seq_len", "grad_accum", "loss_chunk")
        for name in ("warmup", "skip_nonfinite"):
            if getattr(self, name) < 0:
                raise OptionError(name, f"must be >= 0, got {getattr(self, name)}")
        if not 0 <= self.seed < 2**63:  # what jax.random.key takes
            raise OptionError("seed", f"must be in [0, 2**63), got {self.seed}")
        for name in ("clip", "dpo_beta"):
            if not 0 < getattr(self, name) < math.inf:  # NaN too
                raise OptionError(name, f"must be a positive number, got {getattr(self, name)!r}")
        if not 0 <= self.final_lr_fraction <= 1:
            raise OptionError("final_lr_fraction", f"must be in [0, 1], got {self.final_lr_fraction!r}")
        for name in ("b1", "b2"):
            if not 0 <= getattr(self, name) < 1:
                raise OptionError(name, f"must be in [0, 1), got {getattr(self, name)!r}")
        for name in ("lr", "weight_decay", "z_loss", "router_aux_loss", "router_z_loss"):
            value = getattr(self, name)
            if value is not None and not 0 <= value < math.inf:
                raise OptionError(name, f"must be non-negative, got {value!r}")
        if self.lora_rank is None:
            for name in ("lora_alpha", "lora_targets"):
                if getattr(self, name) is not None:
                    raise OptionError(name, "needs --lora-rank")
        _ = self.lora_spec  # a bad rank, alpha or target is refused now

    @property
    def frozen(self) -> bool:
        """Whether a step reads frozen params besides those it trains: LoRA's base, or DPO's
        reference (the starting model; with LoRA, the same base without the adapters)."""
        return self.lora_rank is not None or self.objective == "dpo"

    @property
    def lora_spec(self) -> lora.LoRA | None:
        """The LoRA adapters trained, or None: every weight is."""
        if self.lora_rank is None:
            return None
        targets = None if self.lora_targets is None else lora.LoRA.parse_targets(self.lora_targets)
        return lora.LoRA(self.lora_rank, self.lora_alpha, targets)


@dataclasses.dataclass(frozen=True)
class Schedule:
    """When the training loop logs, evaluates and saves."""

    log_every: int = option(10, "steps between metrics lines")
    eval_every: int = option(100, "steps between evaluations of the held-out loss")
    eval_batches: int = option(4, "batches per evaluation")
    save_every: int = option(100, "steps between checkpoints")
    keep: int = option(3, "checkpoints kept")

    def __post_init__(self):
        require_positive(self, "log_every", "eval_every", "eval_batches", "save_every", "keep")


def learning_rate(hp: Hyperparameters) -> optax.Schedule:
    """Linear warmup to lr, then cosine decay to lr * final_lr_fraction at the last step."""
    warmup = max(0, min(hp.warmup, hp.steps - 1))
    return optax.warmup_cosine_decay_schedule(0.0, hp.lr, warmup, max(hp.steps, warmup + 1),
                                              end_value=hp.lr * hp.final_lr_fraction)


def decay_mask(params) -> Any:
    """Weight decay on the projection matrices only: not on norms, not on the embedding, not on
    the frozen vision encoder (loss_fn)."""
    return jax.tree_util.tree_map_with_path(
        lambda path, _: path[-1].key not in ("weight", "tok_embeddings") and path[0].key != "vision", params)


def clip_by_global_norm(max_norm: float) -> optax.GradientTransformation:
    """Scales gradients by min(1, max_norm / global norm), as optax.clip_by_global_norm, but
    as one multiply by a scalar, which XLA fuses into the Adam update instead of keeping a
    second gradient-sized buffer of clipped gradients (docs/SCALING.md, "What it took")."""
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


def unpack(batch) -> tuple[jax.Array, jax.Array, jax.Array | None, jax.Array | None, jax.Array | None]:
    """(inputs, targets, mask, positions, segments) of a batch: tokens [B, T+1] (text: every
    target trained, mask None, positions 0..T-1) or rows of examples (examples.row_arrays:
    "inputs", "targets", "mask", "positions", "segments", [B, T] each)."""
    if isinstance(batch, Mapping):
        return batch["inputs"], batch["targets"], batch["mask"], batch["positions"], batch["segments"]
    return batch[:, :-1], batch[:, 1:], None, None, None


def trained_tokens(batch) -> jax.Array:
    """float32 [B]: each row's targets in the loss."""
    inputs, _, mask, _, _ = unpack(batch)
    if mask is None:
        return jnp.full(inputs.shape[:1], inputs.shape[1], jnp.float32)
    return jnp.sum(mask.reshape(mask.shape[0], -1), axis=1, dtype=jnp.float32)


def _forward(params, config: MistralConfig, inputs, positions=None, segments=None, adapters=None,
             spec: lora.LoRA | None = None):
    """(final normed states [B, T, D], the sown router stats) of params (adapted by adapters)."""
    if "vision" in params:  # frozen: no gradient, no decay (decay_mask), so Adam moves it by exactly 0
        params = {**params, "vision": jax.lax.stop_gradient(params["vision"])}
    return Mistral(config, lm_head=False).apply(lora.variables(params, adapters, spec), inputs, positions,
                                                segments=segments, mutable=["router"])


def loss_fn(params, config: MistralConfig, batch, z_loss: float, chunk: int = 128,
            router_aux_loss: float = 0.0, router_z_loss: float = 0.0, adapters=None, spec: lora.LoRA | None = None):
    """Next-token cross-entropy of batch (unpack: tokens [B, T+1], or packed examples whose
    masked-out targets are not in it), the mean over its trained targets (plus z-loss; with
    experts, plus the router's load-balancing and z-losses at these weights) -> (loss,
    metrics): the cross-entropy `ce` and, with experts, `aux_loss` and `router_z_loss`,
    without gradient. The output projection is fused into the loss (loss.cross_entropy). With
    LoRA adapters (and their spec), the model is params adapted by them."""
    inputs, targets, mask, positions, segments = unpack(batch)
    hidden, sown = _forward(params, config, inputs, positions, segments, adapters, spec)
    weights = None if mask is None else mask / jnp.maximum(jnp.sum(mask, dtype=jnp.float32), 1.0)
    loss, ce = cross_entropy(hidden, output_matrix(config, params).astype(config.dtype), targets, z_loss, chunk,
                             output_trained=adapters is None, weights=weights)
    metrics = {"ce": ce}
    if config.moe:
        (stats,) = sown["router"]["stats"]
        aux, router_z = stats.load_balancing_loss(), stats.z_loss()
        loss = loss + router_aux_loss * aux + router_z_loss * router_z
        metrics.update(aux_loss=jax.lax.stop_gradient(aux), router_z_loss=jax.lax.stop_gradient(router_z))
    return loss, metrics


def answer_logprobs(params, config: MistralConfig, batch, chunk: int = 128, adapters=None,
                    spec: lora.LoRA | None = None) -> jax.Array:
    """float32 [P, 2]: the summed log-probabilities of the trained (answer) tokens of each
    preference pair's chosen and rejected rows (batch: examples.pair_arrays rows, [P, 2, T])."""
    inputs, targets, mask = (batch[name] for name in ("inputs", "targets", "mask"))
    P, _, T = inputs.shape
    hidden, _ = _forward(params, config, inputs.reshape(2 * P, T), adapters=adapters, spec=spec)
    logprobs = sequence_logprobs(hidden, output_matrix(config, params).astype(config.dtype),
                                 targets.reshape(2 * P, T), mask.reshape(2 * P, T), chunk)
    return logprobs.reshape(P, 2)


def dpo_loss_fn(params, config: MistralConfig, batch, beta: float, reference, chunk: int = 128, adapters=None,
                spec: lora.LoRA | None = None):
    """DPO's loss over a batch of preference pairs, mean of -log σ(β·((π_c − ref_c) − (π_r −
    ref_r))) with π and ref the answers' summed log-probabilities under the trained model
    (params, with LoRA adapted by adapters) and the frozen reference (with LoRA, params
    without adapters; else the reference params) -> (loss, metrics: the mean reward margin
    β·(...), the share of pairs it ranks right, the chosen and rejected rewards)."""
    policy = answer_logprobs(params, config, batch, chunk, adapters, spec)
    ref = jax.lax.stop_gradient(answer_logprobs(params if adapters is not None else reference, config, batch, chunk))
    rewards = beta * (policy - ref)  # [P, 2]: chosen, rejected
    margin = rewards[:, 0] - rewards[:, 1]
    loss = -jnp.mean(jax.nn.log_sigmoid(margin))
    metrics = {"reward_margin": jnp.mean(margin), "reward_accuracy": jnp.mean((margin > 0).astype(jnp.float32)),
               "chosen_reward": jnp.mean(rewards[:, 0]), "rejected_reward": jnp.mean(rewards[:, 1])}
    return loss, jax.lax.stop_gradient(metrics)


def router_weights(config: MistralConfig, hp: Hyperparameters) -> tuple[float, float]:
    """(load-balancing, z) weights of the router losses: the flags, or the config's coefficient."""
    if not config.moe:
        return 0.0, 0.0
    aux = config.moe.router_aux_loss_coef if hp.router_aux_loss is None else hp.router_aux_loss
    return aux, hp.router_z_loss


def abstract_params_on(config: MistralConfig, mesh, spec: lora.LoRA | None = None, dtype: str | None = None):
    """The model's params (with spec, its LoRA adapters: float32) as abstract arrays placed
    over mesh per the rules table: shapes, dtypes (config.param_dtype, or dtype), shardings."""
    boxed = abstract_params(config) if spec is None else lora.abstract_adapters(config, spec)
    return jax.tree_util.tree_map(lambda x, s: jax.ShapeDtypeStruct(x.shape, jnp.dtype(dtype or x.dtype), sharding=s),
                                  nn.unbox(boxed), logical_shardings(boxed, mesh))


def abstract_state(config: MistralConfig, tx: optax.GradientTransformation, mesh,
                   spec: lora.LoRA | None = None) -> TrainState:
    """The train state's shapes, dtypes and shardings, with nothing allocated: params (or LoRA
    adapters) per the rules table, Adam's moments as they are, scalars (the step, Adam's
    count) replicated."""
    replicated = NamedSharding(mesh, PartitionSpec())
    params = abstract_params_on(config, mesh, spec)
    params_sharding = jax.tree_util.tree_map(lambda x: x.sharding, params)
    opt_state = optax.tree_map_params(
        tx, lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), jax.eval_shape(tx.init, params),
        params_sharding, transform_non_params=lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=replicated))
    return TrainState(step=jax.ShapeDtypeStruct((), jnp.int32, sharding=replicated), params=params,
                      opt_state=opt_state)


def init_state(config: MistralConfig, tx: optax.GradientTransformation, mesh, seed: int = 0,
               params=None, spec: lora.LoRA | None = None) -> TrainState:
    """A train state born sharded over mesh: fresh params (with spec, fresh LoRA adapters)
    from seed, or the given ones placed."""
    shardings = state_shardings(abstract_state(config, tx, mesh, spec))
    if spec is not None:
        params = jax.jit(lora.init_adapters, static_argnums=(0, 1), out_shardings=shardings.params)(
            config, spec, jax.random.key(seed))
    elif params is None:
        params = jax.jit(init_params, static_argnums=0, out_shardings=shardings.params)(config, jax.random.key(seed))
    else:
        params = jax.tree_util.tree_map(lambda x, s: jax.device_put(jnp.asarray(x, config.param_dtype), s),
                                        params, shardings.params)
    opt_state = jax.jit(tx.init, out_shardings=shardings.opt_state)(params)
    return TrainState(step=jax.device_put(jnp.zeros((), jnp.int32), shardings.step), params=params,
                      opt_state=opt_state)


def state_shardings(state: TrainState):
    return jax.tree_util.tree_map(lambda x: x.sharding, state)


def make_train_step(config: MistralConfig, tx: optax.GradientTransformation, hp: Hyperparameters, mesh,
                    shardings, base_shardings=None):
    """jitted (state, batch) -> (state, metrics), the state donated; the batch tokens [B, T+1],
    rows of packed examples, or with hp.objective "dpo" rows of preference pairs (unpack,
    examples.py). With frozen params (hp.frozen: LoRA's base, DPO's reference), (state, batch,
    base), base placed as base_shardings says, which the step reads and never differentiates.

    The loss is the mean over the step's trained targets (DPO: over its pairs): each
    micro-batch of --grad-accum weighs as its share of them."""
    spec = hp.lora_spec

    def objective(trained, base, micro_batch):
        params, adapters = (trained, None) if spec is None else (base, trained)
        if hp.objective == "dpo":
            return dpo_loss_fn(params, config, micro_batch, hp.dpo_beta, base, hp.loss_chunk, adapters, spec)
        return loss_fn(params, config, micro_batch, hp.z_loss, hp.loss_chunk, *router_weights(config, hp),
                       adapters=adapters, spec=spec)

    @under_mesh(mesh)
    def train_step(state: TrainState, batch, base=None):
        A = hp.grad_accum
        # Row r goes to micro-batch r % A, so each device's rows stay on that device.
        micro = jax.tree_util.tree_map(lambda x: x.reshape(x.shape[0] // A, A, *x.shape[1:]).swapaxes(0, 1), batch)
        counts = jax.vmap(lambda m: jnp.sum(trained_tokens(m)))(micro)  # [A]
        shares = jnp.full((A,), 1 / A) if hp.objective == "dpo" else counts / jnp.maximum(jnp.sum(counts), 1.0)
        grad_fn = jax.value_and_grad(objective, has_aux=True)

        def accumulate(carry, xs):
            micro_batch, share = xs
            (micro_loss, micro_metrics), micro_grads = grad_fn(state.params, base, micro_batch)
            step = (micro_grads, {"loss": micro_loss, **micro_metrics})
            return jax.tree_util.tree_map(lambda total, x: total + share * x, carry, step), None

        first = jax.tree_util.tree_map(lambda x: x[0], micro)
        zeros = jax.tree_util.tree_map(lambda x: jnp.zeros(x.shape, x.dtype),
                                       jax.eval_shape(grad_fn, state.params, base, first))
        (grads, sums), _ = jax.lax.scan(accumulate, (zeros[1], {"loss": zeros[0][0], **zeros[0][1]}), (micro, shares))
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        metrics = {**sums, "grad_norm": optax.tree.norm(grads), "lr": learning_rate(hp)(state.step),
                   "trained_tokens": jnp.sum(counts)}
        if hp.skip_nonfinite:  # a non-finite step leaves params and Adam's state as they were
            finite = jnp.isfinite(metrics["loss"]) & jnp.isfinite(metrics["grad_norm"])
            params, opt_state = jax.tree_util.tree_map(lambda new, old: jnp.where(finite, new, old),
                                                       (params, opt_state), (state.params, state.opt_state))
        return TrainState(step=state.step + 1, params=params, opt_state=opt_state), metrics

    in_shardings = (shardings, batch_sharding(mesh)) + ((base_shardings,) if hp.frozen else ())
    return jax.jit(train_step, in_shardings=in_shardings, out_shardings=(shardings, None), donate_argnums=0)


def make_eval_step(config: MistralConfig, mesh, param_sharding, hp: Hyperparameters, base_sharding=None):
    """jitted (params, batch) -> held-out metrics; with frozen params (hp.frozen), (trained,
    batch, base). SFT: {"loss": the cross-entropy over the batch's trained targets, "weight":
    their count}; DPO: {"loss", "weight": 1, and the reward metrics}."""
    spec = hp.lora_spec

    @under_mesh(mesh)
    def eval_step(trained, batch, base=None):
        params, adapters = (trained, None) if spec is None else (base, trained)
        if hp.objective == "dpo":
            loss, metrics = dpo_loss_fn(params, config, batch, hp.dpo_beta, base, hp.loss_chunk, adapters, spec)
            return {"loss": loss, "weight": jnp.float32(1), **metrics}
        ce = loss_fn(params, config, batch, 0.0, hp.loss_chunk, adapters=adapters, spec=spec)[1]["ce"]
        return {"loss": ce, "weight": jnp.sum(trained_tokens(batch))}

    return jax.jit(eval_step, in_shardings=(param_sharding, batch_sharding(mesh)) + (
        (base_sharding,) if hp.frozen else ()))


class TrainingDiverged(RuntimeError):
    """The loss or the gradient norm became NaN or infinite."""


@flax.struct.dataclass
class NonFinite:
    """What the training loop knows of non-finite steps, kept on the device between host
    syncs: how many there were, and (step, 0 for the loss / 1 for the gradient norm, value)
    of the first one past those allowed to be skipped (step -1 while none)."""

    count: jax.Array
    fatal: jax.Array
    value: jax.Array

    @classmethod
    def none(cls, count: int = 0) -> NonFinite:
        return cls(jnp.int32(count), jnp.array([-1, -1], jnp.int32), jnp.float32(0))


@functools.partial(jax.jit, static_argnums=3)
def _track_nonfinite(seen: NonFinite, step: jax.Array, metrics: dict, allowed: int) -> NonFinite:
    """seen after a step. Run after every step on the device, so a bad step between host
    syncs is known before any later state is saved: unless skipped, its update made the
    weights non-finite even when only its gradients were."""
    values = jnp.stack([metrics["loss"], metrics["grad_norm"]]).astype(jnp.float32)
    bad = ~jnp.isfinite(values)
    count = seen.count + bad.any()
    kind = jnp.argmax(bad)  # the loss when both
    is_fatal = (seen.fatal[0] < 0) & (count > allowed)
    return NonFinite(count, jnp.where(is_fatal, jnp.stack([step, kind]).astype(jnp.int32), seen.fatal),
                     jnp.where(is_fatal, values[kind], seen.value))


def fit(config: MistralConfig, hp: Hyperparameters, batches, mesh, out_dir: str, schedule: Schedule = Schedule(),
        *, params=None, resume: bool = False, resume_from: int | None = None,
        peak_flops: Peak | float | None = None) -> tuple[TrainState, bool]:
    """Trains from step 0, or, when resume, from the newest intact checkpoint in
    out_dir/checkpoints (a damaged one is moved aside, saying so) or from resume_from's
    (the later ones discarded). metrics.jsonl and TensorBoard keep the records up to the
    step the run starts from.

    Args:
      batches: data.TokenBatches (or anything with its batch(step, ...) and validation(...)).
      params: initial weights (e.g. converted ones); default: fresh from hp.seed. With LoRA
        (hp.lora_spec), the frozen base the adapters are trained on (required); the state
        then holds the adapters.
      peak_flops: the machine's peak FLOP/s, for MFU in the metrics: a number is held fixed, a
        metrics.Peak may rise as training goes; None leaves MFU out.
    Returns (state, interrupted): SIGTERM or SIGINT stops the run after the current step with
    a checkpoint saved.
    """
    tx = make_optimizer(hp)
    spec = hp.lora_spec
    if hp.frozen and params is None:
        raise ValueError("LoRA adapters are trained on a base model, and DPO against a reference: pass its params")
    base_shardings = param_shardings(config, mesh, params) if hp.frozen else None  # params may be quantized
    base_args = ()
    if spec is not None:  # the frozen base, where the rules table puts it (a no-op for params read onto the mesh)
        held = quantize.held_for(params, platforms.decode_platform(mesh))
        base_args = (jax.device_put(held, base_shardings),)
    elif hp.frozen:  # DPO's reference: a copy, since the trained params (whose buffers the step donates) start equal
        base_args = (jax.jit(lambda p: jax.tree_util.tree_map(jnp.copy, p), out_shardings=base_shardings)(params),)
    checkpoints = os.path.join(out_dir, "checkpoints")
    manager = store.train_state_manager(checkpoints, schedule.keep)
    state = None
    if resume or resume_from is not None:  # read straight onto the shardings; nothing initialised
        state, step = store.restore_intact_train_state(manager, abstract_state(config, tx, mesh, spec),
                                                            resume_from)
        discarded = store.discard_train_states_after(manager, step) if resume_from is not None else []
        if state is not None and is_primary():
            print(f"resuming from step {step}" + (f", discarding the checkpoints of steps "
                                                  f"{', '.join(map(str, discarded))}" if discarded else ""), flush=True)
    if state is None:
        state = init_state(config, tx, mesh, hp.seed, None if spec else params, spec)
    shardings = state_shardings(state)
    train_step = make_train_step(config, tx, hp, mesh, shardings, base_shardings)
    eval_step = make_eval_step(config, mesh, shardings.params, hp, base_shardings)
    process, processes = jax.process_index(), jax.process_count()
    global_batch = lambda local: jax.make_array_from_process_local_data(batch_sharding(mesh), local)  # noqa: E731
    first = int(state.step)
    writer = MetricsWriter(out_dir, enabled=is_primary(), start_step=first)
    tokens_per_step = hp.batch_size * hp.seq_len
    if not isinstance(peak_flops, Peak):
        peak_flops = Peak(peak_flops, fixed=True) if peak_flops else None
    flops_per_step = flops_per_token(config, hp.seq_len, lora_params=None if spec is None else sum(
        x.size for x in jax.tree_util.tree_leaves(state.params))) * tokens_per_step
    if hp.objective == "dpo":  # two rows a pair, and the reference's forward pass
        tokens_per_step *= 2
        flops_per_step = 2 * flops_per_step + flops_per_token(config, hp.seq_len, training=False) * tokens_per_step

    sample = batches.batch(first, process, processes)
    example_rows = isinstance(sample, Mapping)  # rows of examples, not tokens
    example = jax.tree_util.tree_map(
        lambda x: jax.ShapeDtypeStruct((hp.batch_size, *x.shape[1:]), x.dtype, sharding=batch_sharding(mesh)), sample)
    compile_start = time.perf_counter()
    train_step = train_step.lower(state, example, *base_args).compile()
    if is_primary():
        print(f"compiled the train step in {time.perf_counter() - compile_start:.1f} s", flush=True)

    stop = []
    handlers = {sig: signal.signal(sig, lambda signum, frame: stop.append(signum))
                for sig in (signal.SIGTERM, signal.SIGINT)}
    last_time, last_step = time.perf_counter(), first
    nonfinite = NonFinite.none(writer.last("skipped_steps", 0))  # counted over the whole run, resumes included
    try:
        for step in range(first, hp.steps):
            state, metrics = train_step(state, global_batch(batches.batch(step, process, processes)), *base_args)
            done = step + 1
            nonfinite = _track_nonfinite(nonfinite, state.step, metrics, hp.skip_nonfinite)  # on the device: no sync
            log = done % schedule.log_every == 0 or done == hp.steps or stop
            evaluate = done % schedule.eval_every == 0 or done == hp.steps
            save = done % schedule.save_every == 0 or done == hp.steps or stop
            if not (log or evaluate or save):
                continue
            metrics, seen = jax.device_get((metrics, nonfinite))  # the loop's one host sync
            bad_step, what = seen.fatal
            if bad_step >= 0:
                good = manager.latest_step()
                skipped = f" (after skipping {hp.skip_nonfinite})" if hp.skip_nonfinite else ""
                raise TrainingDiverged(f"{('loss', 'gradient norm')[what]} became {seen.value} at step {bad_step}"
                                       f"{skipped}; " + (
                    f"the last good checkpoint is step {good} in {checkpoints} (--resume-from {good})"
                    if good is not None else "no checkpoint had been saved"))
            now = time.perf_counter()
            seconds = now - last_time
            seconds_per_step = seconds / (done - last_step)
            last_time, last_step = now, done
            record = {"step": done, "loss": float(metrics["loss"]), "grad_norm": float(metrics["grad_norm"]),
                      "lr": float(metrics["lr"]), "tokens_per_s": tokens_per_step / seconds_per_step}
            if hp.z_loss or config.moe:
                record["ce"] = float(metrics["ce"])
            for name in ("aux_loss", "router_z_loss", "reward_margin", "reward_accuracy", "chosen_reward",
                         "rejected_reward"):
                if name in metrics:
                    record[name] = float(metrics[name])
            if example_rows and hp.objective == "sft":
                record["trained_tokens"] = int(metrics["trained_tokens"])
            if hp.skip_nonfinite:
                record["skipped_steps"] = int(seen.count)
            if peak_flops is not None:
                record["mfu"] = peak_flops.mfu(flops_per_step / seconds_per_step, seconds)
                last_time = time.perf_counter()  # a re-measured peak is not training time
            if evaluate:
                held_out = jax.device_get([eval_step(state.params, global_batch(b), *base_args)  # one host sync
                                           for b in batches.validation(schedule.eval_batches, process, processes)])
                weight = sum(float(m["weight"]) for m in held_out)
                for name in ("loss", "reward_accuracy"):
                    if name in held_out[0]:  # each batch weighs as its trained targets (SFT) or pairs (DPO)
                        record[f"eval_{name}"] = sum(float(m[name] * m["weight"]) for m in held_out) / max(weight, 1)
                if hp.objective == "sft":
                    record["eval_ppl"] = math.exp(record["eval_loss"])
                last_time = time.perf_counter()  # evaluation is not training time
            writer.write(record, format_line(record, hp.steps, (hp.steps - done) * seconds_per_step))
            if save:
                store.save_train_state(manager, state)
                last_time = time.perf_counter()  # nor is saving
            if stop:
                break
    finally:
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
        try:
            manager.wait_until_finished()
        finally:
            manager.close()  # stops orbax's background threads, which otherwise keep a failed run alive
            writer.close()
    return state, bool(stop)
