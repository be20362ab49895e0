"""What `altup eval ppl` scores: a corpus named on the command line, turned into segments
(see `evaluation/scoring.py`) under the rule that a model is never scored on the
sequences it trained on.

- An embedded corpus (`shakespeare`, `bible`, `wiki`) is tokenized with the model's
  tokenizer into the stream training would use (cached), cut into training's packed
  sequences (the run's `data.seq_len`), and the run's seeded held-out share of them
  (`data.val_fraction`, `run.data_seed`) is scored: each maximal run of consecutive
  held-out sequences is one segment. That is exactly the validation split of a run
  trained on it, so models trained on different corpora are scored on the same text.
- The run's own training corpus (embedded, `text:` or `hf:`, recognised from the run's
  config) is scored on its held-out split only; `--split all` on it is refused.
- Other local text (`text:PATH`: a file, a directory or a glob; one document per file or
  per non-blank line) and Hugging Face datasets (`hf:NAME[:CONFIG][@SPLIT]`, a saved
  directory or a hub name) are scored whole, each document after an EOS.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from altup_cli.config.schema import DataSettings, read_section
from altup_cli.data.corpora import (
    EMBEDDED_CORPORA,
    Corpus,
    load_embedded,
    load_hf_dataset,
    load_text_files,
    text_file_paths,
)
from altup_cli.errors import UserError, first_line

SPLITS = ("val", "all")
FORMATS = ("file", "line")
BLOCK = 1 << 20  # characters read at a time from a text file


@dataclass(frozen=True)
class Source:
    """One corpus as named on the command line."""

    kind: str  # embedded | text | hf
    name: str  # corpus name, path or dataset
    config: str | None = None  # hf: dataset config
    split: str | None = None  # hf: split

    @property
    def label(self) -> str:
        if self.kind == "embedded":
            return self.name
        config = f":{self.config}" if self.config else ""
        return f"{self.kind}:{self.name}{config}" + (f"@{self.split}" if self.split else "")


    @property
    def slug(self) -> str:
        """A short metric-key name: the corpus, the file's stem, the dataset's last part."""
        if self.kind == "embedded":
            return self.name
        stem = Path(self.name.rstrip("/")).stem if self.kind == "text" else self.name.split("/")[-1]
        return re.sub(r"[^A-Za-z0-9_.-]+", "_", f"{self.kind}_{stem}")


def parse_source(text: str) -> Source:
    """`shakespeare`, `text:PATH`, `hf:NAME[:CONFIG][@SPLIT]`."""
    if text.startswith("text:"):
        path = text.removeprefix("text:")
        if not path:
            raise UserError("--data text: needs a path (text:FILE, text:DIR or text:GLOB)")
        return Source("text", path)
    if text.startswith("hf:"):
        rest, _, split = text.removeprefix("hf:").partition("@")
        name, _, config = rest.partition(":")
        if not name:
            raise UserError("--data hf: needs a dataset (hf:NAME[:CONFIG][@SPLIT])")
        return Source("hf", name, config or None, split or None)
    if text not in EMBEDDED_CORPORA:
        known = ", ".join(EMBEDDED_CORPORA)
        raise UserError(
            f"--data {text!r}: not an embedded corpus ({known}); local text is text:PATH, "
            "a dataset hf:NAME"
        )
    return Source("embedded", text)


@dataclass(frozen=True)
class TrainingData:
    """How the model's run read and split its data (from the run's recorded config)."""

    data: DataSettings
    seed: int  # the split's seed: run.data_seed, else run.seed

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> TrainingData:
        run = config.get("run") or {}
        seed = run.get("data_seed")
        return cls(read_section(DataSettings, config["data"], "data"),
                   int(run.get("seed", 0) if seed is None else seed))  # fmt: skip

    def trained_on(self, source: Source) -> bool:
        d = self.data
        if source.kind != d.source:
            return False
        if source.kind == "embedded":
            return source.name == d.name
        if source.kind == "text":
            return _same_path(source.name, d.path or "")
        return (source.name, source.config, source.split or "train") == (d.name, d.subset, d.split)

    def corpus(self, cache: Path) -> Corpus:
        """The run's training corpus, read as training read it."""
        d = self.data
        if d.source == "embedded":
            return load_embedded(d.name or "", cache)
        if d.source == "text":
            return load_text_files(d.path or "", d.encoding)
        return load_hf_dataset(d.name or "", d.split, d.text_field, d.subset)


def _same_path(a: str, b: str) -> bool:
    try:
        return Path(a).expanduser().resolve() == Path(b).expanduser().resolve()
    except OSError:
        return False


