"""What every command shares: the user-error type, number formatting, the --model flags and the
override knobs that go with them, the one vocabulary of --dtype (names and aliases) and --device
(``auto`` and the line saying what it chose), deprecated flag spellings, comma-separated integer
lists, and progress callbacks."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from latentattn.config import GQAConfig, MLAConfig, ModelConfig, V4AttentionConfig
from latentattn.errors import LatentAttnError
from latentattn.precision import DTYPE_NAMES, DtypeChoice, choose_dtype

PROG = "latentattn"
GiB = 1 << 30
MODEL_HELP = ("a preset name (e.g. deepseek-v3, tiny-mla), an installed model (smollm2-135m), a "
              "Hugging Face checkpoint directory, a GGUF file, a `latentattn train` run directory, a "
              "`latentattn convert` output directory or a config.json")
REMOVED_IN = "0.3"  # the release that drops the deprecated spellings (add_deprecated)


class UserError(LatentAttnError):
    """A command-line input the user got wrong (a missing file, an unusable option value)."""


# ---------------------------------------------------------------------------- deprecated spellings
class _DeprecatedAlias(argparse.Action):
    """An old spelling of a flag: stores into the new flag's ``dest`` (so the command reads one
    attribute whichever was given) and says once on stderr what to use instead."""

    def __init__(self, option_strings: Sequence[str], dest: str, *, use: str, **kwargs: Any) -> None:
        super().__init__(option_strings, dest, **kwargs)
        self.use = use

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace,
                 values: Any, option_string: str | None = None) -> None:
        print(f"{PROG}: {option_string} is deprecated; use {self.use} (it will be removed in "
              f"{REMOVED_IN})", file=sys.stderr)
        setattr(namespace, self.dest, self.const if self.nargs == 0 else values)


def add_deprecated(p: argparse.ArgumentParser, old: str, use: str, *, type: Any = None,
                   const: Any = None) -> None:
    """Register ``old`` as a hidden, deprecated spelling of ``use`` (``"--new"``, or ``"--new
    VALUE"`` for a flag that stands for one value: then ``const`` is that value and ``old`` takes
    no argument, as ``--bf16`` for ``--dtype bfloat16``). It parses to the same ``dest`` as the
    new flag (``type`` converts its argument as the new flag's does) and prints one line
    ``latentattn: --old is deprecated; use --new (it will be removed in 0.3)``. Old spellings keep
    working for one release so that users' scripts do not break silently."""
    new = use.split()[0]
    p.add_argument(old, dest=new.lstrip("-").replace("-", "_"), action=_DeprecatedAlias, use=use,
                   type=type, nargs=0 if const is not None else None, const=const,
                   default=argparse.SUPPRESS, help=argparse.SUPPRESS)


# ---------------------------------------------------------------------------- --dtype and --device
DTYPE_ALIASES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}
DTYPE_METAVAR = "{" + ",".join(DTYPE_NAMES) + "}"


def dtype_name(text: str) -> str:
    """argparse type of every --dtype: an alias of :data:`DTYPE_ALIASES` becomes its full name
    (what ``torch`` and ``latentattn.load`` call it); anything else is kept as given, for
    :func:`check_dtype` to refuse in one line (an argparse type error would print the usage too)."""
    return DTYPE_ALIASES.get(text, text)


def check_dtype(name: str, flag: str = "--dtype") -> str:
    """``name`` when it is one of :data:`DTYPE_NAMES`, else a UserError (one line, exit 2)."""
    if name not in DTYPE_NAMES:
        raise UserError(f"{flag} must be one of {', '.join(DTYPE_NAMES)}, got {name!r}")
    return name


def add_dtype_arg(p: argparse.ArgumentParser, *, default: str | None, help: str,
                  flag: str = "--dtype") -> None:
    """The one --dtype: the same names and aliases everywhere (:func:`dtype_name`; the command
    checks the name with :func:`check_dtype`); what ``auto`` and each name mean for the command
    is in ``help``."""
    p.add_argument(flag, type=dtype_name, default=default, metavar=DTYPE_METAVAR, help=help)


def training_precision(name: str, flag: str = "--dtype") -> str:
    """The ``choose_precision`` name ("auto", "fp32", "bf16") of a training --dtype: bfloat16 is
    autocast over fp32 master weights. float16 is refused: fp16 training needs loss scaling,
    which latentattn's training loop does not do."""
    if check_dtype(name, flag) == "float16":
        raise UserError(f"{flag} float16: training needs loss scaling in fp16, which latentattn does "
                        "not do; use bfloat16 (autocast) or float32")
    return {"float32": "fp32", "bfloat16": "bf16"}.get(name, name)


