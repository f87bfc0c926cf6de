"""``latentattn bench v4``: one DeepSeek-V4 attention layer of each type (sliding, CSA, HCA) at
V4-Flash dims, its decode-step time against context beside DeepSeek-V3.2's DSA step and dense
absorbed MLA at the same context (``bench dsa``'s layer at V3.2 dims), and the chunked prefill of
one CSA and one HCA layer through its cache.

Caches are filled directly with N(0, 1) values (unit RMS, as the RMSNormed entries and latents
are), not by a prefill: V4's entry stores hold context // rate entries, its window ring and the
compressors' pending-token rings are full and the decode token sits at position ``context``, as
if ``context`` tokens had passed; V3.2's latent and indexer-key caches hold ``context`` tokens.
Every point runs in a fresh process (:mod:`latentattn.bench.isolated`), so its peak RSS is its
own, and a point whose predicted peak exceeds the memory budget is skipped with the reason.
Each decode point also times its context-dependent part alone (``part_ms``): V4's ``attend``
(compressors, indexer, attention) and, for V3.2, ``bench dsa``'s attention part.
"""

from __future__ import annotations

import dataclasses
import os
import platform
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from latentattn.attention.v4 import V4Attention
from latentattn.bench import dsa
from latentattn.bench.isolated import Result, peak_rss_mib, rss_mib, run_isolated
from latentattn.bench.v4_cost import (
    Cost,
    Rates,
    dsa_step,
    measure_rates,
    mla_weights,
    predicted_seconds,
    v4_step,
    v4_weights,
)
from latentattn.bench.v4_report import Point, V4Report
from latentattn.cache.build import LatentSpec, build_cache
from latentattn.cache.layer import LatentCache
from latentattn.cache.step import Step
from latentattn.cache.v4 import V4LayerKV, v4_layer_cache
from latentattn.config import CSA, HCA, SLIDING, ModelConfig, V4AttentionConfig
from latentattn.kernels.sparse import select_topk, sparse_mqa
from latentattn.model.transformer import Transformer
from latentattn.presets import get_preset
from latentattn.rope import inv_frequencies, yarn_attention_factor
from latentattn.timing import machine_info, time_call

V4_KINDS = {"sliding": SLIDING, "csa": CSA, "hca": HCA}
KINDS = (*V4_KINDS, "dsa", "mla")
CONTEXTS = (4096, 16384, 65536, 131072, 262144, 1048576)
PREFILL = (32768, 131072)
PREFILL_KINDS = ("csa", "hca")
QUICK_CONTEXTS, QUICK_PREFILL, QUICK_CHUNK = (64, 256), (128,), 32
BASE_MIB = 600.0  # a process with torch and latentattn imported, before any tensor (~550 here)
MIB = 1 << 20


@dataclass(frozen=True)
class Setup:
    """The dims a run measures at: V4's (a preset) and V3.2's, and V3.2's index_topk."""

    v4: ModelConfig
    v32: dsa.DSADims
    topk: int


def setup(quick: bool) -> Setup:
    """V4-Flash and V3.2 (top-k 2048, DeepSeek-V3.2-Exp's ``index_topk``), or tiny dims for smoke runs."""
    if quick:
        return Setup(get_preset("tiny-v4"), dsa.TINY_DIMS, 16)
    return Setup(get_preset("deepseek-v4-flash"), dsa.V32_DIMS, 2048)


def step_cost(s: Setup, kind: str, context: int, dtype: torch.dtype) -> dict[str, Cost]:
    if kind in V4_KINDS:
        return v4_step(s.v4, V4_KINDS[kind], context, dtype)
    return dsa_step(s.v32, context, s.topk if kind == "dsa" else None, dtype)


