"""Language-model training: AdamW, linear warm-up + cosine or WSD LR, clipping, checkpoints, exact resume.

One loop for every attention variant, single-process or under ``torchrun`` (DDP, or FSDP2 with
``settings.fsdp``). Batches come from :func:`latentattn.data.random_batch` with one CPU
generator seeded with ``settings.seed``: every rank draws the same global batch and keeps rows
``rank::world_size``, so one process and N ranks see the same data, and the data position is
just the generator's state (saved in the checkpoint).

DSA models (DeepSeek-V3.2 report s2.1): steps ``< dsa_warmup_steps`` run the indexer warm-up
with dense attention, later steps select top-k keys. From scratch nothing is frozen in the
warm-up (the model learns from the LM loss, the indexer from its KL); with
``settings.dsa_freeze_warmup`` (a trained dense model retrofitted with indexers,
:func:`latentattn.train.dsa.retrofit_dsa`) everything but the indexers is, as in V3.2.
The loss is LM + indexer KL in both stages; ``train_losses`` records the LM part.

DeepSeek-V4 models (:mod:`latentattn.train.v4`): every step is V3.2's sparse stage (top-k, the
LM loss plus the CSA indexers' KL, their inputs detached, nothing frozen); the KL is off while
evaluating and after training.

MoE models (:mod:`latentattn.train.balance`): sigmoid routers' correction biases move after each
step by ``router_bias_rate`` (DeepSeek-V3's aux-loss-free balancing), and ``moe_aux_loss`` > 0
adds DeepSeek-V2's expert-level balance loss (not in ``train_losses`` either).

Checkpoints (``out_dir``): :mod:`latentattn.train.checkpoint`. A resume continues exactly: the
same steps give the same losses and weights as never stopping. A resume to another ``steps`` is
exact too where the LR of every step already taken is the one the new ``steps`` gives it (always
before a WSD run's decay, only in the warm-up for cosine), and refused elsewhere; a DSA run keeps
its checkpoint's ``dsa_warmup_steps``.
"""

from __future__ import annotations

import base64
import dataclasses
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from latentattn.attention.dsa import SparseLatentAttention
from latentattn.config_io import config_to_dict
from latentattn.data import eval_windows, random_batch
from latentattn.errors import ConfigError, LatentAttnError
from latentattn.model.transformer import Transformer
from latentattn.perplexity import window_nats
from latentattn.train.balance import RouterBalancer
from latentattn.train.checkpoint import (
    FORMAT,
    STATE_FILE,
    VERSION,
    check_out_dir,
    load_checkpoint_tensors,
    read_state,
    save_checkpoint,
    tokens_sha256,
)
from latentattn.train.distill import check_teacher, kl_to_teacher, set_trainable
from latentattn.train.distributed import distributed, full_state, global_mean, load_full_state, wrap
from latentattn.train.dsa import Stage, required, set_dsa_stage
from latentattn.train.resume import check_resumable
from latentattn.train.settings import TrainResult, TrainSettings, lr_at
from latentattn.train.v4 import is_v4, set_v4_indexer_training


def is_dsa(model: Transformer) -> bool:
    return any(isinstance(blk.self_attn, SparseLatentAttention) for blk in model.blocks)


