"""Growth in the config: the schedule's events (`{step, ops: [...]}` or `{step, to:
PRESET}`) parsed and planned against the model they will meet, and the LR policies.
(The record an applied growth leaves in growth.history is built by runs.checkpoint.)"""

from __future__ import annotations

from typing import Any

from altup_cli.config.compose import model_preset
from altup_cli.config.schema import Settings
from altup_cli.errors import UserError, check_choice, require
from altup_cli.models.config import ModelConfig

LR_POLICIES = ("continue", "rewarm")


def event_ops(event: Any, cfg: ModelConfig, where: str) -> list[Any]:
    """The growth ops of one schedule event ({step, ops: [...]} or {step, to: preset})."""
    from altup_cli.growth import parse_op, preset_ops

    if not isinstance(event, dict) or not isinstance(event.get("step"), int):
        raise UserError(f"{where}: expected {{step: N, ops: [...]}} or {{step: N, to: PRESET}}")
    keys = set(event) - {"step"}
    require(
        keys in ({"ops"}, {"to"}),
        f"{where}: give exactly one of ops or to (got {', '.join(sorted(keys))})",
    )
    try:
        if "to" in event:
            return preset_ops(cfg, model_preset(str(event["to"])), str(event["to"]))
        ops = event["ops"]
        require(
            not isinstance(ops, str) and isinstance(ops, list) and bool(ops),
            f"{where}.ops: expected a non-empty list like [mlp_width=1024]",
        )
        return [parse_op(str(op)) for op in ops]
    except ValueError as err:
        raise UserError(f"{where}: {err}") from None


def growth_events(s: Settings, cfg: ModelConfig) -> list[tuple[int, list[Any]]]:
    """The pending schedule as (step, ops), checked by planning every event in order
    against the model it will meet."""
    from altup_cli.growth import plan

    g = s.growth
    events, last = [], -1
    offset = len(g.schedule) - len(g.pending())
    for i, event in enumerate(g.pending(), start=offset):
        where = f"growth.schedule[{i}]"
        ops = event_ops(event, cfg, where)
        step = event["step"]
        require(step > last, f"{where}: steps must be increasing, got {step} after {last}")
        require(
            step < s.trainer.max_steps,
            f"{where}: step {step} is not below trainer.max_steps={s.trainer.max_steps} "
            "(it would never apply)",
        )
        try:
            cfg = plan(cfg, ops)[-1][2]
        except ValueError as err:
            raise UserError(f"{where} (step {step}): {err}") from None
        events.append((step, ops))
        last = step
    return events


def check_growth(s: Settings) -> None:
    """The growth section: its LR policy, and a pending schedule that can run here and
    whose every event applies to the model it will meet."""
    g = s.growth
    check_choice(g.lr_policy, LR_POLICIES, "growth.lr_policy")
    require(g.rewarm_steps is None or g.rewarm_steps > 0, "growth.rewarm_steps must be positive")
    if not g.pending():
        return
    t = s.trainer
    require(
        t.strategy in ("auto", "single_device") and t.devices in (1, "auto") and t.num_nodes == 1,
        f"growth.schedule runs on one device (trainer.strategy={t.strategy}, "
        f"devices={t.devices}); on several, grow between runs with `altup grow`",
    )
    growth_events(s, s.model_config())
