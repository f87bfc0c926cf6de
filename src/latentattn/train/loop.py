"""Language-model training: AdamW, linear warm-up + cosine or WSD LR, clipping, checkpoints, exact resume.

One loop for every attention variant, single-process or under ``torchrun`` (DDP, or FSDP2 with
``settings.fsdp``). Batches come from :func:`latentattn.data.random_batch` with one CPU
generator seeded with ``settings.seed``: every rank draws the same global batch and keeps rows
``rank::world_size``, so one process and N ranks see the same data, and the data position is
just the generator's state (saved in the checkpoint).

DSA models (DeepSeek-V3.2 report s2.1, from scratch): steps ``< dsa_warmup_steps`` run the
indexer warm-up with dense attention and nothing frozen (the model learns from the LM loss, the
indexer from its KL; ``set_dsa_stage(..., freeze=False)``), later steps select top-k keys.
The loss is LM + indexer KL in both stages; ``train_losses`` records the LM part.

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
import math
import os
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from latentattn.attention.dsa import SparseLatentAttention
from latentattn.config_io import config_from_dict, config_to_dict
from latentattn.data import random_batch
from latentattn.errors import CheckpointError, ConfigError, LatentAttnError
from latentattn.model.transformer import Transformer
from latentattn.train.balance import RouterBalancer
from latentattn.train.checkpoint import (
    FORMAT,
    STATE_FILE,
    VERSION,
    check_out_dir,
    first_difference,
    load_checkpoint_tensors,
    read_state,
    save_checkpoint,
    tokens_sha256,
)
from latentattn.train.dsa import Stage, indexer_loss, set_dsa_stage

EVAL_SEED_OFFSET = 1_000_003  # validation windows: their own generator, never the training one
# Settings a resumed run must share with its checkpoint (the rest: steps, eval and checkpoint
# cadence, fsdp, may change; steps only as _check_horizon allows). dsa_warmup_steps is compared
# after resolving None.
RESUME_MUST_MATCH = ("batch_size", "seq_len", "lr", "min_lr_ratio", "warmup_steps", "schedule",
                     "decay_frac", "weight_decay", "grad_clip", "bf16", "seed", "router_bias_rate",
                     "moe_aux_loss")
MOE_ONLY = ("router_bias_rate", "moe_aux_loss")
# What checkpoints written before a setting existed ran with.
_SETTINGS_BEFORE: dict[str, Any] = {"schedule": "cosine", "decay_frac": 0.2, "router_bias_rate": 0.0,
                                    "moe_aux_loss": 0.0}
SCHEDULES = ("cosine", "wsd")
Schedule = Literal["cosine", "wsd"]


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
    bf16: bool = False  # torch.autocast(device_type, dtype=torch.bfloat16)
    eval_every: int = 50  # 0: only at the end
    eval_batches: int = 8
    seed: int = 0
    dsa_warmup_steps: int | None = None  # DSA models: steps of stage 1; None -> steps // 4
    fsdp: bool = False  # under torchrun: FSDP2 instead of DDP (ignored in one process)
    checkpoint_every: int = 0  # 0 -> only at eval points and the end
    # MoE balancing (latentattn.train.balance). router_bias_rate: DeepSeek-V3's aux-loss-free
    # bias step gamma for sigmoid routers, V3's own 0.001 (0: off); moe_aux_loss: the weight
    # alpha of DeepSeek-V2's expert-level balance loss (0: off; V2 used 0.003).
    router_bias_rate: float = 1e-3
    moe_aux_loss: float = 0.0

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "seq_len", "eval_batches"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"TrainSettings.{name} must be a positive integer, got {value!r}")
        for name in ("warmup_steps", "eval_every", "checkpoint_every"):
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


def is_dsa(model: Transformer) -> bool:
    return any(isinstance(blk.self_attn, SparseLatentAttention) for blk in model.blocks)


def lm_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy (nats/token): logits (B, T, V), targets (B, T)."""
    return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten())


def _autocast(model: nn.Module, bf16: bool) -> torch.autocast:
    device = next(model.parameters()).device
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16)


def evaluate(model: Transformer, val_tokens: torch.Tensor, settings: TrainSettings) -> float:
    """Mean LM loss over settings.eval_batches fixed (seeded, deterministic) validation windows.

    Windows of ``settings.seq_len`` tokens, ``settings.batch_size`` per batch, from a generator
    seeded with ``settings.seed`` (not the training one, which it leaves alone). Runs the model
    as it is configured (for DSA: whatever stage is set).
    """
    gen = torch.Generator().manual_seed(settings.seed + EVAL_SEED_OFFSET)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    total = 0.0
    try:
        with torch.no_grad(), _autocast(model, settings.bf16):
            for _ in range(settings.eval_batches):
                batch = random_batch(val_tokens, settings.batch_size, settings.seq_len, gen).to(device)
                total += float(lm_loss(model(batch[:, :-1]), batch[:, 1:]))
    finally:
        model.train(was_training)
    return total / settings.eval_batches


