"""DeepSeek-V4's presets and calculators: the per-layer-type cache formula against hand arithmetic at
V4-Flash's dims, FlashMLA's 584-byte fp8 record, the kv-cache and info commands, parameter counts
against transformers' own model, and configs that name the wrong field. Every comparison is exact."""

from __future__ import annotations

import dataclasses
import json
import re
from collections import Counter
from typing import Any

import pytest

from conftest import cli_error
from latentattn import ConfigError, get_preset
from latentattn.calc.flops import attention_flops_per_token
from latentattn.calc.kv_bytes import cache_bytes_per_token_per_layer, flashmla_fp8_bytes, kv_table
from latentattn.calc.params import count_parameters
from latentattn.calc.v4_kv import (
    compressor_state_bytes,
    entry_bytes,
    index_key_bytes,
    layer_bytes,
    layer_entries,
    model1_record_bytes,
    reference_row,
    v4_cache_bytes,
    v4_kv_table,
)
from latentattn.cli import main
from latentattn.cli.common import fmt_bytes
from latentattn.config import CSA, HCA, SLIDING, MLAConfig, ModelConfig, V4AttentionConfig

M = 1_048_576  # V4's max context


def _flash() -> tuple[ModelConfig, V4AttentionConfig]:
    cfg = get_preset("deepseek-v4-flash")
    assert isinstance(cfg.attention, V4AttentionConfig)
    return cfg, cfg.attention


# ---------------------------------------------------------------------------- the formula
def test_fp8_records() -> None:
    _, a = _flash()
    # FlashMLA tests/quant.py, MODEL1_FP8Sparse: d_nope + 2 * d_rope + num_tiles + 1, tiles of 64
    assert model1_record_bytes(512, 64) == 448 + 2 * 64 + 448 // 64 + 1 == 584
    assert entry_bytes(a, "fp8") == 584 and entry_bytes(a, "bf16") == 2 * 512
    assert index_key_bytes(a, "fp8") == 128 + 4 and index_key_bytes(a, "bf16") == 2 * 128
    v32 = get_preset("deepseek-v3.2").attention
    assert isinstance(v32, MLAConfig)
    assert flashmla_fp8_bytes(v32) == 512 + 4 * 4 + 2 * 64 == 656  # V3.2_FP8Sparse


def test_layer_bytes_at_flash_dims() -> None:
    _, a = _flash()
    # Pending state, kv and gate: CSA 2 x (2*4 tokens x 2*512) + 2 x (2*4 x 2*128) values,
    # HCA 2 x (128 tokens x 512) values, 2 B each.
    assert compressor_state_bytes(a, CSA) == 2 * 8 * 1024 * 2 + 2 * 8 * 256 * 2 == 32_768 + 8_192
    assert compressor_state_bytes(a, HCA) == 2 * 128 * 512 * 2 == 262_144
    assert compressor_state_bytes(a, SLIDING) == 0
    # 1M tokens: window 128; CSA 1,048,576 / 4 = 262,144 entries and as many indexer keys;
    # HCA 1,048,576 / 128 = 8,192 entries.
    assert layer_entries(a, SLIDING, M) == (128, 0, 0)
    assert layer_entries(a, CSA, M) == (128, 262_144, 262_144)
    assert layer_entries(a, HCA, M) == (128, 8_192, 0)
    assert layer_bytes(a, SLIDING, M) == 128 * 1024 == 131_072
    assert layer_bytes(a, SLIDING, M, "fp8") == 128 * 584 == 74_752
    # CSA bf16: (128 + 262,144) * 1,024 + 262,144 * 256 + 40,960
    assert layer_bytes(a, CSA, M) == 268_566_528 + 67_108_864 + 40_960 == 335_716_352
    # CSA fp8: 262,272 * 584 + 262,144 * 132 + 40,960
    assert layer_bytes(a, CSA, M, "fp8") == 153_166_848 + 34_603_008 + 40_960 == 187_810_816
    # HCA: (128 + 8,192) * 1,024 + 262,144 and 8,320 * 584 + 262,144
    assert layer_bytes(a, HCA, M) == 8_519_680 + 262_144 == 8_781_824
    assert layer_bytes(a, HCA, M, "fp8") == 4_858_880 + 262_144 == 5_121_024
    # Shorter than the window: every token is in it; 100 // 4 = 25 and 100 // 128 = 0 entries.
    assert layer_entries(a, CSA, 100) == (100, 25, 25)
    assert layer_bytes(a, HCA, 100) == 100 * 1024 + 262_144


