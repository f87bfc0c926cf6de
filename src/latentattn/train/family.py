"""One model family, five attention mechanisms: MHA, MQA, GQA, MLA and MLA+DSA at the same
depth and width, with parameter counts matched through the FFN width; and DeepSeek-V4's attention
(``V4_KIND``, :func:`v4_attention`) in the same family, for ``latentattn compare``.

The attention blocks differ in size (MQA's K/V projections are small, MLA's up-projections are
not), so comparing them at equal FFN width would also compare model sizes. ``matched_configs``
picks each variant's SwiGLU hidden size so that its total parameter count is as close as possible
to MHA's (within ``tolerance``); what is left over is rounded by one FFN unit (3 * dim params).
"""

from __future__ import annotations

from dataclasses import dataclass

from latentattn.calc.params import count_parameters
from latentattn.config import (
    CSA,
    HCA,
    SLIDING,
    GQAConfig,
    IndexerConfig,
    MLAConfig,
    ModelConfig,
    RopeConfig,
    V4AttentionConfig,
)
from latentattn.errors import ConfigError

ATTN_KINDS: tuple[str, ...] = ("mha", "mqa", "gqa", "mla", "dsa")
V4_KIND = "v4"
# Every kind family_config builds. V4 is kept out of ATTN_KINDS (the kinds ``latentattn train
# --attn`` offers): its layers differ by type and its indexer trains by another path.
FAMILY_KINDS: tuple[str, ...] = (*ATTN_KINDS, V4_KIND)
# V4's CSA compression rate as published (DeepSeek-V4 report s2.3.1; config.json "compress_ratios"
# 4): kept at this scale; the window, top-k and HCA rate are scaled to the training window.
V4_CSA_RATE = 4


@dataclass(frozen=True)
class FamilySize:
    """Shared shape of every variant. Defaults: a ~1M-parameter byte-level model for CPUs."""

    dim: int = 128
    n_layers: int = 4
    n_heads: int = 4
    seq_len: int = 256
    gqa_kv_heads: int = 2
    kv_lora_rank: int = 64
    # MLA and DSA alike (DSA's indexer reads the query latent); None: MLA without query
    # compression (DSA needs it).
    q_lora_rank: int | None = 64
    qk_rope_head_dim: int = 16
    index_n_heads: int = 4
    index_head_dim: int = 32
    index_topk: int = 16  # of 256: a query keeps 23% of its visible keys (calc.topk_density)
    ffn_mult: int = 4
    vocab_size: int = 256

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    def __post_init__(self) -> None:
        if self.dim % self.n_heads:
            raise ConfigError(f"FamilySize: n_heads ({self.n_heads}) must divide dim ({self.dim})")


def v4_layer_types(n_layers: int) -> tuple[str, ...]:
    """The family's V4 schedule: one sliding-only layer first, then CSA and HCA alternating from
    CSA (3 layers: sliding, CSA, HCA; 4: sliding, CSA, HCA, CSA). V4-Flash's published schedule
    (config.json ``compress_ratios``) is 2 sliding layers, then CSA/HCA alternating, ending on
    CSA (43 layers): local layers at the bottom, and every layer above reads the far context.
    Scaled to 3-4 layers that is one sliding layer (2 of 4 would leave half the model local, where
    V4 leaves 5%), and every type is present, so the comparison measures all three. Under 3
    layers: CSA then HCA, no sliding layer (it is the one that reads least)."""
    if n_layers < 1:
        raise ConfigError(f"a V4 schedule needs at least one layer, got {n_layers}")
    if n_layers < 3:
        return (CSA, HCA)[:n_layers]
    return (SLIDING, *((CSA, HCA)[i % 2] for i in range(n_layers - 1)))


