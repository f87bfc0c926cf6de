"""Stores: what a layer keeps of one kind of value per token (the latent, the indexer keys,
per-head keys or values), preallocated, with an honest byte count.

:class:`Store` is the contract a layer cache relies on: ``write(step, values)`` puts the step's
tokens in, ``views(step)`` gives the first ``step.kv_len`` positions of each buffer as stored
(what a kernel reads in place), ``read(step, dtype)`` gives them decoded, and ``nbytes`` is what
torch holds. :class:`TokenStore` is one value per token, made of two small parts:

* a format, how one token's values are encoded: :class:`Plain` (a dtype), :class:`E4M3`
  (DeepSeek-V3.2's fp8 indexer keys: e4m3 bytes and fp32 block scales) or :class:`Record`
  (FlashMLA's 656-byte fp8 latent record);
* a layout, where token n of row b lives: :class:`Rows` (contiguous, (B, S, ...)) or
  ``cache.paged.Pages`` (pages from a pool through a block table).

A store of another shape (a sliding-window ring, compressed entries) is a new layout for a
TokenStore, or a Store subclass of its own.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Protocol

import torch

from latentattn.cache.fp8 import (
    block_size,
    check_record_rank,
    dequantize_e4m3,
    pack_record,
    quantize_e4m3,
    record_bytes,
    unpack_record,
)
from latentattn.cache.step import Step

Part = tuple[tuple[int, ...], torch.dtype]  # one buffer's per-token shape and dtype


class Store(ABC):
    """One named part of a layer's cache. ``fp8``: the values are kept in e4m3 (``read``
    dequantises them); ``block_table``: (B, pages) int32 when the buffers are pages, else None."""

    fp8: bool = False

    @property
    @abstractmethod
    def buffers(self) -> tuple[torch.Tensor, ...]:
        """The preallocated tensors, as stored."""

    @abstractmethod
    def write(self, step: Step, values: torch.Tensor) -> None:
        """Store values (B, T, ...) at step.positions, skipping padded tokens."""

    @abstractmethod
    def views(self, step: Step) -> tuple[torch.Tensor, ...]:
        """Each buffer's first step.kv_len positions of every row, (B, kv_len, ...) as stored."""

    @abstractmethod
    def read(self, step: Step, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The first step.kv_len positions, (B, kv_len, ...), decoded to ``dtype`` (None: the
        format's own). A cache may be kept in another dtype than the model's (bf16 for an fp32
        model halves it), and attention needs q, k and v in one dtype. A view when nothing
        needs converting."""

    @property
    def block_table(self) -> torch.Tensor | None:
        return None

    @property
    def paged(self) -> bool:
        return self.block_table is not None

    @property
    def nbytes(self) -> int:
        """Bytes allocated (not a formula: what torch holds)."""
        return sum(b.numel() * b.element_size() for b in self.buffers)

    @property
    def used_bytes(self) -> int:
        """Bytes holding tokens: ``nbytes`` unless the store takes its room as it grows."""
        return self.nbytes


# ----------------------------------------------------------------------------- formats
class Format(Protocol):
    """How one token's values become the parts a store keeps, and come back."""

    @property
    def fp8(self) -> bool: ...

    def parts(self) -> tuple[Part, ...]: ...

    def encode(self, values: torch.Tensor) -> tuple[torch.Tensor, ...]: ...

    def decode(self, parts: tuple[torch.Tensor, ...], dtype: torch.dtype | None) -> torch.Tensor: ...


class Plain:
    """Values of per-token ``shape`` in ``dtype`` (writes cast to it); read as stored or cast."""

    fp8 = False

    def __init__(self, shape: tuple[int, ...], dtype: torch.dtype) -> None:
        self.shape, self.dtype = shape, dtype

    def parts(self) -> tuple[Part, ...]:
        return ((self.shape, self.dtype),)

    def encode(self, values: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return (values.to(self.dtype),)

    def decode(self, parts: tuple[torch.Tensor, ...], dtype: torch.dtype | None) -> torch.Tensor:
        (values,) = parts
        return values if dtype is None else values.to(dtype)


class E4M3:
    """A ``dim``-vector as e4m3 bytes plus one fp32 scale per 128 values
    (:func:`latentattn.cache.fp8.quantize_e4m3`): how DeepSeek-V3.2 caches its indexer keys,
    ``dim + 4 * dim / 128`` bytes (132 at d_I 128). Read dequantised, fp32 unless asked."""

    fp8 = True

    def __init__(self, dim: int) -> None:
        self.dim = dim

    def parts(self) -> tuple[Part, ...]:
        return (((self.dim,), torch.uint8), ((self.dim // block_size(self.dim),), torch.float32))

    def encode(self, values: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return quantize_e4m3(values)

    def decode(self, parts: tuple[torch.Tensor, ...], dtype: torch.dtype | None) -> torch.Tensor:
        values, scales = parts
        return dequantize_e4m3(values, scales, dtype or torch.float32)


class Record:
    """MLA's latent [c | k_rope] as FlashMLA's fp8 record, one uint8 row per token
    (:func:`latentattn.cache.fp8.pack_record`): c in e4m3 with one fp32 scale per 128 values,
    k_rope in bf16 (RoPE parts are position-sensitive, so DeepSeek and FlashMLA do not quantise
    them): 512 + 4 x 4 + 64 x 2 = 656 bytes at DeepSeek's 512 + 64, against 1,152 in bf16.
    Read dequantised, bf16 unless asked; the Triton kernels read the records in place."""

    fp8 = True

    def __init__(self, rank: int, rope_dim: int) -> None:
        check_record_rank(rank)
        self.rank, self.rope_dim = rank, rope_dim

    def parts(self) -> tuple[Part, ...]:
        return (((record_bytes(self.rank, self.rope_dim),), torch.uint8),)

    def encode(self, values: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return (pack_record(values, self.rank),)

    def decode(self, parts: tuple[torch.Tensor, ...], dtype: torch.dtype | None) -> torch.Tensor:
        (records,) = parts
        return unpack_record(records, self.rank, dtype or torch.bfloat16)


# ----------------------------------------------------------------------------- layouts
class Layout(Protocol):
    """Where token n of row b lives in a buffer."""

    @property
    def block_table(self) -> torch.Tensor | None: ...

    def allocate(self, part: Part, device: torch.device | str | None) -> torch.Tensor: ...

    def put(self, buf: torch.Tensor, step: Step, values: torch.Tensor) -> None: ...

    def take(self, buf: torch.Tensor, step: Step) -> torch.Tensor: ...

    def used_bytes(self, buf: torch.Tensor) -> int: ...


def step_rows(step: Step) -> tuple[torch.Tensor, torch.Tensor]:
    """(rows, positions) of the step's real tokens: (B, T) each, or 1-D without the padding."""
    rows = torch.arange(step.positions.shape[0], device=step.positions.device)[:, None]
    rows = rows.expand_as(step.positions)
    if step.valid is None:
        return rows, step.positions
    return rows[step.valid], step.positions[step.valid]


class Rows:
    """Contiguous rows: token n of row b at buf[b, n], buffers (B, S, ...) with S the capacity;
    KVCache.lengths says how many positions of each row hold real tokens."""

    block_table = None

    def __init__(self, batch: int, capacity: int) -> None:
        self.batch, self.capacity = batch, capacity

    def allocate(self, part: Part, device: torch.device | str | None) -> torch.Tensor:
        shape, dtype = part
        if len(shape) == 2:
            # Per-head values (H, D) are kept head-major, (B, H, S, D), and handed out as the
            # (B, S, H, D) view the contract names: attention's transpose(1, 2) then gives each
            # head's keys contiguous, which CPU SDPA reads 1.7x faster in a decode step than
            # the token-major layout (0.32 against 0.55 ms a layer, 3 KV heads x 2k tokens, fp32,
            # 2-core AMD EPYC) and as transformers' own cache lays them out.
            heads, dim = shape
            buf = torch.zeros(self.batch, heads, self.capacity, dim, dtype=dtype, device=device)
            return buf.permute(0, 2, 1, 3)
        return torch.zeros(self.batch, self.capacity, *shape, dtype=dtype, device=device)

    def put(self, buf: torch.Tensor, step: Step, values: torch.Tensor) -> None:
        rows, positions = step_rows(step)
        buf[rows, positions] = values if step.valid is None else values[step.valid]

    def take(self, buf: torch.Tensor, step: Step) -> torch.Tensor:
        return buf[:, : step.kv_len]

    def used_bytes(self, buf: torch.Tensor) -> int:
        return buf.numel() * buf.element_size()


class TokenStore(Store):
    """One value per token: ``fmt`` encodes it into one buffer per part, laid out by ``layout``."""

    def __init__(self, fmt: Format, layout: Layout, device: torch.device | str | None = None) -> None:
        self.format, self.layout = fmt, layout
        self.fp8 = fmt.fp8
        self._buffers = tuple(layout.allocate(part, device) for part in fmt.parts())

    @property
    def buffers(self) -> tuple[torch.Tensor, ...]:
        return self._buffers

    @property
    def block_table(self) -> torch.Tensor | None:
        return self.layout.block_table

    def write(self, step: Step, values: torch.Tensor) -> None:
        for buf, part in zip(self._buffers, self.format.encode(values), strict=True):
            self.layout.put(buf, step, part)

    def views(self, step: Step) -> tuple[torch.Tensor, ...]:
        return tuple(self.layout.take(buf, step) for buf in self._buffers)

    def read(self, step: Step, dtype: torch.dtype | None = None) -> torch.Tensor:
        return self.format.decode(self.views(step), dtype)

    @property
    def used_bytes(self) -> int:
        return sum(self.layout.used_bytes(b) for b in self._buffers)


__all__ = ["E4M3", "Format", "Layout", "Part", "Plain", "Record", "Rows", "Store", "TokenStore",
           "step_rows"]
