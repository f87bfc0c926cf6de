"""Train every variant on the same data with the same seeds, steps and schedule, then measure it.

For each variant and seed: ``torch.manual_seed(seed)``, build the model, ``train()`` it (DSA runs
its two V3.2 stages inside), then evaluate the validation loss (DSA in its top-k inference
form; its dense-attention loss is kept beside it) and, for DSA and V4, the attention-mass recall. The
things that do not depend on the seed (parameters, KV bytes, decode speed) are measured on the
first seed's model only.

The DSA retrofit (``Variant.retrofit_of``) does not train from scratch: each seed's dense run
stops at the fork step, its checkpoint is copied, and it goes on to the end (exactly as if it had
not stopped: ``train(until=...)`` then resume); the copy is forked into DSA with fresh indexers
(``train(..., retrofit=True)``): frozen indexer warm-up, then sparse training, on the same data
stream and schedule, so the two end on equal tokens (:class:`Forks`).
"""

from __future__ import annotations

import dataclasses
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

import torch

from latentattn.calc.density import topk_density, v4_read_fraction
from latentattn.calc.flops import training_flops_per_token
from latentattn.compare.diagnose import SeedDiagnostics
from latentattn.compare.lr import GridEdge, beyond, mean_loss, on_edge, pick, pilot_seeds, ratio
from latentattn.compare.measure import (
    decode_tokens_per_s,
    dsa_recall,
    kv_bytes_per_token,
    kv_parameters_per_layer,
)
from latentattn.compare.report import CompareReport, CompareSettings, SeedRun, VariantResult
from latentattn.compare.variants import Variant, apply_init, build_variants, v4_note
from latentattn.config import MLAConfig, V4AttentionConfig
from latentattn.errors import ConfigError, LatentAttnError
from latentattn.loading import load
from latentattn.model.transformer import Transformer
from latentattn.timing import machine_info
from latentattn.train.dsa import retrofit_dsa, set_dsa_stage
from latentattn.train.family import V4_KIND
from latentattn.train.loop import evaluate, train
from latentattn.train.settings import TrainResult, TrainSettings


class RunStore(Protocol):
    """Where finished runs are kept (:class:`latentattn.compare.store.DirStore`): ``load`` gives a
    finished (variant, seed) back, with the variant's measurements when it was the first seed."""

    def load(self, label: str, seed: int) -> tuple[SeedRun, VariantResult | None] | None: ...

    def save(self, label: str, seed: int, run: SeedRun, measured: VariantResult | None) -> None: ...


class Forks:
    """The dense runs' checkpoints at the fork step, in ``root``, one per seed, each used once by
    the retrofit. ``train_dense`` makes one while the dense variant trains; ``checkpoint`` makes
    it by training the dense run to the fork again when that run came from the store (the same
    steps give the same weights)."""

    def __init__(self, root: Path, dense: Variant, fork: int, device: str = "cpu") -> None:
        self.root, self.dense, self.fork, self.device = root, dense, fork, device

    def path(self, seed: int) -> Path:
        return self.root / f"fork.seed{seed}"

    def train_dense(self, model: Transformer, train_tokens: torch.Tensor, val_tokens: torch.Tensor,
                    ts: TrainSettings, progress: bool) -> TrainResult:
        run = self.root / f"dense.seed{ts.seed}"
        shutil.rmtree(run, ignore_errors=True)
        first = train(model, train_tokens, val_tokens, ts, out_dir=str(run), progress=progress,
                      until=self.fork)
        shutil.rmtree(self.path(ts.seed), ignore_errors=True)
        shutil.copytree(run, self.path(ts.seed))
        rest = train(model, train_tokens, val_tokens, ts, out_dir=str(run), resume=True,
                     progress=progress)
        shutil.rmtree(run)
        # Throughput over both legs' training time (train() counts steps, not evaluations).
        per_step = ts.batch_size * ts.seq_len
        legs = [(self.fork, first.tokens_per_s), (ts.steps - self.fork, rest.tokens_per_s)]
        train_s = sum(n * per_step / tps for n, tps in legs if tps > 0)
        return dataclasses.replace(rest, seconds=first.seconds + rest.seconds,
                                   tokens_per_s=ts.steps * per_step / train_s if train_s else 0.0)

    def checkpoint(self, train_tokens: torch.Tensor, val_tokens: torch.Tensor,
                   ts: TrainSettings) -> Path:
        path = self.path(ts.seed)
        if not path.exists():
            train(load(self.dense.config, seed=ts.seed, device=self.device), train_tokens, val_tokens,
                  ts, out_dir=str(path), progress=False, until=self.fork)
        return path


