"""Preallocated caches, composed of small stores (one idea a file):

* ``step``: :class:`Step`, where one forward's tokens go (computed once, shared by every layer).
* ``store``: :class:`Store`, the contract, and :class:`TokenStore`, one value per token as a
  format (:class:`Plain` dtype, :class:`E4M3` indexer keys, FlashMLA's :class:`Record`) in a
  layout (:class:`Rows`, or ``paged``'s :class:`Pages`).
* ``layer``: :class:`LayerCache`, one layer's named stores (``keys``/``values``, ``latent``,
  ``index_keys``), and :class:`LatentCache` for MLA and DSA.
* ``kv``: :class:`KVCache`, every layer's cache and the per-row lengths; ``paged``: the page
  pool, :class:`PagedKVCache`.
* ``build``: :func:`build_cache`, the one place a model's cache is built, from each attention's
  :data:`CacheSpec` (``Transformer.make_cache`` calls it).
* ``fp8``: e4m3 block quantisation and FlashMLA's record, byte by byte.

A new kind of store (DeepSeek-V4's sliding-window ring, compressed entries, tokens pending
compression) implements :class:`Store`:

* ``write(step, values)``: store values (B, T, ...) for the step's tokens, skipping padding;
* ``views(step)``: the buffers as stored, what a kernel reads in place;
* ``read(step, dtype)``: the values decoded to ``dtype`` (None: the format's own);
* ``buffers``: the preallocated tensors, so ``nbytes`` (and ``used_bytes``) count what torch
  holds; ``fp8`` and ``block_table`` say how a kernel must read it.

Most are a :class:`TokenStore` with a new layout (a ring is ``slot = position % window``), so
the formats come for free. A layer cache is then ``LayerCache(window=..., compressed=...)``:
attention asks it what it holds (``cache.latent.fp8``, ``cache.holds("index_keys")``).

``DenseKV``, ``LatentKV``, ``FP8LatentKV``, ``IndexedLatentKV`` and ``PagedLatentKV`` are the
names of the caches before stores: calling one builds that layer cache, ``isinstance`` asks a
cache whether it is that kind.
"""

from latentattn.cache.build import CacheSpec, DenseSpec, LatentSpec, build_cache
from latentattn.cache.kv import KVCache
from latentattn.cache.layer import (
    DenseKV,
    FP8LatentKV,
    IndexedLatentKV,
    IndexKeyFormat,
    LatentCache,
    LatentFormat,
    LatentKV,
    LayerCache,
    dense_cache,
    latent_cache,
)
from latentattn.cache.paged import PAGE_SIZE, PagedKVCache, PagedLatentKV, PagePool, Pages
from latentattn.cache.step import Step, fresh_step
from latentattn.cache.store import E4M3, Plain, Record, Rows, Store, TokenStore

__all__ = [
    "E4M3",
    "PAGE_SIZE",
    "CacheSpec",
    "DenseKV",
    "DenseSpec",
    "FP8LatentKV",
    "IndexKeyFormat",
    "IndexedLatentKV",
    "KVCache",
    "LatentCache",
    "LatentFormat",
    "LatentKV",
    "LatentSpec",
    "LayerCache",
    "PagePool",
    "PagedKVCache",
    "PagedLatentKV",
    "Pages",
    "Plain",
    "Record",
    "Rows",
    "Step",
    "Store",
    "TokenStore",
    "build_cache",
    "dense_cache",
    "fresh_step",
    "latent_cache",
]
