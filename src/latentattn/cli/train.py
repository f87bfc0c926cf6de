"""``latentattn train``: LM training of one attention variant (``--attn``) or any model
``latentattn.load`` reads (``--model``: a preset, a Hugging Face checkpoint, another train run).

Registered into the top-level parser by ``latentattn.cli.build_parser``; the same command runs
under ``torchrun --nproc_per_node N -m latentattn train ...`` (DDP, or FSDP2 with ``--fsdp``).
User errors raise :class:`LatentAttnError`, which the top-level ``main`` prints as one line with
exit status 2.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from pathlib import Path
from typing import Any

from latentattn.cli.common import (
    DEVICE_HELP,
    add_deprecated,
    add_device_arg,
    add_dtype_arg,
    choose_device,
    dtype_name,
    say_device,
    training_precision,
)
from latentattn.errors import LatentAttnError

SIZE_FLAGS = {"dim": "--dim", "n_layers": "--layers", "n_heads": "--heads", "seq_len": "--seq-len",
              "kv_lora_rank": "--kv-lora-rank", "index_topk": "--index-topk"}


def register(sub: Any) -> None:
    """Add the ``train`` subcommand to ``sub`` (the top-level parser's subparsers)."""
    from latentattn.train.family import ATTN_KINDS, FamilySize

    size = FamilySize()
    p = sub.add_parser(
        "train", help="train a model: MHA, MQA, GQA, MLA or DSA, a preset, or any loadable model",
        description="Train a language model on a UTF-8 text file: an --attn family model on bytes, "
        "or any model latentattn.load reads (--model: a preset, a checkpoint, a run) through its "
        "checkpoint's tokenizer.json when it has one (else bytes). AdamW, "
        "linear warm-up + cosine (or --schedule wsd) LR and gradient clipping; evaluate every "
        "--eval-every steps and checkpoint to --out (safetensors + state.json). --resume continues "
        "the checkpoint in --out up to --steps with the losses and weights of an uninterrupted run: "
        "always to the checkpoint's own --steps; to other --steps only where the steps already "
        "taken keep their LR, i.e. with --schedule wsd while the checkpoint is before the decay of "
        "both the old and the new --steps (cosine: only within the warm-up), and it refuses "
        "otherwise. A resumed DSA run keeps the checkpoint's indexer warm-up length. DSA models "
        "run the indexer warm-up (dense) for --dsa-warmup-steps, then sparse top-k. Under torchrun "
        "the same command trains with DDP, or FSDP2 with --fsdp. Healing a converted model "
        "(latentattn convert): --model CONVERTED --teacher SOURCE distils from the source, "
        "--trainable attention trains only the converted layers.")
    p.add_argument("--model", default=None, metavar="SPEC",
                   help="start from any model latentattn.load reads: a preset with vocab_size >= 256 "
                   "(tiny-*, random-init), a Hugging Face checkpoint directory (its weights, and its "
                   "tokenizer.json if present), a GGUF file, an installed model (smollm2-135m), a "
                   "train run, a `latentattn convert` output or a config.json; trained in float32 "
                   "weights")
    p.add_argument("--attn", metavar="KIND", default=None,
                   help=f"instead of --model: a model of the tiny family with this attention, "
                   f"{', '.join(ATTN_KINDS)}, sized by --dim, --layers, ...")
    # --preset NAME and --init SPEC were two spellings of --model (0.1).
    add_deprecated(p, "--preset", "--model")
    add_deprecated(p, "--init", "--model")
    p.add_argument("--mla-impl", choices=["auto", "naive", "absorb"], default=None,
                   help="with --model: the MLA form to train and save (default: the model's)")
    p.add_argument("--retrofit-dsa", action="store_true",
                   help="with --model (a trained dense MLA model): add fresh DSA indexers and train "
                   "as DeepSeek-V3.2 does, the indexer warm-up with everything else frozen for "
                   "--dsa-warmup-steps, then sparse top-k (--index-topk: k, default seq-len / 16)")
    p.add_argument("--teacher", default=None, metavar="SPEC",
                   help="heal by distillation: any model latentattn.load reads over the same "
                   "tokenizer (typically the source of a converted --model); the loss becomes "
                   "(1 - W) LM + W KL(teacher || model), W from --distill-weight")
    p.add_argument("--distill-weight", type=float, default=None, metavar="W",
                   help="with --teacher: the weight of the KL term, in (0, 1] (1: pure distillation)")
    p.add_argument("--trainable", choices=["all", "attention"], default="all",
                   help="which weights train: all (default), or only the attention layers (healing "
                   "a conversion: no gradients or optimizer state for the rest)")
    add_device_arg(p, DEVICE_HELP.replace("CUDA if available", "this rank's GPU if there is one"))
    p.add_argument("--dim", type=int, default=None, help=f"hidden size ({size.dim})")
    p.add_argument("--layers", type=int, default=None, help=f"layers ({size.n_layers})")
    p.add_argument("--heads", type=int, default=None, help=f"attention heads ({size.n_heads})")
    p.add_argument("--seq-len", type=int, default=None,
                   help=f"tokens (bytes) per training sequence ({size.seq_len})")
    p.add_argument("--kv-lora-rank", type=int, default=None,
                   help=f"MLA/DSA latent size ({size.kv_lora_rank})")
    p.add_argument("--index-topk", type=int, default=None,
                   help=f"DSA: keys selected per query ({size.index_topk}; with --model it "
                   "overrides the model's)")
    p.add_argument("--data", default=None, metavar="PATH",
                   help="UTF-8 text file (default: CPython's pydoc_data.topics prose)")
    p.add_argument("--steps", type=int, default=200, help="total optimiser steps (200)")
    p.add_argument("--batch-size", type=int, default=16,
                   help="global batch in sequences, split across ranks (16)")
    p.add_argument("--lr", type=float, default=3e-3, help="peak learning rate (3e-3)")
    p.add_argument("--warmup-steps", type=int, default=20, help="linear LR warm-up steps (20)")
    p.add_argument("--schedule", choices=["cosine", "wsd"], default="cosine",
                   help="LR after the warm-up: cosine down to the last step (default), or wsd "
                   "(warmup-stable-decay): constant, then linear down over the last --decay-frac "
                   "of the steps; a wsd run can be --resume'd to other --steps until its decay")
    p.add_argument("--decay-frac", type=float, default=0.2, metavar="FRAC",
                   help="wsd: share of the steps in the final decay (0.2)")
    p.add_argument("--eval-every", type=int, default=50,
                   help="validate and checkpoint every N steps (50; 0 = only at the end)")
    add_dtype_arg(p, default="auto",
                  help="compute precision: bfloat16 (bf16) is autocast over float32 master weights, "
                  "float32 (fp32) is plain fp32; float16 is refused (no loss scaling). auto "
                  "(default): bfloat16 on a CUDA GPU with bf16 and on a CPU with native bf16 "
                  "(AVX-512 BF16 or AMX), where it measured faster (latentattn bench precision); "
                  "float32 elsewhere; a --resume keeps the checkpoint's")
    # --precision {auto,fp32,bf16} and --bf16 were train's own spellings of --dtype (0.1).
    add_deprecated(p, "--precision", "--dtype", type=dtype_name)
    add_deprecated(p, "--bf16", "--dtype bfloat16", const="bfloat16")
    p.add_argument("--seed", type=int, default=0, help="seed for init and data order (0)")
    p.add_argument("--out", required=True, metavar="DIR", help="checkpoint directory")
    p.add_argument("--resume", action="store_true",
                   help="continue the checkpoint in --out (model flags may then be left out)")
    p.add_argument("--fsdp", action="store_true", help="under torchrun: FSDP2 instead of DDP")
    p.add_argument("--dsa-warmup-steps", type=int, default=None,
                   help="DSA: indexer warm-up steps before top-k selection (steps // 4)")
    p.add_argument("--router-bias-rate", type=float, default=1e-3, metavar="RATE",
                   help="MoE with sigmoid routing: DeepSeek-V3's aux-loss-free balancing, the "
                   "correction-bias step per optimiser step (1e-3, as V3; 0 = off)")
    p.add_argument("--moe-aux-loss", type=float, default=0.0, metavar="ALPHA",
                   help="MoE: weight of DeepSeek-V2's expert-level balance loss (0 = off)")
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
    for flag in ("router_bias_rate", "moe_aux_loss"):
        value = getattr(args, flag)
        if not (math.isfinite(value) and value >= 0):
            raise LatentAttnError(f"--{flag.replace('_', '-')} must be a number >= 0, got {value}")
    if not 0 <= args.decay_frac <= 1:  # False for NaN too
        raise LatentAttnError(f"--decay-frac must be in [0, 1], got {args.decay_frac}")
    training_precision(args.dtype)  # float16 refused before any loading
    if args.distill_weight is not None:
        if args.teacher is None:
            raise LatentAttnError("--distill-weight goes with --teacher")
        if not 0 < args.distill_weight <= 1:
            raise LatentAttnError(f"--distill-weight must be in (0, 1], got {args.distill_weight}")


def _model_spec(args: argparse.Namespace) -> tuple[Any, dict[str, Any]]:
    """What ``latentattn.load`` builds the model from (a spec or a ModelConfig) and the
    overrides that go with it."""
    from latentattn.loading import load_config
    from latentattn.train.family import ATTN_KINDS, FamilySize, family_config

    given = {field: getattr(args, flag.lstrip("-").replace("-", "_"))
             for field, flag in SIZE_FLAGS.items()}
    named = [flag for flag, value in (("--attn", args.attn), ("--model", args.model)) if value is not None]
    if len(named) > 1:
        raise LatentAttnError("give one of --attn and --model, not both")
    if args.attn is not None:
        if args.attn not in ATTN_KINDS:
            raise LatentAttnError(f"unknown --attn {args.attn!r}; choose from {', '.join(ATTN_KINDS)}")
        if args.mla_impl is not None:
            raise LatentAttnError("--mla-impl goes with --model; an --attn model trains in its "
                                  "default form")
        size = FamilySize(**{f: v for f, v in given.items() if v is not None})
        return family_config(args.attn, size), {}
    sized = [SIZE_FLAGS[f] for f, v in given.items()
             if v is not None and f not in ("seq_len", "index_topk")]
    if sized:
        raise LatentAttnError(f"{sized[0]} sets the size of an --attn model; " + (
            f"{named[0]} brings its own" if named else "give --attn too"))
    overrides = {"mla_impl": args.mla_impl, "index_topk": args.index_topk}
    if args.model is not None:
        return args.model, overrides
    if args.resume:
        return load_config(args.out), {}
    raise LatentAttnError("give --model SPEC or --attn KIND (or --resume a checkpoint in --out)")


def _retrofit(model: Any, topk: int | None, seq_len: int | None, seed: int) -> Any:
    """The dense MLA ``model`` with fresh lightning indexers (train.dsa.retrofit_dsa): one
    indexer head per attention head, each a query/key head wide, k = a sixteenth of the training
    window unless --index-topk says (an average query then keeps under a quarter of its
    visible keys: calc.density.topk_density's (k + k ln(L/k)) / L)."""
    from latentattn.config import IndexerConfig, MLAConfig
    from latentattn.train.dsa import retrofit_dsa

    a = model.config.attention
    if not isinstance(a, MLAConfig):
        raise LatentAttnError(f"--retrofit-dsa needs a dense MLA model; --model gave "
                              f"{a.name.upper()}")
    window = seq_len if seq_len is not None else min(256, model.config.max_seq_len)
    k = topk if topk is not None else max(1, window // 16)
    return retrofit_dsa(model, IndexerConfig(a.n_heads, a.qk_head_dim, k), seed=seed)


def _precision(args: argparse.Namespace, device: Any) -> Any:
    """The :class:`~latentattn.precision.PrecisionChoice` of --dtype on ``device``.
    A resume under auto keeps its checkpoint's choice: the run must continue in the precision it
    started in (train.resume checks bf16), whatever machine it continues on."""
    from latentattn.precision import PrecisionChoice, choose_precision, emulated_bf16
    from latentattn.train.checkpoint import STATE_FILE, read_state

    requested = training_precision(args.dtype)
    if requested == "auto" and args.resume and (Path(args.out) / STATE_FILE).exists():
        saved = read_state(Path(args.out)).get("settings")
        if isinstance(saved, dict) and isinstance(saved.get("bf16", False), bool):
            bf16 = saved.get("bf16", False)
            return PrecisionChoice(bf16, "the checkpoint's", emulated=bf16 and emulated_bf16(device))
    return choose_precision(requested, device)


def _keep_tokenizer(tokenizer: Any, out: Path, resume: bool) -> None:
    """A run started from a checkpoint with its own tokenizer keeps a copy of it, so that
    ``generate``/``eval`` (and a resume) of the run tokenize alike."""
    from latentattn.io import atomic_write
    from latentattn.tokenizer import TOKENIZER_FILE, HFTokenizer
    from latentattn.train.checkpoint import STATE_FILE

    if not isinstance(tokenizer, HFTokenizer) or resume:
        return
    if (out / STATE_FILE).exists():
        return  # train() refuses to overwrite another run: leave its files alone
    out.mkdir(parents=True, exist_ok=True)
    data = tokenizer.path.read_bytes()
    atomic_write(out / TOKENIZER_FILE, lambda tmp: Path(tmp).write_bytes(data))


def cmd_train(args: argparse.Namespace) -> int:
    import torch

    from latentattn.data import load_text, train_val_split
    from latentattn.loading import load
    from latentattn.tokenizer import ByteTokenizer, encode_corpus
    from latentattn.train.loop import TrainSettings, train

    _check_flags(args)
    spec, overrides = _model_spec(args)
    retrofit_topk = None
    if args.retrofit_dsa:
        if args.model is None and not args.resume:
            raise LatentAttnError("--retrofit-dsa adds indexers to a trained dense MLA model: give "
                                  "it with --model RUN (or --resume the retrofitted run)")
        if args.model is not None:
            retrofit_topk = overrides.pop("index_topk", None)  # the new indexers' k, not an override
    device = choose_device(args.device)
    # Master weights in fp32 whatever the checkpoint's dtype: --dtype bfloat16 is autocast.
    model, tokenizer = load(spec, dtype=torch.float32, device=device.device, seed=args.seed,
                            with_tokenizer=True, **overrides)
    if args.retrofit_dsa and args.model is not None:
        model = _retrofit(model, retrofit_topk, args.seq_len, args.seed)
    teacher = None
    if args.teacher is not None:
        teacher = load(args.teacher, dtype=torch.float32, device=model.device)
    if args.resume and args.model is None and args.attn is None:
        from latentattn.loading import load_tokenizer

        tokenizer = load_tokenizer(args.out, model.config.vocab_size)
    cfg = model.config
    seq_len = args.seq_len if args.seq_len is not None else min(256, cfg.max_seq_len)
    if seq_len > cfg.max_seq_len:
        raise LatentAttnError(f"--seq-len {seq_len} exceeds the model's max_seq_len {cfg.max_seq_len}")
    text = load_text(args.data)
    tokens = encode_corpus(tokenizer, text)
    train_t, val_t = train_val_split(tokens)
    if min(len(train_t), len(val_t)) < seq_len + 1:
        need = math.ceil((seq_len + 1) / 0.1)
        source = args.data or "the default corpus"
        raise LatentAttnError(f"{source} has {len(tokens):,} tokens: too short for one window of "
                              f"--seq-len {seq_len} + 1 in its validation tenth (needs >= {need:,} "
                              "tokens; lower --seq-len or use more text)")
    precision = _precision(args, model.device)
    settings = TrainSettings(
        steps=args.steps, batch_size=args.batch_size, seq_len=seq_len, lr=args.lr,
        warmup_steps=args.warmup_steps, schedule=args.schedule, decay_frac=args.decay_frac,
        eval_every=args.eval_every, bf16=precision.bf16, seed=args.seed,
        dsa_warmup_steps=args.dsa_warmup_steps, fsdp=args.fsdp,
        router_bias_rate=args.router_bias_rate, moe_aux_loss=args.moe_aux_loss,
        dsa_freeze_warmup=args.retrofit_dsa, trainable=args.trainable,
        distill_weight=0.0 if teacher is None else (args.distill_weight or 1.0),
    )
    _keep_tokenizer(tokenizer, Path(args.out), args.resume)
    rank0 = int(os.environ.get("RANK", "0")) == 0
    if rank0:
        print(precision.line(), flush=True)
        warning = precision.warning()  # the same words as generate/eval --dtype bfloat16 here
        if warning is not None:
            print(f"latentattn: {warning}", file=sys.stderr, flush=True)
    model.train()
    result = train(model, train_t, val_t, settings, out_dir=args.out, resume=args.resume,
                   progress=not args.quiet, teacher=teacher)
    if rank0:
        say_device(device)  # after the work, as generate and eval: an error stays the only line
        loss = result.final_val_loss
        unit = "byte" if isinstance(tokenizer, ByteTokenizer) else "token"
        print(f"{cfg.name}: {result.steps_done} steps, validation loss {loss:.4f} nats/{unit} "
              f"({loss / math.log(2):.3f} bits/{unit}), {result.tokens_per_s:,.0f} tokens/s; "
              f"checkpoint in {args.out}")
    return 0


__all__ = ["cmd_train", "register"]
