"""LAMBADA-style last-word prediction as an evaluation task.

The file is OpenAI's LAMBADA JSONL (one `{"text": …}` per line). The final word is the last
whitespace-separated word; the context is the text before it (trailing whitespace
dropped) and the target is " " + the word, tokenized apart from the context, as
lm-evaluation-harness does. A passage is scored after an EOS, keeping its last `context`
tokens if it is longer. Greedy prediction is right when every target token is the argmax
of the model's logits given the true context and the target tokens before it (greedy
decoding then produces exactly the word). Reported: accuracy, the final word's perplexity
exp(mean over passages of the word's summed token loss) and the per-token perplexity of the
target tokens; beside them, always guessing the file's most common final word and the
uniform distribution over the vocabulary.
"""

from __future__ import annotations

import json
import math
import re
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from altup_cli.console import console, progress, say
from altup_cli.errors import UserError, first_line
from altup_cli.evaluation.task import TaskResult

LAST_WORD = re.compile(r"\S+$")


@dataclass(frozen=True)
class Passage:
    context: str
    word: str


def split_last_word(text: str) -> Passage | None:
    stripped = text.rstrip()
    match = LAST_WORD.search(stripped)
    if match is None:
        return None
    return Passage(stripped[: match.start()].rstrip(), match.group())


def read_lambada(path: str) -> list[Passage]:
    """Every passage of a LAMBADA JSONL file (blank lines skipped), or a one-line error
    naming the file and line."""
    file = Path(path).expanduser()
    try:
        lines = file.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise UserError(f"--data {path}: no such file") from None
    except (OSError, UnicodeDecodeError) as err:
        raise UserError(f"--data {path}: cannot read it ({first_line(err)})") from None
    passages = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError as err:
            raise UserError(f"{path}:{number}: not JSON ({first_line(err)})") from None
        if not isinstance(row, dict) or not isinstance(row.get("text"), str):
            raise UserError(f'{path}:{number}: no "text" string (LAMBADA lines are '
                            '{"text": "…"})')  # fmt: skip
        passage = split_last_word(row["text"])
        if passage is None:
            raise UserError(f"{path}:{number}: the text is empty")
        passages.append(passage)
    if not passages:
        raise UserError(f"--data {path}: empty (no passages)")
    return passages


class LambadaTask:
    """Last-word accuracy and perplexity under the `EvalTask` protocol."""

    baseline_name = "baseline"

    def __init__(self, path: str, batch_size: int = 8, device: str = "cpu") -> None:
        self.path, self.batch_size, self.device = path, batch_size, device
        self.name = "lambada"
        self.passages: list[Passage] = []

    def prepare(self) -> None:
        self.passages = read_lambada(self.path)

    def describe(self) -> str:
        return f"[bold]lambada[/bold]: {len(self.passages):,} passages from {self.path}"

    def encode(self, tokenizer: Any, eos: int, context: int) -> list[tuple[list[int], int]]:
        """(tokens, target length) per passage: [EOS] + context + target, cut to its last
        `context` + 1 tokens."""
        out = []
        for p in self.passages:
            ctx = tokenizer.encode(p.context, add_special_tokens=False).ids
            target = tokenizer.encode(" " + p.word, add_special_tokens=False).ids
            out.append(([eos, *ctx, *target][-(context + 1) :], min(len(target), context)))
        return out

    def evaluate(self, model: Any, tokenizer: Any, logger: Any) -> TaskResult:
        from altup_cli.data.tokenizer import EOS

        eos = tokenizer.token_to_id(EOS)
        examples = self.encode(tokenizer, eos, model.config.max_seq_len)
        start = time.perf_counter()
        correct, word_losses = score(model, examples, self.batch_size, self.device)
        n, tokens = len(examples), sum(t for _, t in examples)
        total = sum(word_losses)
        metrics = {"accuracy": sum(correct) / n, "ppl": math.exp(total / n),
                   "token_ppl": math.exp(total / tokens)}  # fmt: skip
        words = Counter(p.word for p in self.passages)
        log_v = math.log(model.config.vocab_size)
        baseline = {"accuracy": words.most_common(1)[0][1] / n,
                    "ppl": math.exp(log_v * tokens / n), "token_ppl": math.exp(log_v)}  # fmt: skip
        details = {
            "passages": n, "target_tokens": tokens, "correct": sum(correct),
            "most_common_word": words.most_common(1)[0][0],
            "seconds": round(time.perf_counter() - start, 2),
        }  # fmt: skip
        return TaskResult(metrics, baseline, metrics["accuracy"], baseline["accuracy"], details)


@torch.no_grad()
def score(
    model: Any, examples: list[tuple[list[int], int]], batch_size: int, device: str = "cpu"
) -> tuple[list[bool], list[float]]:
    """Per passage: whether every target token is the argmax, and the target's summed loss
    (nats). Passages of equal length go through the model together (no padding)."""
    order = sorted(range(len(examples)), key=lambda i: len(examples[i][0]))
    correct, losses = [False] * len(examples), [0.0] * len(examples)
    with progress() as bar:
        task = bar.add_task("lambada", total=len(examples))
        i = 0
        while i < len(order):
            length = len(examples[order[i]][0])
            group = [order[i]]
            while (i + len(group) < len(order) and len(group) < batch_size
                   and len(examples[order[i + len(group)]][0]) == length):  # fmt: skip
                group.append(order[i + len(group)])
            ids = torch.tensor([examples[j][0] for j in group], device=device)
            logits = model(ids[:, :-1]).float()
            token_loss = F.cross_entropy(logits.transpose(1, 2), ids[:, 1:], reduction="none")
            hits = logits.argmax(-1) == ids[:, 1:]
            for row, j in enumerate(group):
                t = examples[j][1]
                correct[j] = bool(hits[row, -t:].all())
                losses[j] = float(token_loss[row, -t:].double().sum())
            bar.advance(task, len(group))
            i += len(group)
    return correct, losses


def summary(report: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    r = report["tasks"]["lambada"]
    keys = {f"lambada/{k}": v for k, v in r["metrics"].items()}
    rows = [[k, v, r["baseline"][k]] for k, v in r["metrics"].items()]
    return keys, {"lambada/results": (["metric", "model", "baseline"], rows)}


def print_report(report: dict[str, Any]) -> None:
    from rich.table import Table

    r = report["tasks"]["lambada"]
    table = Table(title=f"LAMBADA last word — {report['checkpoint']} ({r['passages']:,} passages)")
    for header in ("metric", "model", "baseline", "baseline is"):
        table.add_column(header, justify="left" if header in ("metric", "baseline is") else "right")
    m, b = r["metrics"], r["baseline"]
    table.add_row("accuracy", f"{100 * m['accuracy']:.2f}%", f"{100 * b['accuracy']:.2f}%",
                  f"always {r['most_common_word']!r}")  # fmt: skip
    table.add_row("word ppl", f"{m['ppl']:.2f}", f"{b['ppl']:.1f}", "uniform over the vocabulary")
    table.add_row("token ppl", f"{m['token_ppl']:.2f}", f"{b['token_ppl']:.1f}", "uniform")
    console.print(table)
    say(f"[dim]{report['convention']}[/dim]")
