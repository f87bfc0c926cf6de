"""Manifold-constrained hyper-connections (mHC; DeepSeek-V4 report section 2.2, Xie et al. 2026),
as transformers 5.25 computes them (``modeling_deepseek_v4.py``: DeepseekV4HyperConnection,
DeepseekV4HyperHead, DeepseekV4DecoderLayer).

The residual is N = ``hc_mult`` streams, (B, T, N, dim). Around each attention and each FFN a
:class:`HyperConnection` reads the streams and gives the block its input, one weighted sum of the
streams ("pre"), and the two maps that put its output back: ``post`` (B, T, N), how much of the
output each stream receives, and ``comb`` (B, T, N, N), how the streams mix, a doubly
stochastic matrix (rows and columns sum to 1, so mixing cannot grow the residual). The three
come from one projection of the RMS-normalised flattened streams. :func:`hyper_residual` is the
block's update; a :class:`HyperHead` collapses the streams once more before the final norm.

The parameters and the whole computation stay fp32 in a bf16 model (transformers'
``_keep_in_fp32_modules_strict`` lists attn_hc, ffn_hc and hc_head): Sinkhorn's divisions and
the sigmoids would lose the rows' balance in bf16.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from latentattn.config import HyperConfig, ModelConfig
from latentattn.errors import ConfigError
from latentattn.precision import KeepFloat32, fp32_compute


def _hyper(cfg: ModelConfig) -> HyperConfig:
    if cfg.hyper is None:
        raise ConfigError("mHC modules need ModelConfig.hyper (a HyperConfig)")
    return cfg.hyper


def _mix(streams: torch.Tensor, fn: torch.Tensor, eps: float) -> torch.Tensor:
    """streams (B, T, N, dim) -> fn applied to the flattened streams after an RMSNorm without a
    weight, (B, T, rows), fp32 (transformers' DeepseekV4UnweightedRMSNorm, then F.linear)."""
    flat = streams.flatten(2).float()  # (B, T, N * dim)
    flat = flat * torch.rsqrt(flat.square().mean(-1, keepdim=True) + eps)
    with fp32_compute(flat):  # bf16 autocast (training) would cast the fp32 inputs down
        return F.linear(flat, fn.float())


def sinkhorn(logits: torch.Tensor, iters: int, eps: float) -> torch.Tensor:
    """(..., N, N) logits -> a doubly stochastic (..., N, N), transformers' order: a softmax over
    the last axis (+ eps), the columns normalised, then ``iters - 1`` rounds of rows then columns,
    each division by the sum + eps (Sinkhorn-Knopp; the V4 report section 2.2)."""
    comb = logits.softmax(dim=-1) + eps
    comb = comb / (comb.sum(dim=-2, keepdim=True) + eps)
    for _ in range(iters - 1):
        comb = comb / (comb.sum(dim=-1, keepdim=True) + eps)
        comb = comb / (comb.sum(dim=-2, keepdim=True) + eps)
    return comb


def collapse(pre: torch.Tensor, streams: torch.Tensor) -> torch.Tensor:
    """pre (B, T, N) fp32, streams (B, T, N, dim) -> sum_n pre_n * stream_n (B, T, dim), summed in
    fp32 and returned in the streams' dtype."""
    return (pre.unsqueeze(-1) * streams).sum(dim=2).to(streams.dtype)


def hyper_residual(post: torch.Tensor, comb: torch.Tensor, out: torch.Tensor,
                   streams: torch.Tensor) -> torch.Tensor:
    """The streams after a block: post (B, T, N), comb (B, T, N, N), the block's output out
    (B, T, dim), streams (B, T, N, dim) -> post_n * out + sum_j comb[j, n] * stream_j.

    comb is used transposed (a sum over its FIRST axis): Sinkhorn's result is not symmetric, so
    the direction matters (transformers' DeepseekV4DecoderLayer). The mix runs in the streams'
    dtype, post and comb cast to it, as there."""
    dtype = streams.dtype
    return post.to(dtype).unsqueeze(-1) * out.unsqueeze(-2) + torch.matmul(
        comb.to(dtype).transpose(-1, -2), streams)


class HyperConnection(KeepFloat32):
    """``forward(streams (B, T, N, dim)) -> (post (B, T, N), comb (B, T, N, N), x (B, T, dim))``:
    post and comb fp32, x (the block's input) in the streams' dtype.

    fn ((2 + N) * N, N * dim) projects the normalised streams to N "pre", N "post" and N * N "comb"
    logits; base adds a bias to each; scale (3,) scales the three groups' projections.
    pre = sigmoid(.) + eps, post = 2 sigmoid(.), comb = sinkhorn(.) (module docstring)."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        hc = _hyper(cfg)
        self.hc_mult, self.iters, self.eps = hc.hc_mult, hc.sinkhorn_iters, hc.eps
        self.norm_eps = cfg.norm_eps  # the streams' RMSNorm takes the model's eps, not hc_eps
        n = hc.hc_mult
        self.fn = nn.Parameter(torch.empty((2 + n) * n, n * cfg.dim))
        self.base = nn.Parameter(torch.empty((2 + n) * n))
        self.scale = nn.Parameter(torch.empty(3))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """transformers' DeepseekV4PreTrainedModel._init_weights: fn ~ N(0, 0.02), base 0, scale 1."""
        nn.init.normal_(self.fn, mean=0.0, std=0.02)
        nn.init.zeros_(self.base)
        nn.init.ones_(self.scale)

    def forward(self, streams: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        n = self.hc_mult
        mixes = _mix(streams, self.fn, self.norm_eps)  # (B, T, (2 + N) * N)
        pre_w, post_w, comb_w = mixes.split([n, n, n * n], dim=-1)
        pre_b, post_b, comb_b = self.base.float().split([n, n, n * n])
        pre_s, post_s, comb_s = self.scale.float().unbind(0)
        pre = torch.sigmoid(pre_w * pre_s + pre_b) + self.eps
        post = 2 * torch.sigmoid(post_w * post_s + post_b)
        comb_logits = comb_w.unflatten(-1, (n, n)) * comb_s + comb_b.view(n, n)  # (B, T, N, N)
        return post, sinkhorn(comb_logits, self.iters, self.eps), collapse(pre, streams)


class HyperHead(KeepFloat32):
    """The last collapse, before the final norm: streams (B, T, N, dim) -> (B, T, dim), with
    pre = sigmoid(hc_fn . rmsnorm(streams) * hc_scale + hc_base) + eps (transformers'
    DeepseekV4HyperHead). hc_fn (N, N * dim), hc_base (N,), hc_scale (1,)."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        hc = _hyper(cfg)
        self.hc_mult, self.eps, self.norm_eps = hc.hc_mult, hc.eps, cfg.norm_eps
        n = hc.hc_mult
        self.hc_fn = nn.Parameter(torch.empty(n, n * cfg.dim))
        self.hc_base = nn.Parameter(torch.empty(n))
        self.hc_scale = nn.Parameter(torch.empty(1))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """As :meth:`HyperConnection.reset_parameters`: hc_fn ~ N(0, 0.02), hc_base 0, hc_scale 1."""
        nn.init.normal_(self.hc_fn, mean=0.0, std=0.02)
        nn.init.zeros_(self.hc_base)
        nn.init.ones_(self.hc_scale)

    def forward(self, streams: torch.Tensor) -> torch.Tensor:
        mixes = _mix(streams, self.hc_fn, self.norm_eps)  # (B, T, N)
        pre = torch.sigmoid(mixes * self.hc_scale.float() + self.hc_base.float()) + self.eps
        return collapse(pre, streams)
