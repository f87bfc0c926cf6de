"""Triton kernels for absorbed MLA decode (:mod:`latentattn.kernels.mla_decode` documents the
maths and the layout; that module checks the inputs and holds the PyTorch reference). Imported
only when a Triton kernel runs or compiles: importing this module needs Triton."""

from __future__ import annotations

from typing import Any

import torch
import triton
import triton.language as tl

from latentattn.kernels.mla_decode import BLOCK_H, BLOCK_N, unit_stride
from latentattn.kernels.triton_fp8 import load_records, record_qblock
from latentattn.kernels.triton_launch import Launch, run_all

LN2 = 0.6931471805599453
LOG2E = 1.4426950408889634


@triton.jit
def mla_decode_stage1(Q, KV, LENGTHS, TABLE, O_PART, LSE_PART, sm_scale_log2, heads,
                      split_len, stride_qb, stride_qh, stride_kvp, stride_kvn, stride_tb,
                      stride_ob, stride_oh, stride_os, stride_lb, stride_lh,
                      RANK: tl.constexpr, ROPE: tl.constexpr, BLOCK_R: tl.constexpr,
                      BLOCK_DR: tl.constexpr, PAGE: tl.constexpr, PAGED: tl.constexpr,
                      BLOCK_H: tl.constexpr, BLOCK_N: tl.constexpr, PRECISION: tl.constexpr,
                      FP8: tl.constexpr, QBLOCK: tl.constexpr):
    """One (head block, split, sequence): online softmax over the split's cached rows. With
    FP8, each KV row is FlashMLA's record (uint8): RANK e4m3 bytes, one fp32 scale per QBLOCK
    values, then the bf16 rope part; the latent is decoded in software (sm_80 has no e4m3)."""
    # Head blocks on the fastest grid axis: the blocks of one (sequence, split) run side by side
    # and read the same latent tiles, so the latent comes from HBM about once, not once a block.
    # Every offset in int64: a program id times a stride passes 2^31 elements at batch 128 x
    # 128k tokens (contiguous caches) or in a large paged pool.
    hb = tl.program_id(0)
    split = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    length = tl.load(LENGTHS + b)
    start = split * split_len
    end = tl.minimum(start + split_len, length)
    h = (hb * BLOCK_H + tl.arange(0, BLOCK_H)).to(tl.int64)
    r = tl.arange(0, BLOCK_R)
    dr = tl.arange(0, BLOCK_DR)
    h_ok = h < heads
    q_row = Q + b * stride_qb + h[:, None] * stride_qh
    q_lat = tl.load(q_row + r[None, :], mask=h_ok[:, None] & (r[None, :] < RANK), other=0.0)
    q_rope = tl.load(q_row + RANK + dr[None, :], mask=h_ok[:, None] & (dr[None, :] < ROPE), other=0.0)
    m = tl.full((BLOCK_H,), float("-inf"), tl.float32)
    denom = tl.zeros((BLOCK_H,), tl.float32)
    acc = tl.zeros((BLOCK_H, BLOCK_R), tl.float32)
    for n0 in range(start, end, BLOCK_N):
        n = n0 + tl.arange(0, BLOCK_N)
        n_ok = n < end
        if PAGED:
            page = tl.load(TABLE + b * stride_tb + n // PAGE, mask=n_ok, other=0)
            row = KV + page.to(tl.int64) * stride_kvp + (n % PAGE).to(tl.int64) * stride_kvn
        else:
            row = KV + b * stride_kvp + n.to(tl.int64) * stride_kvn
        c_ok = n_ok[:, None] & (r[None, :] < RANK)
        if FP8:
            c, k_rope = load_records(row, n_ok, r, dr, RANK, ROPE, BLOCK_R, QBLOCK, BLOCK_N)
            c, k_rope = c.to(q_lat.dtype), k_rope.to(q_lat.dtype)
        else:
            c = tl.load(row[:, None] + r[None, :], mask=c_ok, other=0.0)
            k_rope = tl.load(row[:, None] + RANK + dr[None, :],
                             mask=n_ok[:, None] & (dr[None, :] < ROPE), other=0.0)
        # The 512 + 64 split: two dot products summed; scores in base 2 for exp2.
        s = tl.dot(q_lat, tl.trans(c), input_precision=PRECISION)
        s += tl.dot(q_rope, tl.trans(k_rope), input_precision=PRECISION)
        s = tl.where(n_ok[None, :], s * sm_scale_log2, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, axis=1))
        alpha = tl.exp2(m - m_new)
        p = tl.exp2(s - m_new[:, None])
        denom = denom * alpha + tl.sum(p, axis=1)
        # The latent tile, loaded once as the key, is the value.
        acc = acc * alpha[:, None] + tl.dot(p.to(c.dtype), c, input_precision=PRECISION)
        m = m_new
    has = denom > 0
    safe = tl.where(has, denom, 1.0)
    out = acc / safe[:, None]
    lse = tl.where(has, (m + tl.log2(safe)) * 0.6931471805599453, float("-inf"))
    o_ptr = O_PART + b * stride_ob + h[:, None] * stride_oh + split * stride_os + r[None, :]
    # One split: O_PART is the output itself, in q's dtype (no merge kernel); else fp32 partials.
    tl.store(o_ptr, out.to(O_PART.dtype.element_ty), mask=h_ok[:, None] & (r[None, :] < RANK))
    tl.store(LSE_PART + b * stride_lb + h * stride_lh + split, lse, mask=h_ok)


