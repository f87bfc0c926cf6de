"""``latentattn bench precision``: one heal step in fp32 and in bf16 autocast on this machine.

A heal step (:class:`latentattn.bench.convert.Heal`, ``train --teacher``) is a distillation step:
a batch, the converted student's forward and backward, the source's forward as the teacher, the
KL to it, an AdamW step. This runs that step through :func:`latentattn.train.loop.train` itself
(the ``Heal``'s settings, only the precision differing), from the same student weights and the
same batches in both precisions, and reports each precision's median seconds per step with a
95% interval, and their ratio: what ``train --dtype auto``
(:func:`latentattn.precision.choose_precision`) rests on.

Each precision runs ``rounds`` times, each run ``warmup`` untimed steps (allocation, oneDNN's
kernel choice) then ``steps`` timed ones; the rounds alternate which precision goes first
(fp32 bf16, bf16 fp32, ...) so that a change of load on a shared machine falls on both. The
interval is a percentile bootstrap of the median over the timed steps (of the ratio of the
medians for the ratio). The first round's per-step LM losses of both precisions are kept too:
the same batches and weights, so they differ only by bf16 rounding.
"""

from __future__ import annotations

import copy
import os
import statistics
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import numpy as np
import torch

from latentattn.bench.convert import Heal
from latentattn.convert import Plan, calibrate, check_sizes, convert, full_rope_dim
from latentattn.model.transformer import Transformer
from latentattn.precision import CpuBf16, choose_precision, cpu_bf16
from latentattn.timing import machine_info
from latentattn.train.loop import train

PRECISIONS = ("fp32", "bf16")
LABEL = {"fp32": "fp32", "bf16": "bf16 autocast"}
BOOTSTRAP = 2000  # resamples: the 2.5% and 97.5% quantiles move by well under 1% beyond this


@dataclass(frozen=True)
class PrecisionBenchSettings:
    """What one timed step is (``batch_size`` x ``seq_len`` tokens, ``trainable`` weights, peak
    ``lr``: ``bench convert``'s heal defaults) and how many are timed: per precision, ``rounds``
    runs of ``warmup`` untimed then ``steps`` timed steps. ``seed``: the bootstrap's."""

    batch_size: int = 2
    seq_len: int = 256
    trainable: str = "attention"
    lr: float = 3e-4
    warmup: int = 1
    steps: int = 3
    rounds: int = 2
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("batch_size", "seq_len", "steps", "rounds"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.warmup < 0:
            raise ValueError(f"warmup must be >= 0, got {self.warmup}")


@dataclass
class PrecisionTiming:
    precision: str  # "fp32" or "bf16" (autocast, fp32 master weights)
    step_seconds: list[float]  # every timed step, rounds in order
    median_s: float
    ci95_s: tuple[float, float]  # percentile bootstrap of the median
    # The fastest step: other work on the machine only ever adds time, so on a shared machine
    # this is the least disturbed figure (the median is what a heal there takes).
    min_s: float
    tokens_per_s: float  # batch_size * seq_len / median_s
    first_round_losses: list[float]  # LM loss of every step of the first round, warm-up included


@dataclass
class PrecisionReport:
    model: str
    student: str
    settings: dict[str, Any]
    cpu: dict[str, Any]  # latentattn.precision.CpuBf16 of this machine
    auto: str  # what train --dtype auto picks here (PrecisionChoice.line)
    timings: list[PrecisionTiming] = field(default_factory=list)
    # fp32 median / bf16 median: > 1 when bf16 autocast is faster; its bootstrap 95% interval
    speedup_bf16: float = float("nan")
    speedup_bf16_ci95: tuple[float, float] = (float("nan"), float("nan"))
    max_loss_diff: float = float("nan")  # max |fp32 - bf16| LM loss over the first round's steps
    machine: dict[str, Any] = field(default_factory=machine_info)

    def timing(self, precision: str) -> PrecisionTiming:
        return next(t for t in self.timings if t.precision == precision)

    def faster(self) -> str:
        """The precision with the lower median step time."""
        return min(self.timings, key=lambda t: t.median_s).precision

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "faster": self.faster(),
                "units": {"step_seconds": "wall-clock seconds per heal step",
                          "speedup_bf16": "fp32 median step time / bf16 autocast median"}}


