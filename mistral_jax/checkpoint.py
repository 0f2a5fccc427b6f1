"""Orbax save/restore of params, with config.json beside them.

Layout of a checkpoint directory: config.json (HF format), params/ (orbax), and optionally
its tokenizer file (tokenizer.model, tokenizer.model.v3, tekken.json, ...). A directory
appears whole or not at all: it is written under a temporary name beside its destination and
renamed at the end.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Iterator

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from mistral_jax.config import MistralConfig
from mistral_jax.distributed import barrier, is_primary

PARAMS_DIR = "params"


class CheckpointExistsError(FileExistsError):
    """The destination exists and is not empty."""


def check_destination(path: str, overwrite: bool = False) -> None:
    """Refuses a destination that exists and is not empty, unless overwrite."""
    if os.path.exists(path) and not overwrite and (not os.path.isdir(path) or os.listdir(path)):
        raise CheckpointExistsError(f"{path} exists and is not empty (use --overwrite to replace it)")


@contextlib.contextmanager
def atomic_directory(path: str, overwrite: bool = False) -> Iterator[str]:
    """Yields a fresh directory beside `path` that replaces `path` if the block succeeds.

    On any failure (an exception, Ctrl-C) the temporary directory is removed and `path` is
    left as it was. Every process of a multi-process run gets the same directory (for orbax
    to write its shards into); process 0 creates and renames it.
    """
    path = os.path.abspath(path)
    check_destination(path, overwrite)
    parent, name = os.path.split(path)
    tmp, old = os.path.join(parent, f".{name}.partial"), os.path.join(parent, f".{name}.old")
    primary = is_primary()
    if primary:
        os.makedirs(parent, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)  # left behind by a run that was killed
        os.makedirs(tmp)
    barrier(f"created {tmp}")
    try:
        yield tmp
        barrier(f"written {tmp}")
        if primary:
            if os.path.lexists(path):
                shutil.rmtree(old, ignore_errors=True)
                os.rename(path, old)
                os.rename(tmp, path)
                shutil.rmtree(old)
            else:
                os.rename(tmp, path)
        barrier(f"renamed {tmp}")
    except BaseException:
        if primary:
            shutil.rmtree(tmp, ignore_errors=True)
        raise


def _checkpointer() -> ocp.Checkpointer:
    # Synchronous, at most 1 GB in flight and uncompressed: saving then needs no memory beyond
    # the params themselves (BENCHMARKS.md, "Conversion memory").
    return ocp.Checkpointer(ocp.PyTreeCheckpointHandler(save_concurrent_gb=1, use_compression=False))


def save_checkpoint(path: str, config: MistralConfig, params, *, overwrite: bool = False,
                    extra_files: dict[str, str] | None = None) -> None:
    """Writes params (jax or numpy arrays) and config.json to the directory `path`.

    Args:
      path: the checkpoint directory; refused if it exists and is not empty, unless overwrite.
      config: its param_dtype is set from the params when written.
      params: the nested dict of `Mistral(config).apply({"params": params}, ...)`, layers
        stacked (config.scan_layers), as every checkpoint holds them.
      extra_files: {name in the checkpoint: file to copy}, e.g. {"tokenizer.model": ...}.
    """
    if not config.scan_layers:
        raise ValueError("save_checkpoint takes params with the layers stacked, as Mistral(config) has them")
    dtype = jnp.dtype(jax.tree_util.tree_leaves(params)[0].dtype).name
    with atomic_directory(path, overwrite) as tmp:
        try:
            _checkpointer().save(os.path.join(tmp, PARAMS_DIR), args=ocp.args.PyTreeSave(params))
        except Exception as e:  # tensorstore reports a full disk as ValueError
            raise OSError(f"writing {path} failed: {e}") from e
        if is_primary():
            config.replace(param_dtype=dtype).save_hf(tmp)
            for name, file in (extra_files or {}).items():
                shutil.copyfile(file, os.path.join(tmp, name))


def load_checkpoint(path: str, dtype: str | None = None, shardings=None) -> tuple[MistralConfig, dict]:
    """Restores (config, params) from a directory written by save_checkpoint.

    Args:
      path: the checkpoint directory.
      dtype: cast params to this dtype while restoring ("float32", "bfloat16"); also the
        compute dtype of the returned config. Default: as stored.
      shardings: a pytree of jax.sharding.Sharding matching the params; each array is read
        straight onto its shards, so a model never has to fit on one device. Default: all on
        the first device.
    """
    if not os.path.isdir(path):
        raise FileNotFoundError(f"checkpoint {path} not found")
    config = MistralConfig.from_dir(path)
    params_dir = os.path.abspath(os.path.join(path, PARAMS_DIR))
    if not os.path.isdir(params_dir):
        raise FileNotFoundError(f"{path} has no {PARAMS_DIR}/ directory: not a mistral_jax checkpoint")
    checkpointer = _checkpointer()
    stored = checkpointer.metadata(params_dir).item_metadata.tree
    if shardings is None:
        device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        shardings = jax.tree_util.tree_map(lambda _: device, stored)
    target = jax.tree_util.tree_map(
        lambda meta, sharding: jax.ShapeDtypeStruct(meta.shape, np.dtype(dtype or meta.dtype), sharding=sharding),
        stored, shardings)
    restore_args = ocp.checkpoint_utils.construct_restore_args(target)
    params = checkpointer.restore(params_dir, args=ocp.args.PyTreeRestore(target, restore_args=restore_args))
    dtype = jnp.dtype(jax.tree_util.tree_leaves(params)[0].dtype).name
    return config.replace(param_dtype=dtype, dtype=dtype), params


# ---- train state (resumable runs) -----------------------------------------------------------

def train_state_manager(directory: str, keep: int) -> ocp.CheckpointManager:
    """Orbax manager of a run's train states, saved asynchronously, keeping the last `keep`
    (when to save is the caller's: trainer.fit)."""
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=True, create=True)
    return ocp.CheckpointManager(os.path.abspath(directory), options=options)


def save_train_state(manager: ocp.CheckpointManager, state) -> bool:
    return manager.save(int(state.step), args=ocp.args.StandardSave(state), force=True)


def restore_train_state(manager: ocp.CheckpointManager, abstract, step: int | None = None):
    """The state saved at step (default: the latest), read onto the shardings of `abstract`
    (a pytree of jax.ShapeDtypeStruct)."""
    step = manager.latest_step() if step is None else step
    return manager.restore(step, args=ocp.args.StandardRestore(abstract))
