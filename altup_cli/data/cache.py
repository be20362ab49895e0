"""Checks shared by the data caches: a file's recorded size and sha256, a JSON record's
fields, and the sweeping of temporary files that a killed writer left behind.

Every cache entry is written with files.atomic_path (temp file + rename), so a kill never
leaves a half file under a final name, only a temp file; an entry that fails its checks is
rebuilt, not used.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path
from typing import Any

from altup_cli.errors import first_line


class CorruptEntry(Exception):
    """A cache entry that must not be used; the message says why, in a few words."""


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def is_temp(entry: Path) -> bool:
    """atomic_path's `.NAME.XXXX.tmp`, a `.partial-` download folder, and the `*.tmp`
    files and `tmp*` folders that earlier versions wrote."""
    name = entry.name
    return (
        name.endswith(".tmp")
        or name.startswith(".partial-")
        or (name.startswith("tmp") and entry.is_dir())
    )


def remove_stale_temps(directory: Path) -> None:
    """Delete the temp files in `directory` (kill -9 runs no cleanup). Callers hold the
    cache lock (runs.data.cache_lock), so no live writer owns them."""
    if not directory.is_dir():
        return
    for entry in directory.iterdir():
        if not is_temp(entry):
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)


def _no_constants(name: str) -> None:
    raise ValueError(f"{name} is not JSON")


def read_record(path: Path) -> dict[str, Any]:
    """The JSON object in `path`; CorruptEntry when it is missing, unreadable or not one."""
    try:
        value = json.loads(path.read_bytes(), parse_constant=_no_constants)
    except FileNotFoundError:
        raise CorruptEntry(f"{path.name} is missing") from None
    except (OSError, ValueError) as err:  # ValueError covers bad JSON and bad UTF-8
        raise CorruptEntry(f"{path.name} is unreadable: {first_line(err)}") from None
    if not isinstance(value, dict):
        raise CorruptEntry(f"{path.name} is not a JSON object")
    return value


def count_field(record: dict[str, Any], key: str) -> int:
    """A non-negative integer field (a JSON true is not one)."""
    value = record.get(key)
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise CorruptEntry(f"{key} is {value!r}, not a count")
    return value


def check_file(path: Path, record: dict[str, Any]) -> None:
    """`path` has the size and sha256 that `record` holds under "bytes" and "sha256"."""
    if "bytes" not in record or "sha256" not in record:
        raise CorruptEntry("no size and checksum recorded")
    size = count_field(record, "bytes")
    if not path.is_file():
        raise CorruptEntry(f"{path.name} is missing")
    actual = path.stat().st_size
    if actual != size:
        raise CorruptEntry(f"{path.name} has {actual} bytes, {size} recorded")
    if sha256_file(path) != record["sha256"]:
        raise CorruptEntry(f"{path.name} does not match its recorded sha256")


def file_record(path: Path) -> dict[str, Any]:
    """What check_file checks, for `path` as it is now."""
    return {"bytes": path.stat().st_size, "sha256": sha256_file(path)}
