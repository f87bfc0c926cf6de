"""Configs validate themselves and say which field is wrong; presets hold published values."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import cli_error
from latentattn import ConfigError, get_preset
from latentattn.config import GQAConfig, MLAConfig, ModelConfig, MoEConfig, YarnConfig
from latentattn.interop.hf_config import config_from_hf, config_to_hf
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
        # V3 group scores sum each group's two best experts: one expert per group cannot work.
        (lambda: MoEConfig(n_routed_experts=8, n_shared_experts=1, num_experts_per_tok=2,
                           moe_intermediate_size=4, scoring_func="sigmoid", topk_method="noaux_tc",
                           n_group=8, topk_group=2),
         r"MoEConfig\.n_group \(8\) leaves 1 expert per group.*noaux_tc needs at least 2"),
        (lambda: MoEConfig(n_routed_experts=8, n_shared_experts=1, num_experts_per_tok=2,
                           moe_intermediate_size=4, topk_method="group_limited_greedy", n_group=2,
                           topk_group=3), r"MoEConfig\.topk_group \(3\) exceeds n_group \(2\)"),
        (lambda: MoEConfig(n_routed_experts=8, n_shared_experts=1, num_experts_per_tok=3,
                           moe_intermediate_size=4, scoring_func="sigmoid", topk_method="noaux_tc",
                           n_group=4, topk_group=1),
         r"MoEConfig\.num_experts_per_tok \(3\) exceeds the 2 experts in topk_group \(1\)"),
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
    """DeepSeek-V3 report (arXiv 2412.19437) s4.2, and its config.json on the Hugging Face hub."""
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


def test_bad_moe_in_a_config_json_is_a_user_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # Before MoEConfig checked it, one expert per group reached Router.forward's topk(2) as a
    # RuntimeError; now `info` on such a config.json prints one line naming file and field.
    d = config_to_hf(get_preset("tiny-mla-moe"))
    d.update(n_group=8, topk_group=2)  # 8 experts, one per group
    path = tmp_path / "config.json"
    path.write_text(json.dumps(d))
    with pytest.raises(ConfigError, match=r"config\.json: MoEConfig\.n_group \(8\)"):
        config_from_hf(d, source=str(path))
    line = cli_error(capsys, ["info", "--model", str(path)])
    assert str(path) in line and "MoEConfig.n_group (8)" in line
