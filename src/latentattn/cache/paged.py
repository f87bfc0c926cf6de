"""A paged latent cache: MLA's latent rows in fixed-size pages taken from a pool, one block
table per batch (vLLM's PagedAttention layout, FlashMLA's 64-token pages).

Token n of row b lives at slot n % page_size of page table[b, n // page_size]. Pages are taken
from the pool as a row grows (:meth:`PagedKVCache.step`) and given back when a row is released
(:meth:`PagedKVCache.release`), so rows of very different lengths share one pool instead of each
reserving the longest row's room. Every layer has its own page tensor; the block table is one
for all of them (a page index means the same token range in every layer). ``nbytes`` is what
torch holds: the whole pool (``used_bytes``: the pages in use). The PyTorch path reads a row's
tokens back through the table (:meth:`PagedLatentKV.views`); the Triton decode kernel reads the
pages in place (:func:`latentattn.kernels.mla_decode.mla_decode_triton` with ``block_table``).
"""

from __future__ import annotations

import torch

from latentattn.cache.fp8 import latent_row, pack_record, unpack_record
from latentattn.cache.kv import KVCache, LayerCache, Step
from latentattn.errors import CacheOverflowError, ConfigError

PAGE_SIZE = 64


class PagePool:
    """Which pages are free, and each row's block table (-1: no page)."""

    def __init__(self, num_pages: int, page_size: int, batch: int, capacity: int,
                 device: torch.device | str | None = None) -> None:
        if page_size < 1 or num_pages < 1:
            raise ConfigError(f"a page pool needs page_size >= 1 and num_pages >= 1, got "
                              f"{page_size} and {num_pages}")
        self.num_pages, self.page_size = num_pages, page_size
        self.free = list(range(num_pages - 1, -1, -1))  # pop() hands out page 0 first
        self.table = torch.full((batch, -(-capacity // page_size)), -1, dtype=torch.int32,
                                device=device)
        self.held = [0] * batch  # pages held by each row

    def ensure(self, row: int, tokens: int) -> None:
        """Give ``row`` enough pages for ``tokens`` tokens."""
        need = -(-tokens // self.page_size)
        while self.held[row] < need:
            if not self.free:
                raise CacheOverflowError(f"the page pool is exhausted: all {self.num_pages} pages of "
                                         f"{self.page_size} tokens are in use (row {row} needs more)")
            self.table[row, self.held[row]] = self.free.pop()
            self.held[row] += 1

    def release(self, row: int) -> None:
        """Return ``row``'s pages to the pool."""
        pages = self.table[row, : self.held[row]].tolist()
        self.free.extend(reversed(pages))
        self.table[row] = -1
        self.held[row] = 0

    @property
    def pages_in_use(self) -> int:
        return self.num_pages - len(self.free)


class PagedLatentKV(LayerCache):
    """One layer's latent rows [c | k_rope] in pages (num_pages, page_size, d_c + d_r); with
    ``fp8``, FlashMLA's fp8 record per token instead (pages of uint8 rows,
    :func:`latentattn.cache.fp8.pack_record`: 656 bytes at DeepSeek's dims), FlashMLA's own
    paged fp8 layout."""

    def __init__(self, pool: PagePool, kv_lora_rank: int, rope_dim: int, dtype: torch.dtype,
                 device: torch.device | str | None = None, fp8: bool = False) -> None:
        self.pool = pool
        self.kv_lora_rank = kv_lora_rank
        self.fp8 = fp8
        width, pages_dtype = latent_row(kv_lora_rank, rope_dim, dtype, fp8)
        self.pages = torch.zeros(pool.num_pages, pool.page_size, width, dtype=pages_dtype,
                                 device=device)
        self.buffers = (self.pages,)

    def _slots(self, rows: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        p = self.pool.page_size
        return self.pool.table[rows, positions // p].long(), positions % p

    def write(self, step: Step, *values: torch.Tensor) -> None:
        (latent,) = values
        rows = torch.arange(step.positions.shape[0], device=step.positions.device)[:, None]
        rows = rows.expand_as(step.positions)
        pos, val = step.positions, latent
        if step.valid is not None:
            rows, pos, val = rows[step.valid], pos[step.valid], latent[step.valid]
        page, slot = self._slots(rows, pos)
        self.pages[page, slot] = (pack_record(val, self.kv_lora_rank) if self.fp8
                                  else val.to(self.pages.dtype))

    def views(self, step: Step) -> tuple[torch.Tensor, ...]:
        """Each row's first kv_len tokens gathered through the table, (B, kv_len, width) as
        stored; positions past a row's pages read page 0 (the attention mask hides them)."""
        b = self.pool.table.shape[0]
        j = torch.arange(step.kv_len, device=self.pages.device)
        rows = torch.arange(b, device=self.pages.device)[:, None].expand(b, step.kv_len)
        page, slot = self._slots(rows, j[None, :].expand(b, step.kv_len))
        return (self.pages[page.clamp(min=0), slot],)

    def read(self, step: Step, dtype: torch.dtype | None = None) -> tuple[torch.Tensor, ...]:
        if not self.fp8:
            return super().read(step, dtype)
        (records,) = self.views(step)
        return (unpack_record(records, self.kv_lora_rank, dtype or torch.bfloat16),)

    @property
    def used_bytes(self) -> int:
        return self.pool.pages_in_use * self.pages[0].numel() * self.pages.element_size()


class PagedKVCache(KVCache):
    """A :class:`KVCache` whose layers are paged: ``step`` takes pages for the tokens to come."""

    def __init__(self, layers: list[LayerCache], pool: PagePool, batch: int, capacity: int,
                 device: torch.device | str | None = None) -> None:
        super().__init__(layers, batch, capacity, device)
        self.pool = pool

    def step(self, seq_len: int, input_lengths: torch.Tensor | None = None) -> Step:
        plan = super().step(seq_len, input_lengths)
        new = (torch.full_like(self.lengths, seq_len) if input_lengths is None
               else input_lengths.to(device=self.lengths.device, dtype=torch.long))
        for row, end in enumerate((self.lengths + new).tolist()):
            self.pool.ensure(row, end)
        return plan

    def release(self, row: int) -> None:
        """Forget ``row``'s tokens and give its pages back to the pool."""
        self.pool.release(row)
        self.lengths[row] = 0

    def reset(self) -> None:
        for row in range(self.batch):
            self.release(row)

    @property
    def used_bytes(self) -> int:
        return sum(getattr(layer, "used_bytes", layer.nbytes) for layer in self.layers)


__all__ = ["PAGE_SIZE", "PagePool", "PagedKVCache", "PagedLatentKV"]
