"""Parameter counts from a config alone, without allocating the model (deepseek-v3 is 671B).

Counts exactly what ``Transformer(cfg).parameters()`` holds (buffers such as RoPE tables and the
router's correction bias are not parameters); ``tests/test_cli.py`` checks the two agree.
No multi-token-prediction module is counted: latentattn does not build one.

DeepSeek-V4 (module names as transformers' ``modeling_deepseek_v4.py``): every layer has q_a_proj,
q_a_norm, q_b_proj, kv_proj, kv_norm, the grouped o_a_proj (o_groups blocks of
n_heads * head_dim / o_groups -> o_lora_rank), o_b_proj and one sink per head; CSA layers add a
compressor (kv_proj and gate_proj to 2 * head_dim, position_bias (csa_rate, 2 * head_dim),
kv_norm) and its indexer (the same at index_head_dim, plus q_b_proj from the query latent and
weights_proj); HCA layers a compressor at head_dim (position_bias (hca_rate, head_dim)). mHC adds
attn_hc and ffn_hc per layer (fn ((2 + N) N, N dim), base, 3 scales) and hc_head (N, N dim) + N + 1.
Hash layers keep a router weight (their tid2eid table is a buffer, as the correction bias is).
"""

from __future__ import annotations

from latentattn.config import CSA, HCA, MLAConfig, ModelConfig, V4AttentionConfig


def v4_attention_parameters(a: V4AttentionConfig, d: int, layer_type: str) -> int:
    """One V4 layer's attention: projections, norms, sinks, and its compressor and indexer."""
    h, hd = a.n_heads, a.head_dim
    core = (d * a.q_lora_rank + a.q_lora_rank + a.q_lora_rank * h * hd  # q_a, q_a_norm, q_b
            + d * hd + hd  # kv_proj, kv_norm
            + h * hd * a.o_lora_rank + a.o_groups * a.o_lora_rank * d  # o_a (grouped), o_b
            + h)  # sinks

    def compressor(width: int, rate: int, series: int) -> int:
        # kv_proj and gate_proj (series * width each), position_bias (rate, series * width), kv_norm
        return 2 * d * series * width + rate * series * width + width

    if layer_type == CSA:
        hi, di = a.index_n_heads, a.index_head_dim
        indexer = compressor(di, a.csa_rate, 2) + a.q_lora_rank * hi * di + d * hi
        return core + compressor(hd, a.csa_rate, 2) + indexer
    if layer_type == HCA:
        return core + compressor(hd, a.hca_rate, 1)
    return core


def hyper_parameters(cfg: ModelConfig) -> int:
    """mHC: attn_hc and ffn_hc in every layer, and the final hc_head (0 without mHC)."""
    if cfg.hyper is None:
        return 0
    n, d = cfg.hyper.hc_mult, cfg.dim
    mix = (2 + n) * n
    return cfg.n_layers * 2 * (mix * n * d + mix + 3) + n * n * d + n + 1


def attention_parameters(cfg: ModelConfig) -> int:
    """One layer's attention projections and norms (V4: see ``v4_attention_parameters``)."""
    a, d = cfg.attention, cfg.dim
    if isinstance(a, V4AttentionConfig):
        raise TypeError("V4 layers differ by layer type: use v4_attention_parameters")
    if isinstance(a, MLAConfig):
        h = a.n_heads
        if a.q_lora_rank is None:
            q = d * h * a.qk_head_dim + h * a.qk_head_dim * a.qkv_bias
        else:
            q = d * a.q_lora_rank + a.q_lora_rank + a.q_lora_rank * h * a.qk_head_dim
        kv_a = (d * (a.kv_lora_rank + a.qk_rope_head_dim)
                + a.kv_lora_rank * a.latent_norm  # kv_a_layernorm
                + (a.kv_lora_rank + a.qk_rope_head_dim) * a.qkv_bias)
        kv_b = a.kv_lora_rank * h * (a.qk_nope_head_dim + a.v_head_dim)
        indexer = 0
        if a.indexer is not None and a.q_lora_rank is not None:
            hi, di = a.indexer.index_n_heads, a.indexer.index_head_dim
            # wq_b from the query latent, wk, LayerNorm (weight + bias), weights_proj
            indexer = a.q_lora_rank * hi * di + d * di + 2 * di + d * hi
        return q + kv_a + kv_b + h * a.v_head_dim * d + d * a.o_bias + indexer
    biases = a.head_dim * (a.n_heads + 2 * a.n_kv_heads) * a.qkv_bias + d * a.o_bias
    return d * a.head_dim * (2 * a.n_heads + 2 * a.n_kv_heads) + biases


def mlp_parameters(dim: int, hidden: int) -> int:
    """SwiGLU: gate, up and down projections."""
    return 3 * dim * hidden


def count_parameters(cfg: ModelConfig) -> dict[str, int]:
    """Total parameters and those one token uses ("active": only its routed experts count).

    Keys: total, active, embedding, lm_head, attention, dense_mlp, moe_routed, moe_shared,
    moe_router, norms, hyper (mHC), routed_inactive_per_token.
    """
    d = cfg.dim
    embedding = cfg.vocab_size * d
    lm_head = 0 if cfg.tie_word_embeddings else cfg.vocab_size * d
    a = cfg.attention
    if isinstance(a, V4AttentionConfig):
        attention = sum(v4_attention_parameters(a, d, t) for t in a.layer_types)
    else:
        attention = attention_parameters(cfg) * cfg.n_layers
    hyper = hyper_parameters(cfg)
    norms = d * (2 * cfg.n_layers + 1)
    dense = routed = shared = router = inactive = 0
    for layer in range(cfg.n_layers):
        if cfg.moe is not None and cfg.is_moe_layer(layer):
            m = cfg.moe
            expert = mlp_parameters(d, m.moe_intermediate_size)
            routed += m.n_routed_experts * expert
            shared += mlp_parameters(d, m.moe_intermediate_size * m.n_shared_experts)
            router += m.n_routed_experts * d
            inactive += (m.n_routed_experts - m.num_experts_per_tok) * expert
        else:
            dense += mlp_parameters(d, cfg.intermediate_size)
    total = embedding + lm_head + attention + norms + dense + routed + shared + router + hyper
    return {
        "total": total,
        "active": total - inactive,
        "embedding": embedding,
        "lm_head": lm_head,
        "attention": attention,
        "dense_mlp": dense,
        "moe_routed": routed,
        "moe_shared": shared,
        "moe_router": router,
        "norms": norms,
        "hyper": hyper,
        "routed_inactive_per_token": inactive,
    }
