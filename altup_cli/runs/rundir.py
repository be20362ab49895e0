"""The run directory and its files: naming, claiming, `run.json` and the recorded config.

A run directory is `<output_dir>/<date>/<time>_<name>` (a `-N` suffix when taken), or
`<date>/<job>[.<step>]_<name>` under SLURM or torchrun, so that every node of one launch
derives the same directory. A directory is claimed by creating its `run.json` exclusively:
two runs never share one, and a job-named directory that already holds a run is refused
(a second same-named run in one job step would otherwise overwrite the first).

This module is the only reader and writer of `run.json` and `.hydra/{config,overrides}.yaml`.
Every file is written atomically (`altup_cli.files`).
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
from collections.abc import Mapping
from datetime import datetime
from importlib.metadata import version
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from altup_cli.errors import UserError, first_line
from altup_cli.files import write_json, write_text

if TYPE_CHECKING:  # not imported at run time: loading a model (the package API) stays light
    from omegaconf import DictConfig

    from altup_cli.config import Settings

RUN_DIR_ENV = "ALTUP_RUN_DIR"  # set by rank 0 so DDP workers it launches share its run dir


def launch_rank() -> int:
    """This process's global rank as set by the launcher (0 outside distributed runs)."""
    for var in ("RANK", "SLURM_PROCID", "LOCAL_RANK"):
        if var in os.environ:
            return int(os.environ[var])
    return 0


def job_launch() -> str | None:
    """The id every process of this launch shares: SLURM job[.step], or torchrun's run id."""
    job = os.environ.get("SLURM_JOB_ID")
    if job:
        step = os.environ.get("SLURM_STEP_ID")
        return f"{job}.{step}" if step else job
    run_id = os.environ.get("TORCHELASTIC_RUN_ID")
    return run_id if run_id and run_id != "none" else None


def planned_run_dir(s: Settings, now: datetime | None = None) -> Path:
    """Where a new run would go (the first free name; nothing is created)."""
    now = now or datetime.now()
    launch = job_launch()
    base = Path(s.run.output_dir).expanduser() / f"{now:%Y-%m-%d}"
    if launch:
        return base / f"{launch}_{s.run.name}"
    candidate, n = base / f"{now:%H-%M-%S}_{s.run.name}", 1
    while candidate.exists():
        candidate, n = base / f"{now:%H-%M-%S}_{s.run.name}-{n}", n + 1
    return candidate


def claim_run_dir(s: Settings) -> Path:
    """Create a new run directory that no other run uses (rank 0 only)."""
    now = datetime.now()
    while True:
        run_dir = planned_run_dir(s, now)
        run_dir.mkdir(parents=True, exist_ok=True)
        try:
            with open(run_dir / "run.json", "x") as handle:
                handle.write("{}")
            return run_dir
        except FileExistsError:
            if job_launch():
                _refuse_taken(run_dir)


def check_claimable(s: Settings) -> None:
    """Refuse early (before data preparation) a job-named directory that is taken."""
    run_dir = planned_run_dir(s)
    if job_launch() and (run_dir / "run.json").exists():
        _refuse_taken(run_dir)


def _refuse_taken(run_dir: Path) -> None:
    status = read_meta(run_dir).get("status", "unknown")
    raise UserError(
        f"{run_dir} already holds a run of this job (status {status}); give this "
        f"one another run.name, or continue that one with --resume {run_dir}"
    )


def read_meta(run_dir: Path, strict: bool = False) -> dict[str, Any]:
    """A run directory's run.json ({} when there is none). An unreadable one is {} too,
    or with `strict` a UserError."""
    path = run_dir / "run.json"
    if strict and not path.is_file():
        return {}
    try:
        meta = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        if strict:
            raise UserError(f"cannot read {path}: {first_line(err)}") from None
        return {}
    if strict and not isinstance(meta, dict):
        raise UserError(f"{path} is not a JSON object")
    return meta if isinstance(meta, dict) else {}


def write_meta(run_dir: Path, meta: Mapping[str, Any]) -> None:
    write_json(run_dir / "run.json", dict(meta))


def set_status(run_dir: Path, status: str, **extra: Any) -> None:
    meta = read_meta(run_dir)
    meta.update(status=status, **extra)
    write_meta(run_dir, meta)


def write_yaml(path: Path, config: Mapping[str, Any] | DictConfig) -> None:
    """A config (a DictConfig or a plain mapping) as YAML."""
    from omegaconf import DictConfig, OmegaConf

    node = config if isinstance(config, DictConfig) else OmegaConf.create(dict(config))
    write_text(path, OmegaConf.to_yaml(node))


def write_config(run_dir: Path, config: Mapping[str, Any] | DictConfig) -> None:
    """The run's resolved config, `.hydra/config.yaml`."""
    write_yaml(run_dir / ".hydra" / "config.yaml", config)


def git_revision() -> str | None:
    root = Path(__file__).resolve().parents[2]
    try:
        out = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5
        )
        dirty = subprocess.run(
            ["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=5,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    if out.returncode != 0:
        return None
    return out.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")


def write_run_files(
    run_dir: Path, cfg: DictConfig, overrides: list[str], s: Settings, argv: list[str]
) -> None:
    """The resolved config, the overrides and run.json (one more entry in `starts`)."""
    from omegaconf import OmegaConf

    write_config(run_dir, cfg)
    write_text(
        run_dir / ".hydra" / "overrides.yaml", OmegaConf.to_yaml(OmegaConf.create(list(overrides)))
    )
    meta = read_meta(run_dir)
    now = datetime.now().isoformat(timespec="seconds")
    meta.setdefault("name", s.run.name)
    meta.setdefault("created", now)
    meta.setdefault("git_revision", git_revision())
    meta.setdefault("starts", []).append({"time": now, "argv": argv, "overrides": overrides})
    meta.update(
        status="running",
        launch=job_launch(),
        python=platform.python_version(),
        torch=torch.__version__,
        lightning=version("lightning"),
        host=platform.node(),
    )
    meta.pop("error", None)
    write_meta(run_dir, meta)
