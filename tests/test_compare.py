"""`altup compare` end to end: variants × seeds trained as ordinary runs, a killed comparison
re-run trains only what is missing (resuming the run it was killed in) and ends with the
same table, damaged rows are re-recorded, plots and the W&B run hold what they should, and
bad input is one line and exit 2 with nothing trained."""

from __future__ import annotations

import csv
import hashlib
import json
import time
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import yaml

from tests.helpers.prose import tiny_overrides
from tests.helpers.wandb_records import history

TIMING = ("tokens_per_second", "seconds_per_step", "wall_seconds")  # differ run to run


def _table(directory: Path) -> list[dict[str, str]]:
    with (directory / "results.csv").open() as handle:
        return [{k: v for k, v in r.items() if k not in TIMING} for r in csv.DictReader(handle)]


def _errors(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("error:")]


def test_compare_trains_every_variant_on_the_same_tokens(
    altup, corpus_dir: Path, cache_dir: Path, tmp_path: Path
) -> None:
    """One seed (the config's run.seed): today's table, labelled as having no interval."""
    outputs = tmp_path / "outputs"
    args = [*tiny_overrides(corpus_dir, cache_dir, outputs, steps=2), "logger=none"]
    result = altup("compare", *args, "--variant", "altup=off", "--variant", "altup=recycled_k2")
    assert result.code == 0, result.stderr
    saved = json.loads((outputs / "compares" / "t" / "comparison.json").read_text())
    runs = saved["runs"]
    assert [r["variant"] for r in runs] == ["altup=off", "altup=recycled_k2"]
    assert [r["seed"] for r in runs] == [1337, 1337] and saved["seeds"] == [1337]
    assert runs[0]["tokens"] == runs[1]["tokens"] == 2 * 4 * 32
    assert runs[1]["params"] - runs[0]["params"] == 2 * 6
    assert "altup compare" in result.stdout and "val loss" in result.stdout
    assert "one seed: no interval" in result.stdout


def test_compare_refuses_a_bad_variant_before_training(altup, tmp_path: Path) -> None:
    result = altup("compare", f"run.output_dir={tmp_path}", "--variant", "altup=k9")
    assert result.code == 2 and "altup/k9" in result.stderr
    assert not any(tmp_path.iterdir())


class Killed(BaseException):
    """What a kill does to the run in flight: it stops, wherever it was."""


