"""One layer's cache: a few named stores put together (DeepSeek-V2 section 2.1.4 for what each
attention form caches):

* per-head K/V (MHA/MQA/GQA, naive MLA): ``keys`` (H, d_k) and ``values`` (H, d_v) per token;
* absorbed MLA: ``latent``, the RMSNorm'd c and the rotated shared k_rope side by side, d_c + d_r
  values per token (or FlashMLA's fp8 record of them), so attention reads one (S, d_c + d_r) key;
* DSA (DeepSeek-V3.2): the same ``latent`` plus ``index_keys``, one lightning-indexer key per
  token (in the model's dtype or e4m3 with fp32 scales).

Attention asks a cache what it holds (``cache.latent.fp8``, ``cache.latent.paged``,
``cache.holds("index_keys")``) rather than which class it is.

The classes this package had before stores (``DenseKV``, ``LatentKV``, ``FP8LatentKV``,
``IndexedLatentKV`` and ``cache.paged.PagedLatentKV``) remain as names: calling one with its old
arguments builds the layer cache it described, and ``isinstance`` asks a cache whether it is
that kind (``IndexedLatentKV``: a latent with index keys; ``FP8LatentKV``: fp8 records in rows).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal

import torch

from latentattn.cache.step import Step
from latentattn.cache.store import E4M3, Layout, Plain, Record, Rows, Store, TokenStore

LatentFormat = Literal["model", "fp8"]  # the latent in the cache dtype, or FlashMLA's fp8 record
IndexKeyFormat = Literal["model", "fp8"]  # indexer keys in the cache dtype, or e4m3 + fp32 scales


class LayerCache:
    """Named stores, written and read in the order given; ``cache.name`` is the store ``name``."""

    def __init__(self, **stores: Store) -> None:
        self.stores = stores

    def __getattr__(self, name: str) -> Store:
        stores = self.__dict__.get("stores", {})  # absent while copy/pickle rebuild the object
        if name in stores:
            return stores[name]
        raise AttributeError(f"this layer cache holds {', '.join(stores) or 'nothing'}, not {name!r}")

    def holds(self, name: str) -> bool:
        return name in self.stores

    def write(self, step: Step, *values: torch.Tensor) -> None:
        """values[i] (B, T, ...) into the i-th store."""
        for store, value in zip(self.stores.values(), values, strict=True):
            store.write(step, value)

    def views(self, step: Step) -> tuple[torch.Tensor, ...]:
        return tuple(v for store in self.stores.values() for v in store.views(step))

    def read(self, step: Step, dtype: torch.dtype | None = None) -> tuple[torch.Tensor, ...]:
        """Each store's tokens decoded to ``dtype`` (None: its format's own), in store order."""
        return tuple(store.read(step, dtype) for store in self.stores.values())

    @property
    def buffers(self) -> tuple[torch.Tensor, ...]:
        return tuple(b for store in self.stores.values() for b in store.buffers)

    @property
    def nbytes(self) -> int:
        return sum(store.nbytes for store in self.stores.values())

    @property
    def used_bytes(self) -> int:
        return sum(store.used_bytes for store in self.stores.values())


class LatentCache(LayerCache):
    """MLA's layer cache: ``latent`` (B, S, d_c + d_r) split at ``kv_lora_rank``, and for DSA
    ``index_keys`` (B, S, d_I) beside it."""

    def __init__(self, kv_lora_rank: int, latent: Store, index_keys: Store | None = None) -> None:
        super().__init__(latent=latent, **({} if index_keys is None else {"index_keys": index_keys}))
        self.kv_lora_rank = kv_lora_rank

    # The attribute names of the classes before stores, for code that still reads them.
    @property
    def kv(self) -> torch.Tensor:
        """The latent buffer as stored: rows, fp8 records, or pages of either."""
        return self.latent.buffers[0]

    records = pages = kv

    @property
    def index_k(self) -> torch.Tensor:
        return self.index_keys.buffers[0]

    @property
    def latent_fp8(self) -> bool:
        return self.latent.fp8

    @property
    def fp8(self) -> bool:
        """IndexedLatentKV's flag: the index keys are e4m3 (the latent's is ``latent.fp8``)."""
        return self.holds("index_keys") and self.index_keys.fp8


def dense_cache(n_heads: int, k_dim: int, v_dim: int, layout: Layout, dtype: torch.dtype,
                device: torch.device | str | None = None) -> LayerCache:
    """Per-head keys (H, k_dim) and values (H, v_dim) per token in ``dtype``."""
    return LayerCache(keys=TokenStore(Plain((n_heads, k_dim), dtype), layout, device),
                      values=TokenStore(Plain((n_heads, v_dim), dtype), layout, device))


def latent_cache(kv_lora_rank: int, rope_dim: int, layout: Layout, dtype: torch.dtype,
                 device: torch.device | str | None = None, latent_format: LatentFormat = "model",
                 index_key_dim: int | None = None, index_key_format: IndexKeyFormat = "model",
                 ) -> LatentCache:
    """MLA's latent in ``latent_format`` (``dtype`` or fp8 records) and, with
    ``index_key_dim``, DSA's indexer keys in ``index_key_format`` (``dtype`` or e4m3)."""
    fmt = (Record(kv_lora_rank, rope_dim) if latent_format == "fp8"
           else Plain((kv_lora_rank + rope_dim,), dtype))
    keys = None
    if index_key_dim is not None:
        key_fmt = E4M3(index_key_dim) if index_key_format == "fp8" else Plain((index_key_dim,), dtype)
        keys = TokenStore(key_fmt, layout, device)
    return LatentCache(kv_lora_rank, TokenStore(fmt, layout, device), keys)


