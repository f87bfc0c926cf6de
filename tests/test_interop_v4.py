"""DeepSeek-V4 checkpoints (``deepseek_v4``): transformers 5.25 is the oracle in both directions.

Configs: transformers' DeepseekV4Config read into ours and written back (odd head counts, head_dim
not a power of two, every layer type and both MLP types, hc_mult 2 and 3, compress rates that
divide no typical length, DeepSeek's legacy keys). Names: every tensor of a random
DeepseekV4ForCausalLM, in each of its three namings, maps to one of ours and back. Weights: what
transformers writes loads here value for value, quantised checkpoints dequantise as transformers
dequantises them, and what we write transformers loads. With latentattn's V4 model: logits within
1e-4 of transformers' full forward in fp32, and the save -> transformers -> logits round trip.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path
from typing import Any

import pytest
import torch

transformers = pytest.importorskip("transformers")

from safetensors import safe_open  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402
from transformers import DeepseekV4Config, DeepseekV4ForCausalLM  # noqa: E402

import hf_oracle as oracle  # noqa: E402
import latentattn  # noqa: E402
from conftest import FsyncRecorder, assert_durable, cli_error  # noqa: E402
from latentattn import CheckpointError, ConfigError, Transformer  # noqa: E402
from latentattn.config import (  # noqa: E402
    CSA,
    HCA,
    SLIDING,
    HyperConfig,
    ModelConfig,
    MoEConfig,
    RopeConfig,
    V4AttentionConfig,
)
from latentattn.interop.hf import config_from_hf, config_to_hf  # noqa: E402
from latentattn.interop.hf_v4 import (  # noqa: E402
    checkpoint_names,
    dequantize_fp4,
    hf_name,
    load_v4_state,
    native_name,
    scale_to_float,
)
from latentattn.interop.hf_v4_config import V4Quant, v4_quantization  # noqa: E402

HASH, MOE = "hash_moe", "moe"
# Small and unlike transformers' defaults. index_n_heads >= 16: with a few indexer heads the
# ReLU'd scores tie and top-k's tie-breaking, not the maths, picks the compressed entries.
COMMON: dict[str, Any] = dict(
    vocab_size=96, hidden_size=40, moe_intermediate_size=24, max_position_embeddings=256,
    initializer_range=0.1, eos_token_id=None, bos_token_id=None,
)
CASES: dict[str, dict[str, Any]] = {
    # 5 heads of 40 (rope 12), 5 output groups of 7, 3 streams, rates 3 and 7, window 6, YaRN.
    "odd-hc3-yarn": dict(
        num_hidden_layers=5, num_attention_heads=5, head_dim=40, partial_rotary_factor=12 / 40,
        q_lora_rank=24, o_groups=5, o_lora_rank=7, sliding_window=6,
        layer_types=[SLIDING, CSA, HCA, CSA, SLIDING], mlp_layer_types=[HASH, HASH, MOE, MOE, MOE],
        compress_rates={CSA: 3, HCA: 7}, index_n_heads=16, index_head_dim=20, index_topk=5,
        hc_mult=3, hc_sinkhorn_iters=7, n_routed_experts=6, num_experts_per_tok=3,
        routed_scaling_factor=2.0, swiglu_limit=3.5, rope_theta=5000.0, compress_rope_theta=40000.0,
        rope_parameters={"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32,
                         "beta_fast": 16, "beta_slow": 2},
    ),
    # 3 heads of 24 (rope 6), every layer compressed, no hash layer, 2 streams, rates 5 and 9.
    "hc2-nohash": dict(
        num_hidden_layers=3, num_attention_heads=3, head_dim=24, partial_rotary_factor=6 / 24,
        q_lora_rank=20, o_groups=3, o_lora_rank=10, sliding_window=7, layer_types=[CSA, HCA, CSA],
        mlp_layer_types=[MOE] * 3, compress_rates={CSA: 5, HCA: 9}, index_n_heads=17,
        index_head_dim=12, index_topk=3, hc_mult=2, n_routed_experts=5, num_experts_per_tok=2,
    ),
    # DeepSeek's own keys (its config.json): compress_ratios with the MTP layer's trailing entry,
    # num_hash_layers, qk_rope_head_dim, rope_scaling; transformers' default rates 4 and 128.
    "deepseek-legacy": dict(
        num_hidden_layers=4, num_attention_heads=2, head_dim=36, qk_rope_head_dim=10,
        q_lora_rank=16, o_groups=2, o_lora_rank=9, sliding_window=5,
        compress_ratios=[0, 4, 128, 4, 0], num_hash_layers=1, index_n_heads=16, index_head_dim=14,
        index_topk=2, hc_mult=2, n_routed_experts=4, num_experts_per_tok=2,
        rope_scaling={"type": "yarn", "factor": 2, "original_max_position_embeddings": 128,
                      "beta_fast": 32, "beta_slow": 1},
    ),
}


def _hf_config(case: str) -> Any:
    cfg = DeepseekV4Config(**COMMON, **CASES[case])
    cfg._attn_implementation = "eager"
    return cfg


def _nested(d: Any) -> Any:
    return json.loads(json.dumps(d))  # what config.json holds (tuples become lists)


# --------------------------------------------------------------------------- configs
def _check_same(cfg: ModelConfig, hf: Any) -> None:
    """``cfg`` builds the model transformers builds from ``hf``, field by field."""
    a, moe, hyper = cfg.attention, cfg.moe, cfg.hyper
    assert isinstance(a, V4AttentionConfig) and moe is not None and hyper is not None
    assert (cfg.vocab_size, cfg.dim, cfg.n_layers, cfg.max_seq_len, cfg.norm_eps) == (
        hf.vocab_size, hf.hidden_size, hf.num_hidden_layers, hf.max_position_embeddings,
        hf.rms_norm_eps)
    assert (a.n_heads, a.head_dim, a.qk_rope_head_dim, a.q_lora_rank, a.o_groups, a.o_lora_rank) == (
        hf.num_attention_heads, hf.head_dim, hf.qk_rope_head_dim, hf.q_lora_rank, hf.o_groups,
        hf.o_lora_rank)
    assert a.layer_types == tuple(hf.layer_types)
    assert (a.csa_rate, a.hca_rate) == (hf.compress_rates[CSA], hf.compress_rates[HCA])
    assert (a.sliding_window, a.index_n_heads, a.index_head_dim, a.index_topk) == (
        hf.sliding_window, hf.index_n_heads, hf.index_head_dim, hf.index_topk)
    assert (hyper.hc_mult, hyper.sinkhorn_iters, hyper.eps) == (hf.hc_mult, hf.hc_sinkhorn_iters,
                                                                 hf.hc_eps)
    assert (moe.n_routed_experts, moe.num_experts_per_tok, moe.moe_intermediate_size) == (
        hf.n_routed_experts, hf.num_experts_per_tok, hf.moe_intermediate_size)
    assert moe.n_hash_layers == hf.mlp_layer_types.count(HASH)
    assert [cfg.is_hash_layer(i) for i in range(cfg.n_layers)] == [t == HASH for t in hf.mlp_layer_types]
    assert (moe.scoring_func, moe.routed_scaling_factor, moe.swiglu_limit, moe.n_shared_experts) == (
        hf.scoring_func, hf.routed_scaling_factor, hf.swiglu_limit, 1)
    assert moe.norm_topk_prob and moe.first_k_dense_replace == 0
    _check_rope(cfg, hf)


def _check_rope(cfg: ModelConfig, hf: Any) -> None:
    """Both rope tables: the inverse frequencies and cos/sin scaling transformers computes."""
    from transformers.models.deepseek_v4.modeling_deepseek_v4 import DeepseekV4RotaryEmbedding

    from latentattn.rope import inv_frequencies

    a = cfg.attention
    assert isinstance(a, V4AttentionConfig)
    hf_rope = DeepseekV4RotaryEmbedding(hf)
    for label, rope in (("main", cfg.rope), ("compress", a.compress_rope)):
        assert rope.interleaved
        want = getattr(hf_rope, f"{label}_inv_freq")
        torch.testing.assert_close(inv_frequencies(a.qk_rope_head_dim, rope).float(), want,
                                   rtol=1e-6, atol=0)
        assert getattr(hf_rope, f"{label}_attention_scaling") == 1.0  # V4 never rescales cos/sin


@pytest.mark.parametrize("case", CASES)
def test_config_from_transformers(case: str) -> None:
    hf = _hf_config(case)
    _check_same(config_from_hf(_nested(hf.to_dict())), hf)
    # DeepSeek's own file, read before transformers folded its legacy keys:
    _check_same(config_from_hf({"model_type": "deepseek_v4", **COMMON, **CASES[case]}), hf)


@pytest.mark.parametrize("case", CASES)
def test_config_round_trip(case: str) -> None:
    ours = config_from_hf(_nested(_hf_config(case).to_dict()))
    written = _nested(config_to_hf(ours))
    hf = DeepseekV4Config(**written)  # transformers accepts what we write ...
    _check_same(ours, hf)  # ... and builds the same model from it
    assert config_from_hf(written) == ours
    assert config_from_hf(_nested(hf.to_dict())) == ours


def test_default_schedule_and_hash_layers() -> None:
    # Neither layer_types nor mlp_layer_types: DeepseekV4Config's defaults (two HCA layers, then
    # CSA/HCA alternating; three hash layers).
    d = {"model_type": "deepseek_v4", **COMMON, **CASES["hc2-nohash"], "num_hidden_layers": 6}
    del d["layer_types"], d["mlp_layer_types"], d["compress_rates"]
    hf = DeepseekV4Config(**{k: v for k, v in d.items() if k != "model_type"})
    cfg = config_from_hf(d)
    _check_same(cfg, hf)
    assert isinstance(cfg.attention, V4AttentionConfig)
    assert cfg.attention.layer_types == (HCA, HCA, HCA, CSA, HCA, CSA)


def _flash_config() -> dict[str, Any]:
    # deepseek-ai/DeepSeek-V4-Flash config.json (as the presets module cites it), the fields that
    # shape the model and its quantisation: FP8 weights with ue8m0 scales, FP4 experts.
    return {
        "architectures": ["DeepseekV4ForCausalLM"], "model_type": "deepseek_v4",
        "vocab_size": 129280, "hidden_size": 4096, "moe_intermediate_size": 2048,
        "num_hidden_layers": 43, "num_attention_heads": 64, "num_key_value_heads": 1,
        "head_dim": 512, "qk_rope_head_dim": 64, "q_lora_rank": 1024, "o_groups": 8,
        "o_lora_rank": 1024, "sliding_window": 128, "n_routed_experts": 256, "n_shared_experts": 1,
        "num_experts_per_tok": 6, "first_k_dense_replace": 0, "scoring_func": "sqrtsoftplus",
        "topk_method": "noaux_tc", "norm_topk_prob": True, "routed_scaling_factor": 1.5,
        "swiglu_limit": 10.0, "num_hash_layers": 3, "index_n_heads": 64, "index_head_dim": 128,
        "index_topk": 512, "hc_mult": 4, "hc_sinkhorn_iters": 20, "hc_eps": 1e-6,
        "rms_norm_eps": 1e-6, "rope_theta": 10000, "compress_rope_theta": 160000,
        "rope_scaling": {"type": "yarn", "factor": 16, "original_max_position_embeddings": 65536,
                         "beta_fast": 32, "beta_slow": 1},
        "compress_ratios": [0, 0] + [4, 128] * 20 + [4, 0],
        "max_position_embeddings": 1048576, "num_nextn_predict_layers": 1,
        "tie_word_embeddings": False, "torch_dtype": "bfloat16", "expert_dtype": "fp4",
        "quantization_config": {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                                "scale_fmt": "ue8m0", "weight_block_size": [128, 128]},
    }


def test_real_flash_config() -> None:
    presets = pytest.importorskip("latentattn.presets.deepseek_v4")
    cfg = config_from_hf(_flash_config())
    assert dataclasses.replace(cfg, name="x") == dataclasses.replace(presets.deepseek_v4_flash(), name="x")
    assert v4_quantization(_flash_config()) == V4Quant((128, 128), "ue8m0", "fp4")
    assert config_from_hf(config_to_hf(cfg)) == cfg


@pytest.mark.parametrize(("change", "field"), [
    ({"num_key_value_heads": 2}, "num_key_value_heads"),
    ({"attention_bias": True}, "attention_bias"),
    ({"mlp_bias": True}, "mlp_bias"),
    ({"hidden_act": "gelu"}, "hidden_act"),
    ({"scoring_func": "softmax"}, "scoring_func"),
    ({"topk_method": "greedy"}, "topk_method"),
    ({"n_group": 8}, "n_group"),
    ({"first_k_dense_replace": 1}, "first_k_dense_replace"),
    ({"norm_topk_prob": False}, "norm_topk_prob"),
    ({"n_shared_experts": 2}, "n_shared_experts"),
    ({"layer_types": [SLIDING, "linear_attention", CSA]}, "layer_types"),
    ({"layer_types": [SLIDING, CSA]}, "layer_types"),
    ({"mlp_layer_types": [MOE, HASH, MOE]}, "mlp_layer_types"),
    ({"mlp_layer_types": [MOE, "dense", MOE]}, "mlp_layer_types"),
    ({"layer_types": None, "compress_ratios": [0, 8, 4]}, "compress_ratios"),
    ({"compress_rates": {CSA: 0, HCA: 9}}, "compress_rates"),
    ({"rope_parameters": {"main": {"rope_type": "yarn", "rope_theta": 1e4, "factor": 2.0},
                          "compress": {"rope_type": "default", "rope_theta": 1e5}}}, "rope_parameters"),
    ({"rope_parameters": {"main": {"rope_type": "default", "rope_theta": 1e4},
                          "compress": {"rope_type": "yarn", "rope_theta": 1e5, "factor": 2.0,
                                       "original_max_position_embeddings": 64}}}, "attention_factor"),
    ({"rope_parameters": {"rope_type": "dynamic", "factor": 2.0}}, "rope_type 'dynamic'"),
    ({"head_dim": None}, "head_dim"),
    ({"hc_mult": "4"}, "hc_mult"),
    ({"quantization_config": {"quant_method": "mxfp4"}}, "quant_method 'mxfp4'"),
    ({"quantization_config": {"quant_method": "compressed-tensors"}}, "quant_method"),
    ({"quantization_config": {"quant_method": "fp8", "fmt": "e5m2"}}, "fmt 'e5m2'"),
    ({"quantization_config": {"quant_method": "fp8", "activation_scheme": "static"}}, "activation_scheme"),
    ({"quantization_config": {"quant_method": "fp8", "scale_fmt": "e4m3"}}, "scale_fmt"),
    ({"quantization_config": {"quant_method": "fp8", "expert_dtype": "int4"}}, "expert_dtype"),
    ({"expert_dtype": "fp4"}, "expert_dtype"),  # FP4 experts without a quantization_config
])
def test_unsupported_configs_are_refused_naming_the_field(change: dict[str, Any], field: str) -> None:
    d = _nested(_hf_config("hc2-nohash").to_dict())
    d.update(change)
    with pytest.raises(ConfigError, match=field) as e:
        config_from_hf(d, source="/ckpt/config.json")
    assert "\n" not in str(e.value) and str(e.value).startswith("/ckpt/config.json")


def _tiny_ours() -> ModelConfig:
    return config_from_hf(_nested(_hf_config("hc2-nohash").to_dict()))


@pytest.mark.parametrize(("change", "match"), [
    ({"hyper": None}, "hyper-connections"),
    ({"moe": None}, "MoE in every layer"),
    ({"moe": MoEConfig(5, 1, 2, 24, first_k_dense_replace=1, scoring_func="sqrtsoftplus",
                       topk_method="noaux_tc", norm_topk_prob=True, swiglu_limit=10.0)}, "dense layers"),
    ({"moe": MoEConfig(5, 1, 2, 24, scoring_func="sigmoid", topk_method="noaux_tc",
                       norm_topk_prob=True, swiglu_limit=10.0)}, "sqrtsoftplus"),
    ({"moe": MoEConfig(5, 1, 2, 24, scoring_func="sqrtsoftplus", topk_method="noaux_tc",
                       norm_topk_prob=True)}, "swiglu_limit"),
    ({"rope": RopeConfig(theta=1e4, interleaved=False)}, "interleaved"),
])
def test_unwritable_configs_are_refused(change: dict[str, Any], match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        config_to_hf(dataclasses.replace(_tiny_ours(), **change))


def test_rotary_factor_maps_back_to_the_rope_dims() -> None:
    # transformers takes qk_rope_head_dim = int(head_dim * partial_rotary_factor): the factor we
    # write must land on the rope dims exactly, not a rounding step below.
    cfg = _tiny_ours()
    a = cfg.attention
    assert isinstance(a, V4AttentionConfig)
    for head_dim in range(2, 700, 7):
        for rope in range(2, head_dim + 1, 2):
            if rope > a.index_head_dim:
                break
            c = dataclasses.replace(cfg, attention=dataclasses.replace(
                a, head_dim=head_dim, qk_rope_head_dim=rope, o_groups=1))
            prf = config_to_hf(c)["partial_rotary_factor"]
            assert int(head_dim * prf) == rope, (head_dim, rope, prf)


def test_hyper_and_mtp_fields() -> None:
    cfg = _tiny_ours()
    assert cfg.hyper == HyperConfig(hc_mult=2, sinkhorn_iters=20, eps=1e-6)
    assert config_to_hf(cfg)["num_nextn_predict_layers"] == 0  # we write no MTP module


# --------------------------------------------------------------------------- names
def _hf_model(case: str, seed: int = 1234) -> Any:
    """A random transformers model with every parameter and buffer away from its init (zero sinks,
    position biases and tables would hide a wrong mapping)."""
    torch.manual_seed(seed)
    model = DeepseekV4ForCausalLM(_hf_config(case)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() >= 2:
                p.normal_(0, 0.1)
            elif name.endswith(("sinks", "hc_base", "base")):
                p.normal_(0, 0.5)
            else:
                p.normal_(1.0, 0.1)
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.copy_(torch.randn_like(b) * 0.1)
            elif name.endswith("tid2eid"):
                n = model.config.n_routed_experts
                b.copy_(torch.stack([torch.randperm(n)[: b.shape[1]] for _ in range(b.shape[0])]))
    return model


def _ours(hf_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """transformers' state dict under our names: no ``model.``, routed experts one by one."""
    out: dict[str, torch.Tensor] = {}
    for key, t in hf_state.items():
        name = key.removeprefix("model.")
        if name.endswith("mlp.experts.gate_up_proj"):
            prefix, inter = name.removesuffix("gate_up_proj"), t.shape[1] // 2
            for e in range(t.shape[0]):
                out[f"{prefix}{e}.gate_proj.weight"] = t[e, :inter]
                out[f"{prefix}{e}.up_proj.weight"] = t[e, inter:]
        elif name.endswith("mlp.experts.down_proj"):
            for e in range(t.shape[0]):
                out[f"{name.removesuffix('down_proj')}{e}.down_proj.weight"] = t[e]
        else:
            out[name] = t
    return out


