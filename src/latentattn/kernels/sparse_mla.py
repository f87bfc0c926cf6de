"""Sparse MLA attention over top-k indices (DSA's main attention, DeepSeek-V3.2 s2): each query
token reads only the latents its indexer selected, in the absorbed form.

q (B, H, T, R + Dr) absorbed queries; kv (B, S, R + Dr) the latent cache rows [c | k_rope], the
value being c; idx (B, T, K) the selected rows, -1 (or anything outside 0..S-1) marking an
invalid slot that is never read. Output o (B, H, T, R) and the log-sum-exp (B, H, T) of the
scaled scores; a token with no valid index gets o = 0 and LSE -inf.

:func:`sparse_mla_ref` is the obviously-correct fp32 form; :func:`sparse_mla_triton` runs the
Triton kernels (:mod:`latentattn.kernels.triton_sparse`; one program per token and block of 16
heads, the head blocks of a token side by side, 16 selected latents per tile gathered by index
inside the kernel, each loaded once as key and value; at decode, when tokens x head blocks cannot
fill the GPU, each token's top-k list is split and the parts merged by their LSEs)
with a backward, so DSA trains on a GPU: gradients for the absorbed queries and the
latents (scattered with atomics, since many tokens select the same latent).
"""

from __future__ import annotations

from typing import Any

import torch

from latentattn.cache.fp8 import check_record_rank, record_bytes
from latentattn.errors import ConfigError
from latentattn.kernels.mla_decode import (
    GRID_YZ,
    H100_SMS,
    check_devices,
    check_rank_and_dtypes,
    sm_count,
    split_count,
    unit_stride,
)
from latentattn.kernels.sparse import gather_rows

BLOCK_H = 16  # heads per program (tl.dot needs 16 rows); vLLM's sparse kernel also takes 16


