"""latentattn: Multi-head Latent Attention and the attention family it is measured against.

>>> import latentattn
>>> model = latentattn.load("tiny-mla", seed=0)       # a preset, a checkpoint or a train run

A GQA / MHA / MQA model converted to MLA at half its KV cache, in one call:

>>> result = latentattn.convert_model("smollm2-135m", out="smollm2-mla")  # doctest: +SKIP
"""

from __future__ import annotations

import os
from typing import Any

from latentattn.cache import KVCache
from latentattn.config import (
    GQAConfig,
    MLAConfig,
    ModelConfig,
    MoEConfig,
    RopeConfig,
    YarnConfig,
)
from latentattn.convert.api import ConvertResult, convert_model
from latentattn.errors import CacheOverflowError, CheckpointError, ConfigError, LatentAttnError
from latentattn.loading import load, load_config, load_tokenizer
from latentattn.model import Transformer, generate
from latentattn.model.compiled import compile
from latentattn.model.layout import decode_layout
from latentattn.presets import PRESETS, get_preset

__version__ = "0.2.0"


def from_pretrained(path: str | os.PathLike[str], **kwargs: Any) -> Transformer:
    """``latentattn.load(path, **kwargs)``: the name transformers users look for."""
    return load(path, **kwargs)


def save_pretrained(model: Transformer, path: str | os.PathLike[str], **kwargs: Any) -> None:
    """Write a Hugging Face DeepSeek-V2/V3/V3.2/V4 checkpoint directory; see ``latentattn.interop.hf``."""
    from latentattn.interop.hf import save_pretrained as _save

    _save(model, path, **kwargs)


__all__ = [
    "PRESETS",
    "CacheOverflowError",
    "CheckpointError",
    "ConfigError",
    "ConvertResult",
    "GQAConfig",
    "KVCache",
    "LatentAttnError",
    "MLAConfig",
    "MoEConfig",
    "ModelConfig",
    "RopeConfig",
    "Transformer",
    "YarnConfig",
    "compile",
    "convert_model",
    "decode_layout",
    "from_pretrained",
    "generate",
    "get_preset",
    "load",
    "load_config",
    "load_tokenizer",
    "save_pretrained",
]
