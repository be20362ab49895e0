"""Any altup model as an lm-evaluation-harness `LM` (imports lm_eval: reach it through
`lm_harness.require_lm_eval` first, which says how to install it when it is missing).

- `loglikelihood`: the continuation's summed log-probability given the context, and whether
  greedy decoding would produce it. Requests are sorted longest first, scored in right-padded
  batches of `batch_size` under the token mask (causal attention: a row's logits never see its
  padding) and put back in request order. Context and continuation are tokenized as
  lm-eval's Hugging Face model does: the whole text once, the context's tokens split off
  (trailing spaces of the context move to the continuation); an empty context is the EOS
  token, as documents are separated in training; a text longer than the context window
  keeps its last `max_seq_len` + 1 tokens.
- `loglikelihood_rolling`: a document's log-likelihood in disjoint windows of the model's
  context (lm-eval's `get_rolling_token_windows`, EOS first): every token scored once.
- `generate_until`: the KV-cache decoder of `models/generation.py`, greedy (or sampled when
  a task asks for `do_sample`), stopping a row at EOS or at the first of its stop strings,
  the text cut before it; the prompt keeps its last tokens so that
  min(max_gen_toks, max_seq_len / 2) new tokens fit.
"""

from __future__ import annotations

import contextlib
import json
from typing import Any

import torch
import torch.nn.functional as F
from lm_eval.api.model import LM
from lm_eval.models.utils import normalize_gen_kwargs, postprocess_generated_text
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

from altup_cli.errors import UserError
from altup_cli.models.generation import PAD, generate_tokens
from altup_cli.models.registry import decoding_refusal
from altup_cli.models.sampling import Sampling
from altup_cli.models.transformer import TransformerLM

Pair = tuple[list[int], list[int]]  # (context tokens, continuation tokens)


class _AllStopped(Exception):
    """Every row of a generation batch has met a stop string or EOS."""


