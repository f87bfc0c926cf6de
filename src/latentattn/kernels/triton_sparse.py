"""Triton kernels for sparse MLA attention over top-k indices (DSA's main attention), forward
and backward (:mod:`latentattn.kernels.sparse_mla` documents the maths, checks the inputs and
wraps them in an autograd Function). Importing this module needs Triton."""

from __future__ import annotations

from typing import Any

import torch
import triton
import triton.language as tl

from latentattn.kernels.sparse_mla import BLOCK_H  # heads per program
from latentattn.kernels.triton_fp8 import load_records, record_qblock
from latentattn.kernels.triton_launch import Launch, run_all
from latentattn.kernels.triton_mla import merge_launch

BLOCK_K = 16  # selected latents per tile (vLLM: 16 or 32)
# Finite: a tile whose every slot is invalid gives no NaN (as in vLLM's
# vllm/v1/attention/ops/triton_sparse_mla_kernel.py). A tl.constexpr, since a @triton.jit kernel
# reads no plain globals when compiled (the interpreter would).
MASKED = tl.constexpr(-1.0e30)


@triton.jit
def _gather_tile(KV, IDX, b, t, k0, seq_kv, topk, stride_kvb, stride_kvs, stride_ib, stride_it,
                 r, dr, RANK: tl.constexpr, ROPE: tl.constexpr, BLOCK_K: tl.constexpr,
                 FP8: tl.constexpr = False, BLOCK_R: tl.constexpr = 16, QBLOCK: tl.constexpr = 16):
    """The token's selected latents k0..k0+BLOCK_K: (c (BLOCK_K, BLOCK_R), k_rope, valid, rows);
    invalid slots (index < 0 or >= seq_kv) are never read and load as 0. With FP8 the rows are
    FlashMLA's records, decoded to fp32 (:func:`latentattn.kernels.triton_fp8.load_records`)."""
    kk = k0 + tl.arange(0, BLOCK_K)
    idx = tl.load(IDX + b * stride_ib + t * stride_it + kk, mask=kk < topk, other=-1)
    ok = (idx >= 0) & (idx < seq_kv)
    rows = tl.where(ok, idx, 0).to(tl.int64)
    row = KV + b * stride_kvb + rows * stride_kvs
    if FP8:
        c, k_rope = load_records(row, ok, r, dr, RANK, ROPE, BLOCK_R, QBLOCK, BLOCK_K)
    else:
        c = tl.load(row[:, None] + r[None, :], mask=ok[:, None] & (r[None, :] < RANK), other=0.0)
        k_rope = tl.load(row[:, None] + RANK + dr[None, :], mask=ok[:, None] & (dr[None, :] < ROPE),
                         other=0.0)
    return c, k_rope, ok, rows