@triton.jit
def mla_decode_stage2(O_PART, LSE_PART, OUT, LSE, splits, heads,
                      stride_ob, stride_oh, stride_os, stride_lb, stride_lh, stride_outb, stride_outh,
                      RANK: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_S: tl.constexpr):
    """One (sequence, head): merge the splits' partial outputs by their log-sum-exps."""
    b = tl.program_id(0).to(tl.int64)  # N = B x T sequences at a split sparse prefill
    h = tl.program_id(1).to(tl.int64)
    s = tl.arange(0, BLOCK_S)
    r = tl.arange(0, BLOCK_R)
    lse = tl.load(LSE_PART + b * stride_lb + h * stride_lh + s, mask=s < splits, other=float("-inf"))
    top = tl.max(lse, axis=0)
    top = tl.where(top > float("-inf"), top, 0.0)  # every split empty: no -inf - -inf
    w = tl.where(lse > float("-inf"), tl.exp(lse - top), 0.0)  # an empty split weighs 0
    total = tl.sum(w, axis=0)
    part = tl.load(O_PART + b * stride_ob + h * stride_oh + s[:, None] * stride_os
                   + r[None, :], mask=(s[:, None] < splits) & (r[None, :] < RANK) & (w[:, None] > 0),
                   other=0.0)
    # Every split empty (sparse attention with no valid index): o = 0 and LSE -inf, not NaN.
    has = total > 0
    out = tl.sum(part * w[:, None], axis=0) / tl.where(has, total, 1.0)
    tl.store(OUT + b * stride_outb + h * stride_outh + r, out.to(OUT.dtype.element_ty),
             mask=r < RANK)
    tl.store(LSE + b * heads + h, tl.where(has, top + tl.log(tl.where(has, total, 1.0)), float("-inf")))


def decode_constexprs(rank: int, rope: int, page: int, paged: bool, dtype: torch.dtype,
                      fp8: bool = False) -> dict[str, Any]:
    """The compile-time constants of stage 1 for one cache shape (shared with kernels compile);
    ``dtype``: the queries' (the compute dtype)."""
    return {"RANK": rank, "ROPE": rope, "BLOCK_R": triton.next_power_of_2(rank),
            "BLOCK_DR": max(16, triton.next_power_of_2(rope)), "PAGE": page, "PAGED": paged,
            "BLOCK_H": BLOCK_H, "BLOCK_N": BLOCK_N,
            # fp32 caches: exact fp32 products (TF32 would lose 13 mantissa bits).
            "PRECISION": "ieee" if dtype == torch.float32 else "tf32",
            # fp8: blocks of 128 values (one for a latent under 128, a power of two here).
            "FP8": fp8, "QBLOCK": record_qblock(rank)}


DECODE_STAGES = 2  # stage 1's pipelining depth (the tile loop loads each latent tile once)
MERGE_WARPS = 4  # stage 2: one (sequence, head) a program, a few splits of R values


def decode_warps(rank: int) -> int:
    """Warps of stage 1: 8 once the latent tile is 512 wide (FlagGems' choice at DeepSeek's
    width; with 4, the fp32 accumulator and the tile alone take over 128 registers a thread)."""
    return 8 if triton.next_power_of_2(rank) >= 512 else 4


