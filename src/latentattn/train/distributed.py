"""One training loop for one process and for ``torchrun`` ranks: the process group, DDP or FSDP2
around the model, means over ranks, and the full (unsharded) model and optimizer state that
checkpoints hold whatever the sharding."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from latentattn.errors import CheckpointError
from latentattn.model.transformer import Transformer
from latentattn.train.settings import TrainSettings


@dataclass(frozen=True)
class Dist:
    rank: int = 0
    world: int = 1

    @property
    def on(self) -> bool:
        return self.world > 1


@contextmanager
def distributed() -> Iterator[Dist]:
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
            yield Dist(dist.get_rank(), dist.get_world_size())
        else:
            yield Dist()
        if owned:
            # Leave together: a gloo rank that tears its group down while another still works
            # (rank 0 writing the run's files) was seen to abort ("terminate called without an
            # active exception"). Only on the normal path: after an error a barrier could hang.
            dist.barrier()
    finally:
        if owned:
            dist.destroy_process_group()


def wrap(model: Transformer, settings: TrainSettings, d: Dist) -> nn.Module:
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


def global_mean(value: torch.Tensor, d: Dist) -> float:
    if not d.on:
        return float(value.detach())
    import torch.distributed as dist

    t = value.detach().float().clone().reshape(1)
    dist.all_reduce(t)  # SUM: gloo has no AVG
    return float(t) / d.world


def full_state(model: Transformer, opt: torch.optim.Optimizer, settings: TrainSettings,
                d: Dist) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
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


def load_full_state(model: Transformer, opt: torch.optim.Optimizer, names: list[list[str]],
                     model_t: dict[str, torch.Tensor], opt_t: dict[str, torch.Tensor],
                     settings: TrainSettings, d: Dist, where: str) -> None:
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


__all__ = ["Dist", "distributed", "full_state", "global_mean", "load_full_state", "wrap"]
