"""``latentattn.convert_model``: a GQA / MHA / MQA model to MLA in one call, what ``latentattn
convert`` runs. It checks the sizes against the source's config before loading any weight
(:func:`latentattn.calc.converted.resolve_sizes`), calibrates on a text, chooses the rotary
frequency pairs, converts every attention layer (:mod:`latentattn.convert.gqa_to_mla`), reports
the cache bytes per token before and after (the same formula ``latentattn kv-cache
--kv-lora-rank`` prints) and, given ``out``, writes the model whole or not at all."""

from __future__ import annotations

import copy
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from latentattn.calc.converted import (
    ConvertSizes,
    Format,
    RopeMode,
    converted_bytes_per_token_per_layer,
    full_rank,
    resolve_sizes,
    source_attention,
    source_bytes_per_token_per_layer,
)
from latentattn.config import GQAConfig, ModelConfig
from latentattn.convert.calibrate import CALIB_WINDOW, calib_span, calibrate
from latentattn.convert.fit import FitSettings, LayerFit, check_calibration
from latentattn.convert.fit import summary as fit_summary
from latentattn.convert.gqa_to_mla import METHODS, WHITEN_DAMP, Method, Plan, covariance_rank
from latentattn.convert.sequential import convert_and_fit
from latentattn.errors import ConfigError, LatentAttnError
from latentattn.model.transformer import Transformer
from latentattn.tokenizer import Tokenizer, encode_corpus

DEFAULT_CALIB_TOKENS = 4096
BUILTIN = "builtin"  # CPython's pydoc prose (latentattn.data.default_text)

SourceSpec = str | os.PathLike[str] | Transformer


@dataclass
class ConvertResult:
    """What :func:`convert_model` made: the converted ``model`` (fp32, eval mode), the source's
    ``tokenizer`` (None for a Transformer given without one), the resolved ``sizes``, the
    ``plan`` it ran, the KV cache per token over all layers in bf16 ``bytes_before`` (the source)
    and ``bytes_after``, and ``out``, the directory written (None: nothing was written)."""

    model: Transformer
    tokenizer: Tokenizer | None
    source: str
    sizes: ConvertSizes
    plan: Plan
    method: Method
    source_attention: GQAConfig
    full_rank: int
    bytes_before: int
    bytes_after: int
    n_layers: int
    pair_choice: str
    out: Path | None = None
    seconds: float = 0.0
    info: dict[str, Any] = field(default_factory=dict)
    fits: list[LayerFit] = field(default_factory=list)  # local fitting, per layer (none: not fitted)
    notes: list[str] = field(default_factory=list)  # what the user should know (a damped covariance)

    @property
    def kv_lora_rank(self) -> int:
        return self.sizes.kv_lora_rank

    @property
    def rope_dim(self) -> int:
        return self.sizes.rope_dim

    @property
    def ratio(self) -> float:
        """``bytes_after / bytes_before``: 0.5 at the default sizes."""
        return self.bytes_after / self.bytes_before

    @property
    def exact(self) -> bool:
        """Whether the conversion dropped nothing (full rank; every rotary dim of every KV head
        kept as blocks, or a single KV head; no fitted latent norm): its logits then equal the
        source's up to rounding. Otherwise it is an approximation that healing recovers from."""
        s, a = self.sizes, self.source_attention
        every_pair = (s.rope_dim == a.n_kv_heads * a.head_dim if s.rope_mode == "blocks"
                      else a.n_kv_heads == 1)
        return s.kv_lora_rank >= self.full_rank and every_pair and s.format == "latentattn"

    def summary(self) -> list[str]:
        """The lines ``latentattn convert`` prints."""
        s = self.sizes
        a = self.source_attention
        half = a.head_dim // 2
        lines = [
            f"converted {self.source} ({a.name.upper()}, {a.n_kv_heads} KV heads of {a.head_dim}) to MLA: "
            f"latent {s.kv_lora_rank} + rope {s.rope_dim} ({len(self.plan.pairs)} of {half} frequency "
            f"pairs per KV head, {self.pair_choice}), {self.method}"
            + (", sequential calibration" if self.info.get("sequential") else "")
            + (", DeepSeek-V3 format (latent RMSNorm fitted on the calibration text)"
               if s.format == "deepseek" else ""),
            s.line(),
            *([fit_summary(self.fits)] if self.fits else []),
            f"KV cache (bf16, {self.n_layers} layers): {self.bytes_before:,.0f} -> {self.bytes_after:,.0f} "
            f"bytes/token ({self.ratio:.2f}x)"
            + (f"; wrote {self.out}" if self.out is not None else "") + f" in {self.seconds:.1f} s",
        ]
        return lines