def test_flash_totals_and_the_comparison_rows() -> None:
    cfg, _ = _flash()
    # 2 sliding, 21 CSA, 20 HCA layers (compress_ratios [0, 0, 4, 128, ..., 4])
    bf16 = 2 * 131_072 + 21 * 335_716_352 + 20 * 8_781_824
    fp8 = 2 * 74_752 + 21 * 187_810_816 + 20 * 5_121_024
    assert v4_cache_bytes(cfg, M) == bf16 == 7_225_942_016
    assert v4_cache_bytes(cfg, M, "fp8") == fp8 == 4_046_597_120
    table = v4_kv_table(cfg, M)
    assert [(r.layer_type, r.layers) for r in table.rows] == [(SLIDING, 2), (CSA, 21), (HCA, 20)]
    assert (table.total("bf16"), table.total("fp8")) == (bf16, fp8)
    v32, v3 = table.refs
    # V3.2: latent 512 + 64 and an indexer key of 128, 61 layers; fp8 656 + 132. V3: 1,152 / 656.
    assert (v32.model, v32.bytes_per_token_per_layer_bf16, v32.bytes_per_token_per_layer_fp8) == (
        "deepseek-v3.2", (576 + 128) * 2, 656 + 132)
    assert (v32.bytes_bf16, v32.bytes_fp8) == (1408 * 61 * M, 788 * 61 * M)
    assert (v3.model, v3.bytes_bf16, v3.bytes_fp8) == ("deepseek-v3", 1152 * 61 * M, 656 * 61 * M)
    with pytest.raises(ConfigError, match="comparison rows are MLA models"):
        reference_row(cfg, M)


# ---------------------------------------------------------------------------- the commands
def _cells(line: str) -> list[str]:
    return re.split(r"\s{2,}", line.strip())


