"""PyTorch scaled_dot_product_attention, with grouped heads folded into the query length.

With a mask (cached decode/prefill), the Hq/Hkv query heads that share a KV head are stacked
along the query axis: q (B, Hkv, G*T, D) against k (B, Hkv, S, D). Each cached key is then read
once for all G heads -- for absorbed MLA (Hkv = 1) this is what makes decode bandwidth-friendly
(FlashMLA's "MQA mode"). Without a mask (training, fresh prefill) SDPA's own GQA path is used.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

# enable_gqa arrived in torch 2.5; older versions repeat the KV heads instead.
_HAS_GQA = tuple(int(p) for p in torch.__version__.split(".")[:2]) >= (2, 5)


def attention_sdpa(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
    mask: torch.Tensor | None = None, causal: bool = False,
) -> torch.Tensor:
    """Same contract as ``attention_ref``."""
    dv = v.shape[-1]
    if dv != q.shape[-1]:
        # SDPA's fused (flash) kernels need equal q/k and v head dims; otherwise it falls back
        # to the math path, which materialises all (B, H, T, S) scores: 3 GB instead of 0.1 GB
        # for one 16-head 4k-token naive-MLA prefill (d_qk 192, d_v 128). Zero-padding the
        # shorter side changes neither the scores nor the first dv output dims.
        d = max(dv, q.shape[-1])
        q, k = F.pad(q, (0, d - q.shape[-1])), F.pad(k, (0, d - k.shape[-1]))
        return _sdpa(q, k, F.pad(v, (0, d - dv)), scale, mask, causal)[..., :dv]
    return _sdpa(q, k, v, scale, mask, causal)


def _sdpa(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
    mask: torch.Tensor | None, causal: bool,
) -> torch.Tensor:
    b, hq, t, _ = q.shape
    hkv, s = k.shape[1], k.shape[2]
    group = hq // hkv
    if mask is None:
        if causal and t != s:
            # Queries are the last t positions: build the offset causal mask explicitly.
            mask = torch.ones(t, s, dtype=torch.bool, device=q.device).tril(diagonal=s - t)
            causal = False
        if mask is None:
            if group > 1 and _HAS_GQA:
                return F.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=scale, enable_gqa=True)
            if group > 1:
                k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
            return F.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=scale)
    mask = mask.expand(b, 1, t, s)
    # (B, Hq, T, D) -> (B, Hkv, G*T, D); head h = kv * G + g, query row g * T + t.
    qf = q.reshape(b, hkv, group * t, q.shape[-1])
    mf = mask.repeat(1, 1, group, 1) if group > 1 else mask
    out = F.scaled_dot_product_attention(qf, k, v, attn_mask=mf, scale=scale)
    return out.reshape(b, hq, t, v.shape[-1])
