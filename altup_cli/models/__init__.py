"""Plain-PyTorch models: no Lightning, Hydra, W&B or Typer imports in this package."""

from altup_cli.models.counting import (
    forward_flops_per_token,
    parameter_counts,
    training_flops_per_token,
)
from altup_cli.models.transformer import ModelConfig, TransformerLM

__all__ = [
    "ModelConfig",
    "TransformerLM",
    "forward_flops_per_token",
    "parameter_counts",
    "training_flops_per_token",
]