def bootstrap_median_ci(xs: Sequence[float], seed: int, n: int = BOOTSTRAP) -> tuple[float, float]:
    """The percentile bootstrap 95% interval of the median of ``xs`` (scipy.stats.bootstrap)."""
    return _percentile_ci((xs,), lambda a, axis=-1: np.median(a, axis=axis), seed, n)


def bootstrap_ratio_ci(num: Sequence[float], den: Sequence[float], seed: int, n: int = BOOTSTRAP
                       ) -> tuple[float, float]:
    """The percentile bootstrap 95% interval of median(num) / median(den), the two samples
    resampled independently (scipy.stats.bootstrap, paired=False)."""
    return _percentile_ci((num, den), lambda a, b, axis=-1: (np.median(a, axis=axis)
                                                             / np.median(b, axis=axis)), seed, n)


def _percentile_ci(samples: tuple[Sequence[float], ...], statistic: Callable[..., Any], seed: int,
                   n: int) -> tuple[float, float]:
    from scipy.stats import bootstrap

    ci = bootstrap(samples, statistic, paired=False, n_resamples=n, method="percentile",
                   random_state=np.random.default_rng(seed)).confidence_interval
    return float(ci.low), float(ci.high)


def convert_student(teacher: Transformer, calib_ids: torch.Tensor, kv_lora_rank: int) -> Transformer:
    """``teacher`` converted to MLA at ``kv_lora_rank`` with every rotary dim (PCA on
    ``calib_ids``: ``bench convert``'s defaults), the student a heal trains."""
    rope_dim = full_rope_dim(teacher.config)
    check_sizes(teacher.config, rope_dim, kv_lora_rank)
    pairs, inputs = calibrate(teacher, rope_dim, calib_ids)
    return convert(teacher, Plan(pairs, kv_lora_rank, "pca"), inputs)


def run_precision_bench(teacher: Transformer, student: Transformer, tokens: torch.Tensor,
                        val: torch.Tensor, settings: PrecisionBenchSettings,
                        names: tuple[str, str], cpu: CpuBf16 | None = None,
                        progress: Callable[[str], None] | None = None) -> PrecisionReport:
    """Time heal steps of (a fresh copy of) ``student`` distilling from ``teacher`` on
    ``tokens`` (``val``: the validation split :func:`train` needs; one window of it is
    evaluated after each run, untimed) in fp32 and in bf16 autocast. ``names``: (model,
    student) as reported; ``cpu``: this machine's :func:`cpu_bf16` unless given."""
    info = cpu if cpu is not None else cpu_bf16()
    device = next(student.parameters()).device
    report = PrecisionReport(model=names[0], student=names[1], settings=asdict(settings),
                             cpu=asdict(info), auto=choose_precision("auto", device, info).line())
    seconds: dict[str, list[float]] = {p: [] for p in PRECISIONS}
    losses: dict[str, list[float]] = {}
    n = settings.warmup + settings.steps
    for r in range(settings.rounds):
        for precision in PRECISIONS if r % 2 == 0 else PRECISIONS[::-1]:
            if progress is not None:
                progress(f"round {r + 1} {LABEL[precision]}")
            heal = Heal(tokens, val, steps=n, batch_size=settings.batch_size,
                        seq_len=settings.seq_len, lr=settings.lr, trainable=settings.trainable,
                        bf16=precision == "bf16")
            # One validation window: train() evaluates at its last step, untimed, and a heal's
            # four would only lengthen the run.
            result = train(copy.deepcopy(student), tokens, val, replace(heal.settings(), eval_windows=1),
                           progress=False, teacher=teacher)
            seconds[precision] += result.step_seconds[settings.warmup:]
            losses.setdefault(precision, result.train_losses)
    if hasattr(os, "getloadavg"):  # beside machine_info's at the start: was the machine shared?
        report.machine["loadavg_1_5_15_at_end"] = [round(x, 2) for x in os.getloadavg()]
    per_step = settings.batch_size * settings.seq_len
    for precision in PRECISIONS:
        xs = seconds[precision]
        med = statistics.median(xs)
        report.timings.append(PrecisionTiming(precision, xs, med, bootstrap_median_ci(xs, settings.seed),
                                              min(xs), per_step / med, losses[precision]))
    report.speedup_bf16 = report.timing("fp32").median_s / report.timing("bf16").median_s
    report.speedup_bf16_ci95 = bootstrap_ratio_ci(seconds["fp32"], seconds["bf16"], settings.seed)
    report.max_loss_diff = max(abs(a - b) for a, b in zip(losses["fp32"], losses["bf16"], strict=True))
    return report


