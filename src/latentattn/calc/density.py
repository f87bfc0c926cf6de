"""How sparse DSA's top-k selection is over a causal window: the share of the visible keys a
query keeps, from ``seq_len`` and ``index_topk`` alone (next-facts section 3.3, "DSA density").

Query ``t`` (0-based) sees ``t + 1`` keys and keeps ``min(k, t + 1)`` of them, so a window keeps
``k (k + 1) / 2 + (L - k) k`` of its ``L (L + 1) / 2`` causal pairs, and the mean per-query
share is about ``(k + k ln(L / k)) / L``: k = L / 4 keeps 59% per query (44% of the pairs),
k = L / 16 keeps 23% (12%), DeepSeek-V3.2 (k = 2048 at L = 128K) 8% (3.1%).
"""

from __future__ import annotations

from dataclasses import dataclass


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


__all__ = ["Density", "topk_density"]
