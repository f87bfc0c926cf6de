"""How much a variant's result depends on the seed, and what in an MLA run predicts it.

* **Spread**: each variant's standard deviation over seeds against MHA's, as a ratio with its
  95% interval from the F distribution (the ratio of two sample variances over ``n - 1`` and
  ``m - 1`` degrees of freedom; it assumes the seeds' results are normal and the two variants'
  independent, which seeds shared between variants only approximate), beside the range
  (max - min), the figure the two-mode question was first raised with.
* **Against MLA**: each ablation of MLA minus MLA, paired by seed (the seed fixes the same
  initial weights and data order for both, the ablation's one change aside), with its 95%
  interval (:func:`latentattn.compare.stats.paired`).
* **Diagnostics**: for the MLA runs (latentattn.compare.diagnose), the layer-mean of each
  diagnostic at a step, per seed, and its Spearman rank correlation with the final validation
  loss over the seeds (scipy.stats.spearmanr; with 7 seeds only a correlation near +/-1 is
  significant, so the p-value is printed beside it).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from scipy import stats as scipy_stats

from latentattn.compare.diagnose import GRAD_KEYS, SNAPSHOT_KEYS, STEPS, layer_mean
from latentattn.compare.report import CompareReport, VariantResult
from latentattn.compare.stats import paired

DIAGNOSTIC_STEP = 200  # the per-seed table: past step 100, where the issue saw the seeds part
RATIO_LIMIT = 1.5  # "MLA's seed spread within 1.5x MHA's"


@dataclass(frozen=True)
class Spread:
    label: str
    std: float
    range: float
    ratio: float  # std / MHA's std
    low: float  # 95% interval of the ratio
    high: float

    @classmethod
    def against(cls, v: VariantResult, ref: VariantResult) -> Spread | None:
        a, b = [r.val_loss for r in v.runs], [r.val_loss for r in ref.runs]
        if len(a) < 2 or len(b) < 2:
            return None
        sa, sb = v.val_loss.std, ref.val_loss.std
        assert sa is not None and sb is not None
        if sb == 0:
            return None
        f = (sa / sb) ** 2
        # var_a / var_b lies in [f / F(0.975; a, b), f / F(0.025; a, b)] with 95% confidence.
        hi_q = float(scipy_stats.f.ppf(0.975, len(a) - 1, len(b) - 1))
        lo_q = float(scipy_stats.f.ppf(0.025, len(a) - 1, len(b) - 1))
        return cls(v.label, sa, max(a) - min(a), sa / sb, math.sqrt(f / hi_q), math.sqrt(f / lo_q))


def spreads(report: CompareReport) -> list[Spread]:
    labels = {v.label for v in report.variants}
    if "mha" not in labels:
        return []
    ref = report.variant("mha")
    return [s for v in report.variants if (s := Spread.against(v, ref)) is not None]


def spread_lines(report: CompareReport) -> list[str]:
    rows = spreads(report)
    if not rows:
        return []
    names = {v.label: v.mechanism for v in report.variants}
    lines = [f"Seed spread (validation loss over {report.n_seeds} seeds; the std ratio's 95% interval "
             "from the F distribution):", "",
             "| mechanism | std | range (max - min) | std / MHA's [95% CI] |",
             "|---|---:|---:|---:|"]
    for s in rows:
        ratio = "-" if s.label == "mha" else f"{s.ratio:.2f} [{s.low:.2f}, {s.high:.2f}]"
        lines.append(f"| {names[s.label]} | {s.std:.4f} | {s.range:.4f} | {ratio} |")
    return [*lines, ""]


def ablation_lines(report: CompareReport) -> list[str]:
    """Each MLA ablation minus MLA, paired by seed, and its spread against MLA's and MHA's."""
    labels = {v.label for v in report.variants}
    ablated = [v for v in report.variants if v.label.startswith("mla-") and "mla" in labels]
    if not ablated or report.n_seeds < 2:
        return []
    mla = report.variant("mla")
    mha = report.variant("mha") if "mha" in labels else None
    lines = ["MLA's ablations against MLA (paired by seed) and their seed spread:", "",
             "| ablation | peak LR | val loss | minus MLA: Δ [95% CI] | std / MLA's | std / MHA's [95% CI] |",
             "|---|---:|---:|---:|---:|---:|"]
    for v in [mla, *ablated]:
        d = paired(v.val_by_seed, mla.val_by_seed, report.margin) if v is not mla else None
        own, base = v.val_loss.std, mla.val_loss.std
        vs_mha = Spread.against(v, mha) if mha is not None else None
        lines.append(
            f"| {v.mechanism} | {v.lr:g} | {v.val_loss.fmt()} | "
            + (d.fmt() if d is not None else "-") + " | "
            + (f"{own / base:.2f}" if own is not None and base else "-") + " | "
            + (f"{vs_mha.ratio:.2f} [{vs_mha.low:.2f}, {vs_mha.high:.2f}]" if vs_mha else "-") + " |")
    return [*lines, ""]


Row = tuple[int, float, dict[str, float | None]]


def diagnostic_rows(v: VariantResult, step: int = DIAGNOSTIC_STEP) -> list[Row]:
    """(seed, val loss, {diagnostic: layer mean at ``step``}) for each run that has diagnostics."""
    rows: list[Row] = []
    for r in v.runs:
        if r.diagnostics:
            values = {k: layer_mean(r.diagnostics, k, step) for k in (*SNAPSHOT_KEYS, *GRAD_KEYS)}
            if any(x is not None for x in values.values()):  # a run shorter than ``step``: none
                rows.append((r.seed, r.val_loss, values))
    return rows


def correlations(v: VariantResult, step: int = DIAGNOSTIC_STEP) -> dict[str, tuple[float, float]]:
    """{diagnostic: (Spearman rho with the final val loss, p)} over the seeds at ``step``."""
    rows = diagnostic_rows(v, step)
    out: dict[str, tuple[float, float]] = {}
    for key in (*SNAPSHOT_KEYS, *GRAD_KEYS):
        pairs = [(d[key], loss) for _, loss, d in rows if d[key] is not None]
        if len(pairs) >= 3 and len({x for x, _ in pairs}) > 1:
            rho, p = scipy_stats.spearmanr([x for x, _ in pairs], [y for _, y in pairs])
            out[key] = (float(rho), float(p))
    return out


def critical_rho(n: int) -> float:
    """The |rho| past which scipy's Spearman test over ``n`` seeds gives p < 0.05: its p comes
    from t = rho sqrt((n - 2) / (1 - rho^2)) on n - 2 degrees of freedom, so the bound is
    t_c / sqrt(n - 2 + t_c^2) with t_c the two-sided 5% point (0.75 for 7 seeds, 0.53 for 14)."""
    if n < 3:
        raise ValueError(f"a rank correlation needs 3 or more seeds, got {n}")
    t = float(scipy_stats.t.ppf(0.975, n - 2))
    return t / math.sqrt(n - 2 + t * t)


def diagnostic_lines(report: CompareReport, step: int = DIAGNOSTIC_STEP) -> list[str]:
    """MLA's seeds at ``step`` (each diagnostic's layer mean, the seeds sorted by final loss), then
    each diagnostic's rank correlation with the final loss at every recorded step, per variant."""
    watched = [v for v in report.variants if diagnostic_rows(v, step)]
    if not watched:
        return []
    keys = (*SNAPSHOT_KEYS, *GRAD_KEYS)
    since = max((s for s in STEPS if s < step), default=-1)
    lines = [f"MLA layers at step {step} (mean over layers; grad_*: mean norm over steps "
             f"{since + 1}-{step}) per seed, against the final validation loss:", "",
             "| mechanism | seed | val loss | " + " | ".join(keys) + " |",
             "|---|---:|---:|" + "---:|" * len(keys)]
    mla = [v for v in watched if v.label == "mla"] or watched[:1]
    for v in mla:
        for seed, loss, d in sorted(diagnostic_rows(v, step), key=lambda row: row[1]):
            lines.append(f"| {v.mechanism} | {seed} | {loss:.4f} | "
                         + " | ".join("-" if d[k] is None else f"{d[k]:.4g}" for k in keys) + " |")
    steps = [s for s in STEPS if any(diagnostic_rows(v, s) for v in watched)]
    n = max(len(diagnostic_rows(v, s)) for v in watched for s in steps)
    need = f"; with {n} seeds |rho| > {critical_rho(n):.2f} is needed" if n >= 3 else ""
    lines += ["", "Spearman rank correlation of each diagnostic with the final validation loss over "
              f"the seeds, at each recorded step (rho; * where p < 0.05{need}):", "",
              "| mechanism | diagnostic | " + " | ".join(f"step {s}" for s in steps) + " |",
              "|---|---|" + "---:|" * len(steps)]
    for v in watched:
        by_step = {s: correlations(v, s) for s in steps}
        for k in keys:
            cells = [f"{by_step[s][k][0]:+.2f}" + ("*" if by_step[s][k][1] < 0.05 else "")
                     if k in by_step[s] else "-" for s in steps]
            if any(c != "-" for c in cells):
                lines.append(f"| {v.mechanism} | {k} | " + " | ".join(cells) + " |")
    return [*lines, ""]


__all__ = ["DIAGNOSTIC_STEP", "RATIO_LIMIT", "Spread", "ablation_lines", "correlations", "critical_rho",
           "diagnostic_lines", "diagnostic_rows", "spread_lines", "spreads"]
