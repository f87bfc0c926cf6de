"""Mean and spread over seeds, and a paired test of each variant against MHA.

Runs are paired by seed (a seed fixes the initialisation and the data order for every variant;
Bouthillier et al., arXiv 2103.03098): the test is on the per-seed differences
``d_s = loss(variant, s) - loss(MHA, s)``. With ``n`` seeds, mean ``d`` and sample std ``s_d``:

* the 95% confidence interval of the mean difference, ``d ± t(0.975, n-1) · s_d / sqrt(n)``;
* an equivalence test against a margin ``δ`` fixed before the run, two one-sided t tests (TOST;
  Schuirmann 1987): equivalent at level 0.05 when the 90% interval lies inside ``(-δ, δ)``.

The verdict, in exactly these words (lower loss is better):

* ``equivalent``: the 90% interval lies inside the margin (a difference, if any, too small to
  matter by the margin's own definition, even where the 95% interval excludes 0);
* ``worse`` / ``better``: otherwise, the 95% interval lies above / below 0;
* ``inconclusive``: neither, or fewer than 2 seeds (no interval at all).
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from scipy import stats as scipy_stats

from latentattn.errors import ConfigError

Verdict = Literal["better", "worse", "equivalent", "inconclusive"]
VERDICTS: tuple[Verdict, ...] = ("better", "worse", "equivalent", "inconclusive")
DEFAULT_MARGIN = 0.02  # nats/byte; between arXiv 2506.09342's "parity" (+0.3%) and its 3-5% losses
RULE = ("paired by seed: mean of loss(variant) - loss(MHA) with its t-based 95% interval; "
        "'equivalent' when the 90% interval lies inside (-margin, +margin) (two one-sided tests at "
        "0.05), else 'worse'/'better' when the 95% interval excludes 0, else 'inconclusive'")


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


@dataclass(frozen=True)
class Paired:
    """``variant - reference`` per shared seed, and what they say (see the module docstring)."""

    seeds: tuple[int, ...]
    differences: tuple[float, ...]
    margin: float

    def __post_init__(self) -> None:
        if not (math.isfinite(self.margin) and self.margin > 0):
            raise ConfigError(f"the equivalence margin must be a positive number, got {self.margin}")

    @property
    def summary(self) -> Summary:
        return Summary.of(self.differences)

    @property
    def n(self) -> int:
        return self.summary.n

    @property
    def mean(self) -> float:
        return self.summary.mean

    @property
    def std(self) -> float | None:
        return self.summary.std

    def interval(self, level: float = 0.95) -> tuple[float, float] | None:
        """The two-sided ``level`` t interval of the mean difference; None under 2 seeds."""
        if self.std is None:
            return None
        half = float(scipy_stats.t.ppf(0.5 + level / 2, self.n - 1)) * self.std / math.sqrt(self.n)
        return self.mean - half, self.mean + half

    @property
    def p_value(self) -> float | None:
        """Two-sided one-sample t test of a zero mean difference."""
        if self.std is None:
            return None
        if self.std == 0:
            return 0.0 if self.mean != 0 else 1.0
        t = self.mean / (self.std / math.sqrt(self.n))
        return float(2 * scipy_stats.t.sf(abs(t), self.n - 1))

    @property
    def tost_p(self) -> float | None:
        """The TOST p-value: the larger of the two one-sided p's (H0: d <= -δ, H0: d >= +δ)."""
        if self.std is None:
            return None
        if self.std == 0:
            return 0.0 if abs(self.mean) < self.margin else 1.0
        se = self.std / math.sqrt(self.n)
        p_low = scipy_stats.t.sf((self.mean + self.margin) / se, self.n - 1)
        p_high = scipy_stats.t.cdf((self.mean - self.margin) / se, self.n - 1)
        return float(max(p_low, p_high))

    @property
    def verdict(self) -> Verdict:
        ci90, ci95 = self.interval(0.90), self.interval(0.95)
        if ci90 is None or ci95 is None:
            return "inconclusive"
        if -self.margin < ci90[0] and ci90[1] < self.margin:
            return "equivalent"
        if ci95[0] > 0:
            return "worse"
        if ci95[1] < 0:
            return "better"
        return "inconclusive"

    def fmt(self, digits: int = 3) -> str:
        """``+0.012 [-0.004, +0.028]``: the mean difference and its 95% interval."""
        ci = self.interval(0.95)
        if ci is None:
            return f"{self.mean:+.{digits}f} (1 seed: no interval)"
        return f"{self.mean:+.{digits}f} [{ci[0]:+.{digits}f}, {ci[1]:+.{digits}f}]"

    def as_dict(self) -> dict[str, Any]:
        return {"seeds": list(self.seeds), "differences": list(self.differences), "n": self.n,
                "mean": self.mean, "std": self.std, "ci95": self.interval(0.95),
                "ci90": self.interval(0.90), "p_value": self.p_value, "margin": self.margin,
                "tost_p": self.tost_p, "verdict": self.verdict}


def paired(variant: Mapping[int, float], reference: Mapping[int, float], margin: float) -> Paired:
    """Pair two variants' per-seed values on the seeds both have."""
    seeds = tuple(sorted(set(variant) & set(reference)))
    return Paired(seeds, tuple(variant[s] - reference[s] for s in seeds), margin)


def pareto_front(points: Sequence[tuple[float, float]]) -> list[int]:
    """Indices of the (kv bytes, loss) points that no other point beats on both axes (smaller is
    better on each), sorted by kv bytes."""
    front = []
    for i, (x, y) in enumerate(points):
        dominated = any(x2 <= x and y2 <= y and (x2, y2) != (x, y) for x2, y2 in points)
        if not dominated:
            front.append(i)
    return sorted(front, key=lambda i: points[i])
