"""Pages: a layout for a store whose rows take fixed-size pages from a pool, one block table per
batch (vLLM's PagedAttention layout, FlashMLA's 64-token pages).

Token n of row b lives at slot n % page_size of page table[b, n // page_size]. Pages are taken
from the pool as a row grows (:meth:`PagedKVCache.step`) and given back when a row is released
(:meth:`PagedKVCache.release`), so rows of very different lengths share one pool instead of each
reserving the longest row's room. Every layer has its own page tensor; the block table is one
for all of them (a page index means the same token range in every layer). ``nbytes`` is what
torch holds: the whole pool (``used_bytes``: the pages in use). The PyTorch path reads a row's
tokens back through the table (:meth:`Pages.take`); the Triton decode kernel reads the pages in
place (:func:`latentattn.kernels.mla_decode.mla_decode_triton` with ``block_table``).
"""

from __future__ import annotations

import torch

from latentattn.cache.kv import KVCache, LayerCache, Step
from latentattn.cache.layer import CacheKind, LatentCache, latent_cache
from latentattn.cache.store import Part, step_rows
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
        self.rows: list[list[int]] = [[] for _ in range(batch)]  # each row's pages, in order

    def ensure(self, row: int, tokens: int) -> None:
        """Give ``row`` enough pages for ``tokens`` tokens."""
        need = -(-tokens // self.page_size)
        pages = self.rows[row]
        while len(pages) < need:
            if not self.free:
                raise CacheOverflowError(f"the page pool is exhausted: all {self.num_pages} pages of "
                                         f"{self.page_size} tokens are in use (row {row} needs more)")
            page = self.free.pop()
            self.table[row, len(pages)] = page
            pages.append(page)

    def release(self, row: int) -> None:
        """Return ``row``'s pages to the pool."""
        self.free.extend(reversed(self.rows[row]))
        self.table[row] = -1
        self.rows[row] = []

    @property
    def held(self) -> list[int]:
        """How many pages each row holds."""
        return [len(pages) for pages in self.rows]

    @property
    def pages_in_use(self) -> int:
        return self.num_pages - len(self.free)


class Pages:
    """The paged layout of a :class:`~latentattn.cache.store.TokenStore`: buffers
    (num_pages, page_size, ...) read and written through the pool's block table."""

    def __init__(self, pool: PagePool) -> None:
        self.pool = pool

    @property
    def block_table(self) -> torch.Tensor:
        return self.pool.table

    def allocate(self, part: Part, device: torch.device | str | None) -> torch.Tensor:
        shape, dtype = part
        return torch.zeros(self.pool.num_pages, self.pool.page_size, *shape, dtype=dtype, device=device)

    def _slots(self, rows: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        p = self.pool.page_size
        return self.pool.table[rows, positions // p].long(), positions % p

    def put(self, buf: torch.Tensor, step: Step, values: torch.Tensor) -> None:
        page, slot = self._slots(*step_rows(step))
        buf[page, slot] = values if step.valid is None else values[step.valid]

    def take(self, buf: torch.Tensor, step: Step) -> torch.Tensor:
        """Each row's first kv_len tokens gathered through the table, (B, kv_len, ...) as
        stored; positions past a row's pages read page 0 (the attention mask hides them)."""
        b = self.pool.table.shape[0]
        j = torch.arange(step.kv_len, device=buf.device)
        rows = torch.arange(b, device=buf.device)[:, None].expand(b, step.kv_len)
        page, slot = self._slots(rows, j[None, :].expand(b, step.kv_len))
        return buf[page.clamp(min=0), slot]

    def used_bytes(self, buf: torch.Tensor) -> int:
        return self.pool.pages_in_use * buf[0].numel() * buf.element_size()


class PagedLatentKV(metaclass=CacheKind):
    """One layer's latent rows [c | k_rope] in pages (num_pages, page_size, d_c + d_r); with
    ``fp8``, FlashMLA's fp8 record per token instead (656 bytes at DeepSeek's dims), FlashMLA's
    own paged fp8 layout."""

    @staticmethod
    def build(pool: PagePool, kv_lora_rank: int, rope_dim: int, dtype: torch.dtype,
              device: torch.device | str | None = None, fp8: bool = False) -> LayerCache:
        return latent_cache(kv_lora_rank, rope_dim, Pages(pool), dtype, device,
                            latent_format="fp8" if fp8 else "model")

    @staticmethod
    def holds(cache: LayerCache) -> bool:
        return isinstance(cache, LatentCache) and cache.latent.paged


class PagedKVCache(KVCache):
    """A :class:`KVCache` whose layers are paged: ``step`` takes pages for the tokens to come."""

    def __init__(self, layers: list[LayerCache], pool: PagePool, batch: int, capacity: int,
                 device: torch.device | str | None = None, static: bool = False) -> None:
        super().__init__(layers, batch, capacity, device, static)
        self.pool = pool

    def _reserve(self, ends: list[int]) -> None:
        # Pages come from the host's own counts: nothing is read back from the device.
        for row, end in enumerate(ends):
            self.pool.ensure(row, end)

    def release(self, row: int) -> None:
        """Forget ``row``'s tokens and give its pages back to the pool."""
        self.pool.release(row)
        self.lengths[row] = 0
        self.host_lengths[row] = 0

    def reset(self) -> None:
        for row in range(self.batch):
            self.release(row)

    def fill(self, length: int) -> None:
        super().fill(length)
        for row in range(self.batch):
            self.pool.ensure(row, length)


__all__ = ["PAGE_SIZE", "PagePool", "PagedKVCache", "PagedLatentKV", "Pages"]
