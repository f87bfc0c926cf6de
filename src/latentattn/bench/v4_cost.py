"""What one decode step of one attention layer should cost: FLOP and bytes per part, and the
time they predict at this machine's measured GEMM and copy rates (``latentattn bench v4``).

A decode step (batch 1, one new token, ``context`` tokens cached) has three parts:

* ``projections``: every linear weight of the layer is read once and used once (a matrix-vector
  product): 2 FLOP and one element read per weight. Norm weights, sinks and ``position_bias`` (a
  few thousand values) are left out.
* ``indexer`` (V4's CSA and V3.2's DSA): the lightning indexer scores every visible key, one
  d_I-dim key per entry shared by its H_I heads: 2 * H_I * d_I FLOP and d_I elements read per
  key. The head-weighted sum (2 * H_I FLOP per key, 1/d_I of the scoring) and the top-k pass over
  the scores are left out. Both implementations score in fp32 whatever the model dtype.
* ``attention``: shared-key MQA over n keys, each read once for all heads: V4 (key = value, D
  dims) 4 * H * D FLOP per key; absorbed MLA (key d_c + d_r, value d_c) 2 * H * (2 d_c + d_r).

The predicted time of a step is the sum over its parts of max(FLOP / GEMM rate, bytes / copy
rate): the parts run one after another, each bound by one of the two. The copy rate counts the
bytes a large ``copy_`` moves (read + write), as ``latentattn bench v4`` measures and prints it.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import torch

from latentattn.bench.dsa import DSADims
from latentattn.config import CSA, HCA, SLIDING, ModelConfig, V4AttentionConfig


@dataclass(frozen=True)
class Cost:
    """One part of a step: FLOP, bytes read, and the dtype its GEMMs run in."""

    flop: float
    bytes: float
    compute: str  # "float32" or "bfloat16": which measured GEMM rate applies

    def seconds(self, rates: Rates) -> float:
        return max(self.flop / rates.gemm_flops[self.compute], self.bytes / rates.copy_bytes)


@dataclass(frozen=True)
class Rates:
    """This machine's measured peaks: GEMM FLOP/s per dtype, copy bytes/s (read + write)."""

    gemm_flops: dict[str, float]
    copy_bytes: float


