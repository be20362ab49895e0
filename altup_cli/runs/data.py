"""What a run trains on: corpus → tokenizer → token stream, each step cached under
`run.cache_dir` and prepared by one process at a time."""

from __future__ import annotations

import fcntl
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from altup_cli.config import Settings
from altup_cli.data.corpora import Corpus, load_embedded, load_hf_dataset, load_text_files
from altup_cli.data.tokenizer import load_tokenizer, tokenizer_from_files, trained_tokenizer
from altup_cli.data.tokens import TokenStream, tokenize_corpus
from altup_cli.errors import UserError


@dataclass
class PreparedData:
    stream: TokenStream
    tokenizer_path: Path
    description: str


def load_corpus(s: Settings) -> Corpus:
    d, cache = s.data, Path(s.run.cache_dir).expanduser()
    if d.source == "embedded":
        return load_embedded(d.name or "", cache)
    if d.source == "text":
        return load_text_files(d.path or "", d.encoding)
    return load_hf_dataset(d.name or "", d.split, d.text_field, d.subset)


@contextmanager
def cache_lock(cache: Path) -> Iterator[None]:
    """Serialise data preparation between processes sharing a cache (torchrun / srun start
    every rank at once): the first prepares, the others then find everything cached."""
    cache.mkdir(parents=True, exist_ok=True)
    with open(cache / ".lock", "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def prepare_data(s: Settings) -> PreparedData:
    """Corpus → tokenizer → token stream, each step cached under run.cache_dir."""
    cache = Path(s.run.cache_dir).expanduser()
    with cache_lock(cache):
        return _prepare_data(s, cache)


def _prepare_data(s: Settings, cache: Path) -> PreparedData:
    corpus = load_corpus(s)
    if not any(doc.strip() for doc in corpus.documents):
        raise UserError("data: the corpus contains no text")
    tok = s.tokenizer
    if tok.kind == "bpe":
        tokenizer_path = trained_tokenizer(
            corpus, tok.vocab_size or 0, tok.min_frequency or 2, cache
        )
    else:
        tokenizer_path = tokenizer_from_files(tok.path or "", cache)
    tokenizer, eos = load_tokenizer(tokenizer_path)
    stream = tokenize_corpus(corpus, tokenizer, tokenizer_path, eos, cache)
    return PreparedData(stream, tokenizer_path, corpus.description)