def training_data(checkpoint: str) -> TrainingData | None:
    """The run config a run directory, its export or a checkpoint records (None: none)."""
    from altup_cli.runs.checkpoint import LAST, read_checkpoint

    path = Path(checkpoint).expanduser()
    if path.suffix == ".ckpt":
        return TrainingData.from_config(read_checkpoint(path)["altup"]["config"])
    for ckpt in (path / LAST, path.parent / LAST):
        if path.is_dir() and ckpt.is_file():
            return TrainingData.from_config(read_checkpoint(ckpt)["altup"]["config"])
    return None


def tokenizer_file(checkpoint: str) -> Path:
    """The tokenizer.json saved with a run, export or checkpoint."""
    path = Path(checkpoint).expanduser()
    for candidate in (path / "export" / "tokenizer.json", path / "tokenizer.json",
                      path.parent / "tokenizer.json",
                      path.parent.parent / "export" / "tokenizer.json"):  # fmt: skip
        if candidate.is_file():
            return candidate
    raise UserError(f"{checkpoint}: no tokenizer.json saved there")


def heldout_segments(tokens: np.ndarray, seq_len: int, val: list[int]) -> Iterator[np.ndarray]:
    """Each maximal run of consecutive held-out sequences (sequence i is the window
    tokens[i·L : i·L + L + 1]) as one segment."""
    run_start = prev = None
    for i in [*val, None]:
        if i is not None and prev is not None and i == prev + 1:
            prev = i
            continue
        if run_start is not None:
            yield np.asarray(tokens[run_start * seq_len : (prev + 1) * seq_len + 1])  # type: ignore[operator]
        run_start = prev = i


def text_files(pattern: str) -> list[Path]:
    """A file, every file below a directory, or a glob's files; refused when none has text."""
    files = text_file_paths(pattern)
    if not files:
        raise UserError(f"text:{pattern}: no such file, directory or glob")
    if not any(_has_text(f) for f in files):
        raise UserError(f"text:{pattern}: empty (no text to score)")
    return files


def _has_text(path: Path) -> bool:
    try:
        with open(path, "rb") as handle:
            while block := handle.read(1 << 16):
                if block.strip():
                    return True
    except OSError as err:
        raise UserError(f"cannot read {path}: {first_line(err)}") from None
    return False


def read_blocks(path: Path, encoding: str = "utf-8") -> Iterator[str]:
    """A text file in pieces of about BLOCK characters, each cut after a newline that a
    non-space character precedes and follows, where byte-level BPE pre-tokenization splits
    anyway: tokenizing the pieces one by one gives the whole file's tokens."""
    carry = ""
    try:
        with open(path, encoding=encoding, newline="") as handle:
            while block := handle.read(BLOCK):
                text = carry + block
                cut = _last_cut(text)
                yield text[:cut]
                carry = text[cut:]
    except UnicodeDecodeError as err:
        raise UserError(f"cannot decode {path} as {encoding}: {err.reason}") from None
    if carry:
        yield carry


def _last_cut(text: str) -> int:
    i = text.rfind("\n", 0, len(text) - 1)
    while i > 0:
        if not text[i - 1].isspace() and not text[i + 1].isspace():
            return i + 1
        i = text.rfind("\n", 0, i)
    return 0


def hf_texts(source: Source, text_field: str) -> Any:
    """A dataset's text column (a saved directory or a hub name), checked to have text."""
    try:
        import datasets
    except ImportError:
        raise UserError("hf: corpora need `datasets`: pip install 'altup[hf]'") from None
    local = Path(source.name).expanduser()
    try:
        if local.exists():
            loaded = datasets.load_from_disk(str(local))
            if isinstance(loaded, datasets.DatasetDict):
                loaded = loaded[_pick_split(source, list(loaded))]
        else:
            loaded = datasets.load_dataset(source.name, source.config,
                                           split=source.split or "validation")  # fmt: skip
    except UserError:
        raise
    except Exception as err:  # datasets raises many types; all mean "cannot load this"
        raise UserError(f"{source.label}: cannot load it: {first_line(err)}") from None
    if text_field not in loaded.column_names:
        raise UserError(f"{source.label}: no column {text_field!r} (has {loaded.column_names}; "
                        "eval.text_field=… picks one)")  # fmt: skip
    if not any(t and t.strip() for t in loaded[text_field]):
        raise UserError(f"{source.label}: empty (no text to score)")
    return loaded[text_field]


def _pick_split(source: Source, splits: list[str]) -> str:
    if source.split is not None:
        if source.split not in splits:
            raise UserError(f"{source.label}: no split {source.split!r} (has {splits})")
        return source.split
    for name in ("validation", "test"):
        if name in splits:
            return name
    if len(splits) == 1:
        return splits[0]
    raise UserError(f"{source.label}: name a split with @SPLIT (has {splits})")
