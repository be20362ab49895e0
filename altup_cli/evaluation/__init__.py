"""Evaluation tasks and the one report writer of every `altup eval …` command.

An evaluation task (a GLUE task fine-tuned and scored on its dev splits; perplexity and bits
per byte on a corpus, LAMBADA, zero-shot benchmarks through lm-evaluation-harness) is an
`EvalTask` (`evaluation/task.py`): a name, a data source it checks before anything is
written, a way to score a model, its metrics and the baseline its numbers are read against.
`EvalReport` (`evaluation/report.py`) owns the output directory, the resolved settings, the
atomic JSON report rewritten after each task and the W&B summary. Adding a task family is
one module here, its config file in `conf/eval/` and its tests. May import models, data,
glue, config, runs and training; the commands and the CLI import it, and training's
in-training evaluation callback does at call time (never at module level).
"""

from altup_cli.evaluation.report import EvalReport, new_eval_directory
from altup_cli.evaluation.task import EvalTask, TaskResult

__all__ = ["EvalReport", "EvalTask", "TaskResult", "new_eval_directory"]
