"""``latentattn bench generate``: whole-model generation, batch 1, greedy, from a random prompt of
each context length: latentattn's prefill and decode against transformers' ``generate`` on the
same weights and dtype, and against the memory roofline of this machine.

Both sides are timed the same way, through their own ``generate``: a generation of 1 new token
is the prefill (``t_1``; prefill tokens/s = context / ``t_1``), one of N new tokens adds N - 1
decode steps (decode s/token = (``t_N`` - ``t_1``) / (N - 1)). Each side first runs one untimed
generation of N tokens and one of 1 token (what a first call pays: allocations, oneDNN's
primitive caches, and with ``--compile`` the compile), then ``repeats`` timed pairs; medians.
With ``--compile`` the model is ``latentattn.compile``d once and the cold compile time of a
point is its two first calls' extra time over the warm medians.

The roofline (:mod:`latentattn.bench.generate_report` prints it): a decode step of a batch-1
model reads every weight once (the tied embedding / lm_head once; an untied embedding only its
one looked-up row) and the whole KV cache at that context (the cache's allocated bytes per
token, ``make_cache(1, context).bytes_per_token``, times the context). This machine's read
bandwidth, measured at the start in a fresh process (``torch.sum`` over a 1 GiB fp32 tensor,
well past any L3, best of 5), divided by those bytes is the fastest decode the memory allows.
A MoE model is counted with all its experts (a batch-1 step reads only the routed ones).
"""

from __future__ import annotations

import functools
import shutil
import statistics
import tempfile
import time
import weakref
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from latentattn.bench.isolated import peak_rss_mib, run_isolated
from latentattn.bench.v4 import cpu_model
from latentattn.config import GQAConfig, ModelConfig
from latentattn.model.transformer import Transformer
from latentattn.timing import machine_info

BANDWIDTH_BYTES = 1 << 30  # >= 1 GiB: far past any L3
BANDWIDTH_REPEATS = 5
HF_EXTRA_HINT = "pip install latentattn[hf]"
IMPLS = ("latentattn", "transformers")


# ---------------------------------------------------------------------------- the roofline
def _read_bandwidth(nbytes: int, repeats: int) -> dict[str, Any]:
    x = torch.ones(nbytes // 4, dtype=torch.float32)  # ones: every page touched before timing
    best = float("inf")
    for _ in range(repeats + 1):  # the first sum is a warm-up
        t0 = time.perf_counter()
        torch.sum(x)
        best = min(best, time.perf_counter() - t0)
    return {"bytes_per_s": nbytes / best, "tensor_bytes": nbytes, "repeats": repeats,
            "threads": torch.get_num_threads(),
            "method": f"torch.sum over a {nbytes / (1 << 30):g} GiB fp32 tensor, best of {repeats}"}


def measure_read_bandwidth(nbytes: int = BANDWIDTH_BYTES, repeats: int = BANDWIDTH_REPEATS
                           ) -> dict[str, Any]:
    """This machine's memory read bandwidth (bytes/s), measured in a fresh process (so the 1 GiB
    tensor does not count in this process's peak RSS)."""
    out = run_isolated(_read_bandwidth, nbytes, repeats)
    if "error" in out:
        raise RuntimeError(f"measuring the read bandwidth failed: {out['error']}")
    out.pop("peak_rss_mib", None)
    return out


def weight_bytes_per_token(model: Transformer) -> int:
    """Bytes of weights one batch-1 decode step reads: every parameter once (shared ones, the tied
    embedding / lm_head, once), but of an untied embedding only the one row it looks up."""
    total = sum(p.numel() * p.element_size() for p in model.parameters())  # deduplicated
    if model.lm_head.weight is not model.embed_tokens.weight:  # untied (or decode_layout's copy)
        emb = model.embed_tokens.weight
        total -= emb.numel() * emb.element_size() - emb.shape[1] * emb.element_size()
    return total


def kv_bytes_per_token(model: Transformer, context: int) -> float:
    """The allocated bytes per cached token of a batch-1 cache holding ``context`` tokens."""
    cache = model.make_cache(1, context)
    per_token = cache.bytes_per_token
    del cache
    return per_token


# ---------------------------------------------------------------------------- transformers
def hf_available() -> bool:
    try:
        import transformers  # noqa: F401
    except ImportError:
        return False
    return True


def _llama_config(cfg: ModelConfig) -> dict[str, Any] | str:
    """transformers' Llama config.json for a GQA model, or why Llama cannot hold it."""
    from latentattn.interop.hf_config import rope_to_hf

    a = cfg.attention
    assert isinstance(a, GQAConfig)
    r = cfg.rope
    why = ("it has MoE layers" if cfg.moe is not None else
           "it has hyper-connections" if cfg.hyper is not None else
           "its RoPE is interleaved (Llama rotates half-split pairs)" if r.interleaved else
           "its RoPE is per-KV-head blocks" if r.blocks > 1 or r.pairs else
           "its RoPE covers part of each head" if cfg.rope_dim != a.head_dim else
           "it has biases on q/k/v but not o, or the reverse" if a.qkv_bias != a.o_bias else None)
    if why is not None:
        return f"transformers' Llama cannot hold this GQA model: {why}"
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "vocab_size": cfg.vocab_size, "hidden_size": cfg.dim,
        "intermediate_size": cfg.intermediate_size, "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": a.n_heads, "num_key_value_heads": a.n_kv_heads,
        "head_dim": a.head_dim, "hidden_act": "silu", "rms_norm_eps": cfg.norm_eps,
        "max_position_embeddings": cfg.max_seq_len, "rope_parameters": rope_to_hf(r),
        "tie_word_embeddings": cfg.tie_word_embeddings, "attention_bias": a.qkv_bias,
        "mlp_bias": False, "use_cache": True,
    }


