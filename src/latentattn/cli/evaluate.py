"""``latentattn eval``: loss per token, perplexity and nats per byte of a text, for any model
``latentattn.load`` reads (presets, train runs, Hugging Face and GGUF checkpoints, converted
models), through the model's own tokenizer."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from latentattn.cli.common import (
    UserError,
    add_model_args,
    model_device,
    model_dtype,
    model_overrides,
    say_dtype,
)


def cmd_eval(args: argparse.Namespace) -> int:
    from latentattn.data import load_text
    from latentattn.loading import load, resolve
    from latentattn.perplexity import evaluate_text

    for flag in ("seq_len", "max_tokens", "batch_size"):
        value = getattr(args, flag)
        if value is not None and value < (2 if flag == "max_tokens" else 1):
            raise UserError(f"--{flag.replace('_', '-')} must be >= {2 if flag == 'max_tokens' else 1}, "
                            f"got {value}")
    text = load_text(args.data)
    source = resolve(args.model)
    device = model_device(args)
    dtype = model_dtype(args, device)
    model, tokenizer = load(args.model, dtype=dtype.dtype, device=device.device, seed=args.seed,
                            with_tokenizer=True, **model_overrides(args))
    result = evaluate_text(model, tokenizer, text, seq_len=args.seq_len, max_tokens=args.max_tokens,
                           batch_size=args.batch_size, progress=not args.quiet and not args.json)
    say_dtype(dtype, device)
    if not source.has_weights:
        print(f"latentattn: {args.model} is a random-init model (seed {args.seed}), not trained "
              "weights", file=sys.stderr)
    if args.json:
        print(json.dumps({"model": str(args.model), "data": args.data, **result.as_dict()}, indent=2))
        return 0
    print(f"{args.model} on {args.data}: {result.tokens:,} tokens ({result.bytes:,} bytes) in "
          f"{result.windows:,} windows of {result.seq_len}")
    print(f"loss {result.loss_per_token:.4f} nats/token, perplexity {result.perplexity:,.2f}, "
          f"{result.nats_per_byte:.4f} nats/byte ({result.bits_per_byte:.4f} bits/byte)")
    print(f"{result.tokens_per_s:,.0f} tokens/s ({result.seconds:.1f} s)")
    return 0


def register(sub: Any) -> None:
    p = sub.add_parser(
        "eval", help="perplexity and nats per byte of a text",
        description="Evaluate --model on the UTF-8 text --data: the text is tokenized by the "
        "model's own tokenizer and cut into non-overlapping windows of --seq-len + 1 tokens, so "
        "each token after the first is predicted once. Prints the loss per token, the perplexity "
        "and nats (bits) per byte of text, which compare models with different tokenizers.")
    add_model_args(p)
    p.add_argument("--data", required=True, metavar="FILE", help="UTF-8 text file")
    p.add_argument("--seq-len", type=int, default=None, metavar="N",
                   help="window length in tokens (the model's max_seq_len, at most 1024)")
    p.add_argument("--max-tokens", type=int, default=None, metavar="N",
                   help="evaluate the text's first N tokens only (all)")
    p.add_argument("--batch-size", type=int, default=4, metavar="N", help="windows per forward (4)")
    p.add_argument("--seed", type=int, default=0, help="seed of a random-init model (0)")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_eval)
