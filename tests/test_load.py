"""`altup_cli.load` and `load_tokenizer` on damaged or foreign exports: the project's one
error type (UserError) with a one-line message naming the file, never a library's error."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from altup_cli.errors import UserError
from altup_cli.models.config import ModelConfig
from altup_cli.models.transformer import TransformerLM
from altup_cli.runs.export import load, load_tokenizer, save_export

TINY = ModelConfig(vocab_size=32, d_model=8, n_layers=1, n_heads=2, d_ff=16, max_seq_len=16)


@pytest.fixture
def export(tmp_path: Path) -> Path:
    from tokenizers import Tokenizer, models

    vocab = {f"t{i}": i for i in range(TINY.vocab_size)}
    tokenizer = tmp_path / "tokenizer.json"
    Tokenizer(models.WordLevel(vocab, unk_token="t0")).save(str(tokenizer))
    torch.manual_seed(0)
    return save_export(TransformerLM(TINY), tmp_path / "export", tokenizer)


def halve(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def set_config(edit: Callable[[dict], object]) -> Callable[[Path], None]:
    def apply(path: Path) -> None:
        path.write_text(json.dumps(edit(json.loads(path.read_text()))))

    return apply


def with_model(**changes: object) -> Callable[[dict], dict]:
    return lambda meta: {**meta, "model": {**meta["model"], **changes}}


DAMAGE: dict[str, tuple[str, Callable[[Path], None], str]] = {
    "weights-cut": ("model.safetensors", halve, "model.safetensors"),
    "weights-garbage": ("model.safetensors", lambda p: p.write_bytes(b"\xff" * 64),
                        "model.safetensors"),
    "weights-empty": ("model.safetensors", lambda p: p.write_bytes(b""), "model.safetensors"),
    "config-cut": ("config.json", halve, "config.json"),
    "config-not-utf8": ("config.json", lambda p: p.write_bytes(b"\xff\xfe{}"), "config.json"),
    "config-list": ("config.json", lambda p: p.write_text("[1, 2]"), "is not an altup export"),
    "config-no-model": ("config.json", set_config(lambda m: {"format": m["format"]}),
                        "config.json"),
    "config-model-list": ("config.json", set_config(lambda m: {**m, "model": [1]}),
                          "config.json"),
    "config-unknown-key": ("config.json", set_config(with_model(colour="red")), "colour"),
    "config-bad-type": ("config.json", set_config(with_model(d_model="wide")), "config.json"),
    "config-other-shape": ("config.json", set_config(with_model(d_model=16)),
                           "model.safetensors"),
}  # fmt: skip


@pytest.mark.parametrize("case", DAMAGE)
def test_a_damaged_export_is_one_user_error(case: str, export: Path) -> None:
    file, damage, message = DAMAGE[case]
    damage(export / file)
    with pytest.raises(UserError) as caught:
        load(export)
    text = str(caught.value)
    assert message in text and len(text.splitlines()) == 1, text


@pytest.mark.parametrize("damage", [halve, lambda p: p.write_bytes(b"\xff\x00" * 40)],
                         ids=["cut", "garbage"])  # fmt: skip
def test_a_damaged_tokenizer_is_one_user_error(damage, export: Path) -> None:
    damage(export / "tokenizer.json")
    with pytest.raises(UserError) as caught:
        load_tokenizer(export)
    text = str(caught.value)
    assert "tokenizer.json" in text and len(text.splitlines()) == 1, text


def test_an_intact_export_loads_back(export: Path) -> None:
    model, config = load(export)
    assert config == TINY and not model.training
    assert load_tokenizer(export).get_vocab_size() == TINY.vocab_size


def test_loading_a_model_needs_no_lightning_hydra_or_wandb(export: Path) -> None:
    """The package API is plain PyTorch: importing it and loading an export or a checkpoint
    (run directories and the checkpoint format live in altup_cli.runs) imports none of the
    training stack."""
    import subprocess
    import sys

    code = (
        "import sys, altup_cli; altup_cli.load(sys.argv[1]); altup_cli.load_tokenizer(sys.argv[1]);"
        "import altup_cli.runs.checkpoint, altup_cli.runs.rundir;"
        "print(sorted({m.split('.')[0] for m in sys.modules}"
        " & {'lightning', 'hydra', 'omegaconf', 'wandb', 'typer'}))"
    )
    done = subprocess.run(
        [sys.executable, "-c", code, str(export)], capture_output=True, text=True, check=True
    )
    assert done.stdout.strip() == "[]"