def _train_one(variant: Variant, seed: int, settings: CompareSettings, train_tokens: torch.Tensor,
               val_tokens: torch.Tensor, progress: bool, lr: float | None = None,
               forks: Forks | None = None) -> tuple[Transformer, SeedRun]:
    ts = dataclasses.replace(settings.train, seed=seed, lr=settings.train.lr if lr is None else lr)
    if variant.retrofit_of:
        if forks is None:
            raise LatentAttnError(f"{variant.label} forks the {variant.retrofit_of} runs: it needs "
                                  "them in the same comparison")
        fork_dir = forks.checkpoint(train_tokens, val_tokens, ts)
        a = variant.config.attention
        assert isinstance(a, MLAConfig) and a.indexer is not None
        model = retrofit_dsa(load(fork_dir, device=settings.device), a.indexer, seed=seed)
        ts = dataclasses.replace(ts, dsa_warmup_steps=settings.fork_steps()[1], dsa_freeze_warmup=True)
        result = train(model, train_tokens, val_tokens, ts, out_dir=str(fork_dir), resume=True,
                       retrofit=True, progress=progress)
        shutil.rmtree(fork_dir)
        diagnostics = None
    else:
        model = load(variant.config, seed=seed, device=settings.device)
        apply_init(model, variant.init)
        watch = SeedDiagnostics(model)
        with watch.watch():
            if forks is not None and forks.dense.label == variant.label:
                result = forks.train_dense(model, train_tokens, val_tokens, ts, progress)
            else:
                result = train(model, train_tokens, val_tokens, ts, progress=progress)
        diagnostics = watch.as_dict() or None
    # The curve during training may use the first eval_windows windows; the result uses them all.
    ts = dataclasses.replace(ts, eval_windows=0)
    dsa = variant.kind == "dsa"
    dense_loss: float | None = None
    recall: list[dict[str, float]] | None = None
    if dsa:
        set_dsa_stage(model, "dense")
        dense_loss = evaluate(model, val_tokens, ts)
        recall = dsa_recall(model, val_tokens, ts.seq_len, ts.batch_size, settings.recall_batches,
                            seed=seed)
        set_dsa_stage(model, "inference")
    elif variant.kind == V4_KIND:  # top-k always: its val loss is the served form already
        recall = dsa_recall(model, val_tokens, ts.seq_len, ts.batch_size, settings.recall_batches,
                            seed=seed)
    run = SeedRun(
        seed=seed, val_loss=evaluate(model, val_tokens, ts), train_tokens_per_s=result.tokens_per_s,
        seconds=result.seconds, steps_done=result.steps_done, train_losses=list(result.train_losses),
        val_curve=[(int(s), float(v)) for s, v in result.val_losses],
        dsa_val_loss_dense=dense_loss, dsa_recall=recall, diagnostics=diagnostics,
    )
    return model, run


def pilot_settings(settings: CompareSettings, lr: float) -> CompareSettings:
    """The pilot of one grid LR: its own seed, ``pilot_fraction`` of the steps (warm-up scaled
    alike), validation at the end only."""
    t = settings.train
    steps = max(1, round(settings.pilot_fraction * t.steps))
    train_settings = dataclasses.replace(
        t, steps=steps, lr=lr, warmup_steps=min(steps - 1, round(settings.pilot_fraction * t.warmup_steps)),
        eval_every=0, dsa_warmup_steps=None if t.dsa_warmup_steps is None
        else round(settings.pilot_fraction * t.dsa_warmup_steps))
    return dataclasses.replace(settings, train=train_settings, seeds=1)


def pilot_label(label: str, lr: float) -> str:
    return f"{label}@pilot-lr={lr:g}"


def _pilot(variant: Variant, lr: float, settings: CompareSettings, train_tokens: torch.Tensor,
           val_tokens: torch.Tensor, store: RunStore | None,
           on_run: Callable[[str, int], None] | None) -> list[float]:
    """The pilot validation loss of one LR on each pilot seed (from the store where that pilot
    finished before)."""
    label = pilot_label(variant.label, lr)
    losses = []
    for seed in pilot_seeds(settings.pilot_seeds):
        if on_run is not None:
            on_run(label, seed)
        stored = store.load(label, seed) if store is not None else None
        if stored is not None:
            losses.append(stored[0].val_loss)
            continue
        _, run = _train_one(variant, seed, pilot_settings(settings, lr), train_tokens, val_tokens,
                            False)
        if store is not None:
            store.save(label, seed, run, None)
        losses.append(run.val_loss)
    return losses


