"""latentattn: Multi-head Latent Attention and the attention family it is measured against.

>>> import latentattn
>>> model = latentattn.Transformer(latentattn.get_preset("tiny-mla"))
"""

from latentattn.cache import KVCache
from latentattn.config import (
    GQAConfig,
    MLAConfig,
    ModelConfig,
    MoEConfig,
    RopeConfig,
    YarnConfig,
)
from latentattn.errors import CacheOverflowError, CheckpointError, ConfigError, LatentAttnError
from latentattn.model import Transformer, generate
from latentattn.presets import PRESETS, get_preset

__version__ = "0.1.0"


def from_pretrained(path: str, **overrides: object) -> Transformer:
    """Load a Hugging Face DeepSeek-V2/V3/V3.2 checkpoint directory; see ``latentattn.interop.hf``."""
    from latentattn.interop.hf import from_pretrained as _load

    return _load(path, **overrides)


__all__ = [
    "PRESETS",
    "CacheOverflowError",
    "CheckpointError",
    "ConfigError",
    "GQAConfig",
    "KVCache",
    "LatentAttnError",
    "MLAConfig",
    "MoEConfig",
    "ModelConfig",
    "RopeConfig",
    "Transformer",
    "YarnConfig",
    "from_pretrained",
    "generate",
    "get_preset",
]
