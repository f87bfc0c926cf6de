"""Preallocated KV caches with per-row lengths.

Three forms, one per attention form (DeepSeek-V2 section 2.1.4; facts file section 6):

* ``DenseKV`` with (n_kv_heads, head_dim) for MHA/MQA/GQA: 2 * n_kv * head_dim values per token.
* ``DenseKV`` with (n_heads, d_qk, d_v) for naive MLA: the decompressed K/V, H * (d_qk + d_v).
* ``LatentKV`` for absorbed MLA: the RMSNorm'd latent c and the rotated shared rope key,
  d_c + d_r values per token, stored side by side so attention reads one (S, d_c + d_r) key.

Every buffer is laid out (B, S, ...) with S the capacity; ``KVCache.lengths`` (B,) says how many
positions of each row hold real tokens, so rows of a batch may have different lengths.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from latentattn.cache.fp8 import (
    block_size,
    dequantize_e4m3,
    latent_row,
    pack_record,
    quantize_e4m3,
    unpack_record,
)
from latentattn.errors import CacheOverflowError


@dataclass(frozen=True)
class Step:
    """Where the T tokens of one forward call go, computed once and shared by every layer.

    positions: (B, T) absolute position of each new token (row start + t).
    valid: (B, T) bool, False for right-padding of a ragged batch; None when all are real.
    kv_len: how many cache positions attention reads (the longest row after this step).
    mask: (B, 1, T, kv_len) bool, True where query t may see key j (j <= positions[b, t]);
        None when the step is a fresh prefill, whose mask is plain causal over the T tokens.
    """

    positions: torch.Tensor
    valid: torch.Tensor | None
    kv_len: int
    mask: torch.Tensor | None

    @property
    def causal(self) -> bool:
        return self.mask is None


def fresh_step(batch: int, seq_len: int, device: torch.device) -> Step:
    """The step of a forward with no cache: positions 0..T-1 in every row, causal."""
    positions = torch.arange(seq_len, device=device).expand(batch, seq_len)
    return Step(positions=positions, valid=None, kv_len=seq_len, mask=None)


class LayerCache:
    """One layer's buffers. Subclasses define what a token stores."""

    buffers: tuple[torch.Tensor, ...]

    def write(self, step: Step, *values: torch.Tensor) -> None:
        """Store values[i] (B, T, ...) at step.positions, skipping padded tokens."""
        rows = torch.arange(step.positions.shape[0], device=step.positions.device)[:, None]
        rows = rows.expand_as(step.positions)
        if step.valid is None:
            for buf, val in zip(self.buffers, values, strict=True):
                buf[rows, step.positions] = val.to(buf.dtype)
        else:
            r, p = rows[step.valid], step.positions[step.valid]
            for buf, val in zip(self.buffers, values, strict=True):
                buf[r, p] = val[step.valid].to(buf.dtype)

    def views(self, step: Step) -> tuple[torch.Tensor, ...]:
        """The first step.kv_len positions of each buffer as stored, (B, kv_len, ...) views."""
        return tuple(buf[:, : step.kv_len] for buf in self.buffers)

    def read(self, step: Step, dtype: torch.dtype | None = None) -> tuple[torch.Tensor, ...]:
        """The first step.kv_len positions of each buffer, (B, kv_len, ...), cast to ``dtype``:
        the attention's compute dtype (None: as stored). A cache may be kept in another dtype
        than the model's (bf16 for an fp32 model halves it; writes cast to the buffer's dtype),
        and attention needs q, k and v in one dtype. Views when the dtypes agree."""
        return tuple(v if dtype is None else v.to(dtype) for v in self.views(step))

    @property
    def nbytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in self.buffers)


