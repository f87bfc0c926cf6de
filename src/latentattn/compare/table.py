"""The report as markdown: the documents' table (mechanism, KV params, KV memory, quality, speed)
with measured values, each variant's paired difference from MHA with its interval and verdict,
and the per-seed values the test was run on."""

from __future__ import annotations

from latentattn.compare.report import CompareReport, VariantResult
from latentattn.compare.seeds import ablation_lines, diagnostic_lines, spread_lines
from latentattn.compare.stats import RULE


def _bytes(n: float) -> str:
    return f"{n:,.0f}" if n == int(n) else f"{n:,.1f}"


def _vs(ratio: float) -> str:
    if abs(ratio - 1) < 1e-9:
        return "1x"
    return f"{ratio:.2f}x ({1 / ratio:.1f}x smaller)" if ratio < 1 else f"{ratio:.2f}x"


def _recall(v: VariantResult) -> str:
    idx, recent, uniform = (v.recall_mean(k) for k in ("indexer", "recent", "uniform"))
    if idx is None or recent is None or uniform is None:
        return "-"
    return f"{idx:.2f} (recent {recent:.2f}, random {uniform:.2f})"


def markdown_table(report: CompareReport) -> str:
    mha = report.variant("mha")
    layers, dtype = mha.n_layers, mha.kv_dtype
    contexts = sorted(mha.decode_tokens_per_s)
    headers = ["mechanism", "params", "KV params / layer",
               f"KV cache B/token ({dtype}, {layers} layers)", "KV vs MHA",
               "peak LR", "val loss (nats/byte)", "vs MHA: Δ [95% CI]", "verdict", "bits/byte",
               "train tok/s",
               *(f"decode tok/s @{c:,}" for c in contexts), "top-k recall (DSA keys, V4 entries)"]
    rows = []
    for v in report.variants:
        rows.append([
            v.mechanism, f"{v.params:,}", f"{v.kv_params_per_layer:,}", _bytes(v.kv_bytes_per_token),
            _vs(v.kv_bytes_per_token / mha.kv_bytes_per_token),
            f"{v.lr:g}" + {"pilot": " (pilot)", "pinned": " (pinned)"}.get(v.lr_source, ""),
            v.val_loss.fmt(3),
            *(("-", "reference") if v.label == "mha" else
              (report.versus_mha(v.label).fmt(3), report.verdict(v.label))),
            v.bits_per_byte.fmt(3), f"{v.train_tokens_per_s.mean:,.0f}",
            *(f"{v.decode_tokens_per_s[c]:,.0f}" for c in contexts), _recall(v),
        ])
    right = set(range(1, len(headers) - 1)) - {headers.index("verdict")}
    lines = ["| " + " | ".join(headers) + " |",
             "|" + "|".join("---:" if i in right else "---" for i in range(len(headers))) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def verdict_lines(report: CompareReport) -> list[str]:
    """Each variant against MHA in words: the paired difference, its interval and the verdict."""
    n = report.n_seeds
    lines = [f"Against MHA, paired by seed over {n} seed(s), margin {report.margin:g} nats/byte "
             f"fixed before the run. Rule: {RULE}."]
    if n < 2:
        lines.append("One seed gives no interval: every verdict is inconclusive; rerun with "
                     "--seeds 3 (or more) to test.")
    mha = report.variant("mha")
    for v in report.variants:
        if v.label == "mha":
            continue
        p = report.versus_mha(v.label)
        extra = "" if p.p_value is None else f", p = {p.p_value:.3f}, TOST p = {p.tost_p:.3f}"
        read = "" if v.v4_read is None else (
            f"; its queries' windows and entries cover {v.v4_read['per_query']:.0%} of their visible "
            f"tokens, attending {v.v4_read['keys_per_query']:.0%} as many keys (mean over layers "
            f"at {v.v4_read['seq_len']} tokens)")
        lines.append(f"- {v.mechanism}: {p.fmt(3)} nats/byte{extra}: {report.verdict(v.label)}, with "
                     f"{v.kv_bytes_per_token / mha.kv_bytes_per_token:.3f}x MHA's KV cache{read}.")
    for v in report.retrofits:
        p = report.versus_dense(v.label)
        dense = report.variant(v.retrofit_of)
        extra = "" if p.p_value is None else f", p = {p.p_value:.3f}, TOST p = {p.tost_p:.3f}"
        d = v.dsa_density
        kept = "" if d is None else (f"; its queries keep {d['per_query']:.0%} of their visible "
                                     f"keys ({d['pairs']:.0%} of the causal pairs)")
        lines.append(f"DSA retrofit against its dense continuation ({dense.mechanism}, the same "
                     f"runs, equal tokens), paired by seed: {p.fmt(3)} nats/byte{extra}: "
                     f"{report.retrofit_verdict(v.label)}{kept}.")
    mid = report.horizon_step()
    if mid is not None and n >= 2:
        flips = []
        for v in report.variants:
            h = report.horizon(v.label) if v.label != "mha" and not v.retrofit_of else None
            if h is not None and h[1] != h[2]:
                flips.append(f"{v.mechanism} ({h[1]} at step {h[0]}, {h[2]} at the end)")
        lines.append("Horizon check (the loss curves' fixed windows, half the steps vs the end): "
                     + ("verdicts changed for " + "; ".join(flips) + ": the run is still too short "
                        "to decide those" if flips else "no verdict changed") + ".")
    control = report.control
    if control is None:
        lines.append("No positive control was run (--no-control): nothing shows that this run could "
                     "detect a real difference, so read 'equivalent' with care.")
    elif report.control_resolved:
        lines.append(f"Positive control: {control.mechanism} came out worse than MHA, as it must: "
                     "the run resolves a difference of its size.")
    else:
        lines.append(f"Positive control: {control.mechanism} was NOT shown worse than MHA "
                     f"({report.versus_mha(control.label).fmt(3)}): this run cannot resolve "
                     "differences of that size, so no verdict here is 'equivalent' (those are "
                     "reported as inconclusive).")
    return lines


def scale_lines(report: CompareReport) -> list[str]:
    """How far the runs trained: tokens, epochs, bytes per parameter, FLOPs, the train-val gap."""
    lines = [f"Scale: {report.tokens_per_run:,} tokens (bytes) per run, {report.epochs:.1f} passes "
             f"over the {report.train_tokens:,}-byte training text."]
    if report.epochs > 3:
        lines.append(f"The runs went over the training text {report.epochs:.1f} times: read the "
                     "train-validation gap below before trusting small differences.")
    lines.append("Per variant: bytes per parameter, training MFLOPs per token, validation minus "
                 "late training loss (nats/byte):")
    for v in report.variants:
        lines.append(f"- {v.mechanism}: {report.tokens_per_run / v.params:.1f} B/param, "
                     f"{v.train_flops_per_token / 1e6:.2f} MFLOP/token, gap {v.train_val_gap.fmt(3)}")
    return lines


def per_seed_table(report: CompareReport) -> str:
    """Validation loss per variant and seed: the values the paired test ran on."""
    seeds = sorted({r.seed for v in report.variants for r in v.runs})
    lines = ["| mechanism | " + " | ".join(f"seed {s}" for s in seeds) + " |",
             "|---|" + "---:|" * len(seeds)]
    for v in report.variants:
        by_seed = v.val_by_seed
        lines.append(f"| {v.mechanism} | "
                     + " | ".join(f"{by_seed[s]:.4f}" if s in by_seed else "-" for s in seeds) + " |")
    return "\n".join(lines)


def _pilot_cell(lr: str, mean: float, seeds: list[float]) -> str:
    each = f" ({', '.join(f'{x:.4f}' for x in seeds)})" if len(seeds) > 1 else ""
    return f"{lr} -> {mean:.4f}{each}"


def pilot_lines(report: CompareReport) -> list[str]:
    """The LR pilots' validation losses, one line per variant (nothing without --lr-grid); with
    several pilot seeds, each seed's loss after their mean."""
    piloted = [v for v in report.variants if v.pilot_losses]
    if not piloted:
        return []
    lines = ["LR pilot (validation loss, nats/byte, per grid LR; the lowest was used):", ""]
    for v in piloted:
        lines.append(f"- {v.mechanism}: " + ", ".join(_pilot_cell(lr, loss, v.pilot_seed_losses.get(lr, []))
                                                    for lr, loss in v.pilot_losses.items())
                     + f"; chose {v.lr:g}")
    return [*lines, ""]


def markdown_report(report: CompareReport) -> str:
    """results.md: how it was made, the table, the verdicts, the per-seed values, notes."""
    m = report.machine
    t = report.settings["train"]
    parts = [
        "# latentattn compare",
        "",
        f"Command: `{report.command}`",
        "",
        f"Data: {report.data} ({report.data_bytes:,} bytes, last 10% held out). "
        f"{t['steps']} steps x {t['batch_size']} x {t['seq_len']} bytes, "
        f"{report.n_seeds} seed(s), {report.train_seconds / 60:.1f} min of training (all runs) on "
        f"{m.get('processor')} "
        f"({m.get('torch_threads')} torch threads, torch {m.get('torch')}).",
        "",
        markdown_table(report),
        "",
        *verdict_lines(report),
        "",
        *scale_lines(report),
        "",
        "Validation loss (nats/byte) per seed:",
        "",
        per_seed_table(report),
        "",
        *pilot_lines(report),
        *spread_lines(report),
        *ablation_lines(report),
        *diagnostic_lines(report),
        "Notes:",
        "",
        *(f"- {n}" for n in report.notes),
        "- KV params: the weights that produce cached keys/values (k/v projections; MLA: "
        "kv_a_proj_with_mqa, kv_a_layernorm, kv_b_proj; DSA adds the indexer's wk and k_norm; V4: "
        "kv_proj, kv_norm and its compressors' key side, the mean over its layer types). "
        "KV cache bytes are what make_cache allocates; bf16 halves them.",
        "- Top-k recall: the dense attention's probability mass inside the indexer's top-k on "
        "validation windows, mean over layers, beside the k most recent keys and k random keys; "
        "for V4, over its CSA layers' compressed entries (the main attention over every visible "
        "entry, the share its indexer's k entries hold, beside the k most recent and k random).",
        "",
    ]
    return "\n".join(parts)
