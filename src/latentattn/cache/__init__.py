"""Preallocated KV caches: dense per-head K/V (GQA, naive MLA) and the MLA latent cache."""

from latentattn.cache.kv import DenseKV, IndexedLatentKV, KVCache, LatentKV, LayerCache, Step

__all__ = ["DenseKV", "IndexedLatentKV", "KVCache", "LatentKV", "LayerCache", "Step"]
