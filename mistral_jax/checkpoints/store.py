"""Orbax save/restore of params, with config.json beside them.

Layout of a checkpoint directory: config.json (HF format), params/ (orbax), optionally its
tokenizer file (tokenizer.model, tokenizer.model.v3, tekken.json, ...), and checksums.json
over all of them (integrity.py), verified on every load. A directory appears whole or not
at all: it is written under a temporary name beside its destination, locked while written,
and renamed at the end. A run's train states (orbax's CheckpointManager) carry the same
checksums, and a resume falls back past a damaged one.
"""

from __future__ import annotations

import contextlib
import glob
import logging
import os
import shutil
import time
from collections.abc import Iterator

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from flax import traverse_util

from mistral_jax.checkpoints import integrity
from mistral_jax.checkpoints.integrity import DamagedCheckpoint
from mistral_jax.model import quantize as quantization
from mistral_jax.model.config import MistralConfig
from mistral_jax.runtime import locks
from mistral_jax.runtime.distributed import barrier, is_primary
from mistral_jax.runtime.sharding import reshaped

logger = logging.getLogger("mistral_jax")
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
    left as it was. The temporary directory is locked while written: another process
    writing `path` is refused, and one left by a killed writer (no lock) is emptied, saying
    so. Every process of a multi-process run gets the same directory (for orbax to write its
    shards into); process 0 creates, locks and renames it.
    """
    path = os.path.abspath(path)
    check_destination(path, overwrite)
    parent, name = os.path.split(path)
    tmp, old = os.path.join(parent, f".{name}.partial"), os.path.join(parent, f".{name}.old")
    primary = is_primary()
    with contextlib.ExitStack() as held:
        if primary:
            os.makedirs(tmp, exist_ok=True)
            held.enter_context(locks.exclusive(tmp, f"{path} (being written: {tmp})"))
            if os.listdir(tmp):
                logger.warning(f"removing {tmp}, left by an interrupted write")
                _empty(tmp)
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
                _remove_tree(tmp)
            raise


def _remove_tree(path: str, settle: float = 1.0, limit: float = 30.0) -> None:
    """Removes path until it has stayed gone for `settle` seconds: TensorStore's writes still
    in flight when a failed orbax save raised recreate their directories after an rmtree (a
    loaded CI run found .partial/params.orbax-checkpoint-tmp/ocdbt.process_0/d/ back, empty)."""
    deadline, gone_since = time.monotonic() + limit, None
    while time.monotonic() < deadline:
        if os.path.lexists(path):
            shutil.rmtree(path, ignore_errors=True)
            gone_since = None
        elif gone_since is None:
            gone_since = time.monotonic()
        elif time.monotonic() - gone_since >= settle:
            return
        time.sleep(0.02)


def _empty(directory: str) -> None:
    for entry in os.scandir(directory):
        remove(entry.path)


def remove(path: str) -> None:
    """Deletes a file, link or directory tree at path."""
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path)
    else:
        os.remove(path)


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
    dtype = _float_dtype(params)
    with atomic_directory(path, overwrite) as tmp:
        try:
            _checkpointer().save(os.path.join(tmp, PARAMS_DIR), args=ocp.args.PyTreeSave(params))
        except Exception as e:  # tensorstore reports a full disk as ValueError
            raise OSError(f"writing {path} failed: {e}") from e
        if is_primary():
            config.replace(param_dtype=dtype).save_hf(tmp)
            for name, file in (extra_files or {}).items():
                shutil.copyfile(file, os.path.join(tmp, name))
            integrity.write_checksums(tmp)


def load_checkpoint(path: str, dtype: str | None = None, shardings=None, quantize: str | None = None,
                    group: int | None = None) -> tuple[MistralConfig, dict]:
    """Restores (config, params) from a directory written by save_checkpoint.

    Args:
      path: the checkpoint directory.
      dtype: cast the float params to this dtype while restoring ("float32", "bfloat16"); also
        the compute dtype of the returned config. Default: as stored. Quantized weights stay so.
      shardings: a pytree of jax.sharding.Sharding matching the params (or the float model's
        params: a quantized weight's q then takes its weight's sharding, the scale the same
        reshaped); each array is read straight onto its shards, so a model never has to fit on
        one device. Default: all on the first device.
      quantize: "int8" or "int4": every projection of the layers quantized as it is read
        (model/quantize.py), one stacked weight at a time, so the whole model is never held in
        float; group: its inputs per scale (None: int8 per channel, int4 128). A checkpoint
        stored quantized loads as it is.
    """
    if quantize is not None:
        quantization.check_mode(quantize)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"checkpoint {path} not found")
    config = MistralConfig.from_dir(path)
    params_dir = os.path.abspath(os.path.join(path, PARAMS_DIR))
    if not os.path.isdir(params_dir):
        raise FileNotFoundError(f"{path} has no {PARAMS_DIR}/ directory: not a mistral_jax checkpoint")
    integrity.verify(path)
    checkpointer = _checkpointer()
    with _reading(path):
        stored = checkpointer.metadata(params_dir).item_metadata.tree
        if shardings is None:
            device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
            shardings = jax.tree_util.tree_map(lambda _: device, stored)
        # One sharding per weight (a quantized one's is its q's), spread over q and scale when stored so.
        shardings = jax.tree_util.tree_map(lambda s: s["q"] if quantization.is_quantized(s) else s, shardings,
                                           is_leaf=quantization.is_quantized)
        target = jax.tree_util.tree_map(lambda sharding, meta: _target(meta, sharding, dtype), shardings, stored)
        stored_mode = quantization.mode_of(target)
        if quantize is None or stored_mode is not None:
            if quantize not in (None, stored_mode):
                raise ValueError(f"{path} is stored quantized to {stored_mode}; it cannot be requantized to {quantize}")
            params = _restore(checkpointer, params_dir, target)
        else:
            params = _restore_quantizing(checkpointer, params_dir, config, target, quantize, group)
    dtype = _float_dtype(params)
    return config.replace(param_dtype=dtype, dtype=dtype), params


def _restore(checkpointer: ocp.Checkpointer, params_dir: str, target, partial: bool = False):
    restore_args = ocp.checkpoint_utils.construct_restore_args(target)
    return checkpointer.restore(params_dir, args=ocp.args.PyTreeRestore(target, restore_args=restore_args,
                                                                        partial_restore=partial))


def _restore_quantizing(checkpointer: ocp.Checkpointer, params_dir: str, config: MistralConfig, target, mode: str,
                        group: int | None):
    """The params of target, the layers' projections quantized one stacked weight at a time:
    each is read in its stored dtype, quantized layer by layer and let go before the next."""
    flat = traverse_util.flatten_dict(target)
    weights = {keys: name for keys in flat if (name := quantization.quantizable(config, keys))}
    rest = {keys: leaf for keys, leaf in flat.items() if keys not in weights}
    # Each weight's blocks before anything is read: a group that does not tile one is said at once.
    blocks = {keys: quantization.block_sizes(flat[keys].shape, name, mode, group) for keys, name in weights.items()}
    params = traverse_util.flatten_dict(_restore(checkpointer, params_dir, traverse_util.unflatten_dict(rest), True))
    for keys in weights:
        leaf = flat[keys]
        read = {keys: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=leaf.sharding)}
        w = _restore(checkpointer, params_dir, traverse_util.unflatten_dict(read), True)
        w = traverse_util.flatten_dict(w)[keys]
        params[keys] = quantization.quantize_stacked(w, blocks[keys], mode, leaf.sharding)
        del w
    return traverse_util.unflatten_dict(params)


def _target(meta, sharding, dtype: str | None):
    """What a stored weight is read as: a float one in dtype, a quantized one as stored."""
    if quantization.is_quantized(meta):
        return {part: jax.ShapeDtypeStruct(meta[part].shape, meta[part].dtype,
                                           sharding=reshaped(sharding, meta[part].shape)) for part in ("q", "scale")}
    return jax.ShapeDtypeStruct(meta.shape, np.dtype(dtype or meta.dtype), sharding=sharding)


def _float_dtype(params) -> str:
    """The dtype of the params' float arrays (the embedding's; quantized weights are integers)."""
    floats = [x for x in jax.tree_util.tree_leaves(params) if jnp.issubdtype(x.dtype, jnp.floating)]
    embedding = params.get("tok_embeddings") if isinstance(params, dict) else None
    return jnp.dtype((embedding if embedding is not None else floats[0]).dtype).name


@contextlib.contextmanager
def _reading(path: str) -> Iterator[None]:
    """Orbax's and TensorStore's errors on a damaged checkpoint (a missing manifest, a
    truncated file) name no file and span lines: one line naming the checkpoint instead."""
    try:
        yield
    except (DamagedCheckpoint, MemoryError):
        raise
    except Exception as e:  # noqa: BLE001 - whatever the library says, the checkpoint is unreadable
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise DamagedCheckpoint(f"checkpoint {path} cannot be read ({type(e).__name__}: {first[:200]})") from e


# ---- train state (resumable runs) -----------------------------------------------------------

def saved_steps(directory: str) -> list[int]:
    """The steps of directory's complete train states, oldest first (orbax names a state by
    its step once it is whole; one being written has a temporary name)."""
    if not os.path.isdir(directory):
        return []
    return sorted(int(n) for n in os.listdir(directory) if n.isdigit() and os.path.isdir(os.path.join(directory, n)))


def train_state_manager(directory: str, keep: int) -> ocp.CheckpointManager:
    """Orbax manager of a run's train states, saved asynchronously, keeping the last `keep`
    (when to save is the caller's: trainer.fit). Each state gets its checksums before orbax
    gives it its final name, so every complete state has them."""
    directory = os.path.abspath(directory)

    def write_checksums():  # on orbax's save thread, once the state's files are all written
        if is_primary():
            writing = glob.glob(os.path.join(glob.escape(directory), "*.orbax-checkpoint-tmp*"))
            if len(writing) != 1:
                raise RuntimeError(f"expected one train state being written in {directory}, found {writing}")
            integrity.write_checksums(writing[0])

    # A killed run's half-written state is removed on opening (the run holds --out's lock).
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep, enable_async_checkpointing=True, create=True, cleanup_tmp_directories=True,
        async_options=ocp.AsyncOptions(post_finalization_callback=write_checksums))
    return ocp.CheckpointManager(directory, options=options)


def save_train_state(manager: ocp.CheckpointManager, state) -> bool:
    return manager.save(int(state.step), args=ocp.args.StandardSave(state), force=True)


def restore_train_state(manager: ocp.CheckpointManager, abstract, step: int | None = None):
    """The state saved at step (default: the latest), read onto the shardings of `abstract`
    (a pytree of jax.ShapeDtypeStruct), its checksums verified first; DamagedCheckpoint
    names what is wrong."""
    step = manager.latest_step() if step is None else step
    path = os.path.join(str(manager.directory), str(step))
    integrity.verify(path)
    with _reading(path):
        return manager.restore(step, args=ocp.args.StandardRestore(abstract))


def restore_intact_train_state(manager: ocp.CheckpointManager, abstract, step: int | None = None):
    """(state, step) of the newest intact train state (or of `step`, which must be intact),
    moving each damaged newer one aside into ../damaged_checkpoints and saying so; (None,
    None) when the manager holds none."""
    steps = saved_steps(str(manager.directory))
    if step is not None:
        if step not in steps:
            raise ValueError(f"no checkpoint of step {step} in {manager.directory} (there are: "
                             f"{', '.join(map(str, steps)) or 'none'})")
        return restore_train_state(manager, abstract, step), step
    for candidate in reversed(steps):
        try:
            return restore_train_state(manager, abstract, candidate), candidate
        except DamagedCheckpoint as e:
            aside = os.path.join(os.path.dirname(str(manager.directory)), "damaged_checkpoints", str(candidate))
            barrier(f"found step {candidate} damaged")
            if is_primary():
                os.makedirs(os.path.dirname(aside), exist_ok=True)
                shutil.rmtree(aside, ignore_errors=True)
                os.rename(os.path.join(str(manager.directory), str(candidate)), aside)
                logger.warning(f"checkpoint step {candidate} is damaged ({e}); moved it to {aside}")
            barrier(f"moved step {candidate} aside")
            manager.reload()
    if steps:
        raise DamagedCheckpoint(f"every checkpoint in {manager.directory} is damaged (moved to damaged_checkpoints/)")
    return None, None


def discard_train_states_after(manager: ocp.CheckpointManager, step: int) -> list[int]:
    """Deletes the train states newer than step (a resume from an older one), returning their
    steps; every process calls it (orbax syncs them)."""
    later = [s for s in saved_steps(str(manager.directory)) if s > step]
    for s in later:
        manager.delete(s)
    return later
