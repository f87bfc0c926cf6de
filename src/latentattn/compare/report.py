"""What a comparison produces: its settings, each (variant, seed) run, each variant's
measurements and runs, and the report over all of them with the paired test against MHA."""

from __future__ import annotations

import dataclasses
import math
import statistics
from dataclasses import dataclass, field
from typing import Any

from latentattn.compare.lr import DEFAULT_PILOT_SEEDS
from latentattn.compare.stats import DEFAULT_MARGIN, RULE, Paired, Summary, Verdict, paired, pareto_front
from latentattn.train.family import FamilySize
from latentattn.train.settings import TrainSettings

LN2 = math.log(2)


@dataclass(frozen=True)
class CompareSettings:
    size: FamilySize
    train: TrainSettings
    seeds: int = 3
    contexts: tuple[int, ...] = (256, 4096)
    sweeps: dict[str, tuple[int, ...]] = field(default_factory=dict)
    decode_steps: int = 32
    recall_batches: int = 4
    margin: float = DEFAULT_MARGIN  # nats/byte: the equivalence margin, fixed before the run
    # Learning rates (latentattn.compare.lr): pinned per label, else picked from lr_grid by a
    # pilot of pilot_fraction of the steps, else train.lr for all.
    lrs: dict[str, float] = field(default_factory=dict)
    lr_grid: tuple[float, ...] = ()
    pilot_fraction: float = 1.0
    pilot_seeds: int = DEFAULT_PILOT_SEEDS  # each LR's pilot loss is the mean over this many seeds of its own
    lr_extend: int = 3  # grid extensions past an edge pick (latentattn.compare.lr.beyond)
    # The DSA retrofit (variants.retrofit_variant): the dense MLA runs fork at retrofit_at of
    # the steps; the indexer warm-up (model frozen) takes retrofit_warmup of the steps, then
    # sparse training to the end.
    retrofit_at: float = 0.75
    retrofit_warmup: float = 0.05
    device: str = "cpu"  # where every run trains and is measured

    def fork_steps(self) -> tuple[int, int]:
        """(the step the dense runs fork at, the step the retrofit's indexer warm-up ends)."""
        steps = self.train.steps
        fork = round(self.retrofit_at * steps)
        return fork, fork + max(1, round(self.retrofit_warmup * steps))

    def as_dict(self) -> dict[str, Any]:
        return {"size": dataclasses.asdict(self.size), "train": dataclasses.asdict(self.train),
                "seeds": list(range(self.seeds)), "contexts": list(self.contexts),
                "sweeps": {k: list(v) for k, v in self.sweeps.items()},
                "decode_steps": self.decode_steps, "recall_batches": self.recall_batches,
                "margin": self.margin, "lrs": dict(sorted(self.lrs.items())),
                "lr_grid": list(self.lr_grid), "pilot_fraction": self.pilot_fraction,
                "pilot_seeds": self.pilot_seeds, "lr_extend": self.lr_extend,
                "retrofit_at": self.retrofit_at, "retrofit_warmup": self.retrofit_warmup,
                "device": self.device}


