"""KV-cache bytes per token by formula (DeepSeek-V2, arXiv 2405.04434, Table 1: 2 n_h d_h l
elements per token for MHA, 2 n_g d_h l for GQA, (d_c + d_h^R) l for MLA; FlashMLA's
``tests/quant.py`` for its fp8 record), for the model's own form, the forms it is usually
compared against and, for a GQA / MHA / MQA model, the MLA it would convert to
(:mod:`latentattn.calc.converted`).

These are formula bytes: what one token's keys/values occupy, with no page or block rounding,
no allocator slack and no activations. ``tests/test_cli.py`` checks that the formula equals what
``Transformer.make_cache`` really allocates for the forms latentattn implements.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

from latentattn.cache.fp8 import bytes_per_vector as fp8_vector_bytes
from latentattn.calc.converted import ConvertSizes, converted_bytes_per_token_per_layer
from latentattn.config import GQAConfig, MLAConfig, ModelConfig, V4AttentionConfig
from latentattn.errors import ConfigError

BF16 = 2  # bytes per value unless a row says fp8
FP8 = 1
FLASHMLA_TILE = 128  # FlashMLA stores one fp32 scale per 128 latent values


def dense_bytes(n_kv_heads: int, k_dim: int, v_dim: int, bytes_per_value: int = BF16) -> int:
    """Per-head keys and values: n_kv_heads * (k_dim + v_dim) values (MHA/GQA/MQA, naive MLA)."""
    return n_kv_heads * (k_dim + v_dim) * bytes_per_value


def mla_naive_bytes(a: MLAConfig, bytes_per_value: int = BF16) -> int:
    """Decompressed MLA: H * (d_qk + d_v) values (V3: 40,960 values, 81,920 B in bf16)."""
    return dense_bytes(a.n_heads, a.qk_head_dim, a.v_head_dim, bytes_per_value)


def mla_latent_bytes(a: MLAConfig, bytes_per_value: int = BF16) -> int:
    """Absorbed MLA: the latent c and the shared rope key, d_c + d_r values (V3: 576)."""
    return (a.kv_lora_rank + a.qk_rope_head_dim) * bytes_per_value


def flashmla_fp8_bytes(a: MLAConfig) -> int:
    """FlashMLA's fp8 record: d_c e4m3 bytes, one fp32 scale per 128 of them, d_r bf16 rope values
    left unquantised (V3: 512 + 16 + 128 = 656 B)."""
    return a.kv_lora_rank * FP8 + 4 * math.ceil(a.kv_lora_rank / FLASHMLA_TILE) + a.qk_rope_head_dim * BF16


def indexer_key_bytes(a: MLAConfig, bytes_per_value: int = BF16) -> int:
    """DSA's cached indexer key: d_I values, or d_I e4m3 bytes + one fp32 scale per 128 (132 B)."""
    assert a.indexer is not None
    if a.indexer.key_cache == "fp8":
        return fp8_vector_bytes(a.indexer.index_head_dim)
    return a.indexer.index_head_dim * bytes_per_value


def _per_token(cfg: ModelConfig) -> GQAConfig | MLAConfig:
    if isinstance(cfg.attention, V4AttentionConfig):
        # A V4 layer's bytes per token depend on the context (a bounded window, 1/m compression)
        raise ConfigError(f"{cfg.name}: DeepSeek-V4's cache is not a per-token constant; use "
                          "latentattn.calc.v4_kv (layer_bytes, v4_kv_table) at a context")
    return cfg.attention


def cache_bytes_per_token_per_layer(cfg: ModelConfig, bytes_per_value: int = BF16) -> int:
    """Formula bytes of the cache form ``Transformer.make_cache`` allocates for this config."""
    a = _per_token(cfg)
    if isinstance(a, MLAConfig):
        if a.indexer is not None:  # DSA: always the latent cache, plus the indexer keys
            return mla_latent_bytes(a, bytes_per_value) + indexer_key_bytes(a, bytes_per_value)
        return mla_naive_bytes(a, bytes_per_value) if a.impl == "naive" else mla_latent_bytes(
            a, bytes_per_value
        )
    return dense_bytes(a.n_kv_heads, a.head_dim, a.head_dim, bytes_per_value)


@dataclass(frozen=True)
class KVRow:
    """One cache form: bytes per token per layer and what they add up to."""

    key: str
    label: str
    formula: str
    bytes_per_token_per_layer: int
    n_layers: int
    context: int
    batch: int
    mha_bytes_per_token_per_layer: int
    own: bool = False

    @property
    def bytes_per_token(self) -> int:
        return self.bytes_per_token_per_layer * self.n_layers

    @property
    def bytes_per_sequence(self) -> int:
        return self.bytes_per_token * self.context

    @property
    def bytes_total(self) -> int:
        return self.bytes_per_sequence * self.batch

    @property
    def ratio_vs_mha(self) -> float:
        """This form's bytes as a fraction of MHA's (MHA = 1.0)."""
        return self.bytes_per_token_per_layer / self.mha_bytes_per_token_per_layer

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.update(bytes_per_token=self.bytes_per_token, bytes_per_sequence=self.bytes_per_sequence,
                 bytes_total=self.bytes_total, ratio_vs_mha=self.ratio_vs_mha)
        return d