class AltupLM(LM):
    def __init__(
        self, model: TransformerLM, tokenizer: Any, batch_size: int = 8, device: str = "cpu"
    ) -> None:
        super().__init__()
        refusal = decoding_refusal(model.config)
        if refusal:
            raise UserError(f"this model cannot be scored left to right: {refusal}")
        if batch_size < 1:
            raise UserError(f"--batch-size must be at least 1, got {batch_size}")
        from altup_cli.runs.generation import eos_id

        eos = eos_id(tokenizer)
        if eos is None:
            raise UserError("the model's tokenizer has no end-of-text token to condition on")
        self.model, self.tokenizer, self.batch_size = model.to(device).eval(), tokenizer, batch_size
        self.eos, self.max_len = eos, model.config.max_seq_len
        self._device = torch.device(device)

    # --- tokens -------------------------------------------------------------------------
    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text).ids

    def encode_pair(self, context: str, continuation: str) -> Pair:
        if not context:
            return [self.eos], self.encode(continuation)
        spaces = len(context) - len(context.rstrip())
        if spaces:
            context, continuation = context[:-spaces], context[-spaces:] + continuation
        whole, head = self.encode(context + continuation), self.encode(context)
        return whole[: len(head)], whole[len(head) :]

    # --- scoring ------------------------------------------------------------------------
    def score_pairs(self, pairs: list[Pair]) -> list[tuple[float, bool]]:
        """(log p(continuation | context), greedy?) of each pair, longest first in batches,
        returned in the order given."""
        order = sorted(range(len(pairs)), key=lambda i: -len(pairs[i][0]) - len(pairs[i][1]))
        out: list[tuple[float, bool]] = [(0.0, True)] * len(pairs)
        for start in range(0, len(order), self.batch_size):
            chunk = order[start : start + self.batch_size]
            for i, result in zip(chunk, self._score_batch([pairs[i] for i in chunk]), strict=True):
                out[i] = result
        return out

    @torch.no_grad()
    def _score_batch(self, pairs: list[Pair]) -> list[tuple[float, bool]]:
        wholes = [(c + x)[-(self.max_len + 1) :] for c, x in pairs]
        scored = [min(len(x), len(w) - 1) for (_, x), w in zip(pairs, wholes, strict=True)]
        width = max(len(w) - 1 for w in wholes)
        ids = torch.full((len(wholes), width), PAD, dtype=torch.long)
        mask = torch.zeros_like(ids, dtype=torch.bool)
        for b, whole in enumerate(wholes):
            ids[b, : len(whole) - 1] = torch.tensor(whole[:-1])
            mask[b, : len(whole) - 1] = True
        logits = self.model(ids.to(self._device), mask.to(self._device))
        results = []
        for b, (whole, n) in enumerate(zip(wholes, scored, strict=True)):
            end = len(whole) - 1  # logits at position t predict token t + 1
            logprobs = F.log_softmax(logits[b, end - n : end].double(), dim=-1)
            target = torch.tensor(whole[len(whole) - n :], device=logprobs.device)
            total = logprobs.gather(-1, target[:, None]).sum()
            greedy = bool((logprobs.argmax(-1) == target).all())
            results.append((float(total), greedy))
        return results

    def loglikelihood(self, requests: list[Any], disable_tqdm: bool = False) -> list[Any]:
        args = [r.args for r in requests]
        results = self.score_pairs([self.encode_pair(c, x) for c, x in args])
        for arg, result in zip(args, results, strict=True):
            self.cache_hook.add_partial("loglikelihood", arg, result)
        return results

    def loglikelihood_rolling(self, requests: list[Any], disable_tqdm: bool = False) -> list[Any]:
        windows: list[Pair] = []
        owners: list[int] = []
        for i, request in enumerate(requests):
            tokens = self.encode(request.args[0])
            for window in get_rolling_token_windows(tokens, self.eos, self.max_len, 1):
                windows.append(make_disjoint_window(window))
                owners.append(i)
        totals = [0.0] * len(requests)
        for owner, (logprob, _) in zip(owners, self.score_pairs(windows), strict=True):
            totals[owner] += logprob
        for request, total in zip(requests, totals, strict=True):
            self.cache_hook.add_partial("loglikelihood_rolling", request.args, total)
        return totals

    # --- generation ---------------------------------------------------------------------
    def generate_until(self, requests: list[Any], disable_tqdm: bool = False) -> list[str]:
        groups: dict[str, list[int]] = {}
        for i, request in enumerate(requests):
            key = json.dumps(request.args[1], sort_keys=True, default=str)
            groups.setdefault(key, []).append(i)
        out = [""] * len(requests)
        for members in groups.values():
            members.sort(key=lambda i: -len(requests[i].args[0]))
            settings = dict(requests[members[0]].args[1])
            for start in range(0, len(members), self.batch_size):
                chunk = members[start : start + self.batch_size]
                texts = self.generate([requests[i].args[0] for i in chunk], settings)
                for i, text in zip(chunk, texts, strict=True):
                    out[i] = text
                    self.cache_hook.add_partial("generate_until", requests[i].args, text)
        return out

    def generate(self, contexts: list[str], gen_kwargs: dict[str, Any]) -> list[str]:
        """One batch of completions, each cut before its first stop string."""
        kwargs = normalize_gen_kwargs(gen_kwargs, 256)  # lm-eval's default max_gen_toks
        until = kwargs.pop("until", None) or []
        until = [until] if isinstance(until, str) else list(until)
        wanted = int(kwargs.pop("max_gen_toks"))
        keep = self.max_len - min(wanted, self.max_len // 2)  # prompt tokens kept at most
        prompts = [(self.encode(c) or [self.eos])[-keep:] for c in contexts]
        new = min(wanted, self.max_len - max(len(p) for p in prompts))
        if new < 1:
            return [""] * len(contexts)
        temperature = float(kwargs.get("temperature") or 0.0) if kwargs.get("do_sample") else 0.0
        sampling = Sampling(temperature)
        rows: list[list[int]] = [[] for _ in prompts]
        done = [False] * len(prompts)

        def on_token(row: int, token: int) -> None:
            if done[row]:
                return
            if token == self.eos:
                done[row] = True
            else:
                rows[row].append(token)
                text = self.tokenizer.decode(rows[row])
                done[row] = any(stop and stop in text for stop in until)
            if all(done):
                raise _AllStopped

        generator = torch.Generator(self._device).manual_seed(0)
        with contextlib.suppress(_AllStopped):  # every row has stopped: no more steps
            generate_tokens(self.model, prompts, new, sampling, None, generator, on_token=on_token)
        return [postprocess_generated_text(self.tokenizer.decode(r), until, None) for r in rows]
