"""``latentattn bench convert``: what converting a GQA model to MLA costs, rank by rank.

The source is calibrated once (its attention inputs on the calibration text, and the RoPE pair
scores), converted at each latent rank, and every model (the source first) is evaluated on a text
that is not the calibration text (:func:`latentattn.perplexity.evaluate_text`). Reported per
rank: the KV cache per token (bf16, all layers) against the source's, the perplexity and nats
per byte, and how long the conversion took.

With a :class:`Heal`, each converted model is then fine-tuned for a few steps on a healing text
(by default the calibration text, so the evaluation text stays unseen), distilling from the
source (:mod:`latentattn.train.distill`), and evaluated again: the "healed" columns.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from latentattn.calc.converted import ConvertSizes, Format, rank_for_ratio, resolve_sizes
from latentattn.calc.kv_bytes import cache_bytes_per_token_per_layer
from latentattn.config import GQAConfig, ModelConfig
from latentattn.convert import Plan, calibrate
from latentattn.convert.calibrate import CALIB_WINDOW
from latentattn.convert.fit import FitSettings, fit_layers
from latentattn.convert.gqa_to_mla import Method, RopeMode, check_sizes
from latentattn.convert.sequential import convert_and_fit
from latentattn.model.transformer import Transformer
from latentattn.perplexity import evaluate_text
from latentattn.timing import machine_info
from latentattn.tokenizer import Tokenizer
from latentattn.train.loop import TrainSettings, train

# The default ranks: those whose cache is a third, a half and two thirds of the source's at the
# default rope dim (for SmolLM2-135M R = 64, 128, 192 at rope 64: the RoRoPE rows of docs/results.md's
# "SmolLM2-135M to MLA, and healed" table); the half is latentattn convert's default rank.
DEFAULT_RATIOS = (1 / 3, 1 / 2, 2 / 3)


def bench_sizes(cfg: ModelConfig, ranks: Sequence[int | str] | None, rope_dim: int | str | None = None,
                rope_mode: RopeMode | None = None, format: Format = "latentattn") -> list[ConvertSizes]:
    """The sizes of each conversion ``bench convert`` runs, resolved and checked as
    ``latentattn.convert_model`` resolves them (:func:`latentattn.calc.converted.resolve_sizes`):
    ``ranks`` (ranks or ``"full"``) at one rope dim and mode, or by default those of
    :data:`DEFAULT_RATIOS`, which agree with ``convert``'s defaults."""
    first = resolve_sizes(cfg, None if not ranks else ranks[0], rope_dim, rope_mode, format)
    if not ranks:
        ranks = sorted({rank_for_ratio(cfg, first.rope_dim, f, first.rope_mode) for f in DEFAULT_RATIOS})
    return [resolve_sizes(cfg, r, first.rope_dim, first.rope_mode, format) for r in ranks]


@dataclass(frozen=True)
class Heal:
    """A short heal of each converted model: ``steps`` AdamW steps of ``batch_size`` x
    ``seq_len`` tokens drawn from ``tokens`` (the healing text's training split; ``val`` its
    validation split), peak ``lr`` after ``warmup_steps``, cosine to a tenth, distilling from the
    source with weight ``distill_weight``, training ``trainable`` weights, in bf16 autocast with
    ``bf16`` (the CLI's ``--heal-dtype auto`` sets it per machine:
    :func:`latentattn.precision.choose_precision`)."""

    tokens: torch.Tensor
    val: torch.Tensor
    steps: int = 100
    batch_size: int = 2
    seq_len: int = 256
    lr: float = 3e-4
    warmup_steps: int = 10
    distill_weight: float = 1.0
    trainable: str = "attention"
    bf16: bool = False

    def settings(self) -> TrainSettings:
        return TrainSettings(steps=self.steps, batch_size=self.batch_size, seq_len=self.seq_len,
                             lr=self.lr, warmup_steps=min(self.warmup_steps, self.steps),
                             weight_decay=0.0, eval_every=0, eval_windows=4,
                             distill_weight=self.distill_weight, trainable=self.trainable,
                             bf16=self.bf16)


@dataclass
class ConvertRow:
    label: str  # "source" or "R=<rank>"
    kv_lora_rank: int | None
    rope_dim: int | None
    kv_bytes_per_token: float  # bf16, all layers
    kv_vs_source: float
    perplexity: float
    nats_per_byte: float
    eval_tokens: int
    convert_seconds: float = 0.0
    fitted_perplexity: float | None = None  # after local fitting (convert --fit-steps)
    fitted_nats_per_byte: float | None = None
    fit_seconds: float | None = None
    healed_perplexity: float | None = None
    healed_nats_per_byte: float | None = None
    heal_seconds: float | None = None


