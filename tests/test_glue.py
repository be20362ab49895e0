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

from altup_cli.commands.eval import eval_glue
from altup_cli.config.eval import compose_glue_settings as compose_settings
from altup_cli.config.eval import task_settings
from altup_cli.errors import UserError
from altup_cli.evaluation.glue import glue_scores, majority, subsample
from altup_cli.glue import METRICS, TASKS
from altup_cli.glue.tasks import Split, load_hf_task, load_tsv_task, read_tsv
from altup_cli.growth import grow, parse_op
from altup_cli.models.config import ModelConfig
from altup_cli.models.transformer import TransformerLM
from altup_cli.runs.export import load_tokenizer, save_export
from altup_cli.training.glue import GlueModule, encode, loader
from tests.helpers.glue import sst2_rows, write_glue
from tests.helpers.prose import tiny_overrides
from tests.helpers.wandb_records import history
from tests.test_growth import KINDS
from tests.test_train import _run_dir

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


def test_spearman_and_pearson_are_computed_in_float64() -> None:
    """Scores 1 + k·1e-10 are distinct in float64 but all 1.0 in float32 (one ulp is
    1.2e-7), where every rank would tie and both correlations would be 0."""
    k = np.random.default_rng(0).permutation(500)
    x = 1 + 1e-10 * k
    assert len(set(x.astype(np.float32))) == 1 and len(set(x)) == 500
    y = k + np.random.default_rng(1).normal(scale=50, size=500)
    expected = stats.spearmanr(x, y)[0]
    assert expected > 0.9
    assert METRICS["spearman"](x, y) == pytest.approx(expected, abs=1e-12)
    assert METRICS["spearman"](list(x), list(y)) == pytest.approx(expected, abs=1e-12)
    assert METRICS["pearson"](x, y) == pytest.approx(stats.pearsonr(x, y)[0], abs=1e-9)


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
    default = task_settings(compose_settings([]), "rte")
    assert default.epochs == 5 and default.lr == 3e-4  # the task's entry, the global LR
    everyone = compose_settings(["eval.epochs=2", "eval.lr=1e-3"])
    assert task_settings(everyone, "rte").epochs == 2  # command line beats YAML task
    mixed = compose_settings(["eval.epochs=2", "eval.tasks.rte.epochs=7"])
    assert task_settings(mixed, "rte").epochs == 7
    assert task_settings(mixed, "cola").epochs == 2
    with pytest.raises(UserError, match="pooling must be last or mean"):
        task_settings(compose_settings(["eval.pooling=cls"]), "rte")


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


def strict_json(path: Path) -> dict:
    def refuse(constant: str) -> None:
        raise AssertionError(f"{path} holds {constant}")

    return json.loads(path.read_text(), parse_constant=refuse)


def test_a_diverging_task_is_marked_and_the_others_still_report(
    altup, pretrained: Path, glue_dir: Path, tmp_path: Path
) -> None:
    """RTE at lr 1e6 (AdamW's decay alone multiplies weights by -1e4 a step) reaches a NaN
    loss: it is stopped and marked diverged, WNLI after it still fine-tunes and is scored,
    glue.json stays strict JSON, and the command ends with one error line naming RTE and
    exit code 3 (as a diverged `altup train`)."""
    out = tmp_path / "glue"
    result = altup(
        "eval", "glue", str(pretrained), "--tasks", "rte,wnli", "--data-dir", str(glue_dir),
        "-o", str(out), "eval.tasks.rte.lr=1e6", "eval.epochs=2", "eval.batch_size=8",
        "eval.max_len=32",
    )  # fmt: skip
    assert result.code == 3, result.stderr
    lines = result.stderr.strip().splitlines()
    assert [ln for ln in lines if ln.startswith("error:")] == lines[-1:]
    assert lines[-1].startswith("error: fine-tuning diverged: rte (loss nan at step ")
    assert "wnli" not in lines[-1] and "Traceback" not in result.stderr
    assert any("rte" in ln and "diverged" in ln and "—" in ln for ln in lines)  # the table
    report = strict_json(out / "glue.json")
    rte, wnli = report["tasks"]["rte"], report["tasks"]["wnli"]
    assert report["status"] == "diverged" and rte["diverged"].startswith("loss nan at step")
    assert "metrics" not in rte and "score" not in rte and rte["steps"] < 2 * 3
    assert wnli["steps"] == 2 * 3 and math.isfinite(wnli["score"])
    assert report["tasks_in_score"] == ["wnli"] and report["glue_score"] == wnli["score"]
    assert report["majority_glue_score"] == wnli["majority_score"]
    assert list((out / "wandb").glob("offline-run-*/run-*.wandb"))