def sparse_mla_ref(q: torch.Tensor, kv: torch.Tensor, idx: torch.Tensor, scale: float, rank: int
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """(o (B, H, T, R), lse (B, H, T)) in fp32 through a gather; differentiable."""
    sel = gather_rows(kv.float(), idx.long())  # (B, T, K, D)
    ok = (idx >= 0) & (idx < kv.shape[1])
    s = torch.einsum("bhtd,btkd->bhtk", q.float(), sel) * scale
    s = s.masked_fill(~ok[:, None], float("-inf"))
    lse = torch.logsumexp(s, dim=-1)
    p = torch.exp(s - torch.where(torch.isinf(lse), 0.0, lse)[..., None])
    return torch.einsum("bhtk,btkc->bhtc", p, sel[..., :rank]), lse


def check_sparse_inputs(q: torch.Tensor, kv: torch.Tensor, idx: torch.Tensor, rank: int,
                        check_indices: bool = True) -> None:
    """Shapes and dtypes; with ``check_indices`` also that no index is past the cache (a host
    sync: the kernel masks such slots anyway, so the model's own selections skip it)."""
    if q.dim() != 4 or kv.dim() != 3 or idx.dim() != 3 or q.shape[-1] != kv.shape[-1]:
        raise ConfigError(f"sparse_mla takes q (B, H, T, R + Dr), kv (B, S, R + Dr), idx (B, T, K); "
                          f"got {tuple(q.shape)}, {tuple(kv.shape)}, {tuple(idx.shape)}")
    if idx.shape[:2] != (q.shape[0], q.shape[2]) or kv.shape[0] != q.shape[0]:
        raise ConfigError(f"idx {tuple(idx.shape)} and kv {tuple(kv.shape)} do not match q "
                          f"{tuple(q.shape)}'s batch and tokens")
    check_rank_and_dtypes(q, kv, rank, "sparse_mla")
    # Tokens share grid axis 0 with the head blocks (2^31 - 1 programs); sequences are axis 1.
    if q.shape[0] > GRID_YZ:
        raise ConfigError(f"sparse_mla launches one program row per sequence: at most {GRID_YZ:,}, "
                          f"got B {q.shape[0]:,}; call it on smaller batches")
    if idx.dtype not in (torch.int32, torch.int64):
        raise ConfigError(f"idx must be int32 or int64, got {idx.dtype}")
    if check_indices and idx.numel() and int(idx.max()) >= kv.shape[1]:
        raise ConfigError(f"idx selects row {int(idx.max())} of a cache of {kv.shape[1]} rows")


class _SparseMLA(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, q: torch.Tensor, kv: torch.Tensor, idx: torch.Tensor, scale: float,
                rank: int, splits: int) -> tuple[torch.Tensor, torch.Tensor]:
        from latentattn.kernels.triton_sparse import launch_fwd

        # A cache's [:, :kv_len] view is read in place (only rows need unit stride).
        q, kv = q.contiguous(), unit_stride(kv)
        idx = idx.to(device=q.device, dtype=torch.int32).contiguous()
        o, lse = launch_fwd(q, kv, idx, scale, rank, splits)
        ctx.save_for_backward(q, kv, idx, o, lse)
        ctx.scale, ctx.rank = scale, rank
        ctx.mark_non_differentiable(lse)
        return o, lse

    @staticmethod
    def backward(ctx: Any, do: torch.Tensor, _dlse: torch.Tensor | None
                 ) -> tuple[torch.Tensor, torch.Tensor, None, None, None, None]:
        from latentattn.kernels.triton_sparse import launch_bwd

        q, kv, idx, o, lse = ctx.saved_tensors
        dq, dkv = launch_bwd(q, kv, idx, o, lse, do.contiguous(), ctx.scale, ctx.rank)
        return dq.to(q.dtype), dkv.to(kv.dtype), None, None, None, None


def sparse_mla_triton(q: torch.Tensor, kv: torch.Tensor, idx: torch.Tensor, scale: float, rank: int,
                      num_splits: int | None = None, check_indices: bool = True
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """The Triton kernels (module docstring): (o, lse), differentiable in q and kv.
    ``num_splits``: parts each token's top-k list is split into in the forward, merged by their
    LSEs (None: :func:`default_sparse_splits`; decode at small batch needs them to fill a GPU).
    ``check_indices=False`` skips the one check that reads ``idx`` on the host."""
    check_sparse_inputs(q, kv, idx, rank, check_indices)
    check_devices("sparse_mla", q, kv)
    o, lse = _SparseMLA.apply(q, kv, idx, scale, rank, _splits(q, idx, num_splits))
    return o, lse


def sparse_mla_fp8_triton(q: torch.Tensor, records: torch.Tensor, idx: torch.Tensor, scale: float,
                          rank: int, num_splits: int | None = None, check_indices: bool = True
                          ) -> tuple[torch.Tensor, torch.Tensor]:
    """The forward over FlashMLA's fp8 records (B, S, bytes) uint8 (a latent store in
    :class:`~latentattn.cache.store.Record` format; FlashMLA's sparse decode reads the same
    656-byte rows), each selected record decoded in the kernel: an inference cache, so there is no
    backward. Arguments as in :func:`sparse_mla_triton`; the reference is
    :func:`sparse_mla_ref` on ``unpack_record``."""
    if q.dim() != 4 or records.dim() != 3 or records.dtype != torch.uint8:
        raise ConfigError(f"sparse_mla_fp8 takes q (B, H, T, R + Dr) and uint8 records (B, S, bytes); "
                          f"got {tuple(q.shape)}, {tuple(records.shape)} {records.dtype}")
    check_record_rank(rank)
    if not 0 < rank < q.shape[-1] or records.shape[-1] != record_bytes(rank, q.shape[-1] - rank):
        raise ConfigError(f"records of {records.shape[-1]} bytes do not hold kv_lora_rank {rank} and "
                          f"q width {q.shape[-1]}")
    if torch.is_grad_enabled() and q.requires_grad:
        raise ConfigError("fp8 records are an inference cache: sparse_mla_fp8_triton has no backward")
    # The shape checks (and the index check, which reads only the row count) on a stand-in
    # latent of the records' rows.
    meta = torch.empty(*records.shape[:2], q.shape[-1], dtype=q.dtype, device="meta")
    check_sparse_inputs(q, meta, idx, rank, check_indices)
    check_devices("sparse_mla_fp8", q, records)
    from latentattn.kernels.triton_sparse import launch_fwd

    return launch_fwd(q.contiguous(), unit_stride(records),
                      idx.to(device=q.device, dtype=torch.int32).contiguous(), scale, rank,
                      _splits(q, idx, num_splits), fp8=True)


def _splits(q: torch.Tensor, idx: torch.Tensor, num_splits: int | None) -> int:
    splits = (num_splits if num_splits is not None
              else default_sparse_splits(q.shape[0] * q.shape[2], q.shape[1], idx.shape[-1],
                                         sm_count(q.device)))
    if splits < 1:
        raise ConfigError(f"num_splits must be >= 1, got {splits}")
    return splits


def default_sparse_splits(tokens: int, heads: int, topk: int, sms: int = H100_SMS) -> int:
    """Splits of each token's top-k list: :func:`~latentattn.kernels.mla_decode.split_count` over
    tokens x head blocks programs (none once they fill the GPU, as at any prefill), each split
    at least 128 entries (vLLM's TRITON_MLA_SPARSE policy keeps splits that long)."""
    return split_count(tokens * -(-heads // BLOCK_H), topk // 128, sms)


__all__ = ["BLOCK_H", "check_sparse_inputs", "default_sparse_splits", "sparse_mla_fp8_triton",
           "sparse_mla_ref", "sparse_mla_triton"]
