"""A resumed run's config: the checkpoint's own, with the overrides a resume may apply."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from altup_cli.errors import UserError
from altup_cli.runs.checkpoint import read_checkpoint

# Keys a resumed run applies for real (the LR schedule and optimizer hyperparameters are
# re-set from the config after the checkpoint restores them); a change to any other key
# would not match the checkpoint's model, data or step, so it is refused.
RESUMABLE = (
    "optim.", "trainer.max_steps", "trainer.val_check_interval", "trainer.limit_val_batches",
    "trainer.log_every_n_steps", "trainer.divergence_patience", "trainer.accelerator",
    "trainer.devices", "trainer.num_nodes", "trainer.strategy", "trainer.precision", "logger.",
    "run.compile", "run.cache_dir", "run.output_dir", "data.num_workers", "growth.",
    "trainer.eval.",
)  # fmt: skip


def resumed_config(ckpt_path: Path, overrides: list[str], composed: DictConfig) -> DictConfig:
    """The checkpoint's own config with `key.sub=value` overrides on top (e.g. more steps).

    Group selections (`model=tiny`) cannot change a resumed run: each one must give the
    same section as the checkpoint has (so the original command line works with --resume).
    Dotted overrides may change only RESUMABLE keys.
    """
    ckpt = read_checkpoint(ckpt_path)
    original = ckpt["altup"]["config"]
    merged = OmegaConf.create(original)
    OmegaConf.set_struct(merged, True)
    dotted = [o for o in overrides if "=" in o and "." in o.split("=", 1)[0]]
    try:  # Hydra's own override grammar, so `a=[{step: 4}]` means what it means in a new run
        from hydra.core.override_parser.overrides_parser import OverridesParser

        for override in OverridesParser.create().parse_overrides(dotted):
            OmegaConf.update(merged, override.key_or_group.lstrip("+"), override.value())
    except Exception as err:  # hydra's and omegaconf's errors are many; all mean a bad override
        raise UserError(f"--resume override: {str(err).splitlines()[0]}") from None
    _check_groups(merged, overrides, composed)
    changed = [
        k for k in _changed_keys(original, OmegaConf.to_container(merged))
        if not k.startswith(RESUMABLE)
    ]  # fmt: skip
    if changed:
        raise UserError(
            f"--resume: {', '.join(changed)} cannot change in a resumed run (the checkpoint "
            "was trained with its own value); start a new run to change it"
        )
    return merged


def _check_groups(merged: DictConfig, overrides: list[str], composed: DictConfig) -> None:
    """Each group selection must give the checkpoint's own section."""
    grown = bool(merged.get("growth", {}).get("history"))
    for item in overrides:
        key = item.split("=", 1)[0].lstrip("+~")
        if "." in key or key not in merged or (key in ("model", "ffn") and grown):
            continue  # a grown run's model is no longer its preset
        if _without_history(merged[key]) != _without_history(composed.get(key)):
            raise UserError(
                f"--resume: {item} differs from the checkpoint's {key}; "
                "a resumed run keeps its config groups"
            )


def _changed_keys(old: Any, new: Any, prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two nested config dicts."""
    if isinstance(old, dict) and isinstance(new, dict):
        keys = sorted(set(old) | set(new), key=str)
        return [c for k in keys for c in _changed_keys(old.get(k), new.get(k), f"{prefix}{k}.")]
    return [] if old == new else [prefix.rstrip(".")]


def _without_history(section: Any) -> Any:
    """A config section as a plain value, minus the growth history a run accumulates."""
    if isinstance(section, DictConfig):
        section = OmegaConf.to_container(section)
    if isinstance(section, dict):
        return {k: v for k, v in section.items() if k != "history"}
    return section
