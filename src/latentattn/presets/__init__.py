"""Named model configs: real DeepSeek/Llama sizes for calculators, tiny ones for tests and demos.

Values come from each model's published config.json (DeepSeek-V2-Lite, DeepSeek-V2, DeepSeek-V3,
Meta-Llama-3-8B/70B); DeepSeek-V4's presets live in :mod:`latentattn.presets.deepseek_v4`, which
cites a source for each value. GigaChat 3 Lightning has no public config values beyond its model
card and ik_llama.cpp #994/#995; ``ASSUMED`` lists the fields we chose ourselves.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

from latentattn.config import (
    GQAConfig,
    IndexerConfig,
    MLAConfig,
    ModelConfig,
    MoEConfig,
    RopeConfig,
    YarnConfig,
)
from latentattn.errors import ConfigError
from latentattn.presets.deepseek_v4 import deepseek_v4_flash, deepseek_v4_pro, tiny_v4

# Fields of a preset that are not published and were filled in by us.
ASSUMED: dict[str, tuple[str, ...]] = {
    "gigachat3-lightning": (
        "dim",
        "n_layers",
        "vocab_size",
        "intermediate_size",
        "q_lora_rank",
        "qk_nope_head_dim",
        "qk_rope_head_dim",
        "moe (experts, sizes, routing)",
        "rope (theta, YaRN factor)",
    ),
}


def _deepseek_v2_lite() -> ModelConfig:
    return ModelConfig(
        name="deepseek-v2-lite",
        vocab_size=102400,
        dim=2048,
        n_layers=27,
        intermediate_size=10944,
        attention=MLAConfig(
            n_heads=16, q_lora_rank=None, kv_lora_rank=512,
            qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128,
        ),
        rope=RopeConfig(
            theta=10000.0, interleaved=True,
            yarn=YarnConfig(factor=40, original_max_position_embeddings=4096, beta_fast=32,
                            beta_slow=1, mscale=0.707, mscale_all_dim=0.707),
        ),
        moe=MoEConfig(
            n_routed_experts=64, n_shared_experts=2, num_experts_per_tok=6,
            moe_intermediate_size=1408, first_k_dense_replace=1, scoring_func="softmax",
            topk_method="greedy", routed_scaling_factor=1.0,
        ),
        max_seq_len=163840,
    )


def _deepseek_v2() -> ModelConfig:
    return ModelConfig(
        name="deepseek-v2",
        vocab_size=102400,
        dim=5120,
        n_layers=60,
        intermediate_size=12288,
        attention=MLAConfig(
            n_heads=128, q_lora_rank=1536, kv_lora_rank=512,
            qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128,
        ),
        rope=RopeConfig(
            theta=10000.0, interleaved=True,
            yarn=YarnConfig(factor=40, original_max_position_embeddings=4096, beta_fast=32,
                            beta_slow=1, mscale=0.707, mscale_all_dim=0.707),
        ),
        moe=MoEConfig(
            n_routed_experts=160, n_shared_experts=2, num_experts_per_tok=6,
            moe_intermediate_size=1536, first_k_dense_replace=1, scoring_func="softmax",
            topk_method="group_limited_greedy", n_group=8, topk_group=3,
            routed_scaling_factor=16.0,
        ),
        max_seq_len=163840,
    )


def _deepseek_v3() -> ModelConfig:
    return ModelConfig(
        name="deepseek-v3",
        vocab_size=129280,
        dim=7168,
        n_layers=61,
        intermediate_size=18432,
        attention=MLAConfig(
            n_heads=128, q_lora_rank=1536, kv_lora_rank=512,
            qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128,
        ),
        rope=RopeConfig(
            theta=10000.0, interleaved=True,
            yarn=YarnConfig(factor=40, original_max_position_embeddings=4096, beta_fast=32,
                            beta_slow=1, mscale=1.0, mscale_all_dim=1.0),
        ),
        moe=MoEConfig(
            n_routed_experts=256, n_shared_experts=1, num_experts_per_tok=8,
            moe_intermediate_size=2048, first_k_dense_replace=3, scoring_func="sigmoid",
            topk_method="noaux_tc", n_group=8, topk_group=4, routed_scaling_factor=2.5,
            norm_topk_prob=True,
        ),
        max_seq_len=163840,
    )


def _deepseek_v32() -> ModelConfig:
    # DeepSeek-V3.2-Exp: DeepSeek-V3's model plus a lightning indexer in every layer.
    v3 = _deepseek_v3()
    assert isinstance(v3.attention, MLAConfig)
    indexer = IndexerConfig(index_n_heads=64, index_head_dim=128, index_topk=2048)
    return v3.replace(name="deepseek-v3.2", attention=dataclasses.replace(v3.attention, indexer=indexer))


def _gigachat3_lightning() -> ModelConfig:
    # Published: 32 heads, kv_lora_rank 512, v_head_dim 192, MoE with 10B total / 1.8B active,
    # 256k context. Everything in ASSUMED["gigachat3-lightning"] is our guess.
    return ModelConfig(
        name="gigachat3-lightning",
        vocab_size=128256,
        dim=1536,
        n_layers=26,
        intermediate_size=8960,
        attention=MLAConfig(
            n_heads=32, q_lora_rank=None, kv_lora_rank=512,
            qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=192,
        ),
        rope=RopeConfig(
            theta=100000.0, interleaved=True,
            yarn=YarnConfig(factor=64, original_max_position_embeddings=4096, mscale=1.0,
                            mscale_all_dim=1.0),
        ),
        moe=MoEConfig(
            n_routed_experts=64, n_shared_experts=1, num_experts_per_tok=4,
            moe_intermediate_size=1280, first_k_dense_replace=1, scoring_func="sigmoid",
            topk_method="noaux_tc", n_group=1, topk_group=1, routed_scaling_factor=1.0,
            norm_topk_prob=True,
        ),
        max_seq_len=262144,
    )


def _llama3(name: str, dim: int, n_layers: int, n_heads: int, inter: int) -> ModelConfig:
    return ModelConfig(
        name=name,
        vocab_size=128256,
        dim=dim,
        n_layers=n_layers,
        intermediate_size=inter,
        attention=GQAConfig(n_heads=n_heads, n_kv_heads=8, head_dim=128),
        rope=RopeConfig(theta=500000.0),
        norm_eps=1e-5,
        max_seq_len=8192,
    )


def _tiny_gqa(name: str, n_kv_heads: int) -> Callable[[], ModelConfig]:
    def make() -> ModelConfig:
        return ModelConfig(
            name=name, vocab_size=256, dim=64, n_layers=2, intermediate_size=128,
            attention=GQAConfig(n_heads=4, n_kv_heads=n_kv_heads, head_dim=16),
            max_seq_len=512,
        )

    return make


def _tiny_mla(moe: bool, q_lora: bool, dsa: bool = False) -> Callable[[], ModelConfig]:
    def make() -> ModelConfig:
        return ModelConfig(
            name="tiny-dsa" if dsa else "tiny-mla" + ("-moe" if moe else ""),
            vocab_size=256, dim=64, n_layers=2, intermediate_size=128,
            attention=MLAConfig(
                n_heads=4, q_lora_rank=32 if q_lora else None, kv_lora_rank=32,
                qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16,
                indexer=IndexerConfig(index_n_heads=4, index_head_dim=16, index_topk=8) if dsa else None,
            ),
            rope=RopeConfig(interleaved=True),
            moe=MoEConfig(
                n_routed_experts=8, n_shared_experts=1, num_experts_per_tok=2,
                moe_intermediate_size=32, first_k_dense_replace=1, scoring_func="sigmoid",
                topk_method="noaux_tc", n_group=4, topk_group=2, routed_scaling_factor=2.5,
                norm_topk_prob=True,
            ) if moe else None,
            max_seq_len=512,
        )

    return make


PRESETS: dict[str, Callable[[], ModelConfig]] = {
    "deepseek-v2-lite": _deepseek_v2_lite,
    "deepseek-v2": _deepseek_v2,
    "deepseek-v3": _deepseek_v3,
    "deepseek-v3.2": _deepseek_v32,
    "deepseek-v4-flash": deepseek_v4_flash,
    "deepseek-v4-pro": deepseek_v4_pro,
    "gigachat3-lightning": _gigachat3_lightning,
    "llama-3-8b": lambda: _llama3("llama-3-8b", 4096, 32, 32, 14336),
    "llama-3-70b": lambda: _llama3("llama-3-70b", 8192, 80, 64, 28672),
    "tiny-mha": _tiny_gqa("tiny-mha", 4),
    "tiny-gqa": _tiny_gqa("tiny-gqa", 2),
    "tiny-mqa": _tiny_gqa("tiny-mqa", 1),
    "tiny-mla": _tiny_mla(moe=False, q_lora=True),
    "tiny-mla-moe": _tiny_mla(moe=True, q_lora=True),
    "tiny-dsa": _tiny_mla(moe=False, q_lora=True, dsa=True),
    "tiny-v4": tiny_v4,
}


def get_preset(name: str) -> ModelConfig:
    """The named preset's config; raises ConfigError listing the known names."""
    try:
        return PRESETS[name]()
    except KeyError:
        raise ConfigError(f"unknown preset {name!r}; known: {', '.join(PRESETS)}") from None
