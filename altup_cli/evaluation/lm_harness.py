"""Zero-shot (and few-shot) benchmarks through lm-evaluation-harness, for `altup eval lm` and
for evaluation during training (`evaluate_tasks`).

A task name is one of the eleven packaged offline tasks (`lm_data.OFFLINE_TASKS`: their
YAMLs rendered with the cached data's paths), a task YAML file, or any task, group or tag
lm-eval itself knows (its data from the hub, so a network). Each task is evaluated on its own
(`simple_evaluate`, so each gets its wall time) by `lm_model.AltupLM`, with the chance
baseline read from the same documents: the mean of 1 / (number of choices) for a
multiple-choice task (its acc and acc_norm), 0 for a generation task's exact match. The
model comes back in the train/eval mode and on the device it had; the global random states
lm-eval seeds are restored.
"""

from __future__ import annotations

import logging
import random
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from altup_cli.errors import UserError, first_line
from altup_cli.evaluation.lm_data import OFFLINE_TASKS, render_tasks

INSTALL = "altup eval lm needs lm-evaluation-harness: pip install 'altup[eval]'"
TABLE_METRICS = ("acc", "acc_norm", "exact_match")  # what the table shows beside chance


def require_lm_eval() -> None:
    """A one-line UserError when lm-eval is not installed."""
    try:
        import lm_eval  # noqa: F401
    except ImportError:
        raise UserError(INSTALL) from None


def default_cache_dir() -> Path:
    import os

    return Path(os.environ.get("ALTUP_CACHE", "~/.cache/altup")).expanduser()


def parse_task_names(text: str) -> list[str]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    if not names:
        raise UserError("--tasks: give at least one task (e.g. arc_easy,copa)")
    duplicated = sorted({n for n in names if names.count(n) > 1})
    if duplicated:
        raise UserError(f"--tasks: {duplicated[0]} is named twice")
    return names


@dataclass
class LoadedTask:
    """One leaf lm-eval task ready to run: its name, lm-eval's Task, where it came from."""

    name: str
    task: Any  # lm_eval.api.task.Task
    offline: bool


class TaskSource:
    """Resolves task names to lm-eval tasks: offline ones from rendered YAMLs, the rest from
    lm-eval's registry (indexed only when some name needs it). Unknown names are one line."""

    def __init__(self, names: list[str], cache_dir: Path, work_dir: Path) -> None:
        from lm_eval.tasks import TaskManager

        local = {n for n in names if n.endswith((".yaml", ".yml")) and Path(n).is_file()}
        stock = [n for n in names if n not in OFFLINE_TASKS and n not in local]
        self.manager = TaskManager(include_defaults=bool(stock))
        unknown = [n for n in stock if n not in self.manager.all_tasks]
        if unknown:
            offline = ", ".join(OFFLINE_TASKS)
            raise UserError(
                f"unknown lm-eval task {unknown[0]!r} (offline: {offline}; "
                "or any task name lm-eval knows, or a task YAML file)"
            )
        offline_names = [n for n in names if n in OFFLINE_TASKS]
        rendered = render_tasks(offline_names, cache_dir, work_dir) if offline_names else None
        self.specs = [str(rendered / f"{n}.yaml") if n in OFFLINE_TASKS else n for n in names]
        self.names = names

    def load(self) -> list[LoadedTask]:
        """Every leaf task (a group or tag expands to its tasks), its data loaded."""
        out = []
        for name, spec in zip(self.names, self.specs, strict=True):
            try:
                loaded = self.manager.load([spec])["tasks"]
            except Exception as err:  # lm-eval and datasets raise many types
                raise UserError(f"task {name}: cannot load it: {first_line(err)}") from None
            out += [LoadedTask(n, t, name in OFFLINE_TASKS) for n, t in loaded.items()]
        return out


def chance(task: Any, limit: int | None) -> float | None:
    """The expected score of a uniform random guess on the documents evaluated: mean
    1/choices (multiple choice), 0 (generation); None for perplexity tasks."""
    kind = task.get_config("output_type")
    if kind == "generate_until":
        return 0.0
    if kind != "multiple_choice":
        return None
    docs = list(task.eval_docs)[: limit if limit is not None else None]
    if not docs:
        return None
    return sum(1 / len(task.doc_to_choice(doc)) for doc in docs) / len(docs)


def metric_values(entry: dict[str, Any]) -> dict[str, float]:
    """lm-eval's `"acc,none": 0.5` entries as `{"acc": 0.5}` (stderr and aliases dropped; a
    metric under two filters keeps its full key)."""
    out: dict[str, float] = {}
    for key, value in entry.items():
        metric, comma, _ = key.partition(",")
        numeric = isinstance(value, (int, float)) and not isinstance(value, bool)
        if not comma or "_stderr" in metric or not numeric:
            continue
        out[key if metric in out else metric] = float(value)
    return out


@dataclass
class TaskOutcome:
    """One task's numbers: metrics, chance, the validation rows and those evaluated,
    seconds, and lm-eval's full results of the task (JSON-safe)."""

    name: str
    metrics: dict[str, float]
    chance: float | None
    rows: int
    evaluated: int
    seconds: float
    results: dict[str, Any]
    offline: bool