@dataclass(frozen=True)
class KVTable:
    model: str
    n_layers: int
    context: int
    batch: int
    rows: list[KVRow] = field(default_factory=list)
    converted: ConvertSizes | None = None  # the sizes of the "as converted" rows, if any
    note: str = (
        "formula bytes: keys/values of one token, no paging/block rounding, allocator slack or "
        "activations; bf16 (2 B/value) unless the row says fp8"
    )

    def row(self, key: str) -> KVRow:
        for r in self.rows:
            if r.key == key:
                return r
        raise KeyError(key)

    def as_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"model": self.model, "n_layers": self.n_layers, "context": self.context,
                             "batch": self.batch, "note": self.note, "rows": [r.as_dict() for r in self.rows]}
        if self.converted is not None:
            c = self.converted
            d["converted"] = {"kv_lora_rank": c.kv_lora_rank, "rope_dim": c.rope_dim,
                              "rope_mode": c.rope_mode,
                              "bytes_per_token_per_layer": c.bytes_per_token_per_layer,
                              "source_bytes_per_token_per_layer": c.source_bytes_per_token_per_layer,
                              "ratio_vs_source": c.ratio}
        return d


def kv_table(cfg: ModelConfig, context: int = 131072, batch: int = 1,
             converted: ConvertSizes | None = None) -> KVTable:
    """MHA (same heads), GQA-8, MQA, the model's own GQA form, and for MLA its four cache forms.
    ``converted`` (a GQA / MHA / MQA model's :func:`latentattn.calc.converted.resolve_sizes`):
    two more rows, the model converted to MLA at those sizes as ``latentattn convert`` writes it
    (``mla-converted``: latent + rope key, (R + D) values) and as ``convert --format deepseek``
    writes it (``mla-converted-deepseek``: its rope key is one head wide, (R + d) values; left out
    for a model with attention biases, which that format cannot hold)."""
    a = _per_token(cfg)
    head = a.v_head_dim if isinstance(a, MLAConfig) else a.head_dim
    h = a.n_heads
    mha = dense_bytes(h, head, head)
    entries: list[tuple[str, str, str, int, bool]] = []

    def add(key: str, label: str, formula: str, nbytes: int, own: bool = False) -> None:
        entries.append((key, label, formula, nbytes, own))

    own_kv = a.n_kv_heads if isinstance(a, GQAConfig) else None
    add("mha", f"MHA ({h} heads x {head})", f"2*{h}*{head} values", mha, own_kv == h)
    if h > 8:
        add("gqa-8", f"GQA-8 (8 kv heads x {head})", f"2*8*{head} values", dense_bytes(8, head, head),
            own_kv == 8)
    if own_kv is not None and own_kv not in (1, 8, h):
        add(f"gqa-{own_kv}", f"GQA-{own_kv} ({own_kv} kv heads x {head})",
            f"2*{own_kv}*{head} values", dense_bytes(own_kv, head, head), True)
    add("mqa", f"MQA (1 kv head x {head})", f"2*{head} values", dense_bytes(1, head, head), own_kv == 1)
    if isinstance(a, MLAConfig):
        dc, dr = a.kv_lora_rank, a.qk_rope_head_dim
        dsa = a.indexer is not None
        add("mla-naive", "MLA naive (decompressed)", f"{h}*({a.qk_head_dim}+{a.v_head_dim}) values",
            mla_naive_bytes(a), a.impl == "naive" and not dsa)
        add("mla-absorbed", "MLA absorbed (latent)", f"({dc}+{dr}) values", mla_latent_bytes(a),
            a.impl != "naive" and not dsa)
        add("mla-absorbed-fp8", "MLA absorbed, plain fp8", f"({dc}+{dr}) * 1 B",
            mla_latent_bytes(a, FP8))
        add("mla-flashmla-fp8", "MLA FlashMLA fp8 record",
            f"{dc} fp8 + 4*{math.ceil(dc / FLASHMLA_TILE)} scale + 2*{dr} rope B", flashmla_fp8_bytes(a))
        if a.indexer is not None:
            di = a.indexer.index_head_dim
            key_bf16 = di * BF16
            key_fp8 = fp8_vector_bytes(di)
            scales = di // min(128, di)
            add("dsa-index-keys", "DSA indexer keys", f"{di} values", key_bf16)
            add("dsa-index-keys-fp8", "DSA indexer keys, fp8", f"{di} fp8 + 4*{scales} scale B", key_fp8)
            add("dsa", "MLA+DSA: latent + indexer keys", f"({dc}+{dr}+{di}) values",
                mla_latent_bytes(a) + key_bf16, a.indexer.key_cache == "model")
            add("dsa-fp8-keys", "MLA+DSA: latent + fp8 indexer keys", "latent bf16 + indexer fp8 B",
                mla_latent_bytes(a) + key_fp8, a.indexer.key_cache == "fp8")
            add("dsa-fp8", "MLA+DSA fp8: FlashMLA record + fp8 keys", "FlashMLA fp8 + indexer fp8 B",
                flashmla_fp8_bytes(a) + key_fp8)
    if converted is not None and isinstance(a, GQAConfig):
        dc, dr, d = converted.kv_lora_rank, converted.rope_dim, a.head_dim
        how = "RoRoPE" if converted.rope_mode == "rorope" else "rope blocks"
        add("mla-converted", f"MLA as converted, R={dc} rope {dr} ({how})", f"({dc}+{dr}) values",
            converted_bytes_per_token_per_layer(dc, dr))
        if not (a.qkv_bias or a.o_bias):
            add("mla-converted-deepseek", f"MLA as converted, DeepSeek format, R={dc} rope {d}",
                f"({dc}+{d}) values", converted_bytes_per_token_per_layer(dc, d))
    rows = [KVRow(key, label, formula, nbytes, cfg.n_layers, context, batch, mha, own)
            for key, label, formula, nbytes, own in entries]
    return KVTable(model=cfg.name, n_layers=cfg.n_layers, context=context, batch=batch, rows=rows,
                   converted=converted)
