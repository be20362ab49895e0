"""Saving and loading models without pickled code: safetensors weights + a JSON config.

`load` accepts a run directory, an export directory, a `.safetensors` file or a Lightning
`.ckpt` (read with `weights_only=True`), and returns the model and its `ModelConfig`.
"""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_model, save_model

from altup_cli.errors import UserError, first_line
from altup_cli.files import atomic_path, write_json
from altup_cli.models.transformer import ModelConfig, TransformerLM

EXPORT_FORMAT = "altup-export"


def save_export(
    model: TransformerLM, out_dir: Path, tokenizer_path: Path | None = None, **extra: Any
) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    with atomic_path(out_dir / "model.safetensors") as tmp:
        save_model(model, str(tmp))  # de-duplicates tied weights
    meta = {"format": EXPORT_FORMAT, "version": 1, "model": model.config.to_dict(), **extra}
    write_json(out_dir / "config.json", meta)
    if tokenizer_path is not None:
        with atomic_path(out_dir / "tokenizer.json") as tmp:
            shutil.copyfile(tokenizer_path, tmp)
    return out_dir


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


def _resolve(path: Path) -> Path:
    if path.is_dir() and (path / "export" / "config.json").is_file():
        return path / "export"
    if path.is_dir() and (path / "checkpoints" / "last.ckpt").is_file():
        return path / "checkpoints" / "last.ckpt"
    if path.suffix == ".safetensors":
        return path.parent
    return path


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


def load(path: str | Path) -> tuple[TransformerLM, ModelConfig]:
    """Load a saved model (run dir, export dir, .safetensors or .ckpt) in eval mode."""
    target = _resolve(Path(path).expanduser())
    if target.suffix == ".ckpt":
        model = model_from_checkpoint(read_checkpoint(target), target)
        return model.eval(), model.config
    config_file = target / "config.json"
    if not config_file.is_file():
        raise UserError(f"{path}: no altup export, run directory or checkpoint there")
    model = _export_model(config_file)
    weights = target / "model.safetensors"
    try:
        load_model(model, str(weights))
    except Exception as err:  # safetensors raises its own errors; shapes that differ too
        raise UserError(f"cannot load {weights}: {first_line(err)}") from None
    return model.eval(), model.config


def _export_model(config_file: Path) -> TransformerLM:
    """A fresh model as an export's config.json describes it (a UserError for anything else)."""
    try:
        meta = json.loads(config_file.read_bytes())
    except (OSError, ValueError) as err:  # unreadable, not UTF-8, not JSON
        raise UserError(f"cannot read {config_file}: {first_line(err)}") from None
    if not isinstance(meta, dict) or meta.get("format") != EXPORT_FORMAT:
        raise UserError(f"{config_file} is not an altup export")
    try:
        return TransformerLM(ModelConfig.from_dict(meta["model"]))
    except (KeyError, TypeError, ValueError, AttributeError, RuntimeError) as err:
        raise UserError(f"{config_file}: not an altup model config ({first_line(err)})") from None


def load_tokenizer(path: str | Path):  # -> tokenizers.Tokenizer
    """The tokenizer saved beside an export (run dir or export dir)."""
    from tokenizers import Tokenizer

    target = _resolve(Path(path).expanduser())
    file = (
        target.parent.parent / "export" if target.suffix == ".ckpt" else target
    ) / "tokenizer.json"
    if not file.is_file():
        raise UserError(f"{path}: no tokenizer.json saved there")
    try:
        return Tokenizer.from_file(str(file))
    except Exception as err:  # tokenizers raises a bare Exception for a damaged file
        raise UserError(f"cannot load {file}: {first_line(err)}") from None
