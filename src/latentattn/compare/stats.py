"""Mean and spread over seeds, and when two variants cannot be told apart.

The rule is deliberately simple and stated in every report: two variants are *within noise*
when the difference of their mean validation losses is smaller than the larger of their two
seed standard deviations (sample std, n - 1). With one seed the spread is unknown and no
difference is called real or noise.
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

NOISE_RULE = ("two variants are within noise when |difference of mean val loss| < the larger of "
              "their seed standard deviations (sample std over seeds)")


@dataclass(frozen=True)
class Summary:
    values: tuple[float, ...]

    @classmethod
    def of(cls, values: Sequence[float]) -> Summary:
        return cls(tuple(float(v) for v in values))

    @property
    def n(self) -> int:
        return len(self.values)

    @property
    def mean(self) -> float:
        return statistics.fmean(self.values)

    @property
    def std(self) -> float | None:
        """Sample standard deviation over seeds; None with one seed (unknown, not zero)."""
        return statistics.stdev(self.values) if self.n > 1 else None

    def fmt(self, digits: int = 3) -> str:
        if self.std is None:
            return f"{self.mean:.{digits}f}"
        return f"{self.mean:.{digits}f} ± {self.std:.{digits}f}"

    def as_dict(self) -> dict[str, Any]:
        return {"mean": self.mean, "std": self.std, "n": self.n, "values": list(self.values)}


def within_noise(a: Summary, b: Summary) -> bool | None:
    """True / False by :data:`NOISE_RULE`; None when either has a single seed."""
    if a.std is None or b.std is None:
        return None
    return abs(a.mean - b.mean) < max(a.std, b.std)


def noise_pairs(named: Sequence[tuple[str, Summary]]) -> list[tuple[str, str]]:
    """Every pair of variants whose losses are within noise of each other."""
    return [(na, nb) for i, (na, a) in enumerate(named) for nb, b in named[i + 1:]
            if within_noise(a, b)]


def pareto_front(points: Sequence[tuple[float, float]]) -> list[int]:
    """Indices of the (kv bytes, loss) points that no other point beats on both axes (smaller is
    better on each), sorted by kv bytes."""
    front = []
    for i, (x, y) in enumerate(points):
        dominated = any(x2 <= x and y2 <= y and (x2, y2) != (x, y) for x2, y2 in points)
        if not dominated:
            front.append(i)
    return sorted(front, key=lambda i: points[i])