def _save_llama(model: Transformer, hf_config: dict[str, Any], root: Path) -> None:
    import json

    from safetensors.torch import save_file

    tensors = {(k if k == "lm_head.weight" else "model." + k): v.detach().contiguous()
               for k, v in model.state_dict().items()
               if not (k == "lm_head.weight" and model.config.tie_word_embeddings)}
    save_file(tensors, str(root / "model.safetensors"), metadata={"format": "pt"})
    config = {**hf_config, "dtype": str(model.dtype).removeprefix("torch.")}
    (root / "config.json").write_text(json.dumps(config, indent=2))


def to_transformers(model: Transformer) -> tuple[Any, str]:
    """(transformers' own model holding ``model``'s weights in its dtype, what it is), through a
    checkpoint directory: a Llama one for GQA models, DeepSeek's (``latentattn.save_pretrained``)
    for MLA, DSA and V4. Raises ValueError (with the reason) where transformers cannot run it."""
    import transformers
    from transformers import AutoModelForCausalLM

    from latentattn.errors import LatentAttnError

    # The directory lives as long as the model: transformers may map the safetensors file.
    tmp = tempfile.mkdtemp(prefix="latentattn-bench-generate-")
    try:
        root = Path(tmp)
        if isinstance(model.config.attention, GQAConfig):
            hf_config = _llama_config(model.config)
            if isinstance(hf_config, str):
                raise ValueError(hf_config)
            _save_llama(model, hf_config, root)
        else:
            from latentattn.interop.hf import save_pretrained

            try:
                save_pretrained(model, root)
            except LatentAttnError as e:
                raise ValueError(f"transformers' DeepSeek models cannot hold it: {e}") from None
        hf_logging = transformers.utils.logging
        verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()  # its loading bar: the bench has its own
        try:
            hf = AutoModelForCausalLM.from_pretrained(root, dtype=model.dtype)
        except Exception as e:  # an architecture this transformers lacks, a config it refuses
            raise ValueError(f"transformers {transformers.__version__} cannot load it: "
                             f"{' '.join(str(e).split())[:200]}") from None
        finally:
            hf_logging.set_verbosity(verbosity)
            if bars:
                hf_logging.enable_progress_bar()
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    weakref.finalize(hf, shutil.rmtree, tmp, ignore_errors=True)
    attn = getattr(hf.config, "_attn_implementation", None) or "default"
    return hf.eval(), f"{type(hf).__name__} (attn_implementation={attn})"