def test_a_killed_comparison_rerun_trains_only_the_missing_runs_and_gives_the_same_table(
    altup, corpus_dir: Path, cache_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """2 variants × 2 seeds in-process; the same comparison killed at step 3 of its third run
    (checkpoint at step 2) and re-run in 2 parallel processes (--executor local --jobs 2)
    resumes that run, trains the fourth, nothing else, and ends with the same table. A
    damaged row is recorded again from its run; other shared settings are refused."""
    from altup_cli.sweep import execute

    args = [*tiny_overrides(corpus_dir, cache_dir, tmp_path / "out", steps=4),
            "trainer.val_check_interval=2", "logger=none",
            "--variant", "altup=off", "--variant", "altup=k2", "--seeds", "0,1"]  # fmt: skip
    full = tmp_path / "full"
    result = altup("compare", *args, "--dir", str(full))
    assert result.code == 0, result.stderr
    expected = _table(full)
    assert [(r["variant"], r["seed"]) for r in expected] == [
        ("altup=k2", "0"), ("altup=k2", "1"), ("altup=off", "0"), ("altup=off", "1")
    ]  # fmt: skip
    for row in expected:
        ran = yaml.safe_load((full / row["run_dir"] / ".hydra" / "config.yaml").read_text())
        assert (ran["run"]["seed"], ran["run"]["data_seed"]) == (int(row["seed"]), None)
    assert expected[2]["val_loss"] != expected[3]["val_loss"]  # the seeds differ
    shown = " ".join(result.stdout.split())
    assert "2 seeds, seeds vary model init and data order" in shown and "95% interval" in shown

    real, started = execute.train_point, []
    hook = L.LightningModule.on_train_batch_start

    def kill_at_step_3(self: L.LightningModule, batch: Any, batch_idx: int) -> None:
        if self.trainer.global_step == 3:
            raise Killed

    def killed_in_the_third(*a: Any) -> dict:
        started.append(a[2])
        if len(started) == 3:
            monkeypatch.setattr(L.LightningModule, "on_train_batch_start", kill_at_step_3)
        return real(*a)

    part = tmp_path / "part"
    monkeypatch.setattr(execute, "train_point", killed_in_the_third)
    with pytest.raises(Killed):
        altup("compare", *args, "--dir", str(part))
    monkeypatch.setattr(L.LightningModule, "on_train_batch_start", hook)
    monkeypatch.setattr(execute, "train_point", real)
    assert len(_table(part)) == 2
    third = part / "runs" / "altup-k2" / "0"
    assert (third / "checkpoints" / "last.ckpt").is_file() and not (third / "metrics.json").exists()

    again = altup("compare", *args, "--executor", "local", "--jobs", "2", "--dir", str(part))
    assert again.code == 0, again.stderr
    logs = sorted(p.relative_to(part).as_posix() for p in part.glob("runs/*/*.log"))
    assert logs == ["runs/altup-k2/0.log", "runs/altup-k2/1.log"]  # only these trained
    starts = [json.loads((part / "runs" / "altup-k2" / s / "run.json").read_text())["starts"]
              for s in "01"]  # fmt: skip
    assert [len(s) for s in starts] == [2, 1]  # the killed run was resumed, not restarted
    assert starts[1][0]["argv"][0] == "altup compare"
    assert _table(part) == expected
    stats = [json.loads((d / "comparison.json").read_text())["variants"] for d in (full, part)]
    assert stats[0] == stats[1]

    trained: list[tuple[str, bool]] = []

    def spy(*a: Any) -> dict:
        run_dir = Path(a[2])
        trained.append((run_dir.relative_to(part).as_posix(), (run_dir / "metrics.json").is_file()))
        return real(*a)

    monkeypatch.setattr(execute, "train_point", spy)
    lines = (part / "results.csv").read_text().splitlines(keepends=True)
    victim = next(csv.reader([lines[3]]))[0]
    (part / "results.csv").write_text("".join([*lines[:3], lines[3][:20] + "\n", *lines[4:]]))
    again = altup("compare", *args, "--dir", str(part))
    assert again.code == 0, again.stderr
    assert trained == [(f"runs/{victim}", True)] and "damaged row" in again.stderr
    assert _table(part) == expected
    trained.clear()
    assert altup("compare", *args, "--dir", str(part)).code == 0 and trained == []

    before = (part / "results.csv").read_bytes()
    refused = altup("compare", *args, "optim.lr=1e-4", "--dir", str(part))
    assert refused.code == 2 and "optim.lr" in _errors(refused.stderr)[0]
    assert trained == [] and (part / "results.csv").read_bytes() == before


def _fake_metrics(run_dir: Path) -> dict[str, Any]:
    """A finished run without training: the loss depends on the variant and the seed
    (AltUp K=2 is 0.1 better at every seed, Recycled the baseline plus noise)."""
    variant, seed = run_dir.parent.name, int(run_dir.name)
    shift = {"altup-off": 0.0, "altup-k2": -0.1, "altup-recycled_k2": 0.004 * (seed - 1)}
    loss = 4.9 + 0.02 * seed + shift[variant] + (0.001 if variant == "altup-k2" and seed else 0)
    curve = [{"step": s, "tokens": 128 * s, "flops": 3e6 * 128 * s, "val_loss": loss + (6 - s) / 4}
             for s in (2, 4, 6)]  # fmt: skip
    metrics = {
        "steps": 6, "tokens_seen": 768, "training_flops": 3e6 * 768,
        "training_flops_per_token": 3e6, "parameters": {"total": 1000, "non_embedding": 600},
        "active_parameters": 600, "val_loss": loss, "train_loss": loss + 0.1,
        "tokens_per_second": 1000.0, "seconds_per_step": 0.1, "wall_seconds": 1.0,
        "validation_curve": curve, "growth": [],
    }  # fmt: skip
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "metrics.json").write_text(json.dumps(metrics))
    return metrics


