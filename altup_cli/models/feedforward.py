"""The feed-forward slot of each layer: dense MLP, PEER, coarse MoE or product-key memory.

A feed-forward module maps (..., d_model) → (..., d_model). `FFNConfig.kind` picks the
kind and `FFNConfig.layers` the layers it replaces the dense MLP in; new kinds register a
constructor in `FEEDFORWARD_KINDS`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

from altup_cli.models.moe import MoE, check_moe
from altup_cli.models.peer import PEER, check_activation
from altup_cli.models.pkm import PKM
from altup_cli.models.product_keys import check_product_keys

if TYPE_CHECKING:
    from altup_cli.models.transformer import ModelConfig

KINDS = ("dense", "peer", "pkm", "moe")
PLACEMENTS = ("all", "middle")


@dataclass
class FFNConfig:
    """`num_experts`/`topk` mean N experts (values for PKM) retrieved k per head by PEER
    and PKM, and E experts with top-k routing for MoE."""

    kind: str = "dense"
    layers: str | list[int] = "all"  # which layers' MLP it replaces: all, middle, or indices
    num_experts: int = 65536
    heads: int = 8
    topk: int = 16
    d_key: int = 256
    query_bn: bool = True
    shared_keys: bool = True  # PEER shares one pair of sub-key tables across heads
    activation: str = "gelu"
    routing: str = "token_choice"
    capacity: float = 1.0
    balance_weight: float = 0.01
    table_lr: float | None = None  # lazy-Adam LR of expert/value tables (None: optim.lr)

    def __post_init__(self) -> None:
        _check(self.kind in KINDS, f"ffn.kind must be one of {', '.join(KINDS)}, got {self.kind!r}")
        if isinstance(self.layers, str):
            _check(
                self.layers in PLACEMENTS,
                f"ffn.layers must be all, middle or a list of layer indices, got {self.layers!r}",
            )
        else:
            self.layers = list(self.layers)
        _check(self.heads >= 1, f"ffn.heads must be >= 1, got {self.heads}")
        _check(self.topk >= 1, f"ffn.topk must be >= 1, got {self.topk}")
        _check(self.num_experts >= 1, f"ffn.num_experts must be >= 1, got {self.num_experts}")
        # The layers' own checks, run here so a bad config fails before anything is built.
        if self.kind in ("peer", "pkm"):
            check_product_keys(self.num_experts, self.heads, self.topk, self.d_key)
            check_activation(self.activation)
        if self.kind == "moe":
            check_moe(self.num_experts, self.topk, self.routing, self.capacity)
        _check(self.balance_weight >= 0, "ffn.balance_weight must be >= 0")
        _check(self.table_lr is None or self.table_lr > 0, "ffn.table_lr must be positive")

    def layer_indices(self, n_layers: int) -> list[int]:
        """The layers whose MLP this kind replaces (none for dense)."""
        if self.kind == "dense":
            return []
        if self.layers == "all":
            return list(range(n_layers))
        if self.layers == "middle":
            return [n_layers // 2]
        bad = [i for i in self.layers if not 0 <= i < n_layers]
        _check(not bad, f"ffn.layers: {bad} out of range for {n_layers} layers")
        _check(len(set(self.layers)) == len(self.layers), "ffn.layers has repeated indices")
        return sorted(self.layers)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(message)


class MLP(nn.Module):
    """w2 · gelu(w1 · x): two matrices, so growing the hidden width is exact (zero new w2 rows)."""

    def __init__(self, d_model: int, d_ff: int) -> None:
        super().__init__()
        self.w1 = nn.Linear(d_model, d_ff, bias=False)
        self.w2 = nn.Linear(d_ff, d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.gelu(self.w1(x)))


def output_std(cfg: ModelConfig) -> float:
    """The GPT-2 scale of residual-branch output projections."""
    return cfg.init_std / math.sqrt(2 * cfg.n_layers)


def _peer(cfg: ModelConfig) -> nn.Module:
    f = cfg.ffn
    return PEER(
        cfg.d_model, f.num_experts, f.heads, f.topk, f.d_key, f.query_bn, f.shared_keys,
        f.activation, output_std(cfg),
    )  # fmt: skip


def _pkm(cfg: ModelConfig) -> nn.Module:
    f = cfg.ffn
    return PKM(cfg.d_model, f.num_experts, f.heads, f.topk, f.d_key, f.query_bn, f.shared_keys)


def _moe(cfg: ModelConfig) -> nn.Module:
    f = cfg.ffn
    return MoE(
        cfg.d_model, cfg.d_ff, f.num_experts, f.topk, f.routing, f.capacity, f.balance_weight,
        cfg.init_std, output_std(cfg),
    )  # fmt: skip


FEEDFORWARD_KINDS: dict[str, Callable[[ModelConfig], nn.Module]] = {
    "dense": lambda cfg: MLP(cfg.d_model, cfg.d_ff),
    "peer": _peer,
    "pkm": _pkm,
    "moe": _moe,
}


def build_feedforward(cfg: ModelConfig, layer_index: int) -> nn.Module:
    if layer_index not in cfg.ffn.layer_indices(cfg.n_layers):
        return MLP(cfg.d_model, cfg.d_ff)
    return FEEDFORWARD_KINDS[cfg.ffn.kind](cfg)
