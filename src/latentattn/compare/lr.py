"""A learning rate per variant: pinned (``--lr mha=3e-3,mla=2e-3``), or picked from a grid by a
pilot (``--lr-grid 1e-3,2e-3,4e-3``): one seed of its own, ``--pilot-fraction`` of the steps
(all of them by default), the LR with the lowest pilot validation loss wins. Published sweeps
find different best LRs per attention variant (marin-community/marin issue #7381: 0.97x for
GQA, 0.92x for MLA), so one LR for all would favour whichever variant it happens to suit.

The search does not stop at the grid's edge: while the best LR is the grid's largest (or
smallest), one more LR a grid ratio beyond it is piloted (:func:`beyond`), at most
``--lr-extend`` times, so the pick is a minimum with a worse LR on each side. The pilot trains
the whole schedule by default: a shorter one decays its LR sooner, and the best peak LR falls
as the horizon grows (Bjorck et al., "Scaling Optimal LR Across Token Horizons", arXiv
2409.19913), so a short pilot favours high LRs by construction.

One pilot seed can pick an LR that only some seeds survive: near the top of the stable range the
runs of one LR split into converged and stalled ones, and a lucky pilot seed then picks an LR most
of the compared seeds lose at. ``--pilot-seeds N`` pilots each LR on N seeds of its own and picks by
their mean (:func:`mean_loss`; 2 by default): an LR half the seeds fail at cannot win on one
seed's luck.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

from latentattn.errors import LatentAttnError

PILOT_SEED = 1_000  # not one of the compared seeds: the pick is not fitted to the runs it judges
DEFAULT_PILOT_FRACTION = 1.0
DEFAULT_EXTEND = 3  # one grid ratio at a time: x8 beyond a x2 grid's edge at most
# Two: on CPython's pydoc text, MHA's and GQA's one-seed picks (6e-3, 1.2e-2) were LRs at which
# a second pilot seed stalled (+0.10, +0.15 nats/byte), and five of GQA's seven compared seeds
# with it. The pilots are about a quarter of a comparison's runs; each seed more adds as many.
DEFAULT_PILOT_SEEDS = 2


def pilot_seeds(n: int) -> list[int]:
    """The seeds of an LR's ``n`` pilots: PILOT_SEED, PILOT_SEED + 1, ... (none a compared seed
    while a comparison has fewer than PILOT_SEED seeds)."""
    return [PILOT_SEED + i for i in range(n)]


def mean_loss(losses: Sequence[float]) -> float:
    """One LR's pilot loss: the mean over its pilot seeds, infinite when any seed diverged (a LR
    that diverges on one seed in N is not safe to train seven on)."""
    if not losses:
        raise LRError("no pilot losses to average")
    if not all(math.isfinite(x) for x in losses):
        return math.inf
    return math.fsum(losses) / len(losses)


class LRError(LatentAttnError):
    """An --lr or --lr-grid value that cannot be used."""


def _positive(text: str, flag: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise LRError(f"{flag}: {text!r} is not a number") from None
    if not (math.isfinite(value) and value > 0):
        raise LRError(f"{flag}: learning rates must be positive, got {text}")
    return value


def parse_grid(text: str) -> tuple[float, ...]:
    """``1e-3,2e-3,4e-3`` -> sorted, distinct, positive values."""
    values = sorted({_positive(v.strip(), "--lr-grid") for v in text.split(",") if v.strip()})
    if not values:
        raise LRError(f"--lr-grid: no values in {text!r}")
    return tuple(values)


def parse_lrs(text: str) -> tuple[float | None, dict[str, float]]:
    """``3e-3`` (one LR for every variant) or ``mha=3e-3,mla=2e-3`` (pinned per label): returns
    (the common LR or None, the pinned ones)."""
    if "=" not in text:
        return _positive(text.strip(), "--lr"), {}
    pinned: dict[str, float] = {}
    for part in (p.strip() for p in text.split(",") if p.strip()):
        label, eq, value = part.partition("=")
        if not eq or not label.strip():
            raise LRError(f"--lr: expected LABEL=VALUE pairs, got {part!r}")
        if label.strip() in pinned:
            raise LRError(f"--lr: {label.strip()} is given twice")
        pinned[label.strip()] = _positive(value.strip(), "--lr")
    return None, pinned


def check_labels(pinned: Mapping[str, float], labels: Sequence[str]) -> None:
    unknown = sorted(set(pinned) - set(labels))
    if unknown:
        raise LRError(f"--lr names {', '.join(unknown)}, which is not a variant of this run "
                      f"(variants: {', '.join(labels)})")


def pick(losses: Mapping[float, float]) -> float:
    """The LR with the lowest pilot loss; a tie goes to the smaller LR (the safer one); a
    diverged pilot (NaN or inf loss) loses to every finite one."""
    if not losses:
        raise LRError("no pilot losses to pick a learning rate from")
    return min(sorted(losses), key=lambda lr: (losses[lr] if math.isfinite(losses[lr]) else math.inf, lr))


def on_edge(grid: Sequence[float], chosen: float) -> bool:
    """A pick at either end of a grid of 3+ values says the grid should be widened."""
    return len(grid) >= 3 and chosen in (min(grid), max(grid))


def ratio(grid: Sequence[float]) -> float | None:
    """The grid's own step, the geometric mean of its neighbours' ratios (None below 2 values)."""
    if len(grid) < 2:
        return None
    return float((max(grid) / min(grid)) ** (1 / (len(grid) - 1)))


def beyond(losses: Mapping[float, float], base: Sequence[float]) -> float | None:
    """The next LR to pilot when the best of ``losses`` sits at an edge of the LRs piloted so far:
    one step of ``base``'s ratio past that edge; None when the best is interior (or ``base``, the
    grid given, has one value: nothing to search)."""
    step = ratio(base)
    if step is None or len(losses) < 2:
        return None
    best, lrs = pick(losses), sorted(losses)
    # 12 significant digits: 1e-4 x 1e3 is 0.1, not 0.10000000000000002 (LRs are keyed by text).
    if best == lrs[-1]:
        return float(f"{best * step:.12g}")
    if best == lrs[0]:
        return float(f"{best / step:.12g}")
    return None


def check_extend(extend: int) -> int:
    if extend < 0:
        raise LRError(f"--lr-extend must be >= 0, got {extend}")
    return extend


def check_pilot_seeds(n: int) -> int:
    if not 1 <= n < PILOT_SEED:
        raise LRError(f"--pilot-seeds must lie in [1, {PILOT_SEED - 1}], got {n}")
    return n


class GridEdge(LRError):
    """The best LR is still at an edge after ``--lr-extend`` extensions: the bound is reached."""

    def __init__(self, label: str, losses: Mapping[float, float], extend: int) -> None:
        best, lrs = pick(losses), sorted(losses)
        side = "largest" if best == lrs[-1] else "smallest"
        super().__init__(
            f"{label}: the LR pilot's best ({best:g}) is still the {side} LR tried "
            f"({', '.join(f'{x:g}' for x in lrs)}) after {extend} extension(s) of --lr-grid; the "
            "optimum lies outside: give an --lr-grid around it or a larger --lr-extend (the "
            "finished runs are kept in --out)")


__all__ = ["DEFAULT_EXTEND", "DEFAULT_PILOT_FRACTION", "DEFAULT_PILOT_SEEDS", "PILOT_SEED", "GridEdge",
           "LRError", "beyond", "check_extend", "check_labels", "check_pilot_seeds", "mean_loss",
           "on_edge", "parse_grid", "parse_lrs", "pick", "pilot_seeds", "ratio"]