def run_task(lm: Any, loaded: LoadedTask, limit: int | None,
             num_fewshot: int | None) -> TaskOutcome:  # fmt: skip
    """One task through lm-eval's `evaluate`, set up as `simple_evaluate` sets a task up
    (its few-shot count, lm-eval's default seeds) without `simple_evaluate`'s collection of
    the environment (pip in a subprocess: seconds per call)."""
    import numpy as np
    import torch
    from lm_eval.defaults import DEFAULT_OTHER_SEED, DEFAULT_RANDOM_SEED
    from lm_eval.evaluator import evaluate

    task = loaded.task
    if num_fewshot is not None and task.get_config("num_fewshot") != 0:
        task.set_config(key="num_fewshot", value=num_fewshot)  # a task fixed at 0 stays 0
    elif task.get_config("num_fewshot") is None:
        task.set_config(key="num_fewshot", value=0)
    task.set_fewshot_seed(seed=DEFAULT_OTHER_SEED)
    start = time.perf_counter()
    with _quiet(), _kept_random_state():
        random.seed(DEFAULT_RANDOM_SEED)
        np.random.seed(DEFAULT_OTHER_SEED)
        torch.manual_seed(DEFAULT_OTHER_SEED)
        tasks = {"tasks": {loaded.name: task}, "groups": {}, "group_map": {}}
        results = evaluate(lm=lm, task_dict=tasks, limit=limit, log_samples=False)
    seconds = time.perf_counter() - start
    assert results is not None  # one process: rank 0
    entry = results["results"][loaded.name]
    rows = len(list(task.eval_docs))
    evaluated = int(results.get("n-samples", {}).get(loaded.name, {}).get("effective", rows))
    results["config"] = {"limit": limit, "num_fewshot": task.get_config("num_fewshot"),
                         "batch_size": lm.batch_size, "device": str(lm.device)}  # fmt: skip
    return TaskOutcome(
        loaded.name, metric_values(entry), chance(task, limit), rows, evaluated, seconds,
        _json_safe(results), loaded.offline,
    )  # fmt: skip


def evaluate_tasks(
    model: Any,
    tokenizer: Any,
    tasks: list[str],
    *,
    limit: int | None,
    num_fewshot: int | None = None,
    batch_size: int = 8,
    device: str = "cpu",
    cache_dir: Path | None = None,
) -> dict[str, dict[str, float]]:
    """Each task's metrics (task → metric → value, e.g. {"arc_easy": {"acc": 0.3, …}})."""
    return {o.name: o.metrics for o in run_tasks(
        model, tokenizer, tasks, limit=limit, num_fewshot=num_fewshot, batch_size=batch_size,
        device=device, cache_dir=cache_dir,
    )}  # fmt: skip


def run_tasks(
    model: Any,
    tokenizer: Any,
    tasks: list[str],
    *,
    limit: int | None,
    num_fewshot: int | None = None,
    batch_size: int = 8,
    device: str = "cpu",
    cache_dir: Path | None = None,
) -> list[TaskOutcome]:
    """Every task's outcome, in order."""
    with harness(model, tokenizer, tasks, batch_size=batch_size, device=device,
                 cache_dir=cache_dir) as (lm, loaded):  # fmt: skip
        return [run_task(lm, t, limit, num_fewshot) for t in loaded]


@contextmanager
def harness(
    model: Any, tokenizer: Any, tasks: list[str], *, batch_size: int, device: str,
    cache_dir: Path | None,
) -> Iterator[tuple[Any, list[LoadedTask]]]:  # fmt: skip
    """The model as an lm-eval LM and every task loaded (a UserError for a model that
    cannot be scored, an unknown task or data that cannot be had, before anything runs)."""
    require_lm_eval()
    from altup_cli.evaluation.lm_model import AltupLM

    with tempfile.TemporaryDirectory(prefix="altup-lm-tasks-") as work, restored(model):
        lm = AltupLM(model, tokenizer, batch_size, device)
        source = TaskSource(tasks, cache_dir or default_cache_dir(), Path(work))
        with _quiet():
            loaded = source.load()
        yield lm, loaded


@contextmanager
def restored(model: Any) -> Iterator[None]:
    """The model's train/eval mode and device as they were, after."""
    training = model.training
    device = next(model.parameters()).device
    try:
        yield
    finally:
        model.to(device).train(training)


@contextmanager
def _kept_random_state() -> Iterator[None]:
    """lm-eval seeds Python's, NumPy's and torch's global generators: put them back."""
    import numpy as np
    import torch

    states = random.getstate(), np.random.get_state(), torch.get_rng_state()
    try:
        yield
    finally:
        random.setstate(states[0])
        np.random.set_state(states[1])
        torch.set_rng_state(states[2])


@contextmanager
def _quiet() -> Iterator[None]:
    """lm-eval's INFO/WARNING chatter and the datasets progress bars off while it runs."""
    import datasets

    logger = logging.getLogger("lm_eval")
    level, bars = logger.level, datasets.utils.logging.is_progress_bar_enabled()
    logger.setLevel(logging.ERROR)
    datasets.utils.logging.disable_progress_bar()
    try:
        yield
    finally:
        logger.setLevel(level)
        if bars:
            datasets.utils.logging.enable_progress_bar()


def _json_safe(results: dict[str, Any]) -> dict[str, Any]:
    """lm-eval's results as plain JSON data (functions in task configs become strings)."""
    import json

    from lm_eval.utils import handle_non_serializable

    kept = {k: v for k, v in results.items() if k != "samples"}
    return json.loads(json.dumps(kept, default=handle_non_serializable))
