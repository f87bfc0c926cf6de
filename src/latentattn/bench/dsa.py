"""Time DeepSeek Sparse Attention against dense absorbed MLA, one layer at DeepSeek-V3.2 dims.

Decode: one new token with ``context`` tokens cached (latent + indexer keys filled directly).
Timed per point, batch 1:
* ``dense``: absorbed MLA over every cached latent (absorb q, attention, un-absorb);
* ``dsa-k{k}``: the indexer's scores and running top-k over every cached key, then attention
  over the k gathered latents (+ the same absorb/un-absorb); ``indexer`` is its first part alone;
* ``*-layer``: the whole layer call (projections and cache write included), for scale: the
  projections read ~0.8 GB of fp32 weights per step whatever the context.

Prefill: a fresh prompt of T tokens through the whole layer in DSA's two forms, which give the
same output: ``masked`` (DeepSeek's "masked MHA mode": naive MLA with dense scores and the top-k
mask, O(T^2) attention) and ``gather`` (O(T*k) attention over gathered latents); both include the
indexer (O(T^2) but ~17x cheaper per pair). ``dense`` MLA prefill is also timed as the baseline.
The report names the faster form per length and the crossover.
"""

from __future__ import annotations

import dataclasses
import gc
import statistics
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from latentattn.attention.dsa import SparseLatentAttention
from latentattn.cache.build import LatentSpec, build_cache
from latentattn.cache.kv import KVCache
from latentattn.cache.step import fresh_step
from latentattn.config import IndexerConfig, MLAConfig, ModelConfig, RopeConfig, YarnConfig
from latentattn.kernels.sparse import select_topk, sparse_mqa
from latentattn.model.transformer import Transformer
from latentattn.rope import RotaryEmbedding
from latentattn.timing import ReportHeader, machine_info, median_of, time_call


@dataclass(frozen=True)
class DSADims:
    name: str
    dim: int
    n_heads: int
    q_lora_rank: int
    kv_lora_rank: int
    qk_nope_head_dim: int
    qk_rope_head_dim: int
    v_head_dim: int
    index_n_heads: int
    index_head_dim: int
    rope: RopeConfig

    def config(self, topk: int, capacity: int) -> ModelConfig:
        attn = MLAConfig(
            n_heads=self.n_heads, q_lora_rank=self.q_lora_rank, kv_lora_rank=self.kv_lora_rank,
            qk_nope_head_dim=self.qk_nope_head_dim, qk_rope_head_dim=self.qk_rope_head_dim,
            v_head_dim=self.v_head_dim,
            indexer=IndexerConfig(self.index_n_heads, self.index_head_dim, topk),
        )
        return ModelConfig(vocab_size=256, dim=self.dim, n_layers=1, intermediate_size=8,
                           attention=attn, rope=self.rope, max_seq_len=capacity, name=self.name)

    def dense_decode_gflop(self, context: int) -> float:
        """Absorbed attention over S keys: 2 * H * S * ((d_c + d_r) + d_c) FLOP."""
        return 2 * self.n_heads * context * (2 * self.kv_lora_rank + self.qk_rope_head_dim) / 1e9

    def sparse_decode_gflop(self, context: int, topk: int) -> tuple[float, float]:
        """(indexer over S keys, attention over k latents), DeepSeek-V3.2 (arXiv 2512.02556): attention
        O(L k), the indexer still O(L^2)."""
        indexer = 2 * self.index_n_heads * self.index_head_dim * context / 1e9
        return indexer, self.dense_decode_gflop(min(topk, context))


V32_DIMS = DSADims(
    name="deepseek-v3.2", dim=7168, n_heads=128, q_lora_rank=1536, kv_lora_rank=512,
    qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128, index_n_heads=64, index_head_dim=128,
    rope=RopeConfig(theta=10000.0, interleaved=True,
                    yarn=YarnConfig(factor=40, original_max_position_embeddings=4096,
                                    mscale=1.0, mscale_all_dim=1.0)),
)
TINY_DIMS = DSADims(
    name="tiny", dim=64, n_heads=4, q_lora_rank=32, kv_lora_rank=32, qk_nope_head_dim=16,
    qk_rope_head_dim=8, v_head_dim=16, index_n_heads=4, index_head_dim=16,
    rope=RopeConfig(interleaved=True),
)


@dataclass
class Point:
    kind: str  # "decode" or "prefill"
    variant: str
    context: int
    median_ms: float
    samples_ms: list[float]
    topk: int | None = None