def _choose_lr(variant: Variant, settings: CompareSettings, train_tokens: torch.Tensor,
               val_tokens: torch.Tensor, store: RunStore | None,
               on_run: Callable[[str, int], None] | None,
               chosen: dict[str, float]) -> tuple[float, str, dict[str, list[float]]]:
    """(lr, source, each pilot seed's loss by LR text) for one variant (see latentattn.compare.lr): a
    retrofit continues its dense runs' schedule and an ablation changes one thing of its base
    variant, so both take that variant's LR (``chosen``), times the ablation's factor."""
    if variant.lr_of:
        base = chosen[variant.lr_of]
        if variant.lr_factor == 1.0:
            return base, f"{variant.lr_of}'s", {}
        return base * variant.lr_factor, f"{variant.lr_of}'s x{variant.lr_factor:g}", {}
    if variant.label in settings.lrs:
        return settings.lrs[variant.label], "pinned", {}
    if not settings.lr_grid:
        return settings.train.lr, "common", {}
    per_seed: dict[float, list[float]] = {}
    grid = list(settings.lr_grid)
    extended = 0
    while True:
        for lr in grid:
            if lr not in per_seed:
                per_seed[lr] = _pilot(variant, lr, settings, train_tokens, val_tokens, store, on_run)
        losses = {lr: mean_loss(x) for lr, x in per_seed.items()}
        nxt = beyond(losses, settings.lr_grid) if settings.lr_extend else None
        if nxt is None:  # an interior pick, or no search asked for (--lr-extend 0)
            break
        if extended == settings.lr_extend:
            raise GridEdge(variant.label, losses, extended)
        extended += 1
        grid.append(nxt)
    return pick(losses), "pilot", {f"{lr:g}": per_seed[lr] for lr in sorted(per_seed)}


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
        train_flops_per_token=training_flops_per_token(cfg, settings.train.seq_len),
        retrofit_of=variant.retrofit_of,
        dsa_density=None if "index_topk" not in variant.latent_settings() else
        topk_density(settings.train.seq_len, variant.latent_settings()["index_topk"]).as_dict(),
        v4_read=None if not isinstance(cfg.attention, V4AttentionConfig) else
        v4_read_fraction(settings.train.seq_len, cfg.attention).as_dict(),
    )


def _seed_text(n: int) -> str:
    seeds = pilot_seeds(n)
    return f"seed {seeds[0]}" if n == 1 else f"seeds {seeds[0]}-{seeds[-1]}"


