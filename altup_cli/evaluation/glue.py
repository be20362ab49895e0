"""GLUE as an evaluation task: fine-tune a fresh copy of the pretrained model on one task,
report the dev metrics of the reported epoch beside the majority-class baseline.

A task whose loss or dev metrics turn non-finite is stopped and marked `diverged` (it has
no score); the other tasks still run.
"""

from __future__ import annotations

import copy
import math
import random
import sys
import time
from collections import Counter
from dataclasses import fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

from altup_cli.console import console, say
from altup_cli.evaluation.task import TaskResult
from altup_cli.glue.metrics import METRICS
from altup_cli.glue.tasks import Split, Task, load_hf_task, load_tsv_task

if TYPE_CHECKING:
    from altup_cli.config.eval import GlueSettings
    from altup_cli.models.transformer import TransformerLM

CONVENTION = (
    "task score = mean of the task's metrics over its dev splits ×100 (MRPC/QQP: F1 and "
    "accuracy; STS-B: Pearson and Spearman; MNLI: matched and mismatched accuracy); GLUE "
    "score = unweighted mean of the task scores of the tasks evaluated here, also given "
    "without WNLI (BERT's convention); dev splits, one seed"
)


def subsample(split: Split, limit: int | None, seed: int) -> Split:
    if limit is None or limit >= len(split.labels):
        return split
    keep = sorted(random.Random(seed).sample(range(len(split.labels)), limit))
    return Split(split.name, [split.texts[i] for i in keep], [split.labels[i] for i in keep])


def majority(task: Task, train: Split, devs: list[Split]) -> dict[str, float]:
    """Dev metrics of always predicting the train split's most common class (STS-B: its
    mean score, which has no correlation)."""
    if task.regression:
        guess: float = sum(train.labels) / len(train.labels)
    else:
        guess = Counter(train.labels).most_common(1)[0][0]
    return {
        f"{dev.name}/{m}": METRICS[m]([guess] * len(dev.labels), dev.labels)
        for dev in devs
        for m in task.metrics
    }


def score(metrics: dict[str, float]) -> float:
    return 100 * sum(metrics.values()) / len(metrics)


def glue_scores(results: dict[str, Any]) -> dict[str, Any]:
    """The GLUE averages over the tasks that have a score (a diverged task has none)."""
    scored = {name: r for name, r in results.items() if "score" in r}
    scores = {name: r["score"] for name, r in scored.items()}
    out: dict[str, Any] = {
        "glue_score": sum(scores.values()) / len(scores) if scores else None,
        "majority_glue_score": (
            sum(r["majority_score"] for r in scored.values()) / len(scored) if scored else None
        ),
        "tasks_in_score": list(scores),
    }
    rest = {k: v for k, v in scores.items() if k != "wnli"}
    if "wnli" in scores and rest:
        out["glue_score_without_wnli"] = sum(rest.values()) / len(rest)
    return out


class GlueTask:
    """One GLUE task under the `EvalTask` protocol."""

    baseline_name = "majority"

    def __init__(
        self, task: Task, settings: GlueSettings, source: str, data_dir: str, sep: int
    ) -> None:
        self.task, self.settings, self.source, self.data_dir, self.sep = (
            task, settings, source, data_dir, sep,
        )  # fmt: skip
        self.name = task.name
        self.train: Split | None = None
        self.devs: list[Split] = []

    def prepare(self) -> None:
        if self.source == "tsv":
            self.train, self.devs = load_tsv_task(self.task, Path(self.data_dir).expanduser())
        else:
            self.train, self.devs = load_hf_task(self.task, self.data_dir)
        from altup_cli.errors import UserError

        for split in (self.train, *self.devs):
            if not split.labels:
                raise UserError(f"{self.name}: {split.name} has no examples")

    def describe(self) -> str:
        s = self.settings
        n = len(self._train.labels)
        n = n if s.max_train_examples is None else min(n, s.max_train_examples)
        return (
            f"[bold]{self.name}[/bold]: {n:,} train examples, "
            + ", ".join(f"{len(d.labels):,} {d.name}" for d in self.devs)
            + f"; {s.epochs} epochs, {self._steps(n):,} steps, lr {s.lr:g}, batch {s.batch_size}"
        )

    @property
    def _train(self) -> Split:
        assert self.train is not None, "prepare() first"
        return self.train

    def _steps(self, n_train: int) -> int:
        return self.settings.epochs * math.ceil(n_train / self.settings.batch_size)

    def evaluate(self, model: TransformerLM, tokenizer: Any, logger: Any) -> TaskResult:
        """Fine-tune a fresh copy of the pretrained model; the reported epoch's metrics."""
        import lightning as L

        from altup_cli.training.glue import Diverged, GlueModule, encode, loader

        s, sep = self.settings, self.sep
        L.seed_everything(s.seed, workers=True, verbose=False)
        model = copy.deepcopy(model)  # every task starts from the same weights
        train = subsample(self._train, s.max_train_examples, s.seed)
        settings = {f.name: getattr(s, f.name) for f in fields(s)} | {"line_progress": not _tty()}
        module = GlueModule(model.train(), self.task, settings, self._steps(len(train.labels)))
        module.dev_names = [d.name for d in self.devs]
        train_loader = loader(encode(train, tokenizer, sep, s.max_len), train.labels,
                              s.batch_size, True, s.seed, sep)  # fmt: skip
        dev_loaders = [
            loader(encode(d, tokenizer, sep, s.max_len), d.labels, s.batch_size, False, 0, sep)
            for d in self.devs
        ]
        say(self.describe())
        start = time.perf_counter()
        trainer = _trainer(s, self.task, logger, len(train_loader))
        try:
            trainer.fit(module, train_loader, dev_loaders)
        except Diverged as err:
            say(f"[bold red]{self.name}: diverged[/bold red] ({err}); the task is stopped")
            return self._result({}, None, train, module, trainer, start, failed=str(err))
        history = module.history
        best = max(history, key=lambda h: h["score"]) if s.early_stopping else history[-1]
        metrics = {k: v for k, v in best.items() if k not in ("epoch", "score")}
        reported = {
            "reported_epoch": best["epoch"] + 1,
            "reported": "best dev epoch (early stopping)" if s.early_stopping else "last epoch",
        }
        return self._result(metrics, reported, train, module, trainer, start)

    def _result(
        self, metrics: dict[str, float], reported: dict[str, Any] | None, train: Split,
        module: Any, trainer: Any, start: float, failed: str | None = None,
    ) -> TaskResult:  # fmt: skip
        baseline = majority(self.task, train, self.devs)
        details = (reported or {}) | {
            "epochs": module.history,
            "train_examples": len(train.labels),
            "dev_examples": {d.name: len(d.labels) for d in self.devs},
            "steps": trainer.global_step,
            "seconds": round(time.perf_counter() - start, 1),
            "settings": {k: v for k, v in module.settings.items() if k != "line_progress"},
        }
        return TaskResult(
            metrics, baseline, None if failed else score(metrics), score(baseline), details, failed
        )


