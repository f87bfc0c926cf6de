"""Calculators and benchmarks: KV-cache bytes, parameter counts, decode-step timings."""

from latentattn.bench.kv_bytes import KVRow, KVTable, cache_bytes_per_token_per_layer, kv_table
from latentattn.bench.params import count_parameters

__all__ = ["KVRow", "KVTable", "cache_bytes_per_token_per_layer", "count_parameters", "kv_table"]
