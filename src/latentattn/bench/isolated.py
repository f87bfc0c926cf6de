"""Run one measurement in a fresh process, so that its peak resident memory is its own.

Peak RSS only grows within a process, so a per-point figure needs a process per point; a fresh
("spawn") child also starts with no allocator caches from the points before it, and a point
that runs out of memory kills only its child.
"""

from __future__ import annotations

import multiprocessing as mp
import resource
import sys
from collections.abc import Callable
from multiprocessing.connection import Connection
from typing import Any

Result = dict[str, Any]


def _status_mib(field: str) -> float | None:
    """A /proc/self/status memory field (Linux), MiB; None where /proc is absent."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def rss_mib() -> float | None:
    """This process's resident memory now (VmRSS), MiB."""
    return _status_mib("VmRSS")


def peak_rss_mib() -> float:
    """This process's own peak resident memory, MiB: VmHWM, the high-water mark of its address
    space. Not ``ru_maxrss`` where VmHWM exists: Linux carries the pre-exec high-water mark
    over exec into ``ru_maxrss``, and a spawned child's pre-exec image is a fork of its parent,
    so ``ru_maxrss`` would report at least the parent's RSS. ru_maxrss is KiB on Linux, bytes on
    macOS."""
    hwm = _status_mib("VmHWM")
    if hwm is not None:
        return hwm
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1 << 20) if sys.platform == "darwin" else peak / 1024


def _child(conn: Connection, fn: Callable[..., Result], args: tuple[Any, ...]) -> None:
    try:
        out = fn(*args)
    except Exception as e:  # reported as the point's failure; the parent carries on
        out = {"error": f"{type(e).__name__}: {e}"}
    out.setdefault("peak_rss_mib", peak_rss_mib())  # fn may record its peak before extra work
    conn.send(out)
    conn.close()


def run_isolated(fn: Callable[..., Result], *args: Any) -> Result:
    """``fn(*args)`` (a module-level function returning a dict) in a fresh process; its dict
    gains ``peak_rss_mib`` (unless it has one). A child that dies (killed for memory, say)
    gives {"error": ...}."""
    ctx = mp.get_context("spawn")
    recv, send = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_child, args=(send, fn, args))
    proc.start()
    send.close()
    try:
        out: Result = recv.recv()
    except EOFError:  # the child exited without answering
        out = {}
    proc.join()
    if not out:
        why = " (SIGKILL: out of memory?)" if proc.exitcode == -9 else ""
        out = {"error": f"the measuring process exited with code {proc.exitcode}{why}"}
    return out
