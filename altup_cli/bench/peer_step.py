"""The full training step of the peer suite: forward, backward, clip and optimizer step of a
4-layer model with the compared layer in its middle — ours with AdamW + lazy Adam on its
tables, the reference with fused AdamW over its dense table gradients (same groups: tables
undecayed and unclipped, so both take the same first steps, tested) — each expert model
timed in its own block interleaved with the two dense models. Imports torch and the models
alone, as `peer_layers` does.
"""

from __future__ import annotations

import gc
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from altup_cli.bench import measure
from altup_cli.bench.peer_layers import D_KEY, HEADS, MATCHED, TOPK, layer, reference_peer
from altup_cli.models import ModelConfig, TransformerLM
from altup_cli.models.config import FFNConfig
from altup_cli.models.feedforward import MLP
from altup_cli.training.optim import build_optimizer, dense_parameters, no_weight_decay

OPTIM = {"lr": 1e-3, "weight_decay": 0.1, "beta1": 0.9, "beta2": 0.95, "eps": 1e-8}
MIDDLE = 2  # the layer PEER (or its stand-in) occupies in the 4-layer step model
DENSE_STEP = ("dense", "dense_hk")
Block = dict[str, list[float]]


def model_config(d_model: int, num_experts: int | None) -> ModelConfig:
    ffn = (
        FFNConfig(
            kind="peer", num_experts=num_experts, heads=HEADS, topk=TOPK, d_key=D_KEY,
            layers="middle", **MATCHED,
        )
        if num_experts
        else FFNConfig()
    )  # fmt: skip
    return ModelConfig(
        vocab_size=8192, d_model=d_model, n_layers=4, n_heads=d_model // 64,
        d_ff=4 * d_model, max_seq_len=256, ffn=ffn,
    )  # fmt: skip


@dataclass
class StepModel:
    model: TransformerLM
    optimizer: torch.optim.Optimizer
    clipped: list[torch.Tensor]  # the parameters whose gradient norm is clipped


def step_model(kind: str, d_model: int, num_experts: int, copy: bool = True) -> StepModel:
    """The 4-layer model of the full-step benchmark and its optimizer. Layer `MIDDLE`'s
    FFN is: `dense` a 4d MLP, `dense_hk` an MLP of width h·k (PEER's active neurons),
    `peer` our PEER with AdamW + lazy Adam on its tables, `reference` the reference layer
    (a copy of our PEER's weights if `copy`, else its own) with fused AdamW."""
    torch.manual_seed(0)
    peer = kind == "peer" or (kind == "reference" and copy)
    model = TransformerLM(model_config(d_model, num_experts if peer else None)).train()
    if kind == "dense_hk":
        model.blocks[MIDDLE].ffn = MLP(d_model, HEADS * TOPK)
    if kind == "reference":
        ffn = model.blocks[MIDDLE].ffn
        model.blocks[MIDDLE].ffn = (
            reference_peer(ffn) if copy else layer("reference", d_model, num_experts)
        )
        return _reference_optimizer(model)
    optimizer = build_optimizer(model, OPTIM, OPTIM["lr"])
    return StepModel(model, optimizer, dense_parameters(optimizer))


def _reference_optimizer(model: TransformerLM) -> StepModel:
    """Fused AdamW with our groups: decayed, undecayed, and the tables undecayed (and
    unclipped, as ours are)."""
    ffn = model.blocks[MIDDLE].ffn
    tables = [ffn.weight_down_embed.weight, ffn.weight_up_embed.weight]
    others = [p for p in model.parameters() if all(p is not t for t in tables)]
    o = OPTIM
    groups = [
        {"params": [p for p in others if not no_weight_decay(p)]},
        {"params": [p for p in others if no_weight_decay(p)], "weight_decay": 0.0},
        {"params": tables, "weight_decay": 0.0},
    ]
    optimizer = torch.optim.AdamW(
        groups, lr=o["lr"], betas=(o["beta1"], o["beta2"]), eps=o["eps"],
        weight_decay=o["weight_decay"], fused=True,
    )  # fmt: skip
    return StepModel(model, optimizer, others)


def _step_ids(batch: int, seq_len: int) -> torch.Tensor:
    return torch.randint(0, 8192, (batch, seq_len + 1), generator=torch.Generator().manual_seed(2))


def _train_step(step: StepModel, ids: torch.Tensor) -> tuple[float, float]:
    """(seconds, loss) of one forward, backward, clip and optimizer step."""

    def train() -> torch.Tensor:
        step.optimizer.zero_grad(set_to_none=True)
        logits = step.model(ids[:, :-1])
        loss = F.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(step.clipped, 1.0)
        step.optimizer.step()
        return loss

    seconds, loss = measure.timed(train)
    return seconds, loss.item()


def _timed_block(runs: dict[str, StepModel], ids: torch.Tensor, repeats: int) -> Block:
    """Seconds per step of each model, interleaved (the order reversing each round)."""
    calls = {key: (lambda _r, s=step: _train_step(s, ids)[0]) for key, step in runs.items()}
    return measure.interleave(calls, repeats, warmup=1)


def training_step_times(
    d_model: int, experts: list[int], batch: int, seq_len: int, repeats: int, reference: bool
) -> dict[tuple[str, int | None], Block]:
    """Per expert model (kind, N): its block of interleaved step times beside the two
    dense models (alive throughout); one expert model in memory at a time (at N = 1024²,
    d = 512 ours holds 12 GiB, the reference 16)."""
    ids = _step_ids(batch, seq_len)
    dense = {k: step_model(k, d_model, 0) for k in DENSE_STEP}
    blocks = {}
    for n in experts:
        for kind in ("peer", "reference") if reference else ("peer",):
            runs = dense | {kind: step_model(kind, d_model, n)}
            blocks[(kind, n)] = _timed_block(runs, ids, repeats)
            del runs
            gc.collect()
    return blocks


def step_peak_gib(kind: str, d_model: int, num_experts: int, batch: int, seq_len: int) -> float:
    """Peak RSS of a fresh process that builds the step model and takes two steps."""
    args = (kind, d_model, num_experts, batch, seq_len)
    return measure.fresh_process_peak_gib(__name__, "_step_probe", *args)


def _step_probe(kind: str, d_model: int, num_experts: int, batch: int, seq_len: int) -> None:
    step = step_model(kind, d_model, num_experts, copy=False)  # the reference alone
    ids = _step_ids(batch, seq_len)
    for _ in range(2):
        _train_step(step, ids)
    measure.report_peak()