def lm_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy (nats/token): logits (B, T, V), targets (B, T)."""
    return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten())


def _autocast(model: nn.Module, bf16: bool) -> torch.autocast:
    device = next(model.parameters()).device
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16)


def evaluate(model: Transformer, val_tokens: torch.Tensor, settings: TrainSettings) -> float:
    """Mean LM loss (nats/token) over a fixed evaluation set: the validation split's
    non-overlapping ``settings.seq_len`` windows (:func:`latentattn.data.eval_windows`; the first
    ``settings.eval_windows`` of them when that is > 0), ``settings.batch_size`` per forward.
    The set does not depend on the seed, so every run and seed is measured on the same tokens.
    Runs the model as it is configured (for DSA: whatever stage is set).
    """
    windows = eval_windows(val_tokens, settings.seq_len, settings.eval_windows)
    nats = window_nats(model, windows, settings.batch_size, settings.bf16)
    return nats / (windows.shape[0] * settings.seq_len)


# ---------------------------------------------------------------------------- optimizer
def _param_groups(
    model: Transformer, settings: TrainSettings
) -> tuple[list[dict[str, Any]], list[list[str]]]:
    """Weight decay on matrices (and embeddings), none on norms and biases (nanoGPT); frozen
    parameters (``settings.trainable``) are left out."""
    decay: list[tuple[str, nn.Parameter]] = []
    no_decay: list[tuple[str, nn.Parameter]] = []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (decay if p.dim() >= 2 else no_decay).append((name, p))
    groups = [{"params": [p for _, p in decay], "weight_decay": settings.weight_decay},
              {"params": [p for _, p in no_decay], "weight_decay": 0.0}]
    return groups, [[n for n, _ in decay], [n for n, _ in no_decay]]


def _make_optimizer(model: Transformer, settings: TrainSettings) -> tuple[torch.optim.AdamW, list[list[str]]]:
    groups, names = _param_groups(model, settings)
    return torch.optim.AdamW(groups, lr=settings.lr, betas=(0.9, 0.95), eps=1e-8), names


# ---------------------------------------------------------------------------- training
def _stage_for_step(step: int, warm: int) -> Stage:
    return "warmup" if step < warm else "sparse"


def _eval_stage(done: int, warm: int) -> Stage:
    # After the switch the model is evaluated as it will be served (top-k); before it, densely.
    return "inference" if done > warm else "dense"


def train(model: Transformer, train_tokens: torch.Tensor, val_tokens: torch.Tensor,
          settings: TrainSettings, out_dir: str | None = None, resume: bool = False,
          progress: bool = True, until: int | None = None, retrofit: bool = False,
          teacher: Transformer | None = None) -> TrainResult:
    """Train ``model`` in place for ``settings.steps`` steps (counting resumed ones).

    ``out_dir``: where checkpoints go (see the module docstring); a directory that already holds
    one is only used with ``resume=True``, which continues from it up to ``settings.steps``
    exactly (another ``steps`` than the checkpoint's only where the LR allows: the module docstring).
    ``until``: stop after that step (checkpointing it), on the ``settings.steps`` schedule; a
    resume goes on from there exactly as if the run had never stopped.
    ``retrofit`` (with ``resume``): fork a dense MLA checkpoint into the DSA ``model``
    (:func:`latentattn.train.dsa.retrofit_dsa` of it): the shared weights, their optimizer
    state, the data stream and the schedule go on from the checkpoint's step; the indexers start
    fresh. Steps before ``settings.dsa_warmup_steps`` (counted from step 0, so it must lie past
    the fork) are the indexer warm-up, then sparse training, as DeepSeek-V3.2 retrofits a dense
    model (arXiv 2512.02556 s2.1); ``out_dir`` then holds the DSA run.
    Under torchrun (WORLD_SIZE > 1) the model must already be on this rank's device; the
    process group is created and destroyed here unless the caller made one.
    Raises LatentAttnError (CheckpointError, ConfigError) for unusable inputs before training.
    """
    started = time.perf_counter()
    rows_needed = settings.seq_len + 1
    for what, tokens in (("training", train_tokens), ("validation", val_tokens)):
        if len(tokens) < rows_needed:
            raise LatentAttnError(f"the {what} text has {len(tokens)} tokens, fewer than one window "
                                  f"of --seq-len {settings.seq_len} + 1")
    if settings.seq_len > model.config.max_seq_len:
        raise ConfigError(f"seq_len {settings.seq_len} exceeds the model's max_seq_len "
                          f"{model.config.max_seq_len}")
    if (teacher is None) != (settings.distill_weight == 0):
        raise ConfigError("distillation needs both a teacher and distill_weight > 0; got "
                          + ("a teacher and distill_weight 0" if teacher is not None else
                             f"distill_weight {settings.distill_weight} and no teacher"))
    if teacher is not None:
        check_teacher(model, teacher)
        teacher.eval()
    dsa = is_dsa(model)
    v4 = is_v4(model)
    if dsa and settings.trainable != "all":
        raise ConfigError("a DSA model trains with trainable='all': its stages choose what is frozen")
    set_trainable(model, settings.trainable)
    warm = settings.resolved_dsa_warmup()
    if retrofit and not (resume and dsa):
        raise ConfigError("retrofit forks a dense MLA checkpoint into a DSA model: it needs "
                          "resume=True and a model with indexers")
    stop = settings.steps if until is None else until
    if not 0 < stop <= settings.steps:
        raise ConfigError(f"until must lie in 1..steps ({settings.steps}), got {until}")
    data_sha = tokens_sha256(train_tokens)
    out = Path(out_dir) if out_dir is not None else None
    state: dict[str, Any] | None = None
    if out is not None:
        if resume:
            state = read_state(out)
            warm = check_resumable(state, model, settings, data_sha, out, retrofit=retrofit)
        elif (out / STATE_FILE).exists():
            raise LatentAttnError(f"{out} already holds a checkpoint; pass --resume to continue it "
                                  "or choose another --out")
        check_out_dir(out)
    elif resume:
        raise LatentAttnError("resume needs an output directory holding a checkpoint")

    with distributed() as d:
        if settings.batch_size % d.world:
            raise ConfigError(f"batch_size {settings.batch_size} is not divisible by the "
                              f"{d.world} ranks")
        fwd = wrap(model, settings, d)
        opt, names = _make_optimizer(model, settings)
        gen = torch.Generator().manual_seed(settings.seed)
        train_losses: list[float] = []
        val_losses: list[tuple[int, float]] = []
        start = 0
        if state is not None and out is not None:
            model_t = load_checkpoint_tensors(out, state, "model")
            if retrofit:  # the dense run has no indexers: theirs are the model's fresh ones
                model_t = {**{k: v for k, v in model.state_dict().items() if ".indexer." in k},
                           **model_t}
            opt_t = load_checkpoint_tensors(out, state, "optimizer")
            load_full_state(model, opt, names, model_t, opt_t, settings, d, str(out))
            gen.set_state(torch.frombuffer(bytearray(base64.b64decode(state["data_generator"])),
                                           dtype=torch.uint8))
            start = int(state["step"])
            train_losses = [float(x) for x in state["train_losses"]]
            val_losses = [(int(s), float(v)) for s, v in state["val_losses"]]
        device = model.device
        balancer = RouterBalancer(model, settings.router_bias_rate, settings.moe_aux_loss)
        stage: Stage | None = None

        def set_stage(new: Stage) -> None:
            nonlocal stage
            if dsa and new != stage:
                set_dsa_stage(model, new, freeze=settings.dsa_freeze_warmup)
                stage = new

        def run_eval(done: int) -> float:
            if v4:  # evaluation computes no indexer KL
                set_v4_indexer_training(model, False)
                try:
                    return evaluate(model, val_tokens, settings)
                finally:
                    set_v4_indexer_training(model, True)
            if not dsa:
                return evaluate(model, val_tokens, settings)
            saved = stage
            set_dsa_stage(model, _eval_stage(done, warm), freeze=settings.dsa_freeze_warmup)
            try:
                return evaluate(model, val_tokens, settings)
            finally:
                if saved is not None:
                    set_dsa_stage(model, saved, freeze=settings.dsa_freeze_warmup)

        def checkpoint(done: int) -> None:
            if out is None:
                return
            model_t, opt_t = full_state(model, opt, settings, d)
            if d.rank == 0:
                save_checkpoint(out, model_t, opt_t, {
                    "format": FORMAT, "version": VERSION, "step": done,
                    "settings": {**dataclasses.asdict(settings), "dsa_warmup_steps": warm},
                    "world_size": d.world, "model": config_to_dict(model.config),
                    "train_losses": train_losses, "val_losses": val_losses,
                    "data_generator": base64.b64encode(bytes(gen.get_state().tolist())).decode(),
                    "data_sha256": data_sha,
                })
            if d.on:
                import torch.distributed as dist

                dist.barrier()

        tokens_per_step = settings.batch_size * settings.seq_len
        train_seconds = 0.0
        step_seconds: list[float] = []
        from tqdm import tqdm

        model.train()
        set_v4_indexer_training(model, v4)
        with tqdm(total=stop, initial=start, desc="train", unit="step", file=sys.stderr,
                  disable=not progress or d.rank != 0, dynamic_ncols=True) as bar:
            for step in range(start, stop):
                t0 = time.perf_counter()
                set_stage(_stage_for_step(step, warm))
                lr = lr_at(step, settings)
                for group in opt.param_groups:
                    group["lr"] = lr
                batch = random_batch(train_tokens, settings.batch_size, settings.seq_len, gen)
                batch = batch[d.rank :: d.world].to(device)  # (B / world, T + 1)
                with _autocast(model, settings.bf16):
                    if dsa or v4:  # the indexer KL comes back beside the logits
                        logits, kl = fwd(batch[:, :-1], return_indexer_loss=True)
                        lm = lm_loss(logits, batch[:, 1:])
                        # A V4 model without CSA layers has no indexer to train.
                        loss = lm + required(kl) if dsa or kl is not None else lm
                    else:
                        logits = fwd(batch[:, :-1])
                        lm = loss = lm_loss(logits, batch[:, 1:])
                    if teacher is not None:
                        with torch.no_grad():
                            target = teacher(batch[:, :-1])
                        w = settings.distill_weight
                        loss = loss + w * (kl_to_teacher(logits, target) - lm)
                    del logits
                aux = balancer.loss()
                if aux is not None:
                    loss = loss + aux
                opt.zero_grad(set_to_none=True)
                loss.backward()
                if settings.grad_clip > 0:
                    torch.nn.utils.clip_grad_norm_(model.parameters(), settings.grad_clip)
                opt.step()
                balancer.update()
                train_losses.append(global_mean(lm, d))
                step_seconds.append(time.perf_counter() - t0)
                train_seconds += step_seconds[-1]
                done = step + 1
                bar.update(1)
                bar.set_postfix(loss=f"{train_losses[-1]:.3f}",
                                tok_s=f"{tokens_per_step * (done - start) / train_seconds:,.0f}")
                at_eval = ((settings.eval_every > 0 and done % settings.eval_every == 0)
                           or done == settings.steps)
                if at_eval:
                    val_losses.append((done, run_eval(done)))
                    bar.set_postfix(loss=f"{train_losses[-1]:.3f}", val=f"{val_losses[-1][1]:.3f}")
                if (at_eval or done == stop
                        or (settings.checkpoint_every > 0 and done % settings.checkpoint_every == 0)):
                    checkpoint(done)
        if stop == settings.steps and (not val_losses or val_losses[-1][0] != settings.steps):
            # Resumed at the end already: nothing trained, measure what there is.
            val_losses.append((settings.steps, run_eval(settings.steps)))
        if dsa:
            set_dsa_stage(model, _eval_stage(stop, warm), freeze=settings.dsa_freeze_warmup)
        set_v4_indexer_training(model, False)
        model.eval()
        ran = stop - start
        return TrainResult(
            train_losses=train_losses, val_losses=val_losses,
            final_val_loss=val_losses[-1][1] if val_losses else float("nan"),
            tokens_per_s=tokens_per_step * ran / train_seconds if train_seconds > 0 else 0.0,
            steps_done=stop, seconds=time.perf_counter() - started, step_seconds=step_seconds,
        )


__all__ = [
    "TrainResult",
    "TrainSettings",
    "evaluate",
    "lm_loss",
    "read_state",
    "train",
]
