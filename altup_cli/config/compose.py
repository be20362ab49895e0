"""Hydra composition: where conf/ and recipes/ are, composing them with overrides, the one
conversion of a Hydra/OmegaConf error into a one-line UserError, and the model presets."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from hydra import compose, initialize_config_dir
from hydra.errors import HydraException
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from altup_cli.errors import UserError

PACKAGE_DIR = Path(__file__).resolve().parent.parent  # altup_cli/
COMPOSE_ERRORS = (HydraException, OmegaConfBaseException, ValueError)


def _project_dir(name: str) -> Path:
    """`conf/` and `recipes/` live at the repository root (editable install or checkout)
    and are copied into the package for a wheel install."""
    for candidate in (PACKAGE_DIR.parent / name, PACKAGE_DIR / name):
        if candidate.is_dir():
            return candidate
    raise UserError(f"cannot find the {name}/ directory next to {PACKAGE_DIR}")


def conf_dir() -> Path:
    return _project_dir("conf")


def recipes_dir() -> Path:
    return _project_dir("recipes")


def list_recipes() -> list[str]:
    return sorted(p.stem for p in recipes_dir().glob("*.yaml"))


def hydra_error_line(err: BaseException) -> str:
    """One line for a Hydra/OmegaConf error: its first line, plus the available options of
    an unknown config group, or the `+key=` hint of an unknown key."""
    if not str(err).strip() and err.__cause__ is not None:
        err = err.__cause__
    lines = [ln.strip() for ln in str(err).splitlines() if ln.strip()]
    text = lines[0] if lines else type(err).__name__
    if "Available options" in str(err):
        idx = next(i for i, ln in enumerate(lines) if ln.startswith("Available options"))
        options = [
            ln for ln in lines[idx + 1 :] if not ln.startswith(("Config search", "provider"))
        ]
        text += f" (available: {', '.join(options)})"
    elif len(lines) > 1 and lines[1].startswith("To append"):
        text += f" (unknown key; {lines[1][0].lower()}{lines[1][1:]})"
    return text


def compose_named(name: str, overrides: list[str]) -> DictConfig:
    """conf/<name>.yaml + overrides, resolved, or a one-line UserError (`config: ...`)."""
    try:
        with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
            cfg = compose(name, overrides=overrides)
        OmegaConf.resolve(cfg)
    except COMPOSE_ERRORS as err:
        raise UserError(f"config: {hydra_error_line(err)}") from None
    return cfg


def compose_config(overrides: list[str], recipe: str | None = None) -> DictConfig:
    """Compose conf/config.yaml + recipe + overrides, resolved, or raise UserError."""
    extra: list[str] = []
    if recipe:
        if recipe not in list_recipes():
            known = ", ".join(list_recipes())
            raise UserError(f"unknown recipe {recipe!r} (available: {known})")
        extra = [f"hydra.searchpath=[file://{recipes_dir().parent}]", f"+recipes={recipe}"]
    return compose_named("config", [*extra, *overrides])


def model_preset(name: str) -> dict[str, Any]:
    """The values of conf/model/<name>.yaml (the one reader of a model preset)."""
    path = conf_dir() / "model" / f"{name}.yaml"
    if not path.is_file():
        known = ", ".join(sorted(p.stem for p in path.parent.glob("*.yaml")))
        raise UserError(f"unknown model preset {name!r} (available: {known})")
    values = OmegaConf.to_container(OmegaConf.load(path))
    assert isinstance(values, dict)
    return values  # type: ignore[return-value]
