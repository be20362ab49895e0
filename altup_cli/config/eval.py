"""Evaluation settings: conf/eval/glue.yaml + `eval.…` overrides, typed and checked per task.

Precedence for a task's value: `eval.tasks.<task>.<key>` given on the command line >
`eval.<key>` given on the command line > the task's entry under `tasks:` in the YAML > the
global value in the YAML.
"""

from __future__ import annotations

import typing
from dataclasses import dataclass, fields
from typing import Any

from altup_cli.config.schema import LoggerSettings, check_type
from altup_cli.errors import UserError, check_choice, require

PER_TASK = ("epochs", "lr", "batch_size", "max_len", "max_train_examples")


@dataclass(frozen=True)
class GlueSettings:
    epochs: int
    lr: float
    batch_size: int
    max_len: int
    pooling: str
    weight_decay: float
    warmup_ratio: float
    grad_clip: float
    seed: int
    early_stopping: bool
    patience: int
    max_train_examples: int | None
    accelerator: str

    def check(self, where: str) -> None:
        rules = [
            (self.epochs >= 1, f"epochs must be >= 1, got {self.epochs}"),
            (self.lr > 0, f"lr must be > 0, got {self.lr}"),
            (self.batch_size >= 1, f"batch_size must be >= 1, got {self.batch_size}"),
            (self.max_len >= 4, f"max_len must be >= 4, got {self.max_len}"),
            (self.pooling in ("last", "mean"),
             f"pooling must be last or mean, got {self.pooling!r}"),
            (0 <= self.warmup_ratio < 1,
             f"warmup_ratio must be in [0, 1), got {self.warmup_ratio}"),
            (self.patience >= 1, f"patience must be >= 1, got {self.patience}"),
            (self.max_train_examples is None or self.max_train_examples >= 1,
             f"max_train_examples must be >= 1 or null, got {self.max_train_examples}"),
            (self.accelerator in ("auto", "cpu", "gpu", "cuda", "mps"),
             f"accelerator must be auto, cpu or gpu, got {self.accelerator!r}"),
        ]  # fmt: skip
        for ok, message in rules:
            require(ok, f"{where}{message}")


def compose_glue_settings(overrides: list[str]) -> dict[str, Any]:
    """conf/eval/glue.yaml + overrides (`eval.epochs=5`, `eval.tasks.rte.lr=1e-4`), resolved;
    `explicit` records which keys the command line set (see `task_settings`)."""
    from omegaconf import OmegaConf

    from altup_cli.config.compose import compose_named

    bad = [o for o in overrides if not o.lstrip("+~").startswith("eval.")]
    if bad:
        raise UserError(f"override {bad[0]!r}: GLUE settings are eval.<key>=… (see --help)")
    cfg = compose_named("eval/glue", overrides)
    raw: dict[str, Any] = OmegaConf.to_container(cfg["eval"])  # type: ignore[assignment]
    raw["explicit"] = [o.lstrip("+~").split("=")[0].removeprefix("eval.") for o in overrides]
    return raw


def task_settings(raw: dict[str, Any], task: str) -> GlueSettings:
    """A task's settings by the precedence above, each of the type the field declares (a
    finite float, an int that is not 1.5)."""
    names = {f.name for f in fields(GlueSettings)}
    values = {k: v for k, v in raw.items() if k in names}
    own = (raw.get("tasks") or {}).get(task) or {}
    unknown = sorted(set(own) - set(PER_TASK))
    if unknown:
        raise UserError(f"eval.tasks.{task}.{unknown[0]}: per-task keys are {', '.join(PER_TASK)}")
    explicit = set(raw.get("explicit", []))
    where = {k: f"eval.{k}" for k in values}
    for key, value in own.items():
        if value is not None and (f"tasks.{task}.{key}" in explicit or key not in explicit):
            values[key], where[key] = value, f"eval.tasks.{task}.{key}"
    hints = typing.get_type_hints(GlueSettings)
    values = {k: check_type(v, hints[k], where[k]) for k, v in values.items()}
    try:
        settings = GlueSettings(**values)
    except TypeError as err:
        raise UserError(f"eval: {err}") from None
    settings.check(f"eval ({task}): ")
    return settings


def check_run_settings(raw: dict[str, Any]) -> None:
    """The settings that are not per task, before anything is loaded or written."""
    check_choice(raw["source"], ("tsv", "hf"), "eval.source")
    require(
        isinstance(raw["output_dir"], str),
        f"eval.output_dir: expected a path, got {raw['output_dir']!r}",
    )
    check_choice((raw.get("logger") or {}).get("kind"), ("wandb", "none"), "eval.logger.kind")


def logger_settings(raw: dict[str, Any]) -> LoggerSettings:
    log = raw["logger"]
    return LoggerSettings(
        kind=log["kind"], project=log["project"], entity=log["entity"], mode=log["mode"],
        group=log["group"],
    )  # fmt: skip
