"""Product-key retrieval (Lample et al. 2019, PKM §3.2; PEER §2): the exact top-k of N keys
at the cost of 2·√N sub-key scores and k² candidate sums.

A key is the concatenation [c_i; c'_j] of one sub-key from each of two tables of √N; its
score against q = [q1; q2] is q1·c_i + q2·c'_j. The top-k of all N sums lies among the sums
of the two sub-score top-k lists (any key outside them is beaten by k keys inside), so
retrieval is exact. The flat key index is i·√N + j.

PEER and PKM share this module's config checks, counts of the router, growth layout and
growth rules (`ffn.d_key` exact, `ffn.num_experts` not), which their registry entries use.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from altup_cli.models.config import FFNConfig, ModelConfig
from altup_cli.models.registry import Span
from altup_cli.models.row_gradients import clear_row_grads


def check_product_keys(num_keys: int, heads: int, topk: int, d_key: int) -> int:
    """√N, or a ValueError naming the first impossible setting."""
    root = math.isqrt(num_keys)
    checks = [
        (num_keys >= 1 and root * root == num_keys,
         f"ffn.num_experts must be a perfect square, got {num_keys}"),
        (heads >= 1, f"ffn.heads must be >= 1, got {heads}"),
        (topk >= 1, f"ffn.topk must be >= 1, got {topk}"),
        (topk <= root,
         f"ffn.topk={topk} exceeds √ffn.num_experts = {root} (product keys retrieve k from "
         "each sub-key table)"),
        (d_key >= 2 and d_key % 2 == 0, f"ffn.d_key must be even and >= 2, got {d_key}"),
    ]  # fmt: skip
    for ok, message in checks:
        if not ok:
            raise ValueError(message)
    return root


def check_retrieval(f: FFNConfig) -> None:
    check_product_keys(f.num_experts, f.heads, f.topk, f.d_key)


def router_parameters(cfg: ModelConfig) -> int:
    """Query network, query BatchNorm and sub-key tables of one layer's retrieval."""
    f, d = cfg.ffn, cfg.d_model
    query = d * f.heads * f.d_key + (2 * f.heads * f.d_key if f.query_bn else 0)
    tables = 1 if f.shared_keys else f.heads
    return query + tables * math.isqrt(f.num_experts) * f.d_key


def router_flops(cfg: ModelConfig) -> float:
    """Forward FLOPs per token of the query network and the 2·√N sub-key scores per head."""
    f, d = cfg.ffn, cfg.d_model
    return 2 * d * f.heads * f.d_key + 2 * f.heads * math.isqrt(f.num_experts) * f.d_key


def candidate_sums(cfg: ModelConfig) -> float:
    """The h·k² candidate sums per token (1 FLOP each; FlopCounterMode does not see them)."""
    return float(cfg.ffn.heads * cfg.ffn.topk**2)


def check_growth(field: str, size: int) -> None:
    """A ValueError for a number of keys or a key width product keys cannot have."""
    if field == "d_key" and size % 2:
        raise ValueError(f"ffn.d_key must stay even (rotary pairs / two key halves), got {size}")
    if field == "num_experts" and math.isqrt(size) ** 2 != size:
        raise ValueError(f"ffn.num_experts must be a perfect square, got {size}")


def reset_retrieval(layer: nn.Module) -> None:
    """Retrieval's own init, after the model's pass (which would overwrite its queries)."""
    layer.retrieval.reset_parameters()  # type: ignore[operator]


# How retrieval's tensors grow (under the layer's `retrieval.`): each head's two query
# halves gain free features (BatchNorm'd as before) and the sub-keys zero columns, so
# scores are unchanged; more experts add free sub-key rows.
_FEATURES = Span("key_features", built=True)
BATCHNORM = ("weight", "bias", "running_mean", "running_var")
RETRIEVAL_LAYOUT = {
    "retrieval.query.weight": {0: Span("key_features"), 1: Span("d_model")},
    **{f"retrieval.query_bn.{b}": {0: _FEATURES} for b in BATCHNORM},
    "retrieval.sub_keys": {2: Span("sub_keys"), 3: Span("key_half", zero=True)},
}
# What the PEER and PKM registry entries share: retrieval's init and growth rules, expert
# usage, and tables whose factored gradients DDP averages and FSDP cannot shard.
RETRIEVAL_FACTS: dict[str, Any] = {
    "init": reset_retrieval,
    "growable": ("num_experts", "d_key"),
    "inexact_growth": {"num_experts": "new experts can enter the top-k"},
    "growth_refusals": {
        "heads": "a new PEER/PKM head adds its experts' output at once (exact only with a "
        "zero-initialised per-head output gate, which these layers do not have)",
        "topk": "more retrieved experts change every token's output and softmax weights",
    },
    "check_growth": check_growth,
    "logs_expert_usage": True,
    "supports_fsdp": False,
}
# The growth benchmark's PEER and PKM layer: 64² experts in the middle layer.
GROWTH_EXAMPLE = {"layers": "middle", "num_experts": 4096, "heads": 4, "topk": 8, "d_key": 64}


