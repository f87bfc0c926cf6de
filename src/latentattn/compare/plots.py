"""The report's PNGs: validation loss curves, quality vs KV bytes per token with its Pareto front,
each variant's paired difference from MHA with its 95% interval and the margin, decode speed vs
context, every seed's loss, the LR pilots' curves (with --lr-grid), and for sweeps the
quality-vs-cache trade-off. Error bars are 95% t intervals of the
mean over seeds (none with one seed)."""

from __future__ import annotations

from typing import Any

from latentattn.compare.report import CompareReport, VariantResult
from latentattn.compare.stats import pareto_front

DPI = 110


def _plt() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _err(v: VariantResult) -> float:
    """Half-width of the 95% t interval of the mean validation loss over seeds (0 with one)."""
    std, n = v.val_loss.std, v.val_loss.n
    if std is None:
        return 0.0
    from scipy import stats

    return float(stats.t.ppf(0.975, n - 1)) * std / n**0.5


def _save(plt: Any, fig: Any, path: str) -> None:
    fig.tight_layout()
    fig.savefig(path, format="png", dpi=DPI)
    plt.close(fig)


VERDICT_COLORS = {"better": "tab:green", "worse": "tab:red", "equivalent": "tab:blue",
                  "inconclusive": "tab:gray"}


def plot_loss_curves(report: CompareReport, path: str) -> None:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for v in report.variants:
        curve = v.val_curve()
        if curve:
            ax.plot([s for s, _ in curve], [loss for _, loss in curve], marker=".", label=v.mechanism)
    ax.set_xlabel("training step")
    ax.set_ylabel("validation loss (nats/byte)")
    ax.set_title(f"Validation loss, mean over {report.n_seeds} seed(s)")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7)
    _save(plt, fig, path)


def plot_quality_vs_kv(report: CompareReport, path: str) -> None:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for v in report.variants:
        ax.errorbar([v.kv_bytes_per_token], [v.val_loss.mean], yerr=[_err(v)], fmt="o", capsize=3,
                    label=v.mechanism)
        ax.annotate(v.mechanism, (v.kv_bytes_per_token, v.val_loss.mean), fontsize=7,
                    xytext=(4, 4), textcoords="offset points")
    points = [(v.kv_bytes_per_token, v.val_loss.mean) for v in report.variants]
    front = pareto_front(points)
    ax.step([points[i][0] for i in front], [points[i][1] for i in front], where="post",
            color="black", linestyle="--", linewidth=1, label="Pareto front")
    mha = report.variant("mha")
    ax.set_xscale("log")
    ax.set_xlabel(f"KV cache bytes per token ({mha.kv_dtype}, all {mha.n_layers} layers, allocated)")
    ax.set_ylabel("validation loss (nats/byte; lower is better)")
    ax.set_title("Quality vs KV cache, 95% intervals"
                 + ("" if report.n_seeds > 1 else " (1 seed: no interval)"))
    ax.grid(True, which="both", alpha=0.3)
    _save(plt, fig, path)


