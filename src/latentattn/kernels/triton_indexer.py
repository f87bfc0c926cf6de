"""Triton kernel for the lightning indexer's logits (:mod:`latentattn.kernels.indexer_logits`
documents the maths and checks the inputs). Importing this module needs Triton."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from latentattn.kernels.triton_fp8 import e4m3_to_fp32
from latentattn.kernels.triton_launch import Launch

BLOCK_S = 32  # keys per program


@triton.jit
def indexer_logits_kernel(Q, W, K, KSCALE, POS, OUT, scale, heads, seq_kv,
                          stride_qb, stride_qt, stride_qh, stride_wb, stride_wt,
                          stride_kb, stride_ks, stride_sb, stride_ss, stride_pb, stride_ob, stride_ot,
                          DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_HI: tl.constexpr,
                          BLOCK_S: tl.constexpr, FP8: tl.constexpr, QBLOCK: tl.constexpr):
    """One (query token, block of keys, sequence): sum_h w[h] * relu(q[h] . k[s]) * scale, -inf
    for keys past the token's position."""
    # (token, key block) on grid axis 0, key blocks fastest: a prefill may pass 65,535 tokens.
    # Offsets in int64: t * stride_ot = t * S passes 2^31 from T = S = 46,341.
    blocks = tl.cdiv(seq_kv, BLOCK_S)
    t = (tl.program_id(0) // blocks).to(tl.int64)
    s = (tl.program_id(0) % blocks) * BLOCK_S + tl.arange(0, BLOCK_S)
    b = tl.program_id(1).to(tl.int64)
    h = tl.arange(0, BLOCK_HI).to(tl.int64)
    d = tl.arange(0, BLOCK_D)
    h_ok = h < heads
    pos = tl.load(POS + b * stride_pb + t)
    s_ok = s < seq_kv
    q = tl.load(Q + b * stride_qb + t * stride_qt + h[:, None] * stride_qh + d[None, :],
                mask=h_ok[:, None] & (d[None, :] < DIM), other=0.0)
    w = tl.load(W + b * stride_wb + t * stride_wt + h, mask=h_ok, other=0.0)
    k_ptr = K + b * stride_kb + s[:, None].to(tl.int64) * stride_ks + d[None, :]
    k_ok = s_ok[:, None] & (d[None, :] < DIM)
    if FP8:
        k = e4m3_to_fp32(tl.load(k_ptr, mask=k_ok, other=0))
        sc = tl.load(KSCALE + b * stride_sb + s[:, None].to(tl.int64) * stride_ss
                     + d[None, :] // QBLOCK, mask=k_ok, other=0.0)
        k = k * sc
    else:
        k = tl.load(k_ptr, mask=k_ok, other=0.0).to(tl.float32)
    # fp32-accurate products, as prefill's select_topk scores the same keys in fp32: with bf16
    # products (vLLM's choice) decode and prefill would rank near-ties differently and select
    # other keys. 3xTF32 (each operand split into two TF32 parts, three tensor-core products)
    # keeps fp32's accuracy; plain fp32 FMAs ("ieee") spill ~5 KB a thread on sm_90 at 64 x 128
    # (`latentattn kernels compile`). The interpreter computes it in exact fp32.
    logits = tl.dot(q, tl.trans(k), input_precision="tf32x3")  # (heads, keys)
    score = tl.sum(tl.maximum(logits, 0.0) * w[:, None], axis=0) * scale
    score = tl.where(s <= pos, score, float("-inf"))
    tl.store(OUT + b * stride_ob + t * stride_ot + s, score, mask=s_ok)


INDEXER_WARPS = 4


def indexer_launch(q: torch.Tensor, w: torch.Tensor, k: torch.Tensor, k_scale: torch.Tensor | None,
                   positions: torch.Tensor, scale: float) -> tuple[Launch, torch.Tensor]:
    """The launch and the (B, T, S) fp32 logits it fills; ``positions`` move to q's device."""
    b, t, heads, dim = q.shape
    seq = k.shape[1]
    out = torch.empty(b, t, seq, dtype=torch.float32, device=q.device)
    fp8 = k_scale is not None
    scales = k_scale if k_scale is not None else w  # unused without fp8
    positions = positions.to(device=q.device, dtype=torch.int32).contiguous()
    launch = Launch(
        indexer_logits_kernel, (t * triton.cdiv(seq, BLOCK_S), b),
        (q, w, k, scales, positions, out, scale, heads, seq,
         q.stride(0), q.stride(1), q.stride(2), w.stride(0), w.stride(1), k.stride(0), k.stride(1),
         scales.stride(0) if fp8 else 0, scales.stride(1) if fp8 else 0, positions.stride(0),
         out.stride(0), out.stride(1)),
        {"DIM": dim, "BLOCK_D": max(16, triton.next_power_of_2(dim)),
         "BLOCK_HI": max(16, triton.next_power_of_2(heads)), "BLOCK_S": BLOCK_S, "FP8": fp8,
         "QBLOCK": dim // k_scale.shape[-1] if k_scale is not None else dim}, INDEXER_WARPS)
    return launch, out


def launch_indexer(q: torch.Tensor, w: torch.Tensor, k: torch.Tensor, k_scale: torch.Tensor | None,
                   positions: torch.Tensor, scale: float) -> torch.Tensor:
    launch, out = indexer_launch(q, w, k, k_scale, positions, scale)
    launch.run()
    return out


__all__ = ["BLOCK_S", "INDEXER_WARPS", "indexer_launch", "indexer_logits_kernel", "launch_indexer"]