def _transformers_load(path: Path, **kwargs: Any) -> tuple[Any, dict[str, Any]]:
    """transformers' model of a checkpoint directory, with the keys it found missing/unexpected."""
    loaded: Any = DeepseekV4ForCausalLM.from_pretrained(path, output_loading_info=True, **kwargs)
    return loaded[0].eval(), loaded[1]


def _keys(path: Path) -> set[str]:
    with safe_open(str(path / "model.safetensors"), framework="pt") as f:
        return set(f.keys())


@pytest.mark.parametrize("case", ["odd-hc3-yarn", "hc2-nohash"])
def test_every_transformers_tensor_name_is_accounted_for(case: str, tmp_path: Path) -> None:
    model = _hf_model(case)
    hf_state = model.state_dict()
    ours = _ours(hf_state)
    names = checkpoint_names(ours)
    model.save_pretrained(tmp_path / "orig")  # DeepSeek's names (transformers reverts its renames)
    model.save_pretrained(tmp_path / "fused", save_original_format=False)  # its own module names
    for keys in (set(hf_state), _keys(tmp_path / "orig"), _keys(tmp_path / "fused")):
        assert keys <= set(names), sorted(keys - set(names))[:5]
        covered = [o for k in keys for o in names[k].ours]
        assert sorted(covered) == sorted(ours)  # each of ours exactly once
    # ours -> each naming -> ours
    for o in ours:
        assert names[native_name(o)].ours == (o,)
        if ".experts." not in o:
            assert names[hf_name(o)].ours == (o,)
    assert len({native_name(o) for o in ours}) == len(ours)


