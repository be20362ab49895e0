"""How every benchmark suite measures: the device and its clock, peak memory, and the
interleaving of the variants compared, so that a slow spell of a shared machine hits
every variant alike.

Peak memory covers the whole footprint from the moment it starts: on CUDA the allocator's
peak; on CPU the peak resident set size above the level after freed heap memory is handed
back (`malloc_trim`), with Linux `/proc/self/clear_refs` resetting the peak. A fresh
process's peak (`fresh_process_peak_gib`) is that of the whole process.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import json
import subprocess
import sys
import time
from collections.abc import Callable, Hashable, Mapping
from pathlib import Path
from typing import Any, TypeVar

import torch

from altup_cli.errors import UserError

DEVICES = ("auto", "cpu", "cuda")
CPU = torch.device("cpu")
K = TypeVar("K", bound=Hashable)
T = TypeVar("T")


def resolve_device(name: str) -> torch.device:
    """`auto` is the GPU when there is one, else the CPU; `cuda` needs a GPU."""
    if name not in DEVICES:
        raise UserError(f"--device must be {', '.join(DEVICES)}, got {name!r}")
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: no CUDA GPU is available here (use auto or cpu)")
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(name)


def sync(device: torch.device) -> None:
    """Wait for the work queued on `device`."""
    if device.type == "cuda":
        torch.cuda.synchronize()


def clock(device: torch.device = CPU) -> float:
    """Seconds on the benchmark clock once `device` has done its queued work."""
    sync(device)
    return time.perf_counter()


def timed(fn: Callable[[], T], device: torch.device = CPU) -> tuple[float, T]:
    """(seconds, result) of one call of `fn`, the device's queued work included."""
    start = clock(device)
    result = fn()
    return clock(device) - start, result


def interleave(
    calls: Mapping[K, Callable[[int], T]], rounds: int, warmup: int = 0, rotate: bool = False
) -> dict[K, list[T]]:
    """Each call's results over `rounds` rounds, after `warmup` rounds whose results are
    dropped; every round calls each once (with the round's index, warm-up rounds counted),
    in an order that changes every round: the first kept round in the given order, then
    reversed every other round (A B, B A, …) or, with `rotate`, shifted by one each round
    (A B C, B C A, …)."""
    names = list(calls)
    results: dict[K, list[T]] = {name: [] for name in names}
    for r in range(warmup + rounds):
        for name in _order(names, r - warmup, rotate):
            result = calls[name](r)
            if r >= warmup:
                results[name].append(result)
    return results


def _order(names: list[K], kept_round: int, rotate: bool) -> list[K]:
    if rotate:
        shift = kept_round % len(names)
        return names[shift:] + names[:shift]
    return names if kept_round % 2 == 0 else names[::-1]


class PeakMemory:
    """Peak memory on `device` above the level at `start()`, in bytes."""

    def __init__(self, device: torch.device) -> None:
        self.device = device

    def start(self) -> None:
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
        else:
            malloc_trim()
            Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
            self.base = proc_status("VmRSS")

    def peak(self) -> int:
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated() - self.base
        return max(0, proc_status("VmHWM") - self.base)


def malloc_trim() -> None:
    """Return freed heap pages to the OS so RSS counts live memory (glibc only)."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def proc_status(field: str) -> int:
    """A size field of /proc/self/status (VmRSS, VmHWM, …) in bytes; 0 where absent."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    return 0


def fresh_process_peak_gib(module: str, probe: str, *args: Any) -> float:
    """Peak RSS (GiB) of a fresh Python process running `probe(*args)` from `module`;
    the probe ends with `report_peak()`."""
    code = f"from {module} import {probe}; {probe}{args!r}"
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout
    return json.loads(out.strip().splitlines()[-1])["peak_gib"]


def report_peak() -> None:
    """Print this process's peak RSS so far, as `fresh_process_peak_gib` reads it."""
    print(json.dumps({"peak_gib": proc_status("VmHWM") / 2**30}))
