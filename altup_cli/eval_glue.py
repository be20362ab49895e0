"""`altup eval glue CKPT`: fine-tune a pretrained altup model on GLUE tasks and score it.

Everything is checked first (settings, checkpoint, tokenizer, every task's files), then each
task is fine-tuned from the same pretrained weights with a fresh head, and the dev metrics
of the reported epoch go to a rich table, `glue.json` (rewritten atomically after each
task, so an interrupted evaluation keeps what finished) and one W&B run. A task whose loss
or dev metrics turn non-finite is stopped and marked `diverged` (it has no score); the
other tasks still run, and the command then fails with one line naming it.
"""

from __future__ import annotations

import copy
import math
import os
import random
import sys
import time
import typing
from collections import Counter
from dataclasses import dataclass, fields, replace
from datetime import datetime
from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf

from altup_cli.console import console, say
from altup_cli.errors import UserError
from altup_cli.files import write_json, write_text
from altup_cli.glue.metrics import METRICS
from altup_cli.glue.tasks import Split, Task, load_hf_task, load_tsv_task, parse_tasks
from altup_cli.models.transformer import TransformerLM

CONVENTION = (
    "task score = mean of the task's metrics over its dev splits ×100 (MRPC/QQP: F1 and "
    "accuracy; STS-B: Pearson and Spearman; MNLI: matched and mismatched accuracy); GLUE "
    "score = unweighted mean of the task scores of the tasks evaluated here, also given "
    "without WNLI (BERT's convention); dev splits, one seed"
)
PER_TASK = ("epochs", "lr", "batch_size", "max_len", "max_train_examples")


class TasksDiverged(UserError):
    """Fine-tuning diverged on some task: exit code 3, as a diverged `altup train`."""

    exit_code = 3


@dataclass(frozen=True)
class GlueSettings:
    epochs: int
    lr: float
    batch_size: int
    max_len: int
    pooling: str
    weight_decay: float
    warmup_ratio: float
    grad_clip: float
    seed: int
    early_stopping: bool
    patience: int
    max_train_examples: int | None
    accelerator: str

    def check(self, where: str) -> None:
        rules = [
            (self.epochs >= 1, f"epochs must be >= 1, got {self.epochs}"),
            (self.lr > 0, f"lr must be > 0, got {self.lr}"),
            (self.batch_size >= 1, f"batch_size must be >= 1, got {self.batch_size}"),
            (self.max_len >= 4, f"max_len must be >= 4, got {self.max_len}"),
            (self.pooling in ("last", "mean"),
             f"pooling must be last or mean, got {self.pooling!r}"),
            (0 <= self.warmup_ratio < 1,
             f"warmup_ratio must be in [0, 1), got {self.warmup_ratio}"),
            (self.patience >= 1, f"patience must be >= 1, got {self.patience}"),
            (self.max_train_examples is None or self.max_train_examples >= 1,
             f"max_train_examples must be >= 1 or null, got {self.max_train_examples}"),
            (self.accelerator in ("auto", "cpu", "gpu", "cuda", "mps"),
             f"accelerator must be auto, cpu or gpu, got {self.accelerator!r}"),
        ]  # fmt: skip
        for ok, message in rules:
            if not ok:
                raise UserError(f"{where}{message}")


def compose_settings(overrides: list[str]) -> dict[str, Any]:
    """conf/eval/glue.yaml + overrides (`eval.epochs=5`, `eval.tasks.rte.lr=1e-4`), resolved;
    `explicit` records which keys the command line set (see `task_settings`)."""
    from hydra import compose, initialize_config_dir
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    from altup_cli.config import _one_line, conf_dir

    bad = [o for o in overrides if not o.lstrip("+~").startswith("eval.")]
    if bad:
        raise UserError(f"override {bad[0]!r}: GLUE settings are eval.<key>=… (see --help)")
    try:
        with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
            cfg = compose("eval/glue", overrides=overrides)
        OmegaConf.resolve(cfg)
    except (HydraException, OmegaConfBaseException, ValueError) as err:
        raise UserError(f"config: {_one_line(err)}") from None
    raw: dict[str, Any] = OmegaConf.to_container(cfg["eval"])  # type: ignore[assignment]
    raw["explicit"] = [o.lstrip("+~").split("=")[0].removeprefix("eval.") for o in overrides]
    return raw