def _native_file(ours: dict[str, torch.Tensor], path: Path, config: dict[str, Any]) -> None:
    """A checkpoint in DeepSeek's naming (what save_pretrained writes), plus an MTP tensor."""
    tensors = {native_name(k): v.contiguous() for k, v in ours.items()}
    tensors["mtp.0.ffn.gate.weight"] = torch.zeros(3, 2)
    path.mkdir()
    save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})
    (path / "config.json").write_text(json.dumps(config))


def _empty_like(ours: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: torch.full_like(v, -7) for k, v in ours.items()}


def _assert_equal_state(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert got.keys() == want.keys()
    bad = [k for k in want if not torch.equal(got[k], want[k])]
    assert not bad, bad[:5]


@pytest.mark.parametrize("naming", ["deepseek", "transformers-save", "transformers-fused"])
def test_reads_every_naming(naming: str, tmp_path: Path) -> None:
    model = _hf_model("odd-hc3-yarn")
    ours = _ours(model.state_dict())
    path = tmp_path / naming
    if naming == "deepseek":
        _native_file(ours, path, _nested(model.config.to_dict()))
    else:
        model.save_pretrained(path, save_original_format=naming == "transformers-save")
    state = _empty_like(ours)
    load_v4_state(path, json.loads((path / "config.json").read_text()), state)
    _assert_equal_state(state, ours)


def test_transformers_reads_deepseek_naming(tmp_path: Path) -> None:
    # The naming save_pretrained writes: transformers' loader maps it onto its modules, every
    # tensor found, none left over, values unchanged; the MTP tensor skipped.
    model = _hf_model("odd-hc3-yarn")
    ours = _ours(model.state_dict())
    _native_file(ours, tmp_path / "ckpt", _nested(model.config.to_dict()))
    loaded, info = _transformers_load(tmp_path / "ckpt")
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    _assert_equal_state(_ours(loaded.state_dict()), ours)


def test_mtp_tensors_are_skipped_and_said(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    model = _hf_model("hc2-nohash")
    ours = _ours(model.state_dict())
    _native_file(ours, tmp_path / "ckpt", _nested(model.config.to_dict()))
    with caplog.at_level(logging.INFO, logger="latentattn.interop.hf_v4"):
        load_v4_state(tmp_path / "ckpt", {"model_type": "deepseek_v4"}, _empty_like(ours))
    assert "skipped 1 multi-token-prediction tensor(s) (mtp.*)" in caplog.text


# --------------------------------------------------------------------------- errors
@pytest.fixture
def native(tmp_path: Path) -> tuple[Path, dict[str, torch.Tensor]]:
    model = _hf_model("hc2-nohash")
    ours = {k: v.clone() for k, v in _ours(model.state_dict()).items()}
    _native_file(ours, tmp_path / "ckpt", _nested(model.config.to_dict()))
    return tmp_path / "ckpt", ours


def _edit(path: Path, edit: Any) -> None:
    tensors = load_file(str(path / "model.safetensors"))
    edit(tensors)
    save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})


