"""Checksums of a checkpoint directory's files, written when it is saved and verified when it
is loaded, so that damage (a truncated, deleted or overwritten file) is found and named
before any of it reaches a model.

The manifest, CHECKSUMS in the directory, maps each file's relative path to its size and
CRC-32 (zlib's: ~3 GB/s on one core, docs/RELIABILITY.md). Orbax's own metadata checks the
tree's structure, not the bytes: random bytes of the right size loaded silently.
"""

from __future__ import annotations

import json
import os
import zlib

CHECKSUMS = "checksums.json"
# Orbax rewrites a step's metadata (its commit time) after the last moment a manifest can be
# written into the step; a damaged one is unreadable JSON, which orbax reports itself.
_UNCHECKED = ("_CHECKPOINT_METADATA",)
_CHUNK = 16 << 20


class DamagedCheckpoint(ValueError):
    """A checkpoint whose files are not the ones written."""


def _crc32(file: str) -> int:
    crc = 0
    with open(file, "rb") as f:
        while chunk := f.read(_CHUNK):
            crc = zlib.crc32(chunk, crc)
    return crc


def _files(directory: str) -> list[str]:
    found = []
    for root, _, names in os.walk(directory):
        found += [os.path.relpath(os.path.join(root, n), directory) for n in names]
    return sorted(f for f in found if f != CHECKSUMS and os.path.basename(f) not in _UNCHECKED)


def write_checksums(directory: str) -> None:
    """Writes directory/CHECKSUMS over every file below directory (call it last)."""
    manifest = {f: [os.path.getsize(os.path.join(directory, f)), _crc32(os.path.join(directory, f))]
                for f in _files(directory)}
    tmp = os.path.join(directory, f".{CHECKSUMS}.partial")
    with open(tmp, "w") as f:
        json.dump(manifest, f)
    os.replace(tmp, os.path.join(directory, CHECKSUMS))


def has_checksums(directory: str) -> bool:
    return os.path.isfile(os.path.join(directory, CHECKSUMS))


def verify(directory: str) -> None:
    """Raises DamagedCheckpoint naming the first file of directory that is missing or of another
    size or content than its CHECKSUMS say; nothing if there is no
    CHECKSUMS (a checkpoint from before them, or from another tool)."""
    try:
        with open(os.path.join(directory, CHECKSUMS)) as f:
            manifest = json.load(f)
    except FileNotFoundError:
        return
    except (OSError, ValueError) as e:
        raise DamagedCheckpoint(f"{os.path.join(directory, CHECKSUMS)} is unreadable: {e}") from None
    if not isinstance(manifest, dict):
        raise DamagedCheckpoint(f"{os.path.join(directory, CHECKSUMS)} is not a checksum manifest")
    for name, expected in sorted(manifest.items()):
        file = os.path.join(directory, name)
        if not os.path.isfile(file):
            raise DamagedCheckpoint(f"{file} is missing")
        if not isinstance(expected, list) or len(expected) != 2:
            raise DamagedCheckpoint(f"{os.path.join(directory, CHECKSUMS)} has a malformed entry for {name}")
        size, crc = expected
        if os.path.getsize(file) != size:
            raise DamagedCheckpoint(f"{file} has {os.path.getsize(file)} bytes, {size} were written")
        if _crc32(file) != crc:
            raise DamagedCheckpoint(f"{file} has other contents than were written (checksum mismatch)")
