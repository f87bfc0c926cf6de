"""How the attention maths runs: one signature, several backends, chosen once.

``attention(q, k, v, scale, mask=None, causal=False)`` with q (B, Hq, T, D), k (B, Hkv, S, D),
v (B, Hkv, S, Dv) and Hkv dividing Hq. ``sdpa`` (default) runs PyTorch's fused kernels;
``reference`` is the obviously-correct fp32 softmax the tests compare against. Pick one with
``set_backend`` or the ``LATENTATTN_ATTN_BACKEND`` environment variable.
"""

from __future__ import annotations

import os
from collections.abc import Callable

import torch

from latentattn.errors import ConfigError
from latentattn.kernels.reference import attention_ref
from latentattn.kernels.sdpa import attention_sdpa

AttentionFn = Callable[..., torch.Tensor]
BACKENDS: dict[str, AttentionFn] = {"sdpa": attention_sdpa, "reference": attention_ref}
_backend = os.environ.get("LATENTATTN_ATTN_BACKEND", "sdpa")


def set_backend(name: str) -> None:
    global _backend
    if name not in BACKENDS:
        raise ConfigError(f"unknown attention backend {name!r}; known: {', '.join(BACKENDS)}")
    _backend = name


def get_backend() -> str:
    return _backend


def attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
    mask: torch.Tensor | None = None, causal: bool = False,
) -> torch.Tensor:
    """softmax(scale * q k^T [masked]) v, (B, Hq, T, Dv), with the selected backend."""
    return BACKENDS[_backend](q, k, v, scale, mask=mask, causal=causal)


__all__ = ["BACKENDS", "attention", "attention_ref", "attention_sdpa", "get_backend", "set_backend"]