def _logged_row(path: Path, key: str, seconds: float = 60) -> dict[str, Any]:
    """The history row holding `key` (W&B's service may still be writing the file)."""
    deadline = time.monotonic() + seconds
    while True:
        rows = [r for r in history(path) if key in r]
        if rows or time.monotonic() > deadline:
            assert rows, f"{path} has no row with {key}"
            return rows[0]
        time.sleep(0.5)


@pytest.fixture
def fake_training(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Runs "train" instantly; the list records each trained run's directory."""
    from altup_cli.sweep import execute

    trained: list[str] = []

    def train_point(overrides: list[str], recipe: str | None, run_dir: str, *rest: str) -> dict:
        trained.append(run_dir)
        return _fake_metrics(Path(run_dir))

    monkeypatch.setattr(execute, "train_point", train_point)
    return trained


TRIO = ["--seeds", "0,1,2"]  # the default variants: altup=off, altup=k2, altup=recycled_k2


def test_seeds_give_paired_statistics_plots_and_a_wandb_run(
    altup, corpus_dir: Path, cache_dir: Path, tmp_path: Path, fake_training: list[str]
) -> None:
    args = [*tiny_overrides(corpus_dir, cache_dir, tmp_path / "out"), "logger=wandb"]
    where = tmp_path / "cmp"
    result = altup("compare", *args, *TRIO, "--dir", str(where))
    assert result.code == 0, result.stderr
    assert len(fake_training) == 9
    saved = json.loads((where / "comparison.json").read_text())
    baseline, k2, recycled = saved["variants"]
    assert baseline["versus_baseline"] is None and baseline["mean"] == pytest.approx(4.92)
    assert k2["versus_baseline"]["verdict"] == "lower (95%)"
    assert k2["versus_baseline"]["wins"] == 3
    assert recycled["versus_baseline"]["verdict"].startswith("not resolved")
    out = " ".join(result.stdout.split())
    assert "3 seeds, seeds vary model init and data order" in out and "lower (95%)" in out
    said = " ".join(result.stderr.split())
    assert "from separate runs — not a comparison" in said and "altup bench" in said
    assert "t-interval" in said
    names = ["loss_vs_tokens.png", "loss_vs_flops.png", "final_loss.png"]
    assert saved["plots"] == names and all((where / n).is_file() for n in names)
    printed = "".join((result.stdout + result.stderr).split())  # rich wraps long paths
    assert all(str(where / n) in printed for n in names)
    row = _logged_row(next(where.glob("wandb/offline-run-*/run-*.wandb")), "plots/final_loss/_type")
    for name in names:  # the PNGs themselves, by their hashes
        stem = f"plots/{name.removesuffix('.png')}"
        assert row[f"{stem}/_type"] == "image-file" and row[f"{stem}/format"] == "png"
        assert row[f"{stem}/sha256"] == hashlib.sha256((where / name).read_bytes()).hexdigest()
    assert row["results/_type"] == row["summary/_type"] == "table-file"


def test_failed_runs_are_named_exit_1_and_the_rest_is_reported(
    altup, corpus_dir: Path, cache_dir: Path, tmp_path: Path, fake_training: list[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    from altup_cli.sweep import execute

    fake = execute.train_point

    def failing(overrides: list[str], recipe: str | None, run_dir: str, *rest: str) -> dict:
        if run_dir.endswith("altup-recycled_k2/1"):
            raise RuntimeError("out of memory")
        return fake(overrides, recipe, run_dir, *rest)

    monkeypatch.setattr(execute, "train_point", failing)
    args = [*tiny_overrides(corpus_dir, cache_dir, tmp_path / "out"), "logger=none"]
    where = tmp_path / "cmp"
    result = altup("compare", *args, *TRIO, "--dir", str(where))
    assert result.code == 1
    assert _errors(result.stderr) == [
        f"error: 1 of 9 runs failed: altup-recycled_k2/1 (their logs are in {where / 'runs'}; "
        "re-run the same command to retry them)"
    ]
    assert len(_table(where)) == 8
    recycled = json.loads((where / "comparison.json").read_text())["variants"][2]
    assert recycled["versus_baseline"]["seeds"] == [0, 2]


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (["--seeds", "0,a"], "--seeds: expected whole numbers, got 'a'"),
        (["--seeds", "1.5"], "--seeds: expected whole numbers"),
        (["--seeds", "0,1,0"], "--seeds: seed 0 is given twice"),
        (["--seeds", "-3"], "--seeds: seeds must be in"),
        (["--jobs", "0"], "--jobs must be >= 1"),
        (["--executor", "cloud"], "--executor must be one of"),
        (["--vary", "model"], "--vary must be one of both, init, data"),
        (["--variant", "altup.bogus=1"], "variant 'altup.bogus=1': config:"),
        (["--variant", "nonsense.key=3"], "variant 'nonsense.key=3': config:"),
        (["--variant", "altup=off", "--variant", "altup=off"], "'altup=off' is given twice"),
        (["+seeds=[0,x]"], "seeds: expected whole numbers, got 'x'"),
        (["run.data_seed=1.5"], "run.data_seed"),
    ],
)
def test_bad_input_is_one_line_and_trains_nothing(
    altup, tmp_path: Path, fake_training: list[str], options: list[str], message: str
) -> None:
    result = altup("compare", f"run.output_dir={tmp_path / 'out'}", "logger=none", *options)
    assert result.code == 2, result.stderr
    errors = _errors(result.stderr)
    assert len(errors) == 1 and message in errors[0], result.stderr
    assert fake_training == [] and not (tmp_path / "out").exists()


def test_recipes_declare_at_least_two_seeds() -> None:
    from altup_cli.compare.plan import chosen_seeds
    from altup_cli.config import compose_config, validate

    for recipe in ("altup-vs-dense", "ffn-isoflop", "growth-vs-scratch"):
        cfg = compose_config([], recipe)
        assert len(chosen_seeds(None, cfg, validate(cfg))) >= 2, recipe


def test_the_dry_run_shows_the_plan_and_writes_nothing(altup, tmp_path: Path) -> None:
    out = tmp_path / "out"
    result = altup("compare", f"run.output_dir={out}", "--recipe", "altup-vs-dense",
                   "--seeds", "4,5", "--vary", "init", "--dry-run")  # fmt: skip
    assert result.code == 0, result.stderr
    text = " ".join(result.stdout.split())
    assert text.count("to run") == 6 and "runs/altup-k2/5" in text
    assert not out.exists()


def test_vary_data_changes_the_data_and_keeps_the_init(
    altup, corpus_dir: Path, cache_dir: Path, tmp_path: Path
) -> None:
    """--vary data: the same model init (run.seed fixed), other training order and split,
    so the two seeds' losses differ."""
    args = [*tiny_overrides(corpus_dir, cache_dir, tmp_path / "out", steps=2), "logger=none"]
    where = tmp_path / "cmp"
    result = altup("compare", *args, "--variant", "altup=off", "--seeds", "0,1",
                   "--vary", "data", "--dir", str(where))  # fmt: skip
    assert result.code == 0, result.stderr
    rows = _table(where)
    for row in rows:
        ran = yaml.safe_load((where / row["run_dir"] / ".hydra" / "config.yaml").read_text())
        assert (ran["run"]["seed"], ran["run"]["data_seed"]) == (1337, int(row["seed"]))
    assert rows[0]["val_loss"] != rows[1]["val_loss"]
