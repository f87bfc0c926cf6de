"""``latentattn compare``'s V4 variant: its shape at the family's scale, its parameter match, the
share of its context a query reads (against hand arithmetic and a brute-force union), its cache
bytes (against latentattn.calc's V4 formula) and a quick run whose table has its row."""

from __future__ import annotations

import itertools
import json
import math
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from latentattn import Transformer
from latentattn.calc.density import v4_read_fraction, v4_tokens_read
from latentattn.calc.v4_kv import v4_cache_bytes
from latentattn.cli import main
from latentattn.compare.measure import kv_bytes_per_token, kv_parameters_per_layer
from latentattn.compare.variants import build_variants, family_size, v4_variant
from latentattn.config import CSA, HCA, SLIDING, V4AttentionConfig
from latentattn.train.family import FamilySize, v4_layer_types
from latentattn.train.v4 import entry_mass, set_v4_indexer_training, v4_layers, v4_selection_recall

# The tiny family of tests/test_compare.py: dim 32, 2 layers, 32-byte windows, one LR, no pilots.
TINY = ["--steps", "8", "--dim", "32", "--layers", "2", "--seq-len", "32", "--batch-size", "2",
        "--lr", "3e-3", "--contexts", "16,32", "--quiet"]


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    threads = torch.get_num_threads()  # tiny matrices: see tests/test_compare.py
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _harmonic(n: int) -> float:
    return sum(1 / i for i in range(1, n + 1))


def test_v4_shape_scales_with_the_window() -> None:
    # The standard run (dim 64, 3 layers, 128 tokens) and FamilySize() (dim 128, 4 layers, 256).
    a = v4_variant(family_size(64, 3, 128)).config.attention
    assert isinstance(a, V4AttentionConfig)
    assert (a.sliding_window, a.csa_rate, a.index_topk, a.hca_rate) == (16, 4, 4, 8)
    assert a.layer_types == (SLIDING, CSA, HCA)
    assert (a.n_heads, a.head_dim, a.qk_rope_head_dim, a.q_lora_rank) == (4, 32, 8, 32)
    b = v4_variant(FamilySize()).config.attention
    assert isinstance(b, V4AttentionConfig)
    assert (b.sliding_window, b.csa_rate, b.index_topk, b.hca_rate) == (32, 4, 8, 16)
    assert b.layer_types == (SLIDING, CSA, HCA, CSA)
    assert v4_layer_types(1) == (CSA,) and v4_layer_types(2) == (CSA, HCA)
    assert v4_layer_types(6) == (SLIDING, CSA, HCA, CSA, HCA, CSA)


@pytest.mark.parametrize("size", [FamilySize(), family_size(64, 3, 128), family_size(32, 2, 32),
                                  family_size(128, 4, 128)])
def test_v4_is_parameter_matched(size: FamilySize) -> None:
    variants = {v.label: v for v in build_variants(size, control=False, retrofit=False)}
    v4 = variants["v4"]
    assert v4.kind == "v4" and v4.mechanism == "V4" and not v4.is_reference
    model = Transformer(v4.config)
    assert all(type(b.self_attn).__name__ == "V4Attention" for b in model.blocks)
    mha = Transformer(variants["mha"].config).num_parameters()
    assert abs(model.num_parameters() - mha) / mha <= 0.03
    # Its attention is larger than MHA's (compressors, indexer), so its SwiGLU is narrower.
    assert v4.config.intermediate_size < variants["mha"].config.intermediate_size
    assert [v.label for v in build_variants(size, v4=False)].count("v4") == 0


def test_tokens_read_by_hand() -> None:
    # sliding, W = 4: the last min(4, t + 1) tokens, each a key.
    assert [v4_tokens_read(t, 4) for t in (0, 2, 9)] == [(1, 1), (3, 3), (4, 4)]
    # HCA, W = 4, m' = 8: t = 5 sees no entry yet; t = 9 one (tokens 0-7) + its window 6-9 covers
    # all 10 tokens with 5 keys; t = 17 two entries (0-15) + 14-17: 18 tokens, 6 keys.
    assert [v4_tokens_read(t, 4, 8) for t in (5, 9, 17)] == [(4, 4), (10, 5), (18, 6)]
    # CSA, W = 4, m = 4, k = 2: t = 20 sees 5 entries, reads 2: 4 + 2 * 4 = 12 of 21 tokens,
    # 6 keys; t = 7 sees 2 entries (0-3, 4-7), reads both: 8 of 8 tokens (capped), 6 keys.
    assert [v4_tokens_read(t, 4, 4, 2) for t in (20, 7)] == [(12, 6), (8, 6)]
    with pytest.raises(ValueError, match="window"):
        v4_tokens_read(9, 2, 4, 1)


