"""DeepSeek-V4's KV cache at a context, by layer type (formula bytes; no model allocated).

A V4 layer caches one shared-KV vector of ``head_dim`` values per entry (key and value are the
same tensor). At context ``L`` (tokens held per sequence), with window W = ``sliding_window``,
D = ``head_dim``, d_I = ``index_head_dim``, m = ``csa_rate`` and m' = ``hca_rate``:

* sliding layer: min(L, W) window entries                               -> min(L, W) * e
* CSA layer: the window + floor(L / m) compressed entries, the indexer's floor(L / m) compressed
  keys, and the two compressors' pending state               -> (min(L, W) + L // m) * e
                                                                + (L // m) * k + s_CSA
* HCA layer: the window + floor(L / m') compressed entries + its compressor's pending state
                                                             -> (min(L, W) + L // m') * e + s_HCA

where e is one entry's bytes, k one indexer key's and s a layer's pending compressor state:

* bf16: e = 2 D (1,024 B at D = 512), k = 2 d_I (256 B);
* fp8, the layout V4 is served with: e = FlashMLA's ``MODEL1_FP8Sparse`` record,
  (D - d_r) e4m3 NoPE values + d_r bf16 RoPE values + one ue8m0 scale per 64 NoPE values + 1 pad
  byte (deepseek-ai/FlashMLA ``tests/quant.py``: ``bytes_per_token = d_nope + 2*d_rope +
  num_tiles + 1``; 448 + 128 + 7 + 1 = 584 B at D = 512, d_r = 64), and k = d_I e4m3 bytes + one
  fp32 scale per 128 (132 B at d_I = 128, DeepSeek-V3.2's indexer-key format);
* s: a compressor keeps the projected kv and gate of the tokens whose window is not complete,
  ``coff * rate`` tokens of ``coff * width`` values each (coff = 2 for CSA's overlapping windows,
  which also keep the previous window, 1 for HCA), kv and gate both: s = 2 * coff m * coff D
  values for the main compressor, plus 2 * coff m * coff d_I for CSA's indexer. That is the
  shape DeepSeek's inference ``Compressor`` preallocates (``kv_state``/``score_state``, fp32
  there) and transformers' ``DeepseekV4CSACache`` bounds (``buffer_kv``/``overlap_kv``); it is
  counted here at 2 B a value in both layouts (the fp8 layout quantises stored entries only).
  Constant in L: 32,768 + 8,192 B per V4-Flash CSA layer, 262,144 B per HCA layer.

Bytes per token are "token-equivalent": a type's bytes at context L divided by L (the window and
the state do not grow with L). No page/block rounding (FlashMLA pads each block of records to a
multiple of 576 B), allocator slack or activations. The comparison rows are DeepSeek-V3.2's
(MLA latent + DSA indexer key per token and layer) and DeepSeek-V3's (MLA latent) caches at the
same context, whatever context those models were trained for.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

from latentattn.cache.fp8 import bytes_per_vector as fp8_key_bytes
from latentattn.calc.kv_bytes import BF16, flashmla_fp8_bytes, mla_latent_bytes
from latentattn.config import CSA, HCA, SLIDING, V4_LAYER_TYPES, MLAConfig, ModelConfig, V4AttentionConfig
from latentattn.errors import ConfigError

MODEL1_TILE = 64  # FlashMLA MODEL1_FP8Sparse: one ue8m0 scale per 64 NoPE values
LAYOUTS = ("bf16", "fp8")
SHORT = {SLIDING: "sliding", CSA: "CSA", HCA: "HCA"}


def model1_record_bytes(head_dim: int, rope_dim: int) -> int:
    """FlashMLA's MODEL1_FP8Sparse record: NoPE e4m3 + RoPE bf16 + ue8m0 scales + 1 (584 at 512/64)."""
    nope = head_dim - rope_dim
    return nope + BF16 * rope_dim + math.ceil(nope / MODEL1_TILE) + 1


def entry_bytes(a: V4AttentionConfig, layout: str) -> int:
    """One cached KV entry (window or compressed): 2 D in bf16, the MODEL1 record in fp8."""
    return BF16 * a.head_dim if layout == "bf16" else model1_record_bytes(a.head_dim, a.qk_rope_head_dim)


def index_key_bytes(a: V4AttentionConfig, layout: str) -> int:
    """One compressed indexer key: 2 d_I in bf16, d_I e4m3 + fp32 scales in fp8."""
    return BF16 * a.index_head_dim if layout == "bf16" else fp8_key_bytes(a.index_head_dim)


def compressor_state_bytes(a: V4AttentionConfig, layer_type: str, bytes_per_value: int = BF16) -> int:
    """Pending kv and gate of one layer's compressors (CSA: main + indexer), bf16 by default."""
    if layer_type == CSA:  # overlapping windows: 2m tokens of 2 * width
        return 2 * (2 * a.csa_rate) * 2 * (a.head_dim + a.index_head_dim) * bytes_per_value
    if layer_type == HCA:
        return 2 * a.hca_rate * a.head_dim * bytes_per_value
    return 0


