"""``latentattn generate``: a continuation of a prompt from any model ``latentattn.load`` reads."""

from __future__ import annotations

import argparse
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
from latentattn.kernels.backend import BACKENDS


def cmd_generate(args: argparse.Namespace) -> int:
    import torch

    from latentattn.kernels.backend import check_device_backend, get_backend, use_backend
    from latentattn.loading import load, resolve
    from latentattn.model import generate
    from latentattn.model.compiled import compile, compiler_error
    from latentattn.model.layout import decode_layout

    if not args.prompt:
        raise UserError("--prompt must not be empty")
    if args.max_new_tokens < 0:
        raise UserError(f"--max-new-tokens must be >= 0, got {args.max_new_tokens}")
    backend = args.backend or get_backend()
    device = model_device(args)
    with use_backend(backend):
        check_device_backend(device.device)  # before loading: nothing to undo
    if args.compile and compiler_error() is not None:
        raise UserError(f"--compile: {compiler_error()}")  # before loading: nothing to undo
    source = resolve(args.model)
    dtype = model_dtype(args, device)
    model, tokenizer = load(args.model, dtype=dtype.dtype, device=device.device, seed=args.seed,
                            with_tokenizer=True, **model_overrides(args))
    ids = tokenizer.encode(args.prompt)
    if not ids:
        raise UserError("the prompt encodes to zero tokens")
    if max(ids) >= model.config.vocab_size:
        raise UserError(f"token id {max(ids)} is outside the model's vocab_size "
                        f"{model.config.vocab_size}")
    if args.page_size is not None and args.page_size < 1:
        raise UserError(f"--page-size must be >= 1, got {args.page_size}")
    if args.compile:
        compile(model)
    else:
        decode_layout(model)  # fp32 CPU weights input-major: each eager decode GEMV streams faster
    eos = tokenizer.eos_token_id
    gen = torch.Generator(device=model.device).manual_seed(args.seed)
    with use_backend(backend):
        out = generate(model, torch.tensor([ids], device=model.device), args.max_new_tokens,
                       temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
                       eos_token_id=eos, generator=gen, latent_fp8=args.latent_fp8,
                       page_size=args.page_size)
    new = out[0, len(ids):].tolist()
    if eos is not None and eos in new:
        new = new[: new.index(eos)]
    say_dtype(dtype, device)  # after generating, as the note below
    if not source.has_weights:
        # Said after generating, so that an error stays the only line on stderr.
        print(f"latentattn: {args.model} is a random-init model (seed {args.seed}), "
              "not trained weights: expect gibberish", file=sys.stderr)
    print(tokenizer.decode(new))
    return 0


def register(sub: Any) -> None:
    gen = sub.add_parser(
        "generate", help="generate text from a checkpoint, a train run or a random-init preset",
        description="Generate a continuation of --prompt and print it (without the prompt). "
        "A directory (a Hugging Face checkpoint or a `latentattn train` run) loads its weights; "
        "a preset or config.json builds a seeded random-init model. Text goes through the "
        "directory's tokenizer.json if present, else UTF-8 bytes as token ids.")
    add_model_args(gen)
    gen.add_argument("--prompt", required=True, help="prompt text")
    gen.add_argument("--max-new-tokens", type=int, required=True, help="tokens to generate")
    gen.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    gen.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (1.0)")
    gen.add_argument("--top-k", type=int, default=0, help="keep the k most likely tokens (0 = all)")
    gen.add_argument("--seed", type=int, default=0, help="seed for init and sampling (0)")
    gen.add_argument("--latent-fp8", action="store_true",
                     help="MLA or DSA: keep the latent cache in FlashMLA's fp8 record (656 B a token "
                     "at DeepSeek's dims against 1,152 in bf16)")
    gen.add_argument("--page-size", type=int, default=None, metavar="N",
                     help="dense MLA: keep the latent cache in pages of N tokens (FlashMLA: 64)")
    gen.add_argument("--compile", action="store_true",
                     help="compile the prefill and decode steps with torch.compile (latentattn."
                     "compile); the first call pays the compilation (tens of seconds on a CPU), so "
                     "it pays off for long generations (`latentattn bench generate --compile` "
                     "measures both)")
    gen.add_argument("--backend", choices=list(BACKENDS), default=None,
                     help="attention implementation: auto (the default; LATENTATTN_BACKEND sets it "
                     "too) runs the Triton kernels for a CUDA --device when Triton imports and "
                     "PyTorch elsewhere; sdpa or reference force PyTorch; triton forces the "
                     "kernels (on the CPU only in Triton's interpreter, TRITON_INTERPRET=1)")
    gen.set_defaults(func=cmd_generate)
