"""Running training jobs, for `altup sweep isoflop` (its points) and `altup compare` (its
variant × seed runs): each job is an ordinary `altup train` run in its own directory,
resumed from its last checkpoint if it has one. Executors: in-process, one subprocess at a
time, N local subprocesses in parallel, or submitit (SLURM job arrays, or its local
executor). Only the main process writes results: `on_done` gets each job as it finishes."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from altup_cli.console import say
from altup_cli.errors import UserError, check_choice, require
from altup_cli.sweep.plan import SweepPoint

EXECUTORS = ("subprocess", "inprocess", "local", "slurm", "submitit-local")


@dataclass(frozen=True)
class Job:
    """One run to train: `key` names it in messages, `title` heads its output when jobs run
    one after another, `command` is the command line its run.json records (None: the
    sweep's, and `train_point` is called with its three arguments as it always was)."""

    key: str
    overrides: list[str]
    run_dir: Path
    title: str
    command: str | None = None

    def args(self, recipe: str | None) -> list[Any]:
        extra = [] if self.command is None else [self.command]
        return [self.overrides, recipe, str(self.run_dir), *extra]


def check_executor(executor: str, jobs: int) -> None:
    """The one check of `--executor` and `--jobs` (the sweep's and the comparison's)."""
    check_choice(executor, EXECUTORS, "--executor", one_of=True)
    require(jobs >= 1, f"--jobs must be >= 1, got {jobs}")


def train_point(
    overrides: list[str], recipe: str | None, run_dir: str, command: str = "altup sweep"
) -> dict[str, Any]:
    """Train one run to completion in `run_dir` (continuing its checkpoint if any) in this
    process; returns its metrics.json."""
    from altup_cli.evaluation.during_training import during_training_callbacks
    from altup_cli.runs.request import plan_run
    from altup_cli.runs.rundir import read_meta
    from altup_cli.training.run import train

    directory = Path(run_dir)
    metrics = directory / "metrics.json"
    if metrics.is_file() and read_meta(directory).get("status") == "completed":
        return json.loads(metrics.read_text())  # finished before its row was written
    ckpt = directory / "checkpoints" / "last.ckpt"
    request = plan_run(overrides, recipe, ckpt if ckpt.is_file() else None)
    callbacks = during_training_callbacks(request.settings)
    train(request, argv=[command, *overrides], run_dir=directory, callbacks=callbacks)
    return json.loads(metrics.read_text())


# A job's child process: first it asks Linux to SIGTERM it when the sweep (or comparison)
# dies (PR_SET_PDEATHSIG = 1), so a killed sweep leaves no orphan training on; the getppid
# check covers a sweep that died before that. Then it trains the run.
_CHILD = """
import ctypes, json, os, signal, sys
if sys.platform == "linux":
    ctypes.CDLL(None).prctl(1, signal.SIGTERM)
if os.getppid() != int(sys.argv[2]):
    sys.exit("the sweep or comparison that started this run is gone")
from altup_cli.sweep.execute import train_point
train_point(*json.loads(sys.argv[1]))
"""


def _in_subprocess(job: Job, recipe: str | None, threads: int | None) -> dict[str, Any]:
    env = dict(os.environ)
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    args = [json.dumps(job.args(recipe)), str(os.getpid())]
    log = job.run_dir.parent / f"{job.run_dir.name}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("a") as handle:
        done = subprocess.run(
            [sys.executable, "-c", _CHILD, *args], env=env, stdout=handle, stderr=subprocess.STDOUT
        )
    if done.returncode != 0:
        raise RuntimeError(f"exit code {done.returncode}; see {log}")
    return json.loads((job.run_dir / "metrics.json").read_text())


def run_jobs(
    jobs: list[Job],
    recipe: str | None,
    executor: str,
    n_jobs: int,
    slurm: dict[str, Any],
    folder: Path,
    on_done: Callable[[Job, dict[str, Any]], None],
    noun: str = "point",
) -> list[str]:
    """Train `jobs` with the chosen executor (`folder` holds submitit's files); `on_done`
    gets each finished job and its metrics as it finishes, in this process. Returns the
    keys of the jobs that failed (`noun` names a job in the failure messages)."""
    check_executor(executor, n_jobs)
    failed: list[str] = []

    def finish(job: Job, result: Callable[[], dict[str, Any]]) -> None:
        try:
            on_done(job, result())
        except Exception as err:  # a failed run must not stop the others
            failed.append(job.key)
            reason = str(err).splitlines()[0] if str(err) else repr(err)
            say(f"[red]{noun} {job.key} failed:[/red] {reason}")

    if executor in ("slurm", "submitit-local"):
        _submitit(jobs, recipe, executor, slurm, folder, finish)
    elif executor == "local" and n_jobs > 1:
        threads = max(1, (os.cpu_count() or 1) // n_jobs)
        with ThreadPoolExecutor(max_workers=n_jobs) as pool:
            futures = {pool.submit(_in_subprocess, job, recipe, threads): job for job in jobs}
            for future in as_completed(futures):
                finish(futures[future], future.result)
    else:
        for job in jobs:
            say(f"[bold]── {job.title} ──[/bold]")
            if executor == "inprocess":
                finish(job, lambda j=job: train_point(*j.args(recipe)))
            else:
                finish(job, lambda j=job: _in_subprocess(j, recipe, None))
    return failed


def run_points(
    points: list[SweepPoint],
    sweep_dir: Path,
    recipe: str | None,
    executor: str,
    jobs: int,
    slurm: dict[str, Any],
    on_done: Callable[[SweepPoint, dict[str, Any]], None],
) -> list[str]:
    """Train sweep `points` in `<sweep_dir>/points/<key>`; `on_done` gets each finished
    point as it finishes. Returns the keys of points that failed."""
    by_key = {p.key: p for p in points}
    todo = [
        Job(p.key, p.overrides, sweep_dir / "points" / p.key, f"point {p.key} ({p.steps} steps)")
        for p in points
    ]
    return run_jobs(
        todo, recipe, executor, jobs, slurm, sweep_dir, lambda j, m: on_done(by_key[j.key], m)
    )


def _submitit(
    jobs: list[Job],
    recipe: str | None,
    executor: str,
    slurm: dict[str, Any],
    folder: Path,
    finish: Callable[[Job, Callable[[], dict[str, Any]]], None],
) -> None:
    """One job per run, submitted as one array; results collected as jobs end."""
    import submitit

    if executor == "slurm" and shutil.which("sbatch") is None:
        raise UserError("--executor slurm needs SLURM (no sbatch on PATH); try --executor local")
    cluster = "slurm" if executor == "slurm" else "local"
    ex = submitit.AutoExecutor(folder=folder / "submitit" / "%j", cluster=cluster)
    params: dict[str, Any] = {"timeout_min": slurm.get("timeout_min", 60), "name": folder.name}
    if slurm.get("gpus_per_node"):
        params["gpus_per_node"] = slurm["gpus_per_node"]
    if slurm.get("cpus_per_task"):
        params["cpus_per_task"] = slurm["cpus_per_task"]
    if cluster == "slurm" and slurm.get("partition"):
        params["slurm_partition"] = slurm["partition"]
    ex.update_parameters(**params)
    with ex.batch():
        submitted = [ex.submit(train_point, *job.args(recipe)) for job in jobs]
    say(f"submitted {len(submitted)} jobs ({cluster}): "
        f"{', '.join(j.job_id for j in submitted[:5])}…")  # fmt: skip
    for done, job in zip(submitted, jobs, strict=True):
        finish(job, done.result)
