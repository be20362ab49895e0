"""The feed-forward slot of each layer, and its default kind: the dense MLP (`ffn=dense`).

A feed-forward module maps (..., d_model) → (..., d_model). `FFNConfig.kind` picks the
kind and `FFNConfig.layers` the layers it replaces the dense MLP in. Each kind is one
`FFNKind` entry of `FFN_KINDS`, registered by its own module (this one, moe.py, peer.py,
pkm.py): `build_feedforward` asks it for layer i's module.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from altup_cli.models.config import (
    FFNConfig,  # noqa: F401  (re-exported: its old home)
    ModelConfig,
)
from altup_cli.models.registry import FFNKind, Span, layer_kinds, register_ffn_kind


class MLP(nn.Module):
    """w2 · gelu(w1 · x): two matrices, so growing the hidden width is exact (zero new w2 rows)."""

    def __init__(self, d_model: int, d_ff: int) -> None:
        super().__init__()
        self.w1 = nn.Linear(d_model, d_ff, bias=False)
        self.w2 = nn.Linear(d_ff, d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.gelu(self.w1(x)))


def build_feedforward(cfg: ModelConfig, layer_index: int) -> nn.Module:
    return layer_kinds(cfg)[layer_index].build(cfg)


register_ffn_kind(
    FFNKind(
        name="dense",
        label="dense",
        module=MLP,
        build=lambda cfg: MLP(cfg.d_model, cfg.d_ff),
        parameters=lambda cfg: {"mlp": 2 * cfg.d_model * cfg.d_ff},
        active_parameters=lambda cfg: 2 * cfg.d_model * cfg.d_ff,
        flops=lambda cfg: {"mlp": 4 * cfg.d_model * cfg.d_ff},
        layout={
            "w1.weight": {0: Span("d_ff"), 1: Span("d_model")},
            "w2.weight": {0: Span("d_model", zero=True), 1: Span("d_ff", zero=True)},
        },
        sweep={"dense": ("ffn=dense", "altup=off")},
    )
)
