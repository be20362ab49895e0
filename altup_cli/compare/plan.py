"""What a comparison trains: every variant × seed, with its overrides, key and directory.

A variant is a space-separated list of overrides on top of the shared ones; its label
joins them with `+` (`altup=k2+altup.K=4`) and its directory name is the label made safe
for paths. A seed sets the model-initialisation seed (`run.seed`), the data seed
(`run.data_seed`: training order and held-out split), or both (`--vary`); the seed not
varied stays at the config's value. Every config is composed and validated here, before
anything is trained.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from altup_cli.config import Settings, compose_config, validate
from altup_cli.errors import UserError

DEFAULT_VARIANTS = ["altup=off", "altup=k2", "altup=recycled_k2"]
VARY = ("both", "init", "data")
MAX_SEED = 2**32 - 1  # what Lightning's seed_everything accepts


def recipe_variants(overrides: list[str], recipe: str | None) -> list[str]:
    """The `variants:` list a recipe declares, else the AltUp trio."""
    declared = compose_config(overrides, recipe).get("variants")
    if declared is None:
        return DEFAULT_VARIANTS
    if not isinstance(declared, Sequence) or isinstance(declared, str) or not declared:
        raise UserError("variants: expected a non-empty list of override strings")
    return [str(v) for v in declared]


def check_seeds(values: Sequence[Any], where: str) -> list[int]:
    """`values` as distinct seeds in [0, 2³²), or a UserError naming `where`."""
    seeds = []
    for value in values:
        text = str(value).strip()
        if isinstance(value, bool) or not re.fullmatch(r"[+-]?\d+", text):
            raise UserError(f"{where}: expected whole numbers, got {value!r}")
        seed = int(text)
        if not 0 <= seed <= MAX_SEED:
            raise UserError(f"{where}: seeds must be in 0..{MAX_SEED}, got {seed}")
        if seed in seeds:
            raise UserError(f"{where}: seed {seed} is given twice")
        seeds.append(seed)
    if not seeds:
        raise UserError(f"{where}: expected at least one seed")
    return seeds


def parse_seeds(text: str) -> list[int]:
    """`--seeds 0,1,2`."""
    return check_seeds(text.split(","), "--seeds")


def chosen_seeds(option: str | None, composed: Any, base: Settings) -> list[int]:
    """--seeds, else the recipe's `seeds:`, else the config's one run.seed."""
    if option is not None:
        return parse_seeds(option)
    declared = composed.get("seeds")
    if declared is None:
        return [base.run.seed]
    if isinstance(declared, (str, int)) or not isinstance(declared, Sequence):
        raise UserError(f"seeds: expected a list of whole numbers, got {declared!r}")
    return check_seeds(list(declared), "seeds")


def label_of(variant: str) -> str:
    return "+".join(variant.split()) or "defaults"


def slug(label: str) -> str:
    """The variant's directory name: its label with `=` as `-` and anything outside
    letters, digits and `._+,-` as `_`; a long one is cut and given a hash, so two labels
    never share a directory."""
    safe = re.sub(r"[^A-Za-z0-9._+,-]", "_", label.replace("=", "-")).lstrip(".") or "_"
    if len(safe) <= 72 and safe == label.replace("=", "-"):
        return safe
    digest = hashlib.sha1(label.encode()).hexdigest()[:8]
    return f"{safe[:62]}-{digest}"


def run_key(label: str, seed: int) -> str:
    return f"{slug(label)}/{seed}"


@dataclass(frozen=True)
class CompareRun:
    variant: str  # its label
    seed: int
    overrides: list[str]

    @property
    def key(self) -> str:
        return run_key(self.variant, self.seed)

    @property
    def run_dir(self) -> str:
        """Relative to the comparison directory."""
        return f"runs/{self.key}"


def seed_overrides(seed: int, vary: str, base: Settings) -> list[str]:
    """The overrides that give a run its seed (the other seed stays the config's)."""
    if vary == "init":
        data = base.run.data_seed if base.run.data_seed is not None else base.run.seed
        return [f"run.seed={seed}", f"run.data_seed={data}"]
    if vary == "data":
        return [f"run.data_seed={seed}"]
    return [f"run.seed={seed}", "run.data_seed=null"]


def plan_runs(
    overrides: list[str],
    recipe: str | None,
    variants: list[str],
    seeds: list[int],
    vary: str,
    base: Settings,
) -> list[CompareRun]:
    """Every variant × seed run, in that order, each config composed and validated."""
    if vary not in VARY:
        raise UserError(f"--vary must be one of {', '.join(VARY)}, got {vary!r}")
    labels = [label_of(v) for v in variants]
    for i, label in enumerate(labels):
        for other in labels[:i]:
            if slug(other) == slug(label):
                same = "is given twice" if other == label else f"and {other!r} share a name"
                raise UserError(f"variant {label!r} {same}")
    runs = []
    for variant, label in zip(variants, labels, strict=True):
        extra = variant.split()
        try:
            validate(compose_config([*overrides, *extra], recipe))
            for seed in seeds:
                name = f"{base.run.name}_{slug(label)}_s{seed}"
                args = [*overrides, *extra, f"run.name={name}", *seed_overrides(seed, vary, base)]
                validate(compose_config(args, recipe))
                runs.append(CompareRun(label, seed, args))
        except UserError as err:
            raise UserError(f"variant {label!r}: {err}") from None
    return runs


def fixed_seeds(vary: str, base: Settings) -> dict[str, Any]:
    """What the seeds do, and the seed that stays fixed: part of the shared config."""
    data = base.run.data_seed if base.run.data_seed is not None else base.run.seed
    return {
        "compare.vary": vary,
        "compare.init_seed": base.run.seed if vary == "data" else None,
        "compare.data_seed": data if vary == "init" else None,
    }


@dataclass
class Comparison:
    """A planned comparison: its runs, directory and the settings a re-run must keep."""

    base: Settings  # the shared config, validated
    recipe: str | None
    overrides: list[str]
    vary: str
    runs: list[CompareRun]
    directory: Path
    config: dict[str, Any]  # what plan.json records and a re-run must match

    @property
    def results(self) -> Path:
        return self.directory / "results.csv"
