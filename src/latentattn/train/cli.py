"""``latentattn train``: byte-level LM training of one attention variant (or a preset).

Registered into the top-level parser by ``latentattn.cli.build_parser``; the same command runs
under ``torchrun --nproc_per_node N -m latentattn train ...`` (DDP, or FSDP2 with ``--fsdp``).
User errors raise :class:`LatentAttnError`, which the top-level ``main`` prints as one line with
exit status 2.
"""

from __future__ import annotations

import argparse
import math
import os
from typing import Any

from latentattn.errors import LatentAttnError

SIZE_FLAGS = {"dim": "--dim", "n_layers": "--layers", "n_heads": "--heads", "seq_len": "--seq-len",
              "kv_lora_rank": "--kv-lora-rank", "index_topk": "--index-topk"}


def register(sub: Any) -> None:
    """Add the ``train`` subcommand to ``sub`` (the top-level parser's subparsers)."""
    from latentattn.train.family import ATTN_KINDS, FamilySize

    size = FamilySize()
    p = sub.add_parser(
        "train", help="train a small byte-level model: MHA, MQA, GQA, MLA or DSA",
        description="Train a byte-level language model (vocab 256) on a UTF-8 text file with AdamW, "
        "linear warm-up + cosine LR and gradient clipping; evaluate every --eval-every steps and "
        "checkpoint to --out (safetensors + state.json). --resume continues the checkpoint in --out "
        "up to --steps with the losses an uninterrupted run gets. DSA models run the indexer "
        "warm-up (dense) for --dsa-warmup-steps, then sparse top-k. Under torchrun the same "
        "command trains with DDP, or FSDP2 with --fsdp.")
    p.add_argument("--attn", metavar="KIND", default=None,
                   help=f"attention variant of the model family: {', '.join(ATTN_KINDS)}")
    p.add_argument("--preset", default=None, help="a latentattn preset with vocab_size 256 (tiny-*)")
    p.add_argument("--dim", type=int, default=None, help=f"hidden size ({size.dim})")
    p.add_argument("--layers", type=int, default=None, help=f"layers ({size.n_layers})")
    p.add_argument("--heads", type=int, default=None, help=f"attention heads ({size.n_heads})")
    p.add_argument("--seq-len", type=int, default=None,
                   help=f"tokens (bytes) per training sequence ({size.seq_len})")
    p.add_argument("--kv-lora-rank", type=int, default=None,
                   help=f"MLA/DSA latent size ({size.kv_lora_rank})")
    p.add_argument("--index-topk", type=int, default=None,
                   help=f"DSA: keys selected per query ({size.index_topk})")
    p.add_argument("--data", default=None, metavar="PATH",
                   help="UTF-8 text file (default: CPython's pydoc_data.topics prose)")
    p.add_argument("--steps", type=int, default=200, help="total optimiser steps (200)")
    p.add_argument("--batch-size", type=int, default=16,
                   help="global batch in sequences, split across ranks (16)")
    p.add_argument("--lr", type=float, default=3e-3, help="peak learning rate (3e-3)")
    p.add_argument("--warmup-steps", type=int, default=20, help="linear LR warm-up steps (20)")
    p.add_argument("--eval-every", type=int, default=50,
                   help="validate and checkpoint every N steps (50; 0 = only at the end)")
    p.add_argument("--bf16", action="store_true", help="bfloat16 autocast")
    p.add_argument("--seed", type=int, default=0, help="seed for init and data order (0)")
    p.add_argument("--out", required=True, metavar="DIR", help="checkpoint directory")
    p.add_argument("--resume", action="store_true",
                   help="continue the checkpoint in --out (model flags may then be left out)")
    p.add_argument("--fsdp", action="store_true", help="under torchrun: FSDP2 instead of DDP")
    p.add_argument("--dsa-warmup-steps", type=int, default=None,
                   help="DSA: indexer warm-up steps before top-k selection (steps // 4)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_train)


def _check_flags(args: argparse.Namespace) -> None:
    for flag, low in (("steps", 1), ("batch_size", 1), ("warmup_steps", 0), ("eval_every", 0),
                      ("dsa_warmup_steps", 0), ("seq_len", 1), ("dim", 1), ("layers", 1),
                      ("heads", 1), ("kv_lora_rank", 1), ("index_topk", 1)):
        value = getattr(args, flag)
        if value is not None and value < low:
            raise LatentAttnError(f"--{flag.replace('_', '-')} must be >= {low}, got {value}")
    if not (math.isfinite(args.lr) and args.lr > 0):
        raise LatentAttnError(f"--lr must be a positive number, got {args.lr}")
    if args.attn is not None and args.preset is not None:
        raise LatentAttnError("give either --attn or --preset, not both")


def _model_config(args: argparse.Namespace) -> Any:
    from latentattn.config_io import config_from_dict
    from latentattn.train.checkpoint import read_state
    from latentattn.train.family import ATTN_KINDS, FamilySize, family_config

    given = {field: getattr(args, flag.lstrip("-").replace("-", "_"))
             for field, flag in SIZE_FLAGS.items()}
    sized = [SIZE_FLAGS[f] for f, v in given.items() if v is not None and f != "seq_len"]
    if args.attn is not None:
        if args.attn not in ATTN_KINDS:
            raise LatentAttnError(f"unknown --attn {args.attn!r}; choose from {', '.join(ATTN_KINDS)}")
        size = FamilySize(**{f: v for f, v in given.items() if v is not None})
        return family_config(args.attn, size)
    if sized:
        raise LatentAttnError(f"{sized[0]} sets the size of an --attn model; " + (
            "a --preset has its own" if args.preset is not None else "give --attn too"))
    if args.preset is not None:
        from latentattn.presets import get_preset

        cfg = get_preset(args.preset)
        if cfg.vocab_size != 256:
            raise LatentAttnError(f"preset {args.preset} has vocab_size {cfg.vocab_size}; training "
                                  "on byte tokens needs 256 (use a tiny-* preset or --attn)")
        return cfg
    if args.resume:
        return config_from_dict(read_state(args.out)["model"])
    raise LatentAttnError("give --attn KIND or --preset NAME (or --resume a checkpoint in --out)")


def cmd_train(args: argparse.Namespace) -> int:
    import torch

    from latentattn.data import byte_tokens, load_text, train_val_split
    from latentattn.model.transformer import Transformer
    from latentattn.train.loop import TrainSettings, train

    _check_flags(args)
    cfg = _model_config(args)
    seq_len = args.seq_len if args.seq_len is not None else min(256, cfg.max_seq_len)
    if seq_len > cfg.max_seq_len:
        raise LatentAttnError(f"--seq-len {seq_len} exceeds the model's max_seq_len {cfg.max_seq_len}")
    text = load_text(args.data)
    tokens = byte_tokens(text)
    train_t, val_t = train_val_split(tokens)
    if min(len(train_t), len(val_t)) < seq_len + 1:
        need = math.ceil((seq_len + 1) / 0.1)
        source = args.data or "the default corpus"
        raise LatentAttnError(f"{source} has {len(tokens):,} bytes: too short for one window of "
                              f"--seq-len {seq_len} + 1 in its validation tenth (needs >= {need:,} "
                              "bytes; lower --seq-len or use more text)")
    settings = TrainSettings(
        steps=args.steps, batch_size=args.batch_size, seq_len=seq_len, lr=args.lr,
        warmup_steps=args.warmup_steps, eval_every=args.eval_every, bf16=args.bf16, seed=args.seed,
        dsa_warmup_steps=args.dsa_warmup_steps, fsdp=args.fsdp,
    )
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device(f"cuda:{local_rank}") if torch.cuda.is_available() else torch.device("cpu")
    torch.manual_seed(args.seed)  # the same initial weights on every rank
    model = Transformer(cfg).to(device)
    result = train(model, train_t, val_t, settings, out_dir=args.out, resume=args.resume,
                   progress=not args.quiet)
    if int(os.environ.get("RANK", "0")) == 0:
        loss = result.final_val_loss
        print(f"{cfg.name}: {result.steps_done} steps, validation loss {loss:.4f} nats/byte "
              f"({loss / math.log(2):.3f} bits/byte), {result.tokens_per_s:,.0f} tokens/s; "
              f"checkpoint in {args.out}")
    return 0


__all__ = ["cmd_train", "register"]
