"""GLUE's official metrics, computed locally in float64 (no hub metric scripts): accuracy,
binary F1 (positive class 1), Matthews correlation (CoLA), Pearson and Spearman (STS-B;
Spearman = Pearson of average ranks, ties shared)."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np


def accuracy(pred: Sequence[float], gold: Sequence[float]) -> float:
    return float(np.mean(np.asarray(pred) == np.asarray(gold)))


def f1(pred: Sequence[float], gold: Sequence[float]) -> float:
    p, g = np.asarray(pred) == 1, np.asarray(gold) == 1
    tp = float(np.sum(p & g))
    denominator = float(np.sum(p) + np.sum(g))
    return 2 * tp / denominator if denominator else 0.0


def mcc(pred: Sequence[float], gold: Sequence[float]) -> float:
    """Matthews correlation of binary labels; 0 when a marginal is constant (as sklearn)."""
    p, g = np.asarray(pred) == 1, np.asarray(gold) == 1
    tp, tn = float(np.sum(p & g)), float(np.sum(~p & ~g))
    fp, fn = float(np.sum(p & ~g)), float(np.sum(~p & g))
    denominator = np.sqrt((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn))
    return float((tp * tn - fp * fn) / denominator) if denominator else 0.0


def pearson(pred: Sequence[float], gold: Sequence[float]) -> float:
    x = np.asarray(pred, dtype=np.float64)
    y = np.asarray(gold, dtype=np.float64)
    x, y = x - x.mean(), y - y.mean()
    denominator = np.sqrt(np.sum(x * x) * np.sum(y * y))
    return float(np.sum(x * y) / denominator) if denominator else 0.0


def _ranks(values: Sequence[float]) -> np.ndarray:
    """1-based ranks, tied values sharing their average rank."""
    v = np.asarray(values, dtype=np.float64)
    order = np.argsort(v, kind="mergesort")
    ranks = np.empty(len(v), dtype=np.float64)
    ranks[order] = np.arange(1, len(v) + 1)
    _, inverse, counts = np.unique(v, return_inverse=True, return_counts=True)
    sums = np.bincount(inverse, weights=ranks)
    return sums[inverse] / counts[inverse]


def spearman(pred: Sequence[float], gold: Sequence[float]) -> float:
    return pearson(_ranks(pred), _ranks(gold))


METRICS: dict[str, Callable[[Sequence[float], Sequence[float]], float]] = {
    "accuracy": accuracy,
    "f1": f1,
    "mcc": mcc,
    "pearson": pearson,
    "spearman": spearman,
}
