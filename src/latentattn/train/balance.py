"""Keeping MoE routers balanced in training, from the token counts each :class:`Router` records
in its training forward (``tokens_per_expert``, ``mean_scores``).

* Aux-loss-free balancing (DeepSeek-V3, arXiv 2412.19437 s2.1.2): after each optimiser step,
  ``e_score_correction_bias += rate * sign(mean_load - load_e)``, so an overloaded expert is
  chosen less and an underloaded one more. The bias steers the choice only, never the expert
  weights, and there is no loss term competing with the LM loss. Only sigmoid (``noaux_tc``)
  routers have the bias; DeepSeek-V3 uses rate gamma = 0.001.
* The expert-level balance loss (DeepSeek-V2, arXiv 2405.04434 s2.2.3, eq. 12-14), per MoE layer
  ``alpha * sum_i f_i * P_i`` with ``f_i = E / (K T) * count_i`` and ``P_i`` expert i's mean
  routing probability (alpha per layer when balanced: f_i = 1, P_i = 1/E); summed over layers.
  Its gradient lowers the probability of the experts that received the most tokens.

Under torchrun the counts are summed over ranks first (one all-reduce for all layers): every rank
applies the same bias update, so the buffers stay identical (FSDP2 does not broadcast buffers,
and DDP's broadcast would otherwise impose rank 0's local view), and ``f_i`` is the global
batch's -- ``P_i`` is linear in the tokens, so the ranks' averaged gradient of the loss is one
process's gradient on the whole batch.
"""

from __future__ import annotations

import torch
from torch import nn

from latentattn.errors import ConfigError
from latentattn.model.ffn import Router


def moe_routers(model: nn.Module) -> list[Router]:
    return [m for m in model.modules() if isinstance(m, Router)]


def expert_loads(routers: list[Router]) -> torch.Tensor:
    """(layers, experts) int64: tokens each expert received in the routers' last training
    forward, summed over the ranks of an initialised process group."""
    counts = [r.tokens_per_expert for r in routers]
    if not counts or any(c is None for c in counts):
        raise ConfigError("no routing recorded: run the MoE model forward in training mode first")
    loads = torch.stack([c for c in counts if c is not None])
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(loads)  # SUM
    return loads


def balance_loss(routers: list[Router], loads: torch.Tensor) -> torch.Tensor:
    """DeepSeek-V2's expert-level balance loss summed over layers, without the alpha factor:
    ``sum_i f_i * P_i`` per layer, from global ``loads`` (see :func:`expert_loads`) and each
    router's own ``mean_scores`` (which carry the gradient)."""
    scores = [r.mean_scores for r in routers]
    if any(s is None for s in scores):
        raise ConfigError("no routing recorded: run the MoE model forward in training mode first")
    p = torch.stack([s for s in scores if s is not None])  # (layers, E)
    # f_i = E / (K T) * count_i, and K T is the layer's total count.
    f = loads.shape[-1] * loads.float() / loads.sum(dim=-1, keepdim=True).clamp(min=1)
    return (f.to(p.device) * p).sum()


def has_correction_bias(router: Router) -> bool:
    """Chooses experts by score + e_score_correction_bias (not softmax, not a hash layer)."""
    return router.cfg.scoring_func != "softmax" and not router.is_hash


@torch.no_grad()
def update_router_bias(routers: list[Router], loads: torch.Tensor, rate: float) -> None:
    """DeepSeek-V3's aux-loss-free update of each biased router's correction bias (sigmoid V3,
    sqrtsoftplus V4 top-k layers; V4's hash layers choose by token id and have none)."""
    for router, load in zip(routers, loads.float(), strict=True):
        if has_correction_bias(router):
            bias = router.e_score_correction_bias
            bias += rate * torch.sign(load.mean() - load).to(bias.device)


class RouterBalancer:
    """The two mechanisms in a training step: ``loss()`` after the forward (before backward; a
    collective under torchrun, so every rank calls it), ``update()`` after the optimiser step.

    ``bias_rate``: the V3 bias step (0: off); ``aux_alpha``: the V2 loss weight (0: off). With
    neither, or no MoE layer, both calls do nothing.
    """

    def __init__(self, model: nn.Module, bias_rate: float, aux_alpha: float) -> None:
        self.routers = moe_routers(model)
        self.bias_rate = bias_rate
        self.aux_alpha = aux_alpha
        has_bias = any(has_correction_bias(r) for r in self.routers)
        self.active = bool(self.routers) and ((bias_rate > 0 and has_bias) or aux_alpha > 0)
        self._loads: torch.Tensor | None = None

    def loss(self) -> torch.Tensor | None:
        """Gather this step's loads; the weighted balance loss to add, or None when alpha is 0."""
        self._loads = expert_loads(self.routers) if self.active else None
        if self._loads is None or self.aux_alpha <= 0:
            return None
        return self.aux_alpha * balance_loss(self.routers, self._loads)

    def update(self) -> None:
        if self._loads is not None and self.bias_rate > 0:
            update_router_bias(self.routers, self._loads, self.bias_rate)
        self._loads = None