@dataclass
class SeedRun:
    seed: int
    val_loss: float  # nats per byte, after training (DSA: top-k inference form)
    train_tokens_per_s: float
    seconds: float
    steps_done: int
    train_losses: list[float]
    val_curve: list[tuple[int, float]]
    dsa_val_loss_dense: float | None = None
    dsa_recall: list[dict[str, float]] | None = None
    # MLA layers' statistics while training (latentattn.compare.diagnose): {key: {step: [layer]}}
    diagnostics: dict[str, dict[str, list[float]]] | None = None

    def late_train_loss(self) -> float:
        """The training loss over the last tenth of the steps (one step is too noisy)."""
        tail = self.train_losses[-max(1, len(self.train_losses) // 10):]
        return statistics.fmean(tail)

    def curve_at(self, step: int) -> float | None:
        return next((loss for s, loss in self.val_curve if s == step), None)


@dataclass
class VariantResult:
    label: str
    kind: str
    mechanism: str
    sweep: dict[str, int]
    latent: dict[str, int]  # kv_lora_rank / index_topk of MLA and DSA variants
    reference: bool  # MHA, MQA, GQA
    params: int
    ffn_width: int
    n_layers: int
    kv_params_per_layer: int
    kv_bytes_per_token: float  # allocated, all layers, in kv_dtype
    kv_bytes_per_token_bf16: float
    kv_dtype: str
    decode_tokens_per_s: dict[int, float]
    runs: list[SeedRun] = field(default_factory=list)
    control: bool = False  # the positive control (variants.control_variant)
    lr: float = 0.0  # the peak LR its runs trained with
    lr_source: str = "common"  # "pinned" (--lr label=...), "pilot" (--lr-grid) or "common"
    pilot_losses: dict[str, float] = field(default_factory=dict)  # LR (as text) -> pilot val loss
    # LR (as text) -> each pilot seed's val loss (pilot_losses holds their mean)
    pilot_seed_losses: dict[str, list[float]] = field(default_factory=dict)
    train_flops_per_token: float = 0.0  # latentattn.calc.flops, at the training window
    retrofit_of: str = ""  # a DSA retrofit: the label of the dense variant it forks
    dsa_density: dict[str, float] | None = None  # DSA: latentattn.calc.topk_density at seq_len
    v4_read: dict[str, Any] | None = None  # V4: latentattn.calc.density.v4_read_fraction at seq_len

    @property
    def train_val_gap(self) -> Summary:
        """Validation minus late training loss per seed: a growing gap means memorising the text."""
        return Summary.of([r.val_loss - r.late_train_loss() for r in self.runs])

    @property
    def val_loss(self) -> Summary:
        return Summary.of([r.val_loss for r in self.runs])

    @property
    def val_by_seed(self) -> dict[int, float]:
        return {r.seed: r.val_loss for r in self.runs}

    @property
    def bits_per_byte(self) -> Summary:
        return Summary.of([r.val_loss / LN2 for r in self.runs])

    @property
    def train_tokens_per_s(self) -> Summary:
        return Summary.of([r.train_tokens_per_s for r in self.runs])

    @property
    def recall(self) -> list[dict[str, float]] | None:
        """Per layer, each of indexer / recent / uniform averaged over seeds (DSA; V4: its CSA layers)."""
        runs = [r.dsa_recall for r in self.runs if r.dsa_recall is not None]
        if not runs:
            return None
        return [{k: statistics.fmean(run[layer][k] for run in runs) for k in runs[0][layer]}
                for layer in range(len(runs[0]))]

    def recall_mean(self, key: str = "indexer") -> float | None:
        rec = self.recall
        return None if rec is None else statistics.fmean(layer[key] for layer in rec)

    def val_curve(self) -> list[tuple[int, float]]:
        """Validation loss at each evaluated step, averaged over the seeds that have it."""
        by_step: dict[int, list[float]] = {}
        for r in self.runs:
            for step, loss in r.val_curve:
                by_step.setdefault(step, []).append(loss)
        return [(s, statistics.fmean(v)) for s, v in sorted(by_step.items())]

    def as_dict(self) -> dict[str, Any]:
        d = {k: v for k, v in dataclasses.asdict(self).items() if k != "runs"}
        d["decode_tokens_per_s"] = {str(k): v for k, v in self.decode_tokens_per_s.items()}
        dense = [r.dsa_val_loss_dense for r in self.runs if r.dsa_val_loss_dense is not None]
        d.update(
            val_loss=self.val_loss.as_dict(), bits_per_byte=self.bits_per_byte.as_dict(),
            train_tokens_per_s=self.train_tokens_per_s.as_dict(),
            dsa_val_loss_dense=Summary.of(dense).as_dict() if dense else None,
            dsa_recall=self.recall, val_curve_mean=self.val_curve(),
            train_val_gap=self.train_val_gap.as_dict() if self.runs else None,
            runs=[dataclasses.asdict(r) for r in self.runs],
        )
        return d


@dataclass
class CompareReport:
    machine: dict[str, Any]
    settings: dict[str, Any]
    data: str
    data_bytes: int
    command: str
    variants: list[VariantResult] = field(default_factory=list)
    train_tokens: int = 0  # tokens of the training split (the data's first 90%)
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def variant(self, label: str) -> VariantResult:
        for v in self.variants:
            if v.label == label:
                return v
        raise KeyError(label)

    @property
    def n_seeds(self) -> int:
        return min(len(v.runs) for v in self.variants)

    @property
    def tokens_per_run(self) -> int:
        t = self.settings["train"]
        return int(t["steps"] * t["batch_size"] * t["seq_len"])

    @property
    def epochs(self) -> float:
        """How many times each run went over the training text."""
        return self.tokens_per_run / max(1, self.train_tokens)

    def horizon_step(self) -> int | None:
        """The evaluated step nearest half the steps, on every run's curve (None if there is none
        before the end)."""
        steps = int(self.settings["train"]["steps"])
        common = set.intersection(*({s for s, _ in r.val_curve} for v in self.variants for r in v.runs))
        early = sorted(s for s in common if s < steps)
        return min(early, key=lambda s: abs(s - steps / 2)) if early else None

    def versus_mha_at(self, label: str, step: int) -> Paired:
        """The paired difference at ``step`` of the loss curves (their fixed subset of windows)."""
        def at(v: VariantResult) -> dict[int, float]:
            return {r.seed: x for r in v.runs if (x := r.curve_at(step)) is not None}

        return paired(at(self.variant(label)), at(self.variant("mha")), self.margin)

    def horizon(self, label: str) -> tuple[int, Verdict, Verdict] | None:
        """(half step, verdict there, verdict at the end) on the curves' windows: a verdict that
        flips between them says the run is still too short to decide."""
        mid = self.horizon_step()
        if mid is None:
            return None
        end = int(self.settings["train"]["steps"])
        return mid, self.versus_mha_at(label, mid).verdict, self.versus_mha_at(label, end).verdict

    @property
    def margin(self) -> float:
        return float(self.settings.get("margin", DEFAULT_MARGIN))

    def versus_mha(self, label: str) -> Paired:
        """``label``'s validation loss minus MHA's, paired by seed (:mod:`latentattn.compare.stats`)."""
        return paired(self.variant(label).val_by_seed, self.variant("mha").val_by_seed, self.margin)

    def versus_dense(self, label: str) -> Paired:
        """A DSA retrofit's validation loss minus its dense continuation's (the variant it forked
        from, trained on the same tokens), paired by seed."""
        v = self.variant(label)
        return paired(v.val_by_seed, self.variant(v.retrofit_of).val_by_seed, self.margin)

    def retrofit_verdict(self, label: str) -> Verdict:
        """As :meth:`verdict`, for a retrofit against its dense continuation."""
        v = self.versus_dense(label).verdict
        return "inconclusive" if v == "equivalent" and self.control_resolved is False else v

    @property
    def train_seconds(self) -> float:
        """Training seconds summed over every run of every variant (pilots not counted)."""
        return sum(r.seconds for v in self.variants for r in v.runs)

    @property
    def retrofits(self) -> list[VariantResult]:
        return [v for v in self.variants if v.retrofit_of]

    @property
    def control(self) -> VariantResult | None:
        return next((v for v in self.variants if v.control), None)

    @property
    def control_resolved(self) -> bool | None:
        """Whether the positive control came out worse than MHA (None: no control was run)."""
        c = self.control
        return None if c is None else self.versus_mha(c.label).verdict == "worse"

    def verdict(self, label: str) -> Verdict:
        """The paired verdict, except that no variant is "equivalent" when the positive control
        was not shown worse: such a run cannot resolve differences of the control's size."""
        v = self.versus_mha(label).verdict
        if v == "equivalent" and self.control_resolved is False and not self.variant(label).control:
            return "inconclusive"
        return v

    @property
    def swept(self) -> bool:
        return any(v.sweep and not v.control for v in self.variants)

    def as_dict(self) -> dict[str, Any]:
        mha = self.variant("mha")
        variants = []
        for v in self.variants:
            d = v.as_dict()
            d["params_vs_mha"] = v.params / mha.params - 1
            d["kv_bytes_ratio_vs_mha"] = v.kv_bytes_per_token / mha.kv_bytes_per_token
            variants.append(d)
        return {
            "command": self.command, "machine": self.machine, "data": self.data,
            "data_bytes": self.data_bytes, "settings": self.settings, "seconds": self.seconds,
            "units": {"val_loss": "nats per byte (byte-level tokens)", "bits_per_byte": "val_loss / ln 2",
                      "kv_bytes_per_token": "bytes allocated per cached token, all layers"},
            "tokens_per_run": self.tokens_per_run, "train_tokens": self.train_tokens,
            "epochs": self.epochs,
            "bytes_per_parameter": {v.label: self.tokens_per_run / v.params for v in self.variants},
            "horizon": {v.label: self.horizon(v.label) for v in self.variants
                        if v.label != "mha" and not v.retrofit_of},
            "rule": RULE, "margin": self.margin,
            "vs_mha": {v.label: {**self.versus_mha(v.label).as_dict(), "verdict": self.verdict(v.label),
                                 "paired_verdict": self.versus_mha(v.label).verdict}
                       for v in self.variants if v.label != "mha"},
            "vs_dense": {v.label: {**self.versus_dense(v.label).as_dict(), "dense": v.retrofit_of,
                                   "verdict": self.retrofit_verdict(v.label)}
                         for v in self.retrofits},
            "control": None if self.control is None else self.control.label,
            "control_resolved": self.control_resolved,
            "variants": variants, "notes": self.notes,
            "pareto_front": self.pareto_labels() if self.swept else None,
        }

    def pareto_labels(self) -> list[str]:
        """Variants on the (KV bytes per token, mean val loss) Pareto front, fewest bytes first."""
        points = [(v.kv_bytes_per_token, v.val_loss.mean) for v in self.variants]
        return [self.variants[i].label for i in pareto_front(points)]


__all__ = ["CompareReport", "CompareSettings", "SeedRun", "VariantResult"]
