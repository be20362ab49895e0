"""The feed-forward slot of each layer: dense MLP today; PEER, MoE and PKM plug in here.

A feed-forward module maps (..., d_model) → (..., d_model). `build_feedforward` picks the
kind named by `ModelConfig.ffn`; new kinds register a constructor in `FEEDFORWARD_KINDS`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

if TYPE_CHECKING:
    from altup_cli.models.transformer import ModelConfig


class MLP(nn.Module):
    """w2 · gelu(w1 · x): two matrices, so growing the hidden width is exact (zero new w2 rows)."""

    def __init__(self, d_model: int, d_ff: int) -> None:
        super().__init__()
        self.w1 = nn.Linear(d_model, d_ff, bias=False)
        self.w2 = nn.Linear(d_ff, d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.gelu(self.w1(x)))


FEEDFORWARD_KINDS: dict[str, Callable[[ModelConfig, int], nn.Module]] = {
    "dense": lambda cfg, layer_index: MLP(cfg.d_model, cfg.d_ff),
}


def build_feedforward(cfg: ModelConfig, layer_index: int) -> nn.Module:
    try:
        make = FEEDFORWARD_KINDS[cfg.ffn]
    except KeyError:
        known = ", ".join(sorted(FEEDFORWARD_KINDS))
        raise ValueError(f"unknown model.ffn {cfg.ffn!r} (known: {known})") from None
    return make(cfg, layer_index)
