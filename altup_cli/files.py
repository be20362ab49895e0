"""Atomic file writes: the one way altup writes a checkpoint, export or results file.

Each file is written to a temporary file in the target's own directory, flushed to disk
and renamed over the target. A rename within one filesystem is atomic, so a write that
fails part-way (a full disk, a kill -9) leaves the previous file intact and never a
truncated one. Files get the usual 0666 & ~umask mode (a temporary file is 0600).
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any


def umask() -> int:
    """The process umask (read without changing it for longer than two calls)."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """A temporary path beside `path` to write to; renamed over `path` on success,
    removed on failure (the exception propagates)."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        with open(tmp, "rb+") as handle:
            os.fsync(handle.fileno())
        os.chmod(tmp, 0o666 & ~umask())
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_bytes(path: str | Path, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def write_text(path: str | Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def finite_json(value: Any) -> Any:
    """`value` with every non-finite float replaced by None: JSON has no NaN or Infinity."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: finite_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite_json(v) for v in value]
    return value


def write_json(path: str | Path, value: Any) -> None:
    """Strict JSON (non-finite floats become null), written atomically."""
    write_text(path, json.dumps(finite_json(value), indent=2, allow_nan=False) + "\n")
