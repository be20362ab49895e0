"""Saving and loading models without pickled code: safetensors weights + a JSON config.

`load` accepts a run directory, an export directory, a `.safetensors` file or a Lightning
`.ckpt` (read with `weights_only=True`), and returns the model and its `ModelConfig`.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from safetensors.torch import load_model, save_model

from altup_cli.errors import UserError, first_line
from altup_cli.files import atomic_path, write_json
from altup_cli.models.config import ModelConfig
from altup_cli.models.transformer import TransformerLM
from altup_cli.runs.checkpoint import (
    checkpoint_file,
    model_from_checkpoint,
    read_checkpoint,
    run_dir_of,
)

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


def _resolve(path: Path) -> Path:
    """What a path to load names: an export directory, a checkpoint file, or the path."""
    if path.is_dir() and (path / "export" / "config.json").is_file():
        return path / "export"
    if path.is_dir() and checkpoint_file(path).is_file():
        return checkpoint_file(path)
    if path.suffix == ".safetensors":
        return path.parent
    return path


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
    export = run_dir_of(target) / "export" if target.suffix == ".ckpt" else target
    file = export / "tokenizer.json"
    if not file.is_file():
        raise UserError(f"{path}: no tokenizer.json saved there")
    try:
        return Tokenizer.from_file(str(file))
    except Exception as err:  # tokenizers raises a bare Exception for a damaged file
        raise UserError(f"cannot load {file}: {first_line(err)}") from None