def hf_generate(hf: Any, prompt: torch.Tensor, n: int) -> torch.Tensor:
    """Greedy, exactly ``n`` new tokens (no EOS stop)."""
    with torch.no_grad():
        out: torch.Tensor = hf.generate(
            prompt, attention_mask=torch.ones_like(prompt), do_sample=False, max_new_tokens=n,
            min_new_tokens=n, eos_token_id=None, pad_token_id=0)
    return out


# ---------------------------------------------------------------------------- one measurement
@dataclass
class Timing:
    """One implementation at one context: medians of ``repeats`` timed generations of 1 token
    (``t1_s``) and of N tokens (``tn_s``), the first (untimed) calls, and what follows from them.
    ``decode_tok_s`` is None (with a ``note``) when t_N did not exceed t_1 (noise)."""

    impl: str
    t1_s: list[float]
    tn_s: list[float]
    first_tn_s: float
    first_t1_s: float
    prefill_s: float
    prefill_tok_s: float
    decode_s_per_token: float | None
    decode_tok_s: float | None
    compile_s: float | None = None
    roofline_fraction: float | None = None
    tokens: list[int] = field(default_factory=list)  # the new tokens of the warm-up generation
    note: str = ""


def time_generation(impl: str, gen: Callable[[int], torch.Tensor], context: int, new_tokens: int,
                    repeats: int, compiled: bool = False) -> Timing:
    """Time ``gen(n)`` (a generation of n new tokens from the point's prompt); see the module
    docstring."""
    def timed(n: int) -> tuple[float, torch.Tensor]:
        t0 = time.perf_counter()
        out = gen(n)
        return time.perf_counter() - t0, out

    first_tn, out = timed(new_tokens)
    first_t1, _ = timed(1)
    t1s: list[float] = []
    tns: list[float] = []
    for _ in range(repeats):
        t1s.append(timed(1)[0])
        tns.append(timed(new_tokens)[0])
    t1, tn = statistics.median(t1s), statistics.median(tns)
    step = (tn - t1) / (new_tokens - 1)
    note = "" if step > 0 else "t_N <= t_1 (timing noise): no decode rate; raise --new-tokens"
    return Timing(
        impl=impl, t1_s=t1s, tn_s=tns, first_tn_s=first_tn, first_t1_s=first_t1, prefill_s=t1,
        prefill_tok_s=context / t1, decode_s_per_token=step if step > 0 else None,
        decode_tok_s=1 / step if step > 0 else None,
        compile_s=max(0.0, first_tn - tn) + max(0.0, first_t1 - t1) if compiled else None,
        tokens=[int(t) for t in out[0, context:]], note=note)


# ---------------------------------------------------------------------------- the report
@dataclass
class ModelEntry:
    """One ``--model``: what it is and the bytes a decode step reads besides the cache."""

    spec: str
    name: str
    attention: str
    parameters: int
    max_seq_len: int
    weight_bytes_per_token: int
    tied_embeddings: bool
    moe: bool
    transformers: str | None  # what ran on transformers' side; None: it did not
    transformers_note: str = ""
    peak_rss_mib: float | None = None  # this process's high-water mark after this model (cumulative)


@dataclass
class Point:
    model: str
    context: int
    kv_bytes_per_token: float
    kv_bytes: float
    bytes_per_token: float  # weights + KV cache at this context: one decode step's reads
    roofline_tok_s: float
    latentattn: Timing | None = None
    transformers: Timing | None = None
    tokens_agree: int | None = None  # leading new tokens equal on both sides (same weights check)

    def ratio(self) -> float | None:
        """latentattn decode tokens/s over transformers'."""
        ours, theirs = self.latentattn, self.transformers
        if ours is None or theirs is None or ours.decode_tok_s is None or theirs.decode_tok_s is None:
            return None
        return ours.decode_tok_s / theirs.decode_tok_s


