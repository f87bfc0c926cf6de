"""Text for training and measuring: any UTF-8 file, or English prose that ships with CPython.

The default corpus is the text of ``pydoc_data.topics`` (the help topics of the Python reference,
~0.7 MB), read from the running interpreter, so nothing is downloaded. Tokens are bytes (vocab 256).
"""

from __future__ import annotations

from pathlib import Path

import torch

from latentattn.errors import LatentAttnError


def default_text() -> str:
    """The prose of CPython's ``pydoc_data.topics`` (topics joined by blank lines)."""
    from pydoc_data.topics import topics

    return "\n\n".join(topics[k] for k in sorted(topics))


def load_text(path: str | Path | None) -> str:
    """The UTF-8 text at ``path`` (or the default corpus); clear errors for unusable files."""
    if path is None:
        return default_text()
    p = Path(path)
    if not p.is_file():
        raise LatentAttnError(f"data file {p} does not exist")
    raw = p.read_bytes()
    if not raw:
        raise LatentAttnError(f"data file {p} is empty")
    if b"\x00" in raw:
        raise LatentAttnError(f"data file {p} is not text (it contains NUL bytes)")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise LatentAttnError(f"data file {p} is not UTF-8 text ({e.reason} at byte {e.start})") from None


def byte_tokens(text: str) -> torch.Tensor:
    """UTF-8 bytes as int64 token ids in [0, 256)."""
    return torch.frombuffer(bytearray(text.encode("utf-8")), dtype=torch.uint8).long()


def train_val_split(tokens: torch.Tensor, val_fraction: float = 0.1) -> tuple[torch.Tensor, torch.Tensor]:
    """Deterministic split: the last ``val_fraction`` of the text is validation."""
    cut = int(len(tokens) * (1 - val_fraction))
    return tokens[:cut], tokens[cut:]


def random_batch(tokens: torch.Tensor, batch: int, seq_len: int, generator: torch.Generator) -> torch.Tensor:
    """(batch, seq_len + 1) windows at random offsets: inputs are [:, :-1], targets [:, 1:]."""
    if len(tokens) < seq_len + 1:
        raise LatentAttnError(f"the text has {len(tokens)} tokens, fewer than one window of {seq_len + 1}")
    starts = torch.randint(0, len(tokens) - seq_len, (batch,), generator=generator)
    return torch.stack([tokens[s : s + seq_len + 1] for s in starts.tolist()])


def eval_windows(tokens: torch.Tensor, seq_len: int, limit: int = 0) -> torch.Tensor:
    """(N, seq_len + 1) non-overlapping windows from the start of ``tokens``: window i holds
    tokens [i * seq_len, (i + 1) * seq_len], so every token after the first is predicted exactly
    once (the tail shorter than a window is left out). ``limit`` > 0 keeps the first ``limit``.
    The same tokens give the same windows, whatever the seed: an evaluation set fixed for every run.
    """
    if len(tokens) < seq_len + 1:
        raise LatentAttnError(f"the text has {len(tokens)} tokens, fewer than one window of {seq_len + 1}")
    windows = tokens.unfold(0, seq_len + 1, seq_len)
    return windows[:limit] if limit > 0 else windows
