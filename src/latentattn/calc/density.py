"""How sparse DSA's top-k selection is over a causal window: the share of the visible keys a
query keeps, from ``seq_len`` and ``index_topk`` alone (DSA's top-k selection: DeepSeek-V3.2,
arXiv 2512.02556, and its ``inference/model.py`` in deepseek-ai/DeepSeek-V3.2-Exp).

Query ``t`` (0-based) sees ``t + 1`` keys and keeps ``min(k, t + 1)`` of them, so a window keeps
``k (k + 1) / 2 + (L - k) k`` of its ``L (L + 1) / 2`` causal pairs, and the mean per-query
share is about ``(k + k ln(L / k)) / L``: k = L / 4 keeps 59% per query (44% of the pairs),
k = L / 16 keeps 23% (12%), DeepSeek-V3.2 (k = 2048 at L = 128K) 8% (3.1%).

DeepSeek-V4's layers read a sliding window of raw tokens plus compressed entries, each standing
for a block of ``rate`` tokens (:func:`v4_read_fraction`): what share of its visible tokens a
query's window and entries cover, and how many keys it attends.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from latentattn.config import CSA, HCA, SLIDING, V4AttentionConfig


@dataclass(frozen=True)
class Density:
    seq_len: int
    topk: int
    per_query: float  # mean over the window's queries of kept / visible keys
    pairs: float  # kept causal (query, key) pairs / all causal pairs

    def as_dict(self) -> dict[str, float]:
        return {"seq_len": self.seq_len, "topk": self.topk, "per_query": self.per_query,
                "pairs": self.pairs}


def topk_density(seq_len: int, topk: int) -> Density:
    """Exact shares for a causal window of ``seq_len`` queries each keeping ``topk`` keys."""
    if seq_len < 1 or topk < 1:
        raise ValueError(f"seq_len and topk must be positive, got {seq_len} and {topk}")
    kept = [min(topk, t + 1) for t in range(seq_len)]
    per_query = sum(k / (t + 1) for t, k in enumerate(kept)) / seq_len
    return Density(seq_len, topk, per_query, sum(kept) / (seq_len * (seq_len + 1) / 2))




@dataclass(frozen=True)
class V4Read:
    """What DeepSeek-V4's queries read over a causal window of ``seq_len`` tokens (from position
    0), per layer type and averaged over a model's layers (:func:`v4_read_fraction`)."""

    seq_len: int
    # Mean over the window's queries of (tokens covered / visible tokens), per layer type present.
    covered: dict[str, float]
    # Mean over the queries of (keys attended: window tokens + compressed entries) / visible tokens.
    keys: dict[str, float]
    per_query: float  # ``covered`` averaged over the model's layers (each layer's type)
    keys_per_query: float  # ``keys`` averaged over the model's layers

    def as_dict(self) -> dict[str, Any]:
        return {"seq_len": self.seq_len, "covered": dict(self.covered), "keys": dict(self.keys),
                "per_query": self.per_query, "keys_per_query": self.keys_per_query}


def v4_tokens_read(t: int, window: int, rate: int = 0, topk: int | None = None) -> tuple[int, int]:
    """(tokens covered, keys attended) for the query at 0-based position ``t`` of a V4 layer:
    ``window`` raw tokens (its own included: min(window, t + 1) of them) and, with ``rate`` > 0,
    compressed entries, one per complete block of ``rate`` tokens ((t + 1) // rate of them
    visible): all of them (HCA, ``topk`` None) or ``topk`` of them (CSA). Each entry stands for
    its block's ``rate`` tokens, so the covered tokens are min(t + 1, window part + rate x
    entries): the union of the window and the entries' blocks. For HCA that is exact (the blocks
    cover [0, rate * entries), the window the last tokens: they overlap exactly when together
    they reach every token). For CSA it is the union when the indexer's entries lie before the
    window where enough of them do, the most k entries can cover; the picks are the indexer's.
    CSA requires window >= rate (then the one block straddling the window's start is complete)."""
    own = min(window, t + 1)
    if rate == 0:
        return own, own
    if topk is not None and window < rate:
        raise ValueError(f"window ({window}) < CSA rate ({rate}): the covered-token count assumes "
                         "the block straddling the window's start is complete")
    entries = (t + 1) // rate
    if topk is not None:
        entries = min(topk, entries)
    return min(t + 1, own + rate * entries), own + entries


def v4_read_fraction(seq_len: int, a: V4AttentionConfig) -> V4Read:
    """Shares of its visible tokens a query of ``a``'s layers reads (:func:`v4_tokens_read` with
    its window, rates and top-k), averaged over the ``seq_len`` queries of a window from position
    0 and over ``a.layer_types``. A sliding layer reads min(W, t + 1) of t + 1 tokens, as a DSA
    query keeps min(k, t + 1) keys (:func:`topk_density`)."""
    if seq_len < 1:
        raise ValueError(f"seq_len must be positive, got {seq_len}")
    layer_types: Sequence[str] = a.layer_types
    shapes = {SLIDING: (0, None), CSA: (a.csa_rate, a.index_topk), HCA: (a.hca_rate, None)}
    window = a.sliding_window
    covered, keys = {}, {}
    for kind in dict.fromkeys(layer_types):
        rate, topk = shapes[kind]
        reads = [v4_tokens_read(t, window, rate, topk) for t in range(seq_len)]
        covered[kind] = sum(c / (t + 1) for t, (c, _) in enumerate(reads)) / seq_len
        keys[kind] = sum(k / (t + 1) for t, (_, k) in enumerate(reads)) / seq_len
    n = len(layer_types)
    return V4Read(seq_len, covered, keys, sum(covered[x] for x in layer_types) / n,
                  sum(keys[x] for x in layer_types) / n)


__all__ = ["Density", "V4Read", "topk_density", "v4_read_fraction", "v4_tokens_read"]
