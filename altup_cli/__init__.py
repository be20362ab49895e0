"""altup: an experiment runner for AltUp, PEER and function-preserving growth.

Python API (plain PyTorch, no Lightning needed):

    import altup_cli
    model = altup_cli.build_model(altup_cli.ModelConfig(d_model=128, n_layers=4))
    model, config = altup_cli.load("outputs/2026-11-22/10-00-00_quickstart")
    tokenizer = altup_cli.load_tokenizer("outputs/2026-11-22/10-00-00_quickstart")
    logits = model(torch.tensor([tokenizer.encode("To be").ids]))
    [completion] = altup_cli.generate(model, tokenizer, "To be", max_new_tokens=40, seed=0)
    print(completion.prompt + completion.text)  # temperature=0: greedy; top_k, top_p
"""

from __future__ import annotations

from typing import Any

from altup_cli.models import (
    ModelConfig,
    TransformerLM,
    forward_flops_per_token,
    parameter_counts,
    training_flops_per_token,
)
from altup_cli.runs.export import load, load_tokenizer, save_export
from altup_cli.runs.generation import Completion, generate

__version__ = "0.1.0"


def build_model(config: ModelConfig | dict[str, Any]) -> TransformerLM:
    """A freshly initialised model from a `ModelConfig` or a plain dict of its fields."""
    cfg = config if isinstance(config, ModelConfig) else ModelConfig.from_dict(dict(config))
    return TransformerLM(cfg)


__all__ = [
    "Completion",
    "ModelConfig",
    "TransformerLM",
    "build_model",
    "forward_flops_per_token",
    "generate",
    "load",
    "load_tokenizer",
    "parameter_counts",
    "save_export",
    "training_flops_per_token",
]
