"""The paths ``latentattn bench kernels`` times, built as the model runs them: the PyTorch path
of each decode kind (the model's own decode Step, its cache reads and its attention functions,
what runs without the kernels) and a whole DSA decode step, PyTorch and Triton."""

from __future__ import annotations

from collections.abc import Callable

import torch

from latentattn.attention.mla import latent_attention
from latentattn.cache.fp8 import dequantize_e4m3, quantize_e4m3
from latentattn.cache.kv import KVCache
from latentattn.cache.layer import LatentCache
from latentattn.cache.step import Step
from latentattn.kernels.sparse import select_topk, sparse_mqa, topk_reference

INDEX_HEADS, INDEX_DIM = 64, 128  # V3.2's indexer: 64 heads of 128, fp8 keys of 132 bytes a token
Run = Callable[[], object]


def decode_step(batch: int, context: int, device: torch.device) -> Step:
    """The Step the model's decode passes its layers when every row holds ``context - 1``
    tokens and reads one more (an equal-length batch): ``KVCache.step(1)`` itself, positions
    context - 1, kv_len context and its (B, 1, 1, context) mask."""
    plan = KVCache([], batch, context, device)
    plan.fill(context - 1)
    return plan.step(1)


def torch_paths(q: torch.Tensor, cache: LatentCache, fp8: LatentCache, step: Step,
                idx: torch.Tensor, scale: float) -> dict[str, Callable[[], torch.Tensor]]:
    """The PyTorch path of each decode kind, what the model runs at decode without the kernels:
    q (B, H, 1, R + Dr) the absorbed query (``absorb_query``), ``cache`` the latent rows and
    ``fp8`` the same rows as FlashMLA's records, ``step`` the model's decode Step
    (:func:`decode_step`), idx (B, 1, k) a selection. Each returns the latent output
    (B, H, 1, R), before ``unabsorb``.

    Every path reads its cache as the model does, ``latent.read(step, q.dtype)`` (a view of
    rows in q's dtype; the records dequantised), in the timed call, since the model reads per
    layer and step. Dense: ``MultiHeadLatentAttention.absorbed``'s own :func:`latent_attention`
    under the step's mask. Sparse: ``sparse_mqa`` as ``SparseLatentAttention`` calls it at
    decode without the kernels (a DSA cache's latent store reads as these two do)."""
    r, dtype = cache.kv_lora_rank, q.dtype
    rows, records = cache.latent, fp8.latent
    return {
        "dense decode": lambda: latent_attention(q, rows.read(step, dtype), scale, r, step),
        "dense decode fp8": lambda: latent_attention(q, records.read(step, dtype), scale, r, step),
        "sparse decode": lambda: sparse_mqa(q, rows.read(step, dtype), idx, scale, r)[0],
        "sparse decode fp8": lambda: sparse_mqa(q, records.read(step, dtype), idx, scale, r)[0],
    }


def dsa_step_runs(q: torch.Tensor, cache: LatentCache, step: Step, k: int, scale: float,
              g: torch.Generator, kernels: bool) -> dict[tuple[str, str], Run]:
    """A whole DSA decode step as the model runs it: V3.2's indexer (64 heads of 128, fp8 keys)
    over every cached key, top-k, then sparse attention over the k selected latents. The
    PyTorch path reads the cache as a DSA layer does (the latent rows, the keys dequantised to
    fp32), then ``select_topk`` and ``sparse_mqa`` as ``SparseLatentAttention`` calls them; the
    kernels read the fp8 bytes in place. Bytes: the keys (132 a token) plus the sparse
    attention's."""
    kv, r = cache.latent.buffers[0], cache.kv_lora_rank
    b, s = kv.shape[:2]
    heads, dim = INDEX_HEADS, INDEX_DIM
    qi = torch.randn(b, 1, heads, dim, generator=g, device=kv.device)
    wi = torch.randn(b, 1, heads, generator=g, device=kv.device) * heads**-0.5
    k8, k_scale = quantize_e4m3(torch.randn(b, s, dim, generator=g, device=kv.device))
    pos = step.positions

    def torch_step() -> object:
        latent, keys = cache.latent.read(step, q.dtype), dequantize_e4m3(k8, k_scale)
        sel = select_topk(qi, wi, keys, pos, k, dim**-0.5)
        return sparse_mqa(q, latent, sel, scale, r)

    runs: dict[tuple[str, str], Run] = {("dsa decode step", "torch"): torch_step}
    if kernels:
        from latentattn.kernels.indexer_logits import indexer_logits_triton
        from latentattn.kernels.sparse_mla import sparse_mla_triton

        def triton_step() -> object:
            logits = indexer_logits_triton(qi, wi, k8, pos, dim**-0.5, k_scale=k_scale)
            return sparse_mla_triton(q, kv, topk_reference(logits, pos, k), scale, r,
                                     check_indices=False)

        runs["dsa decode step", "triton"] = triton_step
    return runs


__all__ = ["INDEX_DIM", "INDEX_HEADS", "Run", "decode_step", "dsa_step_runs", "torch_paths"]
