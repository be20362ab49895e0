"""Running sweep points: each is an ordinary `altup train` run in its own directory
(`<sweep>/points/<key>`), resumed from its last checkpoint if it has one. Executors:
in-process, one subprocess at a time (default), N local subprocesses in parallel, or
submitit (SLURM job arrays, or its local executor)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path
from typing import Any

from altup_cli.console import say
from altup_cli.errors import UserError
from altup_cli.sweep.plan import SweepPoint

EXECUTORS = ("subprocess", "inprocess", "local", "slurm", "submitit-local")


def train_point(overrides: list[str], recipe: str | None, run_dir: str) -> dict[str, Any]:
    """Train one point to completion in `run_dir` (continuing its checkpoint if any) in this
    process; returns its metrics.json."""
    from altup_cli.config import compose_config, validate
    from altup_cli.training import run

    directory = Path(run_dir)
    metrics = directory / "metrics.json"
    meta = directory / "run.json"
    if (
        metrics.is_file()
        and meta.is_file()
        and json.loads(meta.read_text())["status"] == "completed"
    ):
        return json.loads(metrics.read_text())  # finished before its row was written
    cfg = compose_config(overrides, recipe)
    ckpt = directory / "checkpoints" / "last.ckpt"
    resume = ckpt if ckpt.is_file() else None
    if resume is not None:
        cfg = run.resumed_config(resume, overrides, cfg)
    os.environ[run.RUN_DIR_ENV] = str(directory)
    run.train(cfg, validate(cfg), overrides, resume, argv=["altup sweep", *overrides])
    return json.loads(metrics.read_text())


# A point's child process: first it asks Linux to SIGTERM it when the sweep dies
# (PR_SET_PDEATHSIG = 1), so a killed sweep leaves no orphan training on; the getppid
# check covers a sweep that died before that. Then it trains the point.
_CHILD = """
import ctypes, json, os, signal, sys
if sys.platform == "linux":
    ctypes.CDLL(None).prctl(1, signal.SIGTERM)
if os.getppid() != int(sys.argv[2]):
    sys.exit("the sweep that started this point is gone")
from altup_cli.sweep.execute import train_point
train_point(*json.loads(sys.argv[1]))
"""


def _in_subprocess(
    overrides: list[str], recipe: str | None, run_dir: str, threads: int | None
) -> dict[str, Any]:
    env = dict(os.environ)
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    args = [json.dumps([overrides, recipe, run_dir]), str(os.getpid())]
    log = Path(run_dir).parent / f"{Path(run_dir).name}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("a") as handle:
        done = subprocess.run(
            [sys.executable, "-c", _CHILD, *args], env=env, stdout=handle, stderr=subprocess.STDOUT
        )
    if done.returncode != 0:
        raise RuntimeError(f"exit code {done.returncode}; see {log}")
    return json.loads((Path(run_dir) / "metrics.json").read_text())


def run_points(
    points: list[SweepPoint],
    sweep_dir: Path,
    recipe: str | None,
    executor: str,
    jobs: int,
    slurm: dict[str, Any],
    on_done: Callable[[SweepPoint, dict[str, Any]], None],
) -> list[str]:
    """Train `points` with the chosen executor; `on_done` gets each finished point as it
    finishes. Returns the keys of points that failed."""
    if executor not in EXECUTORS:
        raise UserError(f"--executor must be one of {', '.join(EXECUTORS)}, got {executor!r}")
    run_dir = {p.key: str(sweep_dir / "points" / p.key) for p in points}
    failed: list[str] = []

    def finish(point: SweepPoint, result: Callable[[], dict[str, Any]]) -> None:
        try:
            on_done(point, result())
        except Exception as err:  # a failed point must not stop the others
            failed.append(point.key)
            reason = str(err).splitlines()[0] if str(err) else repr(err)
            say(f"[red]point {point.key} failed:[/red] {reason}")

    if executor in ("slurm", "submitit-local"):
        _submitit(points, run_dir, recipe, executor, slurm, sweep_dir, finish)
    elif executor == "local" and jobs > 1:
        threads = max(1, (os.cpu_count() or 1) // jobs)
        with ThreadPoolExecutor(max_workers=jobs) as pool:
            futures = {
                pool.submit(_in_subprocess, p.overrides, recipe, run_dir[p.key], threads): p
                for p in points
            }
            for future in as_completed(futures):
                finish(futures[future], future.result)
    else:
        for point in points:
            say(f"[bold]── point {point.key} ({point.steps} steps) ──[/bold]")
            if executor == "inprocess":
                finish(point, lambda p=point: train_point(p.overrides, recipe, run_dir[p.key]))
            else:
                finish(
                    point, lambda p=point: _in_subprocess(p.overrides, recipe, run_dir[p.key], None)
                )
    return failed


def _submitit(
    points: list[SweepPoint],
    run_dir: dict[str, str],
    recipe: str | None,
    executor: str,
    slurm: dict[str, Any],
    sweep_dir: Path,
    finish: Callable[[SweepPoint, Callable[[], dict[str, Any]]], None],
) -> None:
    """One job per point, submitted as one array; results collected as jobs end."""
    import submitit

    if executor == "slurm" and shutil.which("sbatch") is None:
        raise UserError("--executor slurm needs SLURM (no sbatch on PATH); try --executor local")
    cluster = "slurm" if executor == "slurm" else "local"
    ex = submitit.AutoExecutor(folder=sweep_dir / "submitit" / "%j", cluster=cluster)
    params: dict[str, Any] = {"timeout_min": slurm.get("timeout_min", 60), "name": sweep_dir.name}
    if slurm.get("gpus_per_node"):
        params["gpus_per_node"] = slurm["gpus_per_node"]
    if slurm.get("cpus_per_task"):
        params["cpus_per_task"] = slurm["cpus_per_task"]
    if cluster == "slurm" and slurm.get("partition"):
        params["slurm_partition"] = slurm["partition"]
    ex.update_parameters(**params)
    with ex.batch():
        jobs = [ex.submit(train_point, p.overrides, recipe, run_dir[p.key]) for p in points]
    say(f"submitted {len(jobs)} jobs ({cluster}): {', '.join(j.job_id for j in jobs[:5])}…")
    for job, point in zip(jobs, points, strict=True):
        finish(point, job.result)