def calib_text(calib: str | os.PathLike[str] | None) -> str | None:
    """The calibration text ``calib`` names: a UTF-8 file, ``"builtin"`` (CPython's pydoc
    prose), or None (none)."""
    from latentattn.data import default_text, load_text

    if calib is None:
        return None
    return default_text() if str(calib) == BUILTIN else load_text(Path(calib))


def _check_out(out: str | os.PathLike[str] | None) -> None:
    if out is None:
        return
    dest = Path(out)
    if dest.exists() and (not dest.is_dir() or any(dest.iterdir())):
        raise LatentAttnError(f"{dest} exists and is not an empty directory: choose a new OUT")


def convert_model(src: SourceSpec, *, kv_lora_rank: int | Literal["full"] | None = None,
                  rope_dim: int | Literal["full"] | None = None,
                  calib: str | os.PathLike[str] | None = BUILTIN,
                  method: Method = "pca", rope_mode: RopeMode | None = None,
                  format: Format = "latentattn", out: str | os.PathLike[str] | None = None,
                  calib_tokens: int = DEFAULT_CALIB_TOKENS, tokenizer: Tokenizer | None = None,
                  fit_steps: int = 0, fit_lr: float = 1e-3, sequential: bool = False,
                  calib_seed: int = 0, progress: Callable[[str], None] | None = None) -> ConvertResult:
    """Convert every attention layer of a GQA / MHA / MQA model to multi-head latent attention.

    >>> import latentattn
    >>> r = latentattn.convert_model("smollm2-135m", out="smollm2-mla")  # doctest: +SKIP
    >>> r.kv_lora_rank, r.rope_dim, f"{r.ratio:.2f}x"                   # doctest: +SKIP
    (128, 64, '0.50x')
    >>> model = latentattn.load("smollm2-mla")                          # doctest: +SKIP

    Args:
        src: what ``latentattn.load`` reads (a Llama / Qwen2 / Mistral checkpoint directory, a
            GGUF file, ``smollm2-135m``, a train run, a preset), or a loaded GQA
            :class:`~latentattn.Transformer` (then give ``tokenizer`` to calibrate on a text).
        kv_lora_rank: the latent's rank R, or ``"full"`` (drops nothing). Default: the rank that
            makes the cache half the source's, R + rope_dim = n_kv_heads x head_dim (128 for
            SmolLM2-135M, 896 for Llama-3-8B).
        rope_dim: rotary dims of the cached rope key, or ``"full"``. Default: one head's width,
            kept with TransMLA's RoRoPE (arXiv 2502.07864; measured on SmolLM2-135M at R = 128,
            0.50x the cache: perplexity 45.4 unhealed on Vim's user manual, source 17.7, where
            partial RoPE per head gave about 300). ``"full"`` keeps every rotary dim of every KV
            head as blocks (MHA2MLA, arXiv 2502.14837): exact at full rank, 0.92x at best.
        calib: calibration text: a UTF-8 file, ``"builtin"`` (CPython's pydoc prose) or None.
        method: ``"pca"`` (of the calibration outputs: 45.4 at R = 128 on SmolLM2-135M),
            ``"whitened"`` (SVD of the projections whitened by the damped calibration covariance,
            SVD-LLM V2's; without damping it spans PCA's subspace: 46.2 there) or ``"svd"`` (of
            the weights alone: 3,170 there; needs no calibration).
        rope_mode: ``"rorope"`` or ``"blocks"``; None picks RoRoPE for a head-wide rope key and
            the DeepSeek format, blocks otherwise.
        format: ``"latentattn"`` (a model directory ``latentattn.load`` reads) or ``"deepseek"``
            (a DeepSeek-V3 Hugging Face checkpoint for transformers, vLLM and SGLang: RoRoPE and a
            latent RMSNorm fitted on ``calib``; no attention biases).
        out: a directory to write (must not exist, or be empty), created whole or not at all;
            None writes nothing.
        calib_tokens: calibration tokens (at least 256, one window).
        tokenizer: the tokenizer of a ``src`` given as a Transformer.
        fit_steps: after the closed form, train each attention layer for this many steps to
            reproduce its source layer's output on the calibration inputs, DeepSeek's latent norm
            in place (:mod:`latentattn.convert.fit`); 0 (the default) fits nothing.
        fit_lr: the peak Adam learning rate of that fit (cosine to 0).
        sequential: calibrate (and fit) layer l on the attention inputs the already converted
            layers 0..l-1 give, not the source's (:mod:`latentattn.convert.sequential`). On
            SmolLM2-135M in DeepSeek's format at 0.5x: 396 instead of 636 in closed form, and no
            change once fitted (29.2 against 29.0).
        calib_seed: 0 takes the calibration text's first ``calib_tokens`` tokens; another seed
            a span at a random offset, and seeds the fit's window sampling.
        progress: called with a short line as each layer is fitted.

    Returns:
        a :class:`ConvertResult`: the model, its tokenizer, the sizes and plan, the bytes per
        token before and after.

    Raises:
        LatentAttnError: a bad argument (the same one-line messages ``latentattn convert``
            prints), before any weight is read where the config decides it.
    """
    started = time.perf_counter()
    spec: str | os.PathLike[str] | None = None
    if isinstance(src, Transformer):
        cfg: ModelConfig = src.config
        name = cfg.name
    else:
        from latentattn.loading import load_config

        spec, name = src, str(src)
        cfg = load_config(spec)
    sizes = resolve_sizes(cfg.replace(name=name), kv_lora_rank, rope_dim, rope_mode, format)
    if method not in METHODS:
        raise ConfigError(f"--method must be one of {', '.join(METHODS)}, got {method!r}")
    deepseek = format == "deepseek"
    if deepseek and calib is None:
        raise ConfigError("--format deepseek fits the latent RMSNorm's gains on calibration "
                          "activations: give --calib FILE (or builtin)")
    if method != "svd" and calib is None:
        raise ConfigError(f"--method {method} factors the latent on calibration activations: give --calib "
                          "FILE (or builtin), or --method svd")
    if sequential and calib is None:
        raise ConfigError("--sequential calibrates on the converted layers' outputs: give --calib FILE "
                          "(or builtin)")
    if isinstance(calib_seed, bool) or not isinstance(calib_seed, int) or calib_seed < 0:
        raise ConfigError(f"--calib-seed must be an integer >= 0, got {calib_seed!r}")
    if isinstance(calib_tokens, bool) or not isinstance(calib_tokens, int) or calib_tokens < CALIB_WINDOW:
        raise ConfigError(f"--calib-tokens must be >= {CALIB_WINDOW}, got {calib_tokens}")
    fit = FitSettings(steps=fit_steps, lr=fit_lr)
    if fit.steps and calib is None:
        raise ConfigError("--fit-steps fits each layer on calibration activations: give --calib FILE "
                          "(or builtin)")
    if fit.steps:
        check_calibration(calib_tokens, cfg.max_seq_len)
    _check_out(out)
    text = calib_text(calib)
    if isinstance(src, Transformer):
        # Converted in fp32 like a loaded source; a copy, so the caller's model is left as it was.
        model = src if src.dtype == torch.float32 else copy.deepcopy(src).float()
        if text is not None and tokenizer is None:
            raise ConfigError("calibrating a Transformer needs its tokenizer: give tokenizer=...")
        tok = tokenizer
    else:
        from latentattn.loading import load

        assert spec is not None
        model, tok = load(spec, dtype=torch.float32, with_tokenizer=True)
    ids = None
    if text is not None:
        assert tok is not None
        all_ids = encode_corpus(tok, text)
        if len(all_ids) < calib_tokens:
            raise ConfigError(f"--calib: {calib} has {len(all_ids):,} tokens, fewer than --calib-tokens "
                              f"{calib_tokens:,}; give a longer text or fewer tokens")
        ids = calib_span(all_ids, calib_tokens, calib_seed)
    rorope = sizes.rope_mode == "rorope"
    pairs, inputs = calibrate(model, sizes.rope_dim, ids, rorope=rorope)
    plan = Plan(pairs, sizes.kv_lora_rank, method, sizes.rope_mode, latent_norm=deepseek)
    notes = whitening_notes(inputs) if method == "whitened" and inputs is not None else []
    report = None if progress is None else (
        lambda i, f: progress(f"layer {i}: held-out error {f.before:.4f} -> {f.after:.4f}"))
    mla, fits = convert_and_fit(model, plan, inputs, ids, min(CALIB_WINDOW, cfg.max_seq_len), fit,
                                sequential, report, calib_seed)
    choice = ("RoRoPE, every pair" if rorope else "2-norm on the calibration text" if ids is not None
              else "highest frequencies")
    info = {"source": name, "kv_lora_rank": sizes.kv_lora_rank, "rope_dim": sizes.rope_dim,
            "method": method, "rope_mode": sizes.rope_mode, "pairs": list(pairs), "pair_choice": choice,
            "calib": None if calib is None else str(calib),
            "calib_tokens": calib_tokens if text is not None else 0, "fit_steps": fit.steps,
            "fit_lr": fit.lr if fit.steps else None, "sequential": sequential, "calib_seed": calib_seed,
            "fit": [{"layer": f.layer, "before": f.before, "after": f.after} for f in fits]}
    n = cfg.n_layers
    result = ConvertResult(
        model=mla, tokenizer=tok, source=name, sizes=sizes, plan=plan, method=method,
        source_attention=source_attention(cfg),
        full_rank=full_rank(cfg, sizes.rope_dim, sizes.rope_mode),
        bytes_before=source_bytes_per_token_per_layer(cfg) * n,
        bytes_after=converted_bytes_per_token_per_layer(sizes.kv_lora_rank, sizes.rope_dim) * n,
        n_layers=n, pair_choice=choice, info=info, fits=fits, notes=notes)
    if out is not None:
        if deepseek:
            from latentattn.interop.hf import save_pretrained_dir

            result.out = save_pretrained_dir(mla, out, tok)
        else:
            from latentattn.interop.native import save_native

            result.out = save_native(mla, out, tok, info)
    result.seconds = time.perf_counter() - started
    return result


def whitening_notes(inputs: list[torch.Tensor]) -> list[str]:
    """One line when a layer's calibration covariance is singular (whitening then rests on its
    damping alone): how many layers, the smallest rank, and the damping applied."""
    full = inputs[0].shape[1] + 1
    ranks = [covariance_rank(x) for x in inputs]
    singular = [r for r in ranks if r < full]
    if not singular:
        return []
    return [f"whitened: the calibration covariance is singular in {len(singular)} of {len(ranks)} layers "
            f"(rank {min(singular)} of {full} from {inputs[0].shape[0]:,} calibration tokens: too few "
            f"tokens, or too few distinct ones): damped by {WHITEN_DAMP} x its mean diagonal"]


__all__ = ["BUILTIN", "DEFAULT_CALIB_TOKENS", "ConvertResult", "calib_text", "convert_model"]
