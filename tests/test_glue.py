"""`altup eval glue`: readers of the real GLUE formats, metrics against scipy/scikit-learn,
fine-tuning that learns, reports in glue.json and W&B, every model kind, and bad input."""

from __future__ import annotations

import json
import math
import random
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy import stats
from sklearn import metrics as skm

from altup_cli.errors import UserError
from altup_cli.eval_glue import (
    compose_settings,
    eval_glue,
    glue_scores,
    majority,
    task_settings,
)
from altup_cli.export import load_tokenizer, save_export
from altup_cli.glue import METRICS, TASKS
from altup_cli.glue.tasks import Split, load_hf_task, load_tsv_task, read_tsv
from altup_cli.growth import grow, parse_op
from altup_cli.models.transformer import ModelConfig, TransformerLM
from altup_cli.training.glue import GlueModule, encode, loader
from tests.conftest import tiny_overrides
from tests.glue_fixtures import sst2_rows, write_glue
from tests.test_growth import KINDS
from tests.test_train import _run_dir
from tests.wandb_records import history

REAL = Path(__file__).resolve().parents[2] / "shared" / "glue"


@pytest.fixture(scope="module")
def glue_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_glue(tmp_path_factory.mktemp("glue"))


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory: pytest.TempPathFactory, corpus_dir: Path, cache_dir: Path) -> Path:
    from typer.testing import CliRunner

    from altup_cli.cli import app

    out = tmp_path_factory.mktemp("pretrained")
    args = [*tiny_overrides(corpus_dir, cache_dir, out, steps=4), "logger=none"]
    result = CliRunner().invoke(app, ["train", *args])
    assert result.exit_code == 0, result.output
    return _run_dir(out)


# ── data ────────────────────────────────────────────────────────────────────────────────


def test_loaders_take_each_real_format_as_it_comes(glue_dir: Path) -> None:
    cola_train, (cola_dev,) = load_tsv_task(TASKS["cola"], glue_dir)
    assert len(cola_train.labels) == 16 and len(cola_dev.labels) == 8  # no header, no final \n
    assert cola_train.texts[3] == ('"Quotes" open this sentence, and "quote" inside it.',)
    assert cola_train.labels[:4] == [0, 1, 0, 1]

    mrpc_train, _ = load_tsv_task(TASKS["mrpc"], glue_dir)  # BOM before the header
    assert mrpc_train.texts[1] == (
        'He said " the witness " lied .',
        '" The witness " lied , he said .',
    )
    assert len(mrpc_train.labels) == 19

    qqp_train, _ = load_tsv_task(TASKS["qqp"], glue_dir)
    assert len(qqp_train.labels) == 18  # the truncated row is skipped

    mnli_train, devs = load_tsv_task(TASKS["mnli"], glue_dir)
    assert [d.name for d in devs] == ["dev_matched", "dev_mismatched"]
    assert mnli_train.labels[:3] == [0, 1, 2] and [len(d.labels) for d in devs] == [9, 9]

    stsb_train, _ = load_tsv_task(TASKS["stsb"], glue_dir)
    assert stsb_train.labels[:3] == [0.0, 0.37, 0.74] and len(stsb_train.texts[0]) == 2

    rte_train, _ = load_tsv_task(TASKS["rte"], glue_dir)
    assert rte_train.labels[:4] == [1, 0, 0, 1]  # not_entailment when i % 3 == 0
    sst2_train, _ = load_tsv_task(TASKS["sst2"], glue_dir)
    assert [
        (t[0], y) for t, y in zip(sst2_train.texts, sst2_train.labels, strict=True)
    ] == sst2_rows(256, 2)


@pytest.mark.skipif(not REAL.is_dir(), reason="the real GLUE files are not beside this checkout")
def test_the_real_files_parse_to_their_official_row_counts() -> None:
    counts = {("cola", "train"): 8551, ("cola", "dev"): 1043, ("sst2", "train"): 67349,
              ("sst2", "dev"): 872, ("mrpc", "train"): 3668, ("mrpc", "dev"): 408,
              ("qnli", "dev"): 5463, ("rte", "train"): 2490, ("rte", "dev"): 277,
              ("wnli", "train"): 635, ("wnli", "dev"): 71}  # fmt: skip
    for (task, split), rows in counts.items():
        parsed = read_tsv(REAL / TASKS[task].folder / f"{split}.tsv", TASKS[task])
        assert len(parsed.labels) == len(parsed.texts) == rows, (task, split)


