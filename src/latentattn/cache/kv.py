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
    """All layers' caches plus the per-row lengths they share.

    ``lengths`` (B,) lives on the cache's device; the host keeps the same counts as Python ints
    (``host_lengths``), so planning a step needs nothing back from the device: no ``.item()``, no
    ``bool(tensor)``, nothing that would make a decode step wait on its device or stop a
    compiler's graph (gpt-fast's design: fixed buffers, positions as a tensor). Only a ragged
    step (``input_lengths`` given) reads its lengths back, once, on the host.

    ``static``: every step after a fresh prefill reads all ``capacity`` positions under a mask
    built from the positions, so a decode step has the same shapes every call and compiles once
    (``latentattn.compile``); otherwise (the default, eager) a step reads only the longest row.
    """

    def __init__(self, layers: list[LayerCache], batch: int, capacity: int,
                 device: torch.device | str | None = None, static: bool = False) -> None:
        self.layers = layers
        self.batch = batch
        self.capacity = capacity
        self.static = static
        self.lengths = torch.zeros(batch, dtype=torch.long, device=device)
        self.host_lengths = [0] * batch
        self._ragged: tuple[torch.Tensor, list[int]] | None = None  # the last ragged read

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
        self.fill(0)

    def fill(self, length: int) -> None:
        """Say every row holds ``length`` tokens (benchmarks that time one step over a cache
        they filled themselves)."""
        self.lengths.fill_(length)
        self.host_lengths = [length] * self.batch

    def _new_tokens(self, seq_len: int, input_lengths: torch.Tensor | None) -> list[int]:
        """How many real tokens each row gets: read back from the device for a ragged step, once
        (``advance`` after ``step`` with the same tensor reuses the read)."""
        if input_lengths is None:
            return [seq_len] * self.batch
        if self._ragged is not None and self._ragged[0] is input_lengths:
            return self._ragged[1]
        new = [int(n) for n in input_lengths.tolist()]
        self._ragged = (input_lengths, new)
        return new

    def _reserve(self, ends: list[int]) -> None:
        """Make room for each row to hold ``ends[b]`` tokens (a paged cache takes pages here)."""

    def step(self, seq_len: int, input_lengths: torch.Tensor | None = None) -> Step:
        """Plan a forward of seq_len new tokens per row (input_lengths (B,) of them real)."""
        device = self.lengths.device
        new = self._new_tokens(seq_len, input_lengths)
        ends = [n + m for n, m in zip(self.host_lengths, new, strict=True)]
        longest = max(ends)
        if longest > self.capacity:
            row = ends.index(longest)
            raise CacheOverflowError(
                f"KV cache overflow: row {row} would hold {longest} tokens but the cache "
                f"was allocated for {self.capacity}"
            )
        self._reserve(ends)
        t = torch.arange(seq_len, device=device)
        positions = self.lengths[:, None] + t  # (B, T)
        valid = None
        if input_lengths is not None and min(new) < seq_len:
            valid = t[None, :] < input_lengths.to(device=device, dtype=torch.long)[:, None]
            # Padded tokens are never written; park their positions on a legal index.
            positions = torch.where(valid, positions, positions.clamp(max=self.capacity - 1))
        if valid is None and max(self.host_lengths) == 0:
            return Step(positions=positions, valid=None, kv_len=seq_len, mask=None)
        kv_len = self.capacity if self.static else longest
        j = torch.arange(kv_len, device=device)
        mask = (j[None, None, :] <= positions[:, :, None]).unsqueeze(1)  # (B, 1, T, kv_len)
        return Step(positions=positions, valid=valid, kv_len=kv_len, mask=mask)

    def advance(self, seq_len: int, input_lengths: torch.Tensor | None = None) -> None:
        """Count the tokens of the step just run as cached."""
        new = self._new_tokens(seq_len, input_lengths)
        self.host_lengths = [n + m for n, m in zip(self.host_lengths, new, strict=True)]
        self._ragged = None
        if input_lengths is None:
            self.lengths += seq_len
        else:
            self.lengths += input_lengths.to(device=self.lengths.device, dtype=torch.long)


# Step, fresh_step and the old layer-cache names are imported from here by earlier code.
__all__ = ["DenseKV", "FP8LatentKV", "IndexedLatentKV", "KVCache", "LatentKV", "LayerCache", "Step",
           "fresh_step"]
