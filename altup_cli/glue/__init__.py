"""GLUE: the nine tasks, their data readers and their official metrics (plain Python)."""

from altup_cli.glue.metrics import METRICS
from altup_cli.glue.tasks import TASKS, Split, Task, parse_tasks

__all__ = ["METRICS", "TASKS", "Split", "Task", "parse_tasks"]