# ---------------------------------------------------------------------------- distributed
@dataclass(frozen=True)
class _Dist:
    rank: int = 0
    world: int = 1

    @property
    def on(self) -> bool:
        return self.world > 1


@contextmanager
def _distributed() -> Iterator[_Dist]:
    """The process group torchrun asks for (WORLD_SIZE > 1): created here unless the caller made
    one, and destroyed on the way out if created here."""
    import torch.distributed as dist

    owned = False
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
        owned = True
    try:
        if dist.is_available() and dist.is_initialized():
            yield _Dist(dist.get_rank(), dist.get_world_size())
        else:
            yield _Dist()
    finally:
        if owned:
            dist.destroy_process_group()


def _wrap(model: Transformer, settings: TrainSettings, d: _Dist) -> nn.Module:
    """The module to call forward on: the model, DDP around it, or the model sharded in place."""
    if not d.on:
        return model
    device = model.device
    if settings.fsdp:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh(device.type, (d.world,))
        # Per layer: Block has no forward of its own (Transformer.forward calls its attention and
        # FFN directly), so the FSDP units are the modules that are called; the root unit holds
        # the embeddings, the norms and the LM head.
        for blk in model.blocks:
            fully_shard(blk.self_attn, mesh=mesh)
            fully_shard(blk.mlp, mesh=mesh)
        fully_shard(model, mesh=mesh)
        return model
    from torch.nn.parallel import DistributedDataParallel

    # Every parameter gets a gradient each step (MoE runs all experts in training), so DDP
    # needs no find_unused_parameters.
    return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)


def _global_mean(value: torch.Tensor, d: _Dist) -> float:
    if not d.on:
        return float(value.detach())
    import torch.distributed as dist

    t = value.detach().float().clone().reshape(1)
    dist.all_reduce(t)  # SUM: gloo has no AVG
    return float(t) / d.world


# ---------------------------------------------------------------------------- optimizer
def _param_groups(
    model: Transformer, settings: TrainSettings
) -> tuple[list[dict[str, Any]], list[list[str]]]:
    """Weight decay on matrices (and embeddings), none on norms and biases (nanoGPT)."""
    decay: list[tuple[str, nn.Parameter]] = []
    no_decay: list[tuple[str, nn.Parameter]] = []
    for name, p in model.named_parameters():
        (decay if p.dim() >= 2 else no_decay).append((name, p))
    groups = [{"params": [p for _, p in decay], "weight_decay": settings.weight_decay},
              {"params": [p for _, p in no_decay], "weight_decay": 0.0}]
    return groups, [[n for n, _ in decay], [n for n, _ in no_decay]]


def _make_optimizer(model: Transformer, settings: TrainSettings) -> tuple[torch.optim.AdamW, list[list[str]]]:
    groups, names = _param_groups(model, settings)
    return torch.optim.AdamW(groups, lr=settings.lr, betas=(0.9, 0.95), eps=1e-8), names


