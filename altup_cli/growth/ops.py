"""Growth operations as text (`mlp_width=2048`, `layers=+2@0`, `heads=12`) and their
composition: plan a sequence against a config (every impossible op is refused before any
model is touched), then apply it to a model and its optimizer state."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import torch

from altup_cli.growth.remap import NamedState
from altup_cli.growth.transforms import (
    FFN_FIELDS,
    current_size,
    grow_one,
    grown_config,
    inexact_reason,
)
from altup_cli.models.config import ModelConfig
from altup_cli.models.registry import FFN_KINDS, STREAM_VARIANTS
from altup_cli.models.transformer import TransformerLM

ALIASES = {
    "mlp_width": "mlp_width",
    "d_ff": "mlp_width",
    "heads": "heads",
    "n_heads": "heads",
    "value_dim": "value_dim",
    "v_head_dim": "value_dim",
    "key_dim": "key_dim",
    "head_dim": "key_dim",
    "residual_width": "residual_width",
    "d_model": "residual_width",
    "layers": "layers",
    "n_layers": "layers",
    **{name: name for name in FFN_FIELDS},  # each kind's own: ffn.d_key, ffn.num_experts
}
# Options whose growth cannot be exact, and why (spec, "PEER models"): the kinds' and
# variants' own, and the vocabulary.
def _refusals(group: str, entries: Any) -> dict[str, str]:
    """`group.field` → why, each reason prefixed by the kinds it is theirs (fields such as
    altup.K are refused by several variants for different reasons)."""
    by_key: dict[str, dict[str, list[str]]] = {}
    for entry in entries:
        for f, why in entry.growth_refusals.items():
            by_key.setdefault(f"{group}.{f}", {}).setdefault(why, []).append(entry.name)
    return {key: "; ".join(f"{'/'.join(names)}: {why}" for why, names in reasons.items())
            for key, reasons in by_key.items()}  # fmt: skip


NOT_EXACT = {
    **_refusals("ffn", FFN_KINDS.values()),
    **_refusals("altup", STREAM_VARIANTS.values()),
    "vocab_size": "new tokens need a new tokenizer",
}
# A preset's growable fields, in the order `--to` applies them.
PRESET_FIELDS = ("d_model", "n_heads", "head_dim", "v_head_dim", "d_ff", "n_layers")
_OP = re.compile(r"^(?P<key>[A-Za-z_.]+)=(?P<plus>\+)?(?P<value>\d+)(@(?P<at>\d+))?$")


@dataclass(frozen=True)
class GrowthOp:
    """Grow `kind` to `value` (or by it when `relative`); `position`: where layers go."""

    kind: str
    value: int
    relative: bool = False
    position: int | None = None

    def __str__(self) -> str:
        at = "" if self.position is None else f"@{self.position}"
        return f"{self.kind}={'+' if self.relative else ''}{self.value}{at}"

    def target(self, cfg: ModelConfig) -> int:
        return current_size(cfg, self.kind) + self.value if self.relative else self.value


def parse_op(text: str) -> GrowthOp:
    """`kind=N`, `kind=+N`, `layers=+N@P` (insert before layer P), else ValueError."""
    match = _OP.match(text.strip())
    if match is None:
        raise ValueError(
            f"cannot parse growth op {text!r}: expected KIND=N or KIND=+N "
            f"(layers=+N@POSITION inserts before layer POSITION)"
        )
    key = match["key"]
    if key in NOT_EXACT:
        raise ValueError(f"{key} cannot grow function-preservingly: {NOT_EXACT[key]}")
    if key not in ALIASES:
        known = ", ".join(sorted({*ALIASES.values()}))
        raise ValueError(f"unknown growth transform {key!r} (known: {known})")
    kind = ALIASES[key]
    if match["at"] is not None and kind != "layers":
        raise ValueError(f"{text!r}: only layers take an insertion position (@P)")
    at = int(match["at"]) if match["at"] is not None else None
    return GrowthOp(kind, int(match["value"]), match["plus"] is not None, at)


def preset_ops(cfg: ModelConfig, preset: dict[str, Any], name: str) -> list[GrowthOp]:
    """The ops that grow `cfg` to a model preset's shape (new layers at the end)."""
    for key in ("rope_theta", "tie_embeddings"):
        if key in preset and preset[key] != getattr(cfg, key):
            raise ValueError(
                f"--to model={name}: {key}={preset[key]} differs from the checkpoint's "
                f"{getattr(cfg, key)}; growth cannot change it"
            )
    heads = preset.get("n_heads", cfg.n_heads)
    target = {
        "d_model": preset.get("d_model", cfg.d_model),
        "n_heads": heads,
        "head_dim": preset.get("head_dim") or preset.get("d_model", cfg.d_model) // heads,
        "v_head_dim": preset.get("v_head_dim") or preset.get("d_model", cfg.d_model) // heads,
        "d_ff": preset.get("d_ff", cfg.d_ff),
        "n_layers": preset.get("n_layers", cfg.n_layers),
    }
    return [GrowthOp(ALIASES[f], target[f]) for f in PRESET_FIELDS]


def plan(
    cfg: ModelConfig, ops: list[GrowthOp], allow_inexact: bool = False
) -> list[tuple[GrowthOp, int, ModelConfig]]:
    """(op, target size, config after it) for every op that changes something; raises
    ValueError for an impossible op, a non-exact one without `allow_inexact`, or nothing
    to grow."""
    steps = []
    for op in ops:
        size = op.target(cfg)
        if size == current_size(cfg, op.kind):
            continue
        cfg = grown_config(cfg, op.kind, size, op.position)
        why = inexact_reason(cfg, op.kind)
        if why is not None and not allow_inexact:
            raise ValueError(
                f"{op} is not function-preserving ({why}); "
                "pass --allow-inexact to apply it and report the output change"
            )
        steps.append((op, size, cfg))
    if not steps:
        raise ValueError("nothing to grow: every op leaves the model as it is")
    return steps


def grow(
    model: TransformerLM,
    ops: list[GrowthOp],
    state: NamedState | None = None,
    seed: int = 0,
    allow_inexact: bool = False,
) -> tuple[TransformerLM, NamedState | None]:
    """Apply `ops` in order (all checked first); returns the grown model and state."""
    steps = plan(model.config, ops, allow_inexact)
    generator = torch.Generator().manual_seed(seed)
    for op, size, _ in steps:
        model, state = grow_one(model, op.kind, size, state, generator, op.position)
    return model, state