@dataclass
class DSAReport(ReportHeader):
    topks: list[int]
    decode_contexts: list[int]
    prefill_contexts: list[int]
    points: list[Point] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def ms(self, kind: str, variant: str, context: int) -> float | None:
        return median_of(self.points, kind=kind, variant=variant, context=context)

    def decode_summary(self) -> list[dict[str, Any]]:
        """Per context and k: dense/sparse ratio and the indexer's share of the sparse step."""
        out = []
        for ctx in self.decode_contexts:
            dense = self.ms("decode", "dense", ctx)
            for k in self.topks:
                sparse, idx = self.ms("decode", f"dsa-k{k}", ctx), self.ms("decode", f"indexer-k{k}", ctx)
                if dense is None or sparse is None or idx is None:
                    continue
                out.append({"context": ctx, "topk": k, "dense_ms": dense, "dsa_ms": sparse,
                            "speedup": dense / sparse, "indexer_share": idx / sparse})
        return out

    def prefill_summary(self) -> dict[str, Any]:
        """The faster DSA form per length and the first length where gather wins."""
        rows, crossover = [], None
        for ctx in self.prefill_contexts:
            m, g = self.ms("prefill", "masked", ctx), self.ms("prefill", "gather", ctx)
            d = self.ms("prefill", "dense", ctx)
            if m is None or g is None:
                continue
            best = "gather" if g < m else "masked"
            if best == "gather" and crossover is None:
                crossover = ctx
            rows.append({"context": ctx, "dense_ms": d, "masked_ms": m, "gather_ms": g, "faster": best})
        return {"rows": rows, "gather_faster_from": crossover}

    def as_dict(self) -> dict[str, Any]:
        return {
            "machine": self.machine, "dims": self.dims, "dtype": self.dtype, "topks": self.topks,
            "decode_contexts": self.decode_contexts, "prefill_contexts": self.prefill_contexts,
            "points": [asdict(p) for p in self.points], "decode": self.decode_summary(),
            "prefill": self.prefill_summary(), "notes": self.notes,
        }


def _layer(dims: DSADims, topk: int, capacity: int, dtype: torch.dtype) -> SparseLatentAttention:
    torch.manual_seed(0)
    layer = SparseLatentAttention(dims.config(topk, capacity))
    layer.apply(Transformer._init_weights)
    return layer.to(dtype).eval()


def _filled_cache(dims: DSADims, context: int, dtype: torch.dtype) -> KVCache:
    """A cache holding ``context`` tokens of plausible content: unit-RMS latents (they are
    RMSNorm'd), unit rope keys, LayerNorm'd indexer keys. Filled directly: no prefill."""
    g = torch.Generator().manual_seed(1)
    spec = LatentSpec(dims.kv_lora_rank, dims.qk_rope_head_dim, dims.index_head_dim)
    cache = build_cache([spec], 1, context + 1, dtype)
    latent, keys = cache[0].latent.buffers[0], cache[0].index_keys.buffers[0]
    latent[0, :context] = torch.randn(context, dims.kv_lora_rank + dims.qk_rope_head_dim, generator=g)
    k = torch.randn(context, dims.index_head_dim, generator=g)
    keys[0, :context] = torch.nn.functional.layer_norm(k, (dims.index_head_dim,))
    cache.fill(context)
    return cache


@torch.no_grad()
def _decode_points(dims: DSADims, ctx: int, topks: Sequence[int], repeats: int,
                   dtype: torch.dtype) -> list[Point]:
    layer = _layer(dims, max(topks), ctx + 1, dtype)
    rotary = RotaryEmbedding(dims.qk_rope_head_dim, dims.rope, ctx + 1)
    cache = _filled_cache(dims, ctx, dtype)
    step = cache.step(1)
    rope = rotary(step.positions)
    x = torch.randn(1, 1, dims.dim, dtype=dtype)
    q, c_q = layer.rotated_query(x, rope)
    assert c_q is not None
    q_i, w = layer.indexer.queries(x, c_q, rope)
    cached = cache[0]
    latent, k_i = cached.latent.buffers[0][:, :ctx], cached.index_keys.buffers[0][:, :ctx].float()
    positions = torch.full((1, 1), ctx - 1)  # attend to the ctx cached tokens
    dense_step = dataclasses.replace(step, kv_len=ctx, mask=torch.ones(1, 1, 1, ctx, dtype=torch.bool))

    # The layer call writes the new token at position ctx; KVCache.lengths is only advanced by
    # the model, so every repeat decodes at the same context.
    def point(variant: str, fn: Callable[[], object], topk: int | None = None) -> Point:
        samples = time_call(fn, repeats)
        return Point("decode", variant, ctx, statistics.median(samples), samples, topk)

    points = [point("dense", lambda: layer.absorbed(q, latent, dense_step))]
    layer.mode = "dense"
    points.append(point("dense-layer", lambda: layer(x, rope, step, cached)))
    layer.mode = "sparse"
    for k in topks:
        layer.topk = k

        def indexer(k: int = k) -> torch.Tensor:
            return select_topk(q_i, w, k_i, positions, k, layer.indexer.scale)

        def sparse(k: int = k) -> torch.Tensor:
            o_lat, _ = sparse_mqa(layer.absorb_query(q), latent, indexer(k), layer.scale, dims.kv_lora_rank)
            return layer.unabsorb(o_lat)

        points.append(point(f"indexer-k{k}", indexer, k))
        points.append(point(f"dsa-k{k}", sparse, k))
        points.append(point(f"dsa-k{k}-layer", lambda: layer(x, rope, step, cached), k))
    return points