def _full_state(model: Transformer, opt: torch.optim.Optimizer, settings: TrainSettings,
                d: _Dist) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(model tensors, flattened optimizer tensors) on CPU; complete on rank 0 (a collective
    under FSDP, where every rank must call it)."""
    if d.on and settings.fsdp:
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            get_model_state_dict,
            get_optimizer_state_dict,
        )

        opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
        msd: dict[str, Any] = dict(get_model_state_dict(model, options=opts))
        osd: dict[str, Any] = dict(get_optimizer_state_dict(model, opt, options=opts))
        per_param: dict[str, dict[str, Any]] = dict(osd.get("state", {}))  # keyed by name
    else:
        msd = dict(model.state_dict())
        by_id = {id(p): n for n, p in model.named_parameters()}
        per_param = {by_id[id(p)]: st for p, st in opt.state.items()}
    # safetensors refuses tensors that share memory (tied embeddings): clone everything.
    model_t = {k: v.detach().to("cpu", copy=True).contiguous() for k, v in msd.items()}
    opt_t = {f"{name}::{k}": torch.as_tensor(v).detach().to("cpu", copy=True).contiguous()
             for name, st in per_param.items() for k, v in st.items()}
    return model_t, opt_t


def _load_full_state(model: Transformer, opt: torch.optim.Optimizer, names: list[list[str]],
                     model_t: dict[str, torch.Tensor], opt_t: dict[str, torch.Tensor],
                     settings: TrainSettings, d: _Dist, where: str) -> None:
    known = {n for group in names for n in group}
    per_param: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in opt_t.items():
        name, _, field = key.rpartition("::")
        if name not in known:
            raise CheckpointError(f"mismatched checkpoint {where}: optimizer state for unknown "
                                  f"parameter {name!r}")
        per_param.setdefault(name, {})[field] = value
    own = model.state_dict()
    missing = sorted(set(own) - set(model_t))
    extra = sorted(set(model_t) - set(own))
    if missing or extra:
        what = f"missing tensor {missing[0]}" if missing else f"unexpected tensor {extra[0]}"
        raise CheckpointError(f"mismatched checkpoint {where}: {what}")
    for k, v in model_t.items():
        if tuple(v.shape) != tuple(own[k].shape):
            raise CheckpointError(f"mismatched checkpoint {where}: tensor {k} has shape "
                                  f"{list(v.shape)}, the model's is {list(own[k].shape)}")
    hyper = [{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups]
    if d.on and settings.fsdp:
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            set_model_state_dict,
            set_optimizer_state_dict,
        )

        opts = StateDictOptions(full_state_dict=True)
        set_model_state_dict(model, dict[str, Any](model_t), options=opts)
        groups = [{**h, "params": group} for h, group in zip(hyper, names, strict=True)]
        osd: Any = {"state": per_param, "param_groups": groups}
        set_optimizer_state_dict(model, opt, osd, options=opts)
        return
    model.load_state_dict(model_t)
    index = {n: i for i, n in enumerate(n for group in names for n in group)}
    opt.load_state_dict({
        "state": {index[n]: st for n, st in per_param.items()},
        "param_groups": [{**h, "params": [index[n] for n in group]}
                         for h, group in zip(hyper, names, strict=True)],
    })


# ---------------------------------------------------------------------------- training
def _stage_for_step(step: int, warm: int) -> Stage:
    return "warmup" if step < warm else "sparse"


def _eval_stage(done: int, warm: int) -> Stage:
    # After the switch the model is evaluated as it will be served (top-k); before it, densely.
    return "inference" if done > warm else "dense"


def train(model: Transformer, train_tokens: torch.Tensor, val_tokens: torch.Tensor,
          settings: TrainSettings, out_dir: str | None = None, resume: bool = False,
          progress: bool = True) -> TrainResult:
    """Train ``model`` in place for ``settings.steps`` steps (counting resumed ones).

    ``out_dir``: where checkpoints go (see the module docstring); a directory that already holds
    one is only used with ``resume=True``, which continues from it up to ``settings.steps``
    exactly (another ``steps`` than the checkpoint's only where the LR allows: the module docstring).
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
    dsa = is_dsa(model)
    warm = settings.resolved_dsa_warmup()
    data_sha = tokens_sha256(train_tokens)
    out = Path(out_dir) if out_dir is not None else None
    state: dict[str, Any] | None = None
    if out is not None:
        if resume:
            state = read_state(out)
            warm = _check_resumable(state, model, settings, data_sha, out)
        elif (out / STATE_FILE).exists():
            raise LatentAttnError(f"{out} already holds a checkpoint; pass --resume to continue it "
                                  "or choose another --out")
        check_out_dir(out)
    elif resume:
        raise LatentAttnError("resume needs an output directory holding a checkpoint")

    with _distributed() as d:
        if settings.batch_size % d.world:
            raise ConfigError(f"batch_size {settings.batch_size} is not divisible by the "
                              f"{d.world} ranks")
        fwd = _wrap(model, settings, d)
        opt, names = _make_optimizer(model, settings)
        gen = torch.Generator().manual_seed(settings.seed)
        train_losses: list[float] = []
        val_losses: list[tuple[int, float]] = []
        start = 0
        if state is not None and out is not None:
            model_t = load_checkpoint_tensors(out, state, "model")
            opt_t = load_checkpoint_tensors(out, state, "optimizer")
            _load_full_state(model, opt, names, model_t, opt_t, settings, d, str(out))
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
                set_dsa_stage(model, new, freeze=False)
                stage = new

        def run_eval(done: int) -> float:
            if not dsa:
                return evaluate(model, val_tokens, settings)
            saved = stage
            set_dsa_stage(model, _eval_stage(done, warm), freeze=False)
            try:
                return evaluate(model, val_tokens, settings)
            finally:
                if saved is not None:
                    set_dsa_stage(model, saved, freeze=False)

        def checkpoint(done: int) -> None:
            if out is None:
                return
            model_t, opt_t = _full_state(model, opt, settings, d)
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
        from tqdm import tqdm

        model.train()
        with tqdm(total=settings.steps, initial=start, desc="train", unit="step", file=sys.stderr,
                  disable=not progress or d.rank != 0, dynamic_ncols=True) as bar:
            for step in range(start, settings.steps):
                t0 = time.perf_counter()
                set_stage(_stage_for_step(step, warm))
                lr = lr_at(step, settings)
                for group in opt.param_groups:
                    group["lr"] = lr
                batch = random_batch(train_tokens, settings.batch_size, settings.seq_len, gen)
                batch = batch[d.rank :: d.world].to(device)  # (B / world, T + 1)
                with _autocast(model, settings.bf16):
                    lm = lm_loss(fwd(batch[:, :-1]), batch[:, 1:])
                    loss = (lm + indexer_loss(model)) if dsa else lm
                aux = balancer.loss()
                if aux is not None:
                    loss = loss + aux
                opt.zero_grad(set_to_none=True)
                loss.backward()
                if settings.grad_clip > 0:
                    torch.nn.utils.clip_grad_norm_(model.parameters(), settings.grad_clip)
                opt.step()
                balancer.update()
                train_losses.append(_global_mean(lm, d))
                train_seconds += time.perf_counter() - t0
                done = step + 1
                bar.update(1)
                bar.set_postfix(loss=f"{train_losses[-1]:.3f}",
                                tok_s=f"{tokens_per_step * (done - start) / train_seconds:,.0f}")
                at_eval = ((settings.eval_every > 0 and done % settings.eval_every == 0)
                           or done == settings.steps)
                if at_eval:
                    val_losses.append((done, run_eval(done)))
                    bar.set_postfix(loss=f"{train_losses[-1]:.3f}", val=f"{val_losses[-1][1]:.3f}")
                if at_eval or (settings.checkpoint_every > 0 and done % settings.checkpoint_every == 0):
                    checkpoint(done)
        if not val_losses or val_losses[-1][0] != settings.steps:
            # Resumed at the end already: nothing trained, measure what there is.
            val_losses.append((settings.steps, run_eval(settings.steps)))
        if dsa:
            set_dsa_stage(model, _eval_stage(settings.steps, warm), freeze=False)
        model.eval()
        ran = settings.steps - start
        return TrainResult(
            train_losses=train_losses, val_losses=val_losses, final_val_loss=val_losses[-1][1],
            tokens_per_s=tokens_per_step * ran / train_seconds if train_seconds > 0 else 0.0,
            steps_done=settings.steps, seconds=time.perf_counter() - started,
        )


def _check_resumable(state: dict[str, Any], model: Transformer, settings: TrainSettings,
                     data_sha: str, out: Path) -> int:
    """Raise unless ``state`` can be continued with this model, settings and data; return the
    DSA warm-up length to use (the checkpoint's)."""
    try:
        saved_cfg = config_from_dict(state["model"])
    except ConfigError as e:
        raise CheckpointError(f"corrupt checkpoint {out}: {e}") from None
    if saved_cfg != model.config:
        diff = first_difference(config_to_dict(saved_cfg), config_to_dict(model.config))
        raise CheckpointError(f"mismatched checkpoint {out}: model {diff}")
    saved = state["settings"]
    if not isinstance(saved, dict):
        raise CheckpointError(f"corrupt checkpoint {out}: settings is not an object")
    for name in RESUME_MUST_MATCH:
        if name in MOE_ONLY and model.config.moe is None:
            continue  # the balancing settings do nothing without experts
        value = saved.get(name, _SETTINGS_BEFORE.get(name))
        if value != getattr(settings, name):
            raise CheckpointError(f"mismatched checkpoint {out}: {name} is {value!r} in "
                                  f"the checkpoint, {getattr(settings, name)!r} here")
    warm = int(saved.get("dsa_warmup_steps") or 0)
    if settings.dsa_warmup_steps is not None and settings.dsa_warmup_steps != warm:
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
    _check_horizon(step, dataclasses.replace(settings, steps=steps), settings)
    return warm


def _check_horizon(done: int, old: TrainSettings, new: TrainSettings) -> None:
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


__all__ = [
    "TrainResult",
    "TrainSettings",
    "evaluate",
    "lm_loss",
    "lr_at",
    "read_state",
    "train",
    "wsd_decay_start",
]
