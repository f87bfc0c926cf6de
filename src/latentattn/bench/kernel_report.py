"""``bench kernels``' report: the table, the speed-ups taken from the times of one run, and the
plot (:mod:`latentattn.bench.kernels` measures). A missing point (one that failed, most often out
of memory) is listed with its reason, gives no speed-up, and is named on the plot, not drawn."""

from __future__ import annotations

from latentattn.bench.kernels import KINDS, KernelPoint, KernelReport


def speedups(report: KernelReport) -> list[tuple[int, int, str, float | None]]:
    """(batch, context, what, ratio of times) for the speed-ups reported: each
    Triton kernel against the PyTorch path on the same input, and sparse against dense decode
    (each implementation against itself). A pair whose two points were both attempted is listed;
    its ratio is None when either side is missing."""
    pts = {(p.kind, p.impl, p.batch, p.context): p for p in report.points}
    out: list[tuple[int, int, str, float | None]] = []
    for b, s in sorted({(p.batch, p.context) for p in report.points}):
        pairs = [(f"{kind}: triton vs torch", (kind, "torch"), (kind, "triton")) for kind in KINDS]
        pairs += [(f"{fast} vs {slow} ({impl})", (slow, impl), (fast, impl))
                  for slow, fast in (("dense decode", "sparse decode"), ("dense decode", "dsa decode step"),
                                     ("dense decode fp8", "sparse decode fp8"))
                  for impl in ("torch", "triton")]
        for what, slow, fast in pairs:
            p_slow, p_fast = pts.get((*slow, b, s)), pts.get((*fast, b, s))
            if p_slow is None or p_fast is None:
                continue
            t_slow, t_fast = p_slow.median_ms, p_fast.median_ms
            out.append((b, s, what, None if t_slow is None or t_fast is None else t_slow / t_fast))
    return out


def _label(p: KernelPoint) -> str:
    return f"{p.kind}, {p.impl}, batch {p.batch}, context {p.context:,}"


def _cell(text: str) -> str:
    return text.replace("|", "/")  # a reason must not split a markdown table row


def kernel_table(report: KernelReport) -> str:
    missing = [p for p in report.points if p.median_ms is None]
    lines = [f"{report.note}. Device copy bandwidth {report.copy_gb_s:,.0f} GB/s; dims "
             f"{report.dims}, {report.dtype}."]
    if missing:
        lines.append(f"{len(missing)} of {len(report.points)} points missing (they failed; no "
                     "time and no speed-up for them): "
                     + "; ".join(f"{_label(p)}: {p.error}" for p in missing) + ".")
    lines += ["", "| kind | impl | batch | context | top-k | ms | GB/s | share of copy BW | TFLOP/s "
              "| max abs diff vs torch |",
              "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for p in report.points:
        head = f"| {p.kind} | {p.impl} | {p.batch} | {p.context:,} | {p.topk or '-'} | "
        if p.median_ms is None or p.gb_s is None or p.tflops is None:
            lines.append(head + f"missing: {_cell(p.error or 'no time')} | - | - | - | - |")
            continue
        share = "-" if p.share_of_copy_bandwidth is None else f"{p.share_of_copy_bandwidth:.0%}"
        diff = "-" if p.max_abs_diff_vs_torch is None else f"{p.max_abs_diff_vs_torch:.1e}"
        lines.append(head + f"{p.median_ms:.3f} | {p.gb_s:,.1f} | {share} | {p.tflops:.3f} | {diff} |")
    lines += ["", "| batch | context | speed-up | x |", "|---:|---:|---|---:|"]
    lines += [f"| {b} | {s:,} | {what} | {'- (a side is missing)' if x is None else f'{x:.2f}'} |"
              for b, s, what, x in speedups(report)]
    return "\n".join(lines)


def plot_kernel_report(report: KernelReport, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(KINDS), figsize=(5 * len(KINDS), 4))
    for ax, kind in zip(axes, KINDS, strict=True):
        for impl in sorted({p.impl for p in report.points}):
            for b in sorted({p.batch for p in report.points}):
                pts = [(p.context, p.median_ms) for p in report.points if p.kind == kind
                       and p.impl == impl and p.batch == b and p.median_ms is not None]
                if pts:
                    ax.plot([c for c, _ in pts], [ms for _, ms in pts], "o-",
                            label=f"{impl}, batch {b}")
        # Missing points are not drawn; each is named on its panel, so a gap is not mistaken
        # for a point never attempted.
        missing = [p for p in report.points if p.kind == kind and p.median_ms is None]
        if missing:
            shown = [f"missing: {p.impl}, B={p.batch}, S={p.context:,} ({p.error})"
                     for p in missing[:6]]
            if len(missing) > len(shown):
                shown.append(f"... and {len(missing) - len(shown)} more (see the table)")
            ax.text(0.02, 0.02, "\n".join(shown), transform=ax.transAxes, fontsize=6,
                    va="bottom", ha="left", color="tab:red")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("cached context (tokens)")
        ax.set_ylabel("ms per decode step")
        ax.set_title(kind)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    fig.suptitle(f"{report.device}, {report.dtype}: {report.note}", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, format="png", dpi=120)
    plt.close(fig)


__all__ = ["KINDS", "kernel_table", "plot_kernel_report", "speedups"]
