"""``bench generate``'s printed header and table, and its plot (:mod:`latentattn.bench.generate`
measures)."""

from __future__ import annotations

from latentattn.bench.generate import GenerateReport, Point, Timing

MB = 1e6


def _num(x: float | None, fmt: str) -> str:
    return "-" if x is None else format(x, fmt)


def header(report: GenerateReport) -> list[str]:
    """What ran where: the CPU, torch, the settings and the measured read bandwidth."""
    m, bw = report.machine, report.bandwidth
    flags = ", ".join(m.get("bf16_flags") or []) or "no native bf16"
    hf = m.get("transformers")
    lines = [
        f"bench generate on {m.get('cpu_model')} ({flags}), {m.get('torch_threads')} torch threads, "
        f"{m.get('platform')}; torch {m.get('torch')}" + (f", transformers {hf}" if hf else ""),
        f"{report.dtype}, {'compiled (latentattn.compile)' if report.compiled else 'not compiled'}; "
        f"batch 1, greedy, random prompt (seed {report.seed}), {report.new_tokens} new tokens, "
        f"median of {report.repeats} after 1 warm-up",
        f"read bandwidth {bw['bytes_per_s'] / 1e9:.1f} GB/s ({bw['method']}): roofline tok/s = "
        "that / (weights + KV cache bytes read per decoded token)",
    ]
    start, end = m.get("loadavg_1_5_15_at_start"), m.get("loadavg_1_5_15_at_end")
    if start is not None:
        busy = max(start[0], end[0] if end else 0.0) > 0.5 * (m.get("cpu_count") or 1)
        lines.append(f"load average (1 min) {start[0]:.2f} at the start"
                     + (f", {end[0]:.2f} at the end" if end else "") + f" on {m.get('cpu_count')} CPUs"
                     + (": other work shares this machine, the timings are not reliable" if busy else ""))
    for e in report.models:
        what = e.transformers or f"not run ({e.transformers_note})"
        name = "" if e.name == e.spec or "/" in e.name or "\\" in e.name else f"{e.name}, "
        lines.append(
            f"{e.spec}: {name}{e.attention.upper()}, {e.parameters / 1e6:,.1f}M parameters, "
            f"weights read per token {e.weight_bytes_per_token / MB:,.1f} MB"
            + (" (all experts)" if e.moe else "") + f"; transformers: {what}"
            + (f"; peak RSS {e.peak_rss_mib:,.0f} MiB so far" if e.peak_rss_mib else ""))
    lines += report.notes
    return lines


def _pair(p: Point, attr: str, fmt: str) -> tuple[str, str]:
    def get(t: Timing | None) -> float | None:
        return None if t is None else getattr(t, attr)

    return _num(get(p.latentattn), fmt), _num(get(p.transformers), fmt)


def table(report: GenerateReport) -> str:
    """The header lines, then one markdown row per model and context."""
    cols = ["model", "context", "prefill tok/s", "HF prefill tok/s", "decode tok/s",
            "HF decode tok/s", "vs HF", "roofline tok/s", "of roofline", "HF of roofline",
            "MB/token", "compile s", "same tokens"]
    rows = []
    for p in report.points:
        pre, hf_pre = _pair(p, "prefill_tok_s", ",.0f")
        dec, hf_dec = _pair(p, "decode_tok_s", ",.1f")
        frac, hf_frac = _pair(p, "roofline_fraction", ".0%")
        ratio = p.ratio()
        compile_s = None if p.latentattn is None else p.latentattn.compile_s
        agree = "-" if p.tokens_agree is None else f"{p.tokens_agree}/{report.new_tokens}"
        rows.append([p.model, f"{p.context:,}", pre, hf_pre, dec, hf_dec,
                     _num(ratio, ".2f") + ("x" if ratio is not None else ""),
                     f"{p.roofline_tok_s:,.1f}", frac, hf_frac, f"{p.bytes_per_token / MB:,.1f}",
                     _num(compile_s, ",.1f"), agree])
    out = [*header(report), "",
           "| " + " | ".join(cols) + " |",
           "|" + "|".join("---" if i == 0 else "---:" for i in range(len(cols))) + "|"]
    out += ["| " + " | ".join(r) + " |" for r in rows]
    for p in report.points:
        for t in (p.latentattn, p.transformers):
            if t is not None and t.note:
                out.append(f"{p.model} at {p.context:,}, {t.impl}: {t.note}")
    return "\n".join(out)


def plot_generate_report(report: GenerateReport, path: str) -> None:
    """Left: decode tokens/s against context per model (solid: latentattn, dashed:
    transformers, dotted: the roofline). Right: prefill tokens/s (solid / dashed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    for i, e in enumerate(report.models):
        pts = sorted((p for p in report.points if p.model == e.spec), key=lambda p: p.context)
        color = f"C{i}"
        for impl, style in (("latentattn", "-"), ("transformers", "--")):
            for ax, attr in ((left, "decode_tok_s"), (right, "prefill_tok_s")):
                xy = [(p.context, getattr(t, attr)) for p in pts
                      if (t := getattr(p, impl)) is not None and getattr(t, attr) is not None]
                if xy:
                    ax.plot(*zip(*xy, strict=True), linestyle=style, marker="o", color=color,
                            label=f"{e.spec}, {impl}")
        if pts:
            left.plot([p.context for p in pts], [p.roofline_tok_s for p in pts], linestyle=":",
                      color=color, label=f"{e.spec}, roofline")
    mode = "compiled" if report.compiled else "eager"
    bw = report.bandwidth["bytes_per_s"] / 1e9
    for ax, title in ((left, f"decode, batch 1 (roofline at {bw:.1f} GB/s read)"),
                      (right, "prefill (a 1-token generate)")):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("context (tokens)")
        ax.set_ylabel("tokens/s")
        ax.set_title(f"{title}, {report.dtype}, {mode}", fontsize=9)
        ax.grid(True, which="both", alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=7)
    fig.suptitle(f"bench generate on {report.machine.get('cpu_model')}, torch "
                 f"{report.machine.get('torch')}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, format="png", dpi=110)
    plt.close(fig)


__all__ = ["header", "plot_generate_report", "table"]
