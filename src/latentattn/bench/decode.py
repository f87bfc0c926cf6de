"""Time one decode step of one attention layer: MHA, GQA-8, MLA naive, MLA absorbed, and
transformers' ``DeepseekV3Attention`` holding the same weights and the same latent cache.

One decode step = one new token per row with ``context`` tokens already cached. Caches are filled
directly (no prefill: transformers' eager 16k prefill would materialise ~17 GB of scores), every
repeat decodes at the same context (the cache is rolled back after each call), and only the
layer call is timed: the step plan, RoPE tables and masks are per model, not per layer, and are
built outside the timer for every variant alike.
"""

from __future__ import annotations

import gc
import os
import statistics
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from latentattn.attention import GroupedQueryAttention, MultiHeadLatentAttention
from latentattn.cache.build import build_cache
from latentattn.config import GQAConfig, MLAConfig, ModelConfig, RopeConfig, YarnConfig
from latentattn.errors import LatentAttnError
from latentattn.rope import RotaryEmbedding
from latentattn.timing import ReportHeader, machine_info, median_of, time_call

VARIANTS: tuple[str, ...] = ("mha", "gqa-8", "mla-naive", "mla-absorb", "transformers")
HF_EXTRA_HINT = "pip install latentattn[hf]"
FILL_CHUNK = 2048  # tokens per row projected at a time when filling caches (bounds memory)


@dataclass(frozen=True)
class BenchDims:
    """Attention dims of the benchmarked layer (default: DeepSeek-V2-Lite's)."""

    name: str
    dim: int
    n_heads: int
    kv_lora_rank: int
    qk_nope_head_dim: int
    qk_rope_head_dim: int
    v_head_dim: int
    rope: RopeConfig
    gqa_kv_heads: int = 8

    @property
    def head_dim(self) -> int:
        """Head dim of the MHA/GQA peers: MLA's value head dim, so outputs have the same width."""
        return self.v_head_dim


V2_LITE_DIMS = BenchDims(
    name="deepseek-v2-lite", dim=2048, n_heads=16, kv_lora_rank=512, qk_nope_head_dim=128,
    qk_rope_head_dim=64, v_head_dim=128,
    rope=RopeConfig(theta=10000.0, interleaved=True,
                    yarn=YarnConfig(factor=40, original_max_position_embeddings=4096, beta_fast=32,
                                    beta_slow=1, mscale=0.707, mscale_all_dim=0.707)),
)
# For tests: same structure, small enough to run in a second.
TINY_DIMS = BenchDims(
    name="tiny", dim=64, n_heads=4, kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8,
    v_head_dim=16, rope=V2_LITE_DIMS.rope, gqa_kv_heads=2,
)


def variant_config(dims: BenchDims, variant: str, capacity: int) -> ModelConfig:
    """A one-layer ModelConfig whose attention is the variant's."""
    attention: GQAConfig | MLAConfig
    if variant == "mha":
        attention = GQAConfig(dims.n_heads, dims.n_heads, dims.head_dim)
    elif variant.startswith("gqa"):
        attention = GQAConfig(dims.n_heads, dims.gqa_kv_heads, dims.head_dim)
    else:
        attention = MLAConfig(
            n_heads=dims.n_heads, q_lora_rank=None, kv_lora_rank=dims.kv_lora_rank,
            qk_nope_head_dim=dims.qk_nope_head_dim, qk_rope_head_dim=dims.qk_rope_head_dim,
            v_head_dim=dims.v_head_dim, impl="naive" if variant == "mla-naive" else "absorb",
        )
    return ModelConfig(name=f"bench-{variant}", vocab_size=256, dim=dims.dim, n_layers=1,
                       attention=attention, intermediate_size=1, rope=dims.rope,
                       max_seq_len=capacity)


def _init_(module: torch.nn.Module, seed: int) -> None:
    # Transformer._init_weights' std 0.02, seeded so every MLA variant gets the same weights.
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if "norm" not in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.02)


@dataclass
class Result:
    variant: str
    batch: int
    context: int
    median_ms: float
    samples_ms: list[float]
    repeats: int
    cache_bytes_allocated: int
    bytes_per_token_per_layer: float
    attn_implementation: str | None = None
    max_abs_diff_vs_ours: float | None = None
    max_rel_diff_vs_ours: float | None = None


