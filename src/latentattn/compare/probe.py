"""How long a comparison will take, from a short timing probe before it starts: a few training
steps and one evaluation of every variant, scaled to the runs still to do."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Mapping, Sequence

import torch

from latentattn.compare.report import CompareSettings
from latentattn.compare.variants import Variant
from latentattn.loading import load
from latentattn.train.loop import evaluate, train

PROBE_STEPS = 3


def evals_per_run(settings: CompareSettings) -> int:
    """train()'s validations (every eval_every steps and at the end) plus compare's final one."""
    t = settings.train
    during = t.steps // t.eval_every if t.eval_every > 0 else 0
    return during + (0 if t.eval_every > 0 and t.steps % t.eval_every == 0 else 1) + 1


def estimate_seconds(settings: CompareSettings, variants: Sequence[Variant], todo: Mapping[str, float],
                     train_tokens: torch.Tensor, val_tokens: torch.Tensor) -> float:
    """Seconds the ``todo[label]`` unfinished runs (an LR pilot counting as its share of one) of
    each variant should take on this machine:
    per variant, ``PROBE_STEPS`` timed training steps (after one untimed) and one timed
    evaluation, scaled to the run's steps and evaluations; DSA's steps are timed in its sparse
    stage, which most of its steps train in. Decode timing is not in it."""
    t = settings.train
    total = 0.0
    for v in variants:
        runs = todo.get(v.label, 0)
        if runs == 0:
            continue
        model = load(v.config, seed=0, device=settings.device)
        probe = dataclasses.replace(t, steps=PROBE_STEPS + 1, warmup_steps=0, eval_every=0,
                                    eval_windows=1, dsa_warmup_steps=1)
        result = train(model, train_tokens, val_tokens, probe, progress=False)
        step_s = t.batch_size * t.seq_len / result.tokens_per_s if result.tokens_per_s > 0 else 0.0
        started = time.perf_counter()
        evaluate(model, val_tokens, dataclasses.replace(t, eval_windows=0))
        full_s = time.perf_counter() - started
        started = time.perf_counter()
        evaluate(model, val_tokens, t)
        curve_s = time.perf_counter() - started
        # The loss curve's points use eval_windows; compare's final evaluation uses every window.
        total += runs * (t.steps * step_s + (evals_per_run(settings) - 1) * curve_s + full_s)
    return total


__all__ = ["estimate_seconds", "evals_per_run"]