@pytest.mark.parametrize(("window", "rate", "topk"), [(4, 4, 1), (4, 4, 2), (6, 4, 3), (8, 2, 2),
                                                      (5, 5, None), (4, 3, None),
                                                      (2, 8, None), (1, 3, None)])
def test_tokens_covered_is_the_best_union(window: int, rate: int, topk: int | None) -> None:
    """The covered count is the union of the window's tokens and the read entries' blocks: exact
    for HCA (all entries read), the largest union over every choice of k entries for CSA."""
    for t in range(40):
        own = set(range(max(0, t + 1 - window), t + 1))
        visible = (t + 1) // rate
        k = visible if topk is None else min(topk, visible)
        best = max(len(own.union(*(range(e * rate, (e + 1) * rate) for e in pick)))
                   for pick in itertools.combinations(range(visible), k))
        assert v4_tokens_read(t, window, rate, topk)[0] == best, t


def test_read_fraction_by_hand() -> None:
    # seq_len 4, W 2, CSA m 2 k 1, HCA m' 2. Covered / visible per query t = 0..3:
    #   sliding 1, 1, 2/3, 1/2 -> 19/24; CSA and HCA cover every visible token -> 1.
    # Keys / visible: sliding as covered; CSA 1/1, 3/2, 3/3, 3/4 -> 17/16; HCA 1, 3/2, 3/3, 4/4 -> 9/8.
    a = V4AttentionConfig(n_heads=2, head_dim=8, qk_rope_head_dim=2, q_lora_rank=4, o_groups=1,
                          o_lora_rank=4, layer_types=(SLIDING, CSA, HCA), sliding_window=2,
                          csa_rate=2, hca_rate=2, index_n_heads=2, index_head_dim=4, index_topk=1)
    r = v4_read_fraction(4, a)
    assert r.covered == pytest.approx({SLIDING: 19 / 24, CSA: 1.0, HCA: 1.0})
    assert r.keys == pytest.approx({SLIDING: 19 / 24, CSA: 17 / 16, HCA: 9 / 8})
    assert r.per_query == pytest.approx((19 / 24 + 2) / 3)
    assert r.keys_per_query == pytest.approx((19 / 24 + 17 / 16 + 9 / 8) / 3)


def test_read_fraction_of_the_standard_run() -> None:
    # L = 128, W = 16, m = 4, k = 4, m' = 8. Sliding: 1 up to t + 1 = 16, then 16 / (t + 1).
    # CSA: 16 window tokens + 4 entries x 4 tokens from t + 1 = 16 on: 1 up to 32, then 32 / (t + 1).
    # HCA: window 16 >= m' covers what the entries leave: 1.
    a = v4_variant(family_size(64, 3, 128)).config.attention
    assert isinstance(a, V4AttentionConfig)
    r = v4_read_fraction(128, a)
    sliding = (16 + 16 * (_harmonic(128) - _harmonic(16))) / 128
    csa = (32 + 32 * (_harmonic(128) - _harmonic(32))) / 128
    assert r.covered == pytest.approx({SLIDING: sliding, CSA: csa, HCA: 1.0})
    assert r.per_query == pytest.approx((sliding + csa + 1) / 3)
    assert math.isclose(sliding, 0.3816, abs_tol=1e-4) and math.isclose(csa, 0.5937, abs_tol=1e-4)


def test_v4_cache_bytes_and_kv_parameters() -> None:
    """The allocated bytes the report uses equal latentattn.calc's V4 formula at the training
    window (bf16; the formula counts the compressors' state at 2 B a value, as allocated in bf16),
    and fp32 doubles them; the KV parameters by hand for the tiny family's CSA and HCA layers."""
    for size in (family_size(32, 2, 32), family_size(64, 3, 128)):
        cfg = v4_variant(size).config
        model = Transformer(cfg)
        bf16 = kv_bytes_per_token(model, torch.bfloat16)
        assert bf16 * size.seq_len == v4_cache_bytes(cfg, size.seq_len, "bf16")
        assert kv_bytes_per_token(model) == 2 * bf16
    # dim 32, D 16, d_I 8: kv_proj 32*16 + kv_norm 16, then per compressor 2 * 32 * series * width
    # (kv_proj, gate_proj) + rate * series * width (position_bias) + width (kv_norm).
    csa = 32 * 16 + 16 + (2 * 32 * 2 * 16 + 4 * 2 * 16 + 16) + (2 * 32 * 2 * 8 + 4 * 2 * 8 + 8)
    hca = 32 * 16 + 16 + (2 * 32 * 16 + 8 * 16 + 16)
    model = Transformer(v4_variant(family_size(32, 2, 32)).config)
    assert kv_parameters_per_layer(model) == round((csa + hca) / 2)