def test_early_stopping_reports_the_best_epoch_and_max_train_examples_subsamples(
    pretrained: Path, glue_dir: Path, tmp_path: Path
) -> None:
    """At lr 1e-12 the dev score never changes, so early stopping with patience 2 ends 8
    epochs after 3 and reports epoch 1 (the first best, not the last); 8 of RTE's 19 train
    examples at batch 4 are 2 steps an epoch."""
    out = eval_glue(str(pretrained), "rte", str(glue_dir), ["eval.logger.kind=none",
                    "eval.early_stopping=true", "eval.patience=2", "eval.epochs=8",
                    "eval.lr=1e-12", "eval.tasks.rte.max_train_examples=8",
                    "eval.batch_size=4", "eval.max_len=32"], str(tmp_path / "glue"))  # fmt: skip
    rte = json.loads((out / "glue.json").read_text())["tasks"]["rte"]
    assert rte["train_examples"] == 8 and rte["dev_examples"] == {"dev": 10}
    assert [e["epoch"] for e in rte["epochs"]] == [0, 1, 2] and rte["steps"] == 3 * 2
    assert len({e["score"] for e in rte["epochs"]}) == 1
    assert rte["reported_epoch"] == 1 and rte["reported"] == "best dev epoch (early stopping)"


def test_max_train_examples_is_a_seeded_random_subset() -> None:
    split = Split("train", [(str(i),) for i in range(100)], list(range(100)))
    picked = {seed: subsample(split, 10, seed) for seed in (0, 1)}
    for seed, sub in picked.items():
        assert sub.labels == sorted(set(sub.labels)) and len(sub.labels) == 10
        assert sub.texts == [(str(i),) for i in sub.labels]  # rows stay whole
        assert subsample(split, 10, seed) == sub
    assert picked[0].labels != picked[1].labels and picked[0].labels != list(range(10))
    assert subsample(split, 100, 0) is split and subsample(split, None, 0) is split


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


OFFLINE = {"HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"}


def broken_task(root: Path, glue_dir: Path, case: str, file: str, edit) -> str:
    """A data directory holding one task folder of the fixture with `file` (TASK/x.tsv)
    replaced by edit(its bytes)."""
    folder = file.split("/")[0]
    shutil.copytree(glue_dir / folder, root / case / folder)
    target = root / case / file
    target.write_bytes(edit(target.read_bytes()))
    return str(root / case)


def set_field(line: int, value: str):
    """An edit that puts `value` in the last column of the file's line `line` (1-based)."""

    def edit(data: bytes) -> bytes:
        lines = data.decode().split("\n")
        lines[line - 1] = lines[line - 1].rsplit("\t", 1)[0] + "\t" + value
        return "\n".join(lines).encode()

    return edit


