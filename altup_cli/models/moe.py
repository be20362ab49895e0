"""Coarse mixture of experts: E experts, each an MLP the size of the dense one.

- `token_choice` (Shazeer et al. 2017; Switch, Fedus et al. 2022): each token goes to its
  top-k experts, weighted by their router probabilities — renormalised over the k when
  k > 1 (GShard, Mixtral), raw when k = 1 (Switch: a renormalised single weight would be
  1 and the router would learn nothing from the loss); every token is processed (no
  capacity, no dropping). Load balance: the Switch auxiliary loss
  E · Σ_e f_e · P_e (f_e: fraction of the n·k assignments to e, P_e: mean probability),
  which is 1 when routing is uniform.
- `expert_choice` (Zhou et al. 2022): each expert takes the C = min(n, ⌈capacity·k·n/E⌉)
  tokens it scores highest, weighted by their probability. Balanced by construction (no
  auxiliary loss). It ranks tokens across the whole batch, so a token's output can depend
  on later tokens: not causal.
The defaults (8 experts, top-2 token choice, here and in `conf/ffn/moe.yaml`) are not the
PEER paper's MoE baseline, which had 128 experts routed by expert choice;
`ffn.num_experts=128 ffn.routing=expert_choice` takes those two settings (the rest is ours).
`MoE.forward_naive` runs every expert on every token and masks: the oracle.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from altup_cli.models.config import FFNConfig, ModelConfig
from altup_cli.models.registry import FFNKind, Span, register_ffn_kind

ROUTINGS = ("token_choice", "expert_choice")


def check_moe(num_experts: int, topk: int, routing: str, capacity: float) -> None:
    """A ValueError naming the first impossible MoE setting."""
    checks = [
        (num_experts >= 1, f"ffn.num_experts must be >= 1, got {num_experts}"),
        (topk >= 1, f"ffn.topk must be >= 1, got {topk}"),
        (topk <= num_experts, f"ffn.topk={topk} exceeds ffn.num_experts={num_experts}"),
        (routing in ROUTINGS,
         f"ffn.routing must be token_choice or expert_choice, got {routing!r}"),
        (capacity > 0, f"ffn.capacity must be positive, got {capacity}"),
    ]  # fmt: skip
    for ok, message in checks:
        if not ok:
            raise ValueError(message)


class MoE(nn.Module):
    """(..., d) → (..., d); `aux_loss` holds the last forward's weighted balance loss."""

    def __init__(
        self,
        d_model: int,
        d_ff: int,
        num_experts: int = 8,
        topk: int = 2,
        routing: str = "token_choice",
        capacity: float = 1.0,
        balance_weight: float = 0.01,
        init_std: float = 0.02,
        output_std: float = 0.02,
    ) -> None:
        super().__init__()
        check_moe(num_experts, topk, routing, capacity)
        self.topk, self.routing, self.capacity = topk, routing, capacity
        self.balance_weight = balance_weight
        self.router = nn.Linear(d_model, num_experts, bias=False)
        self.w1 = nn.Parameter(torch.randn(num_experts, d_model, d_ff) * init_std)
        self.w2 = nn.Parameter(torch.randn(num_experts, d_ff, d_model) * output_std)
        self.aux_loss: torch.Tensor | None = None

    @property
    def num_experts(self) -> int:
        return self.w1.shape[0]

    def probabilities(self, flat: torch.Tensor) -> torch.Tensor:
        logits = self.router(flat)  # softmax in fp32 at least, whatever the autocast
        return (logits if logits.dtype == torch.float64 else logits.float()).softmax(-1)

    def experts(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Each expert's (w1, w2) as views from one `unbind`, whose backward stacks the
        experts' gradients once (indexing w1[e] would zero-fill all E experts per expert)."""
        return list(zip(self.w1.unbind(0), self.w2.unbind(0), strict=True))

    @staticmethod
    def mlp(weights: tuple[torch.Tensor, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        return F.gelu(x @ weights[0]) @ weights[1]

    def assignments(self, probs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Routing weights as a dense (n, E) matrix (zero where a token skips an expert) and
        the (n, E) boolean mask of assignments."""
        n, E = probs.shape
        mask = torch.zeros_like(probs, dtype=torch.bool)
        if self.routing == "token_choice":
            top = probs.topk(self.topk, dim=-1).indices
            mask.scatter_(1, top, True)
            weights = probs * mask
            if self.topk == 1:  # Switch: the raw probability, so the router gets a gradient
                return weights, mask
            return weights / weights.sum(-1, keepdim=True), mask
        capacity = min(n, math.ceil(self.capacity * self.topk * n / E))
        top = probs.topk(capacity, dim=0).indices  # (C, E): each expert's tokens
        mask.scatter_(0, top, True)
        return probs * mask, mask

    def balance_loss(self, probs: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        fraction = mask.float().mean(0) / self.topk  # f_e over the n·k assignments
        return self.num_experts * (fraction * probs.mean(0)).sum()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1])
        probs = self.probabilities(flat)
        weights, mask = self.assignments(probs)
        self.aux_loss = (
            self.balance_weight * self.balance_loss(probs, mask)
            if self.routing == "token_choice" and self.training
            else None
        )
        out = torch.zeros_like(flat)
        for e, expert in enumerate(self.experts()):  # a loop over experts, never over tokens
            tokens = mask[:, e].nonzero().flatten()
            if tokens.numel():
                # index_select, not flat[tokens]: its backward is a parallel index_add
                # rather than a serial accumulating index_put
                gate = weights[:, e].index_select(0, tokens).to(flat.dtype)
                y = self.mlp(expert, flat.index_select(0, tokens)) * gate[:, None]
                out.index_add_(0, tokens, y)
        return out.view(x.shape)

    def forward_naive(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1])
        weights, _ = self.assignments(self.probabilities(flat))
        every = torch.stack([self.mlp(expert, flat) for expert in self.experts()], 1)
        return torch.einsum("ne,ned->nd", weights.to(flat.dtype), every).view(x.shape)


def _build(cfg: ModelConfig) -> MoE:
    f = cfg.ffn
    return MoE(
        cfg.d_model, cfg.d_ff, f.num_experts, f.topk, f.routing, f.capacity, f.balance_weight,
        cfg.init_std, cfg.output_std,
    )  # fmt: skip


def _check(f: FFNConfig) -> None:
    check_moe(f.num_experts, f.topk, f.routing, f.capacity)


def _flops(cfg: ModelConfig) -> dict[str, float]:
    """The router, and the MLPs of the experts a token meets. Expert choice: each expert
    takes C = min(n, ⌈capacity·k·n/E⌉) of the n tokens, so a token meets E·C/n experts on
    average: capacity·k, at most E (exact when capacity·k·n/E is a whole number or
    capacity·k ≥ E)."""
    f, d = cfg.ffn, cfg.d_model
    per_token = min(f.num_experts, f.topk * f.capacity) if f.routing == "expert_choice" else f.topk
    return {"experts": 2.0 * d * f.num_experts + per_token * 4 * d * cfg.d_ff}


def _decoding_refusal(f: FFNConfig) -> str | None:
    if f.routing != "expert_choice":
        return None
    return (
        "expert-choice MoE routing is not causal (a token's experts depend on later tokens), "
        "so the model cannot generate text token by token"
    )


register_ffn_kind(
    FFNKind(
        name="moe",
        label="MoE",
        module=MoE,
        build=_build,
        check=_check,
        parameters=lambda cfg: {
            "experts": cfg.d_model * cfg.ffn.num_experts
            + cfg.ffn.num_experts * 2 * cfg.d_model * cfg.d_ff
        },
        active_parameters=lambda cfg: (
            cfg.d_model * cfg.ffn.num_experts + cfg.ffn.topk * 2 * cfg.d_model * cfg.d_ff
        ),
        flops=_flops,
        decoding_refusal=_decoding_refusal,
        layout={  # router (E, d), w1 (E, d, p), w2 (E, p, d)
            "router.weight": {1: Span("d_model")},
            "w1": {1: Span("d_model"), 2: Span("d_ff")},
            "w2": {1: Span("d_ff", zero=True), 2: Span("d_model", zero=True)},
        },
        sweep={"moe": ("ffn=moe", "altup=off")},
        examples={"moe 4×top-2": {"ffn": {"kind": "moe", "num_experts": 4, "topk": 2}}},
    )
)
