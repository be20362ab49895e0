"""isoFLOP analysis (Chinchilla approach 2): per budget and arch a parabola of final
validation loss against log N, its minimum N_opt and L_opt (flagged when outside the
sampled sizes); across the budgets whose minimum lies inside their sizes, power laws
N_opt ∝ C^a and D_opt ∝ C^b with residual-bootstrap 95% intervals (or "undetermined" and
why); PNG plots and a summary, for total and active parameters."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from altup_cli.files import atomic_path
from altup_cli.sweep import bootstrap

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


def _tokens_at(n_opt: Any, n: np.ndarray, f: np.ndarray) -> Any:
    """FLOPs per token at N_opt (a number or an array), from a log-log line through the
    sampled (N, F)."""
    slope, intercept = np.polyfit(np.log(n), np.log(f), 1)
    return np.exp(intercept) * n_opt**slope


@dataclass
class _Budget:
    """One budget's runs on one parameter axis and their parabola."""

    budget: float
    n: np.ndarray
    loss: np.ndarray
    f: np.ndarray
    fit: ParabolaFit


def _budgets(rows: list[dict[str, Any]], axis: str) -> list[_Budget]:
    """The budgets with a parabola (at least 3 distinct sizes), cheapest first."""
    out = []
    for budget in sorted({r["budget"] for r in rows}):
        at = [r for r in rows if r["budget"] == budget]
        n = np.array([r[axis] for r in at], dtype=float)
        loss = np.array([r["val_loss"] for r in at], dtype=float)
        fit = fit_parabola(n, loss)
        if fit is not None:
            f = np.array([r["flops_per_token"] for r in at], dtype=float)
            out.append(_Budget(budget, n, loss, f, fit))
    return out


def optima(rows: list[dict[str, Any]], axis: str) -> list[dict[str, Any]]:
    """Per budget: the parabola fit and N_opt, L_opt, D_opt = C / F(N_opt)."""
    return [
        {"budget": g.budget, "fit": g.fit, "n_opt": g.fit.n_opt, "l_opt": g.fit.l_opt,
         "d_opt": float(g.budget / _tokens_at(g.fit.n_opt, g.n, g.f)), "inside": g.fit.inside}
        for g in _budgets(rows, axis)
    ]  # fmt: skip


def scaling_laws(found: list[dict[str, Any]]) -> dict[str, Any]:
    """N_opt ∝ C^a and D_opt ∝ C^b through the budgets whose minimum lies inside their
    sizes (an outside one is an extrapolation or merely the best size, not an optimum);
    empty with fewer than 2 such budgets."""
    used = [o for o in found if o["inside"]]
    if len(used) < 2:
        return {}
    c = np.array([o["budget"] for o in used])
    a, k_n = fit_power_law(c, np.array([o["n_opt"] for o in used]))
    b, k_d = fit_power_law(c, np.array([o["d_opt"] for o in used]))
    return {"a": a, "k_n": k_n, "b": b, "k_d": k_d, "fit_budgets": [o["budget"] for o in used]}


def bootstrap_exponents(
    rows: list[dict[str, Any]], axis: str, samples: int = 1000, seed: int = 0
) -> dict[str, Any]:
    """95% intervals of a and b by a residual bootstrap that keeps every budget in every
    replicate (`bootstrap`): each budget's parabola is refitted to its fitted losses plus
    resampled noise, giving N_opt and D_opt per budget, then the power laws (over the
    budgets `scaling_laws` uses). The noise is the parabolas' residuals, or, with 3 sizes
    at every budget, that of one curvature shared by all budgets. `a`/`b` are None, with
    `why`, when the data cannot tell: fewer than 2 budgets with an inside minimum, an exact
    fit, or too many replicates without a minimum."""
    groups = _budgets(rows, axis)
    used = [g for g in groups if g.fit.inside]
    x = [np.log(g.n) for g in groups]
    noise, dof, source = bootstrap.residuals(x, [g.loss for g in groups])
    why = _why_undetermined(groups, used, noise)
    if why:
        return {"a": None, "b": None, "why": why}
    rng = np.random.default_rng(seed)
    log_c = np.log([g.budget for g in used])
    log_n = np.array([bootstrap.log_n_opt(np.log(g.n), np.array([g.fit.a, g.fit.b, g.fit.c]),
                                          noise, samples, rng) for g in used])  # fmt: skip
    with np.errstate(over="ignore", divide="ignore"):  # a minimum far out: ±inf, outside
        log_f = np.log(
            [_tokens_at(np.exp(ln), g.n, g.f) for g, ln in zip(used, log_n, strict=True)]
        )
    fit_n = np.log([g.fit.n_opt for g in used])
    fit_d = log_c - np.log([_tokens_at(g.fit.n_opt, g.n, g.f) for g in used])
    result: dict[str, Any] = {
        "a": bootstrap.interval(bootstrap.slopes(log_c, log_n), _slope(log_c, fit_n), dof),
        "b": bootstrap.interval(
            bootstrap.slopes(log_c, log_c[:, None] - log_f), _slope(log_c, fit_d), dof
        ),
        "replicates": samples,
        "residual_dof": dof,
        "residuals": source,
        "no_minimum": int(np.isnan(log_n).any(axis=0).sum()),
    }
    if result["a"] is None or result["b"] is None:
        result["why"] = (
            f"in {result['no_minimum']} of {samples} replicates a budget's parabola had no "
            "minimum: the noise is as large as the curvature"
            + (f" (noise told by {source}, so any difference between the budgets' own "
               "curvatures counts as noise: a 4th size at some budget tells it directly)"
               if source != "per-budget parabolas" else "")
        )  # fmt: skip
    return result