def corrupt_export(root: Path, run: Path, case: str, file: str) -> str:
    """A copy of the run's export with `file` cut to half its bytes (an interrupted copy)."""
    export = root / case
    shutil.copytree(run / "export", export)
    data = (export / file).read_bytes()
    (export / file).write_bytes(data[: len(data) // 2])
    return str(export)


@pytest.fixture(scope="module")
def bad(tmp_path_factory: pytest.TempPathFactory, pretrained: Path, glue_dir: Path) -> Path:
    """Every broken input of the bad-input table, each under its own name."""
    root = tmp_path_factory.mktemp("bad")
    broken = root / "broken"
    shutil.copytree(glue_dir, broken)
    (broken / "RTE" / "dev.tsv").unlink()
    lines = (broken / "WNLI" / "train.tsv").read_text().splitlines()
    lines[3] = lines[3].rsplit("\t", 1)[0] + "\tmaybe"
    (broken / "WNLI" / "train.tsv").write_text("\n".join(lines) + "\n")
    (root / "garbage.ckpt").write_bytes(random.Random(0).randbytes(2000))
    torch.save({"state_dict": {"w": torch.zeros(2)}}, root / "foreign.ckpt")
    (root / "existing").mkdir()
    (root / "empty").mkdir()
    for case, value in (("nan", "nan"), ("inf", "inf"), ("word", "high")):
        broken_task(root, glue_dir, f"stsb_{case}", "STS-B/train.tsv", set_field(3, value))
    broken_task(root, glue_dir, "empty_tsv", "RTE/train.tsv", lambda _: b"")
    latin1 = lambda data: data.replace(b"said", "s\u00e4id".encode("latin-1"), 1)  # noqa: E731
    broken_task(root, glue_dir, "latin1", "MRPC/train.tsv", latin1)
    corrupt_export(root, pretrained, "bad_weights", "model.safetensors")
    corrupt_export(root, pretrained, "bad_tokenizer", "tokenizer.json")
    return root


def tree(*roots: Path) -> dict[str, str]:
    """Every path under `roots` with a digest of its bytes ("" for a directory)."""
    import hashlib

    return {
        str(p): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else ""
        for root in roots
        for p in sorted(root.rglob("*"))
    }


RTE = ["--tasks", "rte", "--data-dir", "{data}"]
BAD_INPUT = {
    "unknown-task": (["{run}", "--tasks", "sst2,nope", "--data-dir", "{data}"],
                     "unknown GLUE task 'nope'"),
    "missing-file": (["{run}", "--tasks", "rte", "--data-dir", "{bad}/broken"],
                     "RTE/dev.tsv is missing"),
    "missing-dir": (["{run}", "--tasks", "qnli", "--data-dir", "{bad}/none"], "QNLI"),
    "bad-label": (["{run}", "--tasks", "wnli", "--data-dir", "{bad}/broken"],
                  "label 'maybe' is not one of"),
    "stsb-nan": (["{run}", "--tasks", "stsb", "--data-dir", "{bad}/stsb_nan"],
                 "STS-B/train.tsv:3: score 'nan' is not a finite number"),
    "stsb-inf": (["{run}", "--tasks", "stsb", "--data-dir", "{bad}/stsb_inf"],
                 "STS-B/train.tsv:3: score 'inf' is not a finite number"),
    "stsb-word": (["{run}", "--tasks", "stsb", "--data-dir", "{bad}/stsb_word"],
                  "STS-B/train.tsv:3: score 'high' is not a number"),
    "empty-tsv": (["{run}", "--tasks", "rte", "--data-dir", "{bad}/empty_tsv"],
                  "RTE/train.tsv is empty"),
    "not-utf8": (["{run}", "--tasks", "mrpc", "--data-dir", "{bad}/latin1"],
                 "MRPC/train.tsv:3: not UTF-8 text"),
    "hf-offline": (["{run}", "--tasks", "rte", "--data-dir", "nyu-mll/glue", "eval.source=hf"],
                   "cannot load rte from nyu-mll/glue"),
    "garbage-ckpt": (["{bad}/garbage.ckpt", *RTE], "cannot read checkpoint"),
    "foreign-ckpt": (["{bad}/foreign.ckpt", *RTE], "not an altup checkpoint"),
    "no-export": (["{bad}/empty", *RTE], "no altup export"),
    "corrupt-weights": (["{bad}/bad_weights", *RTE], "bad_weights/model.safetensors"),
    "corrupt-tokenizer": (["{bad}/bad_tokenizer", *RTE], "bad_tokenizer/tokenizer.json"),
    "not-eval": (["{run}", *RTE, "model=tiny"], "eval.<key>"),
    "unknown-key": (["{run}", *RTE, "eval.epoch=2"], "config:"),
    "too-long": (["{run}", *RTE, "eval.max_len=4096"], "max_seq_len"),
    "source": (["{run}", *RTE, "eval.source=csv"], "eval.source"),
    "logger": (["{run}", *RTE, "eval.logger.kind=csv"], "eval.logger.kind"),
    "epochs-word": (["{run}", *RTE, "eval.epochs=abc"], "eval.epochs: expected int, got 'abc'"),
    "epochs-float": (["{run}", *RTE, "eval.epochs=1.5"], "eval.epochs: expected int, got 1.5"),
    "lr-word": (["{run}", *RTE, "eval.lr=fast"], "eval.lr: expected float, got 'fast'"),
    "lr-inf": (["{run}", *RTE, "eval.lr=inf"], "eval.lr: expected a finite number, got inf"),
    "task-lr-nan": (["{run}", *RTE, "eval.tasks.rte.lr=nan"],
                    "eval.tasks.rte.lr: expected a finite number, got nan"),
    "out-exists": (["{run}", *RTE, "-o", "{bad}/existing"], "already exists"),
}  # fmt: skip


@pytest.mark.parametrize("case", BAD_INPUT)
def test_bad_input_is_one_line_exit_2_and_writes_nothing(
    case: str, altup, pretrained: Path, glue_dir: Path, bad: Path, tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    for name, value in OFFLINE.items():  # the hub case must fail here, not reach the network
        monkeypatch.setenv(name, value)
    if case == "hf-offline":  # datasets reads the variables on import: set its copies too
        datasets = pytest.importorskip("datasets")
        from huggingface_hub import constants

        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
        monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
        monkeypatch.setattr(datasets.config, "HF_DATASETS_OFFLINE", True)
        monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path.parent / "hf")
    template, message = BAD_INPUT[case]
    paths = {"run": str(pretrained), "data": str(glue_dir), "bad": str(bad)}
    args = [a.format(**paths) for a in template]
    before = tree(tmp_path, bad, glue_dir, pretrained)
    result = altup("eval", "glue", *args, f"eval.output_dir={tmp_path / 'o'}")
    assert result.code == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert message in lines[0], lines[0]
    assert tree(tmp_path, bad, glue_dir, pretrained) == before
