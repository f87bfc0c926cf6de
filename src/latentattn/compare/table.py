"""The report as markdown: the documents' table (mechanism, KV params, KV memory, quality, speed)
with measured values, then what is within noise and how it was measured."""

from __future__ import annotations

from latentattn.compare.run import CompareReport, VariantResult
from latentattn.compare.stats import NOISE_RULE, within_noise


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
               "val loss (nats/byte)", "bits/byte", "train tok/s",
               *(f"decode tok/s @{c:,}" for c in contexts), "DSA recall (top-k mass)"]
    rows = []
    for v in report.variants:
        rows.append([
            v.mechanism, f"{v.params:,}", f"{v.kv_params_per_layer:,}", _bytes(v.kv_bytes_per_token),
            _vs(v.kv_bytes_per_token / mha.kv_bytes_per_token), v.val_loss.fmt(3),
            v.bits_per_byte.fmt(3), f"{v.train_tokens_per_s.mean:,.0f}",
            *(f"{v.decode_tokens_per_s[c]:,.0f}" for c in contexts), _recall(v),
        ])
    right = set(range(1, len(headers) - 1))
    lines = ["| " + " | ".join(headers) + " |",
             "|" + "|".join("---:" if i in right else "---" for i in range(len(headers))) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def noise_lines(report: CompareReport) -> list[str]:
    """What can and cannot be told apart, in words."""
    n = report.n_seeds
    if n < 2:
        lines = ["Spread across seeds: unknown with one seed, so no difference below can be called "
                 "real or noise; rerun with --seeds 3 (or more) to tell."]
    else:
        lines = [f"Spread: ± is the sample standard deviation over {n} seeds (each seed changes "
                 f"the initialisation, the data order and the validation windows). Rule: {NOISE_RULE}."]
        pairs = report.within_noise()
        names = {v.label: v.mechanism for v in report.variants}
        if pairs:
            lines.append("Within noise of each other: "
                         + "; ".join(f"{names[a]} ~ {names[b]}" for a, b in pairs) + ".")
        else:
            lines.append("No two variants are within noise of each other.")
    mha = report.variant("mha")
    for v in report.variants:
        if v.label == "mha":
            continue
        close = within_noise(v.val_loss, mha.val_loss)
        diff = v.val_loss.mean - mha.val_loss.mean
        verdict = ("spread unknown" if close is None else "within noise of MHA" if close
                   else "worse than MHA" if diff > 0 else "better than MHA")
        lines.append(f"- {v.mechanism}: {diff:+.3f} nats/byte vs MHA ({verdict}) with "
                     f"{v.kv_bytes_per_token / mha.kv_bytes_per_token:.3f}x its KV cache.")
    return lines


def markdown_report(report: CompareReport) -> str:
    """results.md: how it was made, the table, noise, notes."""
    m = report.machine
    t = report.settings["train"]
    parts = [
        "# latentattn compare",
        "",
        f"Command: `{report.command}`",
        "",
        f"Data: {report.data} ({report.data_bytes:,} bytes, last 10% held out). "
        f"{t['steps']} steps x {t['batch_size']} x {t['seq_len']} bytes, "
        f"{report.n_seeds} seed(s), {report.seconds / 60:.1f} min on {m.get('processor')} "
        f"({m.get('torch_threads')} torch threads, torch {m.get('torch')}).",
        "",
        markdown_table(report),
        "",
        *noise_lines(report),
        "",
        "Notes:",
        "",
        *(f"- {n}" for n in report.notes),
        "- KV params: the weights that produce cached keys/values (k/v projections; MLA: "
        "kv_a_proj_with_mqa, kv_a_layernorm, kv_b_proj; DSA adds the indexer's wk and k_norm). "
        "KV cache bytes are what make_cache allocates; bf16 halves them.",
        "- DSA recall: the dense attention's probability mass inside the indexer's top-k on "
        "validation windows, mean over layers, beside the k most recent keys and k random keys.",
        "",
    ]
    return "\n".join(parts)
