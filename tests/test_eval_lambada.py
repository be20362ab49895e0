"""`altup eval lambada`: the last word split as LAMBADA's, accuracy and the final word's
perplexity equal to a hand computation on a fixture in OpenAI's JSONL format, every token
of the word must be predicted, and bad input refused in one line with nothing written."""

from __future__ import annotations

import json
import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from altup_cli.evaluation.lambada import LambadaTask, read_lambada, split_last_word
from altup_cli.runs.export import load, load_tokenizer
from tests.test_eval_ppl import pretrained  # noqa: F401 (the module's trained run)

FIXTURE = Path(__file__).parent / "fixtures" / "lambada" / "sample.jsonl"


def hand(model, tokenizer, text: str) -> tuple[bool, float, int]:
    """One passage by hand: the last word after a space, scored after EOS and its context,
    of which the model sees the last max_seq_len tokens."""
    context, word = text.rsplit(" ", 1)
    eos = tokenizer.token_to_id("<|endoftext|>")
    ctx = tokenizer.encode(context).ids
    target = tokenizer.encode(" " + word).ids
    ids = torch.tensor([[eos, *ctx, *target][-(model.config.max_seq_len + 1) :]])
    with torch.no_grad():
        logits = model(ids[:, :-1])[0, -len(target) :]
    loss = float(F.cross_entropy(logits.double(), torch.tensor(target), reduction="sum"))
    return bool((logits.argmax(-1) == torch.tensor(target)).all()), loss, len(target)


def test_the_last_word_is_the_last_whitespace_separated_word() -> None:
    passage = split_last_word("a b  c \n")
    assert passage is not None and (passage.context, passage.word) == ("a b", "c")
    assert (split_last_word("he said , `` mine").word, split_last_word("x").context) == (
        "mine", "")  # fmt: skip
    assert split_last_word("  \n") is None
    assert [p.word for p in read_lambada(str(FIXTURE))][:2] == ["signs", "was"]


def test_accuracy_and_word_perplexity_equal_a_hand_computation(
    altup, pretrained: Path, tmp_path: Path  # noqa: F811
) -> None:
    out = tmp_path / "o"
    result = altup("eval", "lambada", str(pretrained), "--data", str(FIXTURE),
                   "eval.batch_size=4", "--out", str(out))  # fmt: skip
    assert result.code == 0, result.stderr
    entry = json.loads((out / "lambada.json").read_text())["tasks"]["lambada"]
    model, _ = load(pretrained)
    tokenizer = load_tokenizer(pretrained)
    texts = [json.loads(line)["text"] for line in FIXTURE.read_text().splitlines()]
    rows = [hand(model, tokenizer, t) for t in texts]
    n, tokens = len(rows), sum(r[2] for r in rows)
    assert entry["passages"] == n and entry["target_tokens"] == tokens
    assert entry["metrics"]["accuracy"] == sum(r[0] for r in rows) / n
    assert entry["metrics"]["ppl"] == pytest.approx(math.exp(sum(r[1] for r in rows) / n), 1e-5)
    assert entry["metrics"]["token_ppl"] == pytest.approx(
        math.exp(sum(r[1] for r in rows) / tokens), 1e-5)  # fmt: skip
    assert list((out / "wandb").glob("offline-run-*/run-*.wandb"))


class Oracle(torch.nn.Module):
    """Predicts (logit 5, else 0) the next token a table gives for each prefix."""

    def __init__(self, table: dict[tuple[int, ...], int], vocab: int, context: int) -> None:
        super().__init__()
        self.table, self.vocab = table, vocab
        self.config = SimpleNamespace(max_seq_len=context, vocab_size=vocab)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        logits = torch.zeros(*ids.shape, self.vocab)
        for b, row in enumerate(ids.tolist()):
            for t in range(len(row)):
                if (guess := self.table.get(tuple(row[: t + 1]))) is not None:
                    logits[b, t, guess] = 5.0
        return logits


def test_every_token_of_the_word_must_be_predicted(pretrained: Path) -> None:  # noqa: F811
    tokenizer = load_tokenizer(pretrained)
    task = LambadaTask(str(FIXTURE), batch_size=3)
    task.prepare()
    examples = task.encode(tokenizer, tokenizer.token_to_id("<|endoftext|>"), 10_000)
    assert all(t >= 2 for _, t in examples[:3]), "the fixture's words need several tokens"
    table = {}
    for k, (ids, t) in enumerate(examples):
        wrong_from = {0: t, 1: t - 1, 2: 0}.get(k, 0)  # all right, last one wrong, none right
        for i in range(len(ids) - t, len(ids)):
            right = i - (len(ids) - t) < wrong_from
            table[tuple(ids[:i])] = ids[i] if right else (ids[i] + 1) % 300
    task_result = task.evaluate(Oracle(table, 300, 10_000), tokenizer, None)
    assert task_result.details["correct"] == 1  # only the passage with every token right
    good, bad = math.log(math.exp(5) + 299) - 5, math.log(math.exp(5) + 299)
    expected = sum((t if k == 0 else t - 1) * good + (0 if k == 0 else bad)
                   if k < 2 else t * bad for k, (_, t) in enumerate(examples))  # fmt: skip
    assert task_result.metrics["ppl"] == pytest.approx(math.exp(expected / len(examples)))


BAD = {
    "missing-file": ("{tmp}/none.jsonl", None, "no such file"),
    "no-text": ("{tmp}/bad.jsonl", '{"text": "fine words here"}\n{"passage": "x y"}\n',
                'bad.jsonl:2: no "text"'),
    "not-json": ("{tmp}/bad.jsonl", '{"text": "a b"}\nnot json\n', "bad.jsonl:2: not JSON"),
    "empty-text": ("{tmp}/bad.jsonl", '{"text": "  "}\n', "bad.jsonl:1: the text is empty"),
    "empty-file": ("{tmp}/bad.jsonl", "\n\n", "empty"),
}  # fmt: skip


@pytest.mark.parametrize("case", [*BAD, "not-altup-ckpt"])
def test_bad_input_is_one_line_exit_2_and_writes_nothing(
    case: str, altup, pretrained: Path, tmp_path: Path  # noqa: F811
) -> None:
    run, data, message = str(pretrained), str(FIXTURE), "not an altup checkpoint"
    if case == "not-altup-ckpt":
        run = str(tmp_path / "foreign.ckpt")
        torch.save({"weights": 1}, run)
    else:
        template, content, message = BAD[case]
        data = template.format(tmp=tmp_path)
        if content is not None:
            Path(data).write_text(content)
    out = tmp_path / "out"
    result = altup("eval", "lambada", run, "--data", data, f"eval.output_dir={out}")
    assert result.code == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], lines
    assert not out.exists()
