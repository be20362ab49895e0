"""Learning-rate schedules as plain arithmetic (no Lightning): multipliers of a base LR."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any


def warmup_cosine(step: int, warmup: int, total: int, min_ratio: float) -> float:
    """LR multiplier: linear warmup to 1, then cosine decay to `min_ratio` at `total`."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def with_rewarm(multiplier: float, step: int, history: Sequence[dict[str, Any]]) -> float:
    """The LR multiplier after growth: events with `lr_policy: rewarm` ramp it up again
    linearly over their `rewarm_steps` (the latest such event counts)."""
    for event in reversed(history):
        if event.get("lr_policy") == "rewarm" and event["step"] <= step:
            ramp = (step - event["step"] + 1) / max(1, int(event.get("rewarm_steps") or 1))
            return multiplier * min(1.0, ramp)
    return multiplier


def lm_multiplier(
    step: int, warmup: int, total: int, min_ratio: float, history: Sequence[dict[str, Any]]
) -> float:
    """A language-model run's LR multiplier: warmup + cosine, rewarmed after growth."""
    return with_rewarm(warmup_cosine(step, warmup, total, min_ratio), step, history)


def warmup_linear_decay(step: int, warmup: int, total: int) -> float:
    """LR multiplier: linear warmup to 1, then linear decay to 0 at `total` (fine-tuning)."""
    if step < warmup:
        return (step + 1) / warmup
    return max(0.0, (total - step) / max(1, total - warmup))
