"""Where one forward call's tokens go: computed once per call (``KVCache.step``) and shared by
every layer and every store."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Step:
    """Where the T tokens of one forward call go, computed once and shared by every layer.

    positions: (B, T) absolute position of each new token (row start + t).
    valid: (B, T) bool, False for right-padding of a ragged batch; None when all are real.
    kv_len: how many cache positions attention reads (the longest row after this step).
    mask: (B, 1, T, kv_len) bool, True where query t may see key j (j <= positions[b, t]);
        None when the step is a fresh prefill, whose mask is plain causal over the T tokens.
    """

    positions: torch.Tensor
    valid: torch.Tensor | None
    kv_len: int
    mask: torch.Tensor | None

    @property
    def causal(self) -> bool:
        return self.mask is None


def fresh_step(batch: int, seq_len: int, device: torch.device) -> Step:
    """The step of a forward with no cache: positions 0..T-1 in every row, causal."""
    positions = torch.arange(seq_len, device=device).expand(batch, seq_len)
    return Step(positions=positions, valid=None, kv_len=seq_len, mask=None)


__all__ = ["Step", "fresh_step"]
