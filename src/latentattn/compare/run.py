"""Train every variant on the same data with the same seeds, steps and schedule, then measure it.

For each variant and seed: ``torch.manual_seed(seed)``, build the model, ``train()`` it (DSA runs
its two V3.2 stages inside), then evaluate the validation loss (DSA in its top-k inference
form; its dense-attention loss is kept beside it) and, for DSA, the attention-mass recall. The
things that do not depend on the seed (parameters, KV bytes, decode speed) are measured on the
first seed's model only.
"""

from __future__ import annotations

import dataclasses
import math
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from latentattn.compare.measure import (
    decode_tokens_per_s,
    dsa_recall,
    kv_bytes_per_token,
    kv_parameters_per_layer,
)
from latentattn.compare.stats import DEFAULT_MARGIN, RULE, Paired, Summary, Verdict, paired, pareto_front
from latentattn.compare.variants import Variant, build_variants
from latentattn.errors import LatentAttnError
from latentattn.loading import load
from latentattn.model.transformer import Transformer
from latentattn.timing import machine_info
from latentattn.train.dsa import set_dsa_stage
from latentattn.train.family import FamilySize
from latentattn.train.loop import TrainSettings, evaluate, train

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

    def as_dict(self) -> dict[str, Any]:
        return {"size": dataclasses.asdict(self.size), "train": dataclasses.asdict(self.train),
                "seeds": list(range(self.seeds)), "contexts": list(self.contexts),
                "sweeps": {k: list(v) for k, v in self.sweeps.items()},
                "decode_steps": self.decode_steps, "recall_batches": self.recall_batches,
                "margin": self.margin}


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
        """Per layer, each of indexer / recent / uniform averaged over seeds (DSA only)."""
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
    def margin(self) -> float:
        return float(self.settings.get("margin", DEFAULT_MARGIN))

    def versus_mha(self, label: str) -> Paired:
        """``label``'s validation loss minus MHA's, paired by seed (:mod:`latentattn.compare.stats`)."""
        return paired(self.variant(label).val_by_seed, self.variant("mha").val_by_seed, self.margin)

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
            "rule": RULE, "margin": self.margin,
            "vs_mha": {v.label: {**self.versus_mha(v.label).as_dict(), "verdict": self.verdict(v.label),
                                 "paired_verdict": self.versus_mha(v.label).verdict}
                       for v in self.variants if v.label != "mha"},
            "control": None if self.control is None else self.control.label,
            "control_resolved": self.control_resolved,
            "variants": variants, "notes": self.notes,
            "pareto_front": self.pareto_labels() if self.swept else None,
        }

    def pareto_labels(self) -> list[str]:
        """Variants on the (KV bytes per token, mean val loss) Pareto front, fewest bytes first."""
        points = [(v.kv_bytes_per_token, v.val_loss.mean) for v in self.variants]
        return [self.variants[i].label for i in pareto_front(points)]


class RunStore(Protocol):
    """Where finished runs are kept (:class:`latentattn.compare.store.DirStore`): ``load`` gives a
    finished (variant, seed) back, with the variant's measurements when it was the first seed."""

    def load(self, label: str, seed: int) -> tuple[SeedRun, VariantResult | None] | None: ...

    def save(self, label: str, seed: int, run: SeedRun, measured: VariantResult | None) -> None: ...


def _train_one(variant: Variant, seed: int, settings: CompareSettings, train_tokens: torch.Tensor,
               val_tokens: torch.Tensor, progress: bool) -> tuple[Transformer, SeedRun]:
    ts = dataclasses.replace(settings.train, seed=seed)
    model = load(variant.config, seed=seed)
    result = train(model, train_tokens, val_tokens, ts, progress=progress)
    dsa = variant.kind == "dsa"
    dense_loss: float | None = None
    recall: list[dict[str, float]] | None = None
    if dsa:
        set_dsa_stage(model, "dense")
        dense_loss = evaluate(model, val_tokens, ts)
        recall = dsa_recall(model, val_tokens, ts.seq_len, ts.batch_size, settings.recall_batches,
                            seed=seed)
        set_dsa_stage(model, "inference")
    run = SeedRun(
        seed=seed, val_loss=evaluate(model, val_tokens, ts), train_tokens_per_s=result.tokens_per_s,
        seconds=result.seconds, steps_done=result.steps_done, train_losses=list(result.train_losses),
        val_curve=[(int(s), float(v)) for s, v in result.val_losses],
        dsa_val_loss_dense=dense_loss, dsa_recall=recall,
    )
    return model, run


