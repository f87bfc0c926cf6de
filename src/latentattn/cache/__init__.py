"""Preallocated KV caches: dense per-head K/V (GQA, naive MLA) and the MLA latent cache."""

from latentattn.cache.kv import (
    DenseKV,
    FP8LatentKV,
    IndexedLatentKV,
    KVCache,
    LatentKV,
    LayerCache,
    Step,
)

__all__ = ["DenseKV", "FP8LatentKV", "IndexedLatentKV", "KVCache", "LatentKV", "LayerCache", "Step"]
