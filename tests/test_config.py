"""Configs validate themselves and say which field is wrong; presets hold published values."""

from __future__ import annotations

import pytest

from latentattn import ConfigError, get_preset
from latentattn.config import GQAConfig, MLAConfig, ModelConfig, MoEConfig, YarnConfig
from latentattn.presets import ASSUMED, PRESETS


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: GQAConfig(n_heads=8, n_kv_heads=3, head_dim=64),
         r"n_kv_heads \(3\) must divide n_heads \(8\)"),
        (lambda: GQAConfig(n_heads=8, n_kv_heads=0, head_dim=64), "GQAConfig.n_kv_heads must be a positive"),
        (lambda: GQAConfig(n_heads=8, n_kv_heads=8, head_dim=63), "head_dim must be even"),
        (lambda: MLAConfig(n_heads=4, kv_lora_rank=0, qk_nope_head_dim=8, qk_rope_head_dim=4,
                           v_head_dim=8), "MLAConfig.kv_lora_rank must be a positive"),
        (lambda: MLAConfig(n_heads=4, kv_lora_rank=8, qk_nope_head_dim=8, qk_rope_head_dim=5,
                           v_head_dim=8), "qk_rope_head_dim must be even"),
        (lambda: MLAConfig(n_heads=4, kv_lora_rank=8, qk_nope_head_dim=8, qk_rope_head_dim=4,
                           v_head_dim=8, impl="fast"), "MLAConfig.impl must be naive, absorb or auto"),
        (lambda: MoEConfig(n_routed_experts=8, n_shared_experts=1, num_experts_per_tok=9,
                           moe_intermediate_size=4), r"num_experts_per_tok \(9\) exceeds"),
        (lambda: MoEConfig(n_routed_experts=8, n_shared_experts=1, num_experts_per_tok=2,
                           moe_intermediate_size=4, n_group=3), r"n_group \(3\) must divide"),
        (lambda: MoEConfig(n_routed_experts=8, n_shared_experts=1, num_experts_per_tok=2,
                           moe_intermediate_size=4, scoring_func="sigmoid"),
         "topk_method 'greedy' does not go"),
        (lambda: YarnConfig(factor=0, original_max_position_embeddings=4096), "YarnConfig.factor must be"),
        (lambda: ModelConfig(vocab_size=0, dim=8, n_layers=1, intermediate_size=8,
                             attention=GQAConfig(2, 2, 4)), "ModelConfig.vocab_size must be"),
    ],
)
def test_invalid_configs_name_the_field(make: object, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        make()  # type: ignore[operator]


def test_unknown_preset_lists_known_ones() -> None:
    with pytest.raises(ConfigError, match="unknown preset 'deepseek-v9'; known: deepseek-v2-lite"):
        get_preset("deepseek-v9")


@pytest.mark.parametrize("name", list(PRESETS))
def test_presets_build(name: str) -> None:
    assert get_preset(name).name == name


def test_deepseek_v3_preset_dimensions() -> None:
    """Facts file section 5."""
    cfg = get_preset("deepseek-v3")
    a = cfg.attention
    assert isinstance(a, MLAConfig) and cfg.moe is not None
    assert (cfg.dim, cfg.n_layers, a.n_heads, a.q_lora_rank, a.kv_lora_rank) == (7168, 61, 128, 1536, 512)
    assert (a.qk_nope_head_dim, a.qk_rope_head_dim, a.v_head_dim) == (128, 64, 128)
    assert (cfg.moe.n_routed_experts, cfg.moe.n_shared_experts, cfg.moe.num_experts_per_tok) == (256, 1, 8)
    assert "dim" in ASSUMED["gigachat3-lightning"]


def test_mla_impl_override() -> None:
    cfg = get_preset("tiny-mla").replace(mla_impl="absorb")
    assert isinstance(cfg.attention, MLAConfig) and cfg.attention.impl == "absorb"
    with pytest.raises(ConfigError, match="mla_impl applies only to MLA models"):
        get_preset("tiny-gqa").replace(mla_impl="absorb")