@dataclass
class BenchReport(ReportHeader):
    contexts: list[int]
    batches: list[int]
    variants: list[str]
    results: list[Result] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def median(self, variant: str, batch: int, context: int) -> float | None:
        return median_of(self.results, variant=variant, batch=batch, context=context)

    def speedups(self) -> dict[str, dict[str, float]]:
        """``{"b{batch}_ctx{context}": {"absorb_vs_naive": x, "absorb_vs_transformers": y}}``."""
        out: dict[str, dict[str, float]] = {}
        for b in self.batches:
            for c in self.contexts:
                absorb = self.median("mla-absorb", b, c)
                if absorb is None:
                    continue
                entry: dict[str, float] = {}
                for peer, key in (("mla-naive", "absorb_vs_naive"),
                                  ("transformers", "absorb_vs_transformers"),
                                  ("mha", "absorb_vs_mha"), ("gqa-8", "absorb_vs_gqa_8")):
                    other = self.median(peer, b, c)
                    if other is not None:
                        entry[key] = other / absorb
                out[f"b{b}_ctx{c}"] = entry
        return out

    def as_dict(self) -> dict[str, Any]:
        return {
            "machine": self.machine, "dims": self.dims, "dtype": self.dtype,
            "contexts": self.contexts, "batches": self.batches, "variants": self.variants,
            "results": [asdict(r) for r in self.results], "speedups": self.speedups(),
            "notes": self.notes,
        }


def hf_available() -> bool:
    try:
        import transformers.models.deepseek_v3.modeling_deepseek_v3  # noqa: F401
    except ImportError:
        return False
    return True


def _latents(mla: MultiHeadLatentAttention, rotary: RotaryEmbedding, batch: int, context: int,
             dtype: torch.dtype, seed: int) -> torch.Tensor:
    """What the latent cache holds after a real prefill of random hidden states: (B, S, d_c + d_r)
    of normalised c and rotated k_rope, projected chunk by chunk through the layer's own weights."""
    g = torch.Generator().manual_seed(seed)
    a = mla.cfg
    out = torch.empty(batch, context, a.kv_lora_rank + a.qk_rope_head_dim, dtype=dtype)
    for start in range(0, context, FILL_CHUNK):
        n = min(FILL_CHUNK, context - start)
        x = torch.randn(batch, n, mla.kv_a_proj_with_mqa.in_features, generator=g).to(dtype)
        pos = torch.arange(start, start + n).expand(batch, n)
        c, k_rope = mla.project_latent(x, rotary(pos))
        out[:, start : start + n] = torch.cat((c, k_rope), dim=-1)
    return out


def _hf_layer(dims: BenchDims, capacity: int, dtype: torch.dtype) -> tuple[Any, Any, str]:
    """transformers' DeepseekV3Attention at our dims, from a one-layer DeepseekV3Model so its
    attention implementation is whatever transformers picks by default on this machine."""
    from transformers import DeepseekV3Config
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3Model

    y = dims.rope.yarn
    rope_parameters: dict[str, Any] = {"rope_type": "default", "rope_theta": dims.rope.theta}
    if y is not None:
        rope_parameters = {
            "rope_type": "yarn", "rope_theta": dims.rope.theta, "factor": float(y.factor),
            "original_max_position_embeddings": y.original_max_position_embeddings,
            "beta_fast": float(y.beta_fast), "beta_slow": float(y.beta_slow),
            "mscale": float(y.mscale), "mscale_all_dim": float(y.mscale_all_dim),
        }
    cfg = DeepseekV3Config(
        vocab_size=256, hidden_size=dims.dim, intermediate_size=8, num_hidden_layers=1,
        first_k_dense_replace=1, num_attention_heads=dims.n_heads,
        num_key_value_heads=dims.n_heads, q_lora_rank=None, kv_lora_rank=dims.kv_lora_rank,
        qk_nope_head_dim=dims.qk_nope_head_dim, qk_rope_head_dim=dims.qk_rope_head_dim,
        v_head_dim=dims.v_head_dim, max_position_embeddings=max(capacity, 4096),
        rope_interleave=dims.rope.interleaved, rope_parameters=rope_parameters,
    )
    model: Any = DeepseekV3Model(cfg)
    model = model.to(dtype).eval()
    return model.layers[0].self_attn, model.rotary_emb, str(model.config._attn_implementation)


def _to_hf_rope_layout(k_rope: torch.Tensor) -> torch.Tensor:
    # transformers 5 rotates interleaved pairs but writes evens then odds (rope.py docstring):
    # the same dot products, a permuted stored layout.
    return torch.cat((k_rope[..., 0::2], k_rope[..., 1::2]), dim=-1)


