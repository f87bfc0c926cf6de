"""``latentattn convert``: a GQA / MHA / MQA model (a Llama-family checkpoint, a GGUF file, a
train run, ...) to MLA, saved as a latentattn model directory that ``latentattn.load`` reads
(:mod:`latentattn.convert`, :mod:`latentattn.interop.native`)."""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any

from latentattn.cli.common import UserError

DEFAULT_CALIB_TOKENS = 4096


def calib_text(arg: str | None) -> str | None:
    """The calibration text --calib names: a file, ``builtin`` (CPython's pydoc prose), or none."""
    from latentattn.data import default_text, load_text

    if arg is None:
        return None
    return default_text() if arg == "builtin" else load_text(arg)


def parse_size(text: str, flag: str, full: int) -> int:
    if text == "full":
        return full
    try:
        return int(text)
    except ValueError:
        raise UserError(f"{flag} must be an integer or 'full', got {text!r}") from None


def cmd_convert(args: argparse.Namespace) -> int:
    import torch

    from latentattn.calc.kv_bytes import cache_bytes_per_token_per_layer
    from latentattn.config import GQAConfig
    from latentattn.convert import Plan, calibrate, check_sizes, convert, full_rank, full_rope_dim
    from latentattn.convert.calibrate import CALIB_WINDOW
    from latentattn.convert.gqa_to_mla import RopeMode
    from latentattn.interop.native import save_native
    from latentattn.loading import load, load_config
    from latentattn.tokenizer import encode_corpus

    started = time.perf_counter()
    cfg = load_config(args.src)
    a = cfg.attention
    if not isinstance(a, GQAConfig):
        raise UserError(f"{args.src} is {a.name.upper()} already: convert takes GQA, MHA or MQA models")
    deepseek = args.format == "deepseek"
    mode: RopeMode = args.rope_mode or ("rorope" if deepseek else "blocks")
    if deepseek:
        if mode != "rorope":
            raise UserError("--format deepseek needs --rope-mode rorope: DeepSeek's format has one "
                            "plain RoPE key, not a block per KV head")
        if a.qkv_bias or a.o_bias:
            raise UserError(f"{args.src} has attention biases, which DeepSeek's format cannot hold; "
                            "use --format native")
        if args.calib is None:
            raise UserError("--format deepseek fits the latent RMSNorm's gains on calibration "
                            "activations: give --calib FILE (or builtin)")
    rope_dim = parse_size(args.rope_dim, "--rope-dim", full_rope_dim(cfg, mode))
    if rope_dim % 2:
        raise UserError(f"--rope-dim must be even (rotary dims come in pairs), got {rope_dim}")
    rank = parse_size(args.kv_lora_rank, "--kv-lora-rank", full_rank(cfg, rope_dim, mode))
    check_sizes(cfg, rope_dim, rank, mode)
    if args.method == "pca" and args.calib is None:
        raise UserError("--method pca factors the latent on calibration activations: give --calib FILE")
    if args.calib_tokens < CALIB_WINDOW:
        raise UserError(f"--calib-tokens must be >= {CALIB_WINDOW}, got {args.calib_tokens}")
    text = calib_text(args.calib)
    model, tokenizer = load(args.src, dtype=torch.float32, with_tokenizer=True)
    ids = None
    if text is not None:
        ids = encode_corpus(tokenizer, text)[: args.calib_tokens]
        if len(ids) < args.calib_tokens:
            raise UserError(f"--calib: {args.calib} has {len(ids):,} tokens, fewer than --calib-tokens "
                            f"{args.calib_tokens:,}; give a longer text or fewer tokens")
    rorope = mode == "rorope"
    pairs, inputs = calibrate(model, rope_dim, ids, rorope=rorope)
    half = a.head_dim // 2
    plan = Plan(pairs, rank, args.method, mode, latent_norm=deepseek)
    mla = convert(model, plan, inputs)
    choice = ("RoRoPE, every pair" if rorope else "2-norm on --calib" if ids is not None
              else "highest frequencies")
    info = {"source": str(args.src), "kv_lora_rank": rank, "rope_dim": rope_dim, "method": args.method,
            "rope_mode": mode, "pairs": list(pairs), "pair_choice": choice, "calib": args.calib,
            "calib_tokens": args.calib_tokens if text is not None else 0}
    if deepseek:
        from latentattn.interop.hf import save_pretrained_dir

        out = save_pretrained_dir(mla, args.out, tokenizer)
    else:
        out = save_native(mla, args.out, tokenizer, info)
    before = cache_bytes_per_token_per_layer(cfg, 2) * cfg.n_layers
    after = cache_bytes_per_token_per_layer(mla.config, 2) * cfg.n_layers
    print(f"converted {args.src} ({a.name.upper()}, {a.n_kv_heads} KV heads of {a.head_dim}) to MLA: "
          f"latent {rank} + rope {rope_dim} ({len(pairs)} of {half} frequency pairs per KV head, "
          f"{choice}), {args.method}" + (", DeepSeek-V3 format (latent RMSNorm fitted on --calib)"
                                         if deepseek else ""))
    print(f"KV cache (bf16, {cfg.n_layers} layers): {before:,.0f} -> {after:,.0f} bytes/token "
          f"({after / before:.2f}x); wrote {out} in {time.perf_counter() - started:.1f} s")
    if (rank < full_rank(cfg, rope_dim, mode) or rope_dim < full_rope_dim(cfg) or deepseek
            or (rorope and a.n_kv_heads > 1)):
        print("below full rank or rope the model is an approximation: heal it with "
              f"`latentattn train --init {out} --teacher {args.src} --trainable attention "
              "--lr 3e-4 --data FILE --out DIR`", file=sys.stderr)
    return 0


