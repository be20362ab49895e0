"""Scoring token sequences with a causal model: the sliding-window convention, batched
windows of equal length (no padding, so every model kind scores exactly as its plain
forward), and the UTF-8 bytes each token stands for (bits per byte).

A *segment* is a list of token ids whose first token is context only: a document is
`[EOS] + its tokens` (every token of the text is scored, the first after EOS, as in
training, where EOS separates documents), a stretch of a token stream is scored from its
second token. With context C and stride S (1 ≤ S ≤ C) a segment of n + 1 tokens is cut
into windows starting at 0, S, 2S, …, each the inputs [b, min(b + C, n)); a window scores
only the targets the previous window did not reach. So every target is scored exactly once,
the first window's with all the history the segment has, every later one with at least
C − S tokens before it (S = C: disjoint windows, as training's validation; smaller S: more
history, more compute).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F


def windows(n_targets: int, context: int, stride: int) -> Iterator[tuple[int, int, int]]:
    """(start, end, scored) for a segment of `n_targets` + 1 tokens: the window's inputs are
    positions [start, end), its targets start + 1 … end, of which the last `scored` count."""
    if not 1 <= stride <= context:
        raise ValueError(f"stride {stride} must be in [1, {context}]")
    start, reached = 0, 0
    while reached < n_targets:
        end = min(start + context, n_targets)
        yield start, end, end - reached
        reached = end
        start += stride


def token_bytes(tokenizer: Any) -> np.ndarray:
    """UTF-8 bytes each token id decodes to (special tokens such as EOS: 0). Byte-level
    BPE tokens map through its byte alphabet exactly; other tokenizers decode each id."""
    vocab: dict[str, int] = tokenizer.get_vocab(with_added_tokens=True)
    sizes = np.zeros(max(vocab.values(), default=-1) + 1, dtype=np.int64)
    special = {t.content for t in tokenizer.get_added_tokens_decoder().values() if t.special}
    byte_level = type(tokenizer.decoder).__name__ == "ByteLevel"
    for token, i in vocab.items():
        if token in special:
            continue
        sizes[i] = len(token) if byte_level else len(tokenizer.decode([i]).encode("utf-8"))
    return sizes


@dataclass
class Totals:
    """Sums over scored tokens: loss in nats (float64), tokens, bytes, windows."""

    loss: float = 0.0
    tokens: int = 0
    bytes: int = 0
    windows: int = 0
    documents: int = 0

    @property
    def mean_loss(self) -> float:
        return self.loss / self.tokens if self.tokens else math.nan

    def metrics(self) -> dict[str, float]:
        return summed_metrics(self.loss, self.tokens, self.bytes)


def summed_metrics(loss: float, tokens: int, n_bytes: int) -> dict[str, float]:
    """Mean loss (nats per token), perplexity and bits per byte of summed token losses."""
    mean = loss / tokens
    return {"loss": mean, "ppl": math.exp(mean),
            "bits_per_byte": loss / (math.log(2) * n_bytes) if n_bytes else math.inf}  # fmt: skip


def unigram_metrics(counts: np.ndarray, n_bytes: int) -> dict[str, float]:
    """The same metrics for the scored text's own unigram distribution (each token at its
    frequency in the text): a context-free reference a language model must beat."""
    nonzero = counts[counts > 0].astype(np.float64)
    n = float(nonzero.sum())
    return summed_metrics(float(-(nonzero * np.log(nonzero / n)).sum()), int(n), n_bytes)


@dataclass
class WindowScorer:
    """Scores segments window by window, batching windows of equal length; `finish()`
    flushes the partial batches. Token losses go into `totals` (bytes via `sizes`)."""

    model: Any
    context: int
    stride: int
    sizes: np.ndarray
    batch_size: int = 8
    device: str = "cpu"
    totals: Totals = field(default_factory=Totals)
    counts: np.ndarray | None = None  # scored targets per token id (the unigram baseline)
    _pending: dict[int, list[tuple[list[int], int]]] = field(default_factory=dict)

    def add(self, segment: list[int] | np.ndarray, budget: int | None = None) -> int:
        """Queue `segment`'s windows; at most `budget` targets (its first ones) are scored.
        Returns the number of targets queued."""
        ids = np.asarray(segment, dtype=np.int64)
        n = len(ids) - 1 if budget is None else min(len(ids) - 1, budget)
        if n <= 0:
            return 0
        self.totals.documents += 1
        for start, end, scored in windows(n, self.context, self.stride):
            self._queue(ids[start : end + 1], scored)
        targets = ids[1 : n + 1]
        self.totals.bytes += int(self.sizes[targets].sum())
        if self.counts is None:
            self.counts = np.zeros(len(self.sizes), dtype=np.int64)
        self.counts += np.bincount(targets, minlength=len(self.sizes))[: len(self.sizes)]
        return n

    def _queue(self, window: np.ndarray, scored: int) -> None:
        batch = self._pending.setdefault(len(window), [])
        batch.append((window.tolist(), scored))
        if len(batch) >= self.batch_size:
            self._run(self._pending.pop(len(window)))

    def finish(self) -> Totals:
        for length in sorted(self._pending):
            self._run(self._pending.pop(length))
        return self.totals

    @torch.no_grad()
    def _run(self, batch: list[tuple[list[int], int]]) -> None:
        ids = torch.tensor([w for w, _ in batch], device=self.device)
        logits = self.model(ids[:, :-1]).float()
        losses = F.cross_entropy(logits.transpose(1, 2), ids[:, 1:], reduction="none")
        for row, (_, scored) in enumerate(batch):
            self.totals.loss += float(losses[row, -scored:].double().sum())
            self.totals.tokens += scored
        self.totals.windows += len(batch)