def _load_error(path: Path, ours: dict[str, torch.Tensor]) -> str:
    with pytest.raises(CheckpointError) as e:
        load_v4_state(path, json.loads((path / "config.json").read_text()), _empty_like(ours))
    assert "\n" not in str(e.value)
    return str(e.value)


def test_missing_tensor_is_named(native: tuple[Path, dict[str, torch.Tensor]]) -> None:
    path, ours = native
    _edit(path, lambda t: t.pop("layers.1.attn.compressor.ape"))
    assert "missing tensor(s): layers.1.attn.compressor.ape" in _load_error(path, ours)


def test_unexpected_tensor_is_named(native: tuple[Path, dict[str, torch.Tensor]]) -> None:
    path, ours = native
    _edit(path, lambda t: t.update({"layers.0.attn.wq_c.weight": torch.zeros(2, 2)}))
    assert "unexpected tensor(s) not in the model: layers.0.attn.wq_c.weight" in _load_error(path, ours)


def test_wrong_shape_is_named(native: tuple[Path, dict[str, torch.Tensor]]) -> None:
    path, ours = native
    _edit(path, lambda t: t.update({"layers.0.attn.wq_a.weight": torch.zeros(3, 3)}))
    assert "tensor layers.0.attn.wq_a.weight has shape [3, 3], expected [20, 40]" in _load_error(path, ours)