def register(sub: Any) -> None:
    p = sub.add_parser(
        "convert", help="convert a GQA / MHA / MQA model's attention to MLA",
        description="Convert every attention layer of SRC (any GQA, MHA or MQA model latentattn.load "
        "reads: a Llama / Qwen2 / Mistral checkpoint, a GGUF file, smollm2-135m, a train run) to "
        "multi-head latent attention and save it to OUT (a new directory; load it with "
        "latentattn.load or --model OUT). --rope-dim of each token's cache stays rotary (the "
        "same frequency pairs of every KV head: MHA2MLA's 2-norm choice on --calib, else the "
        "highest frequencies); the rest of the keys and the values share a --kv-lora-rank latent "
        "(weight SVD, or PCA of calibration activations). 'full' for both keeps everything: the "
        "converted model's logits then equal the source's. --rope-mode rorope (TransMLA's RoRoPE) "
        "instead mixes the KV heads' rotary parts, frequency by frequency, into one head-wide "
        "plain RoPE key (what DeepSeek's format holds; exact for MQA only). --format deepseek "
        "writes a DeepSeek-V3 Hugging Face checkpoint (transformers' DeepseekV3ForCausalLM, vLLM, "
        "SGLang) with RoRoPE and DeepSeek's RMSNorm on the latent, its gains fitted on --calib.")
    p.add_argument("src", metavar="SRC", help="the GQA / MHA / MQA model")
    p.add_argument("out", metavar="OUT", help="output directory (must not exist, or be empty)")
    p.add_argument("--kv-lora-rank", required=True, metavar="R|full",
                   help="latent rank R (full: every non-rope key dim and value dim of every KV head)")
    p.add_argument("--rope-dim", default="full", metavar="D|full",
                   help="rotary dims of the shared rope key, a multiple of 2 x KV heads (full, the "
                   "default: KV heads x head_dim; with --rope-mode rorope: head_dim)")
    p.add_argument("--calib", default=None, metavar="FILE|builtin",
                   help="UTF-8 calibration text (builtin: CPython's pydoc prose): chooses the rope "
                   "pairs (2-norm) and feeds --method pca")
    p.add_argument("--calib-tokens", type=int, default=DEFAULT_CALIB_TOKENS, metavar="N",
                   help=f"calibration tokens ({DEFAULT_CALIB_TOKENS})")
    p.add_argument("--rope-mode", choices=["blocks", "rorope"], default=None,
                   help="blocks: the chosen pairs of every KV head, each head its own block "
                   "(default); rorope: one plain head-wide RoPE key mixed from all KV heads "
                   "(--rope-dim then = head_dim; default with --format deepseek)")
    p.add_argument("--format", choices=["native", "deepseek"], default="native",
                   help="native: a latentattn model directory (default); deepseek: a DeepSeek-V3 "
                   "Hugging Face checkpoint (needs --calib; no attention biases)")
    p.add_argument("--method", choices=["svd", "pca"], default="svd",
                   help="latent factorisation: svd of the weights, or pca of calibration outputs (svd)")
    p.set_defaults(func=cmd_convert)
