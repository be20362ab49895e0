"""Moved to `altup_cli.runs.export`; this re-export keeps old imports working meanwhile."""

from altup_cli.runs.checkpoint import model_from_checkpoint, read_checkpoint  # noqa: F401
from altup_cli.runs.export import EXPORT_FORMAT, load, load_tokenizer, save_export  # noqa: F401
