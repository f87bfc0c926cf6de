"""Hugging Face DeepSeek-V2/V3 checkpoints: transformers is the oracle in both directions.

Random-weight transformers models are saved with their own save_pretrained and loaded with ours
(and ours saved and loaded with theirs); logits must agree to 1e-4 and greedy generations exactly.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import pytest
import torch

transformers = pytest.importorskip("transformers")

from safetensors import safe_open  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402
from transformers import (  # noqa: E402
    AutoModelForCausalLM,
    DeepseekV2Config,
    DeepseekV2ForCausalLM,
    DeepseekV3Config,
    DeepseekV3ForCausalLM,
)

import hf_oracle as oracle  # noqa: E402
import latentattn  # noqa: E402
from conftest import FsyncRecorder, assert_durable, assert_same_greedy, cli_error  # noqa: E402
from latentattn import CheckpointError, ConfigError, Transformer, get_preset  # noqa: E402
from latentattn.config import MoEConfig, RopeConfig, YarnConfig  # noqa: E402
from latentattn.interop.hf import config_from_hf, config_to_hf, dequantize_fp8  # noqa: E402

TINY: dict[str, Any] = dict(
    vocab_size=256, hidden_size=64, intermediate_size=128, moe_intermediate_size=32,
    num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=4, kv_lora_rank=32,
    qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16, max_position_embeddings=128,
    # Larger than the default 0.02 so that logits and router scores are well separated:
    # argmax and top-k choices then do not hinge on 1e-7 rounding differences.
    initializer_range=0.1,
)
MOE: dict[str, Any] = dict(n_routed_experts=8, num_experts_per_tok=2, first_k_dense_replace=1)

# name -> (transformers classes, config kwargs)
CASES: dict[str, tuple[type, type, dict[str, Any]]] = {
    "v2-noqlora-greedy": (DeepseekV2Config, DeepseekV2ForCausalLM, dict(
        **MOE, q_lora_rank=None, n_shared_experts=1, topk_method="greedy",
    )),
    "v2-qlora-group-yarn": (DeepseekV2Config, DeepseekV2ForCausalLM, dict(
        **MOE, q_lora_rank=32, n_shared_experts=2, topk_method="group_limited_greedy",
        n_group=4, topk_group=2, routed_scaling_factor=2.0,
        # DeepSeek-V2's own mscale values (0.707), unlike V3's 1.0.
        rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0,
                         "original_max_position_embeddings": 32, "mscale": 0.707,
                         "mscale_all_dim": 0.707, "beta_fast": 32, "beta_slow": 1},
    )),
    "v3-qlora-yarn-moe": (DeepseekV3Config, DeepseekV3ForCausalLM, dict(
        **MOE, q_lora_rank=32, n_shared_experts=1, n_group=4, topk_group=2,
        routed_scaling_factor=2.5, norm_topk_prob=True,
        rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0,
                         "original_max_position_embeddings": 32, "mscale": 1.0,
                         "mscale_all_dim": 1.0, "beta_fast": 32, "beta_slow": 1},
    )),
    # Dense: transformers builds an MoE only for layer_idx >= first_k_dense_replace.
    "v3-noqlora-dense": (DeepseekV3Config, DeepseekV3ForCausalLM, dict(
        q_lora_rank=None, n_routed_experts=8, num_experts_per_tok=2, n_group=4, topk_group=2,
        first_k_dense_replace=3,
    )),
}


def _hf_model(case: str) -> Any:
    config_cls, model_cls, extra = CASES[case]
    torch.manual_seed(1234)
    cfg = config_cls(**TINY, **extra)
    cfg._attn_implementation = "eager"
    model = model_cls(cfg).eval()
    with torch.no_grad():
        for name, buf in model.named_buffers():
            if name.endswith("e_score_correction_bias"):  # exercise the bias path of V3 routing
                buf.copy_(torch.randn_like(buf) * 0.5)
    return model


class HFRun(oracle.HFRun):
    def __init__(self, case: str, path: Path) -> None:
        super().__init__(case, path, _hf_model(case))
        with torch.no_grad():
            # 40 > original_max_position_embeddings=32: YaRN's interpolated frequencies matter.
            self.logits = {t: self.model(oracle.ids(t)).logits for t in (12, 40)}


@pytest.fixture(scope="module", params=list(CASES))
def hf_run(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> HFRun:
    return HFRun(request.param, tmp_path_factory.mktemp(request.param))


# ------------------------------------------------------------------ HF -> ours
@pytest.mark.parametrize("impl", ["auto", "naive", "absorb"])
@torch.no_grad()
def test_logits_match_transformers(hf_run: HFRun, impl: str) -> None:
    ours = latentattn.from_pretrained(str(hf_run.path), mla_impl=impl)
    assert ours.config.attention.impl == impl  # type: ignore[union-attr]
    for t, expected in hf_run.logits.items():
        assert oracle.max_diff(ours(oracle.ids(t)), expected) < 1e-4, (hf_run.case, impl, t)
        assert expected.abs().max() > 0.1  # not a degenerate all-zero comparison


@pytest.mark.parametrize("impl", ["auto", "absorb"])
@torch.no_grad()
def test_greedy_generation_matches_transformers(hf_run: HFRun, impl: str) -> None:
    ours = latentattn.from_pretrained(str(hf_run.path), mla_impl=impl)
    got = ours.generate(hf_run.prompt, 8)
    assert hf_run.generated.shape == (2, 38)
    assert_same_greedy(got, hf_run.generated, ours, 30)


@pytest.mark.parametrize("case", ["v2-qlora-group-yarn", "v3-qlora-yarn-moe"])
@torch.no_grad()
def test_old_rope_scaling_form(case: str, tmp_path: Path) -> None:
    hf = _hf_model(case)
    hf.save_pretrained(tmp_path)
    cfg_path = tmp_path / "config.json"
    d = json.loads(cfg_path.read_text())
    rope = d.pop("rope_parameters")
    d["rope_theta"] = rope.pop("rope_theta")
    rope["type"] = rope.pop("rope_type")  # DeepSeek's own files say "type"
    d["rope_scaling"] = rope
    cfg_path.write_text(json.dumps(d))
    ours = latentattn.from_pretrained(str(tmp_path))
    assert ours.config.rope.yarn is not None
    assert ours.config.rope.yarn.factor == 4.0
    ids = oracle.ids(40)
    assert oracle.max_diff(ours(ids), hf(ids).logits) < 1e-4


# ------------------------------------------------------------------ ours -> HF
def _our_configs() -> dict[str, Any]:
    moe = get_preset("tiny-mla-moe")
    assert moe.moe is not None
    softmax = moe.replace(moe=dataclasses.replace(
        moe.moe, scoring_func="softmax", topk_method="group_limited_greedy", norm_topk_prob=False,
    ), max_seq_len=128, rope=RopeConfig(theta=10000.0, interleaved=True, yarn=YarnConfig(
        factor=4.0, original_max_position_embeddings=32, mscale=0.707, mscale_all_dim=0.707)))
    dense = get_preset("tiny-mla").replace(tie_word_embeddings=True)
    return {"sigmoid-moe": moe, "softmax-moe-yarn": softmax, "dense-tied": dense}


OUR_CONFIGS = _our_configs()


def _our_model(name: str) -> Transformer:
    return oracle.our_model(OUR_CONFIGS[name])


@pytest.mark.parametrize("name", list(OUR_CONFIGS))
@torch.no_grad()
def test_transformers_loads_our_checkpoint(name: str, tmp_path: Path) -> None:
    ours = _our_model(name)
    written = oracle.save_ours(ours, tmp_path)
    softmax = ours.config.moe is not None and ours.config.moe.scoring_func == "softmax"
    assert written["model_type"] == ("deepseek_v2" if softmax else "deepseek_v3")
    assert "rope_parameters" in written and "rope_scaling" not in written
    hf, info = oracle.transformers_load(tmp_path)
    assert type(hf) is (DeepseekV2ForCausalLM if softmax else DeepseekV3ForCausalLM)
    # Every tensor transformers wants is in the file and nothing else is.
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    assert not info["mismatched_keys"], info
    ids = oracle.ids(40)
    assert oracle.max_diff(ours(ids), hf(ids).logits) < 1e-4
    if ours.config.tie_word_embeddings:
        with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
            assert "lm_head.weight" not in f.keys()  # noqa: SIM118 -- transformers writes tied weights once


@pytest.mark.parametrize("name", list(OUR_CONFIGS))
@torch.no_grad()
def test_round_trip_ours(name: str, tmp_path: Path) -> None:
    ours = _our_model(name)
    latentattn.save_pretrained(ours, str(tmp_path))
    back = latentattn.from_pretrained(str(tmp_path))
    assert dataclasses.replace(back.config, name="x") == dataclasses.replace(ours.config, name="x")
    a, b = ours.state_dict(), back.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    if ours.config.tie_word_embeddings:
        assert back.lm_head.weight is back.embed_tokens.weight
    ids = oracle.ids(20)
    assert torch.equal(back(ids), ours(ids))


@torch.no_grad()
def test_v3_half_split_rope(tmp_path: Path) -> None:
    # rope_interleave=false: DeepseekV3Attention uses the half-split apply_rotary_pos_emb.
    config_cls, model_cls, extra = CASES["v3-noqlora-dense"]
    cfg = config_cls(**TINY, **dict(extra, rope_interleave=False))
    cfg._attn_implementation = "eager"
    hf = model_cls(cfg).eval()
    hf.save_pretrained(tmp_path)
    ours = latentattn.from_pretrained(str(tmp_path))
    assert ours.config.rope.interleaved is False
    assert oracle.max_diff(ours(oracle.ids(12)), hf(oracle.ids(12)).logits) < 1e-4
    assert config_to_hf(ours.config)["rope_interleave"] is False


@pytest.mark.filterwarnings("ignore:Initializing zero-element tensors")
@torch.no_grad()
def test_no_shared_experts_both_ways(tmp_path: Path) -> None:
    # transformers keeps a zero-width shared_experts MLP; ours has none.
    config_cls, model_cls, extra = CASES["v3-qlora-yarn-moe"]
    cfg = config_cls(**TINY, **dict(extra, n_shared_experts=0))
    cfg._attn_implementation = "eager"
    hf = model_cls(cfg).eval()
    hf.save_pretrained(tmp_path / "hf")
    ours = latentattn.from_pretrained(str(tmp_path / "hf"))
    assert ours.layers[1].mlp.shared_experts is None  # type: ignore[union-attr]
    ids = oracle.ids(12)
    assert oracle.max_diff(ours(ids), hf(ids).logits) < 1e-4
    latentattn.save_pretrained(ours, str(tmp_path / "ours"))
    back, info = oracle.transformers_load(tmp_path / "ours")
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    assert oracle.max_diff(ours(ids), back.eval()(ids).logits) < 1e-4


def test_gqa_cannot_be_saved(tmp_path: Path) -> None:
    model = Transformer(get_preset("tiny-gqa"))
    with pytest.raises(ConfigError, match="GQA models have no DeepSeek format"):
        latentattn.save_pretrained(model, str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()


@torch.no_grad()
def test_sharded_checkpoint_loads_and_stale_files_go(tmp_path: Path) -> None:
    from latentattn.interop.hf import save_pretrained

    ours = _our_model("sigmoid-moe")
    save_pretrained(ours, tmp_path, max_shard_size="100KB")
    shards = sorted(p.name for p in tmp_path.glob("model-*.safetensors"))
    assert len(shards) > 1 and (tmp_path / "model.safetensors.index.json").is_file()
    assert not (tmp_path / "model.safetensors").exists()
    back = latentattn.from_pretrained(str(tmp_path))
    ids = oracle.ids(12)
    assert torch.equal(back(ids), ours(ids))
    hf = AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="eager").eval()
    assert oracle.max_diff(hf(ids).logits, ours(ids)) < 1e-4
    # Saving unsharded over it leaves no shard or index behind to be mixed in.
    save_pretrained(ours, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "model.safetensors"]


def test_shards_without_index_load_all(tmp_path: Path) -> None:
    ours = _our_model("dense-tied")
    latentattn.save_pretrained(ours, str(tmp_path))
    tensors = load_file(str(tmp_path / "model.safetensors"))
    keys = sorted(tensors)
    (tmp_path / "model.safetensors").unlink()
    save_file({k: tensors[k] for k in keys[::2]}, str(tmp_path / "a.safetensors"))
    save_file({k: tensors[k] for k in keys[1::2]}, str(tmp_path / "b.safetensors"))
    back = latentattn.from_pretrained(str(tmp_path))
    assert torch.equal(back.embed_tokens.weight, ours.embed_tokens.weight)


def test_failed_save_leaves_previous_checkpoint(tmp_path: Path, monkeypatch: pytest.MonkeyPatch
                                                ) -> None:
    import safetensors.torch

    ours = _our_model("dense-tied")
    latentattn.save_pretrained(ours, str(tmp_path))
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}

    def boom(*args: object, **kwargs: object) -> None:
        Path(str(args[1])).write_bytes(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.torch, "save_file", boom)
    other = _our_model("sigmoid-moe")
    with pytest.raises(OSError, match="disk full"):
        latentattn.save_pretrained(other, str(tmp_path))
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before  # no temp files either


def test_save_is_durable(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from latentattn.interop.hf import save_pretrained

    ours = _our_model("sigmoid-moe")
    save_pretrained(ours, tmp_path, max_shard_size="100KB")
    rec = FsyncRecorder(monkeypatch)
    save_pretrained(ours, tmp_path)  # unsharded over sharded: stale shards are deleted
    for name in ("model.safetensors", "config.json"):
        assert_durable(rec, tmp_path / name)
    # ... and the directory is fsynced again after the stale shards are gone.
    assert rec.events[-1] == ("fsync-dir", tmp_path.stat().st_ino)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "model.safetensors"]


# ------------------------------------------------------------------ bad checkpoints
@pytest.fixture
def saved(tmp_path: Path) -> Path:
    latentattn.save_pretrained(_our_model("sigmoid-moe"), str(tmp_path))
    return tmp_path


def test_missing_tensor(saved: Path) -> None:
    oracle.edit_weights(saved, lambda t: t.pop("model.layers.1.self_attn.kv_b_proj.weight"))
    with pytest.raises(CheckpointError, match=r"missing tensor.*model\.layers\.1\.self_attn\.kv_b_proj"):
        latentattn.from_pretrained(str(saved))


def test_extra_tensor(saved: Path) -> None:
    oracle.edit_weights(saved, lambda t: t.update({"model.layers.0.self_attn.bogus.weight": torch.zeros(2)}))
    with pytest.raises(CheckpointError, match=r"unexpected.*model\.layers\.0\.self_attn\.bogus\.weight"):
        latentattn.from_pretrained(str(saved))


def _add_mtp_layer(layer: int) -> Any:
    def add(t: dict[str, torch.Tensor]) -> None:
        t[f"model.layers.{layer}.embed_tokens.weight"] = torch.zeros(4, 4)
        t[f"model.layers.{layer}.eh_proj.weight"] = torch.zeros(4, 4)

    return add


def test_declared_mtp_layer_and_rotary_buffers_are_ignored(saved: Path) -> None:
    # DeepSeek-V3 ships its multi-token-prediction module as layer n_layers (61 there) and says
    # so in config.json: "num_nextn_predict_layers": 1.
    oracle.edit_config(saved, num_nextn_predict_layers=1)
    oracle.edit_weights(saved, _add_mtp_layer(2))
    oracle.edit_weights(saved, lambda t: t.update(
        {"model.layers.0.self_attn.rotary_emb.inv_freq": torch.zeros(4)}))
    model = latentattn.from_pretrained(str(saved))
    assert len(model.layers) == 2
    # transformers' default when the field is absent (DeepseekV3Config.num_mtp_layers = 1).
    d = json.loads((saved / "config.json").read_text())
    del d["num_nextn_predict_layers"]
    (saved / "config.json").write_text(json.dumps(d))
    assert len(latentattn.from_pretrained(str(saved)).layers) == 2


def test_undeclared_layers_are_refused(saved: Path) -> None:
    # Our config.json says num_nextn_predict_layers 0: a layer 2 is not an MTP module.
    oracle.edit_weights(saved, _add_mtp_layer(2))
    with pytest.raises(CheckpointError, match=r"unexpected.*model\.layers\.2\.eh_proj.*declares 2 "
                       r"layer\(s\) and 0 multi-token-prediction"):
        latentattn.from_pretrained(str(saved))
    # One MTP layer declared, a second one is still unexpected.
    oracle.edit_config(saved, num_nextn_predict_layers=1)
    oracle.edit_weights(saved, _add_mtp_layer(3))
    with pytest.raises(CheckpointError, match=r"unexpected tensor\(s\) not in the model: "
                       r"model\.layers\.3\.e"):
        latentattn.from_pretrained(str(saved))


def test_checkpoint_with_more_layers_than_its_config_is_refused(
        saved: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # A 2-layer checkpoint whose config.json says 1 layer used to load its first layer silently.
    oracle.edit_config(saved, num_hidden_layers=1)
    with pytest.raises(CheckpointError, match=r"unexpected.*model\.layers\.1\.input_layernorm"):
        latentattn.from_pretrained(str(saved))
    line = cli_error(capsys, ["generate", "--model", str(saved), "--prompt", "x", "--max-new-tokens", "1"])
    assert "model.layers.1." in line


def test_wrong_shape(saved: Path) -> None:
    name = "model.layers.0.self_attn.kv_b_proj.weight"
    oracle.edit_weights(saved, lambda t: t.update({name: torch.zeros(7, 32)}))
    with pytest.raises(CheckpointError, match=r"kv_b_proj\.weight has shape \[7, 32\], expected \[128, 32\]"):
        latentattn.from_pretrained(str(saved))


def test_pickle_only_is_refused_without_unpickling(tmp_path: Path) -> None:
    d = config_to_hf(get_preset("tiny-mla"))
    (tmp_path / "config.json").write_text(json.dumps(d))
    # Not a valid pickle: any attempt to unpickle it would fail with a pickle error instead.
    (tmp_path / "pytorch_model.bin").write_bytes(b"\x80\x04junk that is not a pickle")
    with pytest.raises(CheckpointError, match=r"pytorch_model\.bin.*safetensors only"):
        latentattn.from_pretrained(str(tmp_path))


def test_missing_directory_and_config(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="nope"):
        latentattn.from_pretrained(str(tmp_path / "nope"))
    with pytest.raises(CheckpointError, match=r"config\.json"):
        latentattn.from_pretrained(str(tmp_path))


def test_missing_config_field_names_field_and_file(saved: Path) -> None:
    cfg_path = saved / "config.json"
    d = json.loads(cfg_path.read_text())
    del d["kv_lora_rank"]
    cfg_path.write_text(json.dumps(d))
    with pytest.raises(ConfigError, match=r"config\.json.*'kv_lora_rank' is missing"):
        latentattn.from_pretrained(str(saved))


# ------------------------------------------------------------------ config mapping
def _real_v2_lite_config() -> dict[str, Any]:
    # deepseek-ai/DeepSeek-V2-Lite config.json.
    return {
        "architectures": ["DeepseekV2ForCausalLM"], "model_type": "deepseek_v2",
        "vocab_size": 102400, "hidden_size": 2048, "intermediate_size": 10944,
        "moe_intermediate_size": 1408, "num_hidden_layers": 27, "num_attention_heads": 16,
        "num_key_value_heads": 16, "n_shared_experts": 2, "n_routed_experts": 64,
        "routed_scaling_factor": 1.0, "kv_lora_rank": 512, "q_lora_rank": None,
        "qk_rope_head_dim": 64, "v_head_dim": 128, "qk_nope_head_dim": 128,
        "topk_method": "greedy", "n_group": 1, "topk_group": 1, "num_experts_per_tok": 6,
        "moe_layer_freq": 1, "first_k_dense_replace": 1, "norm_topk_prob": False,
        "scoring_func": "softmax", "aux_loss_alpha": 0.001, "seq_aux": True,
        "hidden_act": "silu", "max_position_embeddings": 163840, "rms_norm_eps": 1e-06,
        "tie_word_embeddings": False, "rope_theta": 10000, "attention_bias": False,
        "rope_scaling": {"beta_fast": 32, "beta_slow": 1, "factor": 40, "mscale": 0.707,
                         "mscale_all_dim": 0.707, "original_max_position_embeddings": 4096,
                         "type": "yarn"},
    }


@pytest.mark.parametrize(("raw", "preset"), [
    (oracle.real_v3_config, "deepseek-v3"), (_real_v2_lite_config, "deepseek-v2-lite"),
])
def test_real_configs_match_presets(raw: Any, preset: str) -> None:
    cfg = config_from_hf(raw(), max_seq_len=4096, mla_impl="absorb")
    expected = get_preset(preset).replace(max_seq_len=4096, mla_impl="absorb")
    assert dataclasses.replace(cfg, name="x") == dataclasses.replace(expected, name="x")


def test_config_to_hf_round_trip() -> None:
    for name in ("deepseek-v3", "deepseek-v2", "tiny-mla", "tiny-mla-moe"):
        cfg = get_preset(name)
        back = config_from_hf(config_to_hf(cfg))
        assert dataclasses.replace(back, name="x") == dataclasses.replace(cfg, name="x"), name


def test_transformers_written_v3_config_without_routing_fields() -> None:
    d = oracle.real_v3_config()
    del d["topk_method"], d["scoring_func"]
    moe = config_from_hf(d).moe
    assert moe is not None and (moe.scoring_func, moe.topk_method) == ("sigmoid", "noaux_tc")


def test_yarn_without_original_max_uses_max_position_embeddings() -> None:
    d = oracle.real_v3_config()
    del d["rope_scaling"]["original_max_position_embeddings"]
    yarn = config_from_hf(d).rope.yarn
    assert yarn is not None and yarn.original_max_position_embeddings == 163840


def test_dense_when_no_routed_experts() -> None:
    d = oracle.real_v3_config()
    d["n_routed_experts"] = None
    assert config_from_hf(d).moe is None


@pytest.mark.parametrize(("change", "match"), [
    ({"model_type": "gpt_neox"},
     r"'gpt_neox' is not supported \(supported: deepseek_v2, deepseek_v3, deepseek_v32, deepseek_v4, "
     r"llama, qwen2, mistral\)"),
    ({"attention_bias": True}, "attention_bias"),
    ({"hidden_act": "gelu"}, "hidden_act 'gelu'"),
    ({"hidden_size": "7168"}, r"field 'hidden_size' must be int, got str"),
    ({"q_lora_rank": 1.5}, "q_lora_rank"),
    ({"scoring_func": "softmax"}, "sigmoid"),
    ({"rope_scaling": {"type": "dynamic", "factor": 2.0}}, "rope_type 'dynamic'"),
])
def test_bad_configs(change: dict[str, Any], match: str) -> None:
    d = oracle.real_v3_config()
    d.update(change)
    with pytest.raises(ConfigError, match=match):
        config_from_hf(d, source="/ckpt/config.json")


def test_v2_moe_layer_freq() -> None:
    d = _real_v2_lite_config()
    d["moe_layer_freq"] = 2
    with pytest.raises(ConfigError, match="moe_layer_freq=2"):
        config_from_hf(d)


def test_missing_field_names_file() -> None:
    d = _real_v2_lite_config()
    del d["v_head_dim"]
    with pytest.raises(ConfigError, match=r"/x/config\.json: required field 'v_head_dim'"):
        config_from_hf(d, source="/x/config.json")


def test_unknown_override() -> None:
    with pytest.raises(ConfigError, match=r"unknown ModelConfig field.*n_experts"):
        config_from_hf(oracle.real_v3_config(), n_experts=3)


# ------------------------------------------------------------------ FP8 and dtypes
def test_dequantize_fp8_blocks() -> None:
    torch.manual_seed(0)
    w = torch.randn(200, 300)
    scale = torch.rand(2, 3) + 0.5  # one multiplier per 128x128 block, edge blocks cropped
    expanded = scale.repeat_interleave(128, 0).repeat_interleave(128, 1)[:200, :300]
    w8 = (w / expanded).to(torch.float8_e4m3fn)
    out = dequantize_fp8(w8, scale)
    assert out.dtype == torch.float32 and out.shape == (200, 300)
    # Block (1, 2) (rows 128.., cols 256..) uses scale[1, 2]:
    assert torch.equal(out[150, 280], w8[150, 280].float() * scale[1, 2])
    assert torch.equal(out[5, 5], w8[5, 5].float() * scale[0, 0])
    torch.testing.assert_close(out, w, rtol=0.07, atol=0.02)  # e4m3 has 3 mantissa bits
    with pytest.raises(CheckpointError, match="scale shape"):
        dequantize_fp8(w8, torch.ones(3, 3))


def test_fp8_checkpoint_is_dequantized(saved: Path) -> None:
    name = "model.layers.1.self_attn.kv_b_proj.weight"  # (128, 32): one block
    holder: dict[str, torch.Tensor] = {}

    def quantize(t: dict[str, torch.Tensor]) -> None:
        w = t[name]
        scale = w.abs().max().reshape(1, 1) / 448.0
        t[name] = (w / scale).to(torch.float8_e4m3fn)
        t[name + "_scale_inv"] = scale.float()
        holder["expected"] = t[name].float() * scale

    oracle.edit_weights(saved, quantize)
    cfg_path = saved / "config.json"
    d = json.loads(cfg_path.read_text())
    d["quantization_config"] = {"quant_method": "fp8", "weight_block_size": [128, 128]}
    cfg_path.write_text(json.dumps(d))
    model = latentattn.from_pretrained(str(saved))
    assert torch.equal(model.layers[1].self_attn.kv_b_proj.weight, holder["expected"])


def test_bfloat16_load_keeps_router_bias_fp32(saved: Path) -> None:
    model = latentattn.from_pretrained(str(saved), dtype="bfloat16")
    assert model.dtype == torch.bfloat16
    mlp = model.layers[1].mlp
    bias = mlp.gate.e_score_correction_bias  # type: ignore[union-attr]
    assert bias.dtype == torch.float32
    with safe_open(str(saved / "model.safetensors"), "pt") as f:
        assert torch.equal(bias, f.get_tensor("model.layers.1.mlp.gate.e_score_correction_bias"))
    assert model.rotary.cos.dtype == torch.float32
    assert model(oracle.ids(5)).dtype == torch.bfloat16


def test_moe_config_fields_reach_transformers() -> None:
    cfg = get_preset("tiny-mla-moe")
    d = config_to_hf(cfg)
    hf_cfg = DeepseekV3Config(**{k: v for k, v in d.items() if k not in ("architectures", "model_type")})
    assert isinstance(cfg.moe, MoEConfig)
    assert hf_cfg.n_routed_experts == cfg.moe.n_routed_experts
    assert hf_cfg.rope_parameters["rope_type"] == "default"
    assert hf_cfg.num_key_value_heads == cfg.attention.n_heads
