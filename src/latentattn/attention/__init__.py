"""Attention variants: WHAT is projected and cached. The maths runs in ``latentattn.kernels``."""

from latentattn.attention.gqa import GroupedQueryAttention
from latentattn.attention.mla import MultiHeadLatentAttention
from latentattn.attention.norm import RMSNorm

__all__ = ["GroupedQueryAttention", "MultiHeadLatentAttention", "RMSNorm"]
