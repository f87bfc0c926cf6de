"""How the attention maths runs: one signature, several implementations, one backend choice.

``attention(q, k, v, scale, mask=None, causal=False)`` with q (B, Hq, T, D), k (B, Hkv, S, D),
v (B, Hkv, S, Dv) and Hkv dividing Hq: dense attention, through PyTorch's fused SDPA kernels,
or through the obviously-correct fp32 softmax (``attention_ref``) when the ``reference`` backend
is forced. Which backend runs, SDPA, the reference or the Triton kernels (for CUDA tensors by
default), is one choice: :mod:`latentattn.kernels.backend` (``set_backend``, ``use_backend``,
``LATENTATTN_BACKEND``).
"""

from __future__ import annotations

import torch

from latentattn.kernels.backend import (
    BACKENDS,
    dense_reference,
    get_backend,
    runs_triton,
    set_backend,
    use_backend,
)
from latentattn.kernels.reference import attention_ref
from latentattn.kernels.sdpa import attention_sdpa


def attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
    mask: torch.Tensor | None = None, causal: bool = False,
) -> torch.Tensor:
    """softmax(scale * q k^T [masked]) v, (B, Hq, T, Dv): the reference under the ``reference``
    backend, SDPA otherwise (no Triton kernel computes dense prefill)."""
    fn = attention_ref if dense_reference() else attention_sdpa
    return fn(q, k, v, scale, mask=mask, causal=causal)


__all__ = ["BACKENDS", "attention", "attention_ref", "attention_sdpa", "get_backend", "runs_triton",
           "set_backend", "use_backend"]