def task_settings(raw: dict[str, Any], task: Task) -> GlueSettings:
    """A task's settings: `eval.tasks.<task>.<key>` set on the command line, else `eval.<key>`
    set on the command line, else the task's default in the YAML, else the global default;
    each of the type the field declares (a finite float, an int that is not 1.5)."""
    from altup_cli.config import check_type

    names = {f.name for f in fields(GlueSettings)}
    values = {k: v for k, v in raw.items() if k in names}
    own = (raw.get("tasks") or {}).get(task.name) or {}
    unknown = sorted(set(own) - set(PER_TASK))
    if unknown:
        raise UserError(
            f"eval.tasks.{task.name}.{unknown[0]}: per-task keys are {', '.join(PER_TASK)}"
        )
    explicit = set(raw.get("explicit", []))
    where = {k: f"eval.{k}" for k in values}
    for key, value in own.items():
        if value is not None and (f"tasks.{task.name}.{key}" in explicit or key not in explicit):
            values[key], where[key] = value, f"eval.tasks.{task.name}.{key}"
    hints = typing.get_type_hints(GlueSettings)
    values = {k: check_type(v, hints[k], where[k]) for k, v in values.items()}
    try:
        settings = GlueSettings(**values)
    except TypeError as err:
        raise UserError(f"eval: {err}") from None
    settings.check(f"eval ({task.name}): ")
    return settings


def check_run_settings(raw: dict[str, Any]) -> None:
    """The settings that are not per task, before anything is loaded or written."""
    if raw["source"] not in ("tsv", "hf"):
        raise UserError(f"eval.source must be tsv or hf, got {raw['source']!r}")
    if not isinstance(raw["output_dir"], str):
        raise UserError(f"eval.output_dir: expected a path, got {raw['output_dir']!r}")
    kind = (raw.get("logger") or {}).get("kind")
    if kind not in ("wandb", "none"):
        raise UserError(f"eval.logger.kind must be wandb or none, got {kind!r}")


def load_pretrained(checkpoint: str) -> tuple[TransformerLM, Any, int]:
    """The model, its tokenizer and the separator id (the tokenizer's EOS)."""
    from altup_cli.data.tokenizer import EOS
    from altup_cli.export import load, load_tokenizer

    model, _ = load(checkpoint)  # each raises a UserError for what it cannot read
    tokenizer = load_tokenizer(checkpoint)
    sep = tokenizer.token_to_id(EOS)
    if sep is None:
        raise UserError(f"{checkpoint}: its tokenizer has no {EOS} token to join sentence pairs")
    return model, tokenizer, sep


def load_data(task: Task, source: str, data_dir: str) -> tuple[Split, list[Split]]:
    if source == "tsv":
        return load_tsv_task(task, Path(data_dir).expanduser())
    return load_hf_task(task, data_dir)


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


def out_directory(out: str | None, output_dir: str, checkpoint: str) -> Path:
    if out is not None:
        path = Path(out).expanduser()
        if path.exists():
            raise UserError(f"--out {out} already exists (choose a new directory)")
        return path
    source = Path(checkpoint).expanduser().resolve()
    name = source.name if source.is_dir() else source.parent.parent.name or source.stem
    stamp = datetime.now().strftime("%Y-%m-%d_%H-%M-%S")
    path = Path(output_dir).expanduser() / "glue" / f"{stamp}_{name}"
    while path.exists():  # never reuse a directory
        path = path.with_name(path.name + "+")
    return path


