"""The obviously-correct attention every fast path is compared with (FlashMLA tests/ref.py style)."""

from __future__ import annotations

import torch


def attention_ref(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
    mask: torch.Tensor | None = None, causal: bool = False,
) -> torch.Tensor:
    """q (B, Hq, T, D), k (B, Hkv, S, D), v (B, Hkv, S, Dv) -> (B, Hq, T, Dv), fp32 softmax.

    mask: bool, broadcastable to (B, Hq, T, S), True = may attend. causal: query t sees keys
    j <= t + (S - T) (queries are the last T positions). A row with no visible key gives zeros.
    """
    group = q.shape[1] // k.shape[1]
    k = k.repeat_interleave(group, dim=1)
    v = v.repeat_interleave(group, dim=1)
    scores = torch.einsum("bhtd,bhsd->bhts", q.float(), k.float()) * scale
    t, s = scores.shape[-2:]
    allowed = torch.ones(t, s, dtype=torch.bool, device=q.device)
    if causal:
        allowed = torch.ones_like(allowed).tril(diagonal=s - t)
    if mask is not None:
        allowed = allowed & mask
    scores = scores.masked_fill(~allowed, float("-inf"))
    probs = torch.softmax(scores, dim=-1).nan_to_num(0.0)  # all-masked rows -> 0, not NaN
    return torch.einsum("bhts,bhsd->bhtd", probs, v.float()).to(q.dtype)
