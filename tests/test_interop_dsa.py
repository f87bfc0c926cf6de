"""Hugging Face DeepSeek-V3.2 (DSA) checkpoints: transformers' DeepseekV32ForCausalLM is the oracle.

As tests/test_interop.py: random-weight transformers models saved with their save_pretrained and
loaded with ours, ours saved and loaded with theirs; logits agree to 1e-4, greedy generations
exactly. The sequences are longer than index_topk, so the indexer's selection matters (checked).
The indexer has 16 heads: with few heads ReLU can zero every head's score for some keys, and
exact ties make the top-k choice implementation-defined.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("transformers.models.deepseek_v32")

from transformers import (  # noqa: E402
    DeepseekV32Config,
    DeepseekV32ForCausalLM,
)

import hf_oracle as oracle  # noqa: E402
import latentattn  # noqa: E402
from conftest import assert_same_greedy  # noqa: E402
from latentattn import CheckpointError, ConfigError, Transformer, get_preset  # noqa: E402
from latentattn.attention.dsa import SparseLatentAttention  # noqa: E402
from latentattn.config import IndexerConfig, MLAConfig, ModelConfig  # noqa: E402
from latentattn.interop.hf import config_from_hf, config_to_hf  # noqa: E402

TOPK = 8
TINY: dict[str, Any] = dict(
    vocab_size=256, hidden_size=64, intermediate_size=128, moe_intermediate_size=32,
    num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4, q_lora_rank=32,
    kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16,
    max_position_embeddings=128, initializer_range=0.1,
    index_n_heads=16, index_head_dim=16, index_topk=TOPK,
    n_routed_experts=8, num_experts_per_tok=2, first_k_dense_replace=1, n_shared_experts=1,
    n_group=4, topk_group=2, routed_scaling_factor=2.5, norm_topk_prob=True,
)
YARN = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0,
        "original_max_position_embeddings": 32, "mscale": 1.0, "mscale_all_dim": 1.0,
        "beta_fast": 32, "beta_slow": 1}
CASES: dict[str, dict[str, Any]] = {
    "v32-moe": {},
    "v32-moe-yarn": {"rope_parameters": YARN},
}
FORMS = ["auto", "gather", "masked"]
_DELETE = object()  # in a config change: remove the field


def _dsa_layers(model: Transformer) -> list[SparseLatentAttention]:
    layers = [b.self_attn for b in model.blocks if isinstance(b.self_attn, SparseLatentAttention)]
    assert len(layers) == model.config.n_layers
    return layers


def _set_form(model: Transformer, form: str) -> None:
    for layer in _dsa_layers(model):
        layer.prefill_form = form  # type: ignore[assignment]


def _hf_model(case: str) -> Any:
    torch.manual_seed(1234)
    cfg = DeepseekV32Config(**TINY, **CASES[case])
    cfg._attn_implementation = "eager"
    model = DeepseekV32ForCausalLM(cfg).eval()
    with torch.no_grad():
        for name, t in [*model.named_buffers(), *model.named_parameters()]:
            if name.endswith("e_score_correction_bias"):  # exercise the bias path of V3 routing
                t.copy_(torch.randn_like(t) * 0.5)
            elif ".indexer.k_norm." in name:  # non-trivial LayerNorm gain and bias
                t.copy_(torch.randn_like(t) * 0.1 + (1.0 if name.endswith("weight") else 0.0))
    return model


class HFRun(oracle.HFRun):
    def __init__(self, case: str, path: Path) -> None:
        super().__init__(case, path, _hf_model(case))
        with torch.no_grad():
            self.ids = oracle.ids(24)  # 24 > index_topk = 8: most rows attend to a subset
            self.logits = self.model(self.ids).logits


@pytest.fixture(scope="module", params=list(CASES))
def hf_run(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> HFRun:
    return HFRun(request.param, tmp_path_factory.mktemp(request.param))


def _indexer_removed(model: Transformer) -> Transformer:
    """The same weights as plain MLA (no indexer, dense attention)."""
    a = model.config.attention
    assert isinstance(a, MLAConfig)
    dense = Transformer(model.config.replace(attention=dataclasses.replace(a, indexer=None))).eval()
    missing, unexpected = dense.load_state_dict(model.state_dict(), strict=False)
    assert not missing and unexpected and all(".indexer." in k for k in unexpected)
    return dense


# ------------------------------------------------------------------ HF -> ours
@pytest.mark.parametrize("form", FORMS)
@torch.no_grad()
def test_logits_match_transformers(hf_run: HFRun, form: str) -> None:
    ours = latentattn.from_pretrained(str(hf_run.path))
    a = ours.config.attention
    assert isinstance(a, MLAConfig) and a.indexer == IndexerConfig(16, 16, TOPK)
    assert ours.config.rope.interleaved and (ours.config.rope.yarn is not None) == ("yarn" in hf_run.case)
    _set_form(ours, form)
    got = ours(hf_run.ids)
    assert oracle.max_diff(got, hf_run.logits) < 1e-4, (hf_run.case, form)
    assert hf_run.logits.abs().max() > 0.1  # not a degenerate all-zero comparison
    # Sparsity is active: without the indexer (dense MLA over all 24 keys) the logits differ.
    assert oracle.max_diff(_indexer_removed(ours)(hf_run.ids), got) > 1e-2


@pytest.mark.parametrize("form", FORMS)
@torch.no_grad()
def test_greedy_generation_matches_transformers(hf_run: HFRun, form: str) -> None:
    ours = latentattn.from_pretrained(str(hf_run.path))
    _set_form(ours, form)
    got = ours.generate(hf_run.prompt, 8)
    assert hf_run.generated.shape == (2, 38)
    assert_same_greedy(got, hf_run.generated, ours, 30)


# ------------------------------------------------------------------ ours -> HF
def _our_configs() -> dict[str, ModelConfig]:
    dsa = get_preset("tiny-dsa")
    a = dsa.attention
    assert isinstance(a, MLAConfig)
    dense = dsa.replace(attention=dataclasses.replace(a, indexer=IndexerConfig(16, 16, TOPK)),
                        max_seq_len=128)
    return {"dsa-dense": dense, "dsa-moe": dense.replace(moe=get_preset("tiny-mla-moe").moe)}


OUR_CONFIGS = _our_configs()


def _our_model(name: str) -> Transformer:
    return oracle.our_model(OUR_CONFIGS[name])


@pytest.mark.parametrize("name", list(OUR_CONFIGS))
@torch.no_grad()
def test_transformers_loads_our_checkpoint(name: str, tmp_path: Path) -> None:
    ours = _our_model(name)
    written = oracle.save_ours(ours, tmp_path)
    assert written["model_type"] == "deepseek_v32"
    assert written["architectures"] == ["DeepseekV32ForCausalLM"]
    assert (written["index_n_heads"], written["index_head_dim"], written["index_topk"]) == (16, 16, TOPK)
    hf, info = oracle.transformers_load(tmp_path)
    assert type(hf) is DeepseekV32ForCausalLM
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    assert not info["mismatched_keys"], info
    moe_layers = [i for i, t in enumerate(hf.config.mlp_layer_types) if t == "sparse"]
    assert moe_layers == [i for i in range(ours.config.n_layers) if ours.config.is_moe_layer(i)]
    ids = oracle.ids(24)
    for form in FORMS:
        _set_form(ours, form)
        assert oracle.max_diff(ours(ids), hf(ids).logits) < 1e-4, (name, form)
    assert oracle.max_diff(_indexer_removed(ours)(ids), ours(ids)) > 1e-2  # sparsity is active


@pytest.mark.parametrize("name", list(OUR_CONFIGS))
@torch.no_grad()
def test_round_trip_ours(name: str, tmp_path: Path) -> None:
    ours = _our_model(name)
    latentattn.save_pretrained(ours, str(tmp_path))
    back = latentattn.from_pretrained(str(tmp_path))
    assert dataclasses.replace(back.config, name="x") == dataclasses.replace(ours.config, name="x")
    a, b = ours.state_dict(), back.state_dict()
    assert a.keys() == b.keys() and any(".indexer.k_norm.bias" in k for k in a)
    for k in a:
        assert torch.equal(a[k], b[k]), k
    ids = oracle.ids(20)
    assert torch.equal(back(ids), ours(ids))


# ------------------------------------------------------------------ bad checkpoints
@pytest.fixture
def saved(tmp_path: Path) -> Path:
    latentattn.save_pretrained(_our_model("dsa-moe"), str(tmp_path))
    return tmp_path


@pytest.mark.parametrize("tensor", ["wq_b.weight", "wk.weight", "k_norm.weight", "k_norm.bias",
                                    "weights_proj.weight"])
def test_missing_indexer_tensor(saved: Path, tensor: str) -> None:
    name = f"model.layers.1.self_attn.indexer.{tensor}"
    oracle.edit_weights(saved, lambda t: t.pop(name))
    with pytest.raises(CheckpointError, match=f"missing tensor.*{name.replace('.', r'[.]')}"):
        latentattn.from_pretrained(str(saved))


def test_wrong_shape_indexer_tensor(saved: Path) -> None:
    name = "model.layers.0.self_attn.indexer.wq_b.weight"  # (16 heads * 16, q_lora_rank 32)
    oracle.edit_weights(saved, lambda t: t.update({name: torch.zeros(128, 32)}))
    with pytest.raises(CheckpointError,
                       match=r"indexer\.wq_b\.weight has shape \[128, 32\], expected \[256, 32\]"):
        latentattn.from_pretrained(str(saved))


def test_extra_indexer_tensor(saved: Path) -> None:
    name = "model.layers.0.self_attn.indexer.bogus.weight"
    oracle.edit_weights(saved, lambda t: t.update({name: torch.zeros(2)}))
    with pytest.raises(CheckpointError, match=r"unexpected.*indexer\.bogus\.weight"):
        latentattn.from_pretrained(str(saved))


def test_v32_weights_under_v3_config_are_refused(saved: Path) -> None:
    # A V3.2 checkpoint whose config.json says deepseek_v3 would silently drop the indexer.
    oracle.edit_config(saved, model_type="deepseek_v3", architectures=["DeepseekV3ForCausalLM"])
    with pytest.raises(CheckpointError, match=r"unexpected tensor.*self_attn\.indexer\."):
        latentattn.from_pretrained(str(saved))


def test_bad_index_topk_names_field_and_file(saved: Path) -> None:
    oracle.edit_config(saved, index_topk=0)
    with pytest.raises(ConfigError, match=r"config\.json: .*index_topk must be a positive integer"):
        latentattn.from_pretrained(str(saved))


def test_index_head_dim_below_rope_dim(saved: Path) -> None:
    oracle.edit_config(saved, index_head_dim=4)  # qk_rope_head_dim is 8
    with pytest.raises(ConfigError, match=r"config\.json: .*index_head_dim \(4\) must be at least "
                                          r"qk_rope_head_dim \(8\)"):
        latentattn.from_pretrained(str(saved))


# ------------------------------------------------------------------ config mapping
def _real_v32_config() -> dict[str, Any]:
    # deepseek-ai/DeepSeek-V3.2-Exp config.json: DeepSeek-V3's plus the indexer fields.
    return {**oracle.real_v3_config(), "architectures": ["DeepseekV32ForCausalLM"],
            "model_type": "deepseek_v32", "index_head_dim": 128, "index_n_heads": 64,
            "index_topk": 2048}


def test_real_v32_config_matches_preset() -> None:
    cfg = config_from_hf(_real_v32_config(), max_seq_len=4096, mla_impl="absorb")
    expected = get_preset("deepseek-v3.2").replace(max_seq_len=4096, mla_impl="absorb")
    assert dataclasses.replace(cfg, name="x") == dataclasses.replace(expected, name="x")


@pytest.mark.parametrize("name", ["deepseek-v3.2", "tiny-dsa"])
def test_config_to_hf_round_trip(name: str) -> None:
    cfg = get_preset(name)
    d = config_to_hf(cfg)
    assert d["model_type"] == "deepseek_v32" and "rope_interleave" not in d
    back = config_from_hf(d)
    assert dataclasses.replace(back, name="x") == dataclasses.replace(cfg, name="x")
    # transformers accepts every field we write, with the meaning we give it.
    hf = DeepseekV32Config(**{k: v for k, v in d.items() if k not in ("architectures", "model_type")})
    a = cfg.attention
    assert isinstance(a, MLAConfig) and a.indexer is not None
    assert (hf.index_n_heads, hf.index_head_dim, hf.index_topk) == (
        a.indexer.index_n_heads, a.indexer.index_head_dim, a.indexer.index_topk)
    assert hf.mlp_layer_types == [
        "sparse" if cfg.is_moe_layer(i) else "dense" for i in range(cfg.n_layers)]


def test_missing_index_topk_is_transformers_default() -> None:
    d = _real_v32_config()
    del d["index_topk"]
    a = config_from_hf(d).attention
    assert isinstance(a, MLAConfig) and a.indexer is not None and a.indexer.index_topk == 2048


@pytest.mark.parametrize(("change", "match"), [
    ({"index_n_heads": _DELETE}, r"/c/config\.json: required field 'index_n_heads' is missing"),
    ({"index_head_dim": _DELETE}, r"/c/config\.json: required field 'index_head_dim' is missing"),
    ({"index_topk": 0}, r"/c/config\.json: IndexerConfig\.index_topk must be a positive integer"),
    ({"index_topk": -5}, r"index_topk must be a positive integer, got -5"),
    ({"index_head_dim": 32}, r"/c/config\.json: .*index_head_dim \(32\) must be at least "
                             r"qk_rope_head_dim \(64\)"),
    ({"index_n_heads": "64"}, r"field 'index_n_heads' must be int, got str"),
    ({"q_lora_rank": None}, r"/c/config\.json: .*q_lora_rank must be set when indexer is"),
    ({"rope_interleave": False}, r"rope_interleave=false is not supported for deepseek_v32"),
    ({"scoring_func": "softmax"}, r"deepseek_v32 routes with scoring_func 'sigmoid'"),
    ({"mlp_layer_types": ["sparse", "dense"]}, r"'mlp_layer_types' must be a list of 61"),
    ({"mlp_layer_types": ["sparse"] + ["dense"] * 60}, r"dense layers followed by sparse"),
])
def test_bad_v32_configs(change: dict[str, Any], match: str) -> None:
    d = _real_v32_config()
    for k, v in change.items():
        if v is _DELETE:
            del d[k]
        else:
            d[k] = v
    with pytest.raises(ConfigError, match=match):
        config_from_hf(d, source="/c/config.json")


def test_mlp_layer_types_decide_moe_layers() -> None:
    # DeepseekV32DecoderLayer reads mlp_layer_types; first_k_dense_replace only derives it.
    d = _real_v32_config()
    d["mlp_layer_types"] = ["dense"] * 5 + ["sparse"] * 56
    moe = config_from_hf(d).moe
    assert moe is not None and moe.first_k_dense_replace == 5
    d["mlp_layer_types"] = ["dense"] * 61
    assert config_from_hf(d).moe is None


def test_softmax_moe_cannot_be_saved_as_v32() -> None:
    cfg = OUR_CONFIGS["dsa-moe"]
    assert cfg.moe is not None
    bad = cfg.replace(moe=dataclasses.replace(cfg.moe, scoring_func="softmax", topk_method="greedy"))
    with pytest.raises(ConfigError, match="deepseek_v32"):
        config_to_hf(bad)
