"""`altup grow CKPT OPS… -o OUT`: grow a trained checkpoint function-preservingly.

OUT becomes a run directory that `altup train --resume OUT` continues (model, optimizer
moments, LR schedule, step count, data position) and `altup_cli.load(OUT)` loads: a
`checkpoints/last.ckpt`, `export/`, `.hydra/config.yaml` and `run.json` naming the source.
Everything is checked before anything is written, and nothing existing is overwritten: OUT
is assembled in a temporary directory beside it and renamed into place at the end, so a
failure part-way leaves nothing behind and the same command can simply be run again.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from datetime import datetime
from pathlib import Path
from typing import Any

import torch

from altup_cli.config import require_fits
from altup_cli.console import console, say
from altup_cli.errors import UserError, check_choice, first_line
from altup_cli.files import umask
from altup_cli.growth import GrowthOp, parse_op, plan, preset_ops
from altup_cli.models import ModelConfig, TransformerLM, ffn_kind
from altup_cli.runs.checkpoint import (
    checkpoint_file,
    growth_event,
    model_from_checkpoint,
    read_checkpoint,
    recorded_config,
    replace_model,
    run_dir_of,
    write_checkpoint,
)
from altup_cli.runs.export import save_export
from altup_cli.runs.rundir import read_meta, write_config, write_meta
from altup_cli.training.schedules import lm_multiplier

SAMPLE_SHAPE = (4, 128)  # the sample batch of random tokens Δlogits is measured on


HELP = """Grow a trained checkpoint without changing its function; write a resumable run.

OPS are KIND=SIZE or KIND=+N with KIND one of mlp_width (d_ff), heads (n_heads),
value_dim (v_head_dim), key_dim (head_dim), residual_width (d_model), layers (n_layers;
`layers=+2@0` inserts before layer 0, default at the end), and for PEER/PKM models
ffn.d_key and ffn.num_experts (not function-preserving: needs --allow-inexact).

**Examples**

* `altup grow outputs/2026-11-22/10-00-00_quickstart mlp_width=1024 layers=+2 -o grown/`

* `altup grow run/checkpoints/last.ckpt --to model=tiny -o grown-tiny/`

* `altup grow run heads=8 key_dim=64 --lr-policy rewarm --rewarm-steps 50 -o g/`

* `altup train --resume grown/ trainer.max_steps=600` — continue training the grown model.
"""


def _checkpoint_path(source: str) -> Path:
    path = checkpoint_file(Path(source).expanduser())
    if not path.is_file():
        raise UserError(f"{source}: no checkpoint there (expected a .ckpt or a run directory)")
    return path


def _out_dir(out: str) -> Path:
    """OUT, refused unless it is absent or an empty directory below a directory."""
    out_dir = Path(out).expanduser()
    if out_dir.exists() and not out_dir.is_dir():
        raise UserError(f"-o {out}: exists and is not a directory (nothing is overwritten)")
    if out_dir.is_dir() and any(out_dir.iterdir()):
        raise UserError(f"-o {out}: exists and is not empty (nothing is overwritten)")
    parent = next(p for p in out_dir.absolute().parents if p.exists())
    if not parent.is_dir():
        raise UserError(f"-o {out}: {parent} is not a directory")
    return out_dir


def _ops(texts: list[str], to: str | None, cfg: ModelConfig) -> list[GrowthOp]:
    from altup_cli.config import model_preset

    try:
        ops = [parse_op(t) for t in texts]
        if to is not None:
            key, _, name = to.partition("=")
            if key != "model" or not name:
                raise ValueError(f"--to expects model=PRESET, got {to!r}")
            ops = preset_ops(cfg, model_preset(name), name) + ops
    except ValueError as err:
        raise UserError(str(err)) from None
    if not ops:
        raise UserError("nothing to grow: give ops (e.g. mlp_width=2048 layers=+2) or --to")
    return ops


def _lr_factor(config: dict[str, Any], step: int) -> float:
    """The LR multiplier the run's policy gives at `step` (growth history included)."""
    o, total_steps = config["optim"], config["trainer"]["max_steps"]
    total = o.get("schedule_steps") or total_steps
    history = config["growth"]["history"]
    return lm_multiplier(step, o["warmup_steps"], total, o["min_lr_ratio"], history)


