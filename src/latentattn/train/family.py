"""One model family, five attention mechanisms: MHA, MQA, GQA, MLA and MLA+DSA at the same
depth and width, with parameter counts matched through the FFN width.

The attention blocks differ in size (MQA's K/V projections are small, MLA's up-projections are
not), so comparing them at equal FFN width would also compare model sizes. ``matched_configs``
picks each variant's SwiGLU hidden size so that its total parameter count is as close as possible
to MHA's (within ``tolerance``); what is left over is rounded by one FFN unit (3 * dim params).
"""

from __future__ import annotations

from dataclasses import dataclass

from latentattn.calc.params import count_parameters
from latentattn.config import GQAConfig, IndexerConfig, MLAConfig, ModelConfig, RopeConfig
from latentattn.errors import ConfigError

ATTN_KINDS: tuple[str, ...] = ("mha", "mqa", "gqa", "mla", "dsa")


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


def family_config(
    kind: str, size: FamilySize = FamilySize(), intermediate_size: int | None = None
) -> ModelConfig:
    """The ``kind`` variant of the family (FFN width ``ffn_mult * dim`` unless given)."""
    if kind not in ATTN_KINDS:
        raise ConfigError(f"unknown attention {kind!r}; choose from {', '.join(ATTN_KINDS)}")
    hd, h = size.head_dim, size.n_heads
    attention: GQAConfig | MLAConfig
    if kind in ("mha", "mqa", "gqa"):
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
        rope=RopeConfig(interleaved=isinstance(attention, MLAConfig)), max_seq_len=size.seq_len,
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
