"""The lightning indexer's logits over a key cache (DeepSeek-V3.2-Exp ``inference/model.py``
Indexer; vLLM's ``mqa_logits_triton.py`` ports DeepGEMM's fp8_mqa_logits):
I[b, t, s] = scale * sum_h w[b, t, h] relu(q[b, t, h] . k[b, s]), -inf for keys past the
token's position. q (B, T, H_I, d_I) and w (B, T, H_I) fp32; keys k (B, S, d_I) fp32/bf16, or
fp8: e4m3 bytes (B, S, d_I) uint8 with one fp32 scale per 128 values (``k_scale``
(B, S, d_I / 128), as :func:`latentattn.cache.fp8.quantize_e4m3` stores them). Prefill and
decode alike (T = 1). Top-k stays ``torch.topk`` (:func:`latentattn.kernels.sparse.select_topk`).

:func:`indexer_logits_ref` is the PyTorch form; :func:`indexer_logits_triton` the Triton kernel
(:mod:`latentattn.kernels.triton_indexer`: one program per token and block of 32 keys, all
heads at once as one (heads x d_I) x (d_I x keys) dot, fp8 decoded in software).
"""

from __future__ import annotations

import torch

from latentattn.cache.fp8 import dequantize_e4m3
from latentattn.errors import ConfigError
from latentattn.kernels.mla_decode import check_devices, unit_stride
from latentattn.kernels.sparse import index_scores, visible


def indexer_logits_ref(q: torch.Tensor, w: torch.Tensor, k: torch.Tensor, positions: torch.Tensor,
                       scale: float, k_scale: torch.Tensor | None = None) -> torch.Tensor:
    keys = dequantize_e4m3(k, k_scale) if k_scale is not None else k.float()
    scores = index_scores(q.float(), w.float(), keys, scale)
    return scores.masked_fill(~visible(positions, 0, k.shape[1]), float("-inf"))


def indexer_logits_triton(q: torch.Tensor, w: torch.Tensor, k: torch.Tensor, positions: torch.Tensor,
                          scale: float, k_scale: torch.Tensor | None = None) -> torch.Tensor:
    """The Triton kernel (module docstring): (B, T, S) fp32."""
    if q.dim() != 4 or w.shape != q.shape[:3] or k.dim() != 3 or k.shape[-1] != q.shape[-1]:
        raise ConfigError(f"indexer logits take q (B, T, H, d), w (B, T, H), k (B, S, d); got "
                          f"{tuple(q.shape)}, {tuple(w.shape)}, {tuple(k.shape)}")
    if positions.shape != q.shape[:2]:
        raise ConfigError(f"positions must be (B, T) = {tuple(q.shape[:2])}, got {tuple(positions.shape)}")
    if k_scale is None and k.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ConfigError(f"indexer keys must be fp32/bf16/fp16, or uint8 e4m3 with k_scale; got "
                          f"{k.dtype}")
    if k_scale is not None and (k.dtype != torch.uint8 or k_scale.shape[:2] != k.shape[:2]
                                or k.shape[-1] % k_scale.shape[-1]):
        raise ConfigError("fp8 indexer keys are uint8 (B, S, d) with fp32 scales (B, S, d / block)")
    check_devices("indexer_logits", q, w, k, *([] if k_scale is None else [k_scale]))
    from latentattn.kernels.triton_indexer import launch_indexer

    # The keys (a cache's [:, :kv_len] view at decode) are read in place, in their own dtype.
    return launch_indexer(q.float().contiguous(), w.float().contiguous(), unit_stride(k),
                          None if k_scale is None else unit_stride(k_scale.float()), positions, scale)


__all__ = ["indexer_logits_ref", "indexer_logits_triton"]