# ----------------------------------------------------------------------------- the old names
class CacheKind(type):
    """A name for a kind of layer cache: calling it builds one (``build``, the old constructor's
    arguments); ``isinstance(cache, Name)`` asks the cache whether it holds that (``holds``)."""

    build: Callable[..., LayerCache]
    holds: Callable[[LayerCache], bool]

    def __call__(cls, *args: Any, **kwargs: Any) -> LayerCache:
        return cls.build(*args, **kwargs)

    def __instancecheck__(cls, obj: object) -> bool:
        return isinstance(obj, LayerCache) and cls.holds(obj)


def _latent(cache: LayerCache) -> Store | None:
    return cache.latent if isinstance(cache, LatentCache) else None


class DenseKV(metaclass=CacheKind):
    """Per-head keys (B, S, H, dk) and values (B, S, H, dv)."""

    @staticmethod
    def build(batch: int, capacity: int, n_heads: int, k_dim: int, v_dim: int, dtype: torch.dtype,
              device: torch.device | str | None = None) -> LayerCache:
        return dense_cache(n_heads, k_dim, v_dim, Rows(batch, capacity), dtype, device)

    @staticmethod
    def holds(cache: LayerCache) -> bool:
        return cache.holds("keys") and cache.holds("values")


class LatentKV(metaclass=CacheKind):
    """MLA's latent cache (B, S, d_c + d_r): [normalised c | rotated k_rope] per token."""

    @staticmethod
    def build(batch: int, capacity: int, kv_lora_rank: int, rope_dim: int, dtype: torch.dtype,
              device: torch.device | str | None = None) -> LayerCache:
        return latent_cache(kv_lora_rank, rope_dim, Rows(batch, capacity), dtype, device)

    @staticmethod
    def holds(cache: LayerCache) -> bool:
        return _latent(cache) is not None


class FP8LatentKV(metaclass=CacheKind):
    """MLA's latent as FlashMLA's fp8 records in rows (:class:`~latentattn.cache.store.Record`);
    a DSA cache with such a latent is one too (isinstance asks what the latent is)."""

    @staticmethod
    def build(batch: int, capacity: int, kv_lora_rank: int, rope_dim: int,
              device: torch.device | str | None = None) -> LayerCache:
        return latent_cache(kv_lora_rank, rope_dim, Rows(batch, capacity), torch.bfloat16, device,
                            latent_format="fp8")

    @staticmethod
    def holds(cache: LayerCache) -> bool:
        latent = _latent(cache)
        return latent is not None and latent.fp8 and not latent.paged


class IndexedLatentKV(metaclass=CacheKind):
    """DSA's cache: the MLA latent plus one indexer key per token (DeepSeek-V3.2); ``fp8``: the
    keys in e4m3, ``latent_fp8``: the latent as fp8 records."""

    @staticmethod
    def build(batch: int, capacity: int, kv_lora_rank: int, rope_dim: int, index_head_dim: int,
              dtype: torch.dtype, device: torch.device | str | None = None, fp8: bool = False,
              latent_fp8: bool = False) -> LayerCache:
        return latent_cache(kv_lora_rank, rope_dim, Rows(batch, capacity), dtype, device,
                            latent_format="fp8" if latent_fp8 else "model",
                            index_key_dim=index_head_dim, index_key_format="fp8" if fp8 else "model")

    @staticmethod
    def holds(cache: LayerCache) -> bool:
        return _latent(cache) is not None and cache.holds("index_keys")


__all__ = ["CacheKind", "DenseKV", "FP8LatentKV", "IndexKeyFormat", "IndexedLatentKV", "LatentCache",
           "LatentFormat", "LatentKV", "LayerCache", "dense_cache", "latent_cache"]
