"""`altup sweep isoflop` and `altup sweep analyze`: the commands over sweep/runner.py."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from altup_cli.errors import UserError

HELP_ISOFLOP = """Plan and run an isoFLOP sweep over budgets × architectures × sizes, then fit it.

Each point trains D = C / F tokens (F: the model's exact training FLOPs per token) with its
own LR schedule, as an ordinary run in `<sweep>/points/<key>`; `results.csv` gets a row when
a point finishes, so re-running the same command skips finished points and continues
unfinished ones from their checkpoints.

**Examples**

* `altup sweep isoflop --budgets 1e13,3e13 --sizes d64x2,d96x3,nano --arch dense,peer --dry-run`

* `altup sweep isoflop --recipe isoflop-peer` — the recipe's budgets, sizes and archs.

* `altup sweep isoflop --budgets 1e15,3e15 --sizes nano,tiny,mini --executor local --jobs 2`

* `altup sweep isoflop ... --executor slurm --partition gpu --gpus-per-node 1`
"""


def isoflop_command(
    overrides: list[str], recipe: str | None, budgets: str | None, arch: str | None,
    sizes: str | None, executor: str, jobs: int, dry_run: bool, min_steps: int | None,
    run_flagged: bool, directory: str | None, slurm: dict[str, Any], samples: int,
) -> None:  # fmt: skip
    """The command: the recipe's axes where none are given; exit 1 when points failed."""
    from altup_cli.sweep.plan import recipe_axes
    from altup_cli.sweep.runner import PointsFailed, isoflop

    defaults = recipe_axes(overrides, recipe)
    chosen = {"budgets": budgets, "sizes": sizes, "arch": arch}
    for key, value in chosen.items():
        if value is None and defaults.get(key) is None:
            raise UserError(f"--{key} is required (or a recipe with sweep.{key})")
    try:
        isoflop(
            overrides, recipe, budgets or defaults["budgets"], arch or defaults["arch"],
            sizes or defaults["sizes"], executor, jobs, dry_run,
            min_steps or int(defaults.get("min_steps") or 20), run_flagged, directory, slurm,
            samples,
        )  # fmt: skip
    except PointsFailed as err:
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(1) from None


def analyze_command(directory: str, samples: int) -> None:
    from altup_cli.sweep.runner import analyze

    path = Path(directory).expanduser()
    if not (path / "results.csv").is_file():
        raise UserError(f"{directory}: no results.csv there (not a sweep directory?)")
    analyze(path, samples)
