"""LAuReL (`altup.laurel_rank`): u + Laurel(u) equals transformers' `Gemma3nTextLaurelBlock`
with its weights copied (fp64, outputs and gradients); with any variant a model with
LAuReL equals the one without at init, bit for bit, and rank 0 adds no state-dict key;
gradients reach A, B and the gain; FLOPs equal FlopCounterMode, parameters the model;
growth is exact; the KV cache is exact; a negative rank is one line, exit 2."""

from __future__ import annotations

import warnings
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from altup_cli.bench.growth import randomize_
from altup_cli.growth import grow, parse_op
from altup_cli.models import AltUpConfig, ModelConfig, TransformerLM, laurel
from altup_cli.models.counting import parameter_counts, training_flops_per_token
from altup_cli.models.laurel import Laurel
from altup_cli.models.registry import stream_variant
from altup_cli.models.transformer import RMSNorm, block_of
from tests.helpers.flops import count_flops
from tests.test_gemma3n_altup import fp64_reference, hf_config
from tests.test_generate import cache_error, token_ids

D, R = 32, 8
BASE = dict(vocab_size=97, d_model=D, n_layers=3, n_heads=2, d_ff=64, max_seq_len=32)
VARIANTS = {
    "off": {},
    "altup K=2": dict(mode="altup", K=2),
    "recycled K=2": dict(mode="recycled", K=2),
    "sequence s=2": dict(mode="sequence", stride=2, anchors="rotating"),
    "gemma3n K=4": dict(mode="gemma3n", K=4),
}


def config(variant: str, rank: int = R, **fields) -> ModelConfig:
    altup = AltUpConfig(**VARIANTS[variant], laurel_rank=rank)
    return ModelConfig(**{**BASE, **fields}, altup=altup)


def randomised(cfg: ModelConfig, seed: int = 0) -> TransformerLM:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        torch.manual_seed(seed)
        model = randomize_(TransformerLM(cfg), torch.Generator().manual_seed(seed))
    return model.double().eval()


def test_laurel_equals_gemma3n_text_laurel_block(monkeypatch) -> None:
    """Matched: A / B / the post-norm's gain are its linear_left / linear_right /
    post_laurel_norm weights, the norm's eps its rms_norm_eps; ours is the learned part,
    so the reference's output is u + ours(u). Gemma3nRMSNorm computes in fp32 via
    `.float()`, kept fp64 for the comparison (see tests/test_gemma3n_altup.py)."""
    from transformers.models.gemma3n.modeling_gemma3n import Gemma3nTextLaurelBlock

    torch.manual_seed(0)
    ref = Gemma3nTextLaurelBlock(hf_config(None)).double()
    ours = Laurel(D, R, RMSNorm(D, 1e-6)).double()
    with torch.no_grad():
        ours.norm.weight.normal_(1.0, 0.3)
        ref.linear_left.weight.copy_(ours.down.weight)
        ref.linear_right.weight.copy_(ours.up.weight)
        ref.post_laurel_norm.weight.copy_(ours.norm.weight)
    u = torch.randn(2, 5, D, dtype=torch.float64, requires_grad=True)
    weights = torch.linspace(-1, 1, u.numel(), dtype=u.dtype).view(u.shape)
    with fp64_reference(monkeypatch):
        expected = ref(u)
        theirs = torch.autograd.grad((expected * weights).sum(), [u, *ref.parameters()])
    got = u + ours(u)
    mine = torch.autograd.grad((got * weights).sum(), [u, *ours.parameters()])
    assert (got - expected).abs().max() <= 1e-10
    for a, b in zip(mine, theirs, strict=True):
        assert (a - b).abs().max() <= 1e-10


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_at_init_a_model_with_laurel_is_the_model_without(variant: str) -> None:
    """The post-norm's gain starts at 0: the term is exactly 0, the logits bit-identical."""
    torch.manual_seed(0)
    without = TransformerLM(config(variant, rank=0))
    torch.manual_seed(0)
    with_laurel = TransformerLM(config(variant))
    missing, unexpected = with_laurel.load_state_dict(without.state_dict(), strict=False)
    assert not unexpected and missing and all(".laurel." in k for k in missing)
    ids = token_ids(2, 13)
    with torch.no_grad():
        assert torch.equal(with_laurel.eval()(ids), without.eval()(ids))


def test_the_term_sits_beside_attention_on_its_normed_input() -> None:
    """Gemma 3n applies LAuReL to the attention's normed input, in the attention branch."""
    block = block_of(randomised(config("off")).blocks[1])
    with torch.no_grad():
        block.attn.wo.weight.zero_()
        x = torch.randn(2, 5, D, dtype=torch.float64)
        cos, sin = (t.double() for t in TransformerLM(config("off")).rotary.cos_sin(5, x.device))
        expected = block.laurel(block.attn_norm(x))
        assert (block.attention_branch(x, cos, sin) - expected).abs().max() == 0
        assert (block.ffn_branch(x) - block.feedforward(block.ffn_norm(x))).abs().max() == 0