class DenseKV(LayerCache):
    """Per-head keys (B, S, H, dk) and values (B, S, H, dv)."""

    def __init__(
        self, batch: int, capacity: int, n_heads: int, k_dim: int, v_dim: int,
        dtype: torch.dtype, device: torch.device | str | None = None,
    ) -> None:
        self.k = torch.zeros(batch, capacity, n_heads, k_dim, dtype=dtype, device=device)
        self.v = torch.zeros(batch, capacity, n_heads, v_dim, dtype=dtype, device=device)
        self.buffers = (self.k, self.v)


class LatentKV(LayerCache):
    """MLA's latent cache (B, S, d_c + d_r): [normalised c | rotated k_rope] per token."""

    def __init__(
        self, batch: int, capacity: int, kv_lora_rank: int, rope_dim: int,
        dtype: torch.dtype, device: torch.device | str | None = None,
    ) -> None:
        self.kv_lora_rank = kv_lora_rank
        self.kv = torch.zeros(batch, capacity, kv_lora_rank + rope_dim, dtype=dtype, device=device)
        self.buffers = (self.kv,)


class FP8LatentKV(LayerCache):
    """MLA's latent cache in FlashMLA's fp8 record, one uint8 row per token
    (:func:`latentattn.cache.fp8.pack_record`): c as e4m3 bytes, one fp32 scale per 128 values,
    then the rotated k_rope in bf16 (RoPE parts are position-sensitive, so DeepSeek and FlashMLA
    do not quantise them): 512 + 4 x 4 + 64 x 2 = 656 bytes per token at DeepSeek's 512 + 64,
    against 1,152 in bf16. ``read`` dequantises to one (B, S, d_c + d_r) latent, so every
    attention form reads it unchanged; the Triton decode reads the records in place."""

    def __init__(
        self, batch: int, capacity: int, kv_lora_rank: int, rope_dim: int,
        device: torch.device | str | None = None,
    ) -> None:
        self.kv_lora_rank = kv_lora_rank
        width, dtype = latent_row(kv_lora_rank, rope_dim, torch.uint8, fp8=True)
        self.records = torch.zeros(batch, capacity, width, dtype=dtype, device=device)
        self.buffers = (self.records,)

    def write(self, step: Step, *values: torch.Tensor) -> None:
        (latent,) = values
        super().write(step, pack_record(latent, self.kv_lora_rank))

    def read(self, step: Step, dtype: torch.dtype | None = None) -> tuple[torch.Tensor, ...]:
        (records,) = self.views(step)
        return (unpack_record(records, self.kv_lora_rank, dtype or torch.bfloat16),)


class IndexedLatentKV(LatentKV):
    """DSA's cache: the MLA latent plus one indexer key per token (DeepSeek-V3.2).

    Indexer keys are stored in the cache dtype, or as e4m3 + one fp32 scale per 128 values
    (``fp8=True``). ``read`` returns them dequantised to fp32 for scoring. With
    ``latent_fp8`` the latent is FlashMLA's fp8 record (``kv`` then holds uint8 records, as
    :class:`FP8LatentKV` does), which ``read`` dequantises and the sparse kernel reads in place.
    """

    def __init__(
        self, batch: int, capacity: int, kv_lora_rank: int, rope_dim: int, index_head_dim: int,
        dtype: torch.dtype, device: torch.device | str | None = None, fp8: bool = False,
        latent_fp8: bool = False,
    ) -> None:
        self.kv_lora_rank = kv_lora_rank
        self.latent_fp8 = latent_fp8
        width, kv_dtype = latent_row(kv_lora_rank, rope_dim, dtype, latent_fp8)
        self.kv = torch.zeros(batch, capacity, width, dtype=kv_dtype, device=device)
        self.fp8 = fp8
        if fp8:
            blocks = index_head_dim // block_size(index_head_dim)
            self.index_k = torch.zeros(batch, capacity, index_head_dim, dtype=torch.uint8, device=device)
            self.index_scale = torch.ones(batch, capacity, blocks, dtype=torch.float32, device=device)
            self.buffers = (self.kv, self.index_k, self.index_scale)
        else:
            self.index_k = torch.zeros(batch, capacity, index_head_dim, dtype=dtype, device=device)
            self.buffers = (self.kv, self.index_k)

    def write(self, step: Step, *values: torch.Tensor) -> None:
        latent, index_k = values
        if self.latent_fp8:
            latent = pack_record(latent, self.kv_lora_rank)
        if self.fp8:
            super().write(step, latent, *quantize_e4m3(index_k))
        else:
            super().write(step, latent, index_k)

    def read(self, step: Step, dtype: torch.dtype | None = None) -> tuple[torch.Tensor, ...]:
        """latent (B, S, d_c + d_r) in ``dtype`` (None: as stored), index keys (B, S, d_I) fp32
        whatever ``dtype`` is: the indexer scores in fp32."""
        parts = self.views(step)
        if self.latent_fp8:
            latent = unpack_record(parts[0], self.kv_lora_rank, dtype or torch.bfloat16)
        else:
            latent = parts[0] if dtype is None else parts[0].to(dtype)
        if self.fp8:
            return latent, dequantize_e4m3(parts[1], parts[2])
        return latent, parts[1].float()


