"""``bench kernels``' report: the table, the speed-ups taken from the times of one run, and the
plot (:mod:`latentattn.bench.kernels` measures)."""

from __future__ import annotations

from latentattn.bench.kernels import KernelReport

KINDS = ("dense decode", "dense decode fp8", "sparse decode", "sparse decode fp8", "dsa decode step")


def speedups(report: KernelReport) -> list[tuple[int, int, str, float]]:
    """(batch, context, what, ratio of times) for the ratios the issue's targets name: each
    Triton kernel against the PyTorch path on the same input, and sparse against dense decode
    (each implementation against itself)."""
    ms = {(p.kind, p.impl, p.batch, p.context): p.median_ms for p in report.points}
    out = []
    for b, s in sorted({(p.batch, p.context) for p in report.points}):
        pairs = [(f"{kind}: triton vs torch", (kind, "torch"), (kind, "triton")) for kind in KINDS]
        pairs += [(f"{fast} vs {slow} ({impl})", (slow, impl), (fast, impl))
                  for slow, fast in (("dense decode", "sparse decode"), ("dense decode", "dsa decode step"),
                                     ("dense decode fp8", "sparse decode fp8"))
                  for impl in ("torch", "triton")]
        for what, slow, fast in pairs:
            t_slow, t_fast = ms.get((*slow, b, s)), ms.get((*fast, b, s))
            if t_slow is not None and t_fast is not None:
                out.append((b, s, what, t_slow / t_fast))
    return out


def kernel_table(report: KernelReport) -> str:
    lines = [f"{report.note}. Device copy bandwidth {report.copy_gb_s:,.0f} GB/s; dims "
             f"{report.dims}, {report.dtype}.", "",
             "| kind | impl | batch | context | top-k | ms | GB/s | share of copy BW | TFLOP/s "
             "| max abs diff vs torch |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for p in report.points:
        share = "-" if p.share_of_copy_bandwidth is None else f"{p.share_of_copy_bandwidth:.0%}"
        diff = "-" if p.max_abs_diff_vs_torch is None else f"{p.max_abs_diff_vs_torch:.1e}"
        lines.append(f"| {p.kind} | {p.impl} | {p.batch} | {p.context:,} | {p.topk or '-'} | "
                     f"{p.median_ms:.3f} | {p.gb_s:,.1f} | {share} | {p.tflops:.3f} | {diff} |")
    lines += ["", "| batch | context | speed-up | x |", "|---:|---:|---|---:|"]
    lines += [f"| {b} | {s:,} | {what} | {x:.2f} |" for b, s, what, x in speedups(report)]
    return "\n".join(lines)


def plot_kernel_report(report: KernelReport, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(KINDS), figsize=(5 * len(KINDS), 4))
    for ax, kind in zip(axes, KINDS, strict=True):
        for impl in sorted({p.impl for p in report.points}):
            for b in sorted({p.batch for p in report.points}):
                pts = [p for p in report.points if p.kind == kind and p.impl == impl and p.batch == b]
                if pts:
                    ax.plot([p.context for p in pts], [p.median_ms for p in pts], "o-",
                            label=f"{impl}, batch {b}")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("cached context (tokens)")
        ax.set_ylabel("ms per decode step")
        ax.set_title(kind)
        ax.legend(fontsize=7)
    fig.suptitle(f"{report.device}, {report.dtype}: {report.note}", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, format="png", dpi=120)
    plt.close(fig)


__all__ = ["KINDS", "kernel_table", "plot_kernel_report", "speedups"]