def test_tensor_given_twice_is_refused(native: tuple[Path, dict[str, torch.Tensor]]) -> None:
    path, ours = native
    _edit(path, lambda t: t.update({"model.embed_tokens.weight": t["embed.weight"].clone()}))
    assert "embed_tokens.weight is given twice" in _load_error(path, ours)


@pytest.mark.parametrize(("value", "match"), [
    (lambda t: t + 5, r"holds expert ids outside \[0, 5\)"),
    (lambda t: t.float(), "is F32, expected an integer table"),
])
def test_bad_hash_table_is_refused(native: tuple[Path, dict[str, torch.Tensor]], value: Any, match: str,
                                   ) -> None:
    path, ours = native
    cfg = json.loads((path / "config.json").read_text())
    cfg["mlp_layer_types"] = [HASH, MOE, MOE]
    (path / "config.json").write_text(json.dumps(cfg))
    ours["layers.0.mlp.gate.tid2eid"] = torch.zeros(96, 2, dtype=torch.long)
    del ours["layers.0.mlp.gate.e_score_correction_bias"]
    table = value(torch.zeros(96, 2, dtype=torch.long))
    _edit(path, lambda t: (t.pop("layers.0.ffn.gate.bias"), t.update({"layers.0.ffn.gate.tid2eid": table})))
    with pytest.raises(CheckpointError, match=match):
        load_v4_state(path, cfg, _empty_like(ours))


