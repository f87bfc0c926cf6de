"""Calculators from a config alone, no model allocated: KV-cache bytes per token (DeepSeek-V4's
per sequence at a context, by layer type; a GQA model's as converted to MLA), parameter counts,
training FLOPs per token and DSA's top-k density. They sit just above ``config``:
``train``, ``compare``, ``bench`` and the CLI all use them."""

from latentattn.calc.converted import ConvertSizes, converted_bytes_per_token_per_layer, resolve_sizes
from latentattn.calc.density import Density, topk_density
from latentattn.calc.flops import training_flops_per_token
from latentattn.calc.kv_bytes import KVRow, KVTable, cache_bytes_per_token_per_layer, kv_table
from latentattn.calc.params import count_parameters
from latentattn.calc.v4_kv import V4KVTable, v4_cache_bytes, v4_kv_table

__all__ = ["ConvertSizes", "Density", "KVRow", "KVTable", "V4KVTable", "cache_bytes_per_token_per_layer",
           "converted_bytes_per_token_per_layer", "count_parameters", "kv_table", "resolve_sizes",
           "topk_density", "training_flops_per_token", "v4_cache_bytes", "v4_kv_table"]