def test_a_saved_hf_dataset_maps_labels_by_name(tmp_path: Path) -> None:
    datasets = pytest.importorskip("datasets")

    def dataset(
        names: list[str], labels: list[int], splits: tuple[str, ...], text: tuple[str, ...]
    ):
        features = datasets.Features(
            {**{c: datasets.Value("string") for c in text},
             "label": datasets.ClassLabel(names=names), "idx": datasets.Value("int32")}
        )  # fmt: skip
        rows = {**{c: [f"{c} {i}" for i in range(len(labels))] for c in text},
                "label": labels, "idx": list(range(len(labels)))}  # fmt: skip
        return datasets.DatasetDict(
            {s: datasets.Dataset.from_dict(rows, features=features) for s in splits}
        )

    dataset(["entailment", "not_entailment"], [0, 1, 1], ("train", "validation"),
            ("sentence1", "sentence2")).save_to_disk(str(tmp_path / "rte"))  # fmt: skip
    dataset(["unacceptable", "acceptable"], [1, 0, 1], ("train", "validation"),
            ("sentence",)).save_to_disk(str(tmp_path / "cola"))  # fmt: skip
    dataset(["entailment", "neutral", "contradiction"], [2, 0, 1],
            ("train", "validation_matched", "validation_mismatched"),
            ("premise", "hypothesis")).save_to_disk(str(tmp_path / "mnli"))  # fmt: skip

    rte, _ = load_hf_task(TASKS["rte"], str(tmp_path))
    assert rte.labels == [0, 1, 1] and rte.texts[2] == ("sentence1 2", "sentence2 2")
    cola, _ = load_hf_task(TASKS["cola"], str(tmp_path))
    assert cola.labels == [1, 0, 1] and cola.texts[0] == ("sentence 0",)
    mnli, devs = load_hf_task(TASKS["mnli"], str(tmp_path))
    assert mnli.labels == [2, 0, 1] and [d.name for d in devs] == [
        "validation_matched", "validation_mismatched"]  # fmt: skip
    with pytest.raises(UserError, match="no split 'validation'"):
        shutil.rmtree(tmp_path / "rte" / "validation")
        (tmp_path / "rte" / "dataset_dict.json").write_text('{"splits": ["train"]}')
        load_hf_task(TASKS["rte"], str(tmp_path))


# ── metrics ─────────────────────────────────────────────────────────────────────────────


def test_metrics_equal_scipy_and_sklearn_on_random_predictions() -> None:
    rng = np.random.default_rng(0)
    for trial in range(30):
        n = int(rng.integers(2, 300))
        gold = rng.integers(0, 2, n)
        pred = gold.copy() if trial == 0 else rng.integers(0, 2, n)
        if trial == 1:
            pred[:] = 1  # constant predictions: MCC 0 as scikit-learn
        assert METRICS["accuracy"](pred, gold) == pytest.approx(
            skm.accuracy_score(gold, pred), abs=1e-15
        )
        assert METRICS["f1"](pred, gold) == pytest.approx(
            skm.f1_score(gold, pred, zero_division=0), abs=1e-12)  # fmt: skip
        assert METRICS["mcc"](pred, gold) == pytest.approx(
            skm.matthews_corrcoef(gold, pred), abs=1e-12)  # fmt: skip
        x = rng.normal(size=n)
        y = np.round(rng.uniform(0, 5, n), 1)  # STS-B-like scores, with ties
        tied = np.round(x + y, 0) if trial % 2 else x  # ties in the predictions too
        assert METRICS["pearson"](tied, y) == pytest.approx(stats.pearsonr(tied, y)[0], abs=1e-12)
        assert METRICS["spearman"](tied, y) == pytest.approx(
            stats.spearmanr(tied, y)[0], abs=1e-12)  # fmt: skip


def test_spearman_is_computed_in_float64() -> None:
    """float32 inputs close together: ranks from float64 keep them apart as scipy does."""
    y = np.linspace(0, 1, 500)
    x = (y + 1e-9 * np.arange(500)[::-1]).astype(np.float64)
    assert METRICS["spearman"](x, y) == pytest.approx(stats.spearmanr(x, y)[0], abs=1e-12)


