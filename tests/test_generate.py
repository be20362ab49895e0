"""Generation with the KV cache: for every model kind (grown ones too) the logits of a
prefill and then one token at a time equal the full forward's at every position, in a
dynamic and a static cache, unpadded and left-padded; greedy generation equals an uncached
argmax loop, seeded sampling is reproducible, top-k 1 is greedy, a batch of prompts of
different lengths gives each prompt's own tokens, and `altup generate` streams, writes its
record and refuses bad input in one line (exit 2). Planted bugs fail the exactness check."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch

import altup_cli
from altup_cli.bench.growth import randomize_
from altup_cli.growth import grow, parse_op
from altup_cli.models import AltUpConfig, FFNConfig, ModelConfig, TransformerLM
from altup_cli.models.generation import generate_tokens
from altup_cli.models.sampling import Sampling, filtered_logits
from altup_cli.models.transformer import Rotary
from altup_cli.runs.export import save_export
from tests.helpers.prose import make_prose

TOLERANCE = {torch.float32: 1e-5, torch.float64: 1e-10}
VOCAB, T = 97, 11  # 11 tokens: prefills of 1, 5 (a multiple of neither stride 2 nor 3), 11
PREFILLS = (1, 5, T)
_PEER = {"num_experts": 64, "heads": 2, "topk": 4, "d_key": 8}
KINDS = {
    "dense": {},
    "untied": {"tie_embeddings": False},
    "altup K=1": {"altup": AltUpConfig(mode="altup", K=1)},
    "altup K=2": {"altup": AltUpConfig(mode="altup", K=2)},
    "altup K=2 same predicted mean": {
        "altup": AltUpConfig(
            mode="altup", K=2, schedule="same", layer_input="predicted", readout="mean"
        )
    },
    "altup K=3 concat predicted": {
        "altup": AltUpConfig(mode="altup", K=3, readout="concat", layer_input="predicted"),
        "tie_embeddings": False,
    },
    "recycled K=2": {"altup": AltUpConfig(mode="recycled", K=2, readout="first")},
    "sequence s=2 fixed": {"altup": AltUpConfig(mode="sequence", stride=2)},
    "sequence s=3 rotating [1,2]": {
        "altup": AltUpConfig(mode="sequence", stride=3, anchors="rotating", sequence_layers=[1, 2])
    },
    "stride_skip s=2 rotating": {
        "altup": AltUpConfig(mode="stride_skip", stride=2, anchors="rotating")
    },
    "stride_skip s=3 fixed middle": {
        "altup": AltUpConfig(mode="stride_skip", stride=3, sequence_layers="middle")
    },
    "hc K=3": {"altup": AltUpConfig(mode="hc", K=3)},
    "hc K=2 dynamic concat": {"altup": AltUpConfig(mode="hc", K=2, dynamic=True, readout="concat")},
    "mhc K=4 dynamic": {"altup": AltUpConfig(mode="mhc", K=4, dynamic=True, sinkhorn_iters=5)},
    "peer middle": {"ffn": FFNConfig(kind="peer", layers="middle", **_PEER)},
    "pkm all": {"ffn": FFNConfig(kind="pkm", shared_keys=False, **_PEER)},
    "moe token choice": {"ffn": FFNConfig(kind="moe", num_experts=4, topk=2)},
    "moe top-1": {"ffn": FFNConfig(kind="moe", num_experts=4, topk=1)},
}
# Grown models: layers inserted (shifting rotating anchors and AltUp blocks), new rotary
# frequencies, heads and residual width.
GROWN = {
    "grown sequence s=2 rotating": (
        {"altup": AltUpConfig(mode="sequence", stride=2, anchors="rotating")},
        ["layers=+1@1", "key_dim=12", "heads=3"],
    ),
    "grown altup K=3": (
        KINDS["altup K=3 concat predicted"],
        ["layers=+2@1", "residual_width=24", "value_dim=12"],
    ),
    "grown peer": (KINDS["peer middle"], ["mlp_width=48", "layers=+1", "ffn.d_key=12"]),
}
ALL = [*KINDS, *GROWN]


@pytest.fixture(autouse=True)
def one_thread():
    """These models are tiny: a second intra-op thread only spins, and on a shared
    machine its waits cost far more than the work."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def model_of(kind: str, dtype: torch.dtype = torch.float64, seed: int = 0) -> TransformerLM:
    """A small model with every parameter and statistic off its initial value."""
    fields, ops = GROWN.get(kind, (KINDS.get(kind), []))
    cfg = ModelConfig(
        vocab_size=VOCAB, d_model=16, n_layers=4, n_heads=2, d_ff=32, max_seq_len=32, **fields
    )
    with warnings.catch_warnings():  # randomize_ takes the std of a 1 × 1 predictor (K=1)
        warnings.simplefilter("ignore", UserWarning)
        model = randomize_(TransformerLM(cfg), torch.Generator().manual_seed(seed))
    with torch.no_grad():  # … and leaves it NaN
        for p in model.parameters():
            p.nan_to_num_(1.1)
    if ops:
        model = grow(model, [parse_op(op) for op in ops])[0]
        randomize_(model, torch.Generator().manual_seed(seed + 1))  # new weights non-zero
    return model.to(dtype).eval()


