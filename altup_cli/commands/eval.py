"""`altup eval glue CKPT`: fine-tune a pretrained altup model on GLUE tasks and score it.

Everything is checked first (settings, checkpoint, tokenizer, every task's files), then each
task is fine-tuned from the same pretrained weights with a fresh head (evaluation/glue.py),
and the dev metrics go to a rich table, `glue.json` and one W&B run (evaluation/report.py).
A diverged task has no score; the other tasks still run, and the command then fails with
one line naming it (exit code 3).
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

from altup_cli.config.eval import (
    GlueSettings,
    check_run_settings,
    compose_glue_settings,
    logger_settings,
    task_settings,
)
from altup_cli.console import say
from altup_cli.errors import UserError
from altup_cli.evaluation.glue import CONVENTION, GlueTask, glue_scores, print_report, summary
from altup_cli.evaluation.report import EvalReport, log_summary, new_eval_directory
from altup_cli.glue.tasks import parse_tasks

HELP_GLUE = """Fine-tune a checkpoint on GLUE tasks and report the official dev metrics.

Each task starts from the same pretrained weights with a new head (classification, or
regression for STS-B) on the last token's (or the mean) hidden state; pairs are joined with
the tokenizer's EOS. Reports CoLA Matthews corr., STS-B Pearson/Spearman, MRPC/QQP F1 and
accuracy, accuracy elsewhere (MNLI matched and mismatched), the majority-class baseline
and the GLUE average, as a table, `glue.json` and a W&B run. Settings: conf/eval/glue.yaml,
overridden with `eval.<key>=…` or per task `eval.tasks.<task>.<key>=…`.

**Examples**

* `altup eval glue outputs/2026-11-22/10-00-00_quickstart --tasks sst2,rte,mrpc,cola`

* `altup eval glue RUN --tasks all --data-dir ~/glue_data eval.epochs=5 eval.pooling=mean`

* `altup eval glue RUN/checkpoints/last.ckpt --tasks rte eval.tasks.rte.lr=1e-4`

* `altup eval glue RUN --tasks mnli eval.source=hf --data-dir nyu-mll/glue` (network)

* `altup eval glue RUN --tasks cola eval.source=hf --data-dir saved/` (`save_to_disk` copy)
"""


class TasksDiverged(UserError):
    """Fine-tuning diverged on some task: exit code 3, as a diverged `altup train`."""

    exit_code = 3


def load_pretrained(checkpoint: str) -> tuple[Any, Any, int]:
    """The model, its tokenizer and the separator id (the tokenizer's EOS)."""
    from altup_cli.data.tokenizer import EOS
    from altup_cli.runs.export import load, load_tokenizer

    model, _ = load(checkpoint)  # each raises a UserError for what it cannot read
    tokenizer = load_tokenizer(checkpoint)
    sep = tokenizer.token_to_id(EOS)
    if sep is None:
        raise UserError(f"{checkpoint}: its tokenizer has no {EOS} token to join sentence pairs")
    return model, tokenizer, sep


def fit_max_len(
    per_task: dict[str, GlueSettings], explicit: list[str], limit: int
) -> list[str]:
    """Cap each task's max_len at the model's context (a note each), unless the command line
    asked for more, which is an error."""
    notes = []
    for name, s in list(per_task.items()):
        if s.max_len <= limit:
            continue
        if {"max_len", f"tasks.{name}.max_len"} & set(explicit):
            raise UserError(
                f"eval ({name}): max_len {s.max_len} exceeds the model's max_seq_len {limit}"
            )
        per_task[name] = replace(s, max_len=limit)
        notes.append(f"note: {name}: max_len {s.max_len} → {limit} (the model's max_seq_len)")
    return notes


def eval_glue(
    checkpoint: str, tasks_text: str, data_dir: str, overrides: list[str], out: str | None
) -> Path:
    raw = compose_glue_settings(overrides)
    check_run_settings(raw)
    tasks = parse_tasks(tasks_text)
    per_task = {t.name: task_settings(raw, t.name) for t in tasks}
    model, tokenizer, sep = load_pretrained(checkpoint)
    notes = fit_max_len(per_task, raw["explicit"], model.config.max_seq_len)
    jobs = [GlueTask(t, per_task[t.name], raw["source"], data_dir, sep) for t in tasks]
    for job in jobs:
        job.prepare()
    run_dir = new_eval_directory("glue", out, raw["output_dir"], checkpoint)
    header = {
        "checkpoint": str(checkpoint),
        "model": model.config.to_dict(),
        "data": {"source": raw["source"], "location": str(data_dir)},
        "convention": CONVENTION,
    }
    report = EvalReport("glue", run_dir, header, scores=glue_scores)
    report.start({"eval": raw})
    say(f"[bold]altup eval glue[/bold] {checkpoint} → {run_dir}")
    for note in notes:
        say(note)
    logger = _logger(raw, run_dir)
    for job in jobs:
        report.add(job.name, job.evaluate(model, tokenizer, logger), job.baseline_name)
    final = report.finish()
    print_report(final)
    if logger:
        log_summary(logger, *summary(final))
    say(f"results: {report.path}")
    if report.failed:
        which = "; ".join(f"{name} ({why})" for name, why in report.failed.items())
        raise TasksDiverged(
            f"fine-tuning diverged: {which}; marked so in {report.path} (a lower eval.lr may help)"
        )
    return run_dir


def _logger(raw: dict[str, Any], run_dir: Path) -> Any:
    from altup_cli.training.loggers import make_logger

    return make_logger(
        logger_settings(raw), run_dir, run_dir.name, job_type="eval-glue", config={"eval": raw}
    )
