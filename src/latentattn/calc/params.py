"""Parameter counts from a config alone, without allocating the model (deepseek-v3 is 671B).

Counts exactly what ``Transformer(cfg).parameters()`` holds (buffers such as RoPE tables and the
router's correction bias are not parameters); ``tests/test_cli.py`` checks the two agree.
No multi-token-prediction module is counted: latentattn does not build one.
"""

from __future__ import annotations

from latentattn.config import MLAConfig, ModelConfig


def attention_parameters(cfg: ModelConfig) -> int:
    """One layer's attention projections and norms."""
    a, d = cfg.attention, cfg.dim
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
    moe_router, norms, routed_inactive_per_token.
    """
    d = cfg.dim
    embedding = cfg.vocab_size * d
    lm_head = 0 if cfg.tie_word_embeddings else cfg.vocab_size * d
    attention = attention_parameters(cfg) * cfg.n_layers
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
    total = embedding + lm_head + attention + norms + dense + routed + shared + router
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
        "routed_inactive_per_token": inactive,
    }
