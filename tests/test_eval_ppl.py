"""`altup eval ppl`: perplexity equal to an explicit window loop, every token scored once,
bits per byte by hand, the training split never scored, one table for several corpora,
and bad input refused in one line with nothing written."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from altup_cli.data.tokens import split_indices
from altup_cli.evaluation.heldout import heldout_segments
from altup_cli.evaluation.scoring import windows
from altup_cli.runs.export import load, load_tokenizer
from tests.helpers.prose import make_prose, tiny_overrides
from tests.test_train import _run_dir

# Non-ASCII on purpose: bytes differ from characters.
DOCUMENT = " ".join(make_prose(6, seed=3)) + " Café — naïve façade, ½ ∞."


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory: pytest.TempPathFactory, corpus_dir: Path, cache_dir: Path) -> Path:
    from typer.testing import CliRunner

    from altup_cli.cli import app

    out = tmp_path_factory.mktemp("pretrained")
    args = [*tiny_overrides(corpus_dir, cache_dir, out, steps=4), "logger=none"]
    result = CliRunner().invoke(app, ["train", *args])
    assert result.exit_code == 0, result.output
    return _run_dir(out)


@pytest.fixture(scope="module")
def texts(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("texts")
    (root / "doc.txt").write_text(DOCUMENT, encoding="utf-8")
    (root / "lines.txt").write_text("\n".join(make_prose(5, seed=9)) + "\n\n  \n")
    (root / "empty.txt").write_text("")
    (root / "blank.txt").write_text(" \n\n")
    return root


def ppl(altup, run: Path, out: Path, *args: str) -> dict:
    result = altup("eval", "ppl", str(run), *args, "eval.logger.kind=none", "--out", str(out))
    assert result.code == 0, result.stderr
    return json.loads((out / "ppl.json").read_text())


def explicit_loop(model: torch.nn.Module, ids: list[int], context: int, stride: int) -> tuple:
    """The reference: windows [begin, begin + C) every `stride` tokens, each scoring the
    targets after the previous window's end, one plain forward per window."""
    n = len(ids) - 1
    total, count, reached = 0.0, 0, 0
    with torch.no_grad():
        for begin in range(0, n, stride):
            end = min(begin + context, n)
            x = torch.tensor([ids[begin:end]])
            y = torch.tensor(ids[begin + 1 : end + 1])
            logp = F.log_softmax(model(x)[0].double(), dim=-1)
            losses = -logp[torch.arange(len(y)), y]
            total += float(losses[reached - end :].sum())
            count += end - reached
            reached = end
            if end == n:
                break
    return total, count


@pytest.mark.parametrize("stride", [64, 16, 1])
def test_perplexity_equals_an_explicit_window_loop_and_scores_each_token_once(
    altup, pretrained: Path, texts: Path, tmp_path: Path, stride: int
) -> None:
    report = ppl(altup, pretrained, tmp_path / "o", "--data", f"text:{texts / 'doc.txt'}",
                 "--stride", str(stride))  # fmt: skip
    (entry,) = report["tasks"].values()
    model, config = load(pretrained)
    tokenizer = load_tokenizer(pretrained)
    ids = [tokenizer.token_to_id("<|endoftext|>"), *tokenizer.encode(DOCUMENT).ids]
    total, count = explicit_loop(model, ids, config.max_seq_len, stride)
    assert entry["tokens"] == count == len(ids) - 1  # every token once
    assert entry["metrics"]["loss"] == pytest.approx(total / count, abs=1e-5)
    assert entry["metrics"]["ppl"] == pytest.approx(math.exp(total / count), rel=1e-5)
    assert entry["stride"] == stride and entry["context"] == config.max_seq_len


def test_windows_cover_every_target_once_with_the_promised_history() -> None:
    rng = random.Random(0)
    for _ in range(300):
        context = rng.randint(1, 40)
        stride, n = rng.randint(1, context), rng.randint(1, 200)
        seen = np.zeros(n + 1, dtype=int)
        for k, (start, end, scored) in enumerate(windows(n, context, stride)):
            assert end - start <= context
            for target in range(end - scored + 1, end + 1):
                seen[target] += 1
                history = target - start  # input tokens before the target in its window
                assert k == 0 or history >= context - stride, (context, stride, n)
        assert seen[0] == 0 and (seen[1:] == 1).all(), (context, stride, n)


def test_bits_per_byte_is_the_summed_loss_over_utf8_bytes(
    altup, pretrained: Path, texts: Path, tmp_path: Path
) -> None:
    (entry,) = ppl(altup, pretrained, tmp_path / "o", "--data",
                   f"text:{texts / 'doc.txt'}")["tasks"].values()  # fmt: skip
    n_bytes = len(DOCUMENT.encode("utf-8"))
    assert n_bytes > len(DOCUMENT) and entry["bytes"] == n_bytes
    summed = entry["metrics"]["loss"] * entry["tokens"]
    assert entry["metrics"]["bits_per_byte"] == pytest.approx(summed / (math.log(2) * n_bytes))


