"""Text in, text out: `generate(model, tokenizer, prompt, …)`, the package API that
`altup generate` runs. Prompts are encoded with the run's tokenizer, each completed
`num_samples` times in one batch (the KV cache of `altup_cli.models.generation`), and a
completion stops at the tokenizer's EOS or after `max_new_tokens` tokens.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from altup_cli.errors import UserError
from altup_cli.models.generation import check_generation, generate_tokens
from altup_cli.models.sampling import Sampling
from altup_cli.models.transformer import TransformerLM


@dataclass(frozen=True)
class Completion:
    """One sample of one prompt: the new text, its token counts and why it stopped."""

    prompt: str
    text: str
    sample: int  # 0 … num_samples − 1
    prompt_tokens: int
    new_tokens: int
    stop: str  # eos or length


@dataclass(frozen=True)
class Generation:
    """Every completion (prompt by prompt, sample by sample), the seed that sampled them
    and the seconds of the prefill and of the decode steps."""

    completions: list[Completion]
    seed: int
    prefill_seconds: float
    decode_seconds: float

    @property
    def tokens_per_second(self) -> float:
        """New tokens per second of decoding, the prefill's first token included."""
        total = self.prefill_seconds + self.decode_seconds
        new = sum(c.new_tokens for c in self.completions)
        return new / total if total > 0 else float("nan")


def sampling_settings(temperature: float, top_k: int, top_p: float) -> Sampling:
    """The sampling settings, or a one-line UserError for impossible ones."""
    try:
        return Sampling(temperature, top_k, top_p)
    except ValueError as err:
        raise UserError(str(err)) from None


def eos_id(tokenizer: Any) -> int | None:
    """The id of altup's end-of-text token in this tokenizer (None if it has none)."""
    from altup_cli.data.tokenizer import EOS

    return tokenizer.token_to_id(EOS)


def generate(
    model: TransformerLM,
    tokenizer: Any,  # tokenizers.Tokenizer
    prompt: str | Sequence[str],
    max_new_tokens: int = 64,
    temperature: float = 0.8,
    top_k: int = 0,
    top_p: float = 1.0,
    seed: int | None = None,
    num_samples: int = 1,
    stop_at_eos: bool = True,
    compile: bool = False,
) -> list[Completion]:
    """Complete a prompt (or each of a list) `num_samples` times: greedy at temperature 0,
    else sampled (top-k 0: every token; top-p 1: no nucleus), reproducibly for a `seed`."""
    return generate_text(
        model, tokenizer, prompt, max_new_tokens, sampling_settings(temperature, top_k, top_p),
        seed, num_samples, stop_at_eos, compile,
    ).completions  # fmt: skip


def generate_text(
    model: TransformerLM,
    tokenizer: Any,
    prompt: str | Sequence[str],
    max_new_tokens: int,
    sampling: Sampling,
    seed: int | None = None,
    num_samples: int = 1,
    stop_at_eos: bool = True,
    compile: bool = False,
    on_token: Callable[[int, int], None] | None = None,
) -> Generation:
    """`generate` with its timings and seed; `on_token(row, token)` sees each new token
    of row `prompt index · num_samples + sample` as it comes."""
    prompts = [prompt] if isinstance(prompt, str) else list(prompt)
    rows = encode_rows(model, tokenizer, prompts, max_new_tokens, num_samples)
    seed = random.SystemRandom().randrange(2**63) if seed is None else seed
    generator = torch.Generator(model.embed.weight.device).manual_seed(seed)
    eos = eos_id(tokenizer) if stop_at_eos else None
    out = generate_tokens(model, rows, max_new_tokens, sampling, eos, generator, compile, on_token)
    completions = [
        Completion(
            prompts[row // num_samples], tokenizer.decode(tokens), row % num_samples,
            len(rows[row]), len(tokens), out.stops[row],
        )
        for row, tokens in enumerate(out.tokens)
    ]  # fmt: skip
    return Generation(completions, seed, out.prefill_seconds, out.decode_seconds)


def encode_rows(
    model: TransformerLM,
    tokenizer: Any,
    prompts: Sequence[str],
    max_new_tokens: int,
    num_samples: int,
) -> list[list[int]]:
    """The token ids of each row (prompt by prompt, `num_samples` rows each), or a
    one-line UserError for what cannot be generated (see `check_generation`)."""
    if not prompts:
        raise UserError("no prompt given")
    if num_samples < 1:
        raise UserError(f"num-samples must be at least 1, got {num_samples}")
    encoded = [tokenizer.encode(p).ids for p in prompts]
    for i, ids in enumerate(encoded):
        if not ids:
            where = "" if len(prompts) == 1 else f" (prompt {i + 1})"
            raise UserError(f"empty prompt{where}: give at least one token of text")
    rows = [ids for ids in encoded for _ in range(num_samples)]
    try:
        check_generation(model, [len(r) for r in rows], max_new_tokens)
    except ValueError as err:
        raise UserError(str(err)) from None
    return rows