def predicted_mib(s: Setup, kind: str, tokens: int, dtype: torch.dtype, chunk: int = 0) -> float:
    """A rough peak for a point (decode with ``tokens`` cached, or, with ``chunk``, a prefill of
    ``tokens``): the process, the weights, the cache, and the largest transients. Decode: the
    indexer's fp32 logits (H_I x entries, x2 with the top-k keys), an HCA step's (H x entries),
    dense MLA's scores (H x tokens, x3: scores, softmax, mask), the fp32 copy of bf16 index keys.
    Prefill: the chunk's queries (x4: q, normed, rotated, output) and the indexer's logits per
    block of 256 queries x 2048 entries (x3). Used only to skip points that cannot fit; the
    measured peak is reported beside it."""
    elt = torch.finfo(dtype).bits // 8
    if kind in V4_KINDS:
        a = s.v4.attention
        assert isinstance(a, V4AttentionConfig)
        values = v4_weights(s.v4, V4_KINDS[kind]) + a.sliding_window * a.head_dim
        work = 0
        if kind != "sliding":
            e = tokens // a.rate(V4_KINDS[kind])
            values += e * (a.head_dim + (a.index_head_dim if kind == "csa" else 0))
            if not chunk:
                work = 2 * (a.index_n_heads if kind == "csa" else a.n_heads) * e * 4
        if chunk:
            work = 4 * chunk * a.n_heads * a.head_dim * elt
            work += 3 * 256 * a.index_n_heads * 2048 * 4 if kind == "csa" else 0
    else:
        d = s.v32
        values = mla_weights(d) + (tokens + 1) * (d.kv_lora_rank + d.qk_rope_head_dim + d.index_head_dim)
        work = 2 * (d.index_n_heads if kind == "dsa" else 3 * d.n_heads) * tokens * 4
        work += tokens * d.index_head_dim * 4 if elt != 4 else 0
    return BASE_MIB + (values * elt + work) / MIB


def _rate_sizes(quick: bool) -> dict[str, int]:
    return {"n": 256, "copy_mib": 16} if quick else {"n": 2048, "copy_mib": 256}


def _timed(step: Callable[[], object], part: Callable[[], object], repeats: int, quick: bool,
           dtype: torch.dtype) -> Result:
    """Time a decode point's whole step and its part; then record the peak RSS, and only then
    measure the GEMM and copy rates in the same process (their buffers would count in the peak),
    so that a point is predicted from the machine as it was when it ran."""
    setup_rss = rss_mib()
    samples, part_ms = time_call(step, repeats), time_call(part, repeats)
    peak = peak_rss_mib()
    rates = measure_rates((dtype,), **_rate_sizes(quick))
    return {"samples_ms": samples, "part_ms": part_ms, "setup_rss_mib": setup_rss,
            "peak_rss_mib": peak, "rates": {"gemm_flops": rates.gemm_flops, "copy_bytes": rates.copy_bytes}}


def _v4_layer(cfg: ModelConfig, kind: str, dtype: torch.dtype) -> V4Attention:
    a = cfg.attention
    assert isinstance(a, V4AttentionConfig)
    torch.manual_seed(0)
    layer = V4Attention(cfg, a.layer_types.index(V4_KINDS[kind]))
    layer.apply(Transformer._init_weights)
    return layer.to(dtype).eval()


