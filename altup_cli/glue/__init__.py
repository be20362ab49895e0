"""GLUE: the nine tasks, their data readers and their official metrics (plain Python).

`tasks` knows each task's columns, labels and dev splits and reads GLUE's TSV layout or a
`datasets` copy; `metrics` computes the official dev metrics. It imports only errors; the
fine-tuning module (training/glue.py) and the GLUE evaluation task (evaluation/glue.py)
import it.
"""

from altup_cli.glue.metrics import METRICS
from altup_cli.glue.tasks import TASKS, Split, Task, parse_tasks

__all__ = ["METRICS", "TASKS", "Split", "Task", "parse_tasks"]
