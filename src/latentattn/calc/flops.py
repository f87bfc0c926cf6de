"""Training FLOPs per token from a config, the usual way (Kaplan et al. 2020, arXiv 2001.08361
section 2.1; Chinchilla's appendix F): a forward pass costs 2 FLOPs per weight a token meets in a
matmul, plus the attention scores and the weighted sum of values over the keys it sees; training
(forward + backward) is 3x the forward.

Per layer and token, with T the training window and a causal mask (a query sees (T + 1) / 2 keys
on average):

* MHA/GQA/MQA: 2 * H * (d_h + d_h) per key (scores q.k over d_h, then values);
* MLA (trained in its naive form): 2 * H * (d_qk + d_v) per key;
* DSA (sparse stage): the same, over min(k, keys) keys, plus the lightning indexer's
  2 * H_I * d_I per key over every key it scores.
* DeepSeek-V4: 2 * H * (D + D) per key (one shared-KV vector of D values is key and value), over
  the window min(t + 1, W) for every layer type, plus for CSA the min(k, v_t) selected compressed
  entries and the indexer's 2 * H_I * d_I over all v_t = (t + 1) // m visible ones, for HCA all
  (t + 1) // m' visible entries (query t, 0-based). The compressors' pooling and the mHC mixing
  are element-wise and left out; their projections are weights, counted with the rest.

Embedding lookups are not matmuls and are left out; the LM head is in. MoE counts the experts a
token visits (``count_parameters``' "active"). Element-wise work (norms, RoPE, softmax) is left
out, as those references do.
"""

from __future__ import annotations

from latentattn.calc.params import count_parameters
from latentattn.config import CSA, HCA, GQAConfig, MLAConfig, ModelConfig, V4AttentionConfig


def mean_visible_keys(seq_len: int) -> float:
    """Keys a query sees on average in a causal window of ``seq_len`` tokens."""
    return (seq_len + 1) / 2


def _mean_selected(seq_len: int, k: int) -> float:
    """Keys a DSA query attends to on average: min(k, its visible keys)."""
    return sum(min(k, t + 1) for t in range(seq_len)) / seq_len


def v4_attention_flops(a: V4AttentionConfig, layer_type: str, seq_len: int) -> float:
    """One V4 layer's forward score and value FLOPs per token, averaged over a causal window."""
    per_key = 2 * a.n_heads * 2 * a.head_dim
    total = 0
    for t in range(seq_len):
        keys = min(t + 1, a.sliding_window)
        if layer_type == CSA:
            visible = (t + 1) // a.csa_rate
            keys += min(a.index_topk, visible)
            total += 2 * a.index_n_heads * a.index_head_dim * visible
        elif layer_type == HCA:
            keys += (t + 1) // a.hca_rate
        total += per_key * keys
    return total / seq_len


def attention_flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """Forward FLOPs of the scores and value sums, all layers, per token (see the docstring)."""
    a, keys = cfg.attention, mean_visible_keys(seq_len)
    if isinstance(a, V4AttentionConfig):
        return sum(v4_attention_flops(a, t, seq_len) for t in a.layer_types)
    if isinstance(a, GQAConfig):
        per_layer = 2 * a.n_heads * 2 * a.head_dim * keys
    else:
        assert isinstance(a, MLAConfig)
        per_key = 2 * a.n_heads * (a.qk_head_dim + a.v_head_dim)
        if a.indexer is None:
            per_layer = per_key * keys
        else:
            i = a.indexer
            per_layer = (per_key * _mean_selected(seq_len, i.index_topk)
                         + 2 * i.index_n_heads * i.index_head_dim * keys)
    return per_layer * cfg.n_layers


def training_flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """3 x (2 x the matmul weights a token meets + the attention term): forward and backward."""
    p = count_parameters(cfg)
    # Tied embeddings: the LM head matmul still runs, over the embedding's weights.
    head = p["embedding"] if cfg.tie_word_embeddings else 0
    matmul_weights = p["active"] - p["embedding"] - p["norms"] + head
    return 3 * (2 * matmul_weights + attention_flops_per_token(cfg, seq_len))


__all__ = ["attention_flops_per_token", "mean_visible_keys", "training_flops_per_token", "v4_attention_flops"]
