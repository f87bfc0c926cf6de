"""The attention variants: MHA/GQA/MQA relations, MLA's two forms, against plain references."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import assert_close
from latentattn.attention import GroupedQueryAttention, MultiHeadLatentAttention
from latentattn.cache.kv import fresh_step
from latentattn.config import GQAConfig, MLAConfig, ModelConfig, RopeConfig, YarnConfig
from latentattn.rope import RotaryEmbedding


def _cfg(attn: GQAConfig | MLAConfig, rope: RopeConfig | None = None, dim: int = 48) -> ModelConfig:
    return ModelConfig(vocab_size=64, dim=dim, n_layers=1, intermediate_size=64, attention=attn,
                       rope=rope or RopeConfig(interleaved=isinstance(attn, MLAConfig)), max_seq_len=128)


def _run(module: torch.nn.Module, cfg: ModelConfig, x: torch.Tensor) -> torch.Tensor:
    step = fresh_step(x.shape[0], x.shape[1], x.device)
    rope = RotaryEmbedding(cfg.rope_dim, cfg.rope, cfg.max_seq_len)(step.positions)
    return module(x, rope, step)


def mha_reference(m: GroupedQueryAttention, cfg: ModelConfig, x: torch.Tensor) -> torch.Tensor:
    """Textbook causal multi-head attention with half-split RoPE, written out in full."""
    a = cfg.attention
    assert isinstance(a, GQAConfig)
    b, t, _ = x.shape
    group = a.n_heads // a.n_kv_heads
    q = m.q_proj(x).view(b, t, a.n_heads, a.head_dim)
    k = m.k_proj(x).view(b, t, a.n_kv_heads, a.head_dim).repeat_interleave(group, dim=2)
    v = m.v_proj(x).view(b, t, a.n_kv_heads, a.head_dim).repeat_interleave(group, dim=2)
    inv = 1.0 / (cfg.rope.theta ** (torch.arange(0, a.head_dim, 2).float() / a.head_dim))
    ang = torch.arange(t).float()[:, None] * inv  # (T, D/2)
    cos, sin = torch.cat([ang.cos()] * 2, -1)[:, None], torch.cat([ang.sin()] * 2, -1)[:, None]

    def rot(z: torch.Tensor) -> torch.Tensor:
        z1, z2 = z.chunk(2, -1)
        return z * cos + torch.cat((-z2, z1), -1) * sin

    q, k = rot(q), rot(k)
    scores = torch.einsum("bthd,bshd->bhts", q, k) / a.head_dim**0.5
    scores = scores.masked_fill(torch.ones(t, t).triu(1).bool(), float("-inf"))
    o = torch.einsum("bhts,bshd->bthd", scores.softmax(-1), v).reshape(b, t, -1)
    return m.o_proj(o)


@pytest.mark.parametrize("n_kv_heads", [6, 3, 2, 1])
def test_gqa_module_equals_textbook_attention(n_kv_heads: int) -> None:
    cfg = _cfg(GQAConfig(n_heads=6, n_kv_heads=n_kv_heads, head_dim=8))
    m = GroupedQueryAttention(cfg)
    x = torch.randn(2, 13, 48)
    assert_close(_run(m, cfg, x), mha_reference(m, cfg, x))


@pytest.mark.parametrize("n_kv_heads", [3, 1])
def test_gqa_equals_mha_with_shared_kv_heads(n_kv_heads: int) -> None:
    """GQA is MHA whose K/V heads are copied within each group (MQA: one copy for all)."""
    gqa_cfg = _cfg(GQAConfig(n_heads=6, n_kv_heads=n_kv_heads, head_dim=8))
    mha_cfg = _cfg(GQAConfig(n_heads=6, n_kv_heads=6, head_dim=8))
    gqa, mha = GroupedQueryAttention(gqa_cfg), GroupedQueryAttention(mha_cfg)
    group = 6 // n_kv_heads
    with torch.no_grad():
        mha.q_proj.weight.copy_(gqa.q_proj.weight)
        mha.o_proj.weight.copy_(gqa.o_proj.weight)
        for name in ("k_proj", "v_proj"):
            w = getattr(gqa, name).weight.view(n_kv_heads, 8, 48)
            getattr(mha, name).weight.copy_(w.repeat_interleave(group, dim=0).reshape(48, 48))
    x = torch.randn(2, 9, 48)
    assert_close(_run(gqa, gqa_cfg, x), _run(mha, mha_cfg, x))


def mla_reference(m: MultiHeadLatentAttention, cfg: ModelConfig, x: torch.Tensor) -> torch.Tensor:
    """DeepSeek-V3 inference/model.py MLA, naive branch, transcribed step by step."""
    a = cfg.attention
    assert isinstance(a, MLAConfig)
    b, t, _ = x.shape
    q, _ = m.project_query(x)
    q_nope, q_pe = q.split([a.qk_nope_head_dim, a.qk_rope_head_dim], -1)
    kv = m.kv_a_proj_with_mqa(x)
    c, k_pe = kv.split([a.kv_lora_rank, a.qk_rope_head_dim], -1)
    inv = 1.0 / (cfg.rope.theta ** (torch.arange(0, a.qk_rope_head_dim, 2).float() / a.qk_rope_head_dim))
    freqs = torch.polar(torch.ones(t, inv.numel()), torch.arange(t).float()[:, None] * inv)

    def rot(z: torch.Tensor) -> torch.Tensor:  # complex form: interleaved pairs
        zc = torch.view_as_complex(z.float().contiguous().reshape(*z.shape[:-1], -1, 2))
        return torch.view_as_real(zc * freqs.view(1, t, 1, -1)).flatten(3)

    q_pe, k_pe = rot(q_pe), rot(k_pe.unsqueeze(2))
    kvb = m.kv_b_proj(m.kv_a_layernorm(c)).view(b, t, a.n_heads, -1)
    k_nope, v = kvb.split([a.qk_nope_head_dim, a.v_head_dim], -1)
    qf = torch.cat([q_nope, q_pe], -1)
    kf = torch.cat([k_nope, k_pe.expand(-1, -1, a.n_heads, -1)], -1)
    scores = torch.einsum("bshd,bthd->bsht", qf, kf) * m.scale
    scores = scores.masked_fill(torch.ones(t, t).triu(1).bool()[:, None, :], float("-inf"))
    o = torch.einsum("bsht,bthd->bshd", scores.softmax(-1), v)
    return m.o_proj(o.flatten(2))


MLA_SHAPES = [
    MLAConfig(n_heads=4, kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16),
    MLAConfig(n_heads=3, kv_lora_rank=20, qk_nope_head_dim=12, qk_rope_head_dim=6, v_head_dim=10,
              q_lora_rank=24),
    MLAConfig(n_heads=5, kv_lora_rank=7, qk_nope_head_dim=5, qk_rope_head_dim=2, v_head_dim=9,
              q_lora_rank=11),
]


@pytest.mark.parametrize("attn", MLA_SHAPES)
@pytest.mark.parametrize("impl", ["naive", "absorb", "auto"])
def test_mla_equals_deepseek_reference(attn: MLAConfig, impl: str) -> None:
    cfg = _cfg(dataclasses.replace(attn, impl=impl))
    m = MultiHeadLatentAttention(cfg)
    x = torch.randn(2, 11, 48)
    assert_close(_run(m, cfg, x), mla_reference(m, cfg, x))


@given(
    heads=st.integers(1, 6), d_c=st.integers(1, 40), nope=st.integers(1, 20),
    rope_half=st.integers(1, 6), d_v=st.integers(1, 20), q_lora=st.one_of(st.none(), st.integers(1, 30)),
    t=st.integers(1, 17), yarn=st.booleans(),
)
@settings(max_examples=40, deadline=None)
def test_mla_naive_equals_absorbed(
    heads: int, d_c: int, nope: int, rope_half: int, d_v: int, q_lora: int | None, t: int, yarn: bool
) -> None:
    """Both inference forms give the same output on odd shapes, with and without YaRN."""
    attn = MLAConfig(n_heads=heads, kv_lora_rank=d_c, qk_nope_head_dim=nope,
                     qk_rope_head_dim=2 * rope_half, v_head_dim=d_v, q_lora_rank=q_lora)
    rope = RopeConfig(interleaved=True, yarn=YarnConfig(factor=4, original_max_position_embeddings=8,
                                                          mscale_all_dim=1.0) if yarn else None)
    naive_cfg = _cfg(dataclasses.replace(attn, impl="naive"), rope, dim=24)
    absorb_cfg = _cfg(dataclasses.replace(attn, impl="absorb"), rope, dim=24)
    naive = MultiHeadLatentAttention(naive_cfg)
    absorb = MultiHeadLatentAttention(absorb_cfg)
    absorb.load_state_dict(naive.state_dict())
    x = torch.randn(2, t, 24)
    assert_close(_run(absorb, absorb_cfg, x), _run(naive, naive_cfg, x))


def test_mla_forms_agree_in_bfloat16() -> None:
    cfg = _cfg(MLA_SHAPES[0])
    naive = MultiHeadLatentAttention(_cfg(dataclasses.replace(MLA_SHAPES[0], impl="naive")))
    absorb = MultiHeadLatentAttention(_cfg(dataclasses.replace(MLA_SHAPES[0], impl="absorb")))
    absorb.load_state_dict(naive.state_dict())
    x = torch.randn(1, 9, 48)
    expected = _run(naive, cfg, x)  # fp32 truth
    got = _run(absorb.to(torch.bfloat16), cfg, x.to(torch.bfloat16))
    assert_close(got, expected, dtype=torch.bfloat16)
