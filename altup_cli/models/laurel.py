"""LAuReL-LR, the learned low-rank augmented residual (Menghani et al., ICML 2025), as
Gemma 3n uses it: `altup.laurel_rank=r` (0: off), with any residual-stream variant.

Gemma 3n's LaurelBlock maps the attention's normed input u = norm(x) to
u + RMSNorm(B·A·u) (A: d → r, B: r → d, `linear_left` / `linear_right`) and its decoder
layer adds that beside attention, (x + attn(u) + laurel(u)) / √2. A `Block` with LAuReL
adds the learned part alone to its attention branch:

  x + attn(u) + RMSNorm(B·A·u),   u = attn_norm(x)

The LaurelBlock's identity part (+u) and the /√2 belong to Gemma 3n's post-normed,
√d-scaled stream; in this pre-norm Block they would change the function of every layer at
init. The post-norm's gain starts at zero, so a model with LAuReL equals the one without
at init (and a layer inserted by growth stays the identity). Zeroing B instead would not
do: the norm's Jacobian at 0 is gain/√eps, and after one step the term would jump to
unit RMS. A and B are drawn like the model's other projections.
"""

from __future__ import annotations

import torch
from torch import nn

from altup_cli.models.config import ModelConfig
from altup_cli.models.registry import Span


class Laurel(nn.Module):
    """u (…, d) → norm(B·A·u) (…, d). `norm` is the model's RMSNorm of width d (passed in,
    since it lives with the transformer); its gain is zeroed here."""

    def __init__(self, d_model: int, rank: int, norm: nn.Module) -> None:
        super().__init__()
        self.down = nn.Linear(d_model, rank, bias=False)  # A (Gemma 3n's linear_left)
        self.up = nn.Linear(rank, d_model, bias=False)  # B (linear_right)
        self.norm = norm  # post_laurel_norm
        nn.init.zeros_(self.norm.weight)

    def forward(self, u: torch.Tensor) -> torch.Tensor:
        return self.norm(self.up(self.down(u)))


def layer_parameters(cfg: ModelConfig) -> int:
    """One layer's LAuReL: A (r×d), B (d×r) and the norm's gain (d); 0 when off."""
    r, d = cfg.altup.laurel_rank, cfg.d_model
    return 2 * d * r + d if r else 0


def layer_flops(cfg: ModelConfig) -> float:
    """Forward FLOPs of one layer's LAuReL per token its Block runs on: A·u then B·(Au)."""
    return float(4 * cfg.d_model * cfg.altup.laurel_rank)


def parameters(cfg: ModelConfig) -> int:
    return cfg.n_layers * layer_parameters(cfg)


def flops(cfg: ModelConfig, processed: list[float]) -> float:
    """Forward FLOPs per token, the Blocks running on `processed` of the tokens each."""
    return layer_flops(cfg) * sum(processed)


# Growth: A reads the stream (new columns free), B writes the norm's input (new rows zero,
# so norm([v, 0]) with the rescaled gain is [norm(v), 0]); layers insert with gain 0.
LAYOUT = {"down.weight": {1: Span("d_model")}, "up.weight": {0: Span("d_model", zero=True)}}
