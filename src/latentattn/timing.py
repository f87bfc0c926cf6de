"""What every measurement records and how it times: the machine it ran on, and wall-clock
milliseconds of repeated calls. Shared by the benchmarks and ``compare``."""

from __future__ import annotations

import os
import platform
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch

SLOW_CALL_S = 2.0  # calls slower than this get at most SLOW_REPEATS timed repeats
SLOW_REPEATS = 2


def machine_info() -> dict[str, Any]:
    """Platform, Python, torch (and transformers) versions, threads and the load average."""
    info: dict[str, Any] = {
        "platform": platform.platform(), "processor": platform.processor() or platform.machine(),
        "python": platform.python_version(), "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(), "cpu_count": os.cpu_count(),
    }
    if hasattr(os, "getloadavg"):
        # Other processes on a 2-core machine change decode timings several-fold: record it.
        info["loadavg_1_5_15_at_start"] = [round(x, 2) for x in os.getloadavg()]
    try:
        import transformers

        info["transformers"] = transformers.__version__
    except ImportError:
        info["transformers"] = None
    return info


def time_call(fn: Callable[[], object], repeats: int, after: Callable[[], None] | None = None,
              warmup: bool = True) -> list[float]:
    """Milliseconds of ``repeats`` calls after 1-2 warmups; slow calls get fewer repeats.

    ``after`` runs after each call, outside the timer (rolling a cache back). ``warmup=False``
    is for calls of many seconds, whose one-off allocation costs are noise.
    """
    def once() -> float:
        t0 = time.perf_counter()
        fn()
        ms = (time.perf_counter() - t0) * 1e3
        if after is not None:
            after()
        return ms

    if not warmup:
        return [once() for _ in range(max(1, repeats))]
    warm = once()
    if warm > SLOW_CALL_S * 1e3:
        repeats = min(repeats, SLOW_REPEATS)
    else:
        once()  # a second warmup: the first call pays one-off allocations
    return [once() for _ in range(max(1, repeats))]




@dataclass
class ReportHeader:
    """What every benchmark report starts with: where it ran (:func:`machine_info`), at which
    dims and in which dtype. Reports subclass it and add their settings and points."""

    machine: dict[str, Any]
    dims: dict[str, Any]
    dtype: str


def median_of(points: Iterable[Any], **match: object) -> float | None:
    """``median_ms`` of the first timed point whose attributes equal ``match``; None if absent."""
    for p in points:
        if all(getattr(p, k) == v for k, v in match.items()):
            return float(p.median_ms)
    return None


__all__ = ["ReportHeader", "machine_info", "median_of", "time_call"]
