"""Calculators from a config alone, no model allocated: KV-cache bytes per token, parameter
counts, training FLOPs per token and DSA's top-k density. They sit just above ``config``:
``train``, ``compare``, ``bench`` and the CLI all use them."""

from latentattn.calc.density import Density, topk_density
from latentattn.calc.flops import training_flops_per_token
from latentattn.calc.kv_bytes import KVRow, KVTable, cache_bytes_per_token_per_layer, kv_table
from latentattn.calc.params import count_parameters

__all__ = ["Density", "KVRow", "KVTable", "cache_bytes_per_token_per_layer", "count_parameters", "kv_table",
           "topk_density", "training_flops_per_token"]
