"""A comparison's plots (PNG, matplotlib's Agg backend): validation loss against tokens and
against cumulative training FLOPs (growth changes a run's FLOPs per token, so tokens alone
do not compare a grown run), one line per variant — the mean over seeds, with a band from
the lowest to the highest seed — and the final losses, one point per seed."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from altup_cli.files import atomic_path

Curve = list[dict[str, float]]  # a run's validation_curve: step, tokens, flops, val_loss
AXES = {"tokens": "tokens seen", "flops": "cumulative training FLOPs"}
FILES = {"tokens": "loss_vs_tokens.png", "flops": "loss_vs_flops.png", "final": "final_loss.png"}


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def band(curves: list[Curve], x: str) -> dict[str, list[float]]:
    """At every step all seeds evaluated: the step, x (the seeds' mean), mean, min and max
    loss."""
    by_step = [{p["step"]: p for p in curve} for curve in curves]
    steps = sorted(set.intersection(*(set(c) for c in by_step))) if by_step else []
    out: dict[str, list[float]] = {"step": [], "x": [], "mean": [], "min": [], "max": []}
    for step in steps:
        out["step"].append(step)
        losses = [c[step]["val_loss"] for c in by_step]
        out["x"].append(sum(c[step][x] for c in by_step) / len(by_step))
        out["mean"].append(sum(losses) / len(losses))
        out["min"].append(min(losses))
        out["max"].append(max(losses))
    return out


def curve_figure(curves: Mapping[str, list[Curve]], x: str) -> Any:
    """Validation loss against `x` ("tokens" or "flops"): one line per variant."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    seeds = max((len(c) for c in curves.values()), default=0)
    for variant, runs in curves.items():
        b = band(runs, x)
        (line,) = ax.plot(b["x"], b["mean"], marker=".", label=variant)
        if len(runs) > 1:
            ax.fill_between(b["x"], b["min"], b["max"], color=line.get_color(), alpha=0.2)
    ax.set_xlabel(AXES[x])
    ax.set_ylabel("validation loss (nats)")
    spread = f"mean of {seeds} seeds, band: min–max" if seeds > 1 else "one seed"
    ax.set_title(f"validation loss vs {AXES[x]} ({spread})")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def final_figure(losses: Mapping[str, Mapping[int, float]]) -> Any:
    """Final validation loss per seed (points; the same seed joined across variants, since
    the comparison is paired by seed) with each variant's mean as a bar."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(max(4.5, 1.6 * len(losses) + 2), 4.5))
    names = list(losses)
    seeds = sorted({s for by_seed in losses.values() for s in by_seed})
    for seed in seeds:
        xs = [i for i, n in enumerate(names) if seed in losses[n]]
        ys = [losses[names[i]][seed] for i in xs]
        ax.plot(xs, ys, marker="o", linestyle="-", alpha=0.6, label=f"seed {seed}")
    for i, name in enumerate(names):
        values = list(losses[name].values())
        if values:
            mean = sum(values) / len(values)
            ax.hlines(mean, i - 0.25, i + 0.25, colors="black", linewidth=2)
    ax.set_xticks(range(len(names)), names, rotation=15, ha="right")
    ax.set_ylabel("final validation loss (nats)")
    ax.set_title("final validation loss per seed (bar: mean)")
    ax.legend(fontsize="small")
    ax.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    return fig


def save_plots(
    out_dir: Path, curves: Mapping[str, list[Curve]], losses: Mapping[str, Mapping[int, float]]
) -> list[Path]:
    """The three PNGs in `out_dir`, each written atomically; returns their paths."""
    plt = _pyplot()
    figures = {
        "tokens": curve_figure(curves, "tokens"),
        "flops": curve_figure(curves, "flops"),
        "final": final_figure(losses),
    }
    paths = []
    for kind, fig in figures.items():
        path = out_dir / FILES[kind]
        with atomic_path(path) as tmp:
            fig.savefig(tmp, format="png", dpi=120)
        plt.close(fig)
        paths.append(path)
    return paths
