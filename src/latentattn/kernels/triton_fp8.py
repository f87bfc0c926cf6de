"""FP8 in Triton, decoded in software: e4m3 bytes (sm_80 has no e4m3 type, and Triton cannot
compile one for it; vLLM's Triton indexer does the same) and FlashMLA's fp8 latent record
(:func:`latentattn.cache.fp8.pack_record`), shared by the decode and sparse kernels. Importing
this module needs Triton."""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def e4m3_to_fp32(bits):
    """Decode e4m3 (fn) bytes in software, as vLLM's Triton indexer does: Triton cannot compile
    fp8 e4m3 types for sm_80. The NaN code decodes to +-480, as there."""
    b = bits.to(tl.int32)
    sign = (b >> 7) & 1
    exp = (b >> 3) & 15
    man = (b & 7).to(tl.float32) * 0.125
    val = tl.where(exp == 0, man * 0.015625, (1.0 + man) * tl.exp2((exp - 7).to(tl.float32)))
    return tl.where(sign == 1, -val, val)


@triton.jit
def load_records(row, ok, r, dr, RANK: tl.constexpr, ROPE: tl.constexpr, BLOCK_R: tl.constexpr,
                 QBLOCK: tl.constexpr, ROWS: tl.constexpr):
    """A tile of ROWS FlashMLA records at the byte pointers ``row`` (valid where ``ok``): (c, k_rope)
    in fp32. A record is RANK e4m3 bytes, one fp32 scale per QBLOCK values (one in all under
    128), then ROPE bf16 values; the scales and the rope part are read through typed pointers
    into the row."""
    scales = (RANK + QBLOCK - 1) // QBLOCK
    c8 = tl.load(row[:, None] + r[None, :], mask=ok[:, None] & (r[None, :] < RANK), other=0)
    blk = tl.arange(0, BLOCK_R // QBLOCK)
    sc = tl.load((row + RANK).to(tl.pointer_type(tl.float32))[:, None] + blk[None, :],
                 mask=ok[:, None] & (blk[None, :] < scales), other=0.0)
    c = tl.reshape(tl.reshape(e4m3_to_fp32(c8), (ROWS, BLOCK_R // QBLOCK, QBLOCK)) * sc[:, :, None],
                   (ROWS, BLOCK_R))
    rope_row = (row + RANK + 4 * scales).to(tl.pointer_type(tl.bfloat16))
    k_rope = tl.load(rope_row[:, None] + dr[None, :], mask=ok[:, None] & (dr[None, :] < ROPE), other=0.0)
    return c, k_rope.to(tl.float32)


def record_qblock(rank: int) -> int:
    """QBLOCK for :func:`load_records`: the 128-value scale blocks, or for a latent under 128 its
    one block rounded up to the power of two that tiles it."""
    return min(128, triton.next_power_of_2(rank))


__all__ = ["e4m3_to_fp32", "load_records", "record_qblock"]
