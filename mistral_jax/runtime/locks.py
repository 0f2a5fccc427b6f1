"""Exclusive locks (flock) held for as long as a process writes somewhere: a run's --out
directory, a checkpoint's temporary directory. The kernel drops a lock when its process
ends however it ends (kill -9 included), so a lock is never stale; one held means a live
writer. On a filesystem without locks (GCS FUSE) a warning says so and nothing is held."""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import socket
from collections.abc import Iterator


logger = logging.getLogger("mistral_jax")


class InUseError(RuntimeError):
    """Another live process holds the lock."""


@contextlib.contextmanager
def exclusive(path: str, what: str) -> Iterator[None]:
    """Holds an exclusive lock on path (a directory, or a lock file created if missing, into
    which the holder writes its pid and host) for the block; raises InUseError naming `what`
    at once if another process holds it."""
    is_dir = os.path.isdir(path)
    fd = os.open(path, os.O_RDONLY if is_dir else os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = "" if is_dir else os.pread(fd, 200, 0).decode(errors="replace").strip()
            raise InUseError(f"{what} is in use by another process{f' ({holder})' if holder else ''}") from None
        except OSError as e:  # a filesystem without locks (GCS FUSE): run, but say what is not guarded
            logger.warning(f"cannot lock {path} ({e.strerror}): nothing keeps another process from writing {what}")
            yield
            return
        if not is_dir:
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode(), 0)
        yield
    finally:
        os.close(fd)
