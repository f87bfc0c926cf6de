"""What makes a resume exact: the checkpoint must match the model, the settings and the data, and
a new ``steps`` is accepted only where every step already taken keeps its LR."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from latentattn.config import MLAConfig
from latentattn.config_io import config_from_dict, config_to_dict
from latentattn.errors import CheckpointError, ConfigError
from latentattn.model.transformer import Transformer
from latentattn.train.checkpoint import first_difference
from latentattn.train.settings import TrainSettings, lr_at, wsd_decay_start

# Settings a resumed run must share with its checkpoint (the rest: steps, eval and checkpoint
# cadence, fsdp, may change; steps only as _check_horizon allows). dsa_warmup_steps is compared
# after resolving None.
RESUME_MUST_MATCH = ("batch_size", "seq_len", "lr", "min_lr_ratio", "warmup_steps", "schedule",
                     "decay_frac", "weight_decay", "grad_clip", "bf16", "seed", "router_bias_rate",
                     "moe_aux_loss", "dsa_freeze_warmup", "distill_weight", "trainable")
MOE_ONLY = ("router_bias_rate", "moe_aux_loss")
# What checkpoints written before a setting existed ran with.
_SETTINGS_BEFORE: dict[str, Any] = {"schedule": "cosine", "decay_frac": 0.2, "router_bias_rate": 0.0,
                                    "moe_aux_loss": 0.0, "dsa_freeze_warmup": False,
                                    "distill_weight": 0.0, "trainable": "all"}


# Settings a retrofit (a dense run forked into DSA) sets anew: the DSA stages did not exist.
RETROFIT_NEW = ("dsa_freeze_warmup",)


def check_resumable(state: dict[str, Any], model: Transformer, settings: TrainSettings,
                     data_sha: str, out: Path, retrofit: bool = False) -> int:
    """Raise unless ``state`` can be continued with this model, settings and data; return the
    DSA warm-up length to use (the checkpoint's). With ``retrofit`` the checkpoint is a dense
    MLA run and ``model`` the same MLA with indexers (``train(..., retrofit=True)``); the
    warm-up then ends at ``settings.dsa_warmup_steps``, which must lie past the fork."""
    try:
        saved_cfg = config_from_dict(state["model"])
    except ConfigError as e:
        raise CheckpointError(f"corrupt checkpoint {out}: {e}") from None
    a = model.config.attention
    if retrofit:
        if not isinstance(a, MLAConfig) or a.indexer is None:
            raise ConfigError("a retrofit trains a DSA model (MLA with indexers)")
        model_cfg = model.config.replace(attention=dataclasses.replace(a, indexer=None))
        if saved_cfg != model_cfg:
            diff = first_difference(config_to_dict(saved_cfg), config_to_dict(model_cfg))
            raise CheckpointError(f"cannot retrofit {out}: it is not this model's dense MLA "
                                  f"({diff})")
        step = int(state["step"])
        if settings.dsa_warmup_steps is None or settings.dsa_warmup_steps <= step:
            raise ConfigError(f"a retrofit at step {step} needs dsa_warmup_steps past it (the "
                              f"step its indexer warm-up ends), got {settings.dsa_warmup_steps}")
    elif saved_cfg != model.config:
        diff = first_difference(config_to_dict(saved_cfg), config_to_dict(model.config))
        raise CheckpointError(f"mismatched checkpoint {out}: model {diff}")
    saved = state["settings"]
    if not isinstance(saved, dict):
        raise CheckpointError(f"corrupt checkpoint {out}: settings is not an object")
    for name in RESUME_MUST_MATCH:
        if name in MOE_ONLY and model.config.moe is None:
            continue  # the balancing settings do nothing without experts
        if retrofit and name in RETROFIT_NEW:
            continue
        value = saved.get(name, _SETTINGS_BEFORE.get(name))
        if value != getattr(settings, name):
            raise CheckpointError(f"mismatched checkpoint {out}: {name} is {value!r} in "
                                  f"the checkpoint, {getattr(settings, name)!r} here")
    warm = int(saved.get("dsa_warmup_steps") or 0)
    if retrofit:
        assert settings.dsa_warmup_steps is not None
        warm = settings.dsa_warmup_steps
    elif settings.dsa_warmup_steps is not None and settings.dsa_warmup_steps != warm:
        raise CheckpointError(f"mismatched checkpoint {out}: dsa_warmup_steps is {warm} in the "
                              f"checkpoint, {settings.dsa_warmup_steps} here")
    if state.get("data_sha256") != data_sha:
        raise CheckpointError(f"mismatched checkpoint {out}: the training data differs from the "
                              "checkpoint's")
    step = int(state["step"])
    if step > settings.steps:
        raise CheckpointError(f"the checkpoint in {out} is at step {step}, past steps "
                              f"{settings.steps}: nothing to resume")
    steps = saved.get("steps")
    if not isinstance(steps, int) or isinstance(steps, bool) or steps < step:
        raise CheckpointError(f"corrupt checkpoint {out}: settings.steps is {steps!r} at step {step}")
    check_horizon(step, dataclasses.replace(settings, steps=steps), settings)
    return warm


def check_horizon(done: int, old: TrainSettings, new: TrainSettings) -> None:
    """Raise unless continuing a run of ``old.steps`` from step ``done`` up to ``new.steps`` is
    exactly the uninterrupted ``new.steps`` run: everything but the LR of a step is independent
    of ``steps`` (RESUME_MUST_MATCH holds the rest), so each step already taken must have had
    the LR the new horizon gives it. Checked step by step, O(done) float ops, once per resume:
    the definition itself rather than a case analysis of each schedule."""
    if old.steps == new.steps:
        return
    first = next((i for i in range(done) if lr_at(i, old) != lr_at(i, new)), None)
    if first is None:
        return
    head = f"cannot extend a {new.schedule} run from --steps {old.steps} to {new.steps} exactly: "
    last = done - 1 if lr_at(done - 1, old) != lr_at(done - 1, new) else first  # the step it ended on
    lrs = (f"step {last} ran at LR {lr_at(last, old):.2e}, a {new.steps}-step run takes it at "
           f"{lr_at(last, new):.2e}")
    if new.schedule == "cosine":
        why = (f"its LR depends on the total steps ({lrs}); resume with --steps {old.steps}, or "
               "train with --schedule wsd, which can be extended until its decay")
    else:
        a, b = wsd_decay_start(old), wsd_decay_start(new)
        where = (f"the checkpoint at step {done} is already in the decay of the {old.steps}-step "
                 f"run, which began at step {a}" if done > a else
                 f"the {new.steps}-step run decays from step {b}, before the checkpoint's step {done}")
        why = f"{where} ({lrs}); resume with --steps {old.steps}"
    raise CheckpointError(head + why)


__all__ = ["RESUME_MUST_MATCH", "RETROFIT_NEW", "check_horizon", "check_resumable"]
