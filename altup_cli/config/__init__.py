"""Configuration: overrides in, typed settings (or one clear one-line error) out.

`compose` finds conf/ and recipes/, composes them with Hydra, turns Hydra's errors into one
line and reads model presets; `schema` holds the typed Settings and the type checks;
`validation` checks every value and path before anything is created on disk; `growth`
parses and plans the growth schedule; `resources` checks a model against this machine's
memory and devices. Training, runs, commands and the CLI may import this package; models,
growth, data and glue never do (they sit below it and raise through altup_cli.errors).
Importing the settings types does not import Hydra: the names that need it load on first use.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from altup_cli.config.resources import (
    BYTES_PER_TRAINED_PARAMETER,
    memory_bytes,
    require_devices,
    require_fits,
)
from altup_cli.config.schema import (
    MIN_VOCAB_SIZE,
    DataSettings,
    GrowthSettings,
    LoggerSettings,
    OptimSettings,
    RunSettings,
    Settings,
    TokenizerSettings,
    TrainerSettings,
    check_type,
)

if TYPE_CHECKING:
    from altup_cli.config.compose import (
        compose_config,
        compose_named,
        conf_dir,
        hydra_error_line,
        list_recipes,
        model_preset,
        recipes_dir,
    )
    from altup_cli.config.growth import LR_POLICIES, event_ops, growth_events
    from altup_cli.config.validation import validate

_NEED_HYDRA = {
    "compose": ("compose_config", "compose_named", "conf_dir", "hydra_error_line",
                "list_recipes", "model_preset", "recipes_dir"),
    "growth": ("LR_POLICIES", "event_ops", "growth_events"),
    "validation": ("validate",),
}  # fmt: skip
_LAZY = {name: module for module, names in _NEED_HYDRA.items() for name in names}

__all__ = [
    "BYTES_PER_TRAINED_PARAMETER",
    "LR_POLICIES",
    "MIN_VOCAB_SIZE",
    "DataSettings",
    "GrowthSettings",
    "LoggerSettings",
    "OptimSettings",
    "RunSettings",
    "Settings",
    "TokenizerSettings",
    "TrainerSettings",
    "check_type",
    "compose_config",
    "compose_named",
    "conf_dir",
    "event_ops",
    "growth_events",
    "hydra_error_line",
    "list_recipes",
    "memory_bytes",
    "model_preset",
    "recipes_dir",
    "require_devices",
    "require_fits",
    "validate",
]


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
    globals()[name] = value
    return value