def _trainer(s: GlueSettings, task: Task, logger: Any, batches: int) -> Any:
    from lightning.pytorch.callbacks import EarlyStopping

    from altup_cli.training.trainer import make_trainer

    callbacks = []
    if s.early_stopping:
        callbacks.append(EarlyStopping(f"glue/{task.name}/score", patience=s.patience, mode="max"))
    return make_trainer(
        s.accelerator,
        "auto",
        callbacks=callbacks,
        logger=logger,
        max_epochs=s.epochs,
        devices=1,
        gradient_clip_val=s.grad_clip or None,
        num_sanity_val_steps=0,
        log_every_n_steps=max(1, min(10, batches)),
        enable_checkpointing=False,
        default_root_dir=None,
    )


def _tty() -> bool:
    return sys.stderr.isatty()


def summary(report: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """W&B summary keys and the results table of a finished GLUE report."""
    keys: dict[str, Any] = {}
    rows = []
    for name, r in report["tasks"].items():
        if "diverged" in r:
            keys[f"glue/{name}/diverged"] = r["diverged"]
            continue
        for metric, value in r["metrics"].items():
            keys[f"glue/{name}/{metric}"] = value
            rows.append([name, metric, value, r["majority"][metric]])
        keys[f"glue/{name}/final_score"] = r["score"]
    for key in ("glue_score", "glue_score_without_wnli", "majority_glue_score"):
        if report.get(key) is not None:
            keys[f"glue/{key}"] = report[key]
    keys["glue/convention"] = report["convention"]
    return keys, {"glue/results": (["task", "metric", "model", "majority"], rows)}


def print_report(report: dict[str, Any]) -> None:
    from rich.table import Table

    table = Table(title=f"GLUE dev — {report['checkpoint']}")
    for header in ("task", "metric", "model", "majority class", "train", "epoch", "time"):
        table.add_column(header, justify="left" if header in ("task", "metric") else "right")
    for name, r in report["tasks"].items():
        _task_rows(table, name, r)
    table.add_section()
    table.add_row("GLUE", "score", _number(report["glue_score"]),
                  _number(report["majority_glue_score"]), "", "", "")  # fmt: skip
    if "glue_score_without_wnli" in report:
        table.add_row("GLUE", "without WNLI", f"{report['glue_score_without_wnli']:.2f}",
                      "", "", "", "")  # fmt: skip
    console.print(table)
    say(f"[dim]{report['convention']}[/dim]")


def _task_rows(table: Any, name: str, r: dict[str, Any]) -> None:
    if "diverged" in r:
        table.add_row(name, "[bold red]diverged[/bold red]", "—", f"{r['majority_score']:.2f}",
                      f"{r['train_examples']:,}", "", f"{r['seconds']:.0f}s")  # fmt: skip
        return
    for i, (metric, value) in enumerate(r["metrics"].items()):
        first = i == 0
        table.add_row(
            name if first else "", metric, f"{100 * value:.2f}",
            f"{100 * r['majority'][metric]:.2f}",
            f"{r['train_examples']:,}" if first else "",
            str(r["reported_epoch"]) if first else "",
            f"{r['seconds']:.0f}s" if first else "",
        )  # fmt: skip
    if len(r["metrics"]) > 1:
        table.add_row("", "[italic]score[/italic]", f"{r['score']:.2f}",
                      f"{r['majority_score']:.2f}", "", "", "")  # fmt: skip


def _number(value: float | None) -> str:
    return "—" if value is None else f"{value:.2f}"