def _slope(log_c: np.ndarray, y: np.ndarray) -> float:
    return float(bootstrap.slopes(log_c, y[:, None])[0])


def _why_undetermined(groups: list[_Budget], used: list[_Budget], noise: np.ndarray) -> str | None:
    """Why the data cannot bound the exponents (None when they can)."""
    if len(used) < 2:
        return "fewer than 2 budgets have their minimum inside their sizes"
    losses = np.concatenate([g.loss for g in groups])
    if noise.size == 0 or np.sqrt(np.mean(noise**2)) <= 1e-9 * np.mean(np.abs(losses)):
        return "the parabolas fit the losses exactly: no noise to resample"
    return None


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
                ],
                **scaling_laws(found),
            }
            if "a" in entry:
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
        if len(entry["optima"]) >= 2:
            paths.append(_scaling_plot(arch, entry, out_dir, plt))
    return paths


def _scaling_plot(arch: str, entry: dict[str, Any], out_dir: Path, plt: Any) -> Path:
    """N_opt and D_opt against C: fitted minima filled, outside ones hollow red, and the
    power law where at least 2 budgets have an inside minimum."""
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.8))
    c = np.array([o["budget"] for o in entry["optima"]])
    inside = np.array([o["inside"] for o in entry["optima"]])
    grid = np.geomspace(c.min(), c.max(), 50)
    for ax, key, exp, coef, label in (
        (axes[0], "n_opt", "a", "k_n", "N_opt (total parameters)"),
        (axes[1], "d_opt", "b", "k_d", "D_opt (tokens)"),
    ):
        values = np.array([o[key] for o in entry["optima"]])
        ax.scatter(c[inside], values[inside])
        if not inside.all():
            ax.scatter(c[~inside], values[~inside], facecolors="none", edgecolors="red",
                       label="outside sizes (not fitted)")  # fmt: skip
        if exp in entry:
            ax.plot(grid, entry[coef] * grid ** entry[exp], label=f"∝ C^{entry[exp]:.2f}")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("training FLOPs C")
        ax.set_ylabel(label)
        if ax.get_legend_handles_labels()[0]:
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
                    "L_opt": f"{o['l_opt']:.4f}",
                    "flag": "" if o["inside"] else "outside sizes, not in fit",
                    "a [95% CI]": _exponent(entry, "a"), "b [95% CI]": _exponent(entry, "b"),
                })  # fmt: skip
    return rows


def undetermined_notes(fits: dict[str, Any]) -> list[str]:
    """One line per arch and axis whose power law or intervals are undetermined: why."""
    notes = []
    for arch, by_axis in fits.items():
        for axis, entry in by_axis.items():
            inside = sum(o["inside"] for o in entry["optima"])
            if "a" not in entry and len(entry["optima"]) >= 2:
                notes.append(
                    f"{arch} ({axis}): no power law: {inside} of {len(entry['optima'])} "
                    "budgets have their minimum inside their sizes (2 are needed)"
                )
            elif "why" in entry.get("ci", {}):
                notes.append(f"{arch} ({axis}): 95% intervals undetermined: {entry['ci']['why']}")
    return notes


def _exponent(entry: dict[str, Any], name: str) -> str:
    if name not in entry:
        return "—"
    if entry["ci"][name] is None:
        return f"{entry[name]:.2f} [undetermined]"
    low, high = entry["ci"][name]
    return f"{entry[name]:.2f} [{low:.2f}, {high:.2f}]"


def _savefig(fig: Any, path: Path) -> None:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120)
