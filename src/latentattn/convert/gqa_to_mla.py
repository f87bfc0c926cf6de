"""GQA / MHA / MQA attention to MLA, layer by layer (after MHA2MLA, arXiv 2502.14837, and
TransMLA, arXiv 2502.07864; their code: JT-Ushio/MHA2MLA and fxmeng/TransMLA on GitHub).

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
   activation-aware factorisation better); ``whitened``: from those of M S, S S^T = X^T X / N + lambda I
   the damped calibration covariance (SVD-LLM V2, Wang et al., NAACL 2025; CARE-U). Since
   (M S)(M S)^T = M X^T X M^T / N + lambda M M^T, undamped whitening spans PCA's subspace exactly;
   the damping lambda (WHITEN_DAMP of the covariance's mean diagonal, GPTQ's habit, arXiv
   2210.17323) blends in the weights' own spectrum and keeps S invertible when X^T X is singular.
   The key rows are scaled first so that they and the value rows carry the same Frobenius
   norm, so that neither dominates the shared latent.
   kv_a_proj_with_mqa = [U_R^T M ; the rope rows of W_k], kv_b_proj = U_R (key rows unscaled).
3. **The softmax scale.** MLA divides logits by sqrt(d_nope + d_rope), the source by sqrt(d): the
   ratio is folded into the query weights (and YaRN's cos/sin factor, which MLA applies to the rope
   part only, into the nope part).

At R = G (2d - 2r) and every pair kept (``full``) nothing is dropped: the converted model's
logits equal the source's up to rounding. Biases (Qwen2's q/k/v, Llama's o) carry over. The
converted MLA has no latent RMSNorm (MLAConfig.latent_norm False): no linear map reproduces it.

For DeepSeek's format (``Plan.rope_mode="rorope"``, ``Plan.latent_norm``), step 1 is TransMLA's
RoRoPE instead (:func:`_rorope_split`: one plain d-dim rope key mixed from the KV heads, their
residual in a d-dim nope part) and the latent gets an RMSNorm whose gains are fitted on the
calibration latents (:func:`latent_norm_gains`); both are approximations for G > 1 that healing
(``latentattn train --teacher``) recovers from.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch

from latentattn.attention.gqa import GroupedQueryAttention
from latentattn.attention.mla import MultiHeadLatentAttention
from latentattn.calc.converted import (
    METHODS,
    ROPE_MODES,
    Method,
    RopeMode,
    check_sizes,
    full_rank,
    full_rope_dim,
)
from latentattn.calc.converted import source_attention as _gqa
from latentattn.config import MLAConfig, ModelConfig
from latentattn.errors import ConfigError
from latentattn.model.transformer import Transformer
from latentattn.rope import yarn_attention_factor

WHITEN_DAMP = 0.01  # lambda of ``whitened``, relative to the calibration covariance's mean diagonal


@dataclass(frozen=True)
class Plan:
    """What a conversion keeps: ``pairs`` (frequency pair indices of a source head, r of them),
    ``kv_lora_rank`` R, and the factorisation ``method``. ``rope_mode``: ``blocks`` (the module
    docstring) or ``rorope`` (TransMLA's, :func:`_rorope_split`: one plain head-wide rope key,
    every pair; what DeepSeek's format can hold). ``latent_norm``: give the MLA DeepSeek's
    RMSNorm on the latent, its gains fitted on calibration (:func:`latent_norm_gains`).
    ``method`` defaults to ``svd`` here only because it needs no calibration inputs; ``pca`` is
    far better below full rank and is :func:`latentattn.convert_model`'s default."""

    pairs: tuple[int, ...]
    kv_lora_rank: int
    method: Method = "svd"
    rope_mode: RopeMode = "blocks"
    latent_norm: bool = False
    damp: float = WHITEN_DAMP


def mla_config(cfg: ModelConfig, plan: Plan) -> ModelConfig:
    """The converted model's config (the source's everything but attention and RoPE blocks)."""
    a = _gqa(cfg)
    r = len(plan.pairs)
    d = a.head_dim
    rorope = plan.rope_mode == "rorope"
    attention = MLAConfig(
        n_heads=a.n_heads, kv_lora_rank=plan.kv_lora_rank,
        qk_nope_head_dim=d if rorope else d - 2 * r,
        qk_rope_head_dim=d if rorope else a.n_kv_heads * 2 * r, v_head_dim=d, q_lora_rank=None,
        impl="auto", latent_norm=plan.latent_norm, qkv_bias=a.qkv_bias, o_bias=a.o_bias)
    rope = cfg.rope if rorope else dataclasses.replace(
        cfg.rope, blocks=a.n_kv_heads, source_dim=d, pairs=tuple(plan.pairs))
    return cfg.replace(attention=attention, rope=rope, name=f"{cfg.name}-mla")


def _dims(d: int, pairs: tuple[int, ...]) -> tuple[list[int], list[int]]:
    """(rope dims, nope dims) of a half-split d-dim head: kept pair p is dims (p, p + d/2),
    laid out half-split within the block (all first halves, then all second halves)."""
    half = d // 2
    kept = set(pairs)
    rest = [p for p in range(half) if p not in kept]
    return [*pairs, *(p + half for p in pairs)], [*rest, *(p + half for p in rest)]


def _blocks_split(plan: Plan, g: int, d: int, dtype: torch.dtype
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """Block RoPE (the module docstring, step 1): per query head its (qk_dim, d) map from its
    source head's q to the new query [nope | G rope blocks, zero outside its group's], and per
    KV group the maps from its k to the key's nope part (d_n, d) and its rope block (2r, d).
    Returned: (q maps (G, qk_dim, d), k nope maps (G, d_n, d), k rope maps (G, G 2r, d), d_n);
    the q map is the same for every head of a group."""
    rope_idx, nope_idx = _dims(d, plan.pairs)
    d_n, r2 = len(nope_idx), len(rope_idx)
    eye = torch.eye(d, dtype=dtype)
    qmap = torch.zeros(g, d_n + g * r2, d, dtype=dtype)
    krope = torch.zeros(g, g * r2, d, dtype=dtype)
    for grp in range(g):
        qmap[grp, :d_n] = eye[nope_idx]
        qmap[grp, d_n + grp * r2 : d_n + (grp + 1) * r2] = eye[rope_idx]
        krope[grp, grp * r2 : (grp + 1) * r2] = eye[rope_idx]
    knope = eye[nope_idx].expand(g, d_n, d)
    return qmap, knope, krope, d_n


def _rorope_split(wk: torch.Tensor, bk: torch.Tensor | None, g: int, d: int,
                  inputs: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """RoRoPE (TransMLA, arXiv 2502.07864 s4): for each frequency pair i the G KV heads' 2-D
    rotary parts k_g,i are mixed by a unit vector u_i over heads (rotation by position is the
    same for every head, so it commutes with the mixing): the shared rope key is
    k_i = sum_g u_i[g] k_g,i, head_dim wide with exactly the source's frequencies (a plain RoPE
    that DeepSeek's format can state), u_i the top eigenvector of the heads' rotary covariance on
    calibration keys (on the weights without them). Query head h of group g reads it through
    u_i[g] q_h,i. What u_i misses, k_g,i - u_i[g] k_i, goes to the nope part, where it loses its
    rotation (the approximation; none for MQA, G = 1). Same return as :func:`_blocks_split`."""
    half = d // 2
    if inputs is not None:
        keys = inputs.to(wk.dtype) @ wk.reshape(g * d, -1).T
        if bk is not None:
            keys = keys + bk.reshape(-1)
        pairs = keys.view(-1, g, 2, half)  # (N, G, c, i): half-split pair i is dims (i, i + d/2)
    else:
        pairs = wk.permute(2, 0, 1).reshape(-1, g, 2, half)  # white inputs: the weights' Gram
    cov = torch.einsum("ngci,nhci->igh", pairs, pairs)  # (half, G, G)
    u = torch.linalg.eigh(cov).eigenvectors[..., -1]  # (half, G), unit norm
    u_dim = torch.cat((u, u)).T  # (G, d): the weight of dim t of head g in the shared key
    eye = torch.eye(d, dtype=wk.dtype)
    qmap = torch.cat((eye.expand(g, d, d), torch.diag_embed(u_dim)), dim=1)  # (G, 2d, d)
    krope = torch.diag_embed(u_dim).transpose(0, 1).reshape(d, g * d)  # rope key from all heads
    # knope[g] (d, G d): k_g minus its share of the shared key, a map on the concatenated heads.
    knope = torch.zeros(g, d, g * d, dtype=wk.dtype)
    for grp in range(g):
        knope[grp, :, grp * d : (grp + 1) * d] = eye
        knope[grp] -= torch.diag(u_dim[grp]) @ krope
    return qmap, knope, krope.unsqueeze(0), d


@torch.no_grad()
def convert_layer(src: GroupedQueryAttention, dst: MultiHeadLatentAttention, cfg: ModelConfig,
                  plan: Plan, inputs: torch.Tensor | None = None) -> None:
    """Fill ``dst`` (built from :func:`mla_config`) from ``src``. ``inputs`` (N, dim): the
    layer's attention inputs on calibration text, needed by ``method="pca"``, by the latent
    norm's gains and used by RoRoPE's mixing when given."""
    a = src.cfg
    h, g, d = a.n_heads, a.n_kv_heads, a.head_dim
    per_group = h // g
    dim = cfg.dim
    f64 = torch.float64
    wq = src.q_proj.weight.to(f64).view(h, d, dim)
    wk = src.k_proj.weight.to(f64).view(g, d, dim)
    wv = src.v_proj.weight.to(f64).view(g, d, dim)
    bq = src.q_proj.bias.to(f64).view(h, d) if src.q_proj.bias is not None else None
    bk = src.k_proj.bias.to(f64).view(g, d) if src.k_proj.bias is not None else None
    bv = src.v_proj.bias.to(f64).view(g, d) if src.v_proj.bias is not None else None
    zero_b = torch.zeros(g, d, dtype=f64)
    if plan.rope_mode == "rorope":
        qmap, knope, krope, d_n = _rorope_split(wk, bk, g, d, inputs)
        k_src, kb_src = wk.reshape(g * d, dim), (bk if bk is not None else zero_b).reshape(-1)
    else:
        qmap, knope, krope, d_n = _blocks_split(plan, g, d, f64)
        k_src, kb_src = wk, (bk if bk is not None else zero_b)
    # Key maps act on one head's k (blocks) or on all heads' k concatenated (rorope).
    def key_rows(maps: torch.Tensor, grp: int | None) -> tuple[torch.Tensor, torch.Tensor]:
        if plan.rope_mode == "rorope":
            return maps @ k_src, maps @ kb_src
        assert grp is not None
        return maps @ k_src[grp], maps @ kb_src[grp]

    # Queries: qmap of the head's group, the nope part times the scale change (and YaRN's cos/sin
    # factor, which MLA applies to the rope part only), the rope part times the scale change.
    qk_dim = qmap.shape[1]
    scale = math.sqrt(qk_dim / d)
    factor = yarn_attention_factor(cfg.rope.yarn) if cfg.rope.yarn is not None else 1.0
    part = torch.full((qk_dim, 1), scale, dtype=f64)
    part[:d_n] *= factor * factor
    q_new = torch.stack([part * (qmap[hd // per_group] @ wq[hd]) for hd in range(h)])
    dst.q_proj.weight.copy_(q_new.reshape(h * qk_dim, dim))
    if dst.q_proj.bias is not None:
        b_q = bq if bq is not None else torch.zeros(h, d, dtype=f64)
        b_new = torch.stack([part[:, 0] * (qmap[hd // per_group] @ b_q[hd]) for hd in range(h)])
        dst.q_proj.bias.copy_(b_new.reshape(-1))

    # The latent: M = [alpha K_nope (all groups); W_v (all groups)], balanced, factored.
    k_rows = [key_rows(knope[grp], grp) for grp in range(g)]
    k_nope = torch.cat([w for w, _ in k_rows]) if d_n else torch.zeros(0, dim, dtype=f64)
    v_all = wv.reshape(g * d, dim)
    alpha = (v_all.norm() / k_nope.norm()).item() if d_n and k_nope.norm() > 0 else 1.0
    m = torch.cat((alpha * k_nope, v_all))
    b_m = torch.cat((torch.cat([b for _, b in k_rows]) * alpha if d_n else torch.zeros(0, dtype=f64),
                     (bv if bv is not None else zero_b).reshape(-1)))
    u = _basis(m, b_m, plan, inputs)  # (rows, R), orthonormal columns
    w_dkv, c_bias = u.T @ m, u.T @ b_m
    if plan.rope_mode == "rorope":
        k_rope, kb_rope = key_rows(krope[0], None)
    else:
        rope_rows = [key_rows(krope[grp], grp) for grp in range(g)]  # each zero outside its block
        k_rope = torch.stack([w for w, _ in rope_rows]).sum(0)
        kb_rope = torch.stack([b for _, b in rope_rows]).sum(0)
    dst.kv_a_proj_with_mqa.weight.copy_(torch.cat((w_dkv, k_rope)))
    if dst.kv_a_proj_with_mqa.bias is not None:
        dst.kv_a_proj_with_mqa.bias.copy_(torch.cat((c_bias, kb_rope)))
    if dst.kv_a_layernorm is not None:
        if inputs is None:
            raise ConfigError("a latent RMSNorm's gains come from calibration: give --calib")
        dst.kv_a_layernorm.weight.copy_(latent_norm_gains(inputs, w_dkv, c_bias,
                                                          dst.kv_a_layernorm.eps))
    # kv_b_proj: per query head [k_nope rows of its group (alpha undone) ; v rows of its group].
    u_k = u[: g * d_n].reshape(g, d_n, u.shape[1]) / alpha
    u_v = u[g * d_n :].reshape(g, d, u.shape[1])
    up = torch.cat([torch.cat((u_k[hd // per_group], u_v[hd // per_group])) for hd in range(h)])
    dst.kv_b_proj.weight.copy_(up)
    dst.o_proj.weight.copy_(src.o_proj.weight)
    if src.o_proj.bias is not None and dst.o_proj.bias is not None:
        dst.o_proj.bias.copy_(src.o_proj.bias)


def latent_norm_gains(inputs: torch.Tensor, w_dkv: torch.Tensor, c_bias: torch.Tensor,
                      eps: float) -> torch.Tensor:
    """DeepSeek's RMSNorm on the latent, gamma * c / rms(c), cannot equal the linear latent c
    (its scale differs token by token); the per-dim gains gamma_k that make it closest in the
    least-squares sense on calibration latents c: gamma_k = E[c_k^2 / rms] / E[c_k^2 / rms^2]."""
    c = inputs.to(w_dkv.dtype) @ w_dkv.T + c_bias
    inv = torch.rsqrt(c.pow(2).mean(-1, keepdim=True) + eps)
    num, den = (c.pow(2) * inv).sum(0), (c.pow(2) * inv.pow(2)).sum(0)
    return torch.where(den > 0, num / den.clamp_min(1e-30), torch.ones_like(num))


def _basis(m: torch.Tensor, b_m: torch.Tensor, plan: Plan, inputs: torch.Tensor | None) -> torch.Tensor:
    """An orthonormal (rows, R) basis U_R of M's output space: its top singular vectors
    (``svd``), those of the outputs M x + b on calibration inputs (``pca``), or those of the
    whitened map [M | b] S (``whitened``; the module docstring)."""
    rank = plan.kv_lora_rank
    if plan.method == "svd" or (plan.method == "pca" and rank >= m.shape[0]):
        # Full rank: any complete orthonormal basis reproduces M x + b exactly.
        u, _, _ = torch.linalg.svd(m, full_matrices=True)
        return u[:, :rank]
    if inputs is None:
        raise ConfigError(f"method {plan.method} needs calibration activations (--calib FILE)")
    if plan.method == "whitened":
        # The bias is the weight of an input that is always 1: whiten [x, 1] and factor [M | b].
        # The latent's down-projection SVD-LLM un-whitens to, Sigma_R V_R^T S^-1, is U_R^T [M | b]:
        # what convert_layer computes from U_R.
        s = torch.linalg.cholesky(damped_covariance(inputs.to(m.dtype), plan.damp))
        u, _, _ = torch.linalg.svd(torch.cat((m, b_m[:, None]), dim=1) @ s, full_matrices=True)
        return u[:, :rank]
    y = inputs.to(m.dtype) @ m.T + b_m  # (N, rows)
    # The top-R principal directions of the outputs (uncentred: the bias is part of them).
    _, vecs = torch.linalg.eigh(y.T @ y)
    return vecs[:, -rank:].flip(-1)


def covariance(inputs: torch.Tensor) -> torch.Tensor:
    """(dim + 1, dim + 1): the uncentred second moment of the inputs with a constant 1 appended
    (the bias's input), X^T X / N."""
    x1 = torch.cat((inputs, torch.ones_like(inputs[:, :1])), dim=1)
    return x1.T @ x1 / len(x1)


def damped_covariance(inputs: torch.Tensor, damp: float) -> torch.Tensor:
    """:func:`covariance` plus ``damp`` times its mean diagonal on the diagonal."""
    cov = covariance(inputs)
    return cov + damp * cov.diagonal().mean() * torch.eye(len(cov), dtype=cov.dtype)


def covariance_rank(inputs: torch.Tensor) -> int:
    """The numerical rank of :func:`covariance` (below dim + 1: singular, whitening needs the
    damping; certain when there are fewer calibration tokens than dims)."""
    return int(torch.linalg.matrix_rank(covariance(inputs.double()), hermitian=True))


def shell(model: Transformer, plan: Plan) -> Transformer:
    """The converted model's skeleton: :func:`mla_config`'s model with every weight but the
    attention layers' copied from the GQA ``model`` (those are left for :func:`convert_layer`)."""
    cfg = mla_config(model.config, plan)
    out = Transformer.empty(cfg, model.dtype, model.device)
    own = model.state_dict()
    target = out.state_dict()
    with torch.no_grad():
        for k, v in target.items():
            if ".self_attn." not in k and k in own:
                v.copy_(own[k])
    return out


def convert(model: Transformer, plan: Plan, inputs: list[torch.Tensor] | None = None) -> Transformer:
    """The GQA ``model`` with every attention layer converted (see the module docstring); the
    other weights are copied. ``inputs``: per layer, calibration attention inputs (N, dim)."""
    out = shell(model, plan)
    for i, (src_blk, dst_blk) in enumerate(zip(model.blocks, out.blocks, strict=True)):
        assert isinstance(src_blk.self_attn, GroupedQueryAttention)
        assert isinstance(dst_blk.self_attn, MultiHeadLatentAttention)
        convert_layer(src_blk.self_attn, dst_blk.self_attn, out.config, plan,
                      None if inputs is None else inputs[i])
    return out.eval()


__all__ = ["METHODS", "ROPE_MODES", "WHITEN_DAMP", "Method", "Plan", "RopeMode", "check_sizes", "convert",
           "convert_layer", "covariance", "covariance_rank", "damped_covariance", "full_rank",
           "full_rope_dim", "latent_norm_gains", "mla_config", "shell"]