def test_rank_zero_adds_no_state_dict_key() -> None:
    keys = set(TransformerLM(config("off", rank=0)).state_dict())
    assert keys == set(TransformerLM(ModelConfig(**BASE)).state_dict())
    assert not any("laurel" in k for k in keys)
    assert all(block_of(b).laurel is None for b in TransformerLM(config("off", 0)).blocks)


def test_gradients_reach_a_b_and_the_gain() -> None:
    model = TransformerLM(config("altup K=2")).train()
    ids = token_ids(2, 13)
    F.cross_entropy(model(ids).flatten(0, 1), ids.flatten()).backward()
    for b in model.blocks:  # at init only the gain learns (A and B sit behind it)
        assert block_of(b).laurel.norm.weight.grad.ne(0).any()
    model = randomised(config("gemma3n K=4")).train()
    F.cross_entropy(model(ids).flatten(0, 1), ids.flatten()).backward()
    for b in model.blocks:
        for p in block_of(b).laurel.parameters():
            assert p.grad.ne(0).any()


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("T", [2, 13])
def test_flops_and_parameters_are_counted(variant: str, T: int) -> None:
    """LAuReL's A·u and B·(Au) per layer and token its Block runs on, on top of the
    model without it; its parameters 2dr + d per layer."""
    cfg = config(variant, tie_embeddings=False)
    plain = replace(cfg, altup=replace(cfg.altup, laurel_rank=0))
    model = TransformerLM(cfg).train()
    assert model.num_parameters() == parameter_counts(plain)["total"] + laurel.parameters(cfg)
    assert laurel.parameters(cfg) == 3 * (2 * D * R + D)
    ids = torch.randint(0, 97, (2, T))
    counter = count_flops(
        lambda: F.cross_entropy(model(ids).flatten(0, 1), ids.flatten()).backward()
    )
    processed = [n / T for n in stream_variant(cfg.altup.mode).tokens(cfg, T)]
    per_token = training_flops_per_token(plain, T)["total"] + 3 * laurel.flops(cfg, processed)
    assert counter.get_total_flops() == pytest.approx(per_token * 2 * T, rel=1e-12)
    # …and the model's own count (what the sweep and compare use) includes it
    assert training_flops_per_token(cfg, T)["total"] == pytest.approx(per_token, rel=1e-12)
    assert parameter_counts(cfg)["total"] == model.num_parameters()


def test_counting_counts_laurel() -> None:
    """LAuReL's parameters are counted (in the attention component, whose branch it is)."""
    cfg = config("off")
    assert parameter_counts(cfg)["total"] == TransformerLM(cfg).num_parameters()


OPS = ["mlp_width=96", "heads=3", "value_dim=24", "key_dim=24", "residual_width=48",
       "layers=+2@1", "layers=+1"]  # fmt: skip


@pytest.mark.parametrize("variant", ["off", "altup K=2"])
@pytest.mark.parametrize("op", [*OPS, " ".join(OPS)])
def test_growth_is_exact(variant: str, op: str) -> None:
    model = randomised(config(variant))
    ids = token_ids(2, 13)
    with torch.no_grad():
        before = model(ids)
        grown = grow(model, [parse_op(o) for o in op.split()], seed=1)[0]
        assert (grown(ids) - before).abs().max() <= 1e-10


def test_inserted_layers_start_with_a_zero_gain() -> None:
    grown = grow(randomised(config("off")), [parse_op("layers=+1@1")])[0]
    assert block_of(grown.blocks[1]).laurel.norm.weight.eq(0).all()
    assert block_of(grown.blocks[0]).laurel.norm.weight.ne(0).all()


@pytest.mark.parametrize("variant", ["off", "sequence s=2"])
def test_cached_logits_equal_the_full_forward(variant: str) -> None:
    model = randomised(config(variant))
    assert cache_error(model, token_ids(2, 11)) <= 1e-10


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["altup.laurel_rank=-1"], "altup.laurel_rank must be >= 0, got -1"),
        (["altup=k2", "altup.laurel_rank=-3"], "altup.laurel_rank must be >= 0, got -3"),
    ],
)
def test_bad_rank_is_one_line_and_exit_2(
    altup, overrides: list[str], message: str, tmp_path: Path, cache_dir: Path
) -> None:
    result = altup("train", *overrides, f"run.output_dir={tmp_path}", f"run.cache_dir={cache_dir}")
    assert result.code == 2
    lines = [ln for ln in result.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], result.stderr
    assert not any(tmp_path.iterdir())


def test_a_laurel_run_trains_via_the_command_line(altup, tmp_path: Path, cache_dir: Path) -> None:
    """`altup.laurel_rank=64` is the switch, with any variant (here Gemma 3n's AltUp)."""
    result = altup(
        "train", "--dry-run", "altup=gemma3n", "altup.laurel_rank=64",
        f"run.output_dir={tmp_path}", f"run.cache_dir={cache_dir}",
    )  # fmt: skip
    assert result.code == 0, result.stderr
    assert "laurel_rank: 64" in result.stdout and "mode: gemma3n" in result.stdout
