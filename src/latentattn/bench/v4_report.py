"""``bench v4``'s results: the points, the table printed either way, the performance targets
judged against them, and the log-log plot."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from latentattn.timing import ReportHeader

MIB = 1 << 20
TARGET_1M, TARGET_CTX, TARGET_PREFILL = 1048576, 131072, 131072
PREFILL_LIMIT_MIB = 8e9 / MIB  # "fits in 8 GB": 8e9 bytes
PREDICTED_SLACK = 1.5


@dataclass
class Point:
    """One measurement. Decode: ``median_ms`` of the whole layer call, ``part_ms`` of its
    context-dependent part; FLOP, MB read and the predicted ms are the step's arithmetic
    (:mod:`latentattn.bench.v4_cost`). Prefill: ``median_ms`` is the whole prompt. ``note``
    says why a point has no time (skipped, failed)."""

    phase: str  # "decode" or "prefill"
    kind: str  # sliding, csa, hca (V4); dsa, mla (V3.2)
    context: int  # cached tokens (decode) or prompt tokens (prefill)
    median_ms: float | None
    samples_ms: list[float]
    part_ms: float | None
    gflop: float | None
    mbytes: float | None
    predicted_ms: float | None
    predicted_parts_ms: dict[str, float] | None  # per part: max(FLOP / GEMM rate, bytes / copy rate)
    gemm_gflops: float | None  # the rates this point was predicted from (measured in its process)
    copy_gbps: float | None
    predicted_mib: float
    peak_rss_mib: float | None
    setup_rss_mib: float | None
    cache_mib: float | None
    load1: float | None
    note: str = ""


@dataclass
class V4Report(ReportHeader):
    rates: dict[str, Any]
    contexts: list[int]
    prefill: list[int]
    chunk: int
    kinds: list[str]
    budget_mib: float
    quick: bool
    points: list[Point] = field(default_factory=list)

    def get(self, phase: str, kind: str, context: int) -> Point | None:
        for p in self.points:
            if (p.phase, p.kind, p.context) == (phase, kind, context) and p.median_ms is not None:
                return p
        return None

    def targets(self) -> list[dict[str, Any]]:
        """The four performance targets, each with its measured value, its bound and whether it is met
        (None where the points it needs were not measured)."""
        out: list[dict[str, Any]] = []

        def add(name: str, value: float | None, bound: float | None, met: bool | None) -> None:
            out.append({"target": name, "value": value, "bound": bound, "met": met})

        big = self.get("decode", "csa", TARGET_1M)
        add(f"CSA decodes at {TARGET_1M:,} tokens in this machine's memory (peak RSS MiB)",
            big.peak_rss_mib if big else None, self.machine.get("mem_total_mib"),
            None if big is None or big.peak_rss_mib is None
            else big.peak_rss_mib <= self.machine.get("mem_total_mib", float("inf")))
        csa, dsa = self.get("decode", "csa", TARGET_CTX), self.get("decode", "dsa", TARGET_CTX)
        ratio = csa.median_ms / csa.predicted_ms if csa and csa.median_ms and csa.predicted_ms else None
        add(f"CSA step at {TARGET_CTX:,} / its predicted time", ratio, PREDICTED_SLACK,
            None if ratio is None else ratio <= PREDICTED_SLACK)
        speed = bound = None
        if csa and dsa and csa.median_ms and dsa.median_ms and csa.predicted_ms and dsa.predicted_ms:
            speed = dsa.median_ms / csa.median_ms
            bound = dsa.predicted_ms / csa.predicted_ms / PREDICTED_SLACK
        add(f"DSA step / CSA step at {TARGET_CTX:,} (bound: predicted ratio / {PREDICTED_SLACK})",
            speed, bound, None if speed is None or bound is None else speed >= bound)
        pre = self.get("prefill", "csa", TARGET_PREFILL)
        add(f"CSA prefill of {TARGET_PREFILL:,} tokens, peak RSS MiB (8 GB = {PREFILL_LIMIT_MIB:,.0f} MiB)",
            pre.peak_rss_mib if pre else None, PREFILL_LIMIT_MIB,
            None if pre is None or pre.peak_rss_mib is None else pre.peak_rss_mib <= PREFILL_LIMIT_MIB)
        return out

    def as_dict(self) -> dict[str, Any]:
        return {"machine": self.machine, "dims": self.dims, "dtype": self.dtype, "rates": self.rates,
                "contexts": self.contexts, "prefill": self.prefill, "chunk": self.chunk,
                "kinds": self.kinds, "budget_mib": self.budget_mib, "quick": self.quick,
                "points": [asdict(p) for p in self.points], "targets": self.targets()}


def _num(x: float | None, fmt: str) -> str:
    return "-" if x is None else format(x, fmt)


def table(report: V4Report) -> str:
    """The decode table (one row per context and kind), the prefill rows and the targets."""
    r = report.rates
    gemm = ", ".join(f"{k} {v:,.0f}" for k, v in r["gemm_gflops"].items())
    lines = [f"measured at the start: GEMM GFLOP/s {gemm}; copy {r['copy_gbps']:.1f} GB/s (read + write); "
             f"dtype {report.dtype}; dims {report.dims}; CPU {report.machine.get('cpu_model')}",
             "each decode point is predicted from the GEMM (model dtype) and copy rates measured in its own "
             "process right after its timed calls (columns GFLOP/s, GB/s)",
             f"{'context':>9} {'kind':<7} {'step ms':>9} {'part ms':>9} {'GFLOP':>8} {'MB read':>8} "
             f"{'pred ms':>8} {'x pred':>6} {'GFLOP/s':>7} {'GB/s':>5} {'RSS MiB':>8} {'pred MiB':>8} "
             f"{'load':>5}  note"]
    for p in report.points:
        if p.phase != "decode":
            continue
        x = p.median_ms / p.predicted_ms if p.median_ms and p.predicted_ms else None
        lines.append(f"{p.context:>9,} {p.kind:<7} {_num(p.median_ms, '9.2f')} {_num(p.part_ms, '9.2f')} "
                     f"{_num(p.gflop, '8.3f')} {_num(p.mbytes, '8.1f')} {_num(p.predicted_ms, '8.2f')} "
                     f"{_num(x, '6.2f')} {_num(p.gemm_gflops, '7.0f')} {_num(p.copy_gbps, '5.1f')} "
                     f"{_num(p.peak_rss_mib, '8,.0f')} {p.predicted_mib:>8,.0f} "
                     f"{_num(p.load1, '5.2f')}  {p.note}")
    for p in report.points:
        if p.phase == "prefill":
            rate = p.context / p.median_ms * 1e3 if p.median_ms else None
            lines.append(f"prefill {p.kind} {p.context:,} tokens (chunks of {report.chunk:,}): "
                         f"{_num(p.median_ms and p.median_ms / 1e3, ',.1f')} s, "
                         f"{_num(rate, ',.0f')} tokens/s, peak RSS {_num(p.peak_rss_mib, ',.0f')} MiB "
                         f"(predicted {p.predicted_mib:,.0f}) {p.note}")
    for t in report.targets():
        verdict = {True: "MET", False: "MISSED", None: "not measured"}[t["met"]]
        lines.append(f"target: {t['target']}: {_num(t['value'], ',.2f')} (bound {_num(t['bound'], ',.2f')}) "
                     f"-> {verdict}")
    return "\n".join(lines)


def plot_v4_report(report: V4Report, path: str) -> None:
    """Left: decode step ms vs context, log-log, one line per kind (dashed: predicted). Right:
    prefill seconds vs prompt length per kind."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    for i, kind in enumerate(report.kinds):
        pts = sorted((p.context, p.median_ms, p.predicted_ms) for p in report.points
                     if p.phase == "decode" and p.kind == kind and p.median_ms is not None)
        if pts:
            color = f"C{i}"
            left.plot([c for c, _, _ in pts], [m for _, m, _ in pts], marker="o", color=color, label=kind)
            left.plot([c for c, _, _ in pts], [q for _, _, q in pts], linestyle="--", color=color, alpha=0.6)
        pre = sorted((p.context, p.median_ms / 1e3) for p in report.points
                     if p.phase == "prefill" and p.kind == kind and p.median_ms is not None)
        if pre:
            right.plot(*zip(*pre, strict=True), marker="o", color=f"C{i}", label=kind)
    v4, v32 = report.dims.get("v4"), report.dims.get("v3.2")
    for ax, title, ylabel in (
        (left, f"decode step, batch 1 ({v4}; dsa/mla: {v32}); dashed: predicted", "one layer's step (ms)"),
        (right, f"prefill in chunks of {report.chunk:,}", "whole prompt (s)"),
    ):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("context (tokens)")
        ax.set_ylabel(ylabel)
        ax.set_title(f"{title}, {report.dtype}", fontsize=9)
        ax.grid(True, which="both", alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, format="png", dpi=110)
    plt.close(fig)