@dataclass
class ConvertReport:
    model: str
    data: str
    calib: str
    method: str
    rope_mode: str
    latent_norm: bool  # DeepSeek's RMSNorm on the latent (convert --format deepseek)
    sequential: bool  # layer l calibrated on the converted layers 0..l-1's outputs
    seed: int  # the calibration span's and the fit's seed
    pairs: list[int]
    seconds_calibration: float
    heal: dict[str, Any] | None = None  # the Heal's settings (no tokens), or None: not healed
    fit: dict[str, Any] | None = None  # the FitSettings, or None: not fitted
    rows: list[ConvertRow] = field(default_factory=list)
    machine: dict[str, Any] = field(default_factory=machine_info)

    def as_dict(self) -> dict[str, Any]:
        return {**{k: v for k, v in asdict(self).items() if k != "rows"},
                "rows": [asdict(r) for r in self.rows],
                "units": {"kv_bytes_per_token": "bf16 bytes per cached token, all layers"}}


def run_convert_bench(model: Transformer, tokenizer: Tokenizer, calib_ids: torch.Tensor, text: str,
                      ranks: Sequence[int], rope_dim: int, method: Method, seq_len: int,
                      max_tokens: int | None, names: tuple[str, str, str],
                      progress: Callable[[str], None] | None = None,
                      heal: Heal | None = None, rope_mode: RopeMode = "blocks",
                      latent_norm: bool = False, fit: FitSettings | None = None,
                      sequential: bool = False, seed: int = 0) -> ConvertReport:
    """Calibrate ``model`` on ``calib_ids``, convert it at each rank of ``ranks`` (each checked
    against ``rope_dim``), evaluate it and the source on ``text``; with ``heal``, heal each
    converted model and evaluate it again. ``names``: (model, data, calib) as reported.
    ``rope_mode`` and ``latent_norm``: as in :class:`latentattn.convert.Plan` (both
    ``"rorope"`` and True: what ``convert --format deepseek`` writes). With ``fit``, each
    converted model is fitted layer by layer to the source (:mod:`latentattn.convert.fit`) after
    its closed-form row and evaluated again (the "fitted" columns), and the heal starts from it.
    ``sequential``: each layer calibrated (and fitted) on the converted earlier layers' outputs
    (:mod:`latentattn.convert.sequential`; the fitted model is then converted again with its fit,
    and the fit's seconds include that conversion). ``seed``: the fit's window sampling."""
    cfg = model.config
    a = cfg.attention
    assert isinstance(a, GQAConfig)
    for rank in ranks:
        check_sizes(cfg, rope_dim, rank, rope_mode)
    started = time.perf_counter()
    pairs, inputs = calibrate(model, rope_dim, calib_ids, rorope=rope_mode == "rorope")
    report = ConvertReport(model=names[0], data=names[1], calib=names[2], method=method,
                           sequential=sequential, seed=seed,
                           rope_mode=rope_mode, latent_norm=latent_norm, pairs=list(pairs),
                           seconds_calibration=time.perf_counter() - started)
    if heal is not None:
        report.heal = {k: v for k, v in asdict(heal).items() if k not in ("tokens", "val")}
    if fit is not None:
        report.fit = asdict(fit)
    source_bytes = cache_bytes_per_token_per_layer(cfg, 2) * cfg.n_layers

    def row(label: str, m: Transformer, rank: int | None, seconds: float) -> ConvertRow:
        if progress is not None:
            progress(label)
        r = evaluate_text(m, tokenizer, text, seq_len=seq_len, max_tokens=max_tokens)
        kv = cache_bytes_per_token_per_layer(m.config, 2) * cfg.n_layers
        return ConvertRow(label, rank, None if rank is None else rope_dim, kv, kv / source_bytes,
                          r.perplexity, r.nats_per_byte, r.tokens, seconds)

    def after(work: Callable[[], Transformer], label: str) -> tuple[Transformer, float, float, float]:
        """(the model ``work`` returns, its perplexity, nats/byte, seconds of work and eval)."""
        t0 = time.perf_counter()
        m = work()
        r = evaluate_text(m, tokenizer, text, seq_len=seq_len, max_tokens=max_tokens)
        if progress is not None:
            progress(label)
        return m, r.perplexity, r.nats_per_byte, time.perf_counter() - t0

    def fitted(plan: Plan, mla: Transformer) -> Transformer:
        assert fit is not None and inputs is not None
        if sequential:
            return convert_and_fit(model, plan, inputs, calib_ids, window, fit, True, seed=seed)[0]
        fit_layers(model, mla, inputs, window, fit, seed=seed)
        return mla

    def healed(mla: Transformer) -> Transformer:
        assert heal is not None
        train(mla, heal.tokens, heal.val, heal.settings(), progress=False, teacher=model)
        return mla

    window = min(CALIB_WINDOW, cfg.max_seq_len)  # the calibration windows a fit cuts inputs into
    report.rows.append(row("source", model, None, 0.0))
    for rank in ranks:
        t0 = time.perf_counter()
        plan = Plan(pairs, rank, method, rope_mode, latent_norm)
        mla, _ = convert_and_fit(model, plan, inputs, calib_ids, window, None, sequential)
        report.rows.append(row(f"R={rank}", mla, rank, time.perf_counter() - t0))
        last = report.rows[-1]
        if fit is not None and fit.steps:
            mla, last.fitted_perplexity, last.fitted_nats_per_byte, last.fit_seconds = after(
                functools.partial(fitted, plan, mla), f"R={rank} fitted")
        if heal is not None:
            mla, last.healed_perplexity, last.healed_nats_per_byte, last.heal_seconds = after(
                functools.partial(healed, mla), f"R={rank} healed")
        del mla
    return report


