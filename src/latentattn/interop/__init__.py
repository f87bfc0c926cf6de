"""Interoperability with other formats: Hugging Face DeepSeek-V2/V3/V3.2/V4 checkpoints
(``hf``; config.json mapping in ``hf_config``; DeepSeek-V4 in ``hf_v4`` and ``hf_v4_config``)."""

from latentattn.interop.hf import (
    config_from_hf,
    config_to_hf,
    dequantize_fp8,
    from_pretrained,
    save_pretrained,
)

__all__ = ["config_from_hf", "config_to_hf", "dequantize_fp8", "from_pretrained", "save_pretrained"]