def eval_glue(
    checkpoint: str, tasks_text: str, data_dir: str, overrides: list[str], out: str | None
) -> Path:
    raw = compose_settings(overrides)
    check_run_settings(raw)
    tasks = parse_tasks(tasks_text)
    per_task = {t.name: task_settings(raw, t) for t in tasks}
    model, tokenizer, sep = load_pretrained(checkpoint)
    limit, notes = model.config.max_seq_len, []
    for t, s in list(per_task.items()):
        if s.max_len <= limit:
            continue
        if {"max_len", f"tasks.{t}.max_len"} & set(raw["explicit"]):
            raise UserError(
                f"eval ({t}): max_len {s.max_len} exceeds the model's max_seq_len {limit}"
            )
        per_task[t] = replace(s, max_len=limit)
        notes.append(f"note: {t}: max_len {s.max_len} → {limit} (the model's max_seq_len)")
    data = {t.name: load_data(t, raw["source"], data_dir) for t in tasks}
    for t in tasks:
        train, devs = data[t.name]
        for split in (train, *devs):
            if not split.labels:
                raise UserError(f"{t.name}: {split.name} has no examples")
    run_dir = out_directory(out, raw["output_dir"], checkpoint)
    run_dir.mkdir(parents=True)
    write_text(run_dir / "config.yaml", OmegaConf.to_yaml(OmegaConf.create({"eval": raw})))
    say(f"[bold]altup eval glue[/bold] {checkpoint} → {run_dir}")
    for note in notes:
        say(note)
    logger = _logger(raw, run_dir)
    report: dict[str, Any] = {
        "checkpoint": str(checkpoint),
        "model": model.config.to_dict(),
        "data": {"source": raw["source"], "location": str(data_dir)},
        "argv": sys.argv,
        "convention": CONVENTION,
        "status": "running",
        "tasks": {},
    }
    for t in tasks:
        train, devs = data[t.name]
        report["tasks"][t.name] = finetune(
            model, t, per_task[t.name], train, devs, tokenizer, sep, logger
        )
        report.update(glue_scores(report["tasks"]))
        write_json(run_dir / "glue.json", report)
    diverged = {n: r["diverged"] for n, r in report["tasks"].items() if "diverged" in r}
    report["status"] = "diverged" if diverged else "finished"
    write_json(run_dir / "glue.json", report)
    print_report(report)
    if logger:
        _log_summary(logger, report)
    say(f"results: {run_dir / 'glue.json'}")
    if diverged:
        which = "; ".join(f"{name} ({why})" for name, why in diverged.items())
        raise TasksDiverged(
            f"fine-tuning diverged: {which}; marked so in {run_dir / 'glue.json'} "
            "(a lower eval.lr may help)"
        )
    return run_dir


def finetune(
    pretrained: TransformerLM, task: Task, s: GlueSettings, train: Split, devs: list[Split],
    tokenizer: Any, sep: int, logger: Any,
) -> dict[str, Any]:  # fmt: skip
    """Fine-tune a fresh copy of the pretrained model on one task; its report entry."""
    import lightning as L

    from altup_cli.training.glue import Diverged, GlueModule, encode, loader

    L.seed_everything(s.seed, workers=True, verbose=False)
    model = copy.deepcopy(pretrained)  # every task starts from the same weights
    train = subsample(train, s.max_train_examples, s.seed)
    steps = s.epochs * math.ceil(len(train.labels) / s.batch_size)
    settings = {f.name: getattr(s, f.name) for f in fields(GlueSettings)}
    module = GlueModule(model.train(), task, settings | {"line_progress": not _tty()}, steps)
    module.dev_names = [d.name for d in devs]
    train_loader = loader(encode(train, tokenizer, sep, s.max_len), train.labels,
                          s.batch_size, True, s.seed, sep)  # fmt: skip
    dev_loaders = [
        loader(encode(d, tokenizer, sep, s.max_len), d.labels, s.batch_size, False, 0, sep)
        for d in devs
    ]
    say(f"[bold]{task.name}[/bold]: {len(train.labels):,} train examples, "
        + ", ".join(f"{len(d.labels):,} {d.name}" for d in devs)
        + f"; {s.epochs} epochs, {steps:,} steps, lr {s.lr:g}, batch {s.batch_size}")  # fmt: skip
    start = time.perf_counter()
    trainer = _trainer(s, task, logger, len(train_loader))
    try:
        trainer.fit(module, train_loader, dev_loaders)
    except Diverged as err:
        say(f"[bold red]{task.name}: diverged[/bold red] ({err}); the task is stopped")
        return {"diverged": str(err)} | _entry(task, train, devs, module, trainer, start)
    history = module.history
    best = max(history, key=lambda h: h["score"]) if s.early_stopping else history[-1]
    metrics = {k: v for k, v in best.items() if k not in ("epoch", "score")}
    return {
        "metrics": metrics,
        "score": score(metrics),
        "reported_epoch": best["epoch"] + 1,
        "reported": "best dev epoch (early stopping)" if s.early_stopping else "last epoch",
    } | _entry(task, train, devs, module, trainer, start)


