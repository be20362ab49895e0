"""isoFLOP analysis (Chinchilla approach 2): per budget and arch a parabola of final
validation loss against log N, its minimum N_opt and L_opt (flagged when outside the
sampled sizes); across budgets power laws N_opt ∝ C^a and D_opt ∝ C^b with bootstrap
confidence intervals; PNG plots and a summary, for total and active parameters."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from altup_cli.files import atomic_path

# Total parameters (Chinchilla's axis) and the non-embedding parameters a token actually
# uses (`counting.active_parameters`: active experts only, Kaplan's axis for dense models).
AXES = {"params": "total parameters", "active_params": "active non-embedding parameters"}


@dataclass
class ParabolaFit:
    """loss ≈ a·x² + b·x + c with x = ln N."""

    a: float
    b: float
    c: float
    n_opt: float
    l_opt: float
    inside: bool  # the minimum lies within the sampled sizes

    def loss(self, n: np.ndarray) -> np.ndarray:
        x = np.log(n)
        return self.a * x**2 + self.b * x + self.c


def fit_parabola(n: np.ndarray, loss: np.ndarray) -> ParabolaFit | None:
    """None with fewer than 3 distinct sizes; a parabola opening downwards has no
    minimum, so its N_opt is the best sampled size, flagged as outside."""
    x = np.log(np.asarray(n, dtype=float))
    y = np.asarray(loss, dtype=float)
    if len(np.unique(x)) < 3:
        return None
    a, b, c = np.polyfit(x, y, 2)
    if a <= 0:
        best = int(np.argmin(y))
        return ParabolaFit(a, b, c, float(np.exp(x[best])), float(y[best]), False)
    x_opt = -b / (2 * a)
    inside = bool(x.min() <= x_opt <= x.max())
    return ParabolaFit(a, b, c, float(np.exp(x_opt)), float(a * x_opt**2 + b * x_opt + c), inside)


def fit_power_law(c: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    """(exponent, coefficient) of y = k·C^e by least squares in log-log."""
    e, log_k = np.polyfit(np.log(c), np.log(y), 1)
    return float(e), float(np.exp(log_k))


def _tokens_at(n_opt: float, n: np.ndarray, f: np.ndarray) -> float:
    """FLOPs per token at N_opt, from a log-log line through the sampled (N, F)."""
    slope, intercept = np.polyfit(np.log(n), np.log(f), 1)
    return float(np.exp(intercept) * n_opt**slope)


def optima(rows: list[dict[str, Any]], axis: str) -> list[dict[str, Any]]:
    """Per budget: the parabola fit and N_opt, L_opt, D_opt = C / F(N_opt)."""
    out = []
    for budget in sorted({r["budget"] for r in rows}):
        at = [r for r in rows if r["budget"] == budget]
        n = np.array([r[axis] for r in at], dtype=float)
        fit = fit_parabola(n, np.array([r["val_loss"] for r in at]))
        if fit is None:
            continue
        f = np.array([r["flops_per_token"] for r in at], dtype=float)
        d_opt = budget / _tokens_at(fit.n_opt, n, f)
        out.append({"budget": budget, "fit": fit, "n_opt": fit.n_opt, "l_opt": fit.l_opt,
                    "d_opt": d_opt, "inside": fit.inside})  # fmt: skip
    return out


def bootstrap_exponents(
    rows: list[dict[str, Any]], axis: str, samples: int = 1000, seed: int = 0
) -> dict[str, list[float]]:
    """Percentile 95% intervals of a and b: resample each budget's runs with replacement,
    refit the parabolas and the power laws."""
    rng = np.random.default_rng(seed)
    by_budget = {b: [r for r in rows if r["budget"] == b] for b in {r["budget"] for r in rows}}
    a_values, b_values = [], []
    for _ in range(samples):
        resampled = [at[i] for at in by_budget.values() for i in rng.integers(0, len(at), len(at))]
        found = optima(resampled, axis)
        if len(found) < 2:
            continue
        c = np.array([o["budget"] for o in found])
        a_values.append(fit_power_law(c, np.array([o["n_opt"] for o in found]))[0])
        b_values.append(fit_power_law(c, np.array([o["d_opt"] for o in found]))[0])
    interval = {}
    for name, values in (("a", a_values), ("b", b_values)):
        interval[name] = (
            [float(np.percentile(values, 2.5)), float(np.percentile(values, 97.5))]
            if values
            else [math.nan, math.nan]
        )
    return interval


def analyze_rows(rows: list[dict[str, Any]], samples: int = 1000) -> dict[str, Any]:
    """Fits for every arch and parameter axis."""
    result: dict[str, Any] = {}
    for arch in sorted({r["arch"] for r in rows}):
        of_arch = [r for r in rows if r["arch"] == arch and r.get("val_loss") not in (None, "")]
        result[arch] = {}
        for axis in AXES:
            found = optima(of_arch, axis)
            entry: dict[str, Any] = {
                "optima": [
                    {**{k: v for k, v in o.items() if k != "fit"}, "fit": asdict(o["fit"])}
                    for o in found
                ]
            }
            if len(found) >= 2:
                c = np.array([o["budget"] for o in found])
                entry["a"], entry["k_n"] = fit_power_law(c, np.array([o["n_opt"] for o in found]))
                entry["b"], entry["k_d"] = fit_power_law(c, np.array([o["d_opt"] for o in found]))
                entry["ci"] = bootstrap_exponents(of_arch, axis, samples)
            result[arch][axis] = entry
    return result


def plot(rows: list[dict[str, Any]], fits: dict[str, Any], out_dir: Path) -> list[Path]:
    """isoFLOP curves per arch and axis (points, fitted parabolas, minima) and N_opt /
    D_opt against C with the power-law fits."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    for arch, by_axis in fits.items():
        for axis, entry in by_axis.items():
            fig, ax = plt.subplots(figsize=(6, 4.2))
            budgets = sorted({r["budget"] for r in rows if r["arch"] == arch})
            colors = plt.cm.viridis(np.linspace(0, 0.9, len(budgets)))
            for budget, color in zip(budgets, colors, strict=True):
                at = [r for r in rows if r["arch"] == arch and r["budget"] == budget]
                n = np.array([r[axis] for r in at], dtype=float)
                ax.scatter(n, [r["val_loss"] for r in at], color=color, label=f"C={budget:.2g}")
                opt = next((o for o in entry["optima"] if o["budget"] == budget), None)
                if opt is not None:
                    fit = ParabolaFit(**opt["fit"])
                    grid = np.exp(np.linspace(np.log(n.min()) - 0.2, np.log(n.max()) + 0.2, 100))
                    ax.plot(grid, fit.loss(grid), color=color, lw=1)
                    ax.scatter([fit.n_opt], [fit.l_opt], marker="*", s=160, color=color,
                               edgecolor="black" if fit.inside else "red")  # fmt: skip
            ax.set_xscale("log")
            ax.set_xlabel(AXES[axis])
            ax.set_ylabel("final validation loss (nats)")
            ax.set_title(f"isoFLOP curves: {arch}")
            ax.legend(fontsize=8)
            path = out_dir / f"isoflop_{arch}_{axis}.png"
            fig.tight_layout()
            _savefig(fig, path)
            plt.close(fig)
            paths.append(path)
        entry = by_axis["params"]
        if "a" in entry:
            paths.append(_scaling_plot(arch, entry, out_dir, plt))
    return paths


