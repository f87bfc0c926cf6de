"""The one place a model's cache is built: each attention layer says what it caches (a
:data:`CacheSpec`), :func:`build_cache` chooses the stores' formats and layout for all of them.

``latent_format`` and ``page_size`` change the latent only: ``"fp8"`` keeps it as FlashMLA's fp8
record, ``page_size`` in pages from one pool (FlashMLA's paged layout; both together its paged
fp8 layout). The indexer keys' format is the model's own (``IndexerConfig.key_cache``), carried
by the spec.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from latentattn.cache.kv import KVCache
from latentattn.cache.layer import (
    IndexKeyFormat,
    LatentFormat,
    LayerCache,
    dense_cache,
    latent_cache,
)
from latentattn.cache.paged import PagedKVCache, PagePool, Pages
from latentattn.cache.store import Layout, Rows
from latentattn.cache.v4 import V4Spec, v4_layer_cache
from latentattn.errors import ConfigError


@dataclass(frozen=True)
class DenseSpec:
    """Per-head keys (n_heads, k_dim) and values (n_heads, v_dim) per token: GQA, naive MLA."""

    n_heads: int
    k_dim: int
    v_dim: int


@dataclass(frozen=True)
class LatentSpec:
    """MLA's latent [c | k_rope] per token (kv_lora_rank + rope_dim values); with
    ``index_key_dim``, DSA's indexer key beside it, stored in ``index_key_format``."""

    kv_lora_rank: int
    rope_dim: int
    index_key_dim: int | None = None
    index_key_format: IndexKeyFormat = "model"


CacheSpec = DenseSpec | LatentSpec | V4Spec  # V4Spec: DeepSeek-V4's window ring and compressed entries


def build_cache(
    specs: Sequence[CacheSpec], batch: int, capacity: int, dtype: torch.dtype,
    device: torch.device | str | None = None, *, latent_format: LatentFormat = "model",
    page_size: int | None = None, num_pages: int | None = None, name: str = "the model",
    static: bool = False,
) -> KVCache:
    """One layer cache per spec, for ``batch`` rows of up to ``capacity`` tokens in ``dtype``
    (what fp8 stores are read back as). ``page_size``: the latent in pages of that many tokens
    from a pool of ``num_pages`` (default: room for every row at ``capacity``), dense MLA only
    (DSA's indexer and sparse kernels read rows). ``name`` names the model in errors.
    ``static``: every step reads the whole capacity (:class:`~latentattn.cache.kv.KVCache`)."""
    if latent_format not in ("model", "fp8"):
        raise ConfigError(f"latent_format must be model or fp8, got {latent_format!r}")
    if page_size is not None and not all(
            isinstance(s, LatentSpec) and s.index_key_dim is None for s in specs):
        raise ConfigError(f"the paged latent cache holds dense MLA's latent (impl auto or absorb); "
                          f"{name} has other attention")
    if latent_format == "fp8" and not all(isinstance(s, LatentSpec) for s in specs):
        raise ConfigError(f"the fp8 latent cache holds the latent of MLA (impl auto or absorb) or "
                          f"DSA; {name} has other attention")
    pool = None
    layout: Layout = Rows(batch, capacity)
    if page_size is not None:
        pool = PagePool(num_pages or batch * -(-capacity // max(1, page_size)), page_size, batch,
                        capacity, device)
        layout = Pages(pool)
    layers: list[LayerCache] = [
        dense_cache(s.n_heads, s.k_dim, s.v_dim, layout, dtype, device) if isinstance(s, DenseSpec)
        else v4_layer_cache(s, batch, capacity, dtype, device) if isinstance(s, V4Spec)
        else latent_cache(s.kv_lora_rank, s.rope_dim, layout, dtype, device, latent_format,
                          s.index_key_dim, s.index_key_format)
        for s in specs
    ]
    if pool is not None:
        return PagedKVCache(layers, pool, batch, capacity, device, static)
    return KVCache(layers, batch, capacity, device, static)


__all__ = ["CacheSpec", "DenseSpec", "LatentSpec", "build_cache"]
