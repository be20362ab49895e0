"""What an evaluation task is: the protocol every `altup eval …` task implements."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol


@dataclass
class TaskResult:
    """One task's outcome. `metrics` and `baseline` hold the same keys (fractions, e.g.
    accuracy 0.81); `score` is the headline number (None when the task has none, e.g. it
    diverged, and then `failed` says why); `details` is whatever else the report keeps."""

    metrics: dict[str, float]
    baseline: dict[str, float]
    score: float | None
    baseline_score: float | None
    details: dict[str, Any] = field(default_factory=dict)
    failed: str | None = None

    def entry(self, baseline_name: str) -> dict[str, Any]:
        """The task's entry in the JSON report (`baseline_name`: e.g. `majority`)."""
        head: dict[str, Any] = {"diverged": self.failed} if self.failed else {
            "metrics": self.metrics,
            "score": self.score,
        }  # fmt: skip
        return head | self.details | {
            baseline_name: self.baseline,
            f"{baseline_name}_score": self.baseline_score,
        }  # fmt: skip


class EvalTask(Protocol):
    """`prepare` loads and checks the task's data (a UserError for anything unusable) before
    any output is written; `evaluate` scores a model on it."""

    name: str
    baseline_name: str  # what the baseline is: "majority" (GLUE), "chance" (zero-shot), …

    def prepare(self) -> None: ...

    def describe(self) -> str: ...  # a one-line summary for the progress output

    def evaluate(self, model: Any, tokenizer: Any, logger: Any) -> TaskResult: ...
