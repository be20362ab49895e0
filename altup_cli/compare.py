"""`altup compare`: train several variants on the same data, tokens and seed, one table.

Each variant is a list of extra overrides (e.g. `altup=k2`) on top of a shared recipe and
command line. Results are read from each run's metrics.json and saved, with the run
directories, as `<output_dir>/compare-<time>_<name>.json`.
"""

from __future__ import annotations

import json
import sys
from datetime import datetime
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from altup_cli.config import compose_config, validate
from altup_cli.console import console, say
from altup_cli.training import run


def compare(overrides: list[str], recipe: str | None, variants: list[str]) -> list[dict[str, Any]]:
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
    output_dir = Path(planned[0][2].run.output_dir)
    stamp = f"{datetime.now():%Y-%m-%d_%H-%M-%S}"
    out = output_dir / f"compare-{stamp}_{recipe or 'defaults'}.json"
    out.write_text(json.dumps(rows, indent=2))
    say(f"comparison saved to {out}")
    return rows


def print_comparison(rows: list[dict[str, Any]]) -> None:
    table = Table(title="altup compare — same data, tokens and seed")
    for col in (
        "variant",
        "val loss",
        "val ppl",
        "params",
        "non-emb params",
        "train FLOPs/token",
        "ms/step",
        "tokens seen",
    ):
        table.add_column(col, justify="right")
    for r in rows:
        p = r["parameters"]
        table.add_row(
            r["variant"],
            f"{r['val_loss']:.4f}",
            f"{r['val_ppl']:.2f}",
            f"{p['total']:,}",
            f"{p['non_embedding']:,}",
            f"{r['training_flops_per_token'] / 1e6:.2f}M",
            f"{r['seconds_per_step'] * 1e3:.0f}",
            f"{r['tokens_seen']:,}",
        )
    Console(width=max(console.width, 140)).print(table)