def run_decode_bench(
    contexts: Sequence[int] = (1024, 2048, 4096, 8192, 16384),
    batches: Sequence[int] = (1, 8),
    repeats: int = 5,
    dtype: torch.dtype = torch.float32,
    include_hf: bool = True,
    dims: BenchDims = V2_LITE_DIMS,
    seed: int = 0,
    progress: Callable[[str], None] | None = None,
) -> BenchReport:
    """Measure every variant at every (batch, context); see the module docstring."""
    if not contexts or not batches:
        raise LatentAttnError("bench decode needs at least one context and one batch size")
    if min(contexts) < 1 or min(batches) < 1 or repeats < 1:
        raise LatentAttnError("contexts, batches and repeats must be positive")
    if include_hf and not hf_available():
        raise LatentAttnError(
            f"transformers is not installed ({HF_EXTRA_HINT}); pass --no-hf to skip that peer"
        )
    variants = [v for v in VARIANTS if include_hf or v != "transformers"]
    variants = [v.replace("gqa-8", f"gqa-{dims.gqa_kv_heads}") for v in variants]
    capacity = max(contexts) + 1
    report = BenchReport(
        machine=machine_info(), dims={**asdict(dims), "gqa_kv_heads": dims.gqa_kv_heads},
        dtype=str(dtype).removeprefix("torch."), contexts=list(contexts), batches=list(batches),
        variants=variants,
    )
    report.notes.append(
        "one decode step (1 new token per row) of one attention layer, cache holding `context` "
        "tokens; median of `repeats` timed calls after warmup; step plan/RoPE/mask built outside "
        "the timer for every variant"
    )

    # Weights: one seeded set per family, shared by MLA naive, MLA absorb and transformers.
    layers: dict[str, tuple[torch.nn.Module, RotaryEmbedding]] = {}
    for v in variants:
        if v == "transformers":
            continue
        cfg = variant_config(dims, v, capacity)
        layer: torch.nn.Module = (MultiHeadLatentAttention(cfg) if v.startswith("mla")
                                  else GroupedQueryAttention(cfg))
        _init_(layer, seed + (1 if v.startswith("mla") else 2))
        layers[v] = (layer.to(dtype).eval(), RotaryEmbedding(cfg.rope_dim, cfg.rope, capacity))
    mla_absorb, rotary = layers["mla-absorb"]
    assert isinstance(mla_absorb, MultiHeadLatentAttention)
    hf_attn = hf_rotary = None
    impl = ""
    if include_hf:
        hf_attn, hf_rotary, impl = _hf_layer(dims, capacity, dtype)
        hf_attn.load_state_dict(mla_absorb.state_dict())
        report.notes.append(f"transformers DeepseekV3Attention, attn_implementation={impl}")

    with torch.no_grad():
        for b in batches:
            for ctx in contexts:
                g = torch.Generator().manual_seed(seed + 7 * ctx + b)
                x = (torch.randn(b, 1, dims.dim, generator=g)).to(dtype)
                latent = _latents(mla_absorb, rotary, b, ctx, dtype, seed + ctx + b)
                ours_out: torch.Tensor | None = None
                for v in variants:
                    if progress is not None:
                        progress(f"{v} b={b} ctx={ctx}")
                    # Each variant's cache is local to its call and freed on return (by
                    # refcount): naive MLA at 16k x 8 fp32 is ~2.7 GB, transformers'
                    # re-expansion a few GB more, so they must not coexist.
                    if v == "transformers":
                        r = _bench_hf(hf_attn, hf_rotary, x, latent, ctx, repeats, impl, ours_out)
                    else:
                        r, out = _bench_ours(v, *layers[v], x, latent, ctx, repeats, dtype)
                        if v == "mla-absorb":
                            ours_out = out
                    report.results.append(r)
                del latent, ours_out
                gc.collect()
    if hasattr(os, "getloadavg"):
        report.machine["loadavg_1_5_15_at_end"] = [round(x, 2) for x in os.getloadavg()]
    return report