def decode_launches(q: torch.Tensor, kv: torch.Tensor, lengths: torch.Tensor, scale: float,
                    rank: int, block_table: torch.Tensor | None, splits: int, max_len: int,
                    fp8: bool = False) -> tuple[list[Launch], torch.Tensor, torch.Tensor]:
    """The launches of one decode call and the (o, lse) they fill: stage 1 alone, writing o in
    q's dtype, for one split; stage 1 into fp32 partials and the merge for several. Arguments as
    in :func:`launch_decode`; the index tensors move to q's device."""
    b, heads, width = q.shape
    rope = width - rank
    paged = block_table is not None
    page = kv.shape[1] if paged else 1
    split_len = triton.cdiv(triton.cdiv(max_len, splits), BLOCK_N) * BLOCK_N
    lengths = lengths.to(device=q.device, dtype=torch.int32)
    table = block_table.to(device=q.device, dtype=torch.int32) if block_table is not None else lengths
    q, kv = q.contiguous(), unit_stride(kv)
    if splits == 1:
        out = torch.empty(b, heads, rank, dtype=q.dtype, device=q.device)
        lse = torch.empty(b, heads, dtype=torch.float32, device=q.device)
        o_part, lse_part = out.unsqueeze(2), lse.unsqueeze(2)
    else:
        o_part = torch.empty(b, heads, splits, rank, dtype=torch.float32, device=q.device)
        lse_part = torch.empty(b, heads, splits, dtype=torch.float32, device=q.device)
    stage1 = Launch(
        mla_decode_stage1, (triton.cdiv(heads, BLOCK_H), splits, b),
        (q, kv, lengths, table, o_part, lse_part, scale * LOG2E, heads, split_len,
         q.stride(0), q.stride(1), kv.stride(0), kv.stride(1), table.stride(0) if paged else 0,
         o_part.stride(0), o_part.stride(1), o_part.stride(2), lse_part.stride(0), lse_part.stride(1)),
        decode_constexprs(rank, rope, page, paged, q.dtype, fp8), decode_warps(rank), DECODE_STAGES)
    if splits == 1:
        return [stage1], out, lse
    merge, out, lse = merge_launch(o_part, lse_part, q.dtype)
    return [stage1, merge], out, lse


def launch_decode(q: torch.Tensor, kv: torch.Tensor, lengths: torch.Tensor, scale: float, rank: int,
                  block_table: torch.Tensor | None, splits: int, max_len: int, fp8: bool = False
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """``kv``: latent rows (B or pages, S, R + Dr) in q's dtype, or with ``fp8`` FlashMLA's
    records (B or pages, S, record bytes) uint8; ``max_len``: the longest of ``lengths`` (the
    splits' size; known on the host, so the launch reads nothing back from the device)."""
    launches, out, lse = decode_launches(q, kv, lengths, scale, rank, block_table, splits, max_len, fp8)
    run_all(launches)
    return out, lse


def merge_launch(o_part: torch.Tensor, lse_part: torch.Tensor, dtype: torch.dtype
                 ) -> tuple[Launch, torch.Tensor, torch.Tensor]:
    """Stage 2's launch and the (o, lse) it fills: o_part (N, H, splits, R) fp32 and lse_part
    (N, H, splits) -> (o (N, H, R) in ``dtype``, lse (N, H) fp32), each split weighted by
    exp(lse_i - max lse)."""
    n, heads, splits, rank = o_part.shape
    out = torch.empty(n, heads, rank, dtype=dtype, device=o_part.device)
    lse = torch.empty(n, heads, dtype=torch.float32, device=o_part.device)
    launch = Launch(
        mla_decode_stage2, (n, heads),
        (o_part, lse_part, out, lse, splits, heads, o_part.stride(0), o_part.stride(1),
         o_part.stride(2), lse_part.stride(0), lse_part.stride(1), out.stride(0), out.stride(1)),
        {"RANK": rank, "BLOCK_R": triton.next_power_of_2(rank),
         "BLOCK_S": max(2, triton.next_power_of_2(splits))}, MERGE_WARPS)
    return launch, out, lse


__all__ = ["DECODE_STAGES", "MERGE_WARPS", "decode_constexprs", "decode_launches", "decode_warps",
           "launch_decode", "merge_launch", "mla_decode_stage1", "mla_decode_stage2"]
