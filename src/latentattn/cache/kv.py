"""A model's cache: every layer's :class:`~latentattn.cache.layer.LayerCache` and the per-row
lengths they share.

Every store is laid out with S the capacity (rows of (B, S, ...), or pages that hold up to S
tokens a row); ``KVCache.lengths`` (B,) says how many positions of each row hold real tokens,
so rows of a batch may have different lengths. ``step`` plans a forward (where its tokens go,
what each query may see), ``advance`` counts them as cached after it.
"""

from __future__ import annotations

import torch

from latentattn.cache.layer import DenseKV, FP8LatentKV, IndexedLatentKV, LatentKV, LayerCache
from latentattn.cache.step import Step, fresh_step
from latentattn.errors import CacheOverflowError


class KVCache:
    """All layers' caches plus the per-row lengths they share."""

    def __init__(self, layers: list[LayerCache], batch: int, capacity: int,
                 device: torch.device | str | None = None) -> None:
        self.layers = layers
        self.batch = batch
        self.capacity = capacity
        self.lengths = torch.zeros(batch, dtype=torch.long, device=device)

    def __getitem__(self, layer: int) -> LayerCache:
        return self.layers[layer]

    def __len__(self) -> int:
        return len(self.layers)

    @property
    def nbytes(self) -> int:
        """Bytes allocated by every layer's buffers (not a formula: what torch holds)."""
        return sum(layer.nbytes for layer in self.layers)

    @property
    def used_bytes(self) -> int:
        """Bytes holding tokens: ``nbytes``, less the free pages of a paged cache."""
        return sum(layer.used_bytes for layer in self.layers)

    @property
    def bytes_per_token(self) -> float:
        """Allocated bytes per cached token over all layers."""
        return self.nbytes / (self.batch * self.capacity)

    @property
    def bytes_per_token_per_layer(self) -> float:
        return self.bytes_per_token / len(self.layers)

    def reset(self) -> None:
        """Forget every row's tokens; the buffers are kept and overwritten by the next writes."""
        self.lengths.zero_()

    def step(self, seq_len: int, input_lengths: torch.Tensor | None = None) -> Step:
        """Plan a forward of seq_len new tokens per row (input_lengths (B,) of them real)."""
        device = self.lengths.device
        t = torch.arange(seq_len, device=device)
        new = (
            torch.full_like(self.lengths, seq_len) if input_lengths is None
            else input_lengths.to(device=device, dtype=torch.long)
        )
        end = self.lengths + new
        if bool((end > self.capacity).any()):
            row = int(torch.argmax(end).item())
            raise CacheOverflowError(
                f"KV cache overflow: row {row} would hold {int(end[row])} tokens but the cache "
                f"was allocated for {self.capacity}"
            )
        positions = self.lengths[:, None] + t  # (B, T)
        valid = None if input_lengths is None else t[None, :] < new[:, None]
        if valid is not None and bool(valid.all()):
            valid = None
        if valid is not None:
            # Padded tokens are never written; park their positions on a legal index.
            positions = torch.where(valid, positions, positions.clamp(max=self.capacity - 1))
        kv_len = int(end.max().item())
        if valid is None and not bool(self.lengths.any()):
            return Step(positions=positions, valid=None, kv_len=kv_len, mask=None)
        j = torch.arange(kv_len, device=device)
        mask = (j[None, None, :] <= positions[:, :, None]).unsqueeze(1)  # (B, 1, T, kv_len)
        return Step(positions=positions, valid=valid, kv_len=kv_len, mask=mask)

    def advance(self, seq_len: int, input_lengths: torch.Tensor | None = None) -> None:
        """Count the tokens of the step just run as cached."""
        if input_lengths is None:
            self.lengths += seq_len
        else:
            self.lengths += input_lengths.to(device=self.lengths.device, dtype=torch.long)


# Step, fresh_step and the old layer-cache names are imported from here by earlier code.
__all__ = ["DenseKV", "FP8LatentKV", "IndexedLatentKV", "KVCache", "LatentKV", "LayerCache", "Step",
           "fresh_step"]
