"""Calculators from a config alone, no model allocated: KV-cache bytes per token, parameter
counts and training FLOPs per token. They sit just above ``config``: ``train``, ``compare``,
``bench`` and the CLI all use them."""

from latentattn.calc.flops import training_flops_per_token
from latentattn.calc.kv_bytes import KVRow, KVTable, cache_bytes_per_token_per_layer, kv_table
from latentattn.calc.params import count_parameters

__all__ = ["KVRow", "KVTable", "cache_bytes_per_token_per_layer", "count_parameters", "kv_table",
           "training_flops_per_token"]
