"""`altup recipes`: the named experiments in recipes/, one line each."""

from __future__ import annotations


def recipes() -> None:
    from altup_cli.config import list_recipes, recipes_dir

    for name in list_recipes():
        lines = (recipes_dir() / f"{name}.yaml").read_text().splitlines()
        about = next(
            (ln.lstrip("# ") for ln in lines if ln.startswith("# ") and "@package" not in ln), ""
        )
        print(f"{name:24s} {about}")
