"""Lightning's checkpoint IO, atomic: every checkpoint goes through `runs.checkpoint`.

Lightning's own save goes through a temporary file that may live on another filesystem,
which turns the final move into a copy that a full disk truncates.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lightning.fabric.plugins import TorchCheckpointIO

from altup_cli.errors import first_line
from altup_cli.runs.checkpoint import write_checkpoint


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's checkpoint IO, written to a temporary file beside the target and renamed."""

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None
    ) -> None:
        try:
            write_checkpoint(Path(path), checkpoint)
        except OSError as err:
            raise OSError(f"could not save checkpoint {path}: {first_line(err)}") from err