def test_majority_baseline_and_glue_average_by_hand() -> None:
    train = Split("train", [("a",)] * 5, [1, 1, 1, 0, 0])
    dev = Split("dev", [("a",)] * 4, [1, 0, 0, 0])
    assert majority(TASKS["sst2"], train, [dev]) == {"dev/accuracy": 0.25}
    mrpc = majority(TASKS["mrpc"], train, [dev])  # always 1: precision 1/4, recall 1
    assert mrpc == {"dev/f1": pytest.approx(0.4), "dev/accuracy": 0.25}
    results = {
        "mrpc": {"score": 60.0, "majority_score": 32.5},
        "rte": {"score": 50.0, "majority_score": 50.0},
        "wnli": {"score": 40.0, "majority_score": 56.0},
    }
    scores = glue_scores(results)
    assert scores["glue_score"] == pytest.approx(50.0)
    assert scores["glue_score_without_wnli"] == pytest.approx(55.0)
    assert scores["majority_glue_score"] == pytest.approx(46.166666, abs=1e-5)


def test_per_task_settings_follow_the_documented_precedence() -> None:
    default = task_settings(compose_settings([]), TASKS["rte"])
    assert default.epochs == 5 and default.lr == 3e-4  # the task's entry, the global LR
    everyone = compose_settings(["eval.epochs=2", "eval.lr=1e-3"])
    assert task_settings(everyone, TASKS["rte"]).epochs == 2  # command line beats YAML task
    mixed = compose_settings(["eval.epochs=2", "eval.tasks.rte.epochs=7"])
    assert task_settings(mixed, TASKS["rte"]).epochs == 7
    assert task_settings(mixed, TASKS["cola"]).epochs == 2
    with pytest.raises(UserError, match="pooling must be last or mean"):
        task_settings(compose_settings(["eval.pooling=cls"]), TASKS["rte"])


# ── fine-tuning ─────────────────────────────────────────────────────────────────────────


def test_fine_tuning_learns_and_writes_the_report_and_wandb(
    altup, pretrained: Path, glue_dir: Path, tmp_path: Path
) -> None:
    """SST-2's fixture label is the word good/bad: fine-tuning must find it (dev accuracy
    ≥ 0.8 against a majority baseline of 0.5), and STS-B regression must run too."""
    out = tmp_path / "glue"
    result = altup(
        "eval", "glue", str(pretrained), "--tasks", "sst2,stsb", "--data-dir", str(glue_dir),
        "-o", str(out), "eval.lr=3e-3", "eval.batch_size=16", "eval.max_len=32",
        "eval.tasks.sst2.epochs=6", "eval.tasks.stsb.epochs=1", "eval.warmup_ratio=0.05",
    )  # fmt: skip
    assert result.code == 0, result.stderr
    report = json.loads((out / "glue.json").read_text())
    sst2, stsb = report["tasks"]["sst2"], report["tasks"]["stsb"]
    assert report["status"] == "finished" and "convention" in report
    assert sst2["metrics"]["dev/accuracy"] >= 0.8 and sst2["majority"]["dev/accuracy"] == 0.5
    assert sst2["reported_epoch"] == 6 and sst2["steps"] == 6 * 256 // 16
    assert set(stsb["metrics"]) == {"dev/pearson", "dev/spearman"}
    assert all(math.isfinite(v) for v in stsb["metrics"].values())
    assert report["glue_score"] == pytest.approx((sst2["score"] + stsb["score"]) / 2)
    assert sst2["score"] == pytest.approx(100 * sst2["metrics"]["dev/accuracy"])
    assert "GLUE" in result.stderr and "majority class" in result.stderr
    assert "eval:" in (out / "config.yaml").read_text()

    (run_file,) = (out / "wandb").glob("offline-run-*/run-*.wandb")
    rows = history(run_file)
    accuracy = [r["glue/sst2/dev/accuracy"] for r in rows if "glue/sst2/dev/accuracy" in r]
    assert len(accuracy) == 6 and accuracy[-1] == pytest.approx(sst2["metrics"]["dev/accuracy"])
    assert any("glue/stsb/dev/spearman" in r for r in rows)


def kind_model(kind: str, vocab: int) -> TransformerLM:
    torch.manual_seed(0)
    if kind == "grown":
        base = TransformerLM(ModelConfig(vocab_size=vocab, d_model=16, n_layers=2, n_heads=2,
                                         d_ff=32, max_seq_len=64))  # fmt: skip
        return grow(base, [parse_op(o) for o in ("mlp_width=48", "layers=+1@1", "heads=3")])[0]
    cfg = ModelConfig(vocab_size=vocab, d_model=16, n_layers=3, n_heads=2, d_ff=32,
                      max_seq_len=64, **KINDS[kind])  # fmt: skip
    return TransformerLM(cfg)


