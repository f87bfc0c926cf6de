"""``latentattn convert``: a GQA / MHA / MQA model (a Llama-family checkpoint, a GGUF file, a
train run, ...) to MLA, saved as a latentattn model directory that ``latentattn.load`` reads or as
a DeepSeek-V3 checkpoint. A thin wrapper of :func:`latentattn.convert_model`
(:mod:`latentattn.convert.api`), which holds the recipe."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from latentattn.calc.converted import METHODS
from latentattn.cli.common import PROG, size_flags
from latentattn.convert.api import BUILTIN, DEFAULT_CALIB_TOKENS
from latentattn.convert.api import calib_text as _calib_text

NONE = "none"  # --calib none: no calibration (weight SVD, highest-frequency pairs)

# What the defaults measured (docs/results.md, "SmolLM2-135M converted to MLA, and healed"): one
# sentence each.
QUALITY = ("At the defaults SmolLM2-135M (3 KV heads of 64; R = 128, RoRoPE rope 64: 0.50x its cache) "
           "measured perplexity 45.4 unhealed on Vim's user manual against the source's 17.7; in "
           "DeepSeek's format 636 converted, 29.0 with --fit-steps 200 and 24.1 after a further "
           "230-step heal.")
METHOD_QUALITY = ("on SmolLM2-135M at R = 128 (0.5x the cache) pca measured perplexity 45.4, whitened "
                  "46.2 and svd 3,170 (source 17.7)")


FIT_HINT = ("DeepSeek's latent RMSNorm costs the most before any heal: --fit-steps 200 fits each layer "
            "to its source with the norm in place (SmolLM2-135M at 0.5x the cache: perplexity 29.0 "
            "against 636 without; about 5 min on 2 cores)")


def calib_text(arg: str | None) -> str | None:
    """The calibration text --calib names: a file, ``builtin`` (CPython's pydoc prose), or none."""
    return None if arg is None or arg == NONE else _calib_text(arg)


def parse_format(text: str) -> str:
    """``--format``: latentattn or deepseek; ``native`` is the deprecated spelling of latentattn."""
    if text == "native":
        print(f"{PROG}: --format native is deprecated; use --format latentattn (it will be removed in 0.3)",
              file=sys.stderr)
        return "latentattn"
    if text not in ("latentattn", "deepseek"):
        raise argparse.ArgumentTypeError(f"invalid choice: {text!r} (choose from latentattn, deepseek)")
    return text


def cmd_convert(args: argparse.Namespace) -> int:
    from latentattn.convert.api import convert_model

    calib = None if args.calib == NONE else args.calib
    rank, rope = size_flags(args)
    result = convert_model(args.src, kv_lora_rank=rank, rope_dim=rope, calib=calib, method=args.method,
                           rope_mode=args.rope_mode, format=args.format, out=args.out,
                           calib_tokens=args.calib_tokens, fit_steps=args.fit_steps, fit_lr=args.fit_lr,
                           sequential=args.sequential, calib_seed=args.calib_seed,
                           progress=None if args.quiet else lambda line: print(line, file=sys.stderr))
    for note in result.notes:
        print(f"{PROG}: {note}", file=sys.stderr)
    if args.format == "deepseek" and not args.fit_steps and not result.exact:
        print(f"{PROG}: {FIT_HINT}", file=sys.stderr)
    print("\n".join(result.summary()))
    if not result.exact:
        print("below full rank or rope the model is an approximation: heal it with "
              f"`latentattn train --model {result.out} --teacher {args.src} --trainable attention "
              "--lr 3e-4 --data FILE --out DIR`", file=sys.stderr)
    return 0


def add_calibration_flags(p: argparse.ArgumentParser) -> None:
    """--sequential and --calib-seed, for convert and bench convert."""
    p.add_argument("--sequential", action="store_true",
                   help="calibrate (and fit) layer l on the attention inputs the already converted "
                   "layers 0..l-1 give, not the source's (GPTQ's order; off by default)")
    p.add_argument("--calib-seed", type=int, default=0, metavar="N",
                   help="which --calib-tokens of --calib: 0 (default) the first, another seed a span "
                   "at a random offset; also seeds the fit's sampling")


def register(sub: Any) -> None:
    p = sub.add_parser(
        "convert", help="convert a GQA / MHA / MQA model's attention to MLA",
        description="Convert every attention layer of SRC (any GQA, MHA or MQA model latentattn.load "
        "reads: a Llama / Qwen2 / Mistral checkpoint, a GGUF file, smollm2-135m, a train run) to "
        "multi-head latent attention and save it to OUT (a new directory, written whole or not at "
        "all; load it with latentattn.load or --model OUT); latentattn.convert_model does the same "
        "in Python. Each token's cache keeps a --rope-dim rotary key and a --kv-lora-rank latent "
        "that the rest of the keys and the values are decompressed from. The defaults halve the "
        "source's cache: the rope key one head wide, mixed from the KV heads by TransMLA's RoRoPE "
        "(arXiv 2502.07864), and the rank that makes latent + rope = KV heads x head_dim, PCA on "
        "--calib builtin; the line 'kv-lora-rank R, rope-dim D: 0.50x the source's cache' says "
        "what was chosen. " + QUALITY + " --rope-dim full keeps every rotary dim of every KV head "
        "as blocks (MHA2MLA, arXiv 2502.14837; with --kv-lora-rank full the converted model's "
        "logits equal the source's, but the cache shrinks little: 0.92x for SmolLM2 at R = 160). "
        "--format deepseek writes a DeepSeek-V3 Hugging Face checkpoint (transformers' "
        "DeepseekV3ForCausalLM, vLLM, SGLang) with RoRoPE and DeepSeek's RMSNorm on the latent, "
        "its gains fitted on --calib. Heal an approximate conversion with latentattn train "
        "--teacher SRC.")
    p.add_argument("src", metavar="SRC", help="the GQA / MHA / MQA model")
    p.add_argument("out", metavar="OUT", help="output directory (must not exist, or be empty)")
    p.add_argument("--kv-lora-rank", default=None, metavar="R|full",
                   help="latent rank R (default: the rank that makes the cache 0.5x the source's, "
                   "KV heads x head_dim - rope dim: 128 for smollm2-135m; full: every non-rope key "
                   "dim and value dim of every KV head)")
    p.add_argument("--rope-dim", default=None, metavar="D|full",
                   help="rotary dims of the cached rope key (default: head_dim, RoRoPE; full: every "
                   "rotary dim of every KV head, KV heads x head_dim, as blocks; other counts: a "
                   "multiple of 2 x KV heads, as blocks)")
    p.add_argument("--calib", default=BUILTIN, metavar="FILE|builtin|none",
                   help="UTF-8 calibration text (builtin, the default: CPython's pydoc prose; none: "
                   "no calibration, --method svd only): feeds --method pca, RoRoPE's mixing and the "
                   "choice of rope pairs (2-norm)")
    p.add_argument("--calib-tokens", type=int, default=DEFAULT_CALIB_TOKENS, metavar="N",
                   help=f"calibration tokens ({DEFAULT_CALIB_TOKENS})")
    p.add_argument("--rope-mode", choices=["blocks", "rorope"], default=None,
                   help="rorope: one plain head-wide RoPE key mixed from all KV heads (the default "
                   "for a head-wide --rope-dim and --format deepseek); blocks: the chosen pairs of "
                   "every KV head, each head its own block (the default for full and other counts)")
    p.add_argument("--format", type=parse_format, default="latentattn", metavar="{latentattn,deepseek}",
                   help="latentattn: a latentattn model directory (default); deepseek: a DeepSeek-V3 "
                   "Hugging Face checkpoint (needs --calib; no attention biases)")
    p.add_argument("--method", choices=list(METHODS), default="pca",
                   help="latent factorisation: pca of calibration outputs, whitened (svd of the "
                   "projections whitened by the damped calibration covariance, SVD-LLM V2's) or svd "
                   "of the weights; " + METHOD_QUALITY)
    add_calibration_flags(p)
    p.add_argument("--fit-steps", type=int, default=0, metavar="N",
                   help="after the closed form, train each attention layer N steps to reproduce its "
                   "source layer's output on the calibration text, with DeepSeek's latent norm in "
                   "place (0, the default: no fitting; a few hundred: see docs/guides/convert.md)")
    p.add_argument("--fit-lr", type=float, default=1e-3, metavar="LR",
                   help="peak Adam learning rate of the local fit, cosine to 0 (1e-3)")
    p.add_argument("--quiet", action="store_true", help="no per-layer fitting lines")
    p.set_defaults(func=cmd_convert)
