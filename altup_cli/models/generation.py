"""Generating tokens with the KV cache: a batch of prompts of different lengths, left-padded,
is prefilled in one call, then decoded one token per step until every row has met EOS or
made `max_new_tokens` tokens. Each row's tokens are those it makes alone (padding is never
attended to and each row keeps its own positions); sampled rows share one generator.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from altup_cli.models.kv_cache import KVCache
from altup_cli.models.registry import decoding_refusal
from altup_cli.models.sampling import Sampling, choose
from altup_cli.models.transformer import TransformerLM

PAD = 0  # the id left padding holds (never attended to)


@dataclass(frozen=True)
class Generated:
    """Each row's new tokens (EOS not included), why it stopped (`eos` or `length`), and
    the seconds of the prefill (with the first token's choice) and of the decode steps."""

    tokens: list[list[int]]
    stops: list[str]
    prefill_seconds: float
    decode_seconds: float

    @property
    def new_tokens(self) -> int:
        return sum(len(t) for t in self.tokens)


def check_generation(model: TransformerLM, lengths: Sequence[int], max_new_tokens: int) -> None:
    """A ValueError for what cannot be generated: a model that is not causal, no prompt or
    an empty one, no new token, or a prompt and its new tokens past the model's context."""
    refusal = decoding_refusal(model.config)
    if refusal:
        raise ValueError(refusal)
    if not lengths or min(lengths) < 1:
        raise ValueError("empty prompt: give at least one token")
    if max_new_tokens < 1:
        raise ValueError(f"max-new-tokens must be at least 1, got {max_new_tokens}")
    context = model.config.max_seq_len
    if max(lengths) + max_new_tokens > context:
        raise ValueError(
            f"a prompt of {max(lengths)} tokens plus {max_new_tokens} new tokens exceeds the "
            f"model's context of {context} tokens (max_seq_len)"
        )


def generate_tokens(
    model: TransformerLM,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int,
    sampling: Sampling = Sampling(),
    eos_id: int | None = None,
    generator: torch.Generator | None = None,
    compile: bool = False,
    on_token: Callable[[int, int], None] | None = None,
) -> Generated:
    """New tokens for each prompt (token ids), in eval mode and without gradients.
    `on_token(row, token)` sees each token as it is chosen (EOS not included); `compile`
    runs the decode steps compiled on a static cache."""
    check_generation(model, [len(p) for p in prompts], max_new_tokens)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            return _generate(
                model, prompts, max_new_tokens, sampling, eos_id, generator, compile, on_token
            )
    finally:
        model.train(was_training)


def _generate(
    model: TransformerLM,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int,
    sampling: Sampling,
    eos_id: int | None,
    generator: torch.Generator | None,
    compile: bool,
    on_token: Callable[[int, int], None] | None,
) -> Generated:
    ids, pads = left_padded(prompts, model.embed.weight.device)
    cache = model.new_cache(len(prompts), ids.shape[1] + max_new_tokens - 1, pads, compile)
    step = decoder(model, compile)
    tokens: list[list[int]] = [[] for _ in prompts]
    stops = ["length"] * len(prompts)
    start = time.perf_counter()
    logits = model.decode(ids, cache)[:, -1]
    prefill = 0.0
    for i in range(max_new_tokens):
        chosen = choose(logits, sampling, generator)
        for row, token in enumerate(chosen.tolist()):
            if stops[row] != "length":
                continue
            if token == eos_id:
                stops[row] = "eos"
            else:
                tokens[row].append(token)
                if on_token is not None:
                    on_token(row, token)
        if i == 0:
            prefill = time.perf_counter() - start
        if i == max_new_tokens - 1 or "length" not in stops:
            break
        logits = step(chosen[:, None], cache)[:, -1]
    return Generated(tokens, stops, prefill, time.perf_counter() - start - prefill)


def left_padded(
    prompts: Sequence[Sequence[int]], device: torch.device
) -> tuple[torch.Tensor, list[int]]:
    """Prompts (token ids) as one (B, longest) tensor, each left-padded, and the pads."""
    longest = max(len(p) for p in prompts)
    pads = [longest - len(p) for p in prompts]
    rows = [[PAD] * pad + list(p) for p, pad in zip(prompts, pads, strict=True)]
    return torch.tensor(rows, dtype=torch.long, device=device), pads


def decoder(
    model: TransformerLM, compile: bool = False
) -> Callable[[torch.Tensor, KVCache], torch.Tensor]:
    """`model.decode`, or the same with its model step compiled (for a static cache)."""
    if not compile:
        return model.decode
    compiled = torch.compile(model.decode_step, dynamic=False)

    def decode(idx: torch.Tensor, cache: KVCache) -> torch.Tensor:
        step = cache.begin(idx.shape[1])
        logits = compiled(idx, cache)
        cache.advance(step)
        return logits

    return decode