def precision_table(report: PrecisionReport) -> str:
    """A markdown table of both precisions, then the ratio and what auto picks here."""
    s = report.settings
    lines = ["| precision | median s/step | 95% CI | fastest s/step | tokens/s (median) | timed steps |",
             "|---|---:|---:|---:|---:|---:|"]
    for t in report.timings:
        lines.append(f"| {LABEL[t.precision]} | {t.median_s:.2f} | {t.ci95_s[0]:.2f}-{t.ci95_s[1]:.2f} "
                     f"| {t.min_s:.2f} | {t.tokens_per_s:,.0f} | {len(t.step_seconds)} |")
    lo, hi = report.speedup_bf16_ci95
    fastest = report.timing("fp32").min_s / report.timing("bf16").min_s
    load = [report.machine.get(f"loadavg_1_5_15_at_{when}", ["?"])[0] for when in ("start", "end")]
    cpu = CpuBf16(**{**report.cpu, "flags": tuple(report.cpu["flags"])})
    lines += [
        "",
        f"{report.model} heal step ({report.student}, {s['batch_size']} x {s['seq_len']} tokens, "
        f"trainable {s['trainable']}) on {cpu.describe()}, {report.machine.get('torch_threads')} "
        "torch threads",
        f"1-minute load average {load[0]} at the start, {load[1]} at the end",
        f"fp32 / bf16 autocast step time: median {report.speedup_bf16:.2f}x (95% CI {lo:.2f}-{hi:.2f}), "
        f"fastest steps {fastest:.2f}x; faster: {LABEL[report.faster()]}",
        f"max |LM loss difference| over the first {s['warmup'] + s['steps']} steps: "
        f"{report.max_loss_diff:.3f} nats",
        f"train --dtype auto here: {report.auto.removeprefix('precision: ')}",
    ]
    return "\n".join(lines)


def plot_precision_report(report: PrecisionReport, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 4))
    for i, t in enumerate(report.timings):
        ax.scatter([i] * len(t.step_seconds), t.step_seconds, alpha=0.6, label=LABEL[t.precision])
        ax.errorbar([i + 0.15], [t.median_s], yerr=[[t.median_s - t.ci95_s[0]], [t.ci95_s[1] - t.median_s]],
                    fmt="k_", capsize=4)
    ax.set_xticks(range(len(report.timings)), [LABEL[t.precision] for t in report.timings])
    ax.set_ylabel("seconds per heal step")
    ax.set_ylim(bottom=0)
    ax.set_title(f"{report.model} heal step, fp32 / bf16 autocast: {report.speedup_bf16:.2f}x\n"
                 "(each step; median and its 95% CI)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, format="png", dpi=120)
    plt.close(fig)


__all__ = ["PrecisionBenchSettings", "PrecisionReport", "PrecisionTiming", "bootstrap_median_ci",
           "bootstrap_ratio_ci", "convert_student", "plot_precision_report", "precision_table",
           "run_precision_bench"]