class ProductKeyRetrieval(nn.Module):
    """(n, d_in) tokens → router scores and flat indices of the top-k keys, each (n, h, k).

    h heads each have a query network (one Linear for all heads, then BatchNorm over the
    query features when `query_bn`); heads share one pair of sub-key tables when
    `shared_keys` (PEER's choice) or own one each (PKM's).
    """

    def __init__(
        self,
        d_in: int,
        num_keys: int,
        heads: int,
        topk: int,
        d_key: int,
        query_bn: bool = True,
        shared_keys: bool = True,
    ) -> None:
        super().__init__()
        self.root = check_product_keys(num_keys, heads, topk, d_key)
        self.heads, self.topk, self.d_key = heads, topk, d_key
        self.query = nn.Linear(d_in, heads * d_key, bias=False)
        self.query_bn = nn.BatchNorm1d(heads * d_key) if query_bn else None
        # (tables, 2, √N, d_key/2): tables = 1 when shared, else one per head.
        tables = 1 if shared_keys else heads
        self.sub_keys = nn.Parameter(torch.empty(tables, 2, self.root, d_key // 2))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # Unit-variance queries (BN) against sub-keys of variance 2/d_key: unit-scale scores.
        nn.init.normal_(self.sub_keys, std=(self.d_key // 2) ** -0.5)
        nn.init.normal_(self.query.weight, std=self.query.in_features**-0.5)

    def queries(self, x: torch.Tensor) -> torch.Tensor:
        """(n, d_in) → (n, h, 2, d_key/2)."""
        q = self.query(x)
        if self.query_bn is not None:
            q = self.query_bn(q)
        return q.view(x.shape[0], self.heads, 2, self.d_key // 2)

    def sub_scores(self, x: torch.Tensor) -> torch.Tensor:
        """Sub-key scores for each head and half: (n, h, 2, √N)."""
        keys = self.sub_keys.expand(self.heads, -1, -1, -1)  # (h, 2, √N, d_key/2)
        return torch.einsum("nhsd,hsrd->nhsr", self.queries(x), keys)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        sub = self.sub_scores(x)
        k = self.topk
        top_scores, top_idx = sub.topk(k, dim=-1)  # (n, h, 2, k)
        candidates = top_scores[:, :, 0, :, None] + top_scores[:, :, 1, None, :]  # (n,h,k,k)
        scores, flat = candidates.flatten(-2).topk(k, dim=-1)  # (n, h, k)
        rows = top_idx[:, :, 0].gather(-1, flat // k)
        cols = top_idx[:, :, 1].gather(-1, flat % k)
        return scores, rows * self.root + cols

    def all_scores(self, x: torch.Tensor) -> torch.Tensor:
        """Scores of all N keys, (n, h, N): the exhaustive oracle of `forward`."""
        sub = self.sub_scores(x)
        return (sub[:, :, 0, :, None] + sub[:, :, 1, None, :]).flatten(-2)


class RetrievalLayer(nn.Module):
    """What PEER and PKM share: product-key retrieval, softmax router weights per head,
    expert usage, and tables whose factored gradients `zero_grad` clears too."""

    def __init__(
        self,
        d_model: int,
        num_keys: int,
        heads: int,
        topk: int,
        d_key: int,
        query_bn: bool,
        shared_keys: bool,
    ) -> None:
        super().__init__()
        self.retrieval = ProductKeyRetrieval(
            d_model, num_keys, heads, topk, d_key, query_bn, shared_keys
        )
        self.usage = ExpertUsage(num_keys)

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(n, d) → router weights and key indices, each (n, h·k)."""
        scores, idx = self.retrieval(x)
        weights = scores.softmax(dim=-1)
        self.usage.record(idx, weights)
        return weights.flatten(1), idx.flatten(1)

    def zero_grad(self, set_to_none: bool = True) -> None:
        super().zero_grad(set_to_none)
        clear_row_grads(self)


class ExpertUsage(nn.Module):
    """Summed router weight per expert over the batches since the last `reset` (PEER Table 2):
    usage = fraction of experts with non-zero total; unevenness = KL(z‖uniform).

    `totals` is this process's own count, a plain tensor rather than a buffer: DDP
    broadcasts rank 0's buffers before every forward, which would overwrite it (the logger
    sums the ranks' counts itself). It follows the recorded indices' device.
    """

    def __init__(self, num_experts: int) -> None:
        super().__init__()
        self.totals = torch.zeros(num_experts)

    @torch.no_grad()
    def record(self, idx: torch.Tensor, weights: torch.Tensor) -> None:
        if self.training:
            if self.totals.device != idx.device:
                self.totals = self.totals.to(idx.device)
            self.totals.index_add_(
                0, idx.flatten(), weights.detach().flatten().to(self.totals.dtype)
            )

    def stats(self) -> dict[str, float]:
        total = float(self.totals.sum())
        if total <= 0:
            return {"usage": 0.0, "unevenness": float("nan")}
        z = self.totals / total
        used = z > 0
        kl = math.log(z.numel()) + float((z[used] * z[used].log()).sum())
        return {"usage": float(used.float().mean()), "unevenness": kl}

    def reset(self) -> None:
        self.totals.zero_()