def layer_entries(a: V4AttentionConfig, layer_type: str, context: int) -> tuple[int, int, int]:
    """(window entries, compressed entries, indexer keys) one layer holds at ``context`` tokens."""
    if layer_type not in V4_LAYER_TYPES:
        raise ConfigError(f"unknown V4 layer type {layer_type!r}; known: {', '.join(V4_LAYER_TYPES)}")
    rate = a.rate(layer_type)
    compressed = context // rate if rate else 0
    return min(context, a.sliding_window), compressed, compressed if layer_type == CSA else 0


def layer_bytes(a: V4AttentionConfig, layer_type: str, context: int, layout: str = "bf16") -> int:
    """One layer's cache bytes per sequence at ``context`` tokens (the module docstring's formula)."""
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {', '.join(LAYOUTS)}, got {layout!r}")
    window, compressed, keys = layer_entries(a, layer_type, context)
    return ((window + compressed) * entry_bytes(a, layout) + keys * index_key_bytes(a, layout)
            + compressor_state_bytes(a, layer_type))


def v4_cache_bytes(cfg: ModelConfig, context: int, layout: str = "bf16") -> int:
    """All layers' cache bytes per sequence at ``context`` tokens."""
    a = _v4(cfg)
    return sum(layer_bytes(a, t, context, layout) for t in a.layer_types)


@dataclass(frozen=True)
class V4TypeRow:
    """One layer type of a V4 model at one context: its layers, entries and bytes."""

    layer_type: str
    layers: int
    window: int  # entries per layer
    compressed: int
    index_keys: int
    state_bytes: int  # per layer
    bytes_bf16: int  # all this type's layers, one sequence
    bytes_fp8: int


@dataclass(frozen=True)
class RefRow:
    """A comparison model's cache at the same context: per-token-per-layer bytes times layers."""

    model: str
    label: str
    layers: int
    bytes_per_token_per_layer_bf16: int
    bytes_per_token_per_layer_fp8: int
    bytes_bf16: int  # one sequence
    bytes_fp8: int


@dataclass(frozen=True)
class V4KVTable:
    model: str
    context: int
    batch: int
    rows: list[V4TypeRow] = field(default_factory=list)
    refs: list[RefRow] = field(default_factory=list)
    note: str = ("formula bytes per sequence: window + compressed entries + indexer keys + the "
                 "compressors' pending state (bf16 in both layouts); fp8 = FlashMLA MODEL1_FP8Sparse "
                 "records (584 B at head_dim 512) and e4m3 indexer keys; no block padding")

    def total(self, layout: str) -> int:
        """All layers, one sequence."""
        return sum(r.bytes_bf16 if layout == "bf16" else r.bytes_fp8 for r in self.rows)

    def as_dict(self) -> dict[str, Any]:
        return {"model": self.model, "context": self.context, "batch": self.batch, "note": self.note,
                "rows": [asdict(r) for r in self.rows], "refs": [asdict(r) for r in self.refs],
                "total_bf16": self.total("bf16"), "total_fp8": self.total("fp8")}


def reference_row(cfg: ModelConfig, context: int) -> RefRow:
    """An MLA (or MLA + DSA) model's cache: latent (+ indexer key) per token and layer."""
    a = cfg.attention
    if not isinstance(a, MLAConfig):
        raise ConfigError(f"{cfg.name}: the comparison rows are MLA models, this one is {a.name}")
    bf16, fp8 = mla_latent_bytes(a), flashmla_fp8_bytes(a)
    label = "MLA latent"
    if a.indexer is not None:  # whatever key_cache it is configured with: one row per layout
        bf16 += BF16 * a.indexer.index_head_dim
        fp8 += fp8_key_bytes(a.indexer.index_head_dim)
        label += " + DSA keys"
    n = cfg.n_layers
    return RefRow(cfg.name, label, n, bf16, fp8, bf16 * n * context, fp8 * n * context)


def v4_kv_table(cfg: ModelConfig, context: int, batch: int = 1,
                references: list[ModelConfig] | None = None) -> V4KVTable:
    """Per layer type at ``context`` tokens, plus DeepSeek-V3.2 and V3 (or ``references``)."""
    a = _v4(cfg)
    if context < 1 or batch < 1:
        raise ValueError(f"context and batch must be positive, got {context} and {batch}")
    rows = []
    for t in V4_LAYER_TYPES:
        layers = a.layer_types.count(t)
        if layers:
            window, compressed, keys = layer_entries(a, t, context)
            rows.append(V4TypeRow(t, layers, window, compressed, keys, compressor_state_bytes(a, t),
                                  layers * layer_bytes(a, t, context, "bf16"),
                                  layers * layer_bytes(a, t, context, "fp8")))
    if references is None:
        from latentattn.presets import get_preset

        references = [get_preset("deepseek-v3.2"), get_preset("deepseek-v3")]
    refs = [reference_row(r, context) for r in references]
    return V4KVTable(cfg.name, context, batch, rows, refs)


def _v4(cfg: ModelConfig) -> V4AttentionConfig:
    if not isinstance(cfg.attention, V4AttentionConfig):
        raise ConfigError(f"{cfg.name} is not a DeepSeek-V4 model (attention {cfg.attention.name})")
    return cfg.attention


__all__ = ["MODEL1_TILE", "RefRow", "V4KVTable", "V4TypeRow", "compressor_state_bytes", "entry_bytes",
           "index_key_bytes", "layer_bytes", "layer_entries", "model1_record_bytes", "v4_cache_bytes",
           "v4_kv_table"]
