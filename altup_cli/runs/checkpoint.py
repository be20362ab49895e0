"""The checkpoint format: a Lightning checkpoint dict with an `altup` entry.

`altup` holds `format` (1), `config` (the run's resolved config as plain data: a resume
starts from it, and growth keeps its model sections describing the grown model), `model`
(the `ModelConfig` as a dict), `flops_seen` and the validation `curve`. Lightning's own
`hyper_parameters` repeat the config and model config. Checkpoints are read with
`weights_only=True` (no pickled code runs) and written atomically.
"""

from __future__ import annotations

import copy
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from altup_cli.errors import UserError, first_line
from altup_cli.files import atomic_path
from altup_cli.models.config import ModelConfig
from altup_cli.models.transformer import TransformerLM
from altup_cli.runs.rundir import read_meta

if TYPE_CHECKING:
    from altup_cli.config import Settings

FORMAT = 1
LAST = Path("checkpoints") / "last.ckpt"  # a run directory's checkpoint to resume or grow


def checkpoint_file(path: Path) -> Path:
    """The checkpoint a path names: a run directory's `checkpoints/last.ckpt`, else the path
    itself (a .ckpt file). Whether it exists is the caller's question."""
    return path / LAST if path.is_dir() else path


def run_dir_of(ckpt: Path) -> Path:
    """The run directory a checkpoint file belongs to (`<run>/checkpoints/<file>.ckpt`)."""
    return ckpt.parent.parent


def in_run_dir(ckpt: Path) -> bool:
    """Whether the checkpoint sits in a run directory's `checkpoints/`."""
    return ckpt.parent.name == "checkpoints"


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """A Lightning checkpoint written by altup, loaded without executing pickled code."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"checkpoint {path} does not exist")
    try:
        with warnings.catch_warnings():  # torch's notes on refused pickles: we say it once
            warnings.simplefilter("ignore")
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch.load on a foreign file raises almost anything
        raise UserError(f"cannot read checkpoint {path}: {first_line(err)}") from None
    if not isinstance(ckpt, dict) or "altup" not in ckpt or "state_dict" not in ckpt:
        raise UserError(f"{path} is not an altup checkpoint (no altup metadata)")
    return ckpt


def write_checkpoint(path: Path, ckpt: dict[str, Any]) -> None:
    """`torch.save` to a temporary file beside `path`, renamed over it."""
    with atomic_path(path) as tmp:
        torch.save(ckpt, tmp)


def steps_done(ckpt_path: Path) -> int:
    return int(read_checkpoint(ckpt_path).get("global_step", 0))


def find_resume_checkpoint(resume: str, s: Settings) -> Path | None:
    """`auto`: newest run of the same name with a last.ckpt (None: start fresh); else a
    run directory or a checkpoint file."""
    if resume == "auto":
        found = []
        for ckpt in Path(s.run.output_dir).expanduser().glob(f"*/*/{LAST}"):
            if read_meta(run_dir_of(ckpt)).get("name") == s.run.name:
                found.append(ckpt)
        return max(found, key=lambda p: p.stat().st_mtime) if found else None
    path = Path(resume).expanduser()
    ckpt = checkpoint_file(path)
    if path.is_dir() and not ckpt.is_file():
        raise UserError(f"--resume: {resume} has no {LAST}")
    return ckpt


def model_from_checkpoint(ckpt: dict[str, Any], path: Path) -> TransformerLM:
    """The model of a checkpoint read by `read_checkpoint` (a UserError if it does not fit)."""
    try:
        model = TransformerLM(ModelConfig.from_dict(ckpt["altup"]["model"]))
        state = {
            k.removeprefix("model."): v
            for k, v in ckpt["state_dict"].items()
            if k.startswith("model.")
        }
        model.load_state_dict(state)
    except (ValueError, TypeError, KeyError, RuntimeError) as err:
        raise UserError(f"{path}: not a loadable altup model ({first_line(err)})") from None
    return model


def record_run(
    checkpoint: dict[str, Any],
    config: dict[str, Any],
    model: ModelConfig,
    flops_seen: float,
    curve: list[dict[str, float]],
) -> None:
    """Write the `altup` entry and Lightning's hyperparameters into a checkpoint being saved
    (the `altup` entry marks the file as ours: `--resume` refuses checkpoints without it)."""
    checkpoint["altup"] = {
        "format": FORMAT,
        "config": config,
        "model": model.to_dict(),
        "flops_seen": flops_seen,
        "curve": curve,
    }
    checkpoint["hyper_parameters"] = {"config": config, "model_config": model.to_dict()}
    checkpoint["hparams_name"] = "kwargs"


def growth_event(
    step: int,
    ops: list[Any],
    source: str,
    lr_policy: str,
    rewarm_steps: int,
    change: float,
    parameters: int,
) -> dict[str, Any]:
    """One `growth.history` entry."""
    return {
        "step": step,
        "ops": [str(op) for op in ops],
        "source": source,
        "lr_policy": lr_policy,
        "rewarm_steps": rewarm_steps,
        "max_abs_dlogits": change,
        "parameters": parameters,
    }


def recorded_config(
    config: dict[str, Any], model: ModelConfig, history: list[dict[str, Any]]
) -> dict[str, Any]:
    """The run config a checkpoint records: `config` with `growth.history` set, and once
    there was growth, its model and ffn sections describing `model` (so a resume builds the
    grown model, not the preset)."""
    out = copy.deepcopy(config)
    if history:
        fields = model.to_dict()
        for key in list(out["model"]):
            if key in fields and key not in ("altup", "ffn", "vocab_size"):
                out["model"][key] = fields[key]
        out["ffn"].update(fields["ffn"])
    out.setdefault("growth", {})["history"] = copy.deepcopy(history)
    return out


def replace_model(
    ckpt: dict[str, Any],
    model: TransformerLM,
    config: dict[str, Any],
    optimizer_state: dict[str, Any] | None = None,
    lr_factor: float = 1.0,
) -> dict[str, Any]:
    """A new checkpoint dict with `model` in place of the checkpoint's: its weights, its
    config wherever the model config is recorded, `config` as the run config, and (when
    given) the optimizer state, with every LR set to the scheduler's base LR × `lr_factor`
    (a resumed run takes its first LR from them). The best-checkpoint records are dropped:
    they belong to the old run directory."""
    new = dict(ckpt)
    new["state_dict"] = {f"model.{k}": v for k, v in model.state_dict().items()}
    if optimizer_state is not None:
        schedulers = [dict(s) for s in ckpt.get("lr_schedulers", [])]
        states = [optimizer_state]
        for i, (state, sched) in enumerate(zip(states, schedulers, strict=False)):
            lrs = [base * lr_factor for base in sched["base_lrs"]]
            groups = [dict(g, lr=lr) for g, lr in zip(state["param_groups"], lrs, strict=True)]
            states[i] = {**state, "param_groups": groups}
            sched["_last_lr"] = lrs
        new["optimizer_states"] = states
        if "lr_schedulers" in ckpt:
            new["lr_schedulers"] = schedulers
    new["altup"] = {**ckpt["altup"], "config": config, "model": model.config.to_dict()}
    hyper = {**ckpt.get("hyper_parameters", {})}
    hyper.update(config=config, model_config=model.config.to_dict())
    new["hyper_parameters"] = hyper
    new["callbacks"] = {
        k: v for k, v in ckpt.get("callbacks", {}).items() if not k.startswith("ModelCheckpoint")
    }
    return new