def test_the_training_corpus_is_scored_on_its_held_out_split_only(
    altup, pretrained: Path, corpus_dir: Path, tmp_path: Path
) -> None:
    refused = altup("eval", "ppl", str(pretrained), "--data", f"text:{corpus_dir}", "--split",
                    "all", "--out", str(tmp_path / "all"))  # fmt: skip
    assert refused.code == 2 and "training sequences" in refused.stderr
    assert not (tmp_path / "all").exists()
    for args in ([], ["--data", f"text:{corpus_dir}"]):  # the default is the training corpus
        out = tmp_path / f"val{len(args)}"
        (entry,) = ppl(altup, pretrained, out, *args)["tasks"].values()
        meta = json.loads((pretrained / "run.json").read_text())
        assert meta and entry["data"] == "held out"
        from altup_cli.evaluation.heldout import training_data

        trained = training_data(str(pretrained))
        assert trained is not None and trained.data.seq_len == 32
        n_tokens = _stream_length(pretrained, corpus_dir)
        _, val = split_indices((n_tokens - 1) // 32, trained.data.val_fraction, trained.seed)
        assert entry["tokens"] == 32 * len(val)  # exactly the held-out sequences' targets


def _stream_length(run: Path, corpus_dir: Path) -> int:
    tokenizer = load_tokenizer(run)
    files = sorted(p for p in corpus_dir.rglob("*") if p.is_file())
    return sum(len(tokenizer.encode(f.read_text()).ids) + 1 for f in files)


def test_held_out_segments_are_exactly_the_held_out_sequences() -> None:
    tokens, seq_len = np.arange(1000), 7
    val = [0, 3, 4, 5, 9, 10, 100]
    segments = list(heldout_segments(tokens, seq_len, val))
    targets = sorted(int(t) for s in segments for t in s[1:])
    assert targets == sorted(t for i in val for t in range(i * seq_len + 1, i * seq_len + 8))
    assert len(segments) == 4  # consecutive sequences join: 0 | 3-5 | 9-10 | 100


def test_several_corpora_one_table_line_documents_a_saved_dataset_and_wandb(
    altup, pretrained: Path, texts: Path, tmp_path: Path
) -> None:
    datasets = pytest.importorskip("datasets")
    saved = tmp_path / "saved"
    datasets.Dataset.from_dict({"text": [*make_prose(4, seed=5), ""]}).save_to_disk(str(saved))
    out = tmp_path / "o"
    result = altup("eval", "ppl", str(pretrained), "--data", f"text:{texts / 'lines.txt'}",
                   "--format", "line", "--data", f"hf:{saved}", "--data",
                   f"text:{texts / 'doc.txt'}", "--max-tokens", "40",
                   "--out", str(out))  # fmt: skip
    assert result.code == 0, result.stderr
    report = json.loads((out / "ppl.json").read_text())
    lines, saved_entry, doc = report["tasks"].values()
    assert lines["documents"] == 5 and saved_entry["documents"] == 4
    assert doc["tokens"] == 40 and doc["data"] == "whole"
    for name in report["tasks"]:
        assert name.split("/")[-1][:8] in result.stderr.replace("\n", "")
    assert list((out / "wandb").glob("offline-run-*/run-*.wandb"))
    assert (out / "config.yaml").is_file()


BAD = {
    "unknown-corpus": (["--data", "nope"], "not an embedded corpus"),
    "missing-file": (["--data", "text:{texts}/missing.txt"], "no such file"),
    "empty-file": (["--data", "text:{texts}/empty.txt"], "empty"),
    "blank-file": (["--data", "text:{texts}/blank.txt"], "empty"),
    "split-all-own": (["--data", "text:{corpus}", "--split", "all"], "training sequences"),
    "stride-too-long": (["--data", "text:{texts}/doc.txt", "--stride", "65"], "context"),
    "bad-format": (["--data", "text:{texts}/doc.txt", "--format", "para"], "--format"),
    "bad-split": (["--split", "test"], "--split"),
    "not-eval": (["model=tiny"], "eval.<key>"),
    "hf-missing": (["--data", "hf:{texts}/nothing_saved_here"], "cannot load"),
}  # fmt: skip


@pytest.mark.parametrize("case", [*BAD, "not-altup-ckpt"])
def test_bad_input_is_one_line_exit_2_and_writes_nothing(
    case: str, altup, pretrained: Path, texts: Path, corpus_dir: Path, tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    run = str(pretrained)
    if case == "not-altup-ckpt":
        run = str(tmp_path / "foreign.ckpt")
        torch.save({"state_dict": {}}, run)
        args, message = ["--data", f"text:{texts / 'doc.txt'}"], "not an altup checkpoint"
    else:
        template, message = BAD[case]
        args = [a.format(texts=texts, corpus=corpus_dir) for a in template]
    out = tmp_path / "out"
    result = altup("eval", "ppl", run, *args, f"eval.output_dir={out}")
    assert result.code == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], lines
    assert not out.exists()
