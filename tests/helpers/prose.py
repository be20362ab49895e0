"""A deterministic English-like corpus and the overrides of a run small enough for a few
seconds of CPU."""

from __future__ import annotations

import random
from pathlib import Path

SUBJECTS = [
    "the old king",
    "a young sailor",
    "my gentle friend",
    "the weary soldier",
    "her brother",
    "the merchant",
    "this noble lady",
    "the quiet scholar",
]
VERBS = [
    "speaks of",
    "remembers",
    "walks toward",
    "forgets",
    "praises",
    "fears",
    "writes to",
    "dreams of",
]
OBJECTS = [
    "the distant sea",
    "a broken promise",
    "the winter garden",
    "his father's house",
    "the silver crown",
    "an honest word",
    "the morning light",
    "the empty road",
]
TAILS = [
    "and says nothing.",
    "before the night is done.",
    "with a heavy heart.",
    "as the bells ring.",
    "while the rain falls.",
    "and then departs.",
]


def make_prose(n_paragraphs: int, seed: int = 0) -> list[str]:
    """Deterministic English-like paragraphs with real structure for a model to learn."""
    rng = random.Random(seed)
    paragraphs = []
    for _ in range(n_paragraphs):
        sentences = [
            f"{rng.choice(SUBJECTS).capitalize()} {rng.choice(VERBS)} "
            f"{rng.choice(OBJECTS)} {rng.choice(TAILS)}"
            for _ in range(rng.randint(3, 7))
        ]
        paragraphs.append(" ".join(sentences))
    return paragraphs


def tiny_overrides(corpus: Path, cache: Path, outputs: Path, steps: int = 6) -> list[str]:
    """A model and run small enough for a few seconds of CPU."""
    return [
        "model.d_model=32",
        "model.n_layers=2",
        "model.n_heads=2",
        "model.d_ff=64",
        "model.max_seq_len=64",
        "data=text",
        f"data.path={corpus}",
        "data.seq_len=32",
        "data.batch_size=4",
        "tokenizer.vocab_size=300",
        f"trainer.max_steps={steps}",
        "trainer.val_check_interval=3",
        "trainer.limit_val_batches=2",
        "trainer.log_every_n_steps=1",
        "optim.warmup_steps=2",
        f"run.cache_dir={cache}",
        f"run.output_dir={outputs}",
        "run.name=t",
    ]