def v4_attention(size: FamilySize) -> V4AttentionConfig:
    """DeepSeek-V4's attention at the family's scale, from its training window L = ``seq_len``:

    * one shared-KV head as wide as MLA's latent (``head_dim = kv_lora_rank``, the last
      ``qk_rope_head_dim`` dims rotary): V4-Flash's 512-wide entry is V3's ``kv_lora_rank``, so
      a V4 entry costs what an MLA latent costs; ``n_heads`` query heads of that width from
      MLA's query latent (``q_lora_rank``), ``o_groups`` 2 (V4 groups 8 heads; 2 groups keep
      the grouped projection at 4 heads) of ``o_lora_rank`` dim / 2 each;
    * ``sliding_window`` W = L / 8 (32 at 256 tokens, 16 at 128), at least the CSA rate;
    * CSA: ``csa_rate`` m = 4 (V4's), ``index_topk`` k = L / 32 entries (8 at 256), so the
      entries a query reads stand for k m = L / 8 tokens, as many as its window; the indexer
      as DSA's (``index_n_heads`` x ``index_head_dim``);
    * HCA: ``hca_rate`` m' = L / 16 (16 at 256, 8 at 128), at least 2 m;
    * the layer schedule :func:`v4_layer_types`; the main RoPE interleaved at theta 10,000 and
      the compressed layers' RoPE at theta 160,000 (V4's two tables; no YaRN at L <= 256).

    What a query then reads, as a share of its visible tokens: ``latentattn.calc.density.
    v4_read_fraction`` (V4-Flash at 1M tokens reads 128 + 512 x 4 raw-token equivalents through
    CSA: 0.2%; at this scale the shares are far larger, and stated in the report)."""
    seq = size.seq_len
    rate = V4_CSA_RATE
    h = size.n_heads
    return V4AttentionConfig(
        n_heads=h, head_dim=size.kv_lora_rank, qk_rope_head_dim=size.qk_rope_head_dim,
        q_lora_rank=size.q_lora_rank or size.kv_lora_rank,
        o_groups=2 if (h * size.kv_lora_rank) % 2 == 0 and h % 2 == 0 else 1,
        o_lora_rank=max(1, size.dim // 2), layer_types=v4_layer_types(size.n_layers),
        sliding_window=max(rate, seq // 8), csa_rate=rate, hca_rate=max(2 * rate, seq // 16),
        index_n_heads=size.index_n_heads, index_head_dim=size.index_head_dim,
        index_topk=max(1, seq // (8 * rate)),
    )


def family_config(
    kind: str, size: FamilySize = FamilySize(), intermediate_size: int | None = None
) -> ModelConfig:
    """The ``kind`` variant of the family (FFN width ``ffn_mult * dim`` unless given)."""
    if kind not in FAMILY_KINDS:
        raise ConfigError(f"unknown attention {kind!r}; choose from {', '.join(FAMILY_KINDS)}")
    hd, h = size.head_dim, size.n_heads
    attention: GQAConfig | MLAConfig | V4AttentionConfig
    if kind == V4_KIND:
        attention = v4_attention(size)
    elif kind in ("mha", "mqa", "gqa"):
        kv = {"mha": h, "mqa": 1, "gqa": size.gqa_kv_heads}[kind]
        attention = GQAConfig(n_heads=h, n_kv_heads=kv, head_dim=hd)
    else:
        attention = MLAConfig(
            n_heads=h, q_lora_rank=size.q_lora_rank, kv_lora_rank=size.kv_lora_rank,
            qk_nope_head_dim=hd, qk_rope_head_dim=size.qk_rope_head_dim, v_head_dim=hd,
            indexer=IndexerConfig(size.index_n_heads, size.index_head_dim, size.index_topk)
            if kind == "dsa" else None,
        )
    return ModelConfig(
        name=kind, vocab_size=size.vocab_size, dim=size.dim, n_layers=size.n_layers,
        intermediate_size=intermediate_size or size.ffn_mult * size.dim, attention=attention,
        rope=RopeConfig(interleaved=not isinstance(attention, GQAConfig)), max_seq_len=size.seq_len,
    )


def matched_configs(
    size: FamilySize = FamilySize(), kinds: tuple[str, ...] = ATTN_KINDS, tolerance: float = 0.03
) -> dict[str, ModelConfig]:
    """Each kind with its FFN width chosen so its parameter count matches MHA's."""
    target = count_parameters(family_config("mha", size))["total"]
    per_unit = 3 * size.dim * size.n_layers  # one more SwiGLU hidden unit in every layer
    out = {}
    for kind in kinds:
        base = family_config(kind, size)
        missing = target - count_parameters(base)["total"]
        width = base.intermediate_size + round(missing / per_unit)
        if width < 1:
            raise ConfigError(f"{kind}: its attention alone exceeds MHA's parameter budget")
        cfg = family_config(kind, size, width)
        off = abs(count_parameters(cfg)["total"] - target) / target
        if off > tolerance:
            raise ConfigError(f"{kind}: parameters differ from MHA's by {100 * off:.1f}% "
                              f"(> {100 * tolerance:.0f}%)")
        out[kind] = cfg
    return out