def token_ids(rows: int = 2, length: int = T, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, VOCAB, (rows, length), generator=torch.Generator().manual_seed(seed))


def incremental(
    model: TransformerLM, ids: torch.Tensor, prefill: int, pads=None, static=False
) -> torch.Tensor:
    """Logits of a prefill of `prefill` tokens, then of one token at a time."""
    cache = model.new_cache(ids.shape[0], ids.shape[1], pads, static)
    with torch.no_grad():
        steps = [model.decode(ids[:, :prefill], cache)]
        steps += [model.decode(ids[:, t : t + 1], cache) for t in range(prefill, ids.shape[1])]
    return torch.cat(steps, 1)


def cache_error(model: TransformerLM, ids: torch.Tensor, **options) -> float:
    """Max |cached − full| logits over every position and prefill length."""
    with torch.no_grad():
        full = model(ids)
    return max(float((incremental(model, ids, p, **options) - full).abs().max()) for p in PREFILLS)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("kind", ALL)
def test_cached_logits_equal_the_full_forward(kind: str, dtype: torch.dtype) -> None:
    model = model_of(kind, dtype)
    assert cache_error(model, token_ids()) <= TOLERANCE[dtype]


@pytest.mark.parametrize(
    "kind", ["dense", "altup K=3 concat predicted", "sequence s=3 rotating [1,2]",
             "stride_skip s=2 rotating", "grown sequence s=2 rotating"]
)  # fmt: skip
def test_static_cache_and_left_padding_are_exact(kind: str) -> None:
    """Rows left-padded by 0, 4 and 7 slots (so each row's anchors sit at different
    slots) match each row alone, in the dynamic cache and the static one compile uses."""
    model, ids, pads = model_of(kind), token_ids(3), [0, 4, 7]
    padded = ids.clone()
    for row, pad in enumerate(pads):
        padded[row] = torch.cat([torch.zeros(pad, dtype=torch.long), ids[row, : T - pad]])
    assert cache_error(model, ids, static=True) <= 1e-10
    for static in (False, True):
        for prefill in PREFILLS:
            logits = incremental(model, padded, prefill, pads, static)
            for row, pad in enumerate(pads):
                with torch.no_grad():
                    alone = model(ids[row : row + 1, : T - pad])[0]
                assert float((logits[row, pad:] - alone).abs().max()) <= 1e-10


def test_planted_bugs_fail_the_exactness_check(monkeypatch: pytest.MonkeyPatch) -> None:
    """Rotary positions not offset by the cache length (each call's tokens from position
    0), and a Sequence-AltUp layer whose attention also reads its non-anchors, are caught."""
    ids, at = token_ids(), Rotary.at
    monkeypatch.setattr(Rotary, "at", lambda self, p: at(self, p - p[:, :1]))
    assert cache_error(model_of("dense"), ids) > 1e-3
    monkeypatch.setattr(Rotary, "at", at)
    from altup_cli.models.kv_cache import LayerCache

    narrow = LayerCache.narrow
    monkeypatch.setattr(
        LayerCache, "narrow", lambda self, which, valid: narrow(self, which, valid | True)
    )
    for kind in ("sequence s=2 fixed", "grown sequence s=2 rotating"):
        model = model_of(kind)
        with torch.no_grad():
            full = model(ids)
        # stepping one token at a time runs each non-anchor too, writing it as valid
        stepped = incremental(model, ids, 1, static=True)
        assert float((stepped - full).abs().max()) > 1e-3


