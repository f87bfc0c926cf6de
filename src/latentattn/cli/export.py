"""``latentattn export``: write any model ``latentattn.load`` reads (a train run above all, e.g. a
healed conversion) as a Hugging Face DeepSeek checkpoint directory that transformers, vLLM and
SGLang load: config.json, safetensors, and the model's tokenizer.json with its EOS id."""

from __future__ import annotations

import argparse
from typing import Any

import torch

from latentattn.cli.common import MODEL_HELP, UserError, add_dtype_arg, check_dtype, fmt_bytes
from latentattn.errors import ConfigError


def cmd_export(args: argparse.Namespace) -> int:
    from latentattn.interop.hf import save_pretrained_dir
    from latentattn.interop.hf_config import config_to_hf
    from latentattn.loading import load, load_config, resolve

    name = check_dtype(args.dtype)
    if not resolve(args.model).has_weights:
        raise UserError(f"{args.model} has no trained weights (a preset or a config): nothing to export")
    try:  # refuse before loading weights: a GQA model, or an MLA that DeepSeek's format cannot hold
        config_to_hf(load_config(args.model))
    except ConfigError as e:
        raise UserError(f"cannot export {args.model}: {e}") from None
    model, tokenizer = load(args.model, with_tokenizer=True,
                            dtype=None if name == "auto" else getattr(torch, name))
    out = save_pretrained_dir(model, args.out, tokenizer)
    size = sum(f.stat().st_size for f in out.iterdir() if f.is_file())
    print(f"wrote {out}: a Hugging Face DeepSeek checkpoint ({model.dtype}, {fmt_bytes(size)}); "
          f"transformers, vLLM and SGLang load it, and so does every --model")
    return 0


def register(sub: Any) -> None:
    p = sub.add_parser(
        "export", help="write a model (e.g. a healed train run) as a Hugging Face DeepSeek checkpoint",
        description="Write --model (a train run, a convert --format deepseek output, any DeepSeek "
        "checkpoint latentattn reads) to OUT as a Hugging Face DeepSeek-V2/V3/V3.2/V4 checkpoint: "
        "config.json, model.safetensors (sharded when large) and the tokenizer, written whole or "
        "not at all. The use: after healing a conversion with `train --model CONVERTED --teacher "
        "SRC --out RUN`, `export --model RUN OUT` gives vLLM and SGLang a directory to serve. A "
        "GQA model (Llama-family: already servable as it is) and a conversion in latentattn's own "
        "format (per-KV-head rope blocks, which DeepSeek's format cannot hold) are refused.")
    p.add_argument("--model", required=True, metavar="SPEC", help=MODEL_HELP)
    p.add_argument("out", metavar="OUT", help="new checkpoint directory (must not exist, or be empty)")
    add_dtype_arg(p, default="auto", help="the weights' dtype in OUT. auto (default): the model's own "
                  "(train runs are float32); bfloat16 halves the files and is what vLLM and SGLang serve")
    p.set_defaults(func=cmd_export)
