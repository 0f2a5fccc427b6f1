"""Several processes (hosts) as one JAX program: joining them, waiting for all, fetching arrays
spread over them. With one process every function here is trivial."""

from __future__ import annotations

import jax
import numpy as np
from jax.experimental import multihost_utils


def initialize(coordinator: str | None = None, num_processes: int | None = None,
               process_id: int | None = None) -> None:
    """jax.distributed.initialize: without arguments it detects the cluster (TPU pod slices,
    SLURM, ...). CPU processes talk through gloo."""
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=coordinator, num_processes=num_processes, process_id=process_id)


def is_primary() -> bool:
    """Process 0: the one that prints, writes metrics and renames checkpoint directories."""
    return jax.process_index() == 0


def barrier(name: str) -> None:
    """Waits for every process to reach the barrier of this name."""
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(name)


def fetch(*arrays: jax.Array) -> tuple[np.ndarray, ...]:
    """Host copies, whole, also of arrays spread over other processes' devices (then a
    collective: every process must call it, as every process runs the computation)."""
    if all(a.is_fully_addressable for a in arrays):
        return jax.device_get(arrays)
    return tuple(multihost_utils.process_allgather(arrays, tiled=True))
