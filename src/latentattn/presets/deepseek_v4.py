"""DeepSeek-V4 presets: V4-Flash and V4-Pro at their published sizes, and ``tiny-v4`` for tests.

Sources, by value:

* V4-Flash: DeepSeek's ``config.json`` (``deepseek-ai/DeepSeek-V4-Flash`` on the Hugging Face hub)
  and the ``inference/config.json`` DeepSeek ships beside its V4 inference code (copied verbatim in
  github.com/Mockingjay1316/deepseek-v4-flash-spark, ``inference/config.json`` at 1795ef7):
  vocab 129,280, dim 4,096, 43 layers, 64 heads x head_dim 512 (rope 64), q_lora_rank 1,024,
  o_groups 8 x o_lora_rank 1,024, window 128, indexer 64 heads x 128 top-k 512, 256 routed
  experts (top-6) + 1 shared of 2,048, route scale 1.5, sqrtsoftplus, 3 hash layers, SwiGLU limit
  10, hc_mult 4, 20 Sinkhorn iterations, compress_rope_theta 160,000, YaRN factor 16 from 65,536
  (beta_fast 32, beta_slow 1), compress_ratios [0, 0, 4, 128, 4, ..., 128, 4] (+ a trailing 0
  for the MTP layer, which latentattn does not build). transformers 5.25's ``DeepseekV4Config``
  defaults (``models/deepseek_v4/configuration_deepseek_v4.py``) hold the same dimensions,
  max_position_embeddings 1,048,576 and rms_norm_eps 1e-6, but its default ``layer_types`` (two HCA
  layers, then CSA/HCA alternating) is V4-Pro's schedule: Flash's config.json ships
  ``compress_ratios`` starting with two sliding-only layers (the antirez/ds4 model-card synopsis
  of DeepSeek-V4-Flash says the same).
* V4-Pro: DeepSeek's ``config.json`` (``deepseek-ai/DeepSeek-V4-Pro``, linked from
  sgl-project/sglang-jax#1678), read through copies in public code (a verbatim dict of it, and a
  training config with ``compress_ratios = (128,) + (128, 4) * 30``) and the summary at
  glennklockwood.com/garden/DeepSeek-V4-Pro: dim 7,168, 61 layers, 128 heads x 512 (rope 64),
  q_lora_rank 1,536, o_groups 16 x o_lora_rank 1,024, window 128, indexer 64 x 128 top-k 1,024,
  384 routed experts (top-6) + 1 shared of 3,072, routed_scaling_factor 2.5, 3 hash layers,
  vocab 129,280, the same rope, YaRN and mHC values as Flash, max_position_embeddings 1,048,576,
  compress_ratios [128, 128, 4, 128, ..., 128, 4] (+ the MTP layer's 0).

Both: every layer is MoE (no dense prefix), routing noaux_tc with one group, top-k weights
renormalised. YaRN's attention factor is forced to 1.0 for V4 (transformers sets
``attention_factor`` 1.0; DeepSeek's reference does not rescale cos/sin), so ``YarnConfig.mscale``
is not used by V4's attention. ``intermediate_size`` is the shared expert's width, as transformers
maps it (``attribute_map``: intermediate_size -> moe_intermediate_size); V4 has no dense FFN.
"""

from __future__ import annotations

from latentattn.config import (
    CSA,
    HCA,
    SLIDING,
    HyperConfig,
    ModelConfig,
    MoEConfig,
    RopeConfig,
    V4AttentionConfig,
    YarnConfig,
)

# compress_ratios of the published configs, without the trailing MTP entry.
FLASH_LAYER_TYPES = (SLIDING, SLIDING) + (CSA, HCA) * 20 + (CSA,)
PRO_LAYER_TYPES = (HCA, HCA) + (CSA, HCA) * 29 + (CSA,)


def _compress_rope() -> RopeConfig:
    # rope_scaling of both configs: {"type": "yarn", "factor": 16, "original_max_position_embeddings":
    # 65536, "beta_fast": 32, "beta_slow": 1}; applied to CSA/HCA layers only.
    return RopeConfig(theta=160000.0, interleaved=True,
                      yarn=YarnConfig(factor=16, original_max_position_embeddings=65536,
                                      beta_fast=32, beta_slow=1))


