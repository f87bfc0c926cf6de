"""RoPE/YaRN against transformers' own functions, and the layouts' invariants."""

from __future__ import annotations

import math

import pytest
import torch

from conftest import assert_close
from latentattn.config import RopeConfig, YarnConfig
from latentattn.presets import get_preset
from latentattn.rope import RotaryEmbedding, apply_rope, inv_frequencies, softmax_scale


def test_softmax_scale_of_deepseek_models() -> None:
    """tau = 192^-0.5 m^2, m = 0.1 mscale_all_dim ln(40) + 1 (DeepSeek-V3 ``inference/model.py``):
    V3 tau = 0.1352 (mscale_all_dim 1.0), V2 tau = 0.1147 (0.707)."""
    v3, v2 = get_preset("deepseek-v3"), get_preset("deepseek-v2")
    assert softmax_scale(192, v3.rope) == pytest.approx(0.1352, abs=5e-5)
    assert softmax_scale(192, v2.rope) == pytest.approx(0.1147, abs=5e-5)
    assert softmax_scale(192, RopeConfig()) == pytest.approx(192**-0.5)


@pytest.mark.parametrize(
    "yarn",
    [
        YarnConfig(factor=40, original_max_position_embeddings=4096, mscale=1.0, mscale_all_dim=1.0),
        YarnConfig(factor=4, original_max_position_embeddings=32, beta_fast=8, beta_slow=2),
        YarnConfig(factor=16, original_max_position_embeddings=4096, mscale=0.707, mscale_all_dim=0.707),
    ],
)
def test_yarn_frequencies_match_transformers(yarn: YarnConfig) -> None:
    hf_rope = pytest.importorskip("transformers.modeling_rope_utils")
    from transformers import DeepseekV3Config

    params = {
        "rope_type": "yarn", "rope_theta": 10000.0, "factor": yarn.factor,
        "original_max_position_embeddings": yarn.original_max_position_embeddings,
        "beta_fast": yarn.beta_fast, "beta_slow": yarn.beta_slow,
        "mscale": yarn.mscale, "mscale_all_dim": yarn.mscale_all_dim,
    }
    hf_cfg = DeepseekV3Config(qk_rope_head_dim=64, rope_parameters=params, max_position_embeddings=163840)
    inv_freq, attention_factor = hf_rope.ROPE_INIT_FUNCTIONS["yarn"](hf_cfg)
    ours = inv_frequencies(64, RopeConfig(theta=10000.0, interleaved=True, yarn=yarn))
    assert_close(ours, inv_freq.float())
    emb = RotaryEmbedding(64, RopeConfig(interleaved=True, yarn=yarn), 8)
    cos, _ = emb(torch.zeros(1, 1, dtype=torch.long))
    assert cos[0, 0, 0].item() == pytest.approx(attention_factor)


def test_yarn_keeps_high_frequencies_and_scales_low_ones() -> None:
    yarn = YarnConfig(factor=40, original_max_position_embeddings=4096)
    base, scaled = inv_frequencies(64, RopeConfig()), inv_frequencies(64, RopeConfig(yarn=yarn))
    assert scaled[0] == base[0]
    assert scaled[-1].item() == pytest.approx(base[-1].item() / 40, rel=1e-6)


@pytest.mark.parametrize("interleaved", [True, False])
def test_rope_is_relative(interleaved: bool) -> None:
    """q_m . k_n depends only on m - n, for both pair layouts."""
    emb = RotaryEmbedding(16, RopeConfig(interleaved=interleaved), 64)
    q, k = torch.randn(1, 1, 1, 16), torch.randn(1, 1, 1, 16)

    def dot(m: int, n: int) -> float:
        qm = apply_rope(q, *emb(torch.tensor([[m]])), interleaved)
        kn = apply_rope(k, *emb(torch.tensor([[n]])), interleaved)
        return float((qm * kn).sum())

    assert dot(9, 4) == pytest.approx(dot(30, 25), abs=1e-4)
    assert dot(9, 4) != pytest.approx(dot(9, 5), abs=1e-4)


def test_interleaved_rotates_adjacent_pairs() -> None:
    emb = RotaryEmbedding(4, RopeConfig(interleaved=True), 4)
    x = torch.tensor([1.0, 0.0, 1.0, 0.0]).view(1, 1, 1, 4)
    out = apply_rope(x, *emb(torch.tensor([[1]])), True).flatten()
    theta0, theta1 = 1.0, 1.0 / 100.0  # 10000^(-2i/4)
    expected = torch.tensor([math.cos(theta0), math.sin(theta0), math.cos(theta1), math.sin(theta1)])
    assert_close(out, expected)