DEVICE_HELP = ("auto (default: CUDA if available, else the CPU; said on stderr), cpu, cuda, "
               "cuda:1, ...")


@dataclass(frozen=True)
class DeviceChoice:
    """The device a command runs on: ``device`` (``"cpu"``, ``"cuda"``, ``"cuda:1"``), and
    ``why`` when ``--device auto`` chose it (None: as asked)."""

    device: str
    why: str | None = None

    def line(self) -> str:
        return f"device: {self.device} (auto: {self.why})"


def choose_device(requested: str | None) -> DeviceChoice:
    """``--device``: ``auto`` (or None) is CUDA when torch sees a GPU (the rank's own
    ``cuda:LOCAL_RANK`` under torchrun, which sets LOCAL_RANK), else the CPU; anything else is
    kept as asked (``latentattn.load`` checks it)."""
    if requested is not None and requested != "auto":
        return DeviceChoice(requested)
    import torch

    if not torch.cuda.is_available():
        return DeviceChoice("cpu", "no CUDA")
    rank = os.environ.get("LOCAL_RANK")
    return DeviceChoice("cuda" if rank is None else f"cuda:{int(rank)}", "CUDA available")


def say_device(choice: DeviceChoice) -> None:
    """On stderr, once: what ``--device auto`` chose (nothing for a device asked for)."""
    if choice.why is not None:
        print(f"{PROG}: {choice.line()}", file=sys.stderr)


def add_device_arg(p: argparse.ArgumentParser, help: str = DEVICE_HELP) -> None:
    p.add_argument("--device", default="auto", metavar="DEVICE", help=help)


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
        add_dtype_arg(p, default="auto",
                      help="weights and compute dtype (fp32, bf16, fp16 are aliases). auto (default): "
                      "bfloat16 on a CPU with native bf16 (AVX-512 BF16 or AMX) or a CUDA GPU with "
                      "bf16, float32 elsewhere; it says which on stderr. bfloat16 on a CPU without "
                      "native bf16 runs, emulated and slow (a warning says so)")
        add_device_arg(p)


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


def model_device(args: argparse.Namespace) -> DeviceChoice:
    """The device --device asks for (auto resolved); its ``.device`` goes to ``latentattn.load``
    and :func:`say_dtype` says what auto chose."""
    return choose_device(args.device)


def model_dtype(args: argparse.Namespace, device: DeviceChoice) -> DtypeChoice:
    """The dtype --dtype asks for on ``device``: ``latentattn.load``'s ``dtype`` is its
    ``.dtype``; :func:`say_dtype` prints it. A name outside :data:`DTYPE_NAMES` is a UserError
    (one line, exit 2)."""
    return choose_dtype(check_dtype(args.dtype), device.device)


def say_dtype(choice: DtypeChoice, device: DeviceChoice | None = None) -> None:
    """On stderr: what --device auto and --dtype auto chose and why, or that the dtype asked for
    is emulated here (nothing for a device and dtype asked for that run natively). Said after the
    command's work, so that an error stays the only line on stderr."""
    if device is not None:
        say_device(device)
    for line in (choice.line() if choice.auto else None, choice.warning()):
        if line is not None:
            print(f"{PROG}: {line}", file=sys.stderr)


def int_or_full(text: str, flag: str) -> int | Literal["full"]:
    """A ``R|full`` / ``D|full`` flag's value: ``"full"`` or an integer; anything else is a
    UserError naming ``flag``. Ranges are checked where the sizes are resolved
    (:func:`latentattn.calc.converted.resolve_sizes`), against the model."""
    if text == "full":
        return "full"
    try:
        return int(text)
    except ValueError:
        raise UserError(f"{flag} must be an integer or 'full', got {text!r}") from None


def size_flags(args: argparse.Namespace) -> tuple[int | Literal["full"] | None, int | Literal["full"] | None]:
    """``--kv-lora-rank`` and ``--rope-dim`` of convert and kv-cache (None: the default)."""
    return tuple(None if text is None else int_or_full(text, flag)  # type: ignore[return-value]
                 for text, flag in ((args.kv_lora_rank, "--kv-lora-rank"), (args.rope_dim, "--rope-dim")))


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