def _median_seconds(fn: Callable[[], object], repeats: int) -> float:
    fn(), fn()  # warm up: first-call allocations and thread-pool start
    samples = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - t0)
    return sorted(samples)[len(samples) // 2]


def measure_rates(dtypes: tuple[torch.dtype, ...], n: int = 2048, copy_mib: int = 512,
                  repeats: int = 7) -> Rates:
    """Median rate of an (n x n) @ (n x n) matmul per dtype (2 n^3 FLOP) and of copying a
    ``copy_mib`` MiB tensor (2 x its bytes moved), large enough to leave every cache."""
    gemm = {}
    for dt in {torch.float32, *dtypes}:
        a, b = torch.randn(n, n).to(dt), torch.randn(n, n).to(dt)
        seconds = _median_seconds(partial(torch.matmul, a, b), repeats)
        gemm[str(dt).removeprefix("torch.")] = 2 * n**3 / seconds
    src = torch.randn(copy_mib << 18)  # copy_mib MiB of fp32
    dst = torch.empty_like(src)
    copy = 2 * src.numel() * 4 / _median_seconds(lambda: dst.copy_(src), repeats)
    return Rates(gemm_flops=gemm, copy_bytes=copy)


def predicted_seconds(parts: dict[str, Cost], rates: Rates) -> float:
    return sum(p.seconds(rates) for p in parts.values())


# ---------------------------------------------------------------------------------- V4
def v4_weights(cfg: ModelConfig, kind: str) -> int:
    """Linear weights of one V4 layer of type ``kind`` (transformers' DeepseekV4Attention):
    q_a (dim x q_lora), q_b (q_lora x H D), kv (dim x D), o_a (grouped: H D / G -> o_lora per
    group, G groups: H D x o_lora), o_b (G o_lora x dim); a CSA compressor projects kv and gate to
    2 D each (two overlapping series), an HCA one to D each; CSA's indexer adds its own kv and gate
    (2 d_I each), q_b (q_lora x H_I d_I) and weights_proj (dim x H_I)."""
    a = cfg.attention
    assert isinstance(a, V4AttentionConfig)
    hd = a.n_heads * a.head_dim
    n = (cfg.dim * a.q_lora_rank + a.q_lora_rank * hd + cfg.dim * a.head_dim
         + hd * a.o_lora_rank + a.o_groups * a.o_lora_rank * cfg.dim)
    if kind == CSA:
        n += 2 * cfg.dim * 2 * a.head_dim
        n += 2 * cfg.dim * 2 * a.index_head_dim + a.q_lora_rank * a.index_n_heads * a.index_head_dim
        n += cfg.dim * a.index_n_heads
    elif kind == HCA:
        n += 2 * cfg.dim * a.head_dim
    return n


def v4_step(cfg: ModelConfig, kind: str, context: int, dtype: torch.dtype) -> dict[str, Cost]:
    """The parts of one V4 decode step with ``context`` tokens cached (the new token at position
    ``context``). Keys: the window's W (the token's own and W - 1 before it), plus for CSA the
    indexer's top-k of the E = context // m entries (scored: all E), for HCA all E = context // m'.
    """
    a = cfg.attention
    assert isinstance(a, V4AttentionConfig)
    elt, comp = torch.finfo(dtype).bits // 8, str(dtype).removeprefix("torch.")
    w = v4_weights(cfg, kind)
    parts = {"projections": Cost(2.0 * w, float(w * elt), comp)}
    keys = min(a.sliding_window, context + 1)
    if kind != SLIDING:
        e = context // a.rate(kind)
        if kind == CSA:
            parts["indexer"] = Cost(2.0 * a.index_n_heads * a.index_head_dim * e,
                                    float(e * a.index_head_dim * elt), "float32")
            e = min(a.index_topk, e)
        keys += e
    parts["attention"] = Cost(4.0 * a.n_heads * a.head_dim * keys, float(keys * a.head_dim * elt), comp)
    return parts


# ---------------------------------------------------------------------------------- V3.2
def mla_weights(d: DSADims) -> int:
    """Linear weights of one V3.2 layer (DeepSeek-V3.2 ``MLA``): q_a (dim x d_q), q_b (d_q x H
    (d_n + d_r)), kv_a (dim x (d_c + d_r)), kv_b (d_c x H (d_n + d_v), read whole by the absorbed
    form as W_UK and W_UV), o (H d_v x dim); the indexer's wq_b (d_q x H_I d_I), wk (dim x d_I) and
    weights_proj (dim x H_I): the dense baseline is the same layer in dense mode (as ``bench dsa``
    runs it), which still projects the indexer's queries and keys."""
    n = (d.dim * d.q_lora_rank + d.q_lora_rank * d.n_heads * (d.qk_nope_head_dim + d.qk_rope_head_dim)
         + d.dim * (d.kv_lora_rank + d.qk_rope_head_dim)
         + d.kv_lora_rank * d.n_heads * (d.qk_nope_head_dim + d.v_head_dim)
         + d.n_heads * d.v_head_dim * d.dim)
    n += d.q_lora_rank * d.index_n_heads * d.index_head_dim
    return n + d.dim * (d.index_head_dim + d.index_n_heads)


def dsa_step(d: DSADims, context: int, topk: int | None, dtype: torch.dtype) -> dict[str, Cost]:
    """One V3.2 decode step over ``context`` cached latents: DSA (indexer over all of them, then
    absorbed attention over ``topk``) or, with topk None, dense absorbed MLA over all."""
    elt, comp = torch.finfo(dtype).bits // 8, str(dtype).removeprefix("torch.")
    w = mla_weights(d)
    parts = {"projections": Cost(2.0 * w, float(w * elt), comp)}
    keys = context
    if topk is not None:
        parts["indexer"] = Cost(2.0 * d.index_n_heads * d.index_head_dim * context,
                                float(context * d.index_head_dim * elt), "float32")
        keys = min(topk, context)
    per_key = d.kv_lora_rank + d.qk_rope_head_dim
    parts["attention"] = Cost(2.0 * d.n_heads * keys * (per_key + d.kv_lora_rank),
                              float(keys * per_key * elt), comp)
    return parts
