"""Perplexity of a model on a text, comparable across tokenizers.

The text is tokenized whole and cut into non-overlapping windows of ``seq_len + 1`` tokens
(:func:`latentattn.data.eval_windows`: every token after the first of the text is predicted
exactly once, each from the tokens before it in its window). Reported: the mean loss per
predicted token (nats), its perplexity, and nats (and bits) per UTF-8 byte of the text those
tokens spell, which is what compares models with different vocabularies (a byte-level model's
nats/token is already per byte).
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F

from latentattn.data import eval_windows
from latentattn.errors import LatentAttnError
from latentattn.model.transformer import Transformer
from latentattn.tokenizer import Tokenizer, encode_corpus


@dataclass(frozen=True)
class TextEval:
    windows: int
    seq_len: int
    tokens: int  # predicted tokens
    bytes: int  # UTF-8 bytes of the text the predicted tokens decode to
    nats: float  # summed loss
    seconds: float

    @property
    def loss_per_token(self) -> float:
        return self.nats / self.tokens

    @property
    def perplexity(self) -> float:
        return math.exp(self.loss_per_token)

    @property
    def nats_per_byte(self) -> float:
        return self.nats / self.bytes

    @property
    def bits_per_byte(self) -> float:
        return self.nats_per_byte / math.log(2)

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else 0.0

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "loss_per_token": self.loss_per_token, "perplexity": self.perplexity,
                "nats_per_byte": self.nats_per_byte, "bits_per_byte": self.bits_per_byte,
                "tokens_per_s": self.tokens_per_s}


@torch.no_grad()
def window_nats(model: Transformer, windows: torch.Tensor, batch_size: int, bf16: bool = False,
                on_batch: Callable[[int], object] | None = None) -> float:
    """Summed next-token cross-entropy (nats) of ``model`` over (N, T + 1) token ``windows``,
    ``batch_size`` windows per forward, in eval mode (the mode is restored after), with bf16
    autocast if asked; ``on_batch(n)`` after each forward of n windows."""
    was_training = model.training
    model.eval()
    nats = 0.0
    try:
        with torch.autocast(model.device.type, dtype=torch.bfloat16, enabled=bf16):
            for batch in windows.split(batch_size):
                batch = batch.to(model.device)
                logits = model(batch[:, :-1])
                nats += float(F.cross_entropy(logits.flatten(0, 1).float(), batch[:, 1:].flatten(),
                                              reduction="sum"))
                if on_batch is not None:
                    on_batch(batch.shape[0])
    finally:
        model.train(was_training)
    return nats


def default_seq_len(model: Transformer) -> int:
    """The evaluation window when none is asked for: the model's, capped at 1024 (CPU cost)."""
    return min(model.config.max_seq_len, 1024)


@torch.no_grad()
def evaluate_text(model: Transformer, tokenizer: Tokenizer, text: str, seq_len: int | None = None,
                  max_tokens: int | None = None, batch_size: int = 4,
                  progress: bool = False) -> TextEval:
    """Loss of ``model`` over ``text`` (see the module docstring). ``max_tokens`` keeps the text's
    first that many tokens; the tail shorter than a window is left out."""
    seq_len = default_seq_len(model) if seq_len is None else seq_len
    if seq_len < 1 or batch_size < 1 or (max_tokens is not None and max_tokens < 2):
        raise LatentAttnError(f"seq_len and batch_size must be >= 1 and max_tokens >= 2, got "
                              f"{seq_len}, {batch_size}, {max_tokens}")
    if seq_len > model.config.max_seq_len:
        raise LatentAttnError(f"seq_len {seq_len} exceeds the model's max_seq_len "
                              f"{model.config.max_seq_len}")
    ids = encode_corpus(tokenizer, text)
    if max_tokens is not None:
        ids = ids[:max_tokens]
    if len(ids) < seq_len + 1:
        raise LatentAttnError(f"the text has {len(ids)} tokens, fewer than one window of "
                              f"{seq_len} + 1; give more text or a smaller --seq-len")
    windows = eval_windows(ids, seq_len)
    predicted = windows[:, 1:].reshape(-1).tolist()
    n_bytes = len(tokenizer.decode(predicted).encode("utf-8"))
    from tqdm import tqdm

    started = time.perf_counter()
    with tqdm(total=windows.shape[0], desc="eval", unit="window", file=sys.stderr,
              disable=not progress, dynamic_ncols=True) as bar:
        nats = window_nats(model, windows, batch_size, on_batch=bar.update)
    return TextEval(windows=windows.shape[0], seq_len=seq_len, tokens=len(predicted),
                    bytes=max(1, n_bytes), nats=nats, seconds=time.perf_counter() - started)


__all__ = ["TextEval", "default_seq_len", "evaluate_text", "window_nats"]
