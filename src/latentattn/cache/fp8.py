"""FP8 (e4m3) block quantisation, as DeepSeek-V3.2 stores indexer keys and FlashMLA latents.

One fp32 scale per block of 128 values (fewer when the vector is shorter), scale = amax / 448
rounded UP to a power of two (DeepSeek-V3.2-Exp ``inference/kernel.py`` act_quant with
scale_fmt "ue8m0"), so the division is exact and no value overflows e4m3's max of 448.
Values are kept as uint8 so that index_put works on every device.
"""

from __future__ import annotations

import torch

E4M3_MAX = 448.0


def block_size(dim: int) -> int:
    return min(128, dim)


def quantize_e4m3(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x (..., D) -> values (..., D) uint8 holding e4m3 bits, scales (..., D / block) fp32."""
    blk = block_size(x.shape[-1])
    xb = x.float().unflatten(-1, (-1, blk))
    amax = xb.abs().amax(dim=-1, keepdim=True).clamp(min=1e-10)
    scale = torch.exp2(torch.ceil(torch.log2(amax / E4M3_MAX)))
    q = (xb / scale).to(torch.float8_e4m3fn).flatten(-2)
    return q.view(torch.uint8), scale.squeeze(-1)


def dequantize_e4m3(
    values: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """Inverse of quantize_e4m3 (up to e4m3 rounding): (..., D) in dtype."""
    blk = values.shape[-1] // scales.shape[-1]
    x = values.view(torch.float8_e4m3fn).float().unflatten(-1, (-1, blk)) * scales.unsqueeze(-1)
    return x.flatten(-2).to(dtype)


def bytes_per_vector(dim: int) -> int:
    """e4m3 bytes plus fp32 scales: 132 for DeepSeek-V3.2's 128-dim indexer key."""
    return dim + 4 * (dim // block_size(dim))
