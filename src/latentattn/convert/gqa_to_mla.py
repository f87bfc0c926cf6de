"""GQA / MHA / MQA attention to MLA, layer by layer (after MHA2MLA, arXiv 2502.14837, and
TransMLA, arXiv 2502.07864; next-facts section 2).

For each source layer (H query heads, G KV heads of width d, RoPE half-split over d):

1. **Which RoPE stays.** ``r`` frequency pairs of each head keep their rotation: the same pairs
   for every KV head and layer (latentattn's RopeConfig is one per model), chosen by MHA2MLA's
   2-norm criterion on calibration text (the pairs whose ||q|| * ||k|| contributes most, summed
   over heads and layers) or, without calibration, the r highest frequencies (its runner-up).
   The shared rope key holds all G heads' kept parts, G * 2r dims, as G blocks each rotated with
   the source's own frequencies (RopeConfig.blocks / pairs); query head h's rope part is zero
   outside its group's block, so ``q_rope . k_rope`` is exactly its own KV head's rotary term.
2. **The latent.** The rest of every key head (d - 2r dims) and every value head (d) are one
   matrix M of G (2d - 2r) rows over the hidden size, factored into a rank-R latent: M ~= U_R (U_R^T M).
   ``svd``: U_R from M's singular vectors (the weights alone); ``pca``: from those of M X, X the
   attention inputs of calibration text (TransMLA's PCA; CARE, arXiv 2603.17946, finds the
   activation-aware factorisation better). The key rows are scaled first so that they and the
   value rows carry the same Frobenius norm, so that neither dominates the shared latent.
   kv_a_proj_with_mqa = [U_R^T M ; the rope rows of W_k], kv_b_proj = U_R (key rows unscaled).
3. **The softmax scale.** MLA divides logits by sqrt(d_nope + d_rope), the source by sqrt(d): the
   ratio is folded into the query weights (and YaRN's cos/sin factor, which MLA applies to the rope
   part only, into the nope part).

At R = G (2d - 2r) and every pair kept (``full``) nothing is dropped: the converted model's
logits equal the source's up to rounding. Biases (Qwen2's q/k/v, Llama's o) carry over. The
converted MLA has no latent RMSNorm (MLAConfig.latent_norm False): no linear map reproduces it.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Literal

import torch

from latentattn.attention.gqa import GroupedQueryAttention
from latentattn.attention.mla import MultiHeadLatentAttention
from latentattn.config import GQAConfig, MLAConfig, ModelConfig
from latentattn.errors import ConfigError
from latentattn.model.transformer import Transformer
from latentattn.rope import yarn_attention_factor

Method = Literal["svd", "pca"]
METHODS = ("svd", "pca")


@dataclass(frozen=True)
class Plan:
    """What a conversion keeps: ``pairs`` (frequency pair indices of a source head, r of them),
    ``kv_lora_rank`` R, and the factorisation ``method``."""

    pairs: tuple[int, ...]
    kv_lora_rank: int
    method: Method = "svd"


def full_rank(cfg: ModelConfig, rope_dim: int) -> int:
    """The latent rank that drops nothing at ``rope_dim``: G (2d - rope_dim / G) rows of M."""
    a = _gqa(cfg)
    return a.n_kv_heads * (2 * a.head_dim - rope_dim // a.n_kv_heads)


def full_rope_dim(cfg: ModelConfig) -> int:
    """Every rotary dim of every KV head: G * d (can exceed one head's width)."""
    a = _gqa(cfg)
    return a.n_kv_heads * a.head_dim


def _gqa(cfg: ModelConfig) -> GQAConfig:
    a = cfg.attention
    if not isinstance(a, GQAConfig):
        raise ConfigError(f"convert takes a GQA / MHA / MQA model; {cfg.name} is already MLA")
    return a


def check_sizes(cfg: ModelConfig, rope_dim: int, kv_lora_rank: int) -> None:
    a = _gqa(cfg)
    g, d = a.n_kv_heads, a.head_dim
    if rope_dim < 2 * g or rope_dim > g * d or rope_dim % (2 * g):
        raise ConfigError(f"--rope-dim must be a multiple of 2 x {g} KV heads (a pair per head) "
                          f"between {2 * g} and {g} x {d} = {g * d} (full), got {rope_dim}")
    top = full_rank(cfg, rope_dim)
    if not 1 <= kv_lora_rank <= top:
        raise ConfigError(f"--kv-lora-rank must lie in 1..{top} (full rank at --rope-dim {rope_dim}), "
                          f"got {kv_lora_rank}")


def mla_config(cfg: ModelConfig, plan: Plan) -> ModelConfig:
    """The converted model's config (the source's everything but attention and RoPE blocks)."""
    a = _gqa(cfg)
    r = len(plan.pairs)
    attention = MLAConfig(
        n_heads=a.n_heads, kv_lora_rank=plan.kv_lora_rank, qk_nope_head_dim=a.head_dim - 2 * r,
        qk_rope_head_dim=a.n_kv_heads * 2 * r, v_head_dim=a.head_dim, q_lora_rank=None,
        impl="auto", latent_norm=False, qkv_bias=a.qkv_bias, o_bias=a.o_bias)
    rope = dataclasses.replace(cfg.rope, blocks=a.n_kv_heads, source_dim=a.head_dim,
                               pairs=tuple(plan.pairs))
    return cfg.replace(attention=attention, rope=rope, name=f"{cfg.name}-mla")


def _dims(d: int, pairs: tuple[int, ...]) -> tuple[list[int], list[int]]:
    """(rope dims, nope dims) of a half-split d-dim head: kept pair p is dims (p, p + d/2),
    laid out half-split within the block (all first halves, then all second halves)."""
    half = d // 2
    kept = set(pairs)
    rest = [p for p in range(half) if p not in kept]
    return [*pairs, *(p + half for p in pairs)], [*rest, *(p + half for p in rest)]


@torch.no_grad()
def convert_layer(src: GroupedQueryAttention, dst: MultiHeadLatentAttention, cfg: ModelConfig,
                  plan: Plan, inputs: torch.Tensor | None = None) -> None:
    """Fill ``dst`` (built from :func:`mla_config`) from ``src``. ``inputs`` (N, dim): the
    layer's attention inputs on calibration text, needed by ``method="pca"``."""
    a = src.cfg
    h, g, d = a.n_heads, a.n_kv_heads, a.head_dim
    per_group = h // g
    rope_idx, nope_idx = _dims(d, plan.pairs)
    d_n, r2 = len(nope_idx), len(rope_idx)
    dim = cfg.dim
    f64 = torch.float64
    wq = src.q_proj.weight.to(f64).view(h, d, dim)
    wk = src.k_proj.weight.to(f64).view(g, d, dim)
    wv = src.v_proj.weight.to(f64).view(g, d, dim)
    bq = src.q_proj.bias.to(f64).view(h, d) if src.q_proj.bias is not None else None
    bk = src.k_proj.bias.to(f64).view(g, d) if src.k_proj.bias is not None else None
    bv = src.v_proj.bias.to(f64).view(g, d) if src.v_proj.bias is not None else None

    # Queries: [nope | rope blocks], rope zero outside the head's own group's block.
    qk_dim = d_n + g * r2
    scale = math.sqrt(qk_dim / d)
    factor = yarn_attention_factor(cfg.rope.yarn) if cfg.rope.yarn is not None else 1.0
    nope_scale = scale * factor * factor  # the source's cos/sin factor, on both q and k
    q_new = torch.zeros(h, qk_dim, dim, dtype=f64)
    b_new = torch.zeros(h, qk_dim, dtype=f64)
    for head in range(h):
        grp = head // per_group
        block = slice(d_n + grp * r2, d_n + (grp + 1) * r2)
        q_new[head, :d_n] = wq[head, nope_idx] * nope_scale
        q_new[head, block] = wq[head, rope_idx] * scale
        if bq is not None:
            b_new[head, :d_n] = bq[head, nope_idx] * nope_scale
            b_new[head, block] = bq[head, rope_idx] * scale
    dst.q_proj.weight.copy_(q_new.reshape(h * qk_dim, dim))
    if dst.q_proj.bias is not None:
        dst.q_proj.bias.copy_(b_new.reshape(-1))

    # The latent: M = [alpha W_k,nope (all groups); W_v (all groups)], balanced, factored.
    k_nope = wk[:, nope_idx].reshape(g * d_n, dim)
    v_all = wv.reshape(g * d, dim)
    alpha = (v_all.norm() / k_nope.norm()).item() if d_n and k_nope.norm() > 0 else 1.0
    m = torch.cat((alpha * k_nope, v_all))
    zero_b = torch.zeros(g, d, dtype=f64)
    b_m = torch.cat(((bk if bk is not None else zero_b)[:, nope_idx].reshape(-1) * alpha,
                     (bv if bv is not None else zero_b).reshape(-1)))
    u = _basis(m, b_m, plan, inputs)  # (rows, R), orthonormal columns
    w_dkv, c_bias = u.T @ m, u.T @ b_m
    k_rope = wk[:, rope_idx].reshape(g * r2, dim)
    dst.kv_a_proj_with_mqa.weight.copy_(torch.cat((w_dkv, k_rope)))
    if dst.kv_a_proj_with_mqa.bias is not None:
        kb = bk if bk is not None else zero_b
        dst.kv_a_proj_with_mqa.bias.copy_(torch.cat((c_bias, kb[:, rope_idx].reshape(-1))))
    # kv_b_proj: per query head [k_nope rows of its group (alpha undone) ; v rows of its group].
    u_k = u[: g * d_n].reshape(g, d_n, u.shape[1]) / alpha
    u_v = u[g * d_n :].reshape(g, d, u.shape[1])
    up = torch.cat([torch.cat((u_k[head // per_group], u_v[head // per_group])) for head in range(h)])
    dst.kv_b_proj.weight.copy_(up)
    dst.o_proj.weight.copy_(src.o_proj.weight)
    if src.o_proj.bias is not None and dst.o_proj.bias is not None:
        dst.o_proj.bias.copy_(src.o_proj.bias)


def _basis(m: torch.Tensor, b_m: torch.Tensor, plan: Plan, inputs: torch.Tensor | None) -> torch.Tensor:
    """An orthonormal (rows, R) basis U_R of M's output space: its top singular vectors
    (``svd``), or those of the outputs M x + b on calibration inputs (``pca``)."""
    rank = plan.kv_lora_rank
    if plan.method == "svd" or rank >= m.shape[0]:
        # Full rank: any complete orthonormal basis reproduces M x + b exactly.
        u, _, _ = torch.linalg.svd(m, full_matrices=True)
        return u[:, :rank]
    if inputs is None:
        raise ConfigError("method pca needs calibration activations (--calib FILE)")
    y = inputs.to(m.dtype) @ m.T + b_m  # (N, rows)
    # The top-R principal directions of the outputs (uncentred: the bias is part of them).
    _, vecs = torch.linalg.eigh(y.T @ y)
    return vecs[:, -rank:].flip(-1)


def convert(model: Transformer, plan: Plan, inputs: list[torch.Tensor] | None = None) -> Transformer:
    """The GQA ``model`` with every attention layer converted (see the module docstring); the
    other weights are copied. ``inputs``: per layer, calibration attention inputs (N, dim)."""
    cfg = mla_config(model.config, plan)
    out = Transformer.empty(cfg, model.dtype, model.device)
    own = model.state_dict()
    target = out.state_dict()
    with torch.no_grad():
        for k, v in target.items():
            if ".self_attn." not in k and k in own:
                v.copy_(own[k])
    for i, (src_blk, dst_blk) in enumerate(zip(model.blocks, out.blocks, strict=True)):
        assert isinstance(src_blk.self_attn, GroupedQueryAttention)
        assert isinstance(dst_blk.self_attn, MultiHeadLatentAttention)
        convert_layer(src_blk.self_attn, dst_blk.self_attn, cfg, plan,
                      None if inputs is None else inputs[i])
    return out.eval()


__all__ = ["METHODS", "Method", "Plan", "check_sizes", "convert", "convert_layer", "full_rank",
           "full_rope_dim", "mla_config"]
