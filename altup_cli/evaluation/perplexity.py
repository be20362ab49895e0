"""Perplexity and bits per byte on held-out text as an evaluation task (one per corpus).

Metrics: `loss` (mean token loss in nats), `ppl` (its exp) and `bits_per_byte` (the sum of
token losses over the UTF-8 bytes of the scored text, in bits: Σ loss / (ln 2 · bytes),
comparable across tokenizers), beside the scored text's own unigram distribution as the
baseline. Windows and stride: `evaluation/scoring.py`; what is scored: `evaluation/heldout.py`.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from rich.progress import Progress

from altup_cli.console import console, progress, say
from altup_cli.errors import UserError
from altup_cli.evaluation.heldout import (
    Source,
    TrainingData,
    heldout_segments,
    hf_texts,
    read_blocks,
    text_files,
)
from altup_cli.evaluation.scoring import WindowScorer, token_bytes, unigram_metrics
from altup_cli.evaluation.task import TaskResult

CONVENTION = (
    "each token scored once: windows of the model's context C every S (--stride) tokens, a "
    "window scoring only what the previous one did not reach, so a token has ≥ C − S tokens "
    "of history (all there are at a document's start; each document is scored after an "
    "EOS); loss in nats per token, ppl = exp(loss), bits/byte = Σ loss / (ln 2 · UTF-8 "
    "bytes of the scored text); baseline: the scored text's own unigram distribution"
)
# What was scored (the table's `data` column): the run's own held-out split; the split a
# run trained on the corpus would hold out; the whole corpus (not trained on); the whole
# corpus of a model whose training data is unknown (flagged).
HELD_OUT, AS_HELD_OUT = "held out", "held-out split"
WHOLE, UNKNOWN = "whole", "whole, training data unknown"


@dataclass(frozen=True)
class PplOptions:
    split: str = "val"  # val | all
    stride: int | None = None  # None: the model's context (disjoint windows)
    max_tokens: int | None = None  # scored tokens per corpus (None: all)
    format: str = "file"  # file | line: one document per file or per non-blank line
    batch_size: int = 8
    text_field: str = "text"
    encoding: str = "utf-8"
    device: str = "cpu"
    progress: bool = True  # a progress bar per corpus


@dataclass(frozen=True)
class RunTokenizer:
    tokenizer: Any
    eos: int
    path: Path


class PerplexityTask:
    """One corpus under the `EvalTask` protocol; `prepare` resolves what to score (and
    refuses a model's own training sequences), `evaluate` scores it."""

    baseline_name = "unigram"

    def __init__(
        self, source: Source, options: PplOptions, trained: TrainingData | None,
        tok: RunTokenizer, cache: Path,
    ) -> None:  # fmt: skip
        self.source, self.options, self.trained, self.tok, self.cache = (
            source, options, trained, tok, cache,
        )  # fmt: skip
        self.name = source.label
        self.role = ""
        self._stream: np.ndarray | None = None
        self._val: list[int] | None = None
        self._files: list[Path] = []
        self._texts: Any = None

    def prepare(self) -> None:
        src, trained = self.source, self.trained
        own = trained is not None and trained.trained_on(src)
        if own and self.options.split == "all":
            raise UserError(
                f"--data {src.label}: the model trained on it, so --split all would score its "
                "training sequences; --split val scores the split its run held out"
            )
        if own or (src.kind == "embedded" and self.options.split == "val"):
            self._held_out(own)
        elif src.kind == "embedded":
            self._stream = self._tokens(None)
            self.role = UNKNOWN if trained is None else WHOLE
        elif src.kind == "text":
            self._files = text_files(src.name)
            self.role = UNKNOWN if trained is None else WHOLE
        else:
            self._texts = hf_texts(src, self.options.text_field)
            self.role = UNKNOWN if trained is None else WHOLE

    def _held_out(self, own: bool) -> None:
        from altup_cli.data.tokens import split_indices

        if self.trained is None:
            raise UserError(
                f"--data {self.source.label}: its held-out split is the run's (data.seq_len, "
                "data.val_fraction, run.data_seed), and this model has no run config: pass "
                "its run directory or a .ckpt, or --split all"
            )
        d = self.trained.data
        if d.val_fraction <= 0:
            raise UserError(f"--data {self.source.label}: the run held nothing out "
                            "(data.val_fraction=0)")  # fmt: skip
        self._stream = self._tokens(self.trained if own else None)
        n = max(0, (len(self._stream) - 1) // d.seq_len)  # training's packed sequences
        self._val = split_indices(n, d.val_fraction, self.trained.seed)[1]
        self.role = HELD_OUT if own else AS_HELD_OUT

    def _tokens(self, trained: TrainingData | None) -> np.ndarray:
        """The corpus's token stream with the model's tokenizer (cached as training's)."""
        from altup_cli.data.corpora import load_embedded
        from altup_cli.data.tokens import tokenize_corpus
        from altup_cli.runs.data import cache_lock

        with cache_lock(self.cache):
            corpus = (trained.corpus(self.cache) if trained is not None
                      else load_embedded(self.source.name, self.cache))  # fmt: skip
            if not any(doc.strip() for doc in corpus.documents):
                raise UserError(f"--data {self.source.label}: empty (no text to score)")
            stream = tokenize_corpus(corpus, self.tok.tokenizer, self.tok.path, self.tok.eos,
                                     self.cache)  # fmt: skip
        return stream.array()

    def describe(self) -> str:
        return f"[bold]{self.name}[/bold]: {self.role}"

    def evaluate(self, model: Any, tokenizer: Any, logger: Any) -> TaskResult:
        o = self.options
        context = model.config.max_seq_len
        stride = o.stride or context
        if not 1 <= stride <= context:
            raise UserError(f"--stride {stride}: must be in [1, {context}] (the context)")
        scorer = WindowScorer(model, context, stride, token_bytes(self.tok.tokenizer),
                              o.batch_size, o.device)  # fmt: skip
        budget = o.max_tokens
        start = time.perf_counter()
        with progress() if o.progress else Progress(disable=True) as bar:
            task = bar.add_task(self.name, total=self._total())
            for segment, advance in self._segments():
                budget_left = None if budget is None else budget - scorer.totals.tokens
                scorer.add(segment, budget_left)
                bar.advance(task, advance)
                if budget_left is not None and scorer.totals.tokens >= budget:
                    break
        totals = scorer.finish()
        if totals.tokens == 0:
            raise UserError(f"--data {self.name}: no tokens to score")
        metrics = totals.metrics()
        assert scorer.counts is not None
        baseline = unigram_metrics(scorer.counts, totals.bytes)
        details = {
            "data": self.role, "tokens": totals.tokens, "bytes": totals.bytes,
            "documents": totals.documents, "windows": totals.windows, "context": context,
            "stride": stride, "max_tokens": o.max_tokens,
            "seconds": round(time.perf_counter() - start, 2),
        }  # fmt: skip
        return TaskResult(metrics, baseline, metrics["ppl"], baseline["ppl"], details)

    def _total(self) -> int:
        if self._stream is not None:
            return len(self._val) if self._val is not None else 1
        if self._files:
            return sum(f.stat().st_size for f in self._files)
        return len(self._texts)

    def _segments(self) -> Iterator[tuple[np.ndarray | list[int], int]]:
        """(segment, progress made) pairs."""
        if self._stream is not None:
            if self._val is None:
                yield self._stream, 1
            else:
                assert self.trained is not None
                for segment in heldout_segments(self._stream, self.trained.data.seq_len,
                                                self._val):  # fmt: skip
                    yield segment, (len(segment) - 1) // self.trained.data.seq_len
        elif self._files:
            yield from self._file_documents()
        else:
            yield from self._documents((t, 1) for t in self._texts if t and t.strip())

    def _file_documents(self) -> Iterator[tuple[list[int], int]]:
        enc = self.options.encoding
        for path in self._files:
            if self.options.format == "line":
                yield from self._documents(_lines(path, enc))
                continue
            ids, blank = [self.tok.eos], True
            for block in read_blocks(path, enc):
                blank = blank and not block.strip()
                ids += self.tok.tokenizer.encode(block, add_special_tokens=False).ids
            yield ([] if blank else ids), path.stat().st_size

    def _documents(self, texts: Iterator[tuple[str, int]]) -> Iterator[tuple[list[int], int]]:
        """Documents encoded in batches of 64, each as [EOS] + its tokens."""
        batch: list[tuple[str, int]] = []
        for item in texts:
            batch.append(item)
            if len(batch) == 64:
                yield from self._encode(batch)
                batch = []
        yield from self._encode(batch)

    def _encode(self, batch: list[tuple[str, int]]) -> Iterator[tuple[list[int], int]]:
        encoded = self.tok.tokenizer.encode_batch([t for t, _ in batch], add_special_tokens=False)
        for enc, (_, advance) in zip(encoded, batch, strict=True):
            yield [self.tok.eos, *enc.ids], advance


def _lines(path: Path, encoding: str) -> Iterator[tuple[str, int]]:
    """Non-blank lines (without their line break) and the bytes each advanced."""
    try:
        with open(path, "rb") as handle:
            for raw in handle:
                line = raw.decode(encoding).rstrip("\r\n")
                yield (line, len(raw)) if line.strip() else ("", len(raw))
    except UnicodeDecodeError as err:
        raise UserError(f"cannot decode {path} as {encoding}: {err.reason}") from None


def summary(report: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """W&B summary keys and the results table of a finished report."""
    keys: dict[str, Any] = {}
    rows = []
    for name, r in report["tasks"].items():
        for metric, value in r["metrics"].items():
            keys[f"ppl/{name}/{metric}"] = value
        keys[f"ppl/{name}/tokens"] = r["tokens"]
        rows.append([name, r["data"], r["tokens"], r["bytes"], *r["metrics"].values(),
                     r["unigram"]["ppl"]])  # fmt: skip
    columns = ["corpus", "data", "tokens", "bytes", "loss", "ppl", "bits_per_byte", "unigram_ppl"]
    return keys, {"ppl/results": (columns, rows)}


def print_report(report: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"held-out text — {report['checkpoint']}")
    for header in ("corpus", "data", "tokens", "bytes", "loss", "ppl", "bits/byte",
                   "unigram ppl", "time"):  # fmt: skip
        table.add_column(header, justify="left" if header in ("corpus", "data") else "right")
    for name, r in report["tasks"].items():
        m = r["metrics"]
        data = r["data"] if r["data"] != UNKNOWN else f"[bold yellow]{r['data']}[/bold yellow]"
        table.add_row(name, data, f"{r['tokens']:,}", f"{r['bytes']:,}", f"{m['loss']:.4f}",
                      f"{m['ppl']:.2f}", f"{m['bits_per_byte']:.4f}", f"{r['unigram']['ppl']:.1f}",
                      f"{r['seconds']:.1f}s")  # fmt: skip
    Console(stderr=True, width=max(console.width, 130)).print(table)
    say(f"[dim]{report['convention']}[/dim]")
