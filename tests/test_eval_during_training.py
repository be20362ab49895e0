"""Evaluation during training (`trainer.eval`): perplexity on a corpus and lm tasks at the
validations it is due, logged to W&B at those steps and merged into metrics.json's
validation curve; its numbers equal `altup eval ppl` on the same weights; bad settings
are refused before anything is written."""

from __future__ import annotations

import json
import sys
import types
from pathlib import Path

import pytest

from tests.helpers.prose import make_prose, tiny_overrides
from tests.helpers.wandb_records import history
from tests.test_train import _run_dir


def test_in_training_eval_logs_to_wandb_and_the_validation_curve(
    altup, corpus_dir: Path, cache_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[dict] = []

    def evaluate_tasks(model, tokenizer, tasks, *, limit, num_fewshot=None, batch_size=8,
                       device="cpu"):  # fmt: skip
        calls.append({"tasks": tasks, "limit": limit, "training": model.training})
        return {task: {"acc": 0.25 * len(calls), "alias": task} for task in tasks}

    fake = types.ModuleType("altup_cli.evaluation.lm_harness")
    fake.evaluate_tasks = evaluate_tasks  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "altup_cli.evaluation.lm_harness", fake)
    doc = tmp_path / "heldout.txt"
    doc.write_text(" ".join(make_prose(4, seed=11)))
    out = tmp_path / "runs"
    args = [*tiny_overrides(corpus_dir, cache_dir, out, steps=7), "trainer.eval.every=3",
            f"trainer.eval.ppl=[text:{doc}]", "trainer.eval.tasks=[piqa]",
            "trainer.eval.limit=5"]  # fmt: skip
    result = altup("train", *args)
    assert result.code == 0, result.stderr
    run = _run_dir(out)
    curve = json.loads((run / "metrics.json").read_text())["validation_curve"]
    evaluated = {p["step"]: p for p in curve if "eval/text_heldout/ppl" in p}
    assert sorted(evaluated) == [3, 6, 7]  # every 3 steps, and at the end
    assert [p["eval/piqa/acc"] for p in (evaluated[3], evaluated[6], evaluated[7])] == [
        0.25, 0.5, 0.75]  # fmt: skip
    assert [c["limit"] for c in calls] == [5, 5, 5] and not any(c["training"] for c in calls)
    (run_file,) = (run / "wandb").glob("offline-run-*/run-*.wandb")
    logged = [r for r in history(run_file) if "eval/text_heldout/ppl" in r]
    assert [r["trainer/global_step"] for r in logged] == [3, 6, 7]
    assert [r["eval/text_heldout/bits_per_byte"] for r in logged] == pytest.approx(
        [evaluated[s]["eval/text_heldout/bits_per_byte"] for s in (3, 6, 7)])  # fmt: skip
    assert any("train/loss" in r for r in history(run_file))  # beside the training curves
    report = tmp_path / "ppl"
    done = altup("eval", "ppl", str(run), "--data", f"text:{doc}", "eval.logger.kind=none",
                 "--out", str(report))  # fmt: skip
    assert done.code == 0, done.stderr
    (entry,) = json.loads((report / "ppl.json").read_text())["tasks"].values()
    assert entry["metrics"]["ppl"] == pytest.approx(evaluated[7]["eval/text_heldout/ppl"], 1e-5)


@pytest.mark.parametrize(("override", "message"), [
    (["trainer.eval.every=4", "trainer.eval.ppl=[wiki]"], "multiple of trainer.val_check_interval"),
    (["trainer.eval.every=3", "trainer.eval.ppl=[nope]"], "'nope' is not"),
    (["trainer.eval.every=3"], "trainer.eval.ppl and .tasks are empty"),
    (["trainer.eval.limit=0"], "trainer.eval.limit"),
    (["trainer.eval.rate=2"], "unknown key"),
])  # fmt: skip
def test_bad_settings_are_one_line_exit_2_and_write_nothing(
    altup, corpus_dir: Path, cache_dir: Path, tmp_path: Path, override: list[str], message: str
) -> None:
    out = tmp_path / "runs"
    result = altup("train", *tiny_overrides(corpus_dir, cache_dir, out), *override)
    assert result.code == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], lines
    assert not out.exists()
