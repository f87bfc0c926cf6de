"""The transformer over any attention variant, and generation."""

from latentattn.model.generate import generate, sample
from latentattn.model.transformer import Block, Transformer

__all__ = ["Block", "Transformer", "generate", "sample"]