@dataclass
class GenerateReport:
    machine: dict[str, Any]
    dtype: str
    compiled: bool
    new_tokens: int
    repeats: int
    seed: int
    contexts: list[int]
    bandwidth: dict[str, Any]
    models: list[ModelEntry] = field(default_factory=list)
    points: list[Point] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        for p, raw in zip(self.points, d["points"], strict=True):
            raw["decode_ratio_vs_transformers"] = p.ratio()
        return d


def generate_machine_info() -> dict[str, Any]:
    """:func:`latentattn.timing.machine_info` with the CPU's model name and its bf16 flags."""
    from latentattn.precision import cpu_bf16

    info = machine_info()
    bf16 = cpu_bf16()
    info.update(cpu_model=cpu_model(), native_bf16=bf16.native, bf16_flags=list(bf16.flags))
    return info


def new_report(contexts: Sequence[int], new_tokens: int, repeats: int, dtype: torch.dtype,
               compiled: bool, seed: int, bandwidth: dict[str, Any]) -> GenerateReport:
    return GenerateReport(machine=generate_machine_info(), dtype=str(dtype).removeprefix("torch."),
                          compiled=compiled, new_tokens=new_tokens, repeats=repeats, seed=seed,
                          contexts=list(contexts), bandwidth=bandwidth)


def model_entry(spec: str, model: Transformer) -> ModelEntry:
    cfg = model.config
    return ModelEntry(spec=spec, name=cfg.name, attention=cfg.attention.kind,
                      parameters=model.num_parameters(), max_seq_len=cfg.max_seq_len,
                      weight_bytes_per_token=weight_bytes_per_token(model),
                      tied_embeddings=cfg.tie_word_embeddings, moe=cfg.moe is not None,
                      transformers=None)


def prompt_ids(vocab_size: int, context: int, seed: int) -> torch.Tensor:
    """(1, context) random token ids, the same for a seed and context."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + context)
    return torch.randint(0, vocab_size, (1, context), generator=g)


def run_model(report: GenerateReport, spec: str, model: Transformer, hf: Any | None,
              progress: Callable[[str], None] | None = None,
              on_point: Callable[[GenerateReport], None] | None = None) -> None:
    """Measure one model (already loaded, compiled if the report says so; ``hf`` its transformers
    twin or None) at every context of the report, appending its points."""
    entry = next(m for m in report.models if m.spec == spec)
    bw = report.bandwidth["bytes_per_s"]
    n = report.new_tokens
    for context in report.contexts:
        kv = kv_bytes_per_token(model, context)
        total = entry.weight_bytes_per_token + kv * context
        point = Point(model=spec, context=context, kv_bytes_per_token=kv, kv_bytes=kv * context,
                      bytes_per_token=total, roofline_tok_s=bw / total)
        report.points.append(point)
        prompt = prompt_ids(model.config.vocab_size, context, report.seed)
        if progress:
            progress(f"{spec} {context:,} latentattn")
        point.latentattn = time_generation(
            "latentattn", functools.partial(model.generate, prompt), context, n, report.repeats,
            compiled=report.compiled)
        if hf is not None:
            if progress:
                progress(f"{spec} {context:,} transformers")
            point.transformers = time_generation(
                "transformers", functools.partial(hf_generate, hf, prompt), context, n, report.repeats)
            ours, theirs = point.latentattn.tokens, point.transformers.tokens
            point.tokens_agree = next((i for i, (a, b) in enumerate(zip(ours, theirs, strict=True))
                                       if a != b), len(ours))
        for t in (point.latentattn, point.transformers):
            if t is not None and t.decode_tok_s is not None:
                t.roofline_fraction = t.decode_tok_s / point.roofline_tok_s
        if on_point:
            on_point(report)
    entry.peak_rss_mib = peak_rss_mib()


__all__ = [
    "BANDWIDTH_BYTES", "GenerateReport", "ModelEntry", "Point", "Timing", "hf_available",
    "hf_generate", "kv_bytes_per_token", "measure_read_bandwidth", "model_entry", "new_report",
    "prompt_ids", "run_model", "time_generation", "to_transformers", "weight_bytes_per_token",
]
