"""Planning an isoFLOP sweep (Chinchilla approach 2): for every (budget C, arch, size) the
exact training FLOPs per token F of that model (the analytic count, checked against
FlopCounterMode in the tests), tokens D = C / F rounded to whole optimizer steps, and an
LR schedule sized to the run. Points with too few steps or more tokens than the corpus
holds are flagged, not silently run.

FLOP convention (`models.counting`): 2 FLOPs per multiply-add of every matrix product a
token executes, training = forward + backward = 3 × forward. Counted: attention projections
and scores (over the full T×T square), the MLP, for sparse layers their routing (with
product keys' candidate sums) and the active experts only, AltUp's predict/correct, and
the LM head (d × vocab). Not counted: the input-embedding lookup (0 FLOPs; Chinchilla
counts it as a d × vocab product, so F here is 6·d·vocab per token below Chinchilla's),
norms, softmax and rotary.

A step trains batch × seq_len × accumulate tokens on each of devices × nodes processes.
"""

from __future__ import annotations

import itertools
import math
import re
from dataclasses import asdict, dataclass, field
from typing import Any

from altup_cli.config import compose_config, conf_dir, validate
from altup_cli.errors import UserError
from altup_cli.models.counting import (
    active_parameters,
    parameter_counts,
    training_flops_per_token,
)
from altup_cli.models.registry import sweep_archs

# Architecture axis: each registered FFN kind and residual-stream variant names its archs
# and their overrides (PEER paper Fig. 1, plus AltUp).
ARCHS: dict[str, list[str]] = sweep_archs()
_SIZE = re.compile(r"^d(?P<width>\d+)x(?P<layers>\d+)$")


@dataclass
class SweepPoint:
    budget: float
    arch: str
    size: str
    overrides: list[str]
    flops_per_token: float
    tokens_per_step: int
    steps: int
    params: int
    non_embedding: int
    active_params: int
    corpus_tokens: int
    flags: list[str] = field(default_factory=list)

    @property
    def key(self) -> str:
        return point_key(self.budget, self.arch, self.size)

    @property
    def tokens(self) -> int:
        return self.steps * self.tokens_per_step

    @property
    def flops(self) -> float:
        return self.tokens * self.flops_per_token

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "key": self.key, "tokens": self.tokens, "flops": self.flops}


def point_key(budget: float, arch: str, size: str) -> str:
    """`3e08_dense_d16x1`: the budget to 3 significant digits, or as many more as tell it
    apart from every other float (2e11 and 2.0001e11 get distinct keys, and a budget of
    up to 3 digits keeps the key older sweeps gave it)."""
    digits = next(p for p in range(3, 18) if float(f"{budget:.{p}g}") == budget)
    return f"{budget:.{digits}g}_{arch}_{size}".replace("+", "")


