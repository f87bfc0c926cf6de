"""Text <-> token ids: a checkpoint's own ``tokenizer.json``, or UTF-8 bytes as ids 0..255.

Every model ``latentattn.load`` returns has one of these beside it: Hugging Face checkpoint
directories (and ``train`` runs started from one) carry a ``tokenizer.json``; byte-level models
(``train`` runs, the tiny presets) use :class:`ByteTokenizer`.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

import torch

from latentattn.data import byte_tokens
from latentattn.errors import ConfigError

TOKENIZER_FILE = "tokenizer.json"
BYTE_VOCAB = 256


class Tokenizer(Protocol):
    eos_token_id: int | None

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: Sequence[int]) -> str: ...


class ByteTokenizer:
    """UTF-8 bytes as token ids 0..255 (what ``latentattn train`` learns); no end-of-text id."""

    eos_token_id: int | None = None

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: Sequence[int]) -> str:
        # A random model may emit ids >= 256, which are not bytes: show them as U+FFFD.
        return b"".join(bytes([i]) if i < BYTE_VOCAB else "\ufffd".encode() for i in ids).decode(
            "utf-8", errors="replace")


class HFTokenizer:
    """A Hugging Face ``tokenizer.json`` (the ``tokenizers`` library), with the model's EOS id."""

    def __init__(self, path: str | Path, eos_token_id: int | None = None) -> None:
        from tokenizers import Tokenizer as _Tokenizer

        try:
            self.tok = _Tokenizer.from_file(str(path))
        except Exception as e:  # tokenizers raises a bare Exception for malformed files
            raise ConfigError(f"{path}: not a readable tokenizer.json ({e})") from None
        self.path = Path(path)
        self.eos_token_id = eos_token_id

    @classmethod
    def from_tokenizer(cls, tok: Any, eos_token_id: int | None, path: str | Path) -> HFTokenizer:
        """Wrap a ``tokenizers.Tokenizer`` already built (a GGUF file's, read by transformers)."""
        self = cls.__new__(cls)
        self.tok, self.path, self.eos_token_id = tok, Path(path), eos_token_id
        return self

    def encode(self, text: str) -> list[int]:
        return list(self.tok.encode(text).ids)

    def decode(self, ids: Sequence[int]) -> str:
        return str(self.tok.decode(list(ids)))


def encode_corpus(tokenizer: Tokenizer, text: str) -> torch.Tensor:
    """A whole training text as one (N,) int64 token tensor."""
    if isinstance(tokenizer, ByteTokenizer):
        return byte_tokens(text)
    return torch.tensor(tokenizer.encode(text), dtype=torch.long)


def check_byte_vocab(vocab_size: int) -> None:
    """Byte tokens need ids 0..255: refuse a smaller vocabulary with a message that says so."""
    if vocab_size < BYTE_VOCAB:
        raise ConfigError(
            f"no tokenizer.json, and byte-level tokens need vocab_size >= {BYTE_VOCAB} but the model "
            f"has vocab_size {vocab_size}"
        )


__all__ = ["TOKENIZER_FILE", "ByteTokenizer", "HFTokenizer", "Tokenizer", "check_byte_vocab", "encode_corpus"]