def uncached_greedy(model: TransformerLM, prompt: list[int], new: int) -> list[int]:
    ids = torch.tensor([prompt])
    with torch.no_grad():
        for _ in range(new):
            ids = torch.cat([ids, model(ids)[:, -1].argmax(-1, keepdim=True)], 1)
    return ids[0, len(prompt) :].tolist()


GREEDY = Sampling(temperature=0)
PROMPTS = [[5, 9, 13, 2, 40, 41, 7], [3], [60, 61, 62, 63]]


@pytest.mark.parametrize(
    "kind", ["dense", "altup K=3 concat predicted", "sequence s=3 rotating [1,2]", "peer middle"]
)
def test_greedy_equals_uncached_argmax_and_a_batch_each_prompt_alone(kind: str) -> None:
    model = model_of(kind, torch.float32)
    batch = generate_tokens(model, PROMPTS, 12, GREEDY)
    assert batch.stops == ["length"] * 3
    for prompt, tokens in zip(PROMPTS, batch.tokens, strict=True):
        assert tokens == uncached_greedy(model, prompt, 12)
        assert tokens == generate_tokens(model, [prompt], 12, GREEDY).tokens[0]


def test_seeded_sampling_is_reproducible_and_top_k_1_is_greedy() -> None:
    model = model_of("altup K=2", torch.float32)

    def sample(seed: int, **settings) -> list[list[int]]:
        sampling = Sampling(**{"temperature": 1.5, **settings})
        gen = torch.Generator().manual_seed(seed)
        return generate_tokens(model, PROMPTS, 16, sampling, generator=gen).tokens

    assert sample(0) == sample(0)
    assert sample(0) != sample(1)
    assert sample(0, top_p=0.9) != sample(1, top_p=0.9)
    greedy = generate_tokens(model, PROMPTS, 16, GREEDY).tokens
    assert sample(0, top_k=1) == greedy == sample(3, top_p=1e-6)


def test_top_k_and_top_p_keep_the_likeliest_tokens() -> None:
    logits = torch.tensor([[0.5, 0.3, 0.15, 0.05]]).log()
    kept = filtered_logits(logits, Sampling(temperature=1, top_p=0.7)).isfinite()
    assert kept.tolist() == [[True, True, False, False]]  # 0.5 + 0.3 ≥ 0.7: the nucleus
    kept = filtered_logits(logits, Sampling(temperature=1, top_k=3)).isfinite()
    assert kept.tolist() == [[True, True, True, False]]
    for bad in ({"top_p": 0}, {"top_p": 1.5}, {"temperature": -1}, {"top_k": -1}):
        with pytest.raises(ValueError):
            Sampling(**bad)


def test_eos_stops_a_row_and_the_context_is_checked() -> None:
    model = model_of("dense", torch.float32)
    free = generate_tokens(model, PROMPTS, 8, GREEDY).tokens
    eos = free[0][3]
    stopped = generate_tokens(model, PROMPTS, 8, GREEDY, eos_id=eos)
    assert stopped.tokens[0] == free[0][: free[0].index(eos)]
    assert stopped.stops[0] == "eos"
    for row in (1, 2):
        expected = free[row][: free[row].index(eos)] if eos in free[row] else free[row]
        assert stopped.tokens[row] == expected
    with pytest.raises(ValueError, match="exceeds the model's context of 32"):
        generate_tokens(model, [[1] * 30], 3, GREEDY)
    cache = model.new_cache(1, 4)
    model.decode(torch.ones(1, 4, dtype=torch.long), cache)
    with pytest.raises(ValueError, match="do not fit"):
        model.decode(torch.ones(1, 1, dtype=torch.long), cache)
    routed = FFNConfig(kind="moe", num_experts=4, topk=2, routing="expert_choice")
    moe = TransformerLM(ModelConfig(vocab_size=VOCAB, d_model=16, n_layers=2, n_heads=2,
                                    d_ff=32, ffn=routed))  # fmt: skip
    with pytest.raises(ValueError, match="not causal"):
        moe.new_cache(1, 4)