def _notes(settings: CompareSettings, variants: list[Variant]) -> list[str]:
    s, t = settings.size, settings.train
    notes = [
        f"Parameters matched to MHA's within 3% through the SwiGLU width ({s.dim} dims, "
        f"{s.n_layers} layers, {s.n_heads} heads): "
        + ", ".join(f"{v.label} {v.config.intermediate_size}" for v in variants if not v.control)
        + (" (the positive control keeps MLA's width: the same model with a smaller latent, "
           "fewer parameters)" if any(v.control for v in variants) else "") + ".",
        f"Same data, steps ({t.steps}), batch ({t.batch_size} x {t.seq_len} bytes), learning-rate "
        "schedule and seeds for every variant; the peak LR "
        + (f"is pinned for {', '.join(sorted(settings.lrs))} and " if settings.lrs else "")
        + (f"is picked per variant from {', '.join(f'{x:g}' for x in settings.lr_grid)} by a pilot "
           f"({_seed_text(settings.pilot_seeds)}, {settings.pilot_fraction:g} of the steps, lowest "
           f"{'mean ' if settings.pilot_seeds > 1 else ''}validation loss; "
           f"the grid extended by its ratio past an edge pick, at most {settings.lr_extend} "
           "times)" if settings.lr_grid else f"is {t.lr:g}")
        + (". The ablations train at their base variant's LR (times their factor)"
           if any(v.lr_of and not v.retrofit_of for v in variants) else "") + ".",
        "Validation loss: every non-overlapping window of the held-out last 10% of the text, the "
        "same tokens for every variant and seed"
        + (f" (the loss curves during training: the first {t.eval_windows} of them)"
           if t.eval_windows else "") + ".",
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
    if any(v.kind == "dsa" and not v.retrofit_of for v in variants):
        warm = t.resolved_dsa_warmup()
        notes.append(f"MLA+DSA trains from scratch: {warm} steps of the V3.2 indexer warm-up "
                     f"(dense attention, nothing frozen, indexer KL) then {t.steps - warm} steps "
                     "with top-k selection; its val loss is measured with top-k selection (the "
                     "served form), its dense-attention loss is in results.json.")
    for v in variants:
        if v.retrofit_of:
            fork, warm_end = settings.fork_steps()
            notes.append(
                f"{v.label}: DSA as DeepSeek-V3.2 trains it (arXiv 2512.02556 s2.1): each seed's "
                f"{v.retrofit_of} run forks at step {fork} of {t.steps} into a model with fresh "
                f"indexers, which warm up for {warm_end - fork} steps with everything else frozen "
                f"(dense attention, indexer KL), then train sparse (top-k) for {t.steps - warm_end} "
                f"steps on the same data stream and LR schedule: it ends on the same tokens as its "
                f"dense continuation, the {v.retrofit_of} run itself, and is compared with it "
                "paired by seed.")
    for v in variants:
        if isinstance(v.config.attention, V4AttentionConfig):
            notes.append(v4_note(v.label, v.config.attention, t.seq_len))
    for v in variants:
        topk = v.latent_settings().get("index_topk")
        if topk is not None and topk < t.seq_len:
            d = topk_density(t.seq_len, topk)
            notes.append(f"{v.label}: index_topk {topk} of a {t.seq_len}-token window: a query "
                         f"keeps {d.per_query:.0%} of its visible keys on average ({d.pairs:.0%} "
                         "of the causal pairs; DeepSeek-V3.2 at 128K keeps 8%).")
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
    with tempfile.TemporaryDirectory(prefix="latentattn-forks-") as tmp:
        report = _run_all(settings, train_tokens, val_tokens, data, command, on_run, progress,
                          variants, store, _forks(settings, variants, Path(tmp)))
    report.seconds = time.perf_counter() - start
    return report


def _forks(settings: CompareSettings, variants: list[Variant], root: Path) -> Forks | None:
    retro = [v for v in variants if v.retrofit_of]
    if not retro:
        return None
    labels = [v.label for v in variants]
    dense = retro[0].retrofit_of
    if len(retro) > 1 or dense not in labels or labels.index(dense) > labels.index(retro[0].label):
        raise ConfigError("a comparison holds one DSA retrofit, after the dense variant it forks")
    fork, warm_end = settings.fork_steps()
    if not 0 < fork < warm_end < settings.train.steps:
        raise ConfigError(
            f"the retrofit forks at step {fork} and warms its indexers up to step {warm_end}: both "
            f"must lie inside the {settings.train.steps} steps (retrofit_at "
            f"{settings.retrofit_at:g}, retrofit_warmup {settings.retrofit_warmup:g})")
    return Forks(root, next(v for v in variants if v.label == dense), fork, settings.device)


def _run_all(settings: CompareSettings, train_tokens: torch.Tensor, val_tokens: torch.Tensor,
             data: str, command: str, on_run: Callable[[str, int], None] | None, progress: bool,
             variants: list[Variant], store: RunStore | None, forks: Forks | None) -> CompareReport:
    report = CompareReport(machine=machine_info(), settings=settings.as_dict(), data=data,
                           data_bytes=len(train_tokens) + len(val_tokens), command=command,
                           notes=_notes(settings, variants), train_tokens=len(train_tokens))
    chosen: dict[str, float] = {}
    for variant in variants:
        result: VariantResult | None = None
        lr, source, pilot = _choose_lr(variant, settings, train_tokens, val_tokens, store, on_run,
                                       chosen)
        chosen[variant.label] = lr
        for seed in range(settings.seeds):
            if on_run is not None:
                on_run(variant.label, seed)
            stored = store.load(variant.label, seed) if store is not None else None
            if stored is not None:
                run, measured = stored
            else:
                model, run = _train_one(variant, seed, settings, train_tokens, val_tokens, progress, lr,
                                        forks)
                measured = None
                if result is None:
                    measured = dataclasses.replace(_measured(variant, model, settings), lr=lr,
                                                   lr_source=source,
                                                   pilot_losses={k: mean_loss(x) for k, x in pilot.items()},
                                                   pilot_seed_losses=pilot)
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
    extended = [v.label for v in report.variants if len(v.pilot_losses) > len(settings.lr_grid)]
    edges = [v.label for v in report.variants
             if v.lr_source == "pilot" and on_edge(settings.lr_grid, v.lr)]
    if edges and not settings.lr_extend:
        report.notes.append(f"The pilot picked an end of --lr-grid for {', '.join(edges)} (--lr-extend "
                            "0: not searched past it): the best LR may lie outside the grid.")
    if extended:
        report.notes.append(f"The pilot's best LR lay at an edge of --lr-grid for {', '.join(extended)}: "
                            f"the grid was extended by its ratio (x{ratio(settings.lr_grid):g}) until "
                            "a worse LR lay on each side of the pick.")
    return report