def grow_checkpoint(
    source: str,
    op_texts: list[str],
    out: str,
    to: str | None = None,
    allow_inexact: bool = False,
    lr_policy: str = "continue",
    rewarm_steps: int | None = None,
    seed: int = 0,
) -> Path:
    """Grow `source` by the ops and write the run directory `out`; returns it."""
    from altup_cli.config import LR_POLICIES
    from altup_cli.training.growth import grow_with_optimizer, max_logit_change

    check_choice(lr_policy, LR_POLICIES, "--lr-policy")
    if rewarm_steps is not None and rewarm_steps < 1:
        raise UserError(f"--rewarm-steps must be positive, got {rewarm_steps}")
    out_dir = _out_dir(out)
    path = _checkpoint_path(source)
    ckpt = read_checkpoint(path)
    meta = read_meta(run_dir_of(path), strict=True)
    model = model_from_checkpoint(ckpt, path)
    ops = _ops(op_texts, to, model.config)
    try:
        steps = plan(model.config, ops, allow_inexact)
    except ValueError as err:
        raise UserError(str(err)) from None
    require_fits(steps[-1][2], "the grown model")  # before anything is allocated

    config = ckpt["altup"]["config"]
    optimizer_states = ckpt.get("optimizer_states") or [None]
    step = int(ckpt.get("global_step", 0))
    grown, state = grow_with_optimizer(
        model, ops, optimizer_states[0], config["optim"]["weight_decay"], seed, allow_inexact
    )
    tokens = torch.randint(
        0,
        model.config.vocab_size,
        (SAMPLE_SHAPE[0], min(SAMPLE_SHAPE[1], model.config.max_seq_len)),
        generator=torch.Generator().manual_seed(seed),
    )
    change = max_logit_change(model, grown, tokens)
    event = growth_event(
        step,
        ops,
        f"altup grow {path}",
        lr_policy,
        rewarm_steps or config["optim"]["warmup_steps"],
        change,
        grown.num_parameters(),
    )
    config.setdefault("growth", {"schedule": [], "lr_policy": "continue", "rewarm_steps": None})
    config = recorded_config(config, grown.config, [*config["growth"].get("history", []), event])
    ckpt = replace_model(ckpt, grown, config, state, _lr_factor(config, step))
    _write(out_dir, ckpt, grown, path, config, meta)
    print_growth(model, grown, change, ops, out_dir)
    return out_dir


@contextmanager
def _staged(out_dir: Path) -> Iterator[Path]:
    """A temporary directory beside `out_dir` to write into, renamed onto it (absent or
    empty) on success. On any failure it is removed, with the parent directories made
    for it, and an OSError (a full disk, no permission) becomes one line."""
    final = out_dir.resolve()
    made = [p for p in final.parents if not p.exists()]
    tmp: Path | None = None
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent))
        yield tmp
        tmp.chmod(0o777 & ~umask())  # mkdtemp makes it 0700
        tmp.rename(final)
    except BaseException as err:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        for parent in made:  # deepest first
            with suppress(OSError):
                parent.rmdir()
        if isinstance(err, OSError):
            raise UserError(f"-o {out_dir}: cannot write: {first_line(err)}") from None
        raise


def _write(
    out_dir: Path,
    ckpt: dict[str, Any],
    grown: TransformerLM,
    path: Path,
    config: dict[str, Any],
    meta: dict[str, Any],
) -> None:
    tokenizer = run_dir_of(path) / "export" / "tokenizer.json"
    meta.pop("wandb_id", None)  # a new W&B run: a new run directory
    meta.update(
        status="grown",
        grown_from=str(path),
        created=datetime.now().isoformat(timespec="seconds"),
        name=config["run"]["name"],
    )
    with _staged(out_dir) as tmp:
        write_checkpoint(tmp / "checkpoints" / "last.ckpt", ckpt)
        save_export(grown, tmp / "export", tokenizer if tokenizer.is_file() else None)
        write_config(tmp, config)
        write_meta(tmp, meta)
    if not tokenizer.is_file():
        say(f"note: no tokenizer beside {path}; the export has none")


SHAPE_FIELDS = ("d_model", "n_layers", "n_heads", "head_dim", "v_head_dim", "d_ff", "norm_eps")


def print_growth(
    old: TransformerLM, new: TransformerLM, change: float, ops: list[GrowthOp], out: Path
) -> None:
    from rich.table import Table

    table = Table(title=f"altup grow: {' '.join(str(op) for op in ops)}")
    for column in ("", "before", "after"):
        table.add_column(column, justify="right" if column else "left")
    for name in SHAPE_FIELDS:
        table.add_row(name, str(getattr(old.config, name)), str(getattr(new.config, name)))
    for name in ffn_kind(old.config.ffn.kind).growable:  # PEER/PKM: num_experts, d_key
        a, b = getattr(old.config.ffn, name), getattr(new.config.ffn, name)
        table.add_row(f"ffn.{name}", str(a), str(b))
    table.add_row("parameters", f"{old.num_parameters():,}", f"{new.num_parameters():,}")
    console.print(table)
    shape = "×".join(map(str, SAMPLE_SHAPE))
    say(f"max |Δlogits| on a sample batch ({shape} random tokens, fp32): {change:.3e}")
    say(f"grown checkpoint: {out / 'checkpoints' / 'last.ckpt'}  (altup train --resume {out})")