def plot_vs_mha(report: CompareReport, path: str) -> None:
    """Each variant's paired difference from MHA (mean over seeds) with its 95% interval, against
    its KV bytes; the shaded band is the equivalence margin; colours are the verdicts."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    ax.axhspan(-report.margin, report.margin, color="tab:blue", alpha=0.12,
               label=f"margin ±{report.margin:g}")
    ax.axhline(0.0, color="black", linewidth=0.8)
    for v in report.variants:
        if v.label == "mha":
            continue
        p, verdict = report.versus_mha(v.label), report.verdict(v.label)
        ci = p.interval(0.95)
        err = [[0.0], [0.0]] if ci is None else [[p.mean - ci[0]], [ci[1] - p.mean]]
        ax.errorbar([v.kv_bytes_per_token], [p.mean], yerr=err, fmt="o", capsize=3,
                    color=VERDICT_COLORS[verdict])
        ax.annotate(f"{v.mechanism}: {verdict}", (v.kv_bytes_per_token, p.mean), fontsize=7,
                    xytext=(4, 4), textcoords="offset points")
    ax.set_xscale("log")
    ax.set_xlabel("KV cache bytes per token (allocated)")
    ax.set_ylabel("val loss minus MHA's, paired by seed (nats/byte)")
    ax.set_title(f"Against MHA: mean difference and 95% interval over {report.n_seeds} seed(s)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, loc="best")
    _save(plt, fig, path)


def plot_decode_speed(report: CompareReport, path: str) -> None:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for v in report.variants:
        ctx = sorted(v.decode_tokens_per_s)
        ax.plot(ctx, [v.decode_tokens_per_s[c] for c in ctx], marker="o", label=v.mechanism)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("cached context (tokens)")
    ax.set_ylabel("decode tokens/s (batch 1, whole model)")
    ax.set_title("Decode speed vs context")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
    _save(plt, fig, path)


def plot_sweep_pareto(report: CompareReport, path: str) -> None:
    """MLA and DSA at every swept value; MHA, MQA and GQA as reference points; the front."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(8, 5))
    variants = report.variants
    points = [(v.kv_bytes_per_token, v.val_loss.mean) for v in variants]
    for v in variants:
        if v.reference:
            ax.errorbar([v.kv_bytes_per_token], [v.val_loss.mean], yerr=[_err(v)], fmt="s",
                        color="gray", capsize=3)
            ax.annotate(v.mechanism, (v.kv_bytes_per_token, v.val_loss.mean), fontsize=8,
                        xytext=(4, 4), textcoords="offset points", color="gray")
    # one line per family of swept points: MLA by rank, DSA by rank at each top-k
    series: dict[str, list[VariantResult]] = {}
    for v in variants:
        if v.reference:
            continue
        topk = v.latent.get("index_topk")
        key = "MLA" if topk is None else f"MLA+DSA k={topk}"
        series.setdefault(key, []).append(v)
    for key, members in sorted(series.items()):
        members.sort(key=lambda v: v.kv_bytes_per_token)
        line = ax.errorbar([v.kv_bytes_per_token for v in members], [v.val_loss.mean for v in members],
                           yerr=[_err(v) for v in members], fmt="o-", capsize=3, label=key)
        for v in members:
            ax.annotate(f"d_c={v.latent['kv_lora_rank']}", (v.kv_bytes_per_token, v.val_loss.mean),
                        fontsize=7, xytext=(4, -10), textcoords="offset points",
                        color=line[0].get_color())
    front = pareto_front(points)
    ax.step([points[i][0] for i in front], [points[i][1] for i in front], where="post",
            color="black", linestyle="--", linewidth=1, label="Pareto front")
    ax.scatter([points[i][0] for i in front], [points[i][1] for i in front], s=160,
               facecolors="none", edgecolors="black", zorder=5)
    mha = report.variant("mha")
    ax.set_xscale("log")
    ax.set_xlabel(f"KV cache bytes per token ({mha.kv_dtype}, all {mha.n_layers} layers, allocated)")
    ax.set_ylabel("validation loss (nats/byte; lower is better)")
    ax.set_title("Latent compression and sparsity: quality vs KV cache")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
    _save(plt, fig, path)


def plot_lr_pilot(report: CompareReport, path: str) -> None:
    """Each piloted variant's pilot validation loss against its LR (log scale), the pick ringed;
    with several pilot seeds the line is their mean and each seed a small dot."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for v in report.variants:
        if not v.pilot_losses:
            continue
        lrs = sorted(float(lr) for lr in v.pilot_losses)
        losses = [v.pilot_losses[f"{lr:g}"] for lr in lrs]
        (line,) = ax.plot(lrs, losses, marker="o", label=v.mechanism)
        ax.plot([v.lr], [v.pilot_losses[f"{v.lr:g}"]], marker="o", markersize=12, fillstyle="none",
                color=line.get_color())
        seeds = [(float(lr), x) for lr, xs in v.pilot_seed_losses.items() if len(xs) > 1 for x in xs]
        if seeds:
            ax.scatter(*zip(*seeds, strict=True), s=8, alpha=0.5, color=line.get_color())
    ax.set_xscale("log", base=2)
    ax.set_xlabel("peak learning rate")
    ax.set_ylabel("pilot validation loss (nats/byte)")
    n = report.settings.get("pilot_seeds", 1)
    ax.set_title(f"LR pilot, {'one seed' if n == 1 else f'mean of {n} seeds'} of its own "
                 "(ringed: the pick)")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7)
    _save(plt, fig, path)


def plot_seeds(report: CompareReport, path: str) -> None:
    """Every seed's validation loss per variant, MHA's range shaded: where the seeds part."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 0.5 * len(report.variants) + 1.5))
    names = [v.mechanism for v in report.variants]
    for i, v in enumerate(report.variants):
        ax.scatter([r.val_loss for r in v.runs], [i] * len(v.runs), s=18)
        if v.label == "mha" and v.runs:
            lo, hi = min(r.val_loss for r in v.runs), max(r.val_loss for r in v.runs)
            ax.axvspan(lo, hi, color="tab:gray", alpha=0.15, label="MHA's seeds")
    ax.set_yticks(range(len(names)), names, fontsize=7)
    ax.invert_yaxis()
    ax.set_xlabel("validation loss (nats/byte)")
    ax.set_title(f"Validation loss of each of {report.n_seeds} seed(s)")
    ax.grid(True, axis="x", alpha=0.3)
    if "mha" in {v.label for v in report.variants}:
        ax.legend(fontsize=7)
    _save(plt, fig, path)


PLOTS = {
    "loss_curves.png": plot_loss_curves,
    "quality_vs_kv.png": plot_quality_vs_kv,
    "vs_mha.png": plot_vs_mha,
    "decode_speed.png": plot_decode_speed,
    "seeds.png": plot_seeds,
}
