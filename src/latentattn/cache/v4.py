"""DeepSeek-V4's layer cache: a sliding-window ring, compressed entries and the compressors'
pending tokens, all preallocated stores (DeepSeek-V4 report section 2.3; transformers'
``DeepseekV4HCACache`` / ``DeepseekV4CSACache`` keep the same state in growing tensors).

Per layer and row:

* ``window``: a :class:`Ring` of the last ``sliding_window`` KV vectors (head_dim each); position
  p sits in slot p % W. Every layer type has one.
* one :class:`CompressorState` per compressor (the CSA/HCA main compressor, and the CSA indexer's):
  :class:`Entries` (capacity // rate compressed vectors: entry e pools tokens [e * rate, (e + 1)
  * rate), plus the window before it for CSA's overlapping pooling) and rings of the last
  ``span`` tokens' projected kv and gate (span = 2 * rate with overlap, else rate): the tokens of
  windows not yet complete and, for CSA, the previous window that the next entry still reads.
  An entry is written exactly when its window's last token arrives.

Every write takes the tokens of one forward call as :class:`~latentattn.cache.step.Step` plans them
(per-row positions; right-padded rows have ``valid``): padded tokens are never stored, and a ring
only receives each row's last ``span`` real tokens, so no slot is written twice in one call.
The stores follow :class:`~latentattn.cache.store.Store`; :func:`v4_layer_cache` builds a layer's
from its :class:`V4Spec` (what ``cache.build.build_cache`` calls).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from latentattn.cache.layer import LayerCache
from latentattn.cache.step import Step
from latentattn.cache.store import Store


def row_starts(step: Step) -> tuple[torch.Tensor, torch.Tensor]:
    """(start (B,), new (B,)): each row's cached length before the step and its real new tokens."""
    start = step.positions[:, 0]
    t = step.positions.shape[1]
    new = torch.full_like(start, t) if step.valid is None else step.valid.sum(dim=1)
    return start, new


