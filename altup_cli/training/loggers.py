"""The one logger factory: W&B (offline unless online can work), CSV or none.

Training, GLUE fine-tuning, and the summary runs of sweeps and comparisons all get their
W&B run here, so the online → offline fallback and W&B's quiet mode apply to each alike.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

from lightning.pytorch.loggers import Logger

from altup_cli.config import LoggerSettings
from altup_cli.console import say
from altup_cli.errors import first_line


def make_logger(
    settings: LoggerSettings,
    save_dir: Path,
    name: str,
    *,
    wandb_id: str | None = None,
    job_type: str | None = None,
    config: Mapping[str, Any] | None = None,
) -> Logger | Literal[False]:
    """A Lightning logger for `settings.kind` (`wandb`, `csv`, anything else: none) writing
    under `save_dir`; a W&B run is named `name`, continues `wandb_id` when given, and
    records `config` (when given) as its hyperparameters."""
    logger: Logger
    if settings.kind == "wandb":
        from lightning.pytorch.loggers import WandbLogger

        args = _wandb_args(settings, name, job_type)
        logger = WandbLogger(save_dir=str(save_dir), id=wandb_id, resume="allow", **args)
    elif settings.kind == "csv":
        from lightning.pytorch.loggers import CSVLogger

        logger = CSVLogger(save_dir=str(save_dir), name="csv")
    else:
        return False
    if config is not None:
        logger.log_hyperparams(dict(config))
    return logger


def wandb_run(settings: LoggerSettings, save_dir: Path, name: str, job_type: str) -> Any:
    """A W&B run outside Lightning, for a summary to `.log` tables and plots into (a
    sweep's analysis, a comparison); `finish()` it when done."""
    import wandb

    args = _wandb_args(settings, name, job_type)
    return wandb.init(dir=str(save_dir), reinit="create_new", **args)


def _wandb_args(settings: LoggerSettings, name: str, job_type: str | None) -> dict[str, Any]:
    os.environ.setdefault("WANDB_SILENT", "true")
    args: dict[str, Any] = {
        "project": settings.project,
        "entity": settings.entity,
        "name": name,
        "mode": wandb_mode(settings.mode),
        "tags": list(settings.tags),
        "group": settings.group,
    }
    if job_type is not None:
        args["job_type"] = job_type
    return args


def wandb_mode(requested: str | None) -> str | None:
    """`online` only when it can work: with an API key and the server reachable in a few
    seconds (W&B itself waits 90 s for a network that is not there); else offline, said."""
    if requested != "online":
        return requested
    from urllib.parse import urlparse

    url = urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai"))
    problem = None if _wandb_api_key(url.hostname or "") else "no W&B API key"
    if problem is None:
        import socket

        try:
            port = url.port or (443 if url.scheme == "https" else 80)
            socket.create_connection((url.hostname, port), timeout=5).close()
        except OSError as err:
            problem = f"{url.hostname} unreachable ({first_line(err)})"
    if problem is None:
        return "online"
    say(f"warning: W&B online needs a network and a key: {problem}; logging offline "
        "(upload later with `wandb sync`)")  # fmt: skip
    return "offline"


def _wandb_api_key(host: str) -> str | None:
    if os.environ.get("WANDB_API_KEY"):
        return os.environ["WANDB_API_KEY"]
    import netrc

    try:
        entry = netrc.netrc().authenticators(host)
    except (OSError, netrc.NetrcParseError):
        return None
    return entry[2] if entry else None