class KVCache:
    """All layers' caches plus the per-row lengths they share."""

    def __init__(self, layers: list[LayerCache], batch: int, capacity: int,
                 device: torch.device | str | None = None) -> None:
        self.layers = layers
        self.batch = batch
        self.capacity = capacity
        self.lengths = torch.zeros(batch, dtype=torch.long, device=device)

    def __getitem__(self, layer: int) -> LayerCache:
        return self.layers[layer]

    def __len__(self) -> int:
        return len(self.layers)

    @property
    def nbytes(self) -> int:
        """Bytes allocated by every layer's buffers (not a formula: what torch holds)."""
        return sum(layer.nbytes for layer in self.layers)

    @property
    def bytes_per_token(self) -> float:
        """Allocated bytes per cached token over all layers."""
        return self.nbytes / (self.batch * self.capacity)

    @property
    def bytes_per_token_per_layer(self) -> float:
        return self.bytes_per_token / len(self.layers)

    def reset(self) -> None:
        """Forget every row's tokens; the buffers are kept and overwritten by the next writes."""
        self.lengths.zero_()

    def step(self, seq_len: int, input_lengths: torch.Tensor | None = None) -> Step:
        """Plan a forward of seq_len new tokens per row (input_lengths (B,) of them real)."""
        device = self.lengths.device
        t = torch.arange(seq_len, device=device)
        new = (
            torch.full_like(self.lengths, seq_len) if input_lengths is None
            else input_lengths.to(device=device, dtype=torch.long)
        )
        end = self.lengths + new
        if bool((end > self.capacity).any()):
            row = int(torch.argmax(end).item())
            raise CacheOverflowError(
                f"KV cache overflow: row {row} would hold {int(end[row])} tokens but the cache "
                f"was allocated for {self.capacity}"
            )
        positions = self.lengths[:, None] + t  # (B, T)
        valid = None if input_lengths is None else t[None, :] < new[:, None]
        if valid is not None and bool(valid.all()):
            valid = None
        if valid is not None:
            # Padded tokens are never written; park their positions on a legal index.
            positions = torch.where(valid, positions, positions.clamp(max=self.capacity - 1))
        kv_len = int(end.max().item())
        if valid is None and not bool(self.lengths.any()):
            return Step(positions=positions, valid=None, kv_len=kv_len, mask=None)
        j = torch.arange(kv_len, device=device)
        mask = (j[None, None, :] <= positions[:, :, None]).unsqueeze(1)  # (B, 1, T, kv_len)
        return Step(positions=positions, valid=valid, kv_len=kv_len, mask=mask)

    def advance(self, seq_len: int, input_lengths: torch.Tensor | None = None) -> None:
        """Count the tokens of the step just run as cached."""
        if input_lengths is None:
            self.lengths += seq_len
        else:
            self.lengths += input_lengths.to(device=self.lengths.device, dtype=torch.long)
