"""Settings of `altup eval ppl` and `altup eval lambada`: conf/eval/ppl.yaml + `eval.…`
overrides, typed and checked before anything is loaded or written."""

from __future__ import annotations

import typing
from dataclasses import dataclass, fields
from typing import Any

from altup_cli.config.schema import LoggerSettings, check_type
from altup_cli.errors import UserError, check_choice, require


@dataclass(frozen=True)
class TextEvalSettings:
    batch_size: int
    device: str
    text_field: str
    encoding: str
    cache_dir: str
    output_dir: str
    logger: LoggerSettings


def compose_text_eval_settings(overrides: list[str]) -> tuple[TextEvalSettings, dict[str, Any]]:
    """The typed settings and the resolved values (recorded in the report's config.yaml)."""
    from omegaconf import OmegaConf

    from altup_cli.config.compose import compose_named

    bad = [o for o in overrides if not o.lstrip("+~").startswith("eval.")]
    if bad:
        raise UserError(f"override {bad[0]!r}: settings are eval.<key>=… (see --help)")
    cfg = compose_named("eval/ppl", overrides)
    raw: dict[str, Any] = OmegaConf.to_container(cfg["eval"])  # type: ignore[assignment]
    hints = typing.get_type_hints(TextEvalSettings)
    values = {f.name: raw.get(f.name) for f in fields(TextEvalSettings) if f.name != "logger"}
    values = {k: check_type(v, hints[k], f"eval.{k}") for k, v in values.items()}
    log = raw["logger"]
    check_choice(log.get("kind"), ("wandb", "none"), "eval.logger.kind")
    logger = LoggerSettings(kind=log["kind"], project=log["project"], entity=log["entity"],
                            mode=log["mode"], group=log["group"])  # fmt: skip
    settings = TextEvalSettings(**values, logger=logger)
    require(settings.batch_size >= 1, f"eval.batch_size must be >= 1, got {settings.batch_size}")
    check_choice(settings.device, ("auto", "cpu", "cuda"), "eval.device")
    return settings, raw


def resolve_device(device: str) -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    require(device != "cuda" or torch.cuda.is_available(), "eval.device=cuda: no CUDA GPU here")
    return device
