"""A learning rate per variant: pinned (``--lr mha=3e-3,mla=2e-3``), or picked from a grid by a
short pilot (``--lr-grid 1e-3,2e-3,4e-3``): one seed of its own, a fraction of the steps, the
LR with the lowest pilot validation loss wins. Published sweeps find different best LRs per
attention variant (marin-community/marin issue #7381: 0.97x for GQA, 0.92x for MLA), so one LR
for all would favour whichever variant it happens to suit.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

from latentattn.errors import LatentAttnError

PILOT_SEED = 1_000  # not one of the compared seeds: the pick is not fitted to the runs it judges
DEFAULT_PILOT_FRACTION = 0.25


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
    """The LR with the lowest pilot loss; a tie goes to the smaller LR (the safer one)."""
    if not losses:
        raise LRError("no pilot losses to pick a learning rate from")
    return min(sorted(losses), key=lambda lr: (losses[lr], lr))


def on_edge(grid: Sequence[float], chosen: float) -> bool:
    """A pick at either end of a grid of 3+ values says the grid should be widened."""
    return len(grid) >= 3 and chosen in (min(grid), max(grid))


__all__ = ["DEFAULT_PILOT_FRACTION", "PILOT_SEED", "LRError", "check_labels", "on_edge", "parse_grid",
           "parse_lrs", "pick"]
