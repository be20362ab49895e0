"""Choosing the next token from logits: greedy (temperature 0), or sampling at a
temperature from the top-k tokens and the top-p nucleus (Holtzman et al. 2020: the fewest
most likely tokens whose probabilities sum to at least p).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from altup_cli.models.stream import fp32


@dataclass(frozen=True)
class Sampling:
    """temperature 0: greedy; top_k 0: every token; top_p 1: no nucleus cut."""

    temperature: float = 0.8
    top_k: int = 0
    top_p: float = 1.0

    def __post_init__(self) -> None:
        if not self.temperature >= 0:  # NaN too
            raise ValueError(f"temperature must be 0 (greedy) or more, got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top-k must be 0 (off) or more, got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top-p must be in (0, 1], got {self.top_p}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def filtered_logits(logits: torch.Tensor, sampling: Sampling) -> torch.Tensor:
    """Logits (B, V) at the temperature, −inf outside the top-k and the top-p nucleus."""
    scaled = fp32(logits) / sampling.temperature
    if 0 < sampling.top_k < scaled.shape[-1]:
        kth = scaled.topk(sampling.top_k, dim=-1).values[..., -1:]
        scaled = scaled.masked_fill(scaled < kth, float("-inf"))
    if sampling.top_p < 1:
        ordered, order = scaled.sort(dim=-1, descending=True)
        probs = ordered.softmax(-1)
        before = probs.cumsum(-1) - probs  # mass of the more likely tokens
        cut = before >= sampling.top_p  # the most likely token is never cut
        scaled = scaled.masked_fill(torch.empty_like(cut).scatter_(-1, order, cut), float("-inf"))
    return scaled


def choose(
    logits: torch.Tensor, sampling: Sampling, generator: torch.Generator | None = None
) -> torch.Tensor:
    """The next token (B,) of each row of logits (B, V)."""
    if sampling.greedy:
        return logits.argmax(-1)
    probs = filtered_logits(logits, sampling).softmax(-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)
