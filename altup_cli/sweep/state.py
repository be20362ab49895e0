"""What a sweep directory records about itself, and who may write to it.

`plan.json` holds the sweep's shared config: every resolved setting its points have in
common, except the ones that cannot change a result (where outputs and caches go, the
logger and how often it logs, the run name, data-loader workers, the recipe's sweep axes)
and the ones the planner sets per point (steps, schedule length, validation interval). A
re-run whose shared config differs is refused, naming the settings, so one directory never
mixes results of two configs; a re-run with the same one may add budgets, archs or sizes,
and the plan keeps every point. (So a sweep made before an upgrade that added a config
setting is refused too, naming it: its points ran without that setting.)

`.lock` is held (flock, released by the kernel however the sweep ends) for as long as a
sweep writes to its directory: a second sweep on the same directory refuses at once.
`altup compare` keeps its directory the same way (its own list of uncompared keys).
"""

from __future__ import annotations

import fcntl
import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from altup_cli.errors import UserError
from altup_cli.files import finite_json

UNCOMPARED = (
    "run.name", "run.output_dir", "run.cache_dir", "logger.", "sweep.",
    "trainer.log_every_n_steps", "data.num_workers",
    "trainer.max_steps", "optim.schedule_steps", "trainer.val_check_interval",
)  # fmt: skip


def _flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(value, dict) and value:
        flat: dict[str, Any] = {}
        for key, sub in value.items():
            flat.update(_flatten(sub, f"{prefix}{key}."))
        return flat
    return {prefix.rstrip("."): value}


def shared_config(cfg: Any, uncompared: tuple[str, ...] = UNCOMPARED) -> dict[str, Any]:
    """The settings (dotted key → JSON value) that a re-run of the sweep must keep: all
    but the `uncompared` keys (`x.` is every key under x)."""
    from omegaconf import OmegaConf

    plain = json.loads(json.dumps(finite_json(OmegaConf.to_container(cfg, resolve=True))))
    flat = _flatten(plain)
    return {k: v for k, v in sorted(flat.items()) if not _uncompared(k, uncompared)}


def _uncompared(key: str, uncompared: tuple[str, ...]) -> bool:
    return any(key.startswith(u) or key == u.rstrip(".") for u in uncompared)


def check_directory(path: Path) -> None:
    """Refuse a sweep directory that is a file or lies under one."""
    for place in (path, *path.parents):
        if place.exists():
            if not place.is_dir():
                raise UserError(f"--dir {path}: {place} is not a directory")
            return


def read_plan(sweep_dir: Path, what: str = "sweep") -> dict[str, Any] | None:
    path = sweep_dir / "plan.json"
    if not path.exists():
        return None
    try:
        plan = json.loads(path.read_bytes())
    except (OSError, ValueError) as err:
        plan = err
    if not isinstance(plan, dict):
        raise UserError(f"{path}: not a readable {what} plan; move it aside to start afresh")
    return plan


def check_same_config(
    sweep_dir: Path, config: dict[str, Any], what: str = "sweep"
) -> dict[str, Any] | None:
    """The recorded plan, after refusing a shared config that differs from it (`what`
    names the kind of directory in the message: sweep, comparison)."""
    plan = read_plan(sweep_dir, what)
    recorded = (plan or {}).get("config")
    if not isinstance(recorded, dict):
        return plan  # a new sweep, or one from an altup that recorded no config
    changed = [k for k in sorted(set(recorded) | set(config)) if recorded.get(k) != config.get(k)]
    if changed:
        shown = "; ".join(f"{k}: {recorded.get(k)!r} → {config.get(k)!r}" for k in changed[:3])
        more = f" and {len(changed) - 3} more" if len(changed) > 3 else ""
        raise UserError(
            f"{sweep_dir} holds a {what} with other shared settings ({shown}{more}); their "
            "results would mix: use another --dir, or the settings it was run with"
        )
    return plan


def merged_plan(old: dict[str, Any] | None, new: dict[str, Any]) -> dict[str, Any]:
    """`new`, keeping the points (and axes) an earlier run of the sweep planned."""
    if not old:
        return new
    fields = ("key", "budget", "arch", "size")
    earlier = old.get("points") if isinstance(old.get("points"), list) else []
    points = {p["key"]: p for p in earlier if isinstance(p, dict) and all(f in p for f in fields)}
    points.update({p["key"]: p for p in new["points"]})

    def union(axis: str) -> list[Any]:
        before = old.get(axis) if isinstance(old.get(axis), list) else []
        return list(dict.fromkeys([*before, *new[axis]]))

    ordered = sorted(points.values(), key=lambda p: (p["budget"], p["arch"], p["size"]))
    return {**new, "budgets": sorted(union("budgets")), "archs": union("archs"),
            "sizes": union("sizes"), "points": ordered}  # fmt: skip


@contextmanager
def sweep_lock(sweep_dir: Path, what: str = "sweep") -> Iterator[None]:
    """Hold the directory's lock, or refuse at once if another sweep (or comparison:
    `what`) holds it."""
    sweep_dir.mkdir(parents=True, exist_ok=True)
    path = sweep_dir / ".lock"
    with open(path, "a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip()
            raise UserError(
                f"another {what}{f' (pid {holder})' if holder else ''} is running in "
                f"{sweep_dir}; wait for it to finish or use another --dir"
            ) from None
        handle.truncate(0)
        handle.write(f"{os.getpid()}\n")
        handle.flush()
        yield
