"""FP8 (e4m3) block quantisation, as DeepSeek-V3.2 stores indexer keys and FlashMLA latents.

One fp32 scale per block of 128 values (fewer when the vector is shorter), scale = amax / 448
rounded UP to a power of two (DeepSeek-V3.2-Exp ``inference/kernel.py`` act_quant with
scale_fmt "ue8m0"), so the division is exact and no value overflows e4m3's max of 448.
Values are kept as uint8 so that index_put works on every device.
"""

from __future__ import annotations

import torch

from latentattn.errors import ConfigError

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


# ---------------------------------------------------------------------------- FlashMLA's record
# One token of MLA's latent cache as FlashMLA stores it in fp8 (FlashMLA tests/quant.py):
# [R e4m3 bytes | R / 128 fp32 scales | Dr bf16 rope values], 512 + 16 + 128 = 656 bytes
# at DeepSeek's 512 + 64, one uint8 row, so a page of them is one contiguous block of bytes.
def check_record_rank(rank: int) -> None:
    """The ranks a record holds: whole 128-value blocks (or one block under 128), and a latent
    byte count that keeps the fp32 scales after it 4-byte aligned."""
    if rank % block_size(rank) or rank % 4:
        raise ConfigError(f"the fp8 latent record quantises blocks of 128 values: kv_lora_rank "
                          f"{rank} must be a multiple of 128 (or a multiple of 4 below 128)")


def record_bytes(rank: int, rope_dim: int) -> int:
    """Bytes of one token's record: 656 at R 512, Dr 64."""
    return bytes_per_vector(rank) + 2 * rope_dim


def pack_record(latent: torch.Tensor, rank: int) -> torch.Tensor:
    """latent (..., R + Dr) = [c | k_rope] -> records (..., record_bytes) uint8."""
    c8, scales = quantize_e4m3(latent[..., :rank])
    rope = latent[..., rank:].to(torch.bfloat16).contiguous()
    return torch.cat((c8, scales.contiguous().view(torch.uint8), rope.view(torch.uint8)), dim=-1)


def unpack_record(records: torch.Tensor, rank: int,
                  dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """records (..., record_bytes) uint8 -> the dequantised latent (..., R + Dr) in ``dtype``."""
    c8, scales, rope = record_parts(records, rank)
    return torch.cat((dequantize_e4m3(c8, scales, dtype), rope.to(dtype)), dim=-1)


def record_parts(records: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(e4m3 bytes (..., R), scales (..., R / 128) fp32, rope (..., Dr) bf16) as stored."""
    nb = rank // block_size(rank)
    return (records[..., :rank], records[..., rank: rank + 4 * nb].contiguous().view(torch.float32),
            records[..., rank + 4 * nb:].contiguous().view(torch.bfloat16))
