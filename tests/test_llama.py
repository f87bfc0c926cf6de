"""Llama-family checkpoints (Llama, Qwen2, Mistral) into latentattn's GQA Transformer, with
transformers' own models as the oracle: random weights, shapes unlike the defaults (3 heads,
head_dim != hidden / heads, MQA and MHA layouts, q/k/v(/o) biases, tied and untied embeddings),
each RoPE type (default, linear, llama3, yarn) and a sliding window."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from hf_oracle import HFRun, ids, max_diff
from latentattn import load
from latentattn.config import GQAConfig
from latentattn.errors import ConfigError
from latentattn.interop.hf_config import config_from_hf


def _llama(**kw: Any) -> Any:
    from transformers import LlamaConfig, LlamaForCausalLM

    base: dict[str, Any] = dict(vocab_size=256, hidden_size=48, intermediate_size=80,
                                num_hidden_layers=2, num_attention_heads=3, num_key_value_heads=1,
                                head_dim=20, max_position_embeddings=64, rms_norm_eps=1e-5)
    return LlamaForCausalLM(LlamaConfig(**{**base, **kw}))


def _qwen2(**kw: Any) -> Any:
    from transformers import Qwen2Config, Qwen2ForCausalLM

    base: dict[str, Any] = dict(vocab_size=256, hidden_size=64, intermediate_size=96,
                                num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                max_position_embeddings=64)
    return Qwen2ForCausalLM(Qwen2Config(**{**base, **kw}))


def _mistral(**kw: Any) -> Any:
    from transformers import MistralConfig, MistralForCausalLM

    base: dict[str, Any] = dict(vocab_size=256, hidden_size=48, intermediate_size=64,
                                num_hidden_layers=2, num_attention_heads=6, num_key_value_heads=2,
                                head_dim=8, max_position_embeddings=128, sliding_window=64)
    return MistralForCausalLM(MistralConfig(**{**base, **kw}))


# YaRN's original 32 positions are crossed by the 30 + 8 generated tokens.
CASES: dict[str, Any] = {
    "llama-mqa-tied-llama3": lambda: _llama(
        tie_word_embeddings=True,
        rope_parameters={"rope_type": "llama3", "rope_theta": 5000.0, "factor": 8.0,
                         "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                         "original_max_position_embeddings": 16}),
    "llama-mha-bias-linear": lambda: _llama(
        num_key_value_heads=3, attention_bias=True,
        rope_parameters={"rope_type": "linear", "rope_theta": 10000.0, "factor": 2.0}),
    "qwen2-gqa-tied-yarn": lambda: _qwen2(
        tie_word_embeddings=True,
        rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0, "factor": 2.0,
                         "original_max_position_embeddings": 32}),
    "mistral-gqa-window": lambda: _mistral(),
}


@pytest.fixture(scope="module", params=sorted(CASES))
def hf_run(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> HFRun:
    torch.manual_seed(0)
    model = CASES[request.param]().eval()
    with torch.no_grad():
        for p in model.parameters():  # wider than the 0.02 init: a wrong mapping must show
            p.add_(torch.randn_like(p) * (0.2 if p.dim() >= 2 else 0.3))
    return HFRun(request.param, tmp_path_factory.mktemp(request.param), model)


def test_logits_match_transformers(hf_run: HFRun) -> None:
    ours = load(hf_run.path)
    assert isinstance(ours.config.attention, GQAConfig)
    x = ids(40, seed=2)
    with torch.no_grad():
        want = hf_run.model(x).logits
        got = ours(x)
    assert max_diff(got, want) < 1e-4, hf_run.case


def test_greedy_generation_matches_transformers(hf_run: HFRun) -> None:
    from conftest import assert_same_greedy

    ours = load(hf_run.path)
    got = ours.generate(hf_run.prompt, 8)
    assert_same_greedy(got, hf_run.generated, ours, hf_run.prompt.shape[1])


def test_config_fields_are_read() -> None:
    cfg = config_from_hf(_llama(num_key_value_heads=3, attention_bias=True).config.to_dict())
    a = cfg.attention
    assert isinstance(a, GQAConfig) and (a.n_heads, a.n_kv_heads, a.head_dim) == (3, 3, 20)
    assert a.qkv_bias and a.o_bias and cfg.norm_eps == 1e-5 and not cfg.rope.interleaved
    q = config_from_hf(_qwen2().config.to_dict())
    assert q.attention.qkv_bias and not q.attention.o_bias  # type: ignore[union-attr]
    assert config_from_hf(_mistral().config.to_dict()).max_seq_len == 64  # capped at the window


@pytest.mark.parametrize(("change", "match"), [
    ({"hidden_act": "gelu"}, "hidden_act 'gelu' is not supported"),
    ({"mlp_bias": True}, "mlp_bias=true is not supported"),
    ({"rope_parameters": {"rope_type": "dynamic", "factor": 2.0}}, "rope_type 'dynamic' is not supported"),
    ({"rope_parameters": {"rope_type": "llama3", "factor": 2.0}}, "'low_freq_factor' is missing"),
    ({"model_type": "gpt2"}, "model_type 'gpt2' is not supported"),
])
def test_bad_llama_configs(change: dict[str, Any], match: str) -> None:
    d = {**_llama().config.to_dict(), **change}
    with pytest.raises(ConfigError, match=match):
        config_from_hf(d, source="config.json")


def test_saved_llama_loads_into_the_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from latentattn.cli import main

    _llama(num_key_value_heads=3).save_pretrained(tmp_path / "llama")
    assert main(["info", "--model", str(tmp_path / "llama")]) == 0
    assert "MHA: 3 heads, 3 kv heads, head_dim 20" in capsys.readouterr().out
