"""Token streams on disk, packed fixed-length sequences, a deterministic split and sampler.

The corpus is tokenized once into a flat memory-mapped array (documents separated by EOS)
whose cache key is (corpus fingerprint, tokenizer file hash). Sequence i is the window
tokens[i·L : i·L + L + 1] (inputs and shifted targets). The split and the training order
are pure functions of the seed, so the batch at any optimizer step can be recomputed; that
is what makes resuming identical to an uninterrupted run.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tokenizers import Tokenizer
from torch.utils.data import Dataset, Sampler

from altup_cli.console import progress, say
from altup_cli.data.corpora import Corpus, sha256_file


@dataclass
class TokenStream:
    path: Path
    n_tokens: int
    dtype: str
    vocab_size: int
    eos_id: int
    unigram_entropy: float  # nats per token of the whole stream

    def array(self) -> np.memmap:
        return np.memmap(self.path, dtype=self.dtype, mode="r", shape=(self.n_tokens,))


def tokenize_corpus(
    corpus: Corpus, tokenizer: Tokenizer, tokenizer_path: Path, eos_id: int, cache_dir: Path
) -> TokenStream:
    """Tokenize every document once (cached), EOS after each, into a flat uint16/uint32 file."""
    key = f"{corpus.fingerprint}-{sha256_file(tokenizer_path)[:16]}"
    out_dir = cache_dir / "tokens" / key
    meta_path = out_dir / "meta.json"
    if meta_path.exists():
        say(f"[dim]reusing cached tokens {key}[/dim]")
        return _read_meta(meta_path)
    vocab_size = tokenizer.get_vocab_size()
    dtype = "uint16" if vocab_size <= np.iinfo(np.uint16).max + 1 else "uint32"
    out_dir.mkdir(parents=True, exist_ok=True)
    counts = np.zeros(vocab_size, dtype=np.int64)
    n_tokens = 0
    tmp = out_dir / "tokens.bin.tmp"
    batch = 64
    with open(tmp, "wb") as f, progress() as bar:
        task = bar.add_task("tokenizing", total=len(corpus.documents))
        for start in range(0, len(corpus.documents), batch):
            docs = corpus.documents[start : start + batch]
            for enc in tokenizer.encode_batch(docs, add_special_tokens=False):
                ids = np.asarray([*enc.ids, eos_id], dtype=dtype)
                counts += np.bincount(ids, minlength=vocab_size)
                ids.tofile(f)
                n_tokens += len(ids)
            bar.advance(task, len(docs))
    tmp.replace(out_dir / "tokens.bin")
    p = counts[counts > 0] / n_tokens
    stream = TokenStream(
        out_dir / "tokens.bin", n_tokens, dtype, vocab_size, eos_id, float(-(p * np.log(p)).sum())
    )
    meta = {k: v for k, v in stream.__dict__.items() if k != "path"}
    meta_path.write_text(json.dumps(meta, indent=2))
    say(f"tokenized {len(corpus.documents)} documents into {n_tokens:,} tokens")
    return stream


def _read_meta(meta_path: Path) -> TokenStream:
    meta = json.loads(meta_path.read_text())
    return TokenStream(path=meta_path.parent / "tokens.bin", **meta)


class PackedSequences(Dataset):
    """Non-overlapping windows of seq_len + 1 tokens over a token stream."""

    def __init__(self, stream: TokenStream, seq_len: int) -> None:
        self.stream, self.seq_len = stream, seq_len
        self.tokens = stream.array()

    def __len__(self) -> int:
        return max(0, (self.stream.n_tokens - 1) // self.seq_len)

    def __getitem__(self, i: int) -> torch.Tensor:
        window = self.tokens[i * self.seq_len : i * self.seq_len + self.seq_len + 1]
        return torch.from_numpy(window.astype(np.int64))


def split_indices(n: int, val_fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """(train, val) sequence indices: a seeded random subset of `val_fraction` is held out."""
    n_val = max(1, round(n * val_fraction)) if val_fraction > 0 else 0
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    return sorted(order[n_val:]), sorted(order[:n_val])


class StepBatchSampler(Sampler[list[int]]):
    """Micro-batch b of rank r is a pure function of (seed, b, r): an endless sequence of
    seeded permutations of the training indices, cut into global batches of
    batch_size × world_size and sharded by rank. Iteration starts at `start_batch`."""

    def __init__(
        self,
        indices: list[int],
        batch_size: int,
        total_batches: int,
        seed: int,
        rank: int = 0,
        world_size: int = 1,
        start_batch: int = 0,
    ) -> None:
        self.indices, self.batch_size = indices, batch_size
        self.total_batches, self.seed = total_batches, seed
        self.rank, self.world_size, self.start_batch = rank, world_size, start_batch
        self._epoch, self._perm = -1, list[int]()

    def __len__(self) -> int:
        return self.total_batches

    def _at(self, position: int) -> int:
        epoch, offset = divmod(position, len(self.indices))
        if epoch != self._epoch:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._perm, self._epoch = torch.randperm(len(self.indices), generator=g).tolist(), epoch
        return self.indices[self._perm[offset]]

    def batch(self, b: int) -> list[int]:
        first = (b * self.world_size + self.rank) * self.batch_size
        return [self._at(first + i) for i in range(self.batch_size)]

    def __iter__(self) -> Iterator[list[int]]:
        for b in range(self.start_batch, self.total_batches):
            yield self.batch(b)


def epochs_covered(n_train: int, batch_size: int, world_size: int, total_batches: int) -> float:
    return total_batches * batch_size * world_size / max(1, n_train)
