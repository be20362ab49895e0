"""A training run as asked for: compose → (resume) → validate, written once for every caller
(`altup train`, the sweep's and the comparison's runs)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from omegaconf import DictConfig

    from altup_cli.config import Settings


@dataclass(frozen=True)
class RunRequest:
    """The resolved config, its typed settings, the command-line overrides and the
    checkpoint to continue (None: a new run)."""

    cfg: DictConfig
    settings: Settings
    overrides: list[str]
    checkpoint: Path | None = None


def plan_run(
    overrides: list[str], recipe: str | None = None, resume: str | Path | None = None
) -> RunRequest:
    """`resume`: `auto` (the newest run of this name, or a new run when there is none), a
    run directory or a checkpoint; the checkpoint's own config then applies, with the
    overrides a resumed run may change on top."""
    from altup_cli.config import compose_config, validate
    from altup_cli.console import say
    from altup_cli.runs.checkpoint import find_resume_checkpoint
    from altup_cli.runs.resume import resumed_config

    cfg = compose_config(overrides, recipe)
    ckpt: Path | None = None
    if resume:
        ckpt = find_resume_checkpoint(str(resume), validate(cfg))
        if ckpt is None:
            say(f"--resume auto: no earlier run named {validate(cfg).run.name!r}; "
                "starting a new one")  # fmt: skip
        else:
            cfg = resumed_config(ckpt, overrides, cfg)
    return RunRequest(cfg, validate(cfg), overrides, ckpt)
