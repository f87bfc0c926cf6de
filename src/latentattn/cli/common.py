"""What every command shares: the user-error type, number formatting, the --model flags and the
override knobs that go with them (--dtype and the line saying what auto chose), comma-separated
integer lists, and progress callbacks."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from typing import Any

from latentattn.config import GQAConfig, MLAConfig, ModelConfig, V4AttentionConfig
from latentattn.errors import LatentAttnError
from latentattn.precision import DTYPE_NAMES, DtypeChoice, choose_dtype

PROG = "latentattn"
GiB = 1 << 30
MODEL_HELP = ("a preset name (e.g. deepseek-v3), a Hugging Face checkpoint directory, a "
              "`latentattn train` run directory or a config.json")


class UserError(LatentAttnError):
    """A command-line input the user got wrong (a missing file, an unusable option value)."""


# ---------------------------------------------------------------------------- --model and knobs
def add_model_args(p: argparse.ArgumentParser, *, flag: str = "--model", required: bool = True,
                   weights: bool = True, help: str = MODEL_HELP) -> None:
    """``--model`` and the knobs ``latentattn.load`` takes. ``weights=False`` (info, kv-cache,
    which read only the config) leaves out the runtime and placement knobs."""
    p.add_argument(flag, required=required, default=None, metavar="SPEC", help=help)
    p.add_argument("--mla-impl", choices=["auto", "naive", "absorb"], default=None,
                   help="MLA inference form (default: the model's own)")
    p.add_argument("--index-topk", type=int, default=None, metavar="K",
                   help="DSA: keys each query selects (default: the model's own)")
    p.add_argument("--indexer-keys", choices=["model", "fp8"], default=None,
                   help="DSA: indexer key cache in the model dtype or fp8 e4m3 (default: the model's)")
    if weights:
        p.add_argument("--dsa-prefill", choices=["auto", "gather", "masked"], default=None,
                       help="DSA prefill form: gathered top-k, DeepSeek's masked MHA mode, or auto "
                       "by length (default: auto)")
        p.add_argument("--dsa-masked-max-keys", type=int, default=None, metavar="N",
                       help="DSA auto prefill: masked mode up to N keys (8192)")
        p.add_argument("--dtype", default="auto", metavar="{" + ",".join(DTYPE_NAMES) + "}",
                       help="weights and compute dtype. auto (default): bfloat16 on a CPU with "
                       "native bf16 (AVX-512 BF16 or AMX) or a CUDA GPU with bf16, float32 elsewhere; "
                       "it says which on stderr. bfloat16 on a CPU without native bf16 runs, "
                       "emulated and slow (a warning says so)")
        p.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ... (default: cpu)")


def model_overrides(args: argparse.Namespace) -> dict[str, Any]:
    """The ``latentattn.load`` overrides the --model knobs set (None: keep the model's own)."""
    for flag in ("index_topk", "dsa_masked_max_keys"):
        value = getattr(args, flag, None)
        if value is not None and value < 1:
            raise UserError(f"--{flag.replace('_', '-')} must be >= 1, got {value}")
    return {"mla_impl": args.mla_impl, "index_topk": args.index_topk,
            "indexer_key_cache": args.indexer_keys,
            "dsa_prefill": getattr(args, "dsa_prefill", None),
            "dsa_masked_max_keys": getattr(args, "dsa_masked_max_keys", None)}


def model_dtype(args: argparse.Namespace) -> DtypeChoice:
    """The dtype --dtype (and --device) ask for: ``latentattn.load``'s ``dtype`` is its
    ``.dtype``; :func:`say_dtype` prints it. A name outside :data:`DTYPE_NAMES` is a UserError
    (one line, exit 2)."""
    if args.dtype not in DTYPE_NAMES:
        raise UserError(f"--dtype must be one of {', '.join(DTYPE_NAMES)}, got {args.dtype!r}")
    return choose_dtype(args.dtype, args.device)


def say_dtype(choice: DtypeChoice) -> None:
    """On stderr: what --dtype auto chose and why, or that the dtype asked for is emulated here
    (nothing for a dtype asked for that runs natively). Said after the command's work, so that
    an error stays the only line on stderr."""
    for line in (choice.line() if choice.auto else None, choice.warning()):
        if line is not None:
            print(f"{PROG}: {line}", file=sys.stderr)


def int_list(text: str) -> list[int]:
    """argparse type: comma-separated positive integers."""
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def on_start(bar: Any) -> Callable[[str], None]:
    """A progress callback called as each run starts (so the previous one is done): ticks ``bar``
    and shows what runs now."""
    started = False

    def progress(what: str) -> None:
        nonlocal started
        if started:
            bar.update(1)
        started = True
        bar.set_postfix_str(what)

    return progress


# ---------------------------------------------------------------------------- formatting
def fmt_int(n: float) -> str:
    return f"{round(n):,}"


def fmt_bytes(n: float) -> str:
    """Human units (binary): B, KiB, MiB, GiB, TiB."""
    for unit, size in (("TiB", 1 << 40), ("GiB", GiB), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= size:
            return f"{n / size:,.2f} {unit}"
    return f"{n:,.0f} B"


def fmt_count(n: int) -> str:
    for unit, size in (("T", 10**12), ("B", 10**9), ("M", 10**6), ("K", 10**3)):
        if n >= size:
            return f"{n / size:.2f}{unit}"
    return str(n)


def render_table(headers: Sequence[str], rows: Sequence[Sequence[str]], right: set[int]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]

    def line(cells: Sequence[str]) -> str:
        return "  ".join(c.rjust(w) if i in right else c.ljust(w)
                         for i, (c, w) in enumerate(zip(cells, widths, strict=True))).rstrip()

    sep = "  ".join("-" * w for w in widths)
    return "\n".join([line(headers), sep, *(line(r) for r in rows)])


def attention_summary(cfg: ModelConfig) -> str:
    a = cfg.attention
    if isinstance(a, MLAConfig):
        q = "none" if a.q_lora_rank is None else str(a.q_lora_rank)
        text = (f"MLA: {a.n_heads} heads, q_lora_rank {q}, kv_lora_rank {a.kv_lora_rank}, "
                f"qk_nope {a.qk_nope_head_dim}, qk_rope {a.qk_rope_head_dim}, "
                f"v_head {a.v_head_dim}, impl {a.impl}")
        if a.indexer is not None:
            i = a.indexer
            text += (f"; DSA indexer {i.index_n_heads} heads x {i.index_head_dim}, top-k "
                     f"{i.index_topk}, {i.key_cache} keys")
        return text
    if isinstance(a, V4AttentionConfig):
        return (f"DeepSeek-V4: {a.n_heads} heads x {a.head_dim} (rope {a.qk_rope_head_dim}), one shared-KV "
                f"head, q_lora_rank {a.q_lora_rank}, {a.o_groups} output groups x o_lora_rank "
                f"{a.o_lora_rank}; window {a.sliding_window}, CSA 1/{a.csa_rate} (indexer "
                f"{a.index_n_heads} heads x {a.index_head_dim}, top-k {a.index_topk}), HCA 1/{a.hca_rate}")
    assert isinstance(a, GQAConfig)
    return (f"{a.name.upper()}: {a.n_heads} heads, {a.n_kv_heads} kv heads, "
            f"head_dim {a.head_dim}")