def convert_table(report: ConvertReport) -> str:
    healed = report.heal is not None
    fitted = report.fit is not None
    head = "| model | latent R | rope dims | KV B/token (bf16) | vs source | perplexity | nats/byte |"
    rule = "|---|---:|---:|---:|---:|---:|---:|"
    if fitted:
        head += " fitted perplexity | fitted nats/byte | fit s |"
        rule += "---:|---:|---:|"
    if healed:
        head += " healed perplexity | healed nats/byte | heal s |"
        rule += "---:|---:|---:|"
    lines = [head, rule]
    for r in report.rows:
        line = (f"| {r.label} | {r.kv_lora_rank if r.kv_lora_rank is not None else '-'} | "
                f"{r.rope_dim if r.rope_dim is not None else '-'} | {r.kv_bytes_per_token:,.0f} | "
                f"{r.kv_vs_source:.2f}x | {r.perplexity:,.2f} | {r.nats_per_byte:.4f} |")
        if fitted:
            line += (" - | - | - |" if r.fitted_perplexity is None else
                     f" {r.fitted_perplexity:,.2f} | {r.fitted_nats_per_byte:.4f} | {r.fit_seconds:,.0f} |")
        if healed:
            line += (" - | - | - |" if r.healed_perplexity is None else
                     f" {r.healed_perplexity:,.2f} | {r.healed_nats_per_byte:.4f} | "
                     f"{r.heal_seconds:,.0f} |")
        lines.append(line)
    return "\n".join(lines)


def plot_convert_report(report: ConvertReport, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    src, rest = report.rows[0], report.rows[1:]
    ax.plot([r.kv_bytes_per_token for r in rest], [r.nats_per_byte for r in rest], "o-",
            label=f"MLA ({report.method}, {report.rope_mode} rope {rest[0].rope_dim if rest else '-'}"
            + (", latent norm)" if report.latent_norm else ")"))
    for r in rest:
        ax.annotate(r.label, (r.kv_bytes_per_token, r.nats_per_byte), textcoords="offset points",
                    xytext=(4, 4), fontsize=8)
    healed = [r for r in rest if r.healed_nats_per_byte is not None]
    if healed:
        ax.plot([r.kv_bytes_per_token for r in healed], [r.healed_nats_per_byte or 0.0 for r in healed],
                "s--", label=f"MLA healed ({report.heal['steps'] if report.heal else '?'} steps)")
    ax.scatter([src.kv_bytes_per_token], [src.nats_per_byte], marker="*", s=120, color="k",
               label="source (GQA)", zorder=3)
    ax.set_xlabel("KV cache bytes per token (bf16, all layers)")
    ax.set_ylabel(f"nats per byte on {report.data}")
    ax.set_title(f"{report.model} converted to MLA" + ("" if healed else ", before healing"))
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, format="png", dpi=120)
    plt.close(fig)


__all__ = ["DEFAULT_RATIOS", "ConvertReport", "ConvertRow", "Heal", "bench_sizes", "convert_table",
           "plot_convert_report", "run_convert_bench"]