def size_overrides(size: str) -> list[str]:
    """A model preset (`nano`, `tiny`, …) or `d<width>x<layers>` (heads of 32, MLP 4×)."""
    if (conf_dir() / "model" / f"{size}.yaml").is_file():
        return [f"model={size}"]
    match = _SIZE.match(size)
    if match is None:
        presets = ", ".join(sorted(p.stem for p in (conf_dir() / "model").glob("*.yaml")))
        raise UserError(f"unknown size {size!r} (a preset: {presets}; or d<width>x<layers>)")
    width, layers = int(match["width"]), int(match["layers"])
    heads = max(1, width // 32)
    return [
        "model=nano",
        f"model.d_model={width}",
        f"model.n_layers={layers}",
        f"model.n_heads={heads}",
        f"model.d_ff={4 * width}",
    ]


def parse_budgets(text: str) -> list[float]:
    try:
        budgets = [float(b) for b in text.split(",") if b.strip()]
    except ValueError:
        raise UserError(f"--budgets must be comma-separated numbers, got {text!r}") from None
    if not all(math.isfinite(b) for b in budgets):
        raise UserError(f"--budgets must be finite numbers, got {text!r}")
    if not budgets or min(budgets) <= 0:
        raise UserError(f"--budgets must be positive FLOP counts, got {text!r}")
    if any(b >= c for b, c in itertools.pairwise(budgets)):
        raise UserError(f"--budgets must be strictly increasing, got {text!r}")
    return budgets


def parse_names(text: str, option: str) -> list[str]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    if not names or len(set(names)) != len(names):
        raise UserError(f"{option} must list distinct names, got {text!r}")
    return names


def plan_sweep(
    overrides: list[str],
    recipe: str | None,
    budgets: list[float],
    archs: list[str],
    sizes: list[str],
    min_steps: int,
    corpus_tokens: Any,
) -> list[SweepPoint]:
    """Every (budget, arch, size) point; `corpus_tokens(settings) -> (vocab, train tokens)`
    prepares (or reads the cached) data to learn the vocabulary and corpus size."""
    unknown = [a for a in archs if a not in ARCHS]
    if unknown:
        raise UserError(f"unknown arch {unknown[0]!r} (known: {', '.join(ARCHS)})")
    models = []
    for arch in archs:
        for size in sizes:
            point_overrides = [*overrides, *ARCHS[arch], *size_overrides(size)]
            s = validate(compose_config(point_overrides, recipe))
            vocab, train_tokens = corpus_tokens(s)
            cfg = s.model_config(vocab)
            per_step = s.data.batch_size * s.data.seq_len * s.trainer.accumulate_grad_batches
            per_step *= world_size(s.trainer)
            counts = parameter_counts(cfg)
            models.append((arch, size, point_overrides, s, per_step, train_tokens, counts, cfg))
    points = []
    for budget in budgets:
        row = []
        for arch, size, point_overrides, s, per_step, train_tokens, counts, cfg in models:
            flops = training_flops_per_token(cfg, s.data.seq_len)["total"]
            steps = round(budget / (flops * per_step))
            point = SweepPoint(
                budget, arch, size, [], flops, per_step, steps, counts["total"],
                counts["non_embedding"], active_parameters(cfg), train_tokens,
            )  # fmt: skip
            point.overrides = [*point_overrides, *schedule_overrides(s, steps)]
            if steps < min_steps:
                point.flags.append(f"{steps} steps < {min_steps}")
            if point.tokens > train_tokens:
                point.flags.append(f"{point.tokens / train_tokens:.1f} epochs")
            row.append(point)
        if all(p.steps == 0 for p in row):
            cheapest = min(p.flops_per_token * p.tokens_per_step for p in row)
            raise UserError(
                f"budget {budget:.3g} is too small for one step of any model "
                f"(the cheapest step costs {cheapest:.3g} FLOPs)"
            )
        points += row
    return points


def world_size(t: Any) -> int:
    """Processes a run trains on: devices per node × nodes, each step consuming a batch per
    process. `devices=auto` (or -1) is resolved the way Lightning's Trainer resolves it
    here: the accelerator's `auto_device_count()` (1 for CPU, every visible GPU for CUDA)."""
    if t.devices not in ("auto", -1):
        return int(t.devices) * t.num_nodes
    from lightning.pytorch.accelerators import AcceleratorRegistry
    from lightning.pytorch.trainer.connectors.accelerator_connector import _AcceleratorConnector
    from lightning.pytorch.utilities.exceptions import MisconfigurationException

    name = t.accelerator
    try:
        if name == "auto":
            name = _AcceleratorConnector._choose_auto_accelerator()
        elif name == "gpu":
            name = _AcceleratorConnector._choose_gpu_accelerator_backend()
        count = AcceleratorRegistry[name]["accelerator"].auto_device_count()
    except MisconfigurationException:
        count = 0
    if count < 1:
        raise UserError(
            f"trainer.devices=auto with trainer.accelerator={t.accelerator}: no such device is "
            "visible here to count, so the tokens per step are unknown; set trainer.devices to "
            "the devices per node the points will train on"
        )
    return count * t.num_nodes


def schedule_overrides(s: Any, steps: int) -> list[str]:
    """An LR schedule sized to this run (warmup at most 10% of it, cosine over all of it),
    and validation (so a checkpoint) halfway and at the end."""
    steps = max(steps, 1)
    warmup = min(s.optim.warmup_steps, steps // 10)
    return [
        f"trainer.max_steps={steps}",
        f"optim.schedule_steps={steps}",
        f"optim.warmup_steps={warmup}",
        f"trainer.val_check_interval={max(1, steps // 2)}",
    ]


def recipe_axes(overrides: list[str], recipe: str | None) -> dict[str, str | None]:
    """A recipe's `sweep:` section (budgets, sizes, arch as comma-separated strings)."""
    if recipe is None:
        return {}
    section = compose_config(overrides, recipe).get("sweep") or {}

    def text(value: Any) -> str | None:
        if value is None or isinstance(value, (str, int, float)):
            return None if value is None else str(value)
        return ",".join(str(v) for v in value)

    return {k: text(section.get(k)) for k in ("budgets", "sizes", "arch", "min_steps")}
