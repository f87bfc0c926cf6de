"""DeepSeek-V4's layer cache: a sliding-window ring, compressed entries and the compressors'
pending tokens, all preallocated (DeepSeek-V4 report section 2.3; transformers'
``DeepseekV4HCACache`` / ``DeepseekV4CSACache`` keep the same state in growing tensors).

Per layer and row:

* ``window``: a ring of the last ``sliding_window`` KV vectors (head_dim each); position p sits
  in slot p % W. Every layer type has one.
* one :class:`CompressorState` per compressor (the CSA/HCA main compressor, and the CSA indexer's):
  ``entries`` (capacity // rate compressed vectors: entry e pools tokens [e * rate, (e + 1) *
  rate), plus the previous window for CSA's overlapping pooling) and a ring of the last
  ``span`` tokens' projected kv and gate (span = 2 * rate with overlap, else rate), the tokens of
  windows not yet complete and, for CSA, the previous window whose first series entry e still
  reads. An entry is written exactly when its window's last token arrives.

Every write takes the tokens of one forward call as :class:`~latentattn.cache.kv.Step` plans them
(per-row positions; right-padded rows have ``valid``): padded tokens are never stored, and a ring
only receives each row's last ``span`` real tokens, so no slot is written twice in one call.
"""

from __future__ import annotations

import torch

from latentattn.cache.kv import LayerCache, Step


def row_starts(step: Step) -> tuple[torch.Tensor, torch.Tensor]:
    """(start (B,), new (B,)): each row's cached length before the step and its real new tokens."""
    start = step.positions[:, 0]
    t = step.positions.shape[1]
    new = torch.full_like(start, t) if step.valid is None else step.valid.sum(dim=1)
    return start, new


class Ring:
    """The last ``span`` tokens of each row, slot p % span for position p: (B, span, *shape)."""

    def __init__(self, batch: int, span: int, width: int, dtype: torch.dtype,
                 device: torch.device | str | None) -> None:
        self.span = span
        self.data = torch.zeros(batch, span, width, dtype=dtype, device=device)

    def ordered(self, start: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The ring in position order for rows that hold ``start`` tokens: (B, span, width) for
        positions start - span .. start - 1, and (B, span) bool, False where position < 0."""
        i = torch.arange(self.span, device=start.device)
        pos = start[:, None] - self.span + i  # (B, span)
        slots = pos % self.span
        rows = self.data.gather(1, slots[..., None].expand(-1, -1, self.data.shape[-1]))
        return rows, pos >= 0

    def write(self, values: torch.Tensor, step: Step) -> None:
        """Store each row's last ``span`` real tokens of values (B, T, width)."""
        start, new = row_starts(step)
        t = torch.arange(values.shape[1], device=values.device)
        keep = (t[None, :] < new[:, None]) & (t[None, :] >= new[:, None] - self.span)
        b, tt = keep.nonzero(as_tuple=True)
        self.data[b, (start[b] + tt) % self.span] = values[b, tt].to(self.data.dtype)

    @property
    def nbytes(self) -> int:
        return self.data.numel() * self.data.element_size()


class CompressorState:
    """One compressor's cache: compressed entries (B, capacity // rate, width) and the pending
    tokens' projected kv and gate (rings of ``span`` tokens, ``proj_width`` each)."""

    def __init__(self, batch: int, capacity: int, rate: int, width: int, proj_width: int,
                 span: int, dtype: torch.dtype, device: torch.device | str | None) -> None:
        self.rate = rate
        self.entries = torch.zeros(batch, capacity // rate, width, dtype=dtype, device=device)
        self.kv = Ring(batch, span, proj_width, dtype, device)
        self.gate = Ring(batch, span, proj_width, dtype, device)

    def store_entries(self, values: torch.Tensor, index: torch.Tensor, ok: torch.Tensor) -> None:
        """entries[b, index[b, j]] = values[b, j] where ok[b, j] (index (B, J), values (B, J, w))."""
        b, j = ok.nonzero(as_tuple=True)
        self.entries[b, index[b, j]] = values[b, j].to(self.entries.dtype)

    @property
    def nbytes(self) -> int:
        return self.entries.numel() * self.entries.element_size() + self.kv.nbytes + self.gate.nbytes


class V4LayerKV(LayerCache):
    """One V4 layer's cache: ``window`` always, ``compressor`` for CSA and HCA layers, ``indexer``
    for CSA layers (None where a layer type has no such part)."""

    def __init__(self, window: Ring, compressor: CompressorState | None = None,
                 indexer: CompressorState | None = None) -> None:
        self.window = window
        self.compressor = compressor
        self.indexer = indexer
        parts: list[torch.Tensor] = [window.data]
        for state in (compressor, indexer):
            if state is not None:
                parts += [state.entries, state.kv.data, state.gate.data]
        self.buffers = tuple(parts)
