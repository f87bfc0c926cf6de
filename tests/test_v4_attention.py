"""DeepSeek-V4's attention layer against transformers' ``DeepseekV4Attention``, its gathered form
against its dense reference, and its cache: one chunk = several chunks = token by token, ragged.

Shapes are unlike V4's: odd head counts, head dims that are not powers of two, rope dims not 64,
compression rates and windows that do not divide the sequence length. The indexer has 16 heads:
with few heads the ReLU zeroes many scores and top-k picks among exact ties, which
tests tie-breaking, not the maths.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from conftest import assert_within_rounding
from latentattn.attention.v4 import V4Attention
from latentattn.cache.build import build_cache
from latentattn.cache.step import fresh_step
from latentattn.config import CSA, HCA, SLIDING, ModelConfig, RopeConfig, V4AttentionConfig, YarnConfig

transformers = pytest.importorskip("transformers")
from transformers.masking_utils import create_sliding_window_causal_mask  # noqa: E402
from transformers.models.deepseek_v4 import modeling_deepseek_v4 as hf  # noqa: E402

TYPES = (SLIDING, CSA, HCA)
SHAPES = {  # heads, head_dim, rope, q_lora, groups, o_rank, window, m, m', indexer heads x dim, k
    "odd": (3, 40, 12, 24, 3, 10, 6, 3, 5, 16, 20, 4),
    "wide-k": (5, 36, 8, 20, 5, 7, 4, 4, 7, 16, 12, 100),  # k above every possible entry count
}


def configs(name: str) -> tuple[ModelConfig, object]:
    h, d, r, ql, g, orank, w, m, m2, ih, idim, k = SHAPES[name]
    yarn = YarnConfig(factor=4.0, original_max_position_embeddings=16)
    a = V4AttentionConfig(n_heads=h, head_dim=d, qk_rope_head_dim=r, q_lora_rank=ql, o_groups=g,
                          o_lora_rank=orank, layer_types=TYPES, sliding_window=w, csa_rate=m,
                          hca_rate=m2, index_n_heads=ih, index_head_dim=idim, index_topk=k,
                          compress_rope=RopeConfig(theta=160000.0, interleaved=True, yarn=yarn))
    cfg = ModelConfig(vocab_size=64, dim=48, n_layers=3, attention=a, intermediate_size=32,
                      rope=RopeConfig(theta=10000.0, interleaved=True), max_seq_len=64)
    hc = transformers.DeepseekV4Config(
        vocab_size=64, hidden_size=48, num_hidden_layers=3, num_attention_heads=h, head_dim=d,
        q_lora_rank=ql, partial_rotary_factor=r / d, o_groups=g, o_lora_rank=orank, sliding_window=w,
        compress_rates={CSA: m, HCA: m2}, layer_types=list(TYPES), index_n_heads=ih,
        index_head_dim=idim, index_topk=k, max_position_embeddings=64,
        rope_parameters={"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16,
                         "beta_fast": 32.0, "beta_slow": 1.0})
    hc._attn_implementation = "eager"
    return cfg, hc


def randomise(module: torch.nn.Module, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("layer", range(3), ids=TYPES)
def test_layer_matches_transformers(shape: str, layer: int) -> None:
    cfg, hc = configs(shape)
    ref = hf.DeepseekV4Attention(hc, layer)
    randomise(ref, layer)
    ours = V4Attention(cfg, layer)
    ours.load_state_dict(ref.state_dict())  # strict: every name is transformers'
    t = 29
    x = torch.randn(2, t, cfg.dim)
    pos = torch.arange(t).expand(2, t)
    rot = hf.DeepseekV4RotaryEmbedding(hc)
    pe = {kind: rot(x, pos, kind) for kind in ("main", "compress")}
    mask = create_sliding_window_causal_mask(config=hc, inputs_embeds=x, attention_mask=None,
                                             cache=None, position_ids=pos)
    with torch.no_grad():
        want_hf = ref(x, pe, pos, mask)[0]
        got = ours(x, None, fresh_step(2, t, x.device), None)
        dense = ours.reference(x)
        exact = ours.double().reference(x.double())
    a = cfg.attention
    assert isinstance(a, V4AttentionConfig)
    # Longest chain behind one output: the score dot product, the softmax over window + entries,
    # the head's o_a group and o_b.
    terms = (a.head_dim + a.sliding_window + t + a.n_heads * a.head_dim // a.o_groups
             + a.o_groups * a.o_lora_rank)
    assert_within_rounding(got, exact, want_hf, terms=terms, what="fast form vs float64")
    assert_within_rounding(dense, exact, want_hf, terms=terms, what="dense reference vs float64")


def run_chunks(attn: V4Attention, x: torch.Tensor, chunks: list[int]) -> torch.Tensor:
    cache = build_cache([attn.cache_spec()], x.shape[0], 64, x.dtype)
    outs, s = [], 0
    for c in chunks:
        outs.append(attn(x[:, s:s + c], None, cache.step(c), cache[0]))
        cache.advance(c)
        s += c
    return torch.cat(outs, dim=1)


@pytest.mark.parametrize("layer", range(3), ids=TYPES)
@pytest.mark.parametrize("chunks", [[29], [7, 1, 9, 12], [1] * 29, [5, 24]],
                         ids=["one", "uneven", "token-by-token", "short-then-long"])
def test_prefill_chunked_and_decode_agree(layer: int, chunks: list[int]) -> None:
    cfg, _ = configs("odd")
    attn = V4Attention(cfg, layer)
    randomise(attn, 10 + layer)
    x = torch.randn(2, 29, cfg.dim)
    with torch.no_grad():
        full = attn(x, None, fresh_step(2, 29, x.device), None)
        got = run_chunks(attn, x, chunks)
        exact = attn.double()(x.double(), None, fresh_step(2, 29, x.device), None)
    assert_within_rounding(got, exact, full, terms=200, what=f"chunks {chunks}")


@pytest.mark.parametrize("layer", range(3), ids=TYPES)
def test_ragged_rows_match_their_own_runs(layer: int) -> None:
    cfg, _ = configs("odd")
    attn = V4Attention(cfg, layer)
    randomise(attn, 20 + layer)
    x = torch.randn(2, 29, cfg.dim)
    with torch.no_grad():
        full = attn(x, None, fresh_step(2, 29, x.device), None)
        cache = build_cache([attn.cache_spec()], 2, 64, x.dtype)
        first = torch.tensor([20, 29])
        y1 = attn(x, None, cache.step(29, first), cache[0])
        cache.advance(29, first)
        rest = torch.zeros(2, 9, cfg.dim)
        rest[0] = x[0, 20:]
        second = torch.tensor([9, 0])
        y2 = attn(rest, None, cache.step(9, second), cache[0])
    got = torch.cat((y1[0, :20], y2[0]))
    bound = 8 * torch.finfo(torch.float32).eps * full.abs().max().item() * 200**0.5
    assert (got - full[0]).abs().max().item() <= bound
    assert (y1[1] - full[1]).abs().max().item() <= bound


@pytest.mark.parametrize("layer", [1, 2], ids=[CSA, HCA])
def test_an_entry_appears_exactly_when_its_window_completes(layer: int) -> None:
    cfg, _ = configs("odd")
    attn = V4Attention(cfg, layer)
    randomise(attn, 30 + layer)
    assert attn.compressor is not None
    m = attn.compressor.rate
    x = torch.randn(1, 3 * m, cfg.dim)
    with torch.no_grad():
        want = attn.compressor(x, fresh_step(1, 3 * m, x.device), None)  # (1, 3, D)
        cache = build_cache([attn.cache_spec()], 1, 64, x.dtype)
        state = cache[0].compressor  # type: ignore[attr-defined]
        for t in range(3 * m):
            attn(x[:, t:t + 1], None, cache.step(1), cache[0])
            cache.advance(1)
            written = int((state.entries[0].abs().sum(-1) > 0).sum())
            assert written == (t + 1) // m, f"after token {t}: {written} entries"
    # The same pooling of the same tokens; only the projections' GEMMs (1 row vs 3m) round apart.
    bound = 4 * torch.finfo(torch.float32).eps * cfg.dim**0.5 * want.abs().max().item()
    assert (state.entries[:, :3] - want).abs().max().item() <= bound


@pytest.mark.parametrize("layer", range(3), ids=TYPES)
def test_cache_nbytes_is_the_formula(layer: int) -> None:
    cfg, _ = configs("odd")
    a = cfg.attention
    assert isinstance(a, V4AttentionConfig)
    attn = V4Attention(cfg, layer)
    batch, cap, size = 3, 50, 2  # bf16
    layer_cache = build_cache([attn.cache_spec()], batch, cap, torch.bfloat16)[0]
    want = a.sliding_window * a.head_dim  # the window ring
    if layer == 1:  # CSA: entries + 2m pending tokens of kv and gate (2 series), and the indexer's
        m = a.csa_rate
        want += cap // m * a.head_dim + 2 * (2 * m) * (2 * a.head_dim)
        want += cap // m * a.index_head_dim + 2 * (2 * m) * (2 * a.index_head_dim)
    if layer == 2:  # HCA: entries + m' pending tokens of kv and gate
        want += cap // a.hca_rate * a.head_dim + 2 * a.hca_rate * a.head_dim
    assert layer_cache.nbytes == batch * size * want


def test_gradients_reach_the_compressors_through_the_gather() -> None:
    cfg, _ = configs("odd")
    for layer in (1, 2):
        attn = V4Attention(cfg, layer)
        randomise(attn, 40 + layer)
        x = torch.randn(2, 29, cfg.dim, requires_grad=True)
        attn(x, None, fresh_step(2, 29, x.device), None).square().sum().backward()
        assert attn.compressor is not None
        for name in ("kv_proj", "gate_proj"):
            grad = getattr(attn.compressor, name).weight.grad
            assert grad is not None and grad.abs().sum() > 0, name
        assert attn.compressor.position_bias.grad is not None
        assert attn.sinks.grad is not None and x.grad is not None


def test_a_bf16_layer_keeps_sinks_and_position_bias_in_fp32() -> None:
    cfg, _ = configs("odd")
    attn = V4Attention(cfg, 1).to(torch.bfloat16)
    assert attn.q_b_proj.weight.dtype == torch.bfloat16
    assert attn.sinks.dtype == torch.float32
    assert attn.compressor is not None and attn.compressor.position_bias.dtype == torch.float32
    x = torch.randn(1, 13, cfg.dim, dtype=torch.bfloat16)
    y = attn(x, None, fresh_step(1, 13, x.device), None)
    assert y.dtype == torch.bfloat16 and torch.isfinite(y).all()


def test_config_rejects_impossible_shapes() -> None:
    cfg, _ = configs("odd")
    a = cfg.attention
    assert isinstance(a, V4AttentionConfig)
    from latentattn.errors import ConfigError
    cases = (({"o_groups": 7}, "o_groups"), ({"qk_rope_head_dim": 13}, "qk_rope_head_dim"),
             ({"layer_types": (SLIDING, "global")}, "layer_types"),
             ({"index_head_dim": 6}, "index_head_dim"), ({"sliding_window": 0}, "sliding_window"))
    for change, field in cases:
        with pytest.raises(ConfigError, match=field):
            dataclasses.replace(a, **change)
    with pytest.raises(ConfigError, match="layer_types"):
        dataclasses.replace(cfg, n_layers=4)


def test_the_indexer_learns_from_its_kl_alone() -> None:
    """The KL reaches the indexer's weights and nothing else (its inputs are detached), and
    training the indexer on it lowers it."""
    cfg, _ = configs("odd")
    attn = V4Attention(cfg, 1)
    randomise(attn, 50)
    assert attn.indexer is not None
    x = torch.randn(2, 29, cfg.dim)
    step = fresh_step(2, 29, x.device)
    q, kv, c_q, _ = attn.project(x, step.positions)
    selected, _ = attn.indexer.select(x, c_q, step, None)
    probs: list[torch.Tensor] = []
    attn.attend(x, q, kv, c_q, step, None, entry_probs=probs)
    target = torch.cat(probs, dim=1)
    loss = attn.indexer_kl(x, c_q, step, selected, target)
    loss.backward()
    assert loss.item() >= 0
    grad = attn.indexer.q_b_proj.weight.grad
    assert grad is not None and grad.abs().sum() > 0
    assert attn.q_a_proj.weight.grad is None and attn.kv_proj.weight.grad is None
    opt = torch.optim.Adam(attn.indexer.parameters(), lr=1e-2)
    first = loss.item()
    for _ in range(30):
        opt.zero_grad()
        loss = attn.indexer_kl(x, c_q.detach(), step, selected, target.detach())
        loss.backward()
        opt.step()
    assert loss.item() < first


def test_decode_equals_prefill_even_where_index_scores_tie() -> None:
    """With 2 indexer heads the ReLU zeroes many scores and top-k chooses among exact ties;
    select_topk breaks them by position (latentattn.kernels.sparse._top), so a token-by-token
    decode picks what the one-chunk prefill picks (transformers' batched and one-row topk break
    ties differently and depart by up to 0.1 in the logits)."""
    cfg, _ = configs("odd")
    a = cfg.attention
    assert isinstance(a, V4AttentionConfig)
    cfg = dataclasses.replace(cfg, attention=dataclasses.replace(a, index_n_heads=2))
    attn = V4Attention(cfg, 1)
    randomise(attn, 60)
    x = torch.randn(2, 29, cfg.dim)
    assert attn.indexer is not None
    with torch.no_grad():
        step = fresh_step(2, 29, x.device)
        q, w = attn.indexer.queries(x, attn.q_a_norm(attn.q_a_proj(x)), step.positions)
        keys = attn.indexer(x, step, None)
        scores = (torch.einsum("bthd,bed->bthe", q, keys).relu() * w[..., None]).sum(2)  # (B, T, E)
        visible = torch.arange(keys.shape[1])[None, None, :] < ((step.positions + 1) // a.csa_rate)[..., None]
        ranked = scores.masked_fill(~visible, float("-inf")).sort(dim=-1, descending=True).values
        k = a.index_topk
        boundary_ties = (ranked[..., k - 1] == ranked[..., k]) & (ranked[..., k] > float("-inf"))
        assert boundary_ties.any()  # some query's k-th and (k+1)-th entries tie: the case under test
        full = attn(x, None, step, None)
        got = run_chunks(attn, x, [1] * 29)
    bound = 8 * torch.finfo(torch.float32).eps * full.abs().max().item() * 200**0.5
    assert (got - full).abs().max().item() <= bound
