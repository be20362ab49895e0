"""The analytic FLOP counts of the sparse FFNs against independent counts: FlopCounterMode
for matrix products and gathers, forward and training; the additions product-key retrieval
executes, counted as they run (FlopCounterMode does not see them); expert-choice capacity
with k > 1."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from altup_cli.models import ModelConfig, TransformerLM
from altup_cli.models.config import FFNConfig
from altup_cli.models.counting import forward_flops_per_token, training_flops_per_token
from altup_cli.models.row_gradients import flat_terms, is_table, row_chunks
from tests.helpers.flops import CandidateSums, count_flops

SEQ, BATCH = 16, 2


def build(ffn: dict) -> TransformerLM:
    torch.manual_seed(5)
    cfg = ModelConfig(
        vocab_size=97, d_model=16, n_layers=3, n_heads=2, d_ff=32, max_seq_len=SEQ,
        ffn=FFNConfig(**ffn),
    )  # fmt: skip
    return TransformerLM(cfg)


RETRIEVAL = [
    dict(kind="peer", num_experts=64, heads=2, topk=4, d_key=8),
    dict(kind="peer", num_experts=100, heads=3, topk=5, d_key=8, layers="all", query_bn=False),
    dict(kind="pkm", num_experts=49, heads=2, topk=3, d_key=6, shared_keys=False),
]
MOE = [
    dict(kind="moe", num_experts=4, topk=2, layers=[0, 2]),
    # expert choice, k > 1: C = ⌈capacity·k·n/E⌉ tokens per expert (n = 32 tokens)
    dict(kind="moe", num_experts=4, topk=2, routing="expert_choice", capacity=1.0),
    dict(kind="moe", num_experts=8, topk=3, routing="expert_choice", capacity=0.5),
    # capacity·k > E: each expert takes every token, E experts a token, not k·capacity
    dict(kind="moe", num_experts=4, topk=3, routing="expert_choice", capacity=2.0),
]


def _ids() -> torch.Tensor:
    return torch.randint(0, 97, (BATCH, SEQ), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("ffn", RETRIEVAL)
def test_candidate_sums_are_the_additions_retrieval_executes(ffn: dict) -> None:
    """`retrieval` equals the additions counted inside the retrieval modules as they run,
    and with FlopCounterMode's count it makes up the whole analytic forward count."""
    m = build(ffn).eval()
    ids = _ids()
    with torch.no_grad(), CandidateSums() as sums:
        m(ids)
    with torch.no_grad():
        counter = count_flops(lambda: m(ids))
    flops = forward_flops_per_token(m.config, SEQ)
    assert sums.count == flops["retrieval"] * ids.numel() > 0
    assert counter.get_total_flops() + sums.count == flops["total"] * ids.numel()


@pytest.mark.parametrize("ffn", MOE)
def test_moe_forward_flops_equal_the_flop_counter(ffn: dict) -> None:
    m = build(ffn).eval()
    ids = _ids()
    with torch.no_grad():
        counter = count_flops(lambda: m(ids))
    expected = forward_flops_per_token(m.config, SEQ)["total"] * ids.numel()
    assert counter.get_total_flops() == pytest.approx(expected, rel=1e-12)


def _training_step(m: TransformerLM, ids: torch.Tensor) -> None:
    """Forward, backward (with the balance loss), and the expert/value tables' gradient rows
    that the lazy optimizer computes from their factored form."""
    loss = F.cross_entropy(m(ids[:, :-1]).flatten(0, 1), ids[:, 1:].flatten())
    aux = m.aux_loss()
    (loss if aux is None else loss + aux).backward()
    for table in filter(is_table, m.parameters()):
        for _rows in row_chunks(*flat_terms(table), max_rows=7):  # several chunks
            pass


@pytest.mark.parametrize("ffn", RETRIEVAL + MOE)
def test_training_flops_are_three_forwards(ffn: dict) -> None:
    """Forward + backward + table rows, counted, equal 3 × the analytic forward (less the
    candidate sums, which FlopCounterMode does not see; their 3× is a convention)."""
    m = build(ffn).train()
    ids = torch.randint(0, 97, (BATCH, SEQ + 1), generator=torch.Generator().manual_seed(1))
    counter = count_flops(lambda: _training_step(m, ids))
    flops = training_flops_per_token(m.config, SEQ)
    expected = (flops["total"] - flops["retrieval"]) * BATCH * SEQ
    assert counter.get_total_flops() == pytest.approx(expected, rel=1e-12)
