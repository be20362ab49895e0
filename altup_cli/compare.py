"""`altup compare`: train several variants on the same data, tokens and seed, one table.

Each variant is a list of extra overrides (e.g. `altup=k2`) on top of a shared recipe and
command line. Results are read from each run's metrics.json and saved, with the run
directories, as `<output_dir>/compare-<time>_<name>.json`.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

from altup_cli.config import compose_config, validate
from altup_cli.console import print_table, say
from altup_cli.errors import UserError
from altup_cli.training import run

DEFAULT_VARIANTS = ["altup=off", "altup=k2", "altup=recycled_k2"]


def recipe_variants(overrides: list[str], recipe: str | None) -> list[str]:
    """The `variants:` list a recipe declares, else the AltUp trio."""
    declared = compose_config(overrides, recipe).get("variants")
    if declared is None:
        return DEFAULT_VARIANTS
    if not isinstance(declared, Sequence) or isinstance(declared, str) or not declared:
        raise UserError("variants: expected a non-empty list of override strings")
    return [str(v) for v in declared]


def compare(
    overrides: list[str], recipe: str | None, variants: list[str] | None = None
) -> list[dict[str, Any]]:
    variants = variants or recipe_variants(overrides, recipe)
    planned = []
    for variant in variants:  # compose and validate every variant before training any
        extra = variant.split()
        cfg = compose_config([*overrides, *extra], recipe)
        settings = validate(cfg)
        label = "+".join(extra) or "defaults"
        name = f"{settings.run.name}_{label.replace('=', '-').replace('+', '_')}"
        cfg = compose_config([*overrides, *extra, f"run.name={name}"], recipe)
        planned.append((label, cfg, validate(cfg), [*overrides, *extra]))
    rows = []
    for label, cfg, settings, args in planned:
        say(f"[bold]── {label} ──[/bold]")
        run_dir = run.train(cfg, settings, args, argv=sys.argv)
        metrics = json.loads((run_dir / "metrics.json").read_text())
        rows.append({"variant": label, "run_dir": str(run_dir), **metrics})
    print_comparison(rows)
    if any(r.get("growth") for r in rows):
        print_curves(rows)
    output_dir = Path(planned[0][2].run.output_dir)
    stamp = f"{datetime.now():%Y-%m-%d_%H-%M-%S}"
    out = output_dir / f"compare-{stamp}_{recipe or 'defaults'}.json"
    out.write_text(json.dumps(rows, indent=2))
    say(f"comparison saved to {out}")
    return rows


def print_comparison(rows: list[dict[str, Any]]) -> None:
    print_table(
        "altup compare — same data, tokens and seed",
        {
            "variant": lambda r: r["variant"],
            "val loss": lambda r: f"{r['val_loss']:.4f}",
            "val ppl": lambda r: f"{r['val_ppl']:.2f}",
            "params": lambda r: f"{r['parameters']['total']:,}",
            "non-emb params": lambda r: f"{r['parameters']['non_embedding']:,}",
            "active params": lambda r: f"{r.get('active_parameters', 0):,}",
            "train FLOPs/token": lambda r: f"{r['training_flops_per_token'] / 1e6:.2f}M",
            "ms/step": lambda r: f"{r['seconds_per_step'] * 1e3:.0f}",
            "tok/s": lambda r: f"{r['tokens_per_second']:,.0f}",
            "tokens seen": lambda r: f"{r['tokens_seen']:,}",
        },
        rows,
    )


def print_curves(rows: list[dict[str, Any]]) -> None:
    """Validation loss against cumulative training FLOPs, one column pair per variant
    (growth changes a run's FLOPs per token, so tokens alone do not compare them)."""
    curves = [{p["step"]: p for p in r.get("validation_curve", [])} for r in rows]
    steps = sorted({s for c in curves for s in c})
    columns: dict[str, Any] = {"step": lambda s: str(s)}
    for row, curve in zip(rows, curves, strict=True):
        label = row["variant"]

        def flops(s: int, c: dict = curve) -> str:
            return f"{c[s]['flops']:.3e}" if s in c else "—"

        def loss(s: int, c: dict = curve) -> str:
            return f"{c[s]['val_loss']:.4f}" if s in c else "—"

        columns[f"{label}: FLOPs"] = flops
        columns[f"{label}: val loss"] = loss
    print_table("validation loss vs cumulative training FLOPs", columns, steps)  # type: ignore[arg-type]