def _measured(variant: Variant, model: Transformer, settings: CompareSettings) -> VariantResult:
    cfg = variant.config
    return VariantResult(
        label=variant.label, kind=variant.kind, mechanism=variant.mechanism,
        sweep=dict(variant.sweep), latent=variant.latent_settings(), reference=variant.is_reference,
        control=variant.control,
        params=model.num_parameters(), ffn_width=cfg.intermediate_size, n_layers=cfg.n_layers,
        kv_params_per_layer=kv_parameters_per_layer(model),
        kv_bytes_per_token=kv_bytes_per_token(model),
        kv_bytes_per_token_bf16=kv_bytes_per_token(model, torch.bfloat16),
        kv_dtype=str(model.dtype).removeprefix("torch."),
        decode_tokens_per_s={c: decode_tokens_per_s(model, c, settings.decode_steps)
                             for c in settings.contexts},
    )


def _notes(settings: CompareSettings, variants: list[Variant]) -> list[str]:
    s, t = settings.size, settings.train
    notes = [
        f"Parameters matched to MHA's within 3% through the SwiGLU width ({s.dim} dims, "
        f"{s.n_layers} layers, {s.n_heads} heads): "
        + ", ".join(f"{v.label} {v.config.intermediate_size}" for v in variants) + ".",
        f"Same data, steps ({t.steps}), batch ({t.batch_size} x {t.seq_len} bytes), learning-rate "
        f"schedule (peak {t.lr:g}) and seeds for every variant.",
        "Validation loss: every non-overlapping window of the held-out last 10% of the text"
        + (f" (the first {t.eval_windows})" if t.eval_windows else "")
        + ", the same tokens for every variant and seed.",
        "Decode: batch 1, whole model, greedy, after prefilling a random prompt of the given length; "
        "the same trained weights, loaded into a copy with room for the context.",
    ]
    if max(settings.contexts) > t.seq_len:
        notes.append(f"Contexts past the training window ({t.seq_len}) measure speed only: those "
                     "positions were never trained.")
    for v in variants:
        topk = v.latent_settings().get("index_topk")
        if topk is not None and topk >= t.seq_len:
            notes.append(f"{v.label}: index_topk {topk} >= seq_len {t.seq_len}: the selection "
                         "holds every key, so this DSA variant trains as dense MLA.")
    if any(v.kind == "dsa" for v in variants):
        warm = t.resolved_dsa_warmup()
        notes.append(f"MLA+DSA trains {warm} steps of the V3.2 indexer warm-up (dense attention, "
                     f"indexer KL) then {t.steps - warm} steps with top-k selection; its val loss "
                     "is measured with top-k selection (the served form), its dense-attention loss "
                     "is in results.json.")
    return notes


def run_compare(
    settings: CompareSettings, train_tokens: torch.Tensor, val_tokens: torch.Tensor, data: str,
    command: str = "latentattn compare", on_run: Callable[[str, int], None] | None = None,
    progress: bool = False, variants: list[Variant] | None = None, store: RunStore | None = None,
) -> CompareReport:
    """Train and measure every variant (the five kinds, then the sweep points) at every seed.

    ``store`` keeps each finished (variant, seed) as it completes and gives back the ones a
    stopped run already finished, which are not trained again.

    ``on_run(label, seed)`` is called as each training run starts; ``progress`` shows train()'s bar.
    ``variants`` defaults to ``build_variants(settings.size, settings.sweeps)``.
    """
    start = time.perf_counter()
    if variants is None:
        variants = build_variants(settings.size, settings.sweeps)
    report = CompareReport(machine=machine_info(), settings=settings.as_dict(), data=data,
                           data_bytes=len(train_tokens) + len(val_tokens), command=command,
                           notes=_notes(settings, variants))
    for variant in variants:
        result: VariantResult | None = None
        for seed in range(settings.seeds):
            if on_run is not None:
                on_run(variant.label, seed)
            stored = store.load(variant.label, seed) if store is not None else None
            if stored is not None:
                run, measured = stored
            else:
                model, run = _train_one(variant, seed, settings, train_tokens, val_tokens, progress)
                measured = _measured(variant, model, settings) if result is None else None
                if store is not None:
                    store.save(variant.label, seed, run, measured)
            if result is None:
                if measured is None:
                    raise LatentAttnError(f"the stored runs of {variant.label} lack the first seed's "
                                          "measurements; delete its runs to train them again")
                result = measured
            result.runs.append(run)
        assert result is not None
        report.variants.append(result)
    report.seconds = time.perf_counter() - start
    return report