@triton.jit
def sparse_mla_fwd(Q, KV, IDX, OUT, LSE, sm_scale_log2, heads, seq_kv, topk, splits, split_len,
                   stride_qb, stride_qh, stride_qt, stride_kvb, stride_kvs,
                   stride_ib, stride_it, stride_ob, stride_oh, stride_ot, stride_os,
                   stride_lb, stride_lh, stride_lt, stride_ls,
                   RANK: tl.constexpr, ROPE: tl.constexpr, BLOCK_R: tl.constexpr,
                   BLOCK_DR: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr,
                   PRECISION: tl.constexpr, FP8: tl.constexpr, QBLOCK: tl.constexpr):
    """One (head block and split of the top-k list, query token, sequence): softmax over the
    split's selected latents. With one split OUT/LSE are the result; with several, each split
    stores its normalised partial output and LSE (split stride ``stride_os`` / ``stride_ls``)
    for :func:`latentattn.kernels.triton_mla.merge_launch` (vLLM's sparse kernel splits the
    top-k list, not the sequence, when batch x head blocks cannot fill the GPU)."""
    # Grid axis 0 holds (token, split, head block), head blocks fastest: the blocks of one token
    # gather the same latents side by side, so they are read from HBM about once; tokens on
    # axis 0 (up to 2^31 - 1 programs) let a prefill pass 65,535 tokens. Offsets in int64:
    # h * stride_qh alone passes 2^31 at 128 heads from T = 29,357 (q is (B, H, T, 576)).
    blocks = tl.cdiv(heads, BLOCK_H)
    pid = tl.program_id(0)
    hb = pid % blocks
    split = (pid // blocks) % splits
    t = (pid // (blocks * splits)).to(tl.int64)
    b = tl.program_id(1).to(tl.int64)
    h = (hb * BLOCK_H + tl.arange(0, BLOCK_H)).to(tl.int64)
    r = tl.arange(0, BLOCK_R)
    dr = tl.arange(0, BLOCK_DR)
    h_ok = h < heads
    q_row = Q + b * stride_qb + h[:, None] * stride_qh + t * stride_qt
    q_lat = tl.load(q_row + r[None, :], mask=h_ok[:, None] & (r[None, :] < RANK), other=0.0)
    q_rope = tl.load(q_row + RANK + dr[None, :], mask=h_ok[:, None] & (dr[None, :] < ROPE), other=0.0)
    m = tl.full((BLOCK_H,), MASKED, tl.float32)
    denom = tl.zeros((BLOCK_H,), tl.float32)
    acc = tl.zeros((BLOCK_H, BLOCK_R), tl.float32)
    start = split * split_len
    end = tl.minimum(start + split_len, topk)
    for k0 in range(start, end, BLOCK_K):
        c, k_rope, ok, _ = _gather_tile(KV, IDX, b, t, k0, seq_kv, end, stride_kvb, stride_kvs,
                                        stride_ib, stride_it, r, dr, RANK, ROPE, BLOCK_K, FP8,
                                        BLOCK_R, QBLOCK)
        c, k_rope = c.to(q_lat.dtype), k_rope.to(q_lat.dtype)  # fp8 records decode to fp32
        s = tl.dot(q_lat, tl.trans(c), input_precision=PRECISION)
        s += tl.dot(q_rope, tl.trans(k_rope), input_precision=PRECISION)
        s = tl.where(ok[None, :], s * sm_scale_log2, MASKED)
        m_new = tl.maximum(m, tl.max(s, axis=1))
        alpha = tl.exp2(m - m_new)
        p = tl.where(ok[None, :], tl.exp2(s - m_new[:, None]), 0.0)
        denom = denom * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + tl.dot(p.to(c.dtype), c, input_precision=PRECISION)
        m = m_new
    has = denom > 0
    safe = tl.where(has, denom, 1.0)
    out = acc / safe[:, None]  # no valid index: 0 (and a zero-weight split in the merge)
    lse = tl.where(has, (m + tl.log2(safe)) * 0.6931471805599453, float("-inf"))
    o_ptr = (OUT + b * stride_ob + h[:, None] * stride_oh + t * stride_ot
             + split.to(tl.int64) * stride_os + r[None, :])
    tl.store(o_ptr, out.to(OUT.dtype.element_ty), mask=h_ok[:, None] & (r[None, :] < RANK))
    tl.store(LSE + b * stride_lb + h * stride_lh + t * stride_lt + split.to(tl.int64) * stride_ls, lse,
             mask=h_ok)


@triton.jit
def sparse_mla_bwd(Q, KV, IDX, DO, LSE, DELTA, DQ, DKV, sm_scale, heads, seq_kv, topk,
                   stride_qb, stride_qh, stride_qt, stride_kvb, stride_kvs, stride_ib, stride_it,
                   stride_lb, stride_lh, stride_dkb, stride_dks,
                   RANK: tl.constexpr, ROPE: tl.constexpr, BLOCK_R: tl.constexpr,
                   BLOCK_DR: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr,
                   PRECISION: tl.constexpr):
    """One (head block, query token, sequence): dq in registers; dkv scattered with atomics
    (many queries select the same latent). P is rebuilt from the forward's LSE; with
    dP = dO V^T and delta = rowsum(dO * O), dS = P (dP - delta) (FlashAttention-2, Alg. 2)."""
    # Axis 0 holds (token, head block) as in the forward; every offset in int64.
    blocks = tl.cdiv(heads, BLOCK_H)
    h = ((tl.program_id(0) % blocks) * BLOCK_H + tl.arange(0, BLOCK_H)).to(tl.int64)
    t = (tl.program_id(0) // blocks).to(tl.int64)
    b = tl.program_id(1).to(tl.int64)
    r = tl.arange(0, BLOCK_R)
    dr = tl.arange(0, BLOCK_DR)
    h_ok = h < heads
    lat_ok = h_ok[:, None] & (r[None, :] < RANK)
    rope_ok = h_ok[:, None] & (dr[None, :] < ROPE)
    off_q = b * stride_qb + h[:, None] * stride_qh + t * stride_qt
    q_lat = tl.load(Q + off_q + r[None, :], mask=lat_ok, other=0.0)
    q_rope = tl.load(Q + off_q + RANK + dr[None, :], mask=rope_ok, other=0.0)
    # dO and O share Q's layout over the first RANK columns (the wrapper makes them so).
    do = tl.load(DO + off_q + r[None, :], mask=lat_ok, other=0.0)
    lse = tl.load(LSE + b * stride_lb + h * stride_lh + t, mask=h_ok, other=0.0)
    delta = tl.load(DELTA + b * stride_lb + h * stride_lh + t, mask=h_ok, other=0.0)
    lse = tl.where(lse == float("-inf"), 0.0, lse)  # no valid index: P is all 0 anyway
    dq_lat = tl.zeros((BLOCK_H, BLOCK_R), tl.float32)
    dq_rope = tl.zeros((BLOCK_H, BLOCK_DR), tl.float32)
    for k0 in range(0, topk, BLOCK_K):
        c, k_rope, ok, safe_idx = _gather_tile(KV, IDX, b, t, k0, seq_kv, topk, stride_kvb,
                                               stride_kvs, stride_ib, stride_it, r, dr, RANK, ROPE,
                                               BLOCK_K)
        s = tl.dot(q_lat, tl.trans(c), input_precision=PRECISION)
        s += tl.dot(q_rope, tl.trans(k_rope), input_precision=PRECISION)
        p = tl.where(ok[None, :] & h_ok[:, None], tl.exp(s * sm_scale - lse[:, None]), 0.0)
        dp = tl.dot(do, tl.trans(c), input_precision=PRECISION)
        ds = p * (dp - delta[:, None]) * sm_scale
        dq_lat += tl.dot(ds.to(c.dtype), c, input_precision=PRECISION)
        dq_rope += tl.dot(ds.to(c.dtype), k_rope, input_precision=PRECISION)
        # The latent is key and value: dc = P^T dO + dS^T q_lat; d k_rope = dS^T q_rope.
        d_c = tl.dot(tl.trans(p.to(do.dtype)), do, input_precision=PRECISION)
        d_c += tl.dot(tl.trans(ds.to(q_lat.dtype)), q_lat, input_precision=PRECISION)
        d_rope = tl.dot(tl.trans(ds.to(q_rope.dtype)), q_rope, input_precision=PRECISION)
        drow = DKV + b * stride_dkb + safe_idx * stride_dks
        tl.atomic_add(drow[:, None] + r[None, :], d_c, mask=ok[:, None] & (r[None, :] < RANK))
        tl.atomic_add(drow[:, None] + RANK + dr[None, :], d_rope,
                      mask=ok[:, None] & (dr[None, :] < ROPE))
    tl.store(DQ + off_q + r[None, :], dq_lat, mask=lat_ok)
    tl.store(DQ + off_q + RANK + dr[None, :], dq_rope, mask=rope_ok)


def sparse_constexprs(rank: int, rope: int, dtype: torch.dtype) -> dict[str, Any]:
    return {"RANK": rank, "ROPE": rope, "BLOCK_R": triton.next_power_of_2(rank),
            "BLOCK_DR": max(16, triton.next_power_of_2(rope)), "BLOCK_H": BLOCK_H, "BLOCK_K": BLOCK_K,
            "PRECISION": "ieee" if dtype == torch.float32 else "tf32"}


def sparse_fwd_constexprs(rank: int, rope: int, dtype: torch.dtype, fp8: bool = False
                          ) -> dict[str, Any]:
    """The forward's: the shared ones, and whether the cache holds FlashMLA's fp8 records (in
    blocks of QBLOCK values, one block under 128)."""
    return {**sparse_constexprs(rank, rope, dtype), "FP8": fp8,
            "QBLOCK": record_qblock(rank)}


def sparse_warps(rank: int) -> int:
    return 8 if triton.next_power_of_2(rank) >= 512 else 4


def fwd_launches(q: torch.Tensor, kv: torch.Tensor, idx: torch.Tensor, scale: float, rank: int,
                 splits: int = 1, fp8: bool = False
                 ) -> tuple[list[Launch], torch.Tensor, torch.Tensor]:
    """The forward's launches and the (o, lse) they fill: (B, H, T, R) and (B, H, T) with one
    split; with several, the merge's (B T, H, R) and (B T, H), which :func:`launch_fwd` lays out."""
    b, heads, t, width = q.shape
    topk = idx.shape[-1]
    split_len = triton.cdiv(triton.cdiv(topk, splits), BLOCK_K) * BLOCK_K
    splits = triton.cdiv(topk, split_len) if topk else 1  # no split left empty by the rounding
    if splits == 1:
        o = torch.empty(b, heads, t, rank, dtype=q.dtype, device=q.device)
        lse = torch.empty(b, heads, t, dtype=torch.float32, device=q.device)
        o_strides, l_strides = (*o.stride()[:3], 0), (*lse.stride(), 0)
    else:  # (B, T, H, splits, ...): the merge reads it as (B T, H, splits, ...)
        o = torch.empty(b, t, heads, splits, rank, dtype=torch.float32, device=q.device)
        lse = torch.empty(b, t, heads, splits, dtype=torch.float32, device=q.device)
        o_strides = (o.stride(0), o.stride(2), o.stride(1), o.stride(3))
        l_strides = (lse.stride(0), lse.stride(2), lse.stride(1), lse.stride(3))
    fwd = Launch(
        sparse_mla_fwd, (triton.cdiv(heads, BLOCK_H) * splits * t, b),
        (q, kv, idx, o, lse, scale * 1.4426950408889634, heads, kv.shape[1], topk, splits, split_len,
         q.stride(0), q.stride(1), q.stride(2), kv.stride(0), kv.stride(1), idx.stride(0),
         idx.stride(1), *o_strides, *l_strides),
        sparse_fwd_constexprs(rank, width - rank, q.dtype, fp8), sparse_warps(rank))
    if splits == 1:
        return [fwd], o, lse
    merge, out, merged = merge_launch(o.flatten(0, 1), lse.flatten(0, 1), q.dtype)
    return [fwd, merge], out, merged


def launch_fwd(q: torch.Tensor, kv: torch.Tensor, idx: torch.Tensor, scale: float, rank: int,
               splits: int = 1, fp8: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """q (B, H, T, D) contiguous, kv (B, S, D) (``fp8``: FlashMLA's records, (B, S, bytes)
    uint8), idx (B, T, K) int32 on q's device -> o (B, H, T, R), lse fp32; ``splits`` > 1
    splits each token's top-k list and merges the parts by their LSEs."""
    b, heads, t, _ = q.shape
    launches, o, lse = fwd_launches(q, kv, idx, scale, rank, splits, fp8)
    run_all(launches)
    if len(launches) == 1:
        return o, lse
    return (o.view(b, t, heads, rank).transpose(1, 2).contiguous(),
            lse.view(b, t, heads).transpose(1, 2).contiguous())


def bwd_launch(q: torch.Tensor, kv: torch.Tensor, idx: torch.Tensor, o: torch.Tensor,
               lse: torch.Tensor, do: torch.Tensor, scale: float, rank: int
               ) -> tuple[Launch, torch.Tensor, torch.Tensor]:
    """The backward's launch and the (dq (B, H, T, D), dkv (B, S, D)) fp32 it fills."""
    b, heads, t, width = q.shape
    delta = (do.float() * o.float()).sum(-1).contiguous()  # (B, H, T)
    do_full = torch.zeros_like(q)
    do_full[..., :rank] = do  # dO in q's layout, so one set of strides serves both
    dq = torch.empty(q.shape, dtype=torch.float32, device=q.device)
    dkv = torch.zeros(kv.shape, dtype=torch.float32, device=kv.device)
    launch = Launch(
        sparse_mla_bwd, (triton.cdiv(heads, BLOCK_H) * t, b),
        (q, kv, idx, do_full, lse, delta, dq, dkv, scale, heads, kv.shape[1], idx.shape[-1],
         q.stride(0), q.stride(1), q.stride(2), kv.stride(0), kv.stride(1), idx.stride(0),
         idx.stride(1), lse.stride(0), lse.stride(1), dkv.stride(0), dkv.stride(1)),
        sparse_constexprs(rank, width - rank, q.dtype), sparse_warps(rank))
    return launch, dq, dkv


def launch_bwd(q: torch.Tensor, kv: torch.Tensor, idx: torch.Tensor, o: torch.Tensor,
               lse: torch.Tensor, do: torch.Tensor, scale: float, rank: int
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradients (dq (B, H, T, D), dkv (B, S, D) fp32) of sparse_mla_fwd's o."""
    launch, dq, dkv = bwd_launch(q, kv, idx, o, lse, do, scale, rank)
    launch.run()
    return dq, dkv


__all__ = ["BLOCK_H", "BLOCK_K", "MASKED", "bwd_launch", "fwd_launches", "launch_bwd", "launch_fwd",
           "sparse_constexprs", "sparse_fwd_constexprs", "sparse_mla_bwd", "sparse_mla_fwd",
           "sparse_warps"]