def test_v4_recall(monkeypatch: pytest.MonkeyPatch) -> None:
    """The entry recall against what it must be: an indexer that picks the k most recent entries
    scores exactly the "recent" baseline, "uniform" is k / visible by hand, the shares are
    shares, and the layers' training flag and hooks are as they were."""
    size = family_size(32, 2, 32)  # layers CSA, HCA; CSA: m 4, k 1, 32 tokens
    torch.manual_seed(0)
    model = Transformer(v4_variant(size).config)
    csa = v4_layers(model)[0]
    assert csa.indexer is not None
    set_v4_indexer_training(model, True)
    ids = torch.randint(0, 256, (2, 32))
    (r,) = v4_selection_recall(model, ids)
    # queries t = 7 .. 31 see (t + 1) // 4 = 2 .. 8 entries > k = 1: 4 queries see each of
    # 2..7 entries (t = 7..10, ..., 27..30) and one sees 8 (t = 31); uniform = mean of 1 / visible.
    uniform = (4 * sum(1 / v for v in range(2, 8)) + 1 / 8) / 25
    assert r["uniform"] == pytest.approx(uniform)
    assert all(0 <= x <= 1 + 1e-6 for x in r.values())
    assert csa.train_indexer and not csa._forward_hooks  # restored

    def recent(x: torch.Tensor, c_q: torch.Tensor, step: object, state: object) -> tuple[torch.Tensor, None]:
        visible = (torch.arange(x.shape[1]) + 1) // 4
        return (visible - 1).expand(x.shape[0], -1)[..., None], None  # -1 where none is visible

    monkeypatch.setattr(csa.indexer, "select", recent)
    (r,) = v4_selection_recall(model, ids)
    assert r["indexer"] == pytest.approx(r["recent"], abs=1e-7)
    # The mass: shares of the entries' probability, zero on entries a query cannot see.
    from latentattn.cache.kv import fresh_step

    x = torch.randn(1, 32, 32)
    mass, _, visible = entry_mass(csa, x, fresh_step(1, 32, x.device))
    hidden = torch.arange(mass.shape[-1]) >= visible[..., None]
    assert mass.shape == (1, 32, 8) and bool((mass[hidden] == 0).all()) and bool((mass >= 0).all())


def test_training_trains_the_indexer_on_its_kl() -> None:
    """train() adds the CSA indexers' KL to the LM loss: the LM loss never reaches an indexer (its
    top-k is discrete and its inputs detached), so indexer weights that moved moved by the KL;
    the KL is off after training (evaluation and decode compute none)."""
    from latentattn.data import byte_tokens, train_val_split
    from latentattn.train.loop import train
    from latentattn.train.settings import TrainSettings

    torch.manual_seed(0)
    model = Transformer(v4_variant(family_size(32, 2, 32)).config)
    indexer = v4_layers(model)[0].indexer
    assert indexer is not None
    before = {k: v.clone() for k, v in indexer.state_dict().items()}
    tokens = byte_tokens("The quick brown fox jumps over the lazy dog. " * 60)
    tr, va = train_val_split(tokens)
    settings = TrainSettings(steps=3, batch_size=2, seq_len=32, lr=3e-3, warmup_steps=0, eval_every=0)
    train(model, tr, va, settings, progress=False)
    after = indexer.state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in ("q_b_proj.weight", "kv_proj.weight"))
    assert not any(layer.train_indexer for layer in v4_layers(model))


def test_quick_compare_has_the_v4_row(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    text = tmp_path / "text.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. Pack my box with five dozen "
                    "liquor jugs. " * 100)
    out = tmp_path / "out"
    argv = ["compare", "--quick", "--data", str(text), "--out", str(out), *TINY, "--seeds", "2",
            "--no-control", "--no-retrofit"]
    assert main(argv) == 0
    data = json.loads((out / "results.json").read_text())
    v4 = next(v for v in data["variants"] if v["label"] == "v4")
    assert [v["label"] for v in data["variants"]] == ["mha", "mqa", "gqa", "mla", "dsa", "v4"]
    assert abs(v4["params_vs_mha"]) <= 0.03 and v4["v4_read"]["seq_len"] == 32
    assert 0 < v4["v4_read"]["per_query"] <= 1 and [r["seed"] for r in v4["runs"]] == [0, 1]
    assert all(math.isfinite(r["val_loss"]) for r in v4["runs"])
    assert data["vs_mha"]["v4"]["differences"] == [
        a["val_loss"] - b["val_loss"] for a, b in zip(v4["runs"], data["variants"][0]["runs"], strict=True)]
    assert data["vs_mha"]["v4"]["ci95"] is not None  # two seeds: an interval
    md = (out / "results.md").read_text()
    row = next(line for line in md.splitlines() if line.startswith("| V4 |"))
    assert "reference" not in row and data["vs_mha"]["v4"]["verdict"] in row
    assert "v4: DeepSeek-V4's attention scaled to the 32-token window" in md
    assert "| V4 |" in capsys.readouterr().out
    assert v4["train_flops_per_token"] > 0 and len(v4["dsa_recall"]) == 1  # one CSA layer