class Ring(Store):
    """The last ``span`` tokens of each row, slot p % span for position p: (B, span, width)."""

    def __init__(self, batch: int, span: int, width: int, dtype: torch.dtype,
                 device: torch.device | str | None) -> None:
        self.span = span
        self.data = torch.zeros(batch, span, width, dtype=dtype, device=device)

    @property
    def buffers(self) -> tuple[torch.Tensor, ...]:
        return (self.data,)

    def ordered(self, start: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The ring in position order for rows that hold ``start`` tokens: (B, span, width) for
        positions start - span .. start - 1, and (B, span) bool, False where position < 0."""
        i = torch.arange(self.span, device=start.device)
        pos = start[:, None] - self.span + i  # (B, span)
        slots = pos % self.span
        rows = self.data.gather(1, slots[..., None].expand(-1, -1, self.data.shape[-1]))
        return rows, pos >= 0

    def write(self, step: Step, values: torch.Tensor) -> None:
        """Store each row's last ``span`` real tokens of values (B, T, width)."""
        start, new = row_starts(step)
        t = torch.arange(values.shape[1], device=values.device)
        keep = (t[None, :] < new[:, None]) & (t[None, :] >= new[:, None] - self.span)
        b, tt = keep.nonzero(as_tuple=True)
        self.data[b, (start[b] + tt) % self.span] = values[b, tt].to(self.data.dtype)

    def views(self, step: Step) -> tuple[torch.Tensor, ...]:
        return (self.data,)

    def read(self, step: Step, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The span tokens before each row's first new one, in position order."""
        rows, _ = self.ordered(row_starts(step)[0])
        return rows if dtype is None else rows.to(dtype)


class Entries(Store):
    """Compressed entries (B, capacity // rate, width); entry e of a row is written once, when the
    row's token (e + 1) * rate - 1 arrives."""

    def __init__(self, batch: int, capacity: int, rate: int, width: int, dtype: torch.dtype,
                 device: torch.device | str | None) -> None:
        self.rate = rate
        self.data = torch.zeros(batch, capacity // rate, width, dtype=dtype, device=device)

    @property
    def buffers(self) -> tuple[torch.Tensor, ...]:
        return (self.data,)

    def store(self, values: torch.Tensor, index: torch.Tensor, ok: torch.Tensor) -> None:
        """data[b, index[b, j]] = values[b, j] where ok[b, j] (index (B, J), values (B, J, w))."""
        b, j = ok.nonzero(as_tuple=True)
        self.data[b, index[b, j]] = values[b, j].to(self.data.dtype)

    def write(self, step: Step, values: torch.Tensor) -> None:
        """values (B, J, width): the candidate entries e = start // rate + j of the step; those
        whose window completes within it are stored."""
        start, new = row_starts(step)
        e = torch.div(start, self.rate, rounding_mode="floor")[:, None] + torch.arange(
            values.shape[1], device=values.device)
        done = torch.div(start + new, self.rate, rounding_mode="floor")
        self.store(values, e, e < done[:, None])

    def views(self, step: Step) -> tuple[torch.Tensor, ...]:
        return (self.data[:, : step.kv_len // self.rate],)

    def read(self, step: Step, dtype: torch.dtype | None = None) -> torch.Tensor:
        """Every entry complete after the step (a row's later slots are zero and unseen)."""
        (entries,) = self.views(step)
        return entries if dtype is None else entries.to(dtype)


@dataclass(frozen=True)
class CompressorSpec:
    """One compressor's cache shape: an entry per ``rate`` tokens of ``width`` values, and the
    last ``span`` tokens' projected kv and gate of ``proj_width`` values each."""

    rate: int
    width: int
    proj_width: int
    span: int


@dataclass(frozen=True)
class V4Spec:
    """What a V4 layer caches: a ``window``-token ring of ``head_dim`` keys, and for CSA/HCA its
    compressor's state (and CSA's indexer's)."""

    window: int
    head_dim: int
    compressor: CompressorSpec | None = None
    indexer: CompressorSpec | None = None


class CompressorState:
    """One compressor's stores: ``entries_store`` and the pending ``kv`` and ``gate`` rings."""

    def __init__(self, spec: CompressorSpec, batch: int, capacity: int, dtype: torch.dtype,
                 device: torch.device | str | None) -> None:
        self.rate = spec.rate
        self.entries_store = Entries(batch, capacity, spec.rate, spec.width, dtype, device)
        self.kv = Ring(batch, spec.span, spec.proj_width, dtype, device)
        self.gate = Ring(batch, spec.span, spec.proj_width, dtype, device)

    @property
    def entries(self) -> torch.Tensor:
        return self.entries_store.data

    def store_entries(self, values: torch.Tensor, index: torch.Tensor, ok: torch.Tensor) -> None:
        self.entries_store.store(values, index, ok)

    @property
    def nbytes(self) -> int:
        return self.entries_store.nbytes + self.kv.nbytes + self.gate.nbytes


class V4LayerKV(LayerCache):
    """One V4 layer's cache: the ``window`` store always; ``compressor`` and ``indexer``
    (:class:`CompressorState`, None where a layer type has none) group the CSA/HCA stores, which
    the layer cache also holds by name (``compressed``, ``pending_kv``, ``pending_gate``, and
    ``index_keys``, ``index_pending_kv``, ``index_pending_gate``)."""

    def __init__(self, window: Ring, compressor: CompressorState | None = None,
                 indexer: CompressorState | None = None) -> None:
        stores: dict[str, Store] = {"window": window}
        for prefix, state in (("", compressor), ("index_", indexer)):
            if state is not None:
                stores[prefix + ("keys" if prefix else "compressed")] = state.entries_store
                stores[prefix + "pending_kv"] = state.kv
                stores[prefix + "pending_gate"] = state.gate
        super().__init__(**stores)
        self.__dict__.update(window=window, compressor=compressor, indexer=indexer)

    window: Ring
    compressor: CompressorState | None
    indexer: CompressorState | None


def v4_layer_cache(spec: V4Spec, batch: int, capacity: int, dtype: torch.dtype,
                   device: torch.device | str | None = None) -> V4LayerKV:
    """A V4 layer's cache for ``batch`` rows of up to ``capacity`` tokens, in ``dtype``."""
    states = [None if s is None else CompressorState(s, batch, capacity, dtype, device)
              for s in (spec.compressor, spec.indexer)]
    return V4LayerKV(Ring(batch, spec.window, spec.head_dim, dtype, device), *states)


__all__ = ["CompressorSpec", "CompressorState", "Entries", "Ring", "V4LayerKV", "V4Spec",
           "row_starts", "v4_layer_cache"]
