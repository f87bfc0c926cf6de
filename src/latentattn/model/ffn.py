"""Feed-forward blocks: dense SwiGLU and DeepSeekMoE (shared + routed experts)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from latentattn.config import MoEConfig
from latentattn.errors import ConfigError
from latentattn.precision import KeepFloat32, fp32_compute


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x)). With ``limit`` (DeepSeek-V4's ``swiglu_limit``) the
    gate pre-activation is clamped above at limit and the up one to [-limit, limit]
    (transformers' DeepseekV4MLP and DeepseekV4Experts._apply_gate)."""

    def __init__(self, dim: int, hidden: int, limit: float | None = None) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(dim, hidden, bias=False)
        self.up_proj = nn.Linear(dim, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, dim, bias=False)
        self.limit = limit

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.limit is None:
            return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))
        gate = self.gate_proj(x).clamp(max=self.limit)
        up = self.up_proj(x).clamp(min=-self.limit, max=self.limit)
        return self.down_proj(F.silu(gate) * up)


class Router(KeepFloat32):
    """Chooses num_experts_per_tok experts per token and their weights (routing in fp32).

    softmax (DeepSeek-V2): greedy top-k, or group_limited_greedy -- keep the topk_group groups
    whose best expert scores highest. sigmoid (DeepSeek-V3 ``noaux_tc``): a correction bias is
    added for choosing only; groups are ranked by the sum of their two best biased scores; the
    weights are the unbiased sigmoid scores, optionally renormalised. sqrtsoftplus (DeepSeek-V4):
    the same with scores sqrt(softplus(logits)) (V4 has one group). Every kind scales the weights
    by routed_scaling_factor. Same arithmetic as transformers' DeepseekV2/V3TopkRouter and
    DeepseekV4TopKRouter. The router weight and bias stay fp32 in a bf16 model (a bf16
    checkpoint value is exact in fp32, and transformers routes in fp32 too, so the choices are
    the same).

    ``hash_vocab``: a hash layer's router (DeepSeek-V4 report section 2.1; transformers'
    DeepseekV4HashRouter): the experts are ``tid2eid[input_id]``, a frozen (hash_vocab, k) int64
    table that a checkpoint fills (zeros until then), with no correction bias; the weights are
    still the chosen experts' scores from ``weight``.

    A forward in training mode records, for :mod:`latentattn.train.balance`,
    ``tokens_per_expert`` (E,) int64 -- how many tokens chose each expert, without grad -- and
    ``mean_scores`` (E,) -- each expert's routing probability averaged over the tokens (softmax
    scores; sigmoid and sqrtsoftplus scores normalised per token, DeepSeek-V3 eq. 19), with grad.
    """

    e_score_correction_bias: torch.Tensor
    tid2eid: torch.Tensor

    def __init__(self, dim: int, cfg: MoEConfig, hash_vocab: int | None = None) -> None:
        super().__init__()
        self.cfg = cfg
        self.is_hash = hash_vocab is not None
        self.weight = nn.Parameter(torch.empty(cfg.n_routed_experts, dim))
        if hash_vocab is not None:
            if cfg.scoring_func == "softmax":
                raise ConfigError("hash routing (MoEConfig.n_hash_layers) goes with sigmoid or "
                                  "sqrtsoftplus scores, not softmax")
            self.register_buffer("tid2eid", torch.zeros(hash_vocab, cfg.num_experts_per_tok,
                                                        dtype=torch.long))
        elif cfg.scoring_func != "softmax":
            self.register_buffer("e_score_correction_bias", torch.zeros(cfg.n_routed_experts))
        self.tokens_per_expert: torch.Tensor | None = None
        self.mean_scores: torch.Tensor | None = None

    def _group_mask(self, scores: torch.Tensor, group_scores: torch.Tensor) -> torch.Tensor:
        c = self.cfg
        top_groups = group_scores.topk(c.topk_group, dim=-1, sorted=False).indices
        keep = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, top_groups, True)
        return keep.repeat_interleave(c.n_routed_experts // c.n_group, dim=-1)

    def _hash_choice(self, input_ids: torch.Tensor | None, n: int) -> torch.Tensor:
        if input_ids is None:
            raise ConfigError("a hash MoE layer routes by token id: pass input_ids to MoE.forward")
        if input_ids.numel() != n:
            raise ConfigError(f"input_ids hold {input_ids.numel()} tokens, the MoE input {n}")
        return self.tid2eid[input_ids.reshape(-1)]

    def forward(self, x: torch.Tensor,
                input_ids: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """x (N, dim), input_ids (N,) or any shape of N ids (hash layers only) -> weights (N, k)
        fp32, indices (N, k)."""
        c = self.cfg
        with fp32_compute(x):  # bf16 autocast (training) would cast the fp32 inputs down
            logits = F.linear(x.float(), self.weight)
        per_group = (-1, c.n_group, c.n_routed_experts // c.n_group)
        if c.scoring_func == "softmax":
            scores = probs = logits.softmax(dim=-1)
            if c.topk_method == "group_limited_greedy":
                keep = self._group_mask(scores, scores.view(per_group).amax(dim=-1))
                scores = scores.masked_fill(~keep, 0.0)
            weights, idx = scores.topk(c.num_experts_per_tok, dim=-1, sorted=False)
        else:
            scores = probs = logits.sigmoid() if c.scoring_func == "sigmoid" else F.softplus(logits).sqrt()
            if self.is_hash:
                idx = self._hash_choice(input_ids, x.shape[0])
            else:
                choice = scores + self.e_score_correction_bias
                if c.n_group > 1:  # one group keeps every expert: the mask would change nothing
                    group_scores = choice.view(per_group).topk(2, dim=-1).values.sum(dim=-1)
                    choice = choice.masked_fill(~self._group_mask(choice, group_scores), float("-inf"))
                idx = choice.topk(c.num_experts_per_tok, dim=-1, sorted=False).indices
            weights = scores.gather(1, idx)
            if c.norm_topk_prob:
                weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
        if self.training:
            with torch.no_grad():
                self.tokens_per_expert = torch.bincount(idx.flatten(), minlength=c.n_routed_experts)
            if c.scoring_func != "softmax":
                probs = probs / probs.sum(dim=-1, keepdim=True)
            self.mean_scores = probs.mean(dim=0)
        return weights * c.routed_scaling_factor, idx


class MoE(nn.Module):
    """DeepSeekMoE: shared experts see every token; each token also visits its k routed experts.
    ``hash_vocab``: a hash layer (:class:`Router`), whose forward needs the token ids."""

    def __init__(self, dim: int, cfg: MoEConfig, hash_vocab: int | None = None) -> None:
        super().__init__()
        self.cfg = cfg
        self.gate = Router(dim, cfg, hash_vocab)
        self.experts = nn.ModuleList(
            MLP(dim, cfg.moe_intermediate_size, cfg.swiglu_limit) for _ in range(cfg.n_routed_experts)
        )
        self.shared_experts = (
            MLP(dim, cfg.moe_intermediate_size * cfg.n_shared_experts, cfg.swiglu_limit)
            if cfg.n_shared_experts > 0 else None
        )

    def forward(self, x: torch.Tensor, input_ids: torch.Tensor | None = None) -> torch.Tensor:
        """x (..., dim), input_ids (...) the tokens' ids (used by hash layers) -> (..., dim)."""
        shape = x.shape
        flat = x.reshape(-1, shape[-1])  # (N, dim)
        weights, idx = self.gate(flat, input_ids)
        out = torch.zeros_like(flat)
        # Loop over the experts that received tokens: sparse work, no (N, E) dense product.
        # Training runs every expert, one no token chose on zero rows: its weights then get a
        # zero gradient, not none, so every DDP/FSDP2 rank reduces the same gradients whatever
        # its tokens chose (FSDP2 has no find_unused_parameters; its reduce-scatter of unequal
        # sets fails) and AdamW updates each expert alike on one process and on N ranks. A
        # grouped-GEMM MoE (torchtitan) gets the same by computing every expert's slice.
        experts = range(len(self.experts)) if self.training else idx.unique().tolist()
        for e in experts:
            token, slot = (idx == e).nonzero(as_tuple=True)
            y = self.experts[e](flat[token]) * weights[token, slot, None]
            out.index_add_(0, token, y.to(out.dtype))
        out = out.view(shape)
        if self.shared_experts is not None:
            out = out + self.shared_experts(x)
        return out