def _fill_v4(cache: V4LayerKV, context: int) -> None:
    """Every ring full and context // rate entries in each store, N(0, 1), filled in place."""
    g = torch.Generator().manual_seed(1)
    cache.window.data.normal_(generator=g)
    for state in (cache.compressor, cache.indexer):
        if state is not None:
            state.kv.data.normal_(generator=g)
            state.gate.data.normal_(generator=g)
            state.entries[:, : context // state.rate].normal_(generator=g)


@torch.no_grad()
def v4_decode(quick: bool, kind: str, context: int, dtype_name: str, repeats: int) -> Result:
    """In a child: one V4 layer's decode step at ``context`` (whole call, and ``attend`` alone)."""
    s, dtype = setup(quick), getattr(torch, dtype_name)
    layer = _v4_layer(s.v4, kind, dtype)
    cache = v4_layer_cache(layer.cache_spec(), 1, context + 1, dtype)
    assert isinstance(cache, V4LayerKV)
    _fill_v4(cache, context)
    step = Step(positions=torch.full((1, 1), context), valid=None, kv_len=context + 1, mask=None)
    x = torch.randn(1, 1, s.v4.dim).to(dtype)
    q, kv, c_q, _ = layer.project(x, step.positions)
    # Each call writes the token at position `context` again (an entry completes only when
    # (context + 1) % rate == 0): every repeat decodes the same state.
    out = _timed(lambda: layer(x, None, step, cache), lambda: layer.attend(x, q, kv, c_q, step, cache),
                 repeats, quick, dtype)
    return {**out, "cache_mib": cache.nbytes / MIB}


def _rope_at(d: dsa.DSADims, position: int) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin (1, 1, d_r / 2) at one position, as RotaryEmbedding's table row holds them
    (without building a 1M-row table)."""
    factor = yarn_attention_factor(d.rope.yarn) if d.rope.yarn is not None else 1.0
    freqs = float(position) * inv_frequencies(d.qk_rope_head_dim, d.rope)
    return (freqs.cos() * factor).view(1, 1, -1), (freqs.sin() * factor).view(1, 1, -1)


@torch.no_grad()
def v32_decode(quick: bool, kind: str, context: int, dtype_name: str, repeats: int) -> Result:
    """In a child: V3.2's DSA (``kind`` "dsa") or dense absorbed MLA ("mla") decode step at
    ``context``, as ``bench dsa`` times them (whole layer call, and the attention part alone)."""
    s, dtype = setup(quick), getattr(torch, dtype_name)
    d = s.v32
    layer = dsa._layer(d, s.topk, context + 1, dtype)
    spec = LatentSpec(d.kv_lora_rank, d.qk_rope_head_dim, d.index_head_dim)
    cache = build_cache([spec], 1, context + 1, dtype)
    cached = cache[0]
    assert isinstance(cached, LatentCache)
    g = torch.Generator().manual_seed(1)
    cached.kv[0, :context].normal_(generator=g)
    cached.index_k[0, :context].normal_(generator=g)
    cache.fill(context)
    step, rope = cache.step(1), _rope_at(d, context)
    x = torch.randn(1, 1, d.dim).to(dtype)
    q, c_q = layer.rotated_query(x, rope)
    assert c_q is not None
    latent = cached.kv[:, :context]
    part: Callable[[], object]
    if kind == "mla":
        layer.mode = "dense"
        dense = dataclasses.replace(step, kv_len=context, mask=torch.ones(1, 1, 1, context, dtype=torch.bool))
        part = lambda: layer.absorbed(q, latent, dense)  # noqa: E731
    else:
        q_i, w = layer.indexer.queries(x, c_q, rope)
        k_i, last = cached.index_k[:, :context].float(), torch.full((1, 1), context - 1)

        def part() -> torch.Tensor:
            idx = select_topk(q_i, w, k_i, last, s.topk, layer.indexer.scale)
            o_lat, _ = sparse_mqa(layer.absorb_query(q), latent, idx, layer.scale, d.kv_lora_rank)
            return layer.unabsorb(o_lat)

    out = _timed(lambda: layer(x, rope, step, cached), part, repeats, quick, dtype)
    return {**out, "cache_mib": cached.nbytes / MIB}


@torch.no_grad()
def v4_prefill(quick: bool, kind: str, tokens: int, chunk: int, dtype_name: str) -> Result:
    """In a child: a ``tokens``-long prompt through one V4 layer in chunks via its cache (random
    hidden states, generated outside the timer); one timed pass."""
    s, dtype = setup(quick), getattr(torch, dtype_name)
    layer = _v4_layer(s.v4, kind, dtype)
    cache = v4_layer_cache(layer.cache_spec(), 1, tokens, dtype)
    g = torch.Generator().manual_seed(2)
    chunk_ms = []
    for s0 in range(0, tokens, chunk):
        n = min(chunk, tokens - s0)
        x = torch.randn(1, n, s.v4.dim, generator=g).to(dtype)
        step = Step(positions=torch.arange(s0, s0 + n)[None], valid=None, kv_len=s0 + n, mask=None)
        t0 = time.perf_counter()
        layer(x, None, step, cache)
        chunk_ms.append((time.perf_counter() - t0) * 1e3)
    return {"samples_ms": [sum(chunk_ms)], "chunk_ms": chunk_ms, "cache_mib": cache.nbytes / MIB}


def _point(phase: str, kind: str, tokens: int, out: Result, predicted_mem: float,
           parts: dict[str, Cost] | None, rates: Rates) -> Point:
    """A Point from a child's result; predicted from the rates the child measured (the run's
    opening ones where it has none)."""
    samples = out.get("samples_ms", [])
    part = out.get("part_ms")
    if "rates" in out:
        rates = Rates(**out["rates"])
    return Point(
        phase=phase, kind=kind, context=tokens,
        median_ms=sorted(samples)[len(samples) // 2] if samples else None, samples_ms=samples,
        part_ms=sorted(part)[len(part) // 2] if part else None,
        gflop=sum(p.flop for p in parts.values()) / 1e9 if parts else None,
        mbytes=sum(p.bytes for p in parts.values()) / 1e6 if parts else None,
        predicted_ms=predicted_seconds(parts, rates) * 1e3 if parts else None,
        predicted_parts_ms={k: p.seconds(rates) * 1e3 for k, p in parts.items()} if parts else None,
        gemm_gflops=rates.gemm_flops[parts["projections"].compute] / 1e9 if parts else None,
        copy_gbps=rates.copy_bytes / 1e9 if parts else None,
        predicted_mib=predicted_mem, peak_rss_mib=out.get("peak_rss_mib"),
        setup_rss_mib=out.get("setup_rss_mib"), cache_mib=out.get("cache_mib"),
        load1=round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None,
        note=out.get("error", ""),
    )


def run_v4_bench(
    contexts: Sequence[int], prefill: Sequence[int], kinds: Sequence[str] = KINDS, chunk: int = 4096,
    repeats: int = 5, dtype: torch.dtype = torch.float32, quick: bool = False,
    budget_mib: float | None = None, progress: Callable[[str], None] | None = None,
    on_point: Callable[[V4Report], None] | None = None,
) -> V4Report:
    """Every decode point (context x kind), then every prefill (length x CSA/HCA), each in a
    fresh process; ``on_point`` sees the report after each point (to write it as it grows)."""
    s, name = setup(quick), str(dtype).removeprefix("torch.")
    budget = budget_mib if budget_mib is not None else (_meminfo("MemAvailable") or float("inf")) * 0.9
    rates = measure_rates((dtype,), n=256 if quick else 2048, copy_mib=16 if quick else 512)
    machine = machine_info()
    machine["cpu_model"], machine["mem_total_mib"] = cpu_model(), _meminfo("MemTotal")
    report = V4Report(
        machine=machine, dims={"v4": s.v4.name, "v3.2": s.v32.name, "v3.2_topk": s.topk},
        dtype=name, rates={"gemm_gflops": {k: v / 1e9 for k, v in rates.gemm_flops.items()},
                           "copy_gbps": rates.copy_bytes / 1e9},
        contexts=list(contexts), prefill=list(prefill), chunk=chunk, kinds=list(kinds),
        budget_mib=budget, quick=quick)
    jobs: list[tuple[str, str, int]] = [("decode", k, c) for c in contexts for k in kinds]
    jobs += [("prefill", k, n) for n in prefill for k in PREFILL_KINDS if k in kinds]
    for phase, kind, tokens in jobs:
        if progress:
            progress(f"{phase} {kind} {tokens:,}")
        mem = predicted_mib(s, kind, tokens, dtype, chunk if phase == "prefill" else 0)
        parts = step_cost(s, kind, tokens, dtype) if phase == "decode" else None
        out: Result
        if mem > budget:
            out = {"error": f"skipped: predicted peak {mem:,.0f} MiB > budget {budget:,.0f} MiB"}
        elif phase == "prefill":
            out = run_isolated(v4_prefill, quick, kind, tokens, chunk, name)
        else:
            fn = v4_decode if kind in V4_KINDS else v32_decode
            out = run_isolated(fn, quick, kind, tokens, name, repeats)
        report.points.append(_point(phase, kind, tokens, out, mem, parts, rates))
        if on_point:
            on_point(report)
    return report


def _meminfo(key: str) -> float | None:
    """A /proc/meminfo field (Linux) in MiB; None elsewhere."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def cpu_model() -> str:
    """The CPU's model name (/proc/cpuinfo), or what platform knows."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


__all__ = ["CONTEXTS", "KINDS", "PREFILL", "Setup", "V4Report", "run_v4_bench", "setup"]
