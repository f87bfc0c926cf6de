"""Training settings and the LR schedule: ``TrainSettings`` (what a run is; saved in every
checkpoint), ``TrainResult``, and ``lr_at`` (linear warm-up, then cosine or warmup-stable-decay)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

from latentattn.errors import ConfigError

SCHEDULES = ("cosine", "wsd")
Schedule = Literal["cosine", "wsd"]
TRAINABLE = ("all", "attention")  # which weights a run trains (train.distill.set_trainable)


@dataclass(frozen=True)
class TrainSettings:
    steps: int = 200
    batch_size: int = 16  # global batch (sequences); split across ranks under torchrun
    seq_len: int = 256
    lr: float = 3e-3
    min_lr_ratio: float = 0.1  # the LR decays to lr * min_lr_ratio at the last step
    warmup_steps: int = 20  # linear LR warmup
    # After the warm-up (lr_at): "cosine" decays over all the remaining steps, so every LR
    # depends on `steps`; "wsd" holds lr, then decays linearly over the last decay_frac of the
    # steps, so a run can be extended exactly until its decay begins.
    schedule: Schedule = "cosine"
    decay_frac: float = 0.2  # wsd only; 0.2: Hägele et al. 2024's cooldown that matches cosine
    weight_decay: float = 0.1
    grad_clip: float = 1.0  # <= 0: no clipping
    # torch.autocast(device_type, dtype=torch.bfloat16), fp32 master weights. The library
    # default stays fp32 whatever the machine; the CLI's --dtype auto picks per machine
    # (latentattn.precision.choose_precision) and passes the result here.
    bf16: bool = False
    eval_every: int = 50  # 0: only at the end
    # Validation windows: 0 = every non-overlapping window of the validation split (the same
    # set for every run and seed); N > 0 = the first N of them.
    eval_windows: int = 0
    seed: int = 0
    dsa_warmup_steps: int | None = None  # DSA models: steps of stage 1; None -> steps // 4
    # DSA stage 1 with everything but the indexers frozen, as V3.2 trains a retrofitted dense
    # model (train.dsa.retrofit_dsa); False: nothing frozen, for DSA trained from scratch.
    dsa_freeze_warmup: bool = False
    fsdp: bool = False  # under torchrun: FSDP2 instead of DDP (ignored in one process)
    checkpoint_every: int = 0  # 0 -> only at eval points and the end
    # MoE balancing (latentattn.train.balance). router_bias_rate: DeepSeek-V3's aux-loss-free
    # bias step gamma for sigmoid routers, V3's own 0.001 (0: off); moe_aux_loss: the weight
    # alpha of DeepSeek-V2's expert-level balance loss (0: off; V2 used 0.003).
    router_bias_rate: float = 1e-3
    moe_aux_loss: float = 0.0
    # Healing (latentattn.train.distill): the weight w of the KL to a teacher's logits in
    # (1 - w) LM + w KL (0: no teacher), and which weights train ("all" or "attention").
    distill_weight: float = 0.0
    trainable: str = "all"

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "seq_len"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"TrainSettings.{name} must be a positive integer, got {value!r}")
        for name in ("warmup_steps", "eval_every", "checkpoint_every", "eval_windows"):
            if getattr(self, name) < 0:
                raise ConfigError(f"TrainSettings.{name} must be >= 0, got {getattr(self, name)}")
        if self.dsa_warmup_steps is not None and self.dsa_warmup_steps < 0:
            raise ConfigError(f"TrainSettings.dsa_warmup_steps must be >= 0, got {self.dsa_warmup_steps}")
        if not self.lr > 0:
            raise ConfigError(f"TrainSettings.lr must be positive, got {self.lr}")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ConfigError(f"TrainSettings.min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        if self.schedule not in SCHEDULES:
            raise ConfigError(f"TrainSettings.schedule must be one of {', '.join(SCHEDULES)}, got "
                              f"{self.schedule!r}")
        if not 0 <= self.decay_frac <= 1:
            raise ConfigError(f"TrainSettings.decay_frac must be in [0, 1], got {self.decay_frac}")
        for name in ("router_bias_rate", "moe_aux_loss"):
            if not math.isfinite(getattr(self, name)) or getattr(self, name) < 0:
                raise ConfigError(f"TrainSettings.{name} must be >= 0, got {getattr(self, name)}")

        if not 0 <= self.distill_weight <= 1:  # False for NaN too
            raise ConfigError(f"TrainSettings.distill_weight must be in [0, 1], got {self.distill_weight}")
        if self.trainable not in TRAINABLE:
            raise ConfigError(f"TrainSettings.trainable must be one of {', '.join(TRAINABLE)}, got "
                              f"{self.trainable!r}")

    def resolved_dsa_warmup(self) -> int:
        return self.steps // 4 if self.dsa_warmup_steps is None else self.dsa_warmup_steps


@dataclass
class TrainResult:
    train_losses: list[float]  # LM loss per step (nats/token), all steps incl. resumed ones
    val_losses: list[tuple[int, float]]  # (step, validation LM loss nats/token)
    final_val_loss: float
    tokens_per_s: float  # training throughput of this run (global tokens)
    steps_done: int
    seconds: float
    # Wall-clock seconds of each step this run took (not resumed ones): batch, forward (and the
    # teacher's), backward, optimizer step; evaluations and checkpoints excluded.
    step_seconds: list[float] = field(default_factory=list)


def wsd_decay_start(s: TrainSettings) -> int:
    """The first step of a WSD run's decay: ``round(decay_frac * steps)`` steps before the end,
    never inside the warm-up (torchtitan's ``build_lr_schedulers``, components/lr_scheduler.py,
    rounds and clamps its ``decay_ratio`` the same way)."""
    decay = min(round(s.decay_frac * s.steps), max(0, s.steps - s.warmup_steps))
    return s.steps - decay


def lr_at(step: int, s: TrainSettings) -> float:
    """LR of 0-based ``step`` of ``s.steps``: linear warm-up to ``lr`` over ``warmup_steps`` (step
    ``warmup_steps - 1`` is the first at ``lr``), then down to ``low = lr * min_lr_ratio``:

    * ``cosine`` (nanoGPT's): half a cosine from ``lr`` at step ``warmup_steps`` to ``low`` at
      the last step, ``steps - 1``. Every step after the warm-up depends on ``steps``.
    * ``wsd``, warmup-stable-decay (MiniCPM, Hu et al. 2024, arXiv 2404.06395 s4; with the
      linear cooldown of Hägele et al. 2024, arXiv 2405.18392 s3): ``lr`` until
      :func:`wsd_decay_start`, then linear, one equal step down per step, to ``low`` at the last
      step. No step before the decay depends on ``steps``.
    """
    if step < s.warmup_steps:
        return s.lr * (step + 1) / s.warmup_steps
    low = s.lr * s.min_lr_ratio
    if s.schedule == "wsd":
        start = wsd_decay_start(s)
        if step < start:
            return s.lr
        progress = min(1.0, (step + 1 - start) / max(1, s.steps - start))
        return s.lr + progress * (low - s.lr)
    span = max(1, s.steps - 1 - s.warmup_steps)
    progress = min(1.0, (step - s.warmup_steps) / span)
    return low + 0.5 * (1.0 + math.cos(math.pi * progress)) * (s.lr - low)


__all__ = ["SCHEDULES", "TRAINABLE", "Schedule", "TrainResult", "TrainSettings", "lr_at", "wsd_decay_start"]