def _v4(name: str, dim: int, layer_types: tuple[str, ...], n_heads: int, q_lora_rank: int,
        o_groups: int, index_topk: int, experts: int, expert_size: int, route_scale: float) -> ModelConfig:
    return ModelConfig(
        name=name,
        vocab_size=129280,
        dim=dim,
        n_layers=len(layer_types),
        intermediate_size=expert_size,
        attention=V4AttentionConfig(
            n_heads=n_heads, head_dim=512, qk_rope_head_dim=64, q_lora_rank=q_lora_rank,
            o_groups=o_groups, o_lora_rank=1024, layer_types=layer_types, sliding_window=128,
            csa_rate=4, hca_rate=128, index_n_heads=64, index_head_dim=128, index_topk=index_topk,
            compress_rope=_compress_rope(),
        ),
        rope=RopeConfig(theta=10000.0, interleaved=True),
        moe=MoEConfig(
            n_routed_experts=experts, n_shared_experts=1, num_experts_per_tok=6,
            moe_intermediate_size=expert_size, first_k_dense_replace=0, scoring_func="sqrtsoftplus",
            topk_method="noaux_tc", n_group=1, topk_group=1, routed_scaling_factor=route_scale,
            norm_topk_prob=True, n_hash_layers=3, swiglu_limit=10.0,
        ),
        norm_eps=1e-6,
        max_seq_len=1048576,
        hyper=HyperConfig(hc_mult=4, sinkhorn_iters=20, eps=1e-6),
    )


def deepseek_v4_flash() -> ModelConfig:
    """DeepSeek-V4-Flash (284B total, 13B active per the model card): see the module docstring."""
    return _v4("deepseek-v4-flash", dim=4096, layer_types=FLASH_LAYER_TYPES, n_heads=64,
               q_lora_rank=1024, o_groups=8, index_topk=512, experts=256, expert_size=2048,
               route_scale=1.5)


def deepseek_v4_pro() -> ModelConfig:
    """DeepSeek-V4-Pro (1.6T total, 49B active per the model card): see the module docstring."""
    return _v4("deepseek-v4-pro", dim=7168, layer_types=PRO_LAYER_TYPES, n_heads=128,
               q_lora_rank=1536, o_groups=16, index_topk=1024, experts=384, expert_size=3072,
               route_scale=2.5)


def tiny_v4() -> ModelConfig:
    """A small random V4 for tests and demos: all three layer types (sliding, CSA, HCA, CSA, HCA),
    two mHC streams, two hash-routed MoE layers then three top-k ones, YaRN on the compress rope.
    16 indexer heads: with 2-4 heads the ReLU scores tie often enough that top-k's tie-breaking,
    not the maths, decides what a test sees. HCA compresses every 8 tokens so that a 32-token
    test already holds several entries; the window (8) is shorter than such a test."""
    return ModelConfig(
        name="tiny-v4",
        vocab_size=256,
        dim=64,
        n_layers=5,
        intermediate_size=32,
        attention=V4AttentionConfig(
            n_heads=4, head_dim=32, qk_rope_head_dim=8, q_lora_rank=32, o_groups=2, o_lora_rank=16,
            layer_types=(SLIDING, CSA, HCA, CSA, HCA), sliding_window=8, csa_rate=4, hca_rate=8,
            index_n_heads=16, index_head_dim=16, index_topk=4,
            compress_rope=RopeConfig(theta=160000.0, interleaved=True,
                                     yarn=YarnConfig(factor=8, original_max_position_embeddings=64)),
        ),
        rope=RopeConfig(theta=10000.0, interleaved=True),
        moe=MoEConfig(
            n_routed_experts=8, n_shared_experts=1, num_experts_per_tok=2, moe_intermediate_size=32,
            first_k_dense_replace=0, scoring_func="sqrtsoftplus", topk_method="noaux_tc",
            routed_scaling_factor=1.5, norm_topk_prob=True, n_hash_layers=2, swiglu_limit=10.0,
        ),
        max_seq_len=512,
        hyper=HyperConfig(hc_mult=2, sinkhorn_iters=20, eps=1e-6),
    )


__all__ = ["FLASH_LAYER_TYPES", "PRO_LAYER_TYPES", "deepseek_v4_flash", "deepseek_v4_pro", "tiny_v4"]