def test_kv_cache_cli_flash_at_1m(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["kv-cache", "--model", "deepseek-v4-flash", "--context", str(M)]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert "window 128, CSA 1/4" in lines[0] and "at 1,048,576 tokens per sequence" in lines[1]
    assert _cells(lines[2]) == ["type", "layers", "entries per layer", "state B/layer", "bf16 B/token",
                                "bf16 bytes", "fp8 B/token", "fp8 bytes"]
    rows = {c[0]: c[1:] for c in map(_cells, lines[4:10])}

    def expect(layers: int, bf16: int, fp8: int) -> list[str]:
        return [str(layers), f"{bf16:,}", f"{bf16 / M:,.1f}", f"{fp8:,}", f"{fp8 / M:,.1f}"]

    def numbers(cells: list[str]) -> list[str]:  # layers and the four byte columns
        return [cells[0], cells[-3], cells[-4], cells[-1], cells[-2]]

    assert rows["sliding"][1:3] == ["128", "0"] and numbers(rows["sliding"]) == expect(2, 262_144, 149_504)
    assert rows["CSA"][1:3] == ["128 + 262,144 + 262,144 keys", "40,960"]
    assert numbers(rows["CSA"]) == expect(21, 7_050_043_392, 3_944_027_136)
    assert rows["HCA"][1:3] == ["128 + 8,192", "262,144"]
    assert numbers(rows["HCA"]) == expect(20, 175_636_480, 102_420_480)
    assert numbers(rows["V4 total"]) == expect(43, 7_225_942_016, 4_046_597_120)
    v32 = rows["deepseek-v3.2 (MLA latent + DSA keys)"]
    assert v32[1] == "1,048,576 + 1,048,576 keys"
    assert numbers(v32) == expect(61, 1408 * 61 * M, 788 * 61 * M)
    assert numbers(rows["deepseek-v3 (MLA latent)"]) == expect(61, 1152 * 61 * M, 656 * 61 * M)
    assert f"V4 / deepseek-v3.2: {7_225_942_016 / (1408 * 61 * M):.2%} in bf16" in out
    assert f"V4 per sequence: {fmt_bytes(7_225_942_016)} bf16, {fmt_bytes(4_046_597_120)} fp8" in out


def test_kv_cache_cli_json_and_batch(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["kv-cache", "--model", "deepseek-v4-flash", "--context", str(M), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert (data["total_bf16"], data["total_fp8"]) == (7_225_942_016, 4_046_597_120)
    assert [r["model"] for r in data["refs"]] == ["deepseek-v3.2", "deepseek-v3"]
    assert main(["kv-cache", "--model", "deepseek-v4-flash", "--context", "131072", "--batch-size", "3"]) == 0
    (total,) = [_cells(ln) for ln in capsys.readouterr().out.splitlines() if ln.startswith("V4 total")]
    assert total[-3] == f"{3 * v4_cache_bytes(get_preset('deepseek-v4-flash'), 131072):,}"


def test_info_describes_v4(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["info", "--model", "deepseek-v4-flash"]) == 0
    out = capsys.readouterr().out
    assert "43 (2 sliding_attention, 21 compressed_sparse_attention, 20 heavily_compressed_attention)" in out
    assert "schedule:     S S C H C H" in out
    assert "window 128, CSA 1/4 (indexer 64 heads x 128, top-k 512), HCA 1/128" in out
    assert "YaRN x16 from 65,536" in out and "first 3 MoE layer(s) hash-routed" in out
    assert "4 residual streams" in out
    assert f"{fmt_bytes(7_225_942_016)} bf16, {fmt_bytes(4_046_597_120)} fp8 per sequence at 1,048,576" in out
    assert "584 B fp8" in out


# ---------------------------------------------------------------------------- presets
def test_v4_presets_build_and_validate() -> None:
    for name in ("deepseek-v4-flash", "deepseek-v4-pro", "tiny-v4"):
        cfg = get_preset(name)
        assert dataclasses.replace(cfg) == cfg  # validates again, field by field
    flash, a = _flash()
    assert (flash.dim, flash.n_layers, a.n_heads, a.head_dim, a.q_lora_rank, a.o_groups) == (
        4096, 43, 64, 512, 1024, 8)
    assert a.layer_types[:4] == (SLIDING, SLIDING, CSA, HCA) and a.layer_types[-1] == CSA
    y = a.compress_rope.yarn
    assert y is not None and (y.factor, y.original_max_position_embeddings) == (16, 65536)
    assert flash.rope.yarn is None and flash.rope.interleaved and a.compress_rope.theta == 160000
    assert flash.moe is not None and flash.moe.n_hash_layers == 3 and flash.max_seq_len == M
    pro = get_preset("deepseek-v4-pro")
    assert isinstance(pro.attention, V4AttentionConfig) and pro.moe is not None
    assert Counter(pro.attention.layer_types) == {HCA: 31, CSA: 30}
    assert (pro.dim, pro.attention.o_groups, pro.attention.index_topk, pro.moe.n_routed_experts) == (
        7168, 16, 1024, 384)
    tiny = get_preset("tiny-v4")
    assert isinstance(tiny.attention, V4AttentionConfig) and tiny.hyper is not None and tiny.moe
    assert set(tiny.attention.layer_types) == {SLIDING, CSA, HCA} and tiny.hyper.hc_mult == 2
    assert [tiny.is_hash_layer(i) for i in range(tiny.n_layers)] == [True, True, False, False, False]


# DeepSeek-V4-Flash's published config.json (the keys transformers reads; values as cited in
# latentattn/presets/deepseek_v4.py); V4-Pro's differs in the keys _PRO changes.
_FLASH_JSON: dict[str, Any] = {
    "model_type": "deepseek_v4", "vocab_size": 129280, "hidden_size": 4096, "num_hidden_layers": 43,
    "num_attention_heads": 64, "num_key_value_heads": 1, "head_dim": 512, "qk_rope_head_dim": 64,
    "q_lora_rank": 1024, "o_groups": 8, "o_lora_rank": 1024, "sliding_window": 128,
    "index_n_heads": 64, "index_head_dim": 128, "index_topk": 512, "n_routed_experts": 256,
    "n_shared_experts": 1, "num_experts_per_tok": 6, "moe_intermediate_size": 2048,
    "routed_scaling_factor": 1.5, "scoring_func": "sqrtsoftplus", "topk_method": "noaux_tc",
    "norm_topk_prob": True, "num_hash_layers": 3, "swiglu_limit": 10.0, "hc_mult": 4,
    "hc_sinkhorn_iters": 20, "hc_eps": 1e-6, "rms_norm_eps": 1e-6, "hidden_act": "silu",
    "max_position_embeddings": 1048576, "rope_theta": 10000, "compress_rope_theta": 160000,
    "rope_scaling": {"type": "yarn", "factor": 16, "original_max_position_embeddings": 65536,
                     "beta_fast": 32, "beta_slow": 1},
    "tie_word_embeddings": False, "num_nextn_predict_layers": 1,
    "compress_ratios": [0, 0] + [4, 128] * 20 + [4, 0],  # the last entry: the MTP layer
}
_PRO = {"hidden_size": 7168, "num_hidden_layers": 61, "num_attention_heads": 128, "q_lora_rank": 1536,
        "o_groups": 16, "index_topk": 1024, "n_routed_experts": 384, "moe_intermediate_size": 3072,
        "routed_scaling_factor": 2.5, "compress_ratios": [128, 128] + [4, 128] * 29 + [4, 0]}


@pytest.mark.parametrize(("name", "config_json"), [
    ("deepseek-v4-flash", _FLASH_JSON), ("deepseek-v4-pro", {**_FLASH_JSON, **_PRO})])
def test_presets_equal_the_published_config_json(name: str, config_json: dict[str, Any]) -> None:
    """Read through the config.json reader (latentattn.interop), the published values give the
    preset field for field."""
    from latentattn.interop.hf_config import config_from_hf

    assert dataclasses.replace(config_from_hf(config_json), name=name) == get_preset(name)


def test_v4_parameter_counts() -> None:
    """Published: V4-Flash 284B total / 13B active, V4-Pro 1.6T / 49B (their MTP layer not built)."""
    flash = count_parameters(get_preset("deepseek-v4-flash"))
    pro = count_parameters(get_preset("deepseek-v4-pro"))
    assert 284e9 < flash["total"] < 285e9 and 13e9 < flash["active"] < 14e9
    assert 1.55e12 < pro["total"] < 1.6e12 and 49e9 < pro["active"] < 50e9


def test_v4_parameters_match_transformers() -> None:
    """What transformers' DeepseekV4ForCausalLM holds (on the meta device: no memory) for tiny-v4."""
    torch = pytest.importorskip("torch")
    hf = pytest.importorskip("transformers.models.deepseek_v4.modeling_deepseek_v4")
    cfg = get_preset("tiny-v4")
    a, m = cfg.attention, cfg.moe
    assert isinstance(a, V4AttentionConfig) and m is not None and cfg.hyper is not None
    hf_cfg = hf.DeepseekV4Config(
        vocab_size=cfg.vocab_size, hidden_size=cfg.dim, num_hidden_layers=cfg.n_layers,
        num_attention_heads=a.n_heads, head_dim=a.head_dim, q_lora_rank=a.q_lora_rank,
        partial_rotary_factor=a.qk_rope_head_dim / a.head_dim, o_groups=a.o_groups,
        o_lora_rank=a.o_lora_rank, layer_types=list(a.layer_types), sliding_window=a.sliding_window,
        compress_rates={CSA: a.csa_rate, HCA: a.hca_rate}, index_n_heads=a.index_n_heads,
        index_head_dim=a.index_head_dim, index_topk=a.index_topk, hc_mult=cfg.hyper.hc_mult,
        n_routed_experts=m.n_routed_experts, num_experts_per_tok=m.num_experts_per_tok,
        moe_intermediate_size=m.moe_intermediate_size,
        mlp_layer_types=["hash_moe"] * m.n_hash_layers + ["moe"] * (cfg.n_layers - m.n_hash_layers))
    with torch.device("meta"):
        model = hf.DeepseekV4ForCausalLM(hf_cfg)
    assert count_parameters(cfg)["total"] == sum(p.numel() for p in model.parameters())


def test_v4_attention_flops() -> None:
    """tiny-v4 over 8 tokens: window 8 (mean 4.5 keys), 2 * 4 heads * 2 * 32 = 512 FLOPs a key.
    CSA (m 4, k 4): visible entries per query 0,0,0,1,1,1,1,2 (6 in all), all selected; the
    indexer's 2 * 16 * 16 = 512 FLOPs on each. HCA (m' 8): one entry, seen by the last query."""
    sliding = 512 * 4.5
    csa = 512 * (36 + 6) / 8 + 512 * 6 / 8
    hca = 512 * (36 + 1) / 8
    assert attention_flops_per_token(get_preset("tiny-v4"), 8) == sliding + 2 * csa + 2 * hca == 13184


# ---------------------------------------------------------------------------- errors
@pytest.mark.parametrize(("change", "message"), [
    ({"o_groups": 3}, r"V4AttentionConfig\.o_groups \(3\) must divide n_heads \* head_dim \(32768\)"),
    ({"layer_types": (SLIDING,) * 42 + ("full_attention",)},
     r"V4AttentionConfig\.layer_types holds unknown type\(s\) full_attention"),
    ({"qk_rope_head_dim": 63}, r"V4AttentionConfig\.qk_rope_head_dim must be even"),
    ({"csa_rate": 0}, r"V4AttentionConfig\.csa_rate must be a positive integer"),
])
def test_bad_v4_attention_names_the_field(change: dict[str, Any], message: str) -> None:
    _, a = _flash()
    with pytest.raises(ConfigError, match=message):
        dataclasses.replace(a, **change)


def test_bad_v4_model_names_the_field(capsys: pytest.CaptureFixture[str]) -> None:
    cfg, a = _flash()
    with pytest.raises(ConfigError, match=r"V4AttentionConfig\.layer_types has 42 entries.*n_layers is 43"):
        dataclasses.replace(cfg, attention=dataclasses.replace(a, layer_types=a.layer_types[:-1]))
    assert cfg.moe is not None
    with pytest.raises(ConfigError, match=r"MoEConfig\.n_hash_layers \(44\) exceeds ModelConfig\.n_layers"):
        dataclasses.replace(cfg, moe=dataclasses.replace(cfg.moe, n_hash_layers=44))
    with pytest.raises(ConfigError, match="unknown V4 layer type 'full_attention'"):
        layer_entries(a, "full_attention", 8)
    # The per-token calculators refuse V4 (its bytes depend on the context) and say where to go.
    for f in (cache_bytes_per_token_per_layer, kv_table):
        with pytest.raises(ConfigError, match=r"not a per-token constant.*calc\.v4_kv"):
            f(cfg)
    # --index-topk sets V4's CSA k; the fp8 indexer-key format is DSA's alone.
    assert "applies only to DSA models" in cli_error(
        capsys, ["kv-cache", "--model", "deepseek-v4-flash", "--indexer-keys", "fp8"])


@pytest.mark.parametrize("context", [61, 512])
def test_allocated_cache_equals_the_formula(context: int) -> None:
    """What make_cache allocates for tiny-v4 in bf16 is calc.v4_kv's formula, layer by layer
    (contexts of at least the window: the ring holds the window whatever the context; 61 is not
    a multiple of either compression rate)."""
    import torch

    from latentattn.calc.v4_kv import layer_bytes, v4_cache_bytes
    from latentattn.model.transformer import Transformer

    cfg = get_preset("tiny-v4")
    a = cfg.attention
    assert isinstance(a, V4AttentionConfig) and context >= a.sliding_window
    cache = Transformer(cfg).make_cache(1, context, dtype=torch.bfloat16)
    assert [layer.nbytes for layer in cache.layers] == [layer_bytes(a, t, context) for t in a.layer_types]
    assert cache.nbytes == v4_cache_bytes(cfg, context)