@pytest.mark.parametrize("kind", [*KINDS, "grown"])
def test_every_model_kind_pools_padding_free_and_fine_tunes(
    kind: str, pretrained: Path, glue_dir: Path, tmp_path: Path
) -> None:
    """Right padding never changes the pooled representation (last token or mean), and a
    model of each kind fine-tunes end to end and reports finite metrics."""
    tokenizer = load_tokenizer(pretrained)
    model = kind_model(kind, tokenizer.get_vocab_size()).eval()
    export = save_export(model, tmp_path / "export", pretrained / "export" / "tokenizer.json")
    task = TASKS["rte"]
    train, _ = load_tsv_task(task, glue_dir)
    ids = [x[: 10 + 7 * i] for i, x in enumerate(encode(train, tokenizer, 0, 64)[:6])]
    assert len({len(x) for x in ids}) == 6  # every row padded differently
    for pooling in ("last", "mean"):
        module = GlueModule(model, task, {"pooling": pooling}, 1)
        batch = next(iter(loader(ids, [0] * 6, 6, False, 0, pad=3)))
        with torch.no_grad():
            pooled = module.pooled(batch[0], batch[1])
            for row, x in enumerate(ids):
                alone = module.pooled(torch.tensor([x]), torch.tensor([len(x)]))
                torch.testing.assert_close(pooled[row], alone[0], atol=1e-5, rtol=1e-5)

    out = eval_glue(str(export), "rte", str(glue_dir), ["eval.logger.kind=none",
                    "eval.tasks.rte.epochs=1", "eval.batch_size=8", "eval.max_len=32"],
                    str(tmp_path / "glue"))  # fmt: skip
    rte = json.loads((out / "glue.json").read_text())["tasks"]["rte"]
    assert rte["steps"] == 3 and math.isfinite(rte["metrics"]["dev/accuracy"])


# ── bad input ───────────────────────────────────────────────────────────────────────────


def test_bad_input_is_one_line_exit_2_and_writes_nothing(
    altup, pretrained: Path, glue_dir: Path, tmp_path: Path
) -> None:
    broken = tmp_path / "data"
    shutil.copytree(glue_dir, broken)
    (broken / "RTE" / "dev.tsv").unlink()
    lines = (broken / "WNLI" / "train.tsv").read_text().splitlines()
    lines[3] = lines[3].rsplit("\t", 1)[0] + "\tmaybe"
    (broken / "WNLI" / "train.tsv").write_text("\n".join(lines) + "\n")
    garbage = tmp_path / "garbage.ckpt"
    garbage.write_bytes(random.Random(0).randbytes(2000))
    foreign = tmp_path / "foreign.ckpt"
    torch.save({"state_dict": {"w": torch.zeros(2)}}, foreign)
    existing = tmp_path / "existing"
    existing.mkdir()
    run, data = str(pretrained), str(glue_dir)
    cases = [
        ([run, "--tasks", "sst2,nope", "--data-dir", data], "unknown GLUE task 'nope'"),
        ([run, "--tasks", "rte", "--data-dir", str(broken)], "RTE/dev.tsv is missing"),
        ([run, "--tasks", "qnli", "--data-dir", str(tmp_path / "none")], "QNLI"),
        ([run, "--tasks", "wnli", "--data-dir", str(broken)], "label 'maybe' is not one of"),
        ([str(garbage), "--tasks", "rte", "--data-dir", data], "cannot read checkpoint"),
        ([str(foreign), "--tasks", "rte", "--data-dir", data], "not an altup checkpoint"),
        ([str(tmp_path), "--tasks", "rte", "--data-dir", data], "no altup export"),
        ([run, "--tasks", "rte", "--data-dir", data, "model=tiny"], "eval.<key>"),
        ([run, "--tasks", "rte", "--data-dir", data, "eval.epoch=2"], "config:"),
        ([run, "--tasks", "rte", "--data-dir", data, "eval.max_len=4096"], "max_seq_len"),
        ([run, "--tasks", "rte", "--data-dir", data, "eval.source=csv"], "eval.source"),
        ([run, "--tasks", "rte", "--data-dir", data, "-o", str(existing)], "already exists"),
    ]
    for args, message in cases:
        before = sorted(p.name for p in tmp_path.iterdir())
        result = altup("eval", "glue", *args, f"eval.output_dir={tmp_path / 'o'}")
        assert result.code == 2, (args, result.stderr)
        assert message in result.stderr and len(result.stderr.strip().splitlines()) == 1, (
            args, result.stderr)  # fmt: skip
        assert sorted(p.name for p in tmp_path.iterdir()) == before
