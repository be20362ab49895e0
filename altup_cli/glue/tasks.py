"""The nine GLUE tasks (Wang et al. 2019) and readers for their data: the original TSV
layout (`<TASK>/train.tsv`, `dev.tsv`, MNLI `dev_matched.tsv` / `dev_mismatched.tsv`) read
exactly as the real files are — CoLA without a header, MRPC with a byte-order mark, quotes
inside sentences taken literally (no CSV quoting) — or a Hugging Face `datasets` copy.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from altup_cli.errors import UserError, first_line


@dataclass(frozen=True)
class Task:
    name: str
    folder: str
    text: tuple[str | int, ...]  # column names (or indices when the file has no header)
    label: str | int
    labels: tuple[str, ...] | None  # None: regression (STS-B)
    metrics: tuple[str, ...]
    header: bool = True
    dev: tuple[str, ...] = ("dev",)
    hf_text: tuple[str, ...] = ("sentence1", "sentence2")
    hf_dev: tuple[str, ...] = ("validation",)

    @property
    def regression(self) -> bool:
        return self.labels is None


TASKS = {
    t.name: t
    for t in (
        Task("cola", "CoLA", (3,), 1, ("0", "1"), ("mcc",), header=False, hf_text=("sentence",)),
        Task("sst2", "SST-2", ("sentence",), "label", ("0", "1"), ("accuracy",),
             hf_text=("sentence",)),
        Task("mrpc", "MRPC", ("#1 String", "#2 String"), "Quality", ("0", "1"),
             ("f1", "accuracy")),
        Task("stsb", "STS-B", ("sentence1", "sentence2"), "score", None, ("pearson", "spearman")),
        Task("qqp", "QQP", ("question1", "question2"), "is_duplicate", ("0", "1"),
             ("f1", "accuracy"), hf_text=("question1", "question2")),
        Task("mnli", "MNLI", ("sentence1", "sentence2"), "gold_label",
             ("entailment", "neutral", "contradiction"), ("accuracy",),
             dev=("dev_matched", "dev_mismatched"), hf_text=("premise", "hypothesis"),
             hf_dev=("validation_matched", "validation_mismatched")),
        Task("qnli", "QNLI", ("question", "sentence"), "label", ("entailment", "not_entailment"),
             ("accuracy",), hf_text=("question", "sentence")),
        Task("rte", "RTE", ("sentence1", "sentence2"), "label", ("entailment", "not_entailment"),
             ("accuracy",)),
        Task("wnli", "WNLI", ("sentence1", "sentence2"), "label", ("0", "1"), ("accuracy",)),
    )
}  # fmt: skip


@dataclass
class Split:
    """Texts (one or two per example) and labels: class indices, or floats (STS-B)."""

    name: str
    texts: list[tuple[str, ...]]
    labels: list[Any]


def parse_tasks(text: str) -> list[Task]:
    names = list(TASKS) if text.strip() == "all" else [t.strip() for t in text.split(",")]
    unknown = [n for n in names if n not in TASKS]
    if unknown or not names:
        raise UserError(f"unknown GLUE task {unknown[0] if unknown else text!r} "
                        f"(known: {', '.join(TASKS)}, or all)")  # fmt: skip
    return [TASKS[n] for n in names]


def read_tsv(path: Path, task: Task) -> Split:
    """One TSV file of `task`, taken as it comes: BOM stripped, no quoting, a missing final
    newline tolerated; rows too short for the needed columns are skipped (QQP has some)."""
    if not path.is_file():
        raise UserError(
            f"{task.name}: {path} is missing (get GLUE with the well-known download_glue_data.py, "
            f"or pass --data-dir DIR holding {task.folder}/{path.name})"
        )
    lines = _text(path).split("\n")
    rows = [line.rstrip("\r").split("\t") for line in lines if line.strip()]
    if not rows:
        raise UserError(f"{path} is empty (a {task.name} file has a row per example)")
    header = rows.pop(0) if task.header else []

    def column(key: str | int) -> int:
        if isinstance(key, int):
            return key
        if key not in header:
            raise UserError(f"{path}: no column {key!r} in its header ({', '.join(header)})")
        return header.index(key)

    text_cols = [column(k) for k in task.text]
    label_col = column(task.label)
    needed = max([*text_cols, label_col]) + 1
    texts, labels = [], []
    for number, row in enumerate(rows, start=2 if task.header else 1):
        if len(row) < needed:
            continue
        texts.append(tuple(row[c] for c in text_cols))
        labels.append(_label(row[label_col], task, path, number))
    return Split(path.stem, texts, labels)


def _text(path: Path) -> str:
    """The file as text (a BOM dropped), or a UserError naming the first line that is not UTF-8."""
    try:
        data = path.read_bytes()
    except OSError as err:
        raise UserError(f"cannot read {path}: {err.strerror or first_line(err)}") from None
    data = data.removeprefix(b"\xef\xbb\xbf")  # MRPC's files start with a BOM
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        line = data[: err.start].count(b"\n") + 1
        raise UserError(
            f"{path}:{line}: not UTF-8 text (byte {data[err.start]:#04x}; GLUE's files are UTF-8)"
        ) from None


def _score(value: Any, where: str) -> float:
    """An STS-B similarity score: a finite number."""
    try:
        score = float(value)
    except (TypeError, ValueError):
        raise UserError(f"{where}: score {value!r} is not a number") from None
    if not math.isfinite(score):
        raise UserError(f"{where}: score {value!r} is not a finite number")
    return score


def _label(value: str, task: Task, path: Path, line: int) -> Any:
    if task.labels is None:
        return _score(value, f"{path}:{line}")
    if value not in task.labels:
        raise UserError(
            f"{path}:{line}: label {value!r} is not one of {task.name}'s labels "
            f"({', '.join(task.labels)})"
        )
    return task.labels.index(value)


def load_tsv_task(task: Task, data_dir: Path) -> tuple[Split, list[Split]]:
    """(train, [dev splits]) of a task from the original layout."""
    folder = data_dir / task.folder
    if not folder.is_dir():
        raise UserError(
            f"{task.name}: no {folder} (expected the GLUE layout {task.folder}/train.tsv, "
            f"{'/'.join(d + '.tsv' for d in task.dev)}; download_glue_data.py writes it)"
        )
    train = read_tsv(folder / "train.tsv", task)
    return train, [read_tsv(folder / f"{name}.tsv", task) for name in task.dev]


def load_hf_task(task: Task, source: str) -> tuple[Split, list[Split]]:
    """(train, [dev splits]) from a dataset saved with `save_to_disk` (a DatasetDict of one
    task, or of all tasks as `<dir>/<task>`), or `nyu-mll/glue` from the hub (network)."""
    try:
        import datasets
    except ImportError:
        raise UserError("--source hf needs the datasets package: pip install 'altup[hf]'") from None
    data = _hf_dataset(datasets, task, source)
    missing = [s for s in ("train", *task.hf_dev) if s not in data]
    if missing:
        raise UserError(f"{task.name}: the dataset at {source} has no split {missing[0]!r}")

    def split(name: str) -> Split:
        rows = data[name]
        names = rows.features["label"].names if task.labels is not None else None
        labels = []
        for value in rows["label"]:
            if names is None:
                labels.append(_score(value, f"{task.name}/{name}"))
                continue
            if not 0 <= value < len(names):
                raise UserError(f"{task.name}/{name}: label {value} outside the task's labels")
            # Named classes map by name (MNLI, QNLI, RTE); binary ones keep the hub's 0/1
            # (`acceptable`, `positive`, `equivalent`, `duplicate`, WNLI's `entailment` = 1).
            named = names[value] in task.labels  # type: ignore[operator]
            labels.append(task.labels.index(names[value]) if named else value)  # type: ignore[union-attr]
        texts = list(zip(*(rows[c] for c in task.hf_text), strict=True))
        return Split(name, texts, labels)

    return split("train"), [split(name) for name in task.hf_dev]


def _hf_dataset(datasets: Any, task: Task, source: str) -> Any:
    """The task's DatasetDict from a `save_to_disk` directory or the hub; a UserError when
    `datasets` cannot load it (no network, no such dataset, a damaged copy)."""
    path = Path(source).expanduser()
    try:
        if path.is_dir():
            where = path / task.name if (path / task.name).is_dir() else path
            return datasets.load_from_disk(str(where))
        return datasets.load_dataset(source, task.name)
    except Exception as err:  # datasets raises almost anything (ConnectionError offline)
        hint = "" if path.is_dir() else " (a hub name needs the network, or a cached copy)"
        raise UserError(
            f"cannot load {task.name} from {source} with datasets{hint}: {first_line(err)}"
        ) from None