def _entry(
    task: Task, train: Split, devs: list[Split], module: Any, trainer: Any, start: float
) -> dict[str, Any]:
    """The part of a task's report entry that does not depend on how fine-tuning ended."""
    baseline = majority(task, train, devs)
    return {
        "majority": baseline,
        "majority_score": score(baseline),
        "epochs": module.history,
        "train_examples": len(train.labels),
        "dev_examples": {d.name: len(d.labels) for d in devs},
        "steps": trainer.global_step,
        "seconds": round(time.perf_counter() - start, 1),
        "settings": {k: v for k, v in module.settings.items() if k != "line_progress"},
    }


def _trainer(s: GlueSettings, task: Task, logger: Any, batches: int) -> Any:
    import lightning as L
    from lightning.pytorch.callbacks import EarlyStopping, RichProgressBar

    from altup_cli.training.run import _quiet_expected_warnings, drop_lightning_tips

    _quiet_expected_warnings()
    drop_lightning_tips()
    callbacks: list[L.Callback] = []
    if s.early_stopping:
        callbacks.append(EarlyStopping(f"glue/{task.name}/score", patience=s.patience, mode="max"))
    interactive = _tty()
    if interactive:
        callbacks.append(RichProgressBar())
    gpu = s.accelerator in ("gpu", "cuda") or (
        s.accelerator == "auto" and torch.cuda.is_available()
    )
    return L.Trainer(
        max_epochs=s.epochs,
        accelerator=s.accelerator,
        devices=1,
        precision="bf16-mixed" if gpu else "32-true",
        gradient_clip_val=s.grad_clip or None,
        num_sanity_val_steps=0,
        log_every_n_steps=max(1, min(10, batches)),
        logger=logger,
        callbacks=callbacks,
        enable_checkpointing=False,
        enable_progress_bar=interactive,
        enable_model_summary=False,
        default_root_dir=None,
    )


def _tty() -> bool:
    return sys.stderr.isatty()


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


def print_report(report: dict[str, Any]) -> None:
    from rich.table import Table

    table = Table(title=f"GLUE dev — {report['checkpoint']}")
    for header in ("task", "metric", "model", "majority class", "train", "epoch", "time"):
        table.add_column(header, justify="left" if header in ("task", "metric") else "right")
    for name, r in report["tasks"].items():
        if "diverged" in r:
            table.add_row(name, "[bold red]diverged[/bold red]", "—",
                          f"{r['majority_score']:.2f}", f"{r['train_examples']:,}", "",
                          f"{r['seconds']:.0f}s")  # fmt: skip
            continue
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
    table.add_section()
    table.add_row("GLUE", "score", _number(report["glue_score"]),
                  _number(report["majority_glue_score"]), "", "", "")  # fmt: skip
    if "glue_score_without_wnli" in report:
        table.add_row("GLUE", "without WNLI", f"{report['glue_score_without_wnli']:.2f}",
                      "", "", "", "")  # fmt: skip
    console.print(table)
    say(f"[dim]{report['convention']}[/dim]")


def _number(value: float | None) -> str:
    return "—" if value is None else f"{value:.2f}"


def _logger(raw: dict[str, Any], run_dir: Path) -> Any:
    log = raw["logger"]
    if log["kind"] == "none":
        return False
    from lightning.pytorch.loggers import WandbLogger

    os.environ.setdefault("WANDB_SILENT", "true")
    logger = WandbLogger(
        project=log["project"], entity=log["entity"], group=log["group"], name=run_dir.name,
        save_dir=str(run_dir), mode=log["mode"], job_type="eval-glue",
    )  # fmt: skip
    logger.log_hyperparams({"eval": raw})
    return logger


def _log_summary(logger: Any, report: dict[str, Any]) -> None:
    """Final numbers into the W&B summary (and a table), then close the run."""
    import wandb

    run = logger.experiment
    rows = []
    for name, r in report["tasks"].items():
        if "diverged" in r:
            run.summary[f"glue/{name}/diverged"] = r["diverged"]
            continue
        for metric, value in r["metrics"].items():
            run.summary[f"glue/{name}/{metric}"] = value
            rows.append([name, metric, value, r["majority"][metric]])
        run.summary[f"glue/{name}/final_score"] = r["score"]
    for key in ("glue_score", "glue_score_without_wnli", "majority_glue_score"):
        if report.get(key) is not None:
            run.summary[f"glue/{key}"] = report[key]
    run.summary["glue/convention"] = report["convention"]
    run.log({"glue/results": wandb.Table(["task", "metric", "model", "majority"], rows)})
    wandb.finish()