def _bench_ours(variant: str, layer: torch.nn.Module, rotary: RotaryEmbedding, x: torch.Tensor,
                latent: torch.Tensor, ctx: int, repeats: int, dtype: torch.dtype
                ) -> tuple[Result, torch.Tensor]:
    b = x.shape[0]
    assert isinstance(layer, (GroupedQueryAttention, MultiHeadLatentAttention))
    cache = build_cache([layer.cache_spec()], b, ctx + 1, dtype)
    lc = cache[0]
    if lc.holds("latent"):
        lc.latent.buffers[0][:, :ctx] = latent
    elif isinstance(layer, MultiHeadLatentAttention):
        a = layer.cfg
        keys, values = lc.keys.buffers[0], lc.values.buffers[0]
        for s in range(0, ctx, FILL_CHUNK):  # decompress the same latents, chunk by chunk
            e = min(s + FILL_CHUNK, ctx)
            c, k_rope = latent[:, s:e].split([a.kv_lora_rank, a.qk_rope_head_dim], -1)
            keys[:, s:e], values[:, s:e] = layer.decompress(c, k_rope)
    else:
        g = torch.Generator().manual_seed(ctx + b)
        for buf in lc.buffers:  # unit-variance keys/values: timing does not depend on values
            for s in range(0, ctx, FILL_CHUNK):
                chunk = buf[:, s : min(s + FILL_CHUNK, ctx)]
                chunk.copy_(torch.randn(chunk.shape, generator=g))
    cache.fill(ctx)
    step = cache.step(1)  # the same plan every repeat: lengths never move (rolled back below)
    rope = rotary(step.positions)
    out: list[torch.Tensor] = []

    def call() -> None:
        out.append(layer(x, rope, step, lc))

    def rollback() -> None:
        cache.fill(ctx)  # the layer wrote position ctx; the next call overwrites it
        del out[:-1]

    samples = time_call(call, repeats, rollback)
    result = Result(
        variant=variant, batch=b, context=ctx, median_ms=statistics.median(samples),
        samples_ms=samples, repeats=len(samples), cache_bytes_allocated=cache.nbytes,
        bytes_per_token_per_layer=cache.bytes_per_token_per_layer,
    )
    return result, out[-1]


def _bench_hf(attn: Any, rotary: Any, x: torch.Tensor, latent: torch.Tensor, ctx: int,
              repeats: int, impl: str, ours: torch.Tensor | None) -> Result:
    from transformers.cache_utils import DynamicCache

    b = x.shape[0]
    d_c = attn.kv_lora_rank
    cache = DynamicCache()
    # The cache holds exactly what ours holds: c (B, 1, S, d_c) and k_rot (B, 1, S, d_r).
    cache.update(latent[..., :d_c].unsqueeze(1).clone(),
                 _to_hf_rope_layout(latent[..., d_c:]).unsqueeze(1).contiguous(), 0)
    position_ids = torch.full((b, 1), ctx, dtype=torch.long)
    position_embeddings = rotary(x, position_ids)
    out: list[torch.Tensor] = []

    def call() -> None:
        # attention_mask None: one query at the newest position sees every cached key. For
        # sdpa that is what transformers' mask builder passes itself (_ignore_causal_mask_sdpa
        # skips the mask when query_length == 1); for eager it would be an all-zero mask.
        out.append(attn(x, position_embeddings, None, past_key_values=cache)[0])

    def rollback() -> None:
        cache.crop(-1)
        del out[:-1]

    samples = time_call(call, repeats, rollback)
    abs_diff = rel_diff = None
    if ours is not None:
        diff = (out[-1].float() - ours.float()).abs().max().item()
        abs_diff = diff
        rel_diff = diff / max(ours.float().abs().max().item(), 1e-30)
    hf_layer: Any = cache.layers[0]
    nbytes = sum(t.numel() * t.element_size() for t in (hf_layer.keys, hf_layer.values))
    seq = cache.get_seq_length()
    return Result(
        variant="transformers", batch=b, context=ctx, median_ms=statistics.median(samples),
        samples_ms=samples, repeats=len(samples), cache_bytes_allocated=nbytes,
        bytes_per_token_per_layer=nbytes / (b * seq), attn_implementation=impl,
        max_abs_diff_vs_ours=abs_diff, max_rel_diff_vs_ours=rel_diff,
    )


def plot_report(report: BenchReport, path: str) -> None:
    """Decode-step ms vs context, log-log, one line per variant, one panel per batch size."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(report.batches)
    fig, axes = plt.subplots(1, n, figsize=(6 * n, 4.5), squeeze=False)
    for ax, b in zip(axes[0], report.batches, strict=True):
        for v in report.variants:
            pts = sorted((r.context, r.median_ms) for r in report.results
                         if r.variant == v and r.batch == b)
            if pts:
                ax.plot(*zip(*pts, strict=True), marker="o", label=v)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("cached context (tokens)")
        ax.set_ylabel("decode step of one layer (ms)")
        ax.set_title(f"batch {b}, {report.dtype}, dims {report.dims['name']}")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, format="png", dpi=110)
    plt.close(fig)


def headline(report: BenchReport) -> str:
    """One line: absorb vs naive vs transformers at the largest context, per batch size."""
    ctx = max(report.contexts)
    parts = []
    for b in report.batches:
        ms = {v: report.median(v, b, ctx) for v in ("mla-absorb", "mla-naive", "transformers")}
        shown = ", ".join(f"{v} {m:,.2f} ms" for v, m in ms.items() if m is not None)
        parts.append(f"batch {b}: {shown}")
    return f"context {ctx:,}: " + "; ".join(parts)