def _scaling_plot(arch: str, entry: dict[str, Any], out_dir: Path, plt: Any) -> Path:
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.8))
    c = np.array([o["budget"] for o in entry["optima"]])
    grid = np.geomspace(c.min(), c.max(), 50)
    for ax, key, exp, coef, label in (
        (axes[0], "n_opt", entry["a"], entry["k_n"], "N_opt (total parameters)"),
        (axes[1], "d_opt", entry["b"], entry["k_d"], "D_opt (tokens)"),
    ):
        ax.scatter(c, [o[key] for o in entry["optima"]])
        ax.plot(grid, coef * grid**exp, label=f"∝ C^{exp:.2f}")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("training FLOPs C")
        ax.set_ylabel(label)
        ax.legend()
    fig.suptitle(f"compute-optimal scaling: {arch}")
    fig.tight_layout()
    path = out_dir / f"scaling_{arch}.png"
    _savefig(fig, path)
    plt.close(fig)
    return path


def summary_rows(fits: dict[str, Any]) -> list[dict[str, str]]:
    rows = []
    for arch, by_axis in fits.items():
        for axis, entry in by_axis.items():
            for o in entry["optima"]:
                rows.append({
                    "arch": arch, "axis": axis, "C": f"{o['budget']:.3g}",
                    "N_opt": f"{o['n_opt']:.3g}", "D_opt": f"{o['d_opt']:.3g}",
                    "L_opt": f"{o['l_opt']:.4f}", "flag": "" if o["inside"] else "outside sizes",
                    "a [95% CI]": _exponent(entry, "a"), "b [95% CI]": _exponent(entry, "b"),
                })  # fmt: skip
    return rows


def _exponent(entry: dict[str, Any], name: str) -> str:
    if name not in entry:
        return "—"
    low, high = entry["ci"][name]
    return f"{entry[name]:.2f} [{low:.2f}, {high:.2f}]"


def _savefig(fig: Any, path: Path) -> None:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120)
