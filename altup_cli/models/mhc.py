"""Manifold-constrained Hyper-Connections (DeepSeek, arXiv 2512.24880): `altup.mode=mhc`.

Hyper-Connections (`hyper_connections`) with each connection projected before use, as the
public package `hyper-connections` does it:
  A_r  = Sinkhorn–Knopp(α_r): exp, then `altup.sinkhorn_iters` rounds of normalising the
         sums over source streams, then over target streams, to 1 (doubly stochastic;
         the last normalisation exact), which bounds the stream mixing's signal gain;
  A_m  = σ(α_m) and B = 2σ(β): non-negative reads and writes.
The dynamic parts (`altup.dynamic`) are the normed projections scaled, without HC's tanh
(one scale for α_m, one for α_r, one for β). Unlike HC, mHC is not the baseline at init:
A_r = Sinkhorn(exp I) mixes the streams, and a layer cannot be inserted as the identity
(a Sinkhorn projection of finite logits is never I), so `layers` growth is refused.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from altup_cli.models.config import AltUpConfig, ModelConfig
from altup_cli.models.hyper_connections import (
    Connection,
    HyperConnectionLayer,
    connection_flops,
    connection_parameters,
    family_variant,
)
from altup_cli.models.registry import register_stream_variant


def sinkhorn(logits: torch.Tensor, iters: int) -> torch.Tensor:
    """(…, n_source, n_target) logits → a doubly stochastic matrix: exp (shifted by each
    column's max, which the first normalisation cancels), then `iters` rounds of column
    and row normalisation."""
    return _Sinkhorn.apply(logits, iters)


class _Sinkhorn(torch.autograd.Function):
    """The unrolled iterations with a hand-written backward: y = x / Σx has
    ∂x = (∂y − Σ ∂y·y) / Σx along the normalised axis, one fused pass per normalisation
    where autograd's graph takes several small ops (the matrices are n × n: per-op
    overhead is the cost)."""

    @staticmethod
    def forward(ctx: Any, logits: torch.Tensor, iters: int) -> torch.Tensor:
        # Iterated with the matrices' entries first, (n, n, …): sums over outer dimensions
        # run over contiguous rows, where sums over the last two of (…, n, n) run n-long
        # reductions a matrix at a time (per token, 4× the forward's time at n = 4).
        x = logits.movedim((-2, -1), (0, 1)).contiguous()
        m = (x - x.amax(0, keepdim=True)).exp()
        saved = []
        for _ in range(iters):
            for dim in (0, 1):
                total = m.sum(dim, keepdim=True)
                m = m / total
                saved += [m, total]
        ctx.save_for_backward(*saved)
        ctx.iters = iters
        return m.movedim((0, 1), (-2, -1))

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        saved = ctx.saved_tensors
        grad = grad.movedim((-2, -1), (0, 1)).contiguous()
        for k in range(2 * ctx.iters - 1, -1, -1):
            y, total, dim = saved[2 * k], saved[2 * k + 1], k % 2
            grad = (grad - (grad * y).sum(dim, keepdim=True)) / total
        # through exp (the shift cancels)
        return (grad * saved[0] * saved[1]).movedim((0, 1), (-2, -1)), None


def sinkhorn_flops(n: int, iters: int) -> int:
    """Per n×n matrix: each normalisation is n(n−1) additions and n² divisions."""
    return 2 * iters * (n * (n - 1) + n * n)


def sinkhorn_flops_per_token(cfg: ModelConfig) -> float:
    """The part of the model's forward FLOPs per token that is Sinkhorn's normalisations
    (counted like product-key retrieval's sums: FlopCounterMode does not see them)."""
    a = cfg.altup
    if a.mode != "mhc" or not a.dynamic:
        return 0.0
    return float(2 * cfg.n_layers * sinkhorn_flops(a.K, a.sinkhorn_iters))


class ManifoldConnection(Connection):
    def __init__(
        self, n: int, d_model: int, eps: float, read: int, dynamic: bool, iters: int
    ) -> None:
        super().__init__(n, d_model, eps, read, dynamic)
        self.iters = iters

    def width_scale_shape(self) -> tuple[int, ...]:
        return (2,)  # α_m's scale, α_r's scale

    def dynamic_part(self, wc: torch.Tensor, dc: torch.Tensor) -> tuple[torch.Tensor, ...]:
        read, mix = self.width_scale[:1], self.width_scale[1:]
        scale = torch.cat([read, mix.expand(self.n)])
        return wc * scale, dc * self.depth_scale

    def constrain(self, alpha: torch.Tensor, beta: torch.Tensor) -> tuple[torch.Tensor, ...]:
        read = alpha[..., :1].sigmoid()
        return torch.cat([read, sinkhorn(alpha[..., 1:], self.iters)], -1), 2 * beta.sigmoid()


class ManifoldLayer(HyperConnectionLayer):
    connection = ManifoldConnection

    def __init__(self, layer: nn.Module, cfg: ModelConfig, layer_index: int, **_: Any) -> None:
        super().__init__(layer, cfg, layer_index, iters=cfg.altup.sinkhorn_iters)


def _flops(cfg: ModelConfig) -> float:
    """HC's, plus a per-token Sinkhorn when dynamic; a static A_r's Sinkhorn runs once a
    forward on the parameters, whatever the tokens (free per token, like AltUp's mixing)."""
    a = cfg.altup
    return connection_flops(cfg, sinkhorn_flops(a.K, a.sinkhorn_iters))


def _grow_layers(cfg: ModelConfig, at: int, added: int) -> AltUpConfig:
    raise ValueError(
        "layers cannot grow function-preservingly with altup.mode=mhc: an inserted "
        "layer's A_r = Sinkhorn(exp α) is never the identity, so it would mix the streams"
    )


register_stream_variant(
    family_variant(
        "mhc", ManifoldLayer,
        parameters=lambda cfg: connection_parameters(cfg, dynamic_scales=3),
        flops=lambda cfg, T: _flops(cfg),
        options=frozenset({"sinkhorn_iters", "dynamic"}),
        grow_layers=_grow_layers,
        growth_refusals={
            "sinkhorn_iters": "more Sinkhorn iterations change every mHC mixing matrix"
        },
        sweep={"mhc4": ("ffn=dense", "altup=mhc4")},
    )
)  # fmt: skip