@torch.no_grad()
def _prefill_points(dims: DSADims, ctx: int, topk: int, repeats: int, dtype: torch.dtype) -> list[Point]:
    layer = _layer(dims, topk, ctx, dtype)
    rotary = RotaryEmbedding(dims.qk_rope_head_dim, dims.rope, ctx)
    step = fresh_step(1, ctx, torch.device("cpu"))
    rope = rotary(step.positions)
    x = torch.randn(1, ctx, dims.dim, dtype=dtype)
    points = []
    for variant in ("dense", "masked", "gather"):
        layer.mode = "dense" if variant == "dense" else "sparse"
        layer.prefill_form = "gather" if variant == "gather" else "masked"
        samples = time_call(lambda: layer(x, rope, step), repeats, warmup=ctx < 4096)
        points.append(Point("prefill", variant, ctx, statistics.median(samples), samples, topk))
    return points


def run_dsa_bench(
    decode_contexts: Sequence[int], prefill_contexts: Sequence[int], topks: Sequence[int],
    repeats: int = 5, prefill_repeats: int = 1, dtype: torch.dtype = torch.float32,
    dims: DSADims = V32_DIMS, progress: Callable[[str], None] | None = None,
) -> DSAReport:
    report = DSAReport(
        machine=machine_info(), dims=asdict(dims), dtype=str(dtype).removeprefix("torch."),
        topks=list(topks), decode_contexts=list(decode_contexts), prefill_contexts=list(prefill_contexts),
        notes=[
            "decode 'dense'/'dsa-k*'/'indexer-k*': the context-dependent part of one decode step "
            "(absorb, attention or indexer+top-k+gathered attention, un-absorb); '*-layer': the "
            "whole layer call including the projections",
            "prefill: one fresh prompt through the whole layer; 'masked' and 'gather' are DSA's two "
            "forms with equal outputs, both including the indexer; 'dense' is plain MLA",
            "arithmetic per decode step (GFLOP): "
            + ", ".join(f"{c}: dense {dims.dense_decode_gflop(c):.2f}, "
                        + ", ".join(f"k={k} indexer {dims.sparse_decode_gflop(c, k)[0]:.2f} + "
                                    f"attention {dims.sparse_decode_gflop(c, k)[1]:.2f}" for k in topks)
                        for c in decode_contexts),
        ],
    )
    for ctx in decode_contexts:
        if progress:
            progress(f"decode {ctx}")
        report.points += _decode_points(dims, ctx, topks, repeats, dtype)
        gc.collect()  # the layer and its cache went out of scope: free them before the next size
    for ctx in prefill_contexts:
        if progress:
            progress(f"prefill {ctx}")
        report.points += _prefill_points(dims, ctx, max(topks), prefill_repeats, dtype)
        gc.collect()
    return report


def plot_dsa_report(report: DSAReport, path: str) -> None:
    """Left: decode step ms vs context (dense, DSA per k, indexer alone). Right: prefill ms."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    variants = ["dense"] + [f"{v}-k{k}" for k in report.topks for v in ("dsa", "indexer")]
    for v in variants:
        pts = sorted((p.context, p.median_ms) for p in report.points if p.kind == "decode" and p.variant == v)
        if pts:
            left.plot(*zip(*pts, strict=True), marker="o", label=v,
                      linestyle="--" if v.startswith("indexer") else "-")
    for v in ("dense", "masked", "gather"):
        pts = sorted((p.context, p.median_ms) for p in report.points
                     if p.kind == "prefill" and p.variant == v)
        if pts:
            right.plot(*zip(*pts, strict=True), marker="o", label=f"{v} (k={max(report.topks)})"
                       if v != "dense" else "dense MLA")
    for ax, title, ylabel in (
        (left, "decode step, batch 1", "attention part of one decode step (ms)"),
        (right, "prefill of one prompt", "whole layer (ms)"),
    ):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("context (tokens)")
        ax.set_ylabel(ylabel)
        ax.set_title(f"{title}, {report.dims['name']} dims, {report.dtype}")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, format="png", dpi=110)
    plt.close(fig)


def dsa_headline(report: DSAReport) -> list[str]:
    lines = [
        f"decode @ {r['context']:,}, k={r['topk']}: dense {r['dense_ms']:.2f} ms, DSA {r['dsa_ms']:.2f} ms "
        f"({r['speedup']:.2f}x), indexer {100 * r['indexer_share']:.0f}% of the DSA step"
        for r in report.decode_summary()
    ]
    pre = report.prefill_summary()
    for r in pre["rows"]:
        dense = "" if r["dense_ms"] is None else f"dense MLA {r['dense_ms']:,.0f} ms, "
        lines.append(f"prefill {r['context']:,}: {dense}masked {r['masked_ms']:,.0f} ms, "
                     f"gather {r['gather_ms']:,.0f} ms -> {r['faster']}")
    cross = pre["gather_faster_from"]
    lines.append("prefill crossover: " + (f"gather is faster from {cross:,} tokens" if cross
                                          else "masked MHA mode was faster at every measured length"))
    return lines