# ---- the command and the package API ------------------------------------------------


@pytest.fixture(scope="module")
def tokenizer_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from altup_cli.data.tokenizer import train_bpe

    path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    train_bpe(make_prose(200), vocab_size=300).save(str(path))
    return path


def export(directory: Path, tokenizer_file: Path, **fields) -> Path:
    cfg = ModelConfig(vocab_size=320, d_model=16, n_layers=2, n_heads=2, d_ff=32,
                      max_seq_len=32, **fields)  # fmt: skip
    torch.manual_seed(0)
    return save_export(TransformerLM(cfg), directory, tokenizer_file)


def test_generate_command_streams_and_writes_its_record(altup, tmp_path, tokenizer_file) -> None:
    model_dir = export(tmp_path / "m", tokenizer_file, altup=AltUpConfig(mode="altup", K=2))
    out = altup("generate", str(model_dir), "--prompt", "the old king", "-n", "6",
                "--temperature", "0", "--json", str(tmp_path / "g.json"))  # fmt: skip
    assert out.code == 0, out.stderr
    record = json.loads((tmp_path / "g.json").read_text())
    [completion] = record["completions"]
    assert out.stdout == "the old king" + completion["text"] + "\n"
    assert completion["new_tokens"] <= 6 and record["tokens_per_second"] > 0
    model, _ = altup_cli.load(model_dir)
    api = altup_cli.generate(model, altup_cli.load_tokenizer(model_dir), "the old king",
                             max_new_tokens=6, temperature=0)  # fmt: skip
    assert api[0].text == completion["text"]

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("the merchant\n\nher brother fears\n")
    args = ["generate", str(model_dir), "--prompts-file", str(prompts), "--num-samples", "2",
            "-n", "5", "--seed", "7", "--top-k", "20", "--top-p", "0.9"]  # fmt: skip
    runs = [altup(*args, "--json", str(tmp_path / f"s{i}.json")) for i in range(2)]
    assert all(r.code == 0 for r in runs) and runs[0].stdout == runs[1].stdout
    samples = json.loads((tmp_path / "s0.json").read_text())["completions"]
    assert [(c["prompt"], c["sample"]) for c in samples] == [
        ("the merchant", 0), ("the merchant", 1), ("her brother fears", 0),
        ("her brother fears", 1),
    ]  # fmt: skip


def test_bad_generate_input_is_one_line_and_exit_2(altup, tmp_path, tokenizer_file) -> None:
    model_dir = str(export(tmp_path / "m", tokenizer_file))
    moe_dir = str(export(tmp_path / "moe", tokenizer_file, ffn=FFNConfig(
        kind="moe", num_experts=4, topk=2, routing="expert_choice")))  # fmt: skip
    other = tmp_path / "other"
    other.mkdir()
    (other / "config.json").write_text('{"format": "something-else"}')
    cases = {
        "not an altup export": [str(other), "--prompt", "hi"],
        "empty": [model_dir, "--prompt", ""],
        "top-p must be in (0, 1]": [model_dir, "--prompt", "hi", "--top-p", "0"],
        "top-p must be in": [model_dir, "--prompt", "hi", "--top-p", "1.5"],
        "temperature must be": [model_dir, "--prompt", "hi", "--temperature", "-1"],
        "top-k must be": [model_dir, "--prompt", "hi", "--top-k", "-2"],
        "exceeds the model's context": [model_dir, "--prompt", "the old king " * 12],
        "max-new-tokens must be": [model_dir, "--prompt", "hi", "-n", "0"],
        "not causal": [moe_dir, "--prompt", "hi"],
        "give one of --prompt": [model_dir],
    }
    for message, args in cases.items():
        out = altup("generate", *args)
        assert out.code == 2, (message, out.stderr)
        assert out.stderr.count("\n") == 1 and message in out.stderr, out.stderr
        assert out.stdout == ""
