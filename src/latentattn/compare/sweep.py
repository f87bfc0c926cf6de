"""``--sweep name=v1,v2,...``: the documents' open questions as extra variants.

How much compression can the latent take (``kv_lora_rank``, which MLA and MLA+DSA share) and how
do compression and sparsity interact (``index_topk``, DSA only)? Each value is one more variant;
two names at once give the grid (every DSA variant at every rank and every top-k).
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass

from latentattn.errors import LatentAttnError

# name -> the kinds it varies
SWEEPABLE: dict[str, tuple[str, ...]] = {"kv_lora_rank": ("mla", "dsa"), "index_topk": ("dsa",)}


class SweepError(LatentAttnError):
    """A ``--sweep`` value that cannot be parsed or names an unknown field."""


def parse_sweeps(specs: Sequence[str]) -> dict[str, tuple[int, ...]]:
    """``["kv_lora_rank=8,16", "index_topk=16,32"]`` (or the two comma-joined in one string)
    -> ``{"kv_lora_rank": (8, 16), "index_topk": (16, 32)}``, values sorted, duplicates dropped."""
    out: dict[str, list[int]] = {}
    for spec in specs:
        name: str | None = None
        for token in (t.strip() for t in spec.split(",")):
            if not token:
                continue
            if "=" in token:
                name, _, token = (s.strip() for s in token.partition("="))
                if name not in SWEEPABLE:
                    raise SweepError(f"--sweep: unknown name {name!r}; choose from "
                                     f"{', '.join(SWEEPABLE)}")
                if name in out:
                    raise SweepError(f"--sweep: {name} is given twice")
                out[name] = []
                if not token:
                    continue
            if name is None:
                raise SweepError(f"--sweep: expected name=v1,v2,... , got {spec!r}")
            try:
                value = int(token)
            except ValueError:
                raise SweepError(f"--sweep {name}: {token!r} is not an integer") from None
            if value < 1:
                raise SweepError(f"--sweep {name}: values must be positive, got {value}")
            out[name].append(value)
    for name, values in out.items():
        if not values:
            raise SweepError(f"--sweep {name}: no values given")
    return {name: tuple(sorted(set(values))) for name, values in out.items()}


@dataclass(frozen=True)
class SweepPoint:
    """One swept variant: ``kind`` (mla or dsa) with some FamilySize fields changed."""

    kind: str
    values: tuple[tuple[str, int], ...]

    @property
    def label(self) -> str:
        return f"{self.kind}[" + ",".join(f"{k}={v}" for k, v in self.values) + "]"


def sweep_points(sweeps: dict[str, tuple[int, ...]]) -> list[SweepPoint]:
    """MLA at every kv_lora_rank; DSA at every (kv_lora_rank, index_topk) combination swept."""
    points = []
    for kind in ("mla", "dsa"):
        names = [n for n in SWEEPABLE if n in sweeps and kind in SWEEPABLE[n]]
        if not names:
            continue
        for combo in itertools.product(*(sweeps[n] for n in names)):
            points.append(SweepPoint(kind, tuple(zip(names, combo, strict=True))))
    return points