def test_tied_head_may_be_in_the_file_or_not(native: tuple[Path, dict[str, torch.Tensor]]) -> None:
    # With tie_word_embeddings the LM head is the embedding: a head.weight in the file (with its
    # scale, if any) is not read, and none is needed.
    path, ours = native
    del ours["lm_head.weight"]
    raw = json.loads((path / "config.json").read_text())
    load_v4_state(path, raw, _empty_like(ours), skip=("lm_head.weight",))
    _edit(path, lambda t: t.pop("head.weight"))
    state = _empty_like(ours)
    load_v4_state(path, raw, state, skip=("lm_head.weight",))
    _assert_equal_state(state, ours)


def test_unsupported_quantisation_exits_2_in_the_cli(native: tuple[Path, dict[str, torch.Tensor]],
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    path, _ = native
    oracle.edit_config(path, quantization_config={"quant_method": "mxfp4"})
    line = cli_error(capsys, ["info", "--model", str(path)])
    assert "quant_method 'mxfp4' is not supported for deepseek_v4" in line


# --------------------------------------------------------------------------- quantised weights
E2M1 = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)


def test_dequantize_fp4_layout() -> None:
    # One row of 64 values: byte j holds value 2j in its low nibble and 2j+1 in its high one;
    # each 32 values share a scale, 2 ** (e - 127) for an e8m0 byte e.
    codes = torch.randint(0, 16, (3, 64), dtype=torch.uint8)
    packed = (codes[:, 0::2] | (codes[:, 1::2] << 4)).view(torch.int8)
    exps = torch.tensor([[120, 131], [127, 127], [100, 140]], dtype=torch.uint8)
    want = torch.tensor([[E2M1[int(c)] * 2.0 ** (int(exps[r, j // 32]) - 127) for j, c in enumerate(row)]
                         for r, row in enumerate(codes)])
    for scale in (exps, exps.view(torch.float8_e8m0fnu), torch.exp2(exps.float() - 127)):
        torch.testing.assert_close(dequantize_fp4(packed, scale), want, rtol=0, atol=0)
    # packed in torch's own FP4 dtype: the same bytes
    fp4 = packed.view(torch.uint8).view(torch.float4_e2m1fn_x2)
    torch.testing.assert_close(dequantize_fp4(fp4, exps), want, rtol=0, atol=0)
    with pytest.raises(CheckpointError, match="FP4 scale shape"):
        dequantize_fp4(packed, exps[:, :1])


def test_e8m0_scales() -> None:
    e = torch.tensor([0, 1, 126, 127, 128, 254], dtype=torch.uint8)
    want = torch.exp2(e.float() - 127)
    assert torch.equal(scale_to_float(e), want)
    assert torch.equal(scale_to_float(e.view(torch.float8_e8m0fnu)), want)


def _quantise(ours: dict[str, torch.Tensor], block: int, scale_fmt: str, scale_suffix: str,
              ) -> dict[str, torch.Tensor]:
    """DeepSeek's naming with its release's formats: the attention's projections (not the
    compressor's or indexer's, which ship in bf16) FP8 e4m3 with one scale per block x block
    tile, routed experts FP4 (two e2m1 codes a byte, one scale per 32 values along a row). The
    values are random codes: the layout, not a quantiser, is under test."""
    out: dict[str, torch.Tensor] = {}

    def scales(shape: tuple[int, ...]) -> torch.Tensor:
        e = torch.randint(118, 132, shape, dtype=torch.uint8)
        return e.view(torch.float8_e8m0fnu) if scale_fmt == "ue8m0" else torch.exp2(e.float() - 127)

    for name, t in ours.items():
        key = native_name(name)
        stem = key.removesuffix(".weight") + ".scale" if scale_suffix == ".scale" else key + "_scale_inv"
        rows = t.shape[0]
        if ".experts." in name:
            codes = torch.randint(0, 16, tuple(t.shape), dtype=torch.uint8)
            out[key] = (codes[:, 0::2] | (codes[:, 1::2] << 4)).view(torch.int8)
            out[stem] = scales((rows, t.shape[1] // 32))
        elif ".attn.w" in key and "compressor" not in key and "indexer" not in key:
            out[key] = torch.randn(tuple(t.shape)).to(torch.float8_e4m3fn)
            out[stem] = scales((-(-rows // block), -(-t.shape[1] // block)))
        else:
            out[key] = t.contiguous()
    return out


QUANT_CASE = dict(  # dims that the FP4 group (32) and the FP8 block (8) divide
    num_hidden_layers=3, num_attention_heads=2, head_dim=32, partial_rotary_factor=8 / 32,
    q_lora_rank=32, o_groups=2, o_lora_rank=16, sliding_window=8, layer_types=[SLIDING, CSA, HCA],
    mlp_layer_types=[HASH, MOE, MOE], compress_rates={CSA: 4, HCA: 8}, index_n_heads=16,
    index_head_dim=16, index_topk=4, hc_mult=2, n_routed_experts=4, num_experts_per_tok=2,
    hidden_size=64, moe_intermediate_size=32,
)


@pytest.mark.parametrize(("scale_fmt", "suffix"), [("ue8m0", ".scale"), ("float", "_scale_inv")])
def test_quantised_checkpoint_dequantises_as_transformers(scale_fmt: str, suffix: str,
                                                          tmp_path: Path) -> None:
    from transformers import FineGrainedFP8Config

    torch.manual_seed(3)
    hf_cfg = DeepseekV4Config(**{**COMMON, **QUANT_CASE})
    ours = _ours(DeepseekV4ForCausalLM(hf_cfg).state_dict())
    config = _nested(hf_cfg.to_dict())
    config["expert_dtype"] = "fp4"  # top level, as DeepSeek ships it
    config["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                                     "scale_fmt": scale_fmt, "weight_block_size": [8, 8]}
    (tmp_path / "q").mkdir()
    save_file(_quantise(ours, 8, scale_fmt, suffix), str(tmp_path / "q" / "model.safetensors"),
              metadata={"format": "pt"})
    (tmp_path / "q" / "config.json").write_text(json.dumps(config))
    state = _empty_like(ours)
    load_v4_state(tmp_path / "q", config, state)
    hf, info = _transformers_load(tmp_path / "q", dtype=torch.float32,
                                  quantization_config=FineGrainedFP8Config(dequantize=True))
    assert not info["missing_keys"] and not info["unexpected_keys"]
    _assert_equal_state(state, _ours(hf.state_dict()))
    name = "layers.0.self_attn.q_a_proj.weight"
    assert not torch.equal(state[name], ours[name])  # the quantised values, not the random init


def test_quantised_tensor_without_scale_is_refused(native: tuple[Path, dict[str, torch.Tensor]]) -> None:
    path, ours = native
    _edit(path, lambda t: t.update({"layers.0.attn.wq_a.weight": t["layers.0.attn.wq_a.weight"].to(
        torch.float8_e4m3fn)}))
    assert ("quantised tensor layers.0.attn.wq_a.weight (float8_e4m3fn) has no scale "
            "(layers.0.attn.wq_a.scale or layers.0.attn.wq_a.weight_scale_inv)") in _load_error(path, ours)


def test_fp4_experts_need_the_config_to_say_so(native: tuple[Path, dict[str, torch.Tensor]]) -> None:
    path, ours = native
    key = "layers.0.ffn.experts.0.w1.weight"  # (24, 40): 40 values a row, not a multiple of 32

    def to_fp4(t: dict[str, torch.Tensor]) -> None:
        t[key] = torch.zeros(24, 20, dtype=torch.int8)
        t[key.removesuffix("weight") + "scale"] = torch.zeros(24, 1, dtype=torch.uint8)

    _edit(path, to_fp4)
    assert "does not declare FP4 experts" in _load_error(path, ours)


# --------------------------------------------------------------------------- with our V4 model
def _v4_model_missing() -> str | None:
    """Why latentattn cannot build a V4 model yet (the attention and the mHC/MoE wiring are
    written separately), or None when it can: checked at import time."""
    try:
        from latentattn.attention.v4 import V4Attention  # noqa: F401

        Transformer(config_from_hf(_nested(DeepseekV4Config(**COMMON, **CASES["hc2-nohash"]).to_dict())))
    except Exception as e:  # any failure means the model is not there yet
        return (f"latentattn cannot build a DeepSeek-V4 model yet (V4Attention, or Transformer(cfg) of "
                f"a deepseek_v4 config: {type(e).__name__} {e})")
    return None


V4_MODEL_MISSING = _v4_model_missing()
needs_v4_model = pytest.mark.skipif(V4_MODEL_MISSING is not None, reason=str(V4_MODEL_MISSING))


@needs_v4_model
@pytest.mark.parametrize("case", CASES)
def test_our_state_dict_is_transformers(case: str, tmp_path: Path) -> None:
    # Names, shapes, and which tensors stay fp32 in a bf16 model (transformers'
    # _keep_in_fp32_modules_strict; ours: KeepFloat32), tensor by tensor. Ours keeps one more:
    # the router weight (latentattn.model.ffn.Router routes in fp32, in every DeepSeek model).
    hf = _hf_model(case)
    hf.save_pretrained(tmp_path)
    hf_bf16 = _ours(DeepseekV4ForCausalLM.from_pretrained(tmp_path, dtype=torch.bfloat16).state_dict())
    model = Transformer(config_from_hf(_nested(hf.config.to_dict())))
    state = model.state_dict()
    assert sorted(state) == sorted(hf_bf16)
    assert {k: tuple(v.shape) for k, v in state.items()} == {k: tuple(v.shape) for k, v in hf_bf16.items()}
    ours_bf16 = model.to(torch.bfloat16).state_dict()
    router = {k for k in ours_bf16 if k.endswith("mlp.gate.weight")}
    assert {k: v.dtype for k, v in ours_bf16.items() if k not in router} == {
        k: v.dtype for k, v in hf_bf16.items() if k not in router}
    assert all(ours_bf16[k].dtype == torch.float32 for k in router)


@needs_v4_model
def test_loaded_model_has_its_computed_buffers(tmp_path: Path) -> None:
    # Buffers no checkpoint holds (V4's RoPE frequencies, the RoPE tables) are computed, not left
    # as uninitialised memory: equal to a freshly built model's, to the rounding of their dtype.
    hf = _hf_model("odd-hc3-yarn")
    hf.save_pretrained(tmp_path)
    loaded = latentattn.load(tmp_path, dtype=torch.bfloat16)
    fresh = Transformer(loaded.config)
    saved = set(fresh.state_dict())
    computed = {n: b for n, b in fresh.named_buffers() if n not in saved}
    assert any(".self_attn." in n for n in computed)
    got = dict(loaded.named_buffers())
    for name, want in computed.items():
        eps = torch.finfo(got[name].dtype).eps
        torch.testing.assert_close(got[name].float(), want, rtol=eps, atol=0, msg=name)


def _hf_logits(model: Any, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits


@needs_v4_model
@pytest.mark.parametrize("case", CASES)
def test_logits_match_transformers(case: str, tmp_path: Path) -> None:
    # 37 tokens: past the window and several compressed entries of every rate, none a multiple.
    hf = _hf_model(case)
    hf.save_pretrained(tmp_path)
    ids = torch.randint(0, COMMON["vocab_size"], (2, 37), generator=torch.Generator().manual_seed(5))
    ours = latentattn.load(tmp_path, dtype=torch.float32)
    with torch.no_grad():
        got = ours(ids)
    assert oracle.max_diff(got, _hf_logits(hf, ids)) < 1e-4


@needs_v4_model
@pytest.mark.parametrize("case", ["odd-hc3-yarn", "deepseek-legacy"])
def test_transformers_loads_our_checkpoint(case: str, tmp_path: Path) -> None:
    hf = _hf_model(case)
    hf.save_pretrained(tmp_path / "theirs")
    ours = latentattn.load(tmp_path / "theirs", dtype=torch.float32)
    latentattn.save_pretrained(ours, tmp_path / "ours")
    assert _keys(tmp_path / "ours") == {native_name(k) for k in ours.state_dict()}
    back, info = _transformers_load(tmp_path / "ours")
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    _assert_equal_state(_ours(back.state_dict()), _ours(hf.state_dict()))
    ids = torch.randint(0, COMMON["vocab_size"], (1, 29), generator=torch.Generator().manual_seed(6))
    assert torch.equal(_hf_logits(back, ids), _hf_logits(hf, ids))


@needs_v4_model
def test_bf16_round_trip_keeps_fp32_tensors(tmp_path: Path) -> None:
    hf = _hf_model("odd-hc3-yarn")
    hf.save_pretrained(tmp_path / "theirs")
    ours = latentattn.load(tmp_path / "theirs", dtype=torch.bfloat16)
    state = ours.state_dict()
    for name in ("layers.0.self_attn.sinks", "layers.1.self_attn.compressor.position_bias",
                 "layers.2.mlp.gate.e_score_correction_bias", "layers.0.attn_hc.fn", "hc_head.hc_fn",
                 "norm.weight", "layers.0.input_layernorm.weight", "layers.1.self_attn.kv_norm.weight"):
        assert state[name].dtype == torch.float32, name
    assert state["layers.0.mlp.gate.tid2eid"].dtype == torch.int64
    assert state["layers.0.self_attn.q_a_proj.weight"].dtype == torch.bfloat16
    latentattn.save_pretrained(ours, tmp_path / "ours")
    assert json.loads((tmp_path / "ours" / "config.json").read_text())["dtype"] == "bfloat16"
    again = latentattn.load(tmp_path / "ours")
    _assert_equal_state(again.state_dict(), state)


@needs_v4_model
def test_sharded_save_is_durable_and_loads(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    hf = _hf_model("hc2-nohash")
    hf.save_pretrained(tmp_path / "theirs")
    ours = latentattn.load(tmp_path / "theirs")
    rec = FsyncRecorder(monkeypatch)
    latentattn.save_pretrained(ours, tmp_path / "ours", max_shard_size="100KB")
    shards = sorted((tmp_path / "ours").glob("model-*.safetensors"))
    assert len(shards) > 1 and (tmp_path / "ours" / "model.safetensors.index.json").is_file()
    for p in [*shards, tmp_path / "ours" / "config.json"]:
        assert_durable(rec, p)
    _assert_equal_state(latentattn.load(tmp_path / "ours").state_dict(), ours.state_dict())
