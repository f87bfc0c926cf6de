"""Typed configs for every attention variant, RoPE/YaRN, the FFN/MoE and the whole model.

Field names follow DeepSeek's and Hugging Face's (``kv_lora_rank``, ``qk_rope_head_dim``, ...) so
that a config.json maps onto these dataclasses without a dictionary of renames. Every dataclass
validates itself in ``__post_init__`` and raises :class:`ConfigError` naming the field and the rule.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal

from latentattn.errors import ConfigError

MLAImpl = Literal["naive", "absorb", "auto"]
ScoringFunc = Literal["softmax", "sigmoid", "sqrtsoftplus"]
TopkMethod = Literal["greedy", "group_limited_greedy", "noaux_tc"]


def _positive(obj: object, *names: str) -> None:
    for name in names:
        value = getattr(obj, name)
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise ConfigError(f"{type(obj).__name__}.{name} must be a positive integer, got {value!r}")


def _positive_float(obj: object, *names: str) -> None:
    for name in names:
        value = getattr(obj, name)
        if not isinstance(value, (int, float)) or isinstance(value, bool) or value <= 0:
            raise ConfigError(f"{type(obj).__name__}.{name} must be a positive number, got {value!r}")


@dataclass(frozen=True)
class GQAConfig:
    """Grouped-query attention: MHA when ``n_kv_heads == n_heads``, MQA when ``n_kv_heads == 1``."""

    n_heads: int
    n_kv_heads: int
    head_dim: int
    kind: Literal["gqa"] = "gqa"
    # Biases: Qwen2 has them on q/k/v only; Llama's attention_bias=true on all four projections.
    qkv_bias: bool = False
    o_bias: bool = False

    def __post_init__(self) -> None:
        _positive(self, "n_heads", "n_kv_heads", "head_dim")
        if self.n_heads % self.n_kv_heads:
            raise ConfigError(
                f"GQAConfig.n_kv_heads ({self.n_kv_heads}) must divide n_heads ({self.n_heads})"
            )
        if self.head_dim % 2:
            raise ConfigError(f"GQAConfig.head_dim must be even for RoPE, got {self.head_dim}")

    @property
    def name(self) -> str:
        if self.n_kv_heads == self.n_heads:
            return "mha"
        return "mqa" if self.n_kv_heads == 1 else f"gqa-{self.n_kv_heads}"


@dataclass(frozen=True)
class IndexerConfig:
    """DeepSeek Sparse Attention's lightning indexer and top-k selector (DeepSeek-V3.2).

    ``key_cache``: how cached indexer keys are stored. ``model`` keeps the model's dtype (bf16 for
    a bf16 model: 2 * d_I bytes per token); ``fp8`` stores e4m3 values with one fp32 scale per
    128 values (d_I + 4 * d_I / 128 bytes: 132 at d_I = 128), as DeepSeek deploys it.
    """

    index_n_heads: int = 64
    index_head_dim: int = 128
    index_topk: int = 2048
    key_cache: Literal["model", "fp8"] = "model"

    def __post_init__(self) -> None:
        for name in ("index_n_heads", "index_head_dim", "index_topk"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ConfigError(f"IndexerConfig.{name} must be a positive integer, got {value!r}")
        if self.key_cache not in ("model", "fp8"):
            raise ConfigError(f"IndexerConfig.key_cache must be model or fp8, got {self.key_cache!r}")
        if self.key_cache == "fp8" and self.index_head_dim % min(128, self.index_head_dim):
            raise ConfigError(
                f"IndexerConfig.index_head_dim ({self.index_head_dim}) must be a multiple of 128 "
                "for the fp8 key cache (one scale per 128 values)"
            )


@dataclass(frozen=True)
class MLAConfig:
    """Multi-head latent attention (DeepSeek-V2 section 2.1; DeepSeek-V3 ``inference/model.py``).

    ``impl`` picks the inference form: ``naive`` decompresses per-head K/V (and caches them),
    ``absorb`` folds W_UK into the query and caches only the latent, ``auto`` caches the latent,
    prefills in the naive form and decodes in the absorbed form.
    """

    n_heads: int
    kv_lora_rank: int
    qk_nope_head_dim: int
    qk_rope_head_dim: int
    v_head_dim: int
    q_lora_rank: int | None = None
    impl: MLAImpl = "auto"
    indexer: IndexerConfig | None = None
    kind: Literal["mla"] = "mla"
    # What a model converted from GQA needs (latentattn.convert): DeepSeek's RMSNorm on the
    # latent, which no linear map of a GQA model reproduces, can be left out; the source's
    # q/k/v biases become q_proj's and kv_a_proj_with_mqa's, an o bias o_proj's.
    latent_norm: bool = True
    qkv_bias: bool = False
    o_bias: bool = False

    def __post_init__(self) -> None:
        _positive(self, "n_heads", "kv_lora_rank", "qk_rope_head_dim", "v_head_dim")
        if not isinstance(self.qk_nope_head_dim, int) or self.qk_nope_head_dim < 0:
            # 0: every key dim is rotary (a GQA model converted with all its RoPE kept).
            raise ConfigError(f"MLAConfig.qk_nope_head_dim must be an integer >= 0, got "
                              f"{self.qk_nope_head_dim!r}")
        if self.qkv_bias and self.q_lora_rank is not None:
            raise ConfigError("MLAConfig.qkv_bias needs q_lora_rank None (the bias is q_proj's)")
        if self.q_lora_rank is not None:
            _positive(self, "q_lora_rank")
        if self.qk_rope_head_dim % 2:
            raise ConfigError(
                f"MLAConfig.qk_rope_head_dim must be even for RoPE, got {self.qk_rope_head_dim}"
            )
        if self.impl not in ("naive", "absorb", "auto"):
            raise ConfigError(f"MLAConfig.impl must be naive, absorb or auto, got {self.impl!r}")
        if self.indexer is not None:
            if self.indexer.index_head_dim < self.qk_rope_head_dim:
                raise ConfigError(
                    f"IndexerConfig.index_head_dim ({self.indexer.index_head_dim}) must be at least "
                    f"qk_rope_head_dim ({self.qk_rope_head_dim}): RoPE rotates its first d_r dims"
                )
            if self.q_lora_rank is None:
                raise ConfigError(
                    "MLAConfig.q_lora_rank must be set when indexer is: the indexer's queries are "
                    "projected from MLA's normalised query latent"
                )

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def name(self) -> str:
        return "mla" if self.indexer is None else "dsa"


V4LayerType = Literal["sliding_attention", "compressed_sparse_attention", "heavily_compressed_attention"]
SLIDING, CSA, HCA = "sliding_attention", "compressed_sparse_attention", "heavily_compressed_attention"
V4_LAYER_TYPES: tuple[str, ...] = (SLIDING, CSA, HCA)


@dataclass(frozen=True)
class V4AttentionConfig:
    """DeepSeek-V4's attention (DeepSeek-V4 report section 2.3; transformers' ``deepseek_v4``).

    One shared-KV head per layer: ``kv_proj`` gives a ``head_dim``-wide RMSNormed vector read as
    both key and value, its last ``qk_rope_head_dim`` dims rotated (interleaved pairs). Queries go
    ``q_a_proj`` -> RMSNorm -> ``q_b_proj`` -> a weightless RMSNorm per head. Each head has a
    learned sink logit; the output goes through ``o_groups`` grouped low-rank projections of
    ``o_lora_rank`` each, then ``o_b_proj``. Each layer is one of ``layer_types`` (one per layer):

    * ``sliding_attention``: the last ``sliding_window`` tokens (the query's own included);
    * ``compressed_sparse_attention`` (CSA): the window plus the ``index_topk`` compressed entries
      (one per ``csa_rate`` tokens, gated pooling over overlapping windows of 2 * csa_rate) a
      lightning indexer (``index_n_heads`` x ``index_head_dim``) scores highest;
    * ``heavily_compressed_attention`` (HCA): the window plus every compressed entry, one per
      ``hca_rate`` tokens (non-overlapping windows).

    Sliding layers rotate with the model's ``rope``; CSA/HCA layers, their compressors and the
    indexer with ``compress_rope`` (theta 160,000 and YaRN in V4; cos/sin never rescaled).
    """

    n_heads: int
    head_dim: int
    qk_rope_head_dim: int
    q_lora_rank: int
    o_groups: int
    o_lora_rank: int
    layer_types: tuple[str, ...]
    sliding_window: int = 128
    csa_rate: int = 4
    hca_rate: int = 128
    index_n_heads: int = 64
    index_head_dim: int = 128
    index_topk: int = 512
    compress_rope: RopeConfig = field(default_factory=lambda: RopeConfig(theta=160000.0, interleaved=True))
    kind: Literal["v4"] = "v4"

    def __post_init__(self) -> None:
        _positive(self, "n_heads", "head_dim", "qk_rope_head_dim", "q_lora_rank", "o_groups",
                  "o_lora_rank", "sliding_window", "csa_rate", "hca_rate", "index_n_heads",
                  "index_head_dim", "index_topk")
        if self.qk_rope_head_dim % 2 or self.qk_rope_head_dim > self.head_dim:
            raise ConfigError(f"V4AttentionConfig.qk_rope_head_dim must be even and at most head_dim "
                              f"({self.head_dim}), got {self.qk_rope_head_dim}")
        if self.qk_rope_head_dim > self.index_head_dim:
            raise ConfigError(f"V4AttentionConfig.index_head_dim ({self.index_head_dim}) must be at least "
                              f"qk_rope_head_dim ({self.qk_rope_head_dim}): RoPE rotates its last dims")
        if (self.n_heads * self.head_dim) % self.o_groups:
            raise ConfigError(f"V4AttentionConfig.o_groups ({self.o_groups}) must divide n_heads * head_dim "
                              f"({self.n_heads * self.head_dim})")
        if not isinstance(self.layer_types, tuple) or not self.layer_types:
            raise ConfigError("V4AttentionConfig.layer_types must be a non-empty tuple of layer types")
        bad = sorted({t for t in self.layer_types if t not in V4_LAYER_TYPES})
        if bad:
            raise ConfigError(f"V4AttentionConfig.layer_types holds unknown type(s) {', '.join(bad)}; "
                              f"known: {', '.join(V4_LAYER_TYPES)}")
        if self.compress_rope.blocks > 1 or self.compress_rope.pairs:
            raise ConfigError("V4AttentionConfig.compress_rope cannot be block RoPE")

    def rate(self, layer_type: str) -> int:
        """Tokens per compressed entry of a layer type (0: sliding only)."""
        return {SLIDING: 0, CSA: self.csa_rate, HCA: self.hca_rate}[layer_type]

    @property
    def name(self) -> str:
        return "v4"


@dataclass(frozen=True)
class HyperConfig:
    """Manifold-constrained hyper-connections (mHC; DeepSeek-V4 report section 2.2, Xie et al.
    2026): ``hc_mult`` residual streams, collapsed into each block's input and mixed through a
    matrix made doubly stochastic by ``sinkhorn_iters`` Sinkhorn-Knopp iterations."""

    hc_mult: int = 4
    sinkhorn_iters: int = 20
    eps: float = 1e-6

    def __post_init__(self) -> None:
        _positive(self, "hc_mult", "sinkhorn_iters")
        _positive_float(self, "eps")


AttentionConfig = GQAConfig | MLAConfig | V4AttentionConfig


@dataclass(frozen=True)
class YarnConfig:
    """YaRN context extension (arXiv 2309.00071) as Hugging Face's ``_compute_yarn_parameters``."""

    factor: float
    original_max_position_embeddings: int
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    mscale: float = 1.0
    mscale_all_dim: float = 0.0

    def __post_init__(self) -> None:
        _positive_float(self, "factor", "beta_fast", "beta_slow")
        _positive(self, "original_max_position_embeddings")
        if self.mscale < 0 or self.mscale_all_dim < 0:
            raise ConfigError("YarnConfig.mscale and mscale_all_dim must be >= 0")


@dataclass(frozen=True)
class RopeScaling:
    """Position interpolation of Llama-family checkpoints (transformers' ``modeling_rope_utils``):
    ``linear`` divides every frequency by ``factor`` (``_compute_linear_scaling_rope_parameters``);
    ``llama3`` (Llama 3.1, ``_compute_llama3_parameters``) divides the frequencies whose
    wavelength exceeds ``original_max_position_embeddings / low_freq_factor`` by ``factor``, keeps
    those shorter than ``original_max_position_embeddings / high_freq_factor``, and blends between."""

    type: Literal["linear", "llama3"]
    factor: float
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192

    def __post_init__(self) -> None:
        if self.type not in ("linear", "llama3"):
            raise ConfigError(f"RopeScaling.type must be linear or llama3, got {self.type!r}")
        _positive_float(self, "factor", "low_freq_factor", "high_freq_factor")
        _positive(self, "original_max_position_embeddings")
        if self.type == "llama3" and not self.high_freq_factor > self.low_freq_factor:
            raise ConfigError(f"RopeScaling.high_freq_factor ({self.high_freq_factor}) must exceed "
                              f"low_freq_factor ({self.low_freq_factor})")


@dataclass(frozen=True)
class RopeConfig:
    """Rotary embedding. ``interleaved`` rotates pairs (x[2i], x[2i+1]) as DeepSeek's MLA does;
    otherwise pairs are (x[i], x[i + d/2]) (half-split, NeoX/Llama). ``yarn`` or ``scaling``
    (linear / llama3) rescale the frequencies, not both."""

    theta: float = 10000.0
    interleaved: bool = False
    yarn: YarnConfig | None = None
    scaling: RopeScaling | None = None
    # Block RoPE (a GQA model converted to MLA, latentattn.convert): the rotated dims are
    # ``blocks`` equal blocks, each its own RoPE (pairs inside a block); ``source_dim`` > 0 and
    # ``pairs`` say which frequencies a block keeps: pair p of a ``source_dim``-dim RoPE,
    # theta^(-2p / source_dim) (scaled as the source's), in that order. 1 / 0 / (): plain RoPE.
    blocks: int = 1
    source_dim: int = 0
    pairs: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        _positive_float(self, "theta")
        _positive(self, "blocks")
        if self.yarn is not None and self.scaling is not None:
            raise ConfigError("RopeConfig takes yarn or scaling, not both")
        if bool(self.source_dim) != bool(self.pairs):
            raise ConfigError("RopeConfig.source_dim and pairs go together")
        if self.pairs and (len(set(self.pairs)) != len(self.pairs)
                           or not all(0 <= p < self.source_dim // 2 for p in self.pairs)):
            raise ConfigError(f"RopeConfig.pairs must be distinct pair indices below source_dim / 2 "
                              f"({self.source_dim // 2}), got {list(self.pairs)}")


@dataclass(frozen=True)
class MoEConfig:
    """DeepSeekMoE (DeepSeek-V2 section 2.2, V3 section 2.1.2): shared + routed fine-grained experts.

    V2 routes with a softmax over experts (``greedy`` or ``group_limited_greedy``: top groups by
    their best expert); V3 with sigmoid scores plus a correction bias used only for choosing, and
    group-limited top-k scored by the sum of each group's two best experts (``noaux_tc``).
    """

    n_routed_experts: int
    n_shared_experts: int
    num_experts_per_tok: int
    moe_intermediate_size: int
    first_k_dense_replace: int = 0
    scoring_func: ScoringFunc = "softmax"
    topk_method: TopkMethod = "greedy"
    n_group: int = 1
    topk_group: int = 1
    routed_scaling_factor: float = 1.0
    norm_topk_prob: bool = False
    # DeepSeek-V4: the first n_hash_layers MoE layers choose experts by a frozen token-id table
    # (tid2eid, report section 2.1); swiglu_limit clamps the gate (above) and up (both sides)
    # pre-activations of every expert, the shared ones included.
    n_hash_layers: int = 0
    swiglu_limit: float | None = None

    def __post_init__(self) -> None:
        _positive(self, "n_routed_experts", "num_experts_per_tok", "moe_intermediate_size")
        _positive(self, "n_group", "topk_group")
        if self.n_shared_experts < 0 or self.first_k_dense_replace < 0:
            raise ConfigError("MoEConfig.n_shared_experts and first_k_dense_replace must be >= 0")
        if self.num_experts_per_tok > self.n_routed_experts:
            raise ConfigError(
                f"MoEConfig.num_experts_per_tok ({self.num_experts_per_tok}) exceeds "
                f"n_routed_experts ({self.n_routed_experts})"
            )
        if self.n_routed_experts % self.n_group:
            raise ConfigError(
                f"MoEConfig.n_group ({self.n_group}) must divide n_routed_experts ({self.n_routed_experts})"
            )
        if self.topk_group > self.n_group:
            raise ConfigError(f"MoEConfig.topk_group ({self.topk_group}) exceeds n_group ({self.n_group})")
        if self.scoring_func not in ("softmax", "sigmoid", "sqrtsoftplus"):
            raise ConfigError(f"MoEConfig.scoring_func must be softmax, sigmoid or sqrtsoftplus, got "
                              f"{self.scoring_func!r}")
        if self.n_hash_layers < 0:
            raise ConfigError(f"MoEConfig.n_hash_layers must be >= 0, got {self.n_hash_layers}")
        if self.n_hash_layers and self.scoring_func == "softmax":
            raise ConfigError("MoEConfig.n_hash_layers (hash routing, DeepSeek-V4) goes with sigmoid or "
                              "sqrtsoftplus scores, not softmax")
        if self.swiglu_limit is not None and not self.swiglu_limit > 0:
            raise ConfigError(f"MoEConfig.swiglu_limit must be positive, got {self.swiglu_limit}")
        valid = {"softmax": ("greedy", "group_limited_greedy"), "sigmoid": ("noaux_tc",),
                 "sqrtsoftplus": ("noaux_tc",)}
        if self.topk_method not in valid[self.scoring_func]:
            raise ConfigError(
                f"MoEConfig.topk_method {self.topk_method!r} does not go with scoring_func "
                f"{self.scoring_func!r} (allowed: {', '.join(valid[self.scoring_func])})"
            )
        per_group = self.n_routed_experts // self.n_group
        if self.topk_method == "noaux_tc" and per_group < 2:
            # V3 ranks each group by the sum of its two best biased scores (transformers'
            # DeepseekV3TopkRouter: topk(2) over every group, whatever n_group is).
            raise ConfigError(
                f"MoEConfig.n_group ({self.n_group}) leaves {per_group} expert per group of "
                f"n_routed_experts ({self.n_routed_experts}); noaux_tc needs at least 2 per group"
            )
        if self.topk_method != "greedy" and self.topk_group * per_group < self.num_experts_per_tok:
            raise ConfigError(
                f"MoEConfig.num_experts_per_tok ({self.num_experts_per_tok}) exceeds the "
                f"{self.topk_group * per_group} experts in topk_group ({self.topk_group}) of the "
                f"n_group ({self.n_group}) groups"
            )


@dataclass(frozen=True)
class ModelConfig:
    """A decoder-only transformer over any attention variant."""

    vocab_size: int
    dim: int
    n_layers: int
    attention: AttentionConfig
    intermediate_size: int
    rope: RopeConfig = field(default_factory=RopeConfig)
    moe: MoEConfig | None = None
    norm_eps: float = 1e-6
    max_seq_len: int = 4096
    tie_word_embeddings: bool = False
    name: str = "custom"
    hyper: HyperConfig | None = None

    def __post_init__(self) -> None:
        _positive(self, "vocab_size", "dim", "n_layers", "intermediate_size", "max_seq_len")
        _positive_float(self, "norm_eps")
        if not isinstance(self.attention, (GQAConfig, MLAConfig, V4AttentionConfig)):
            raise ConfigError("ModelConfig.attention must be a GQAConfig, an MLAConfig or a "
                              "V4AttentionConfig")
        if isinstance(self.attention, V4AttentionConfig) and len(self.attention.layer_types) != self.n_layers:
            raise ConfigError(f"V4AttentionConfig.layer_types has {len(self.attention.layer_types)} entries, "
                              f"ModelConfig.n_layers is {self.n_layers}")
        if self.moe is not None and self.moe.n_hash_layers > self.n_layers:
            raise ConfigError(f"MoEConfig.n_hash_layers ({self.moe.n_hash_layers}) exceeds "
                              f"ModelConfig.n_layers ({self.n_layers})")
        if self.moe is not None and self.moe.first_k_dense_replace > self.n_layers:
            raise ConfigError(
                f"MoEConfig.first_k_dense_replace ({self.moe.first_k_dense_replace}) exceeds "
                f"ModelConfig.n_layers ({self.n_layers})"
            )
        r = self.rope
        if r.blocks > 1 or r.pairs:
            a = self.attention
            if not isinstance(a, MLAConfig) or a.indexer is not None:
                raise ConfigError("block RoPE (RopeConfig.blocks / pairs) is for MLA without an "
                                  "indexer (a converted GQA model)")
            if a.qk_rope_head_dim % r.blocks:
                raise ConfigError(f"RopeConfig.blocks ({r.blocks}) must divide qk_rope_head_dim "
                                  f"({a.qk_rope_head_dim})")
            if r.pairs and 2 * len(r.pairs) != a.qk_rope_head_dim // r.blocks:
                raise ConfigError(f"RopeConfig.pairs holds {len(r.pairs)} pairs, a block of "
                                  f"qk_rope_head_dim / blocks = {a.qk_rope_head_dim // r.blocks} "
                                  "dims needs half as many as its dims")

    @property
    def rope_dim(self) -> int:
        """How many dims RoPE rotates as one (a block of them with block RoPE)."""
        if isinstance(self.attention, MLAConfig):
            return self.attention.qk_rope_head_dim // self.rope.blocks
        if isinstance(self.attention, V4AttentionConfig):
            return self.attention.qk_rope_head_dim
        return self.attention.head_dim

    def is_moe_layer(self, layer: int) -> bool:
        return self.moe is not None and layer >= self.moe.first_k_dense_replace

    def is_hash_layer(self, layer: int) -> bool:
        """A MoE layer whose experts come from the frozen token-id table (DeepSeek-V4)."""
        return (self.moe is not None and self.is_moe_layer(layer)
                and layer - self.moe.first_k_dense_replace < self.moe.n_hash_layers)

    def replace(self, **changes: Any) -> ModelConfig:
        """A copy with top-level fields changed, plus the knobs a user tunes on a loaded model:
        ``mla_impl`` (``attention.impl``), ``index_topk`` and ``indexer_key_cache`` (the DSA
        indexer's k and its key-cache format, ``"model"`` or ``"fp8"``; V4's CSA layers take
        ``index_topk`` too)."""
        nested = {k: changes.pop(k) for k in NESTED_OVERRIDES if changes.get(k) is not None}
        changes = {k: v for k, v in changes.items() if k not in NESTED_OVERRIDES}
        unknown = sorted(set(changes) - {f.name for f in dataclasses.fields(self)})
        if unknown:
            raise ConfigError(f"unknown ModelConfig field(s) {', '.join(unknown)}; known: "
                              f"{', '.join(sorted(ModelConfig.overridable()))}")
        cfg = dataclasses.replace(self, **changes)
        a = cfg.attention
        if "mla_impl" in nested:
            if not isinstance(a, MLAConfig):
                raise ConfigError(f"mla_impl applies only to MLA models; {cfg.name} is {a.name.upper()}")
            a = dataclasses.replace(a, impl=nested["mla_impl"])
        if isinstance(a, V4AttentionConfig) and "index_topk" in nested:
            # V4's CSA layers select with the same knob (its indexer keys are not cached in fp8 here).
            a = dataclasses.replace(a, index_topk=nested.pop("index_topk"))
        indexer = {f: nested[k] for k, f in (("index_topk", "index_topk"),
                                              ("indexer_key_cache", "key_cache")) if k in nested}
        if indexer:
            if not isinstance(a, MLAConfig) or a.indexer is None:
                raise ConfigError(f"{', '.join(k for k in nested if k != 'mla_impl')} applies only "
                                  f"to DSA models (an MLA config with an indexer); {cfg.name} has none")
            a = dataclasses.replace(a, indexer=dataclasses.replace(a.indexer, **indexer))
        return cfg if a is cfg.attention else dataclasses.replace(cfg, attention=a)

    @staticmethod
    def overridable() -> set[str]:
        """Names ``replace`` accepts: the top-level fields and the nested knobs."""
        return {f.name for f in dataclasses.fields(ModelConfig)} | set(NESTED_OVERRIDES)


# Keys of ModelConfig.replace that reach into the attention config.
NESTED_OVERRIDES = ("mla_impl", "index_topk", "indexer_key_cache")
