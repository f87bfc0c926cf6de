"""The ``latentattn`` command: kv-cache, info, generate, train, bench.

User errors (any :class:`LatentAttnError`, a missing file) print one line
``latentattn: error: <message>`` on stderr and exit 2, as argparse does for its own errors;
anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from latentattn.config import GQAConfig, MLAConfig, ModelConfig
from latentattn.errors import LatentAttnError
from latentattn.io import atomic_write, write_json
from latentattn.io import check_parent as _check_parent

PROG = "latentattn"
TRAIN_STATE = "state.json"  # marks a `latentattn train` checkpoint directory (train/loop.py)
GiB = 1 << 30


class UserError(LatentAttnError):
    """A command-line input the user got wrong (a missing file, an unusable option value)."""


# ---------------------------------------------------------------------------- helpers
def _config_from_json_file(path: Path, **overrides: Any) -> ModelConfig:
    # Lazy: interop pulls in safetensors and is only needed for files and directories.
    from latentattn.interop.hf import config_from_hf

    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise UserError(f"{path}: not valid JSON ({e})") from None
    return config_from_hf(data, source=str(path), **overrides)


def resolve_model(spec: str) -> tuple[str, Path | None]:
    """Classify --model: ("dir", path), ("json", path) or ("preset", None)."""
    from latentattn.presets import PRESETS

    path = Path(spec)
    if path.is_dir():
        return "dir", path
    if path.is_file():
        return "json", path
    if spec in PRESETS:
        return "preset", None
    if os.sep in spec or spec.endswith(".json") or spec.startswith("."):
        raise UserError(f"no such file or directory: {spec}")
    from latentattn.presets import get_preset

    get_preset(spec)  # raises ConfigError listing the known presets
    raise AssertionError("unreachable")


def load_config(spec: str) -> ModelConfig:
    """A preset name, a config.json path or a checkpoint directory -> ModelConfig."""
    kind, path = resolve_model(spec)
    if kind == "preset":
        from latentattn.presets import get_preset

        return get_preset(spec)
    assert path is not None
    if kind == "dir" and (path / TRAIN_STATE).is_file():
        from latentattn.config_io import config_from_dict
        from latentattn.train.checkpoint import read_state

        return config_from_dict(read_state(path)["model"])
    if kind == "dir":
        path = path / "config.json"
        if not path.is_file():
            raise UserError(f"no config.json in directory {spec}")
    return _config_from_json_file(path)


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
        return (f"MLA: {a.n_heads} heads, q_lora_rank {q}, kv_lora_rank {a.kv_lora_rank}, "
                f"qk_nope {a.qk_nope_head_dim}, qk_rope {a.qk_rope_head_dim}, "
                f"v_head {a.v_head_dim}, impl {a.impl}")
    assert isinstance(a, GQAConfig)
    return (f"{a.name.upper()}: {a.n_heads} heads, {a.n_kv_heads} kv heads, "
            f"head_dim {a.head_dim}")


# ---------------------------------------------------------------------------- kv-cache
def cmd_kv_cache(args: argparse.Namespace) -> int:
    from latentattn.bench.kv_bytes import kv_table

    if args.context < 1 or args.batch < 1:
        raise UserError("--context and --batch must be positive")
    cfg = load_config(args.model)
    table = kv_table(cfg, args.context, args.batch)
    if args.json:
        print(json.dumps(table.as_dict(), indent=2))
        return 0
    headers = ["", "form", "B/token/layer", f"B/token ({cfg.n_layers} layers)",
               f"per seq @ {args.context:,}"]
    if args.batch > 1:
        headers.append(f"x batch {args.batch}")
    headers += ["vs MHA", "formula"]
    rows = []
    for r in table.rows:
        ratio = r.ratio_vs_mha
        vs = "1.00x" if ratio == 1 else (f"{1 / ratio:,.1f}x smaller" if ratio < 1
                                        else f"{ratio:,.2f}x larger")
        cells = ["*" if r.own else "", r.label, fmt_int(r.bytes_per_token_per_layer),
                 fmt_int(r.bytes_per_token), fmt_bytes(r.bytes_per_sequence)]
        if args.batch > 1:
            cells.append(fmt_bytes(r.bytes_total))
        cells += [vs, r.formula]
        rows.append(cells)
    right = set(range(2, len(headers) - 1))
    print(f"KV cache of {cfg.name}: {attention_summary(cfg)}; {cfg.n_layers} layers")
    print(render_table(headers, rows, right))
    print("* = this model's configured cache form")
    print(f"Note: {table.note}.")
    return 0


# ---------------------------------------------------------------------------- info
def cmd_info(args: argparse.Namespace) -> int:
    from latentattn.bench.kv_bytes import cache_bytes_per_token_per_layer
    from latentattn.bench.params import count_parameters

    cfg = load_config(args.model)
    p = count_parameters(cfg)
    bpl = cache_bytes_per_token_per_layer(cfg)
    lines = [
        f"model:        {cfg.name}",
        f"attention:    {attention_summary(cfg)}",
        f"layers:       {cfg.n_layers}",
        f"hidden size:  {cfg.dim:,}  (dense FFN {cfg.intermediate_size:,})",
        f"vocab:        {cfg.vocab_size:,}",
        f"max context:  {cfg.max_seq_len:,}",
    ]
    y = cfg.rope.yarn
    rope = f"theta {cfg.rope.theta:g}, {'interleaved' if cfg.rope.interleaved else 'half-split'}"
    if y is not None:
        rope += f", YaRN x{y.factor:g} from {y.original_max_position_embeddings:,}"
    lines.append(f"rope:         {rope}")
    if cfg.moe is not None:
        m = cfg.moe
        lines.append(
            f"MoE:          {m.n_routed_experts} routed + {m.n_shared_experts} shared experts, "
            f"{m.num_experts_per_tok} per token, expert FFN {m.moe_intermediate_size:,}, "
            f"first {m.first_k_dense_replace} layer(s) dense, {m.scoring_func}/{m.topk_method}"
        )
    else:
        lines.append("MoE:          none (dense)")
    lines.append(f"parameters:   {fmt_int(p['total'])} ({fmt_count(p['total'])}) total"
                 " (no multi-token-prediction module)")
    if cfg.moe is not None:
        lines.append(f"active/token: {fmt_int(p['active'])} ({fmt_count(p['active'])})")
    lines.append(
        f"  embedding {fmt_count(p['embedding'])}, lm_head {fmt_count(p['lm_head'])}, "
        f"attention {fmt_count(p['attention'])}, dense FFN {fmt_count(p['dense_mlp'])}, "
        f"routed experts {fmt_count(p['moe_routed'])}, shared experts {fmt_count(p['moe_shared'])}"
    )
    form = ("MLA " + ("naive (decompressed)" if cfg.attention.impl == "naive" else "latent")
            if isinstance(cfg.attention, MLAConfig) else cfg.attention.name.upper())
    lines.append(f"KV cache:     {fmt_int(bpl)} B per token per layer ({form}, bf16), "
                 f"{fmt_int(bpl * cfg.n_layers)} B per token")
    print("\n".join(lines))
    return 0


# ---------------------------------------------------------------------------- generate
class ByteTokenizer:
    """UTF-8 bytes as token ids 0..255: for checkpoints and presets without tokenizer.json."""

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: Sequence[int]) -> str:
        # A random model may emit ids >= 256, which are not bytes: show them as U+FFFD.
        return b"".join(bytes([i]) if i < 256 else "\ufffd".encode() for i in ids).decode(
            "utf-8", errors="replace")


class HFTokenizer:
    def __init__(self, path: Path) -> None:
        from tokenizers import Tokenizer

        self.tok = Tokenizer.from_file(str(path))

    def encode(self, text: str) -> list[int]:
        return list(self.tok.encode(text).ids)

    def decode(self, ids: Sequence[int]) -> str:
        return str(self.tok.decode(list(ids)))


def _check_fits_memory(cfg: ModelConfig, element_size: int) -> None:
    # Random-init of a real-size preset (deepseek-v3: 671B) would only end in the OOM killer.
    from latentattn.bench.params import count_parameters

    need = count_parameters(cfg)["total"] * element_size
    try:
        have = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return
    if need > 0.8 * have:
        raise UserError(
            f"preset {cfg.name} needs {fmt_bytes(need)} of weights but this machine has "
            f"{fmt_bytes(have)}; random-init generation is for small presets (tiny-*)"
        )


def cmd_generate(args: argparse.Namespace) -> int:
    import torch

    from latentattn.model import Transformer, generate

    if not args.prompt:
        raise UserError("--prompt must not be empty")
    if args.max_new_tokens < 0:
        raise UserError(f"--max-new-tokens must be >= 0, got {args.max_new_tokens}")
    dtype = getattr(torch, args.dtype)  # argparse limits it to float32 / bfloat16
    kind, path = resolve_model(args.model)
    tokenizer: ByteTokenizer | HFTokenizer = ByteTokenizer()
    eos: int | None = None
    torch.manual_seed(args.seed)
    if kind == "dir" and path is not None and (path / TRAIN_STATE).is_file():
        from latentattn.train.checkpoint import model_from_checkpoint

        model = model_from_checkpoint(path, mla_impl=args.mla_impl)
    elif kind == "dir":
        assert path is not None
        cfg = load_config(args.model)
        tok_file = path / "tokenizer.json"
        if tok_file.is_file():
            tokenizer = HFTokenizer(tok_file)
        else:
            _require_byte_vocab(cfg)
        raw = json.loads((path / "config.json").read_text())
        eos = raw.get("eos_token_id") if isinstance(raw.get("eos_token_id"), int) else None
        import latentattn

        overrides: dict[str, Any] = {} if args.mla_impl is None else {"mla_impl": args.mla_impl}
        model = latentattn.from_pretrained(str(path), dtype=dtype, **overrides)
    else:
        cfg = load_config(args.model)
        if args.mla_impl is not None:
            cfg = cfg.replace(mla_impl=args.mla_impl)
        _require_byte_vocab(cfg)
        _check_fits_memory(cfg, dtype.itemsize)
        model = Transformer(cfg)
    model = model.to(dtype).eval()
    ids = tokenizer.encode(args.prompt)
    if not ids:
        raise UserError("the prompt encodes to zero tokens")
    if max(ids) >= model.config.vocab_size:
        raise UserError(f"token id {max(ids)} is outside the model's vocab_size "
                        f"{model.config.vocab_size}")
    gen = torch.Generator().manual_seed(args.seed)
    out = generate(model, torch.tensor([ids]), args.max_new_tokens, temperature=args.temperature,
                   top_p=args.top_p, top_k=args.top_k, eos_token_id=eos, generator=gen)
    new = out[0, len(ids):].tolist()
    if eos is not None and eos in new:
        new = new[: new.index(eos)]
    if kind != "dir":
        # Said after generating, so that an error stays the only line on stderr.
        print(f"latentattn: {args.model} is a random-init model (seed {args.seed}), "
              "not trained weights: expect gibberish", file=sys.stderr)
    print(tokenizer.decode(new))
    return 0


def _require_byte_vocab(cfg: ModelConfig) -> None:
    if cfg.vocab_size < 256:
        raise UserError(
            f"no tokenizer.json, and byte-level tokens need vocab_size >= 256 but the model has "
            f"vocab_size {cfg.vocab_size}"
        )


# ---------------------------------------------------------------------------- bench decode
def _int_list(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def _on_start(bar: Any) -> Callable[[str], None]:
    """A benchmark's progress callback, called as each run starts: the previous one is done."""
    started = False

    def progress(what: str) -> None:
        nonlocal started
        if started:
            bar.update(1)
        started = True
        bar.set_postfix_str(what)

    return progress


def cmd_bench_decode(args: argparse.Namespace) -> int:
    import torch
    from tqdm import tqdm

    from latentattn.bench import decode

    _check_parent(args.json, "--json")
    _check_parent(args.plot, "--plot")
    if args.repeats < 1:
        raise UserError(f"--repeats must be >= 1, got {args.repeats}")
    include_hf = not args.no_hf
    if include_hf and not decode.hf_available():
        print(f"latentattn: transformers is not installed, skipping its DeepseekV3Attention "
              f"peer ({decode.HF_EXTRA_HINT} to include it)", file=sys.stderr)
        include_hf = False
    dims = decode.TINY_DIMS if args.tiny else decode.V2_LITE_DIMS
    dtype = getattr(torch, args.dtype)  # argparse limits it to float32 / bfloat16
    n_variants = len(decode.VARIANTS) - (0 if include_hf else 1)
    total = n_variants * len(args.contexts) * len(args.batches)
    with tqdm(total=total, file=sys.stderr, desc="bench decode", unit="run",
              disable=args.quiet) as bar:
        report = decode.run_decode_bench(
            contexts=args.contexts, batches=args.batches, repeats=args.repeats, dtype=dtype,
            include_hf=include_hf, dims=dims, progress=_on_start(bar),
        )
        bar.update(total - bar.n)
    write_json(args.json, report.as_dict())
    atomic_write(args.plot, lambda tmp: decode.plot_report(report, tmp), suffix=".png")
    print(decode.headline(report))
    for key, sp in report.speedups().items():
        print(f"  {key}: " + ", ".join(f"{k} {v:.2f}x" for k, v in sp.items()))
    print(f"wrote {args.json} and {args.plot}")
    return 0


def cmd_bench_dsa(args: argparse.Namespace) -> int:
    import torch
    from tqdm import tqdm

    from latentattn.bench import dsa

    _check_parent(args.json, "--json")
    _check_parent(args.plot, "--plot")
    if args.repeats < 1:
        raise UserError(f"--repeats must be >= 1, got {args.repeats}")
    dims = dsa.TINY_DIMS if args.tiny else dsa.V32_DIMS
    dtype = getattr(torch, args.dtype)  # argparse limits it to float32 / bfloat16
    total = len(args.decode_contexts) + len(args.prefill_contexts)
    with tqdm(total=total, file=sys.stderr, desc="bench dsa", unit="size", disable=args.quiet) as bar:
        report = dsa.run_dsa_bench(
            decode_contexts=args.decode_contexts, prefill_contexts=args.prefill_contexts,
            topks=args.topks, repeats=args.repeats, dtype=dtype, dims=dims, progress=_on_start(bar),
        )
        bar.update(total - bar.n)
    write_json(args.json, report.as_dict())
    atomic_write(args.plot, lambda tmp: dsa.plot_dsa_report(report, tmp), suffix=".png")
    print("\n".join(dsa.dsa_headline(report)))
    print(f"wrote {args.json} and {args.plot}")
    return 0


def cmd_bench_indexer(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from latentattn.bench import indexer
    from latentattn.data import load_text

    _check_parent(args.json, "--json")
    _check_parent(args.plot, "--plot")
    for flag in ("pretrain_steps", "warmup_steps", "topk", "seq_len", "batch"):
        if getattr(args, flag) < (0 if flag.endswith("steps") else 1):
            raise UserError(f"--{flag.replace('_', '-')} must be positive, got {getattr(args, flag)}")
    if args.topk >= args.seq_len:
        raise UserError(f"--topk ({args.topk}) must be smaller than --seq-len ({args.seq_len}): "
                        "otherwise every key is selected and recall is trivially 1")
    text = load_text(args.data)
    settings = indexer.IndexerBenchSettings(
        index_topk=args.topk, seq_len=args.seq_len, batch=args.batch,
        pretrain_steps=args.pretrain_steps, warmup_steps=args.warmup_steps, seed=args.seed)
    total = args.pretrain_steps + args.warmup_steps
    with tqdm(total=total, file=sys.stderr, desc="bench indexer", unit="step",
              disable=args.quiet) as bar:
        def progress(stage: str, done: int) -> None:
            bar.set_postfix_str(stage)
            bar.update(1)

        report = indexer.run_indexer_bench(text, args.data or "pydoc_data.topics (CPython)",
                                           settings, progress)
    write_json(args.json, report.as_dict())
    atomic_write(args.plot, lambda tmp: indexer.plot_indexer_report(report, tmp), suffix=".png")
    print("\n".join(indexer.indexer_headline(report)))
    print(f"wrote {args.json} and {args.plot}")
    return 0


# ---------------------------------------------------------------------------- parser
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=PROG, description="Multi-head latent attention: cache calculator, model info, "
        "generation and decode benchmark.")
    from latentattn import __version__

    p.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    model_help = "a preset name (e.g. deepseek-v3), a config.json path or a checkpoint directory"

    kv = sub.add_parser("kv-cache", help="KV-cache bytes per token: MHA, GQA, MQA and MLA forms",
                        description="Formula KV-cache bytes per token for the model's own cache "
                        "form and the forms it is compared against (bf16 unless a row says fp8).")
    kv.add_argument("--model", required=True, help=model_help)
    kv.add_argument("--context", type=int, default=131072, help="tokens per sequence (131072)")
    kv.add_argument("--batch", type=int, default=1, help="sequences (1)")
    kv.add_argument("--json", action="store_true", help="print JSON instead of a table")
    kv.set_defaults(func=cmd_kv_cache)

    info = sub.add_parser("info", help="config summary, parameter counts, cache bytes",
                          description="Summarise a model's config; parameters are counted from "
                          "the config without allocating the model.")
    info.add_argument("--model", required=True, help=model_help)
    info.set_defaults(func=cmd_info)

    gen = sub.add_parser(
        "generate", help="generate text from a checkpoint directory or a random-init preset",
        description="Generate a continuation of --prompt and print it (without the prompt). "
        "A preset builds a seeded random-init model; a directory (a Hugging Face checkpoint or a "
        "`latentattn train` --out) loads its weights. Text goes "
        "through the directory's tokenizer.json if present, else UTF-8 bytes as token ids.")
    gen.add_argument("--model", required=True, help="a checkpoint directory or a preset name")
    gen.add_argument("--prompt", required=True, help="prompt text")
    gen.add_argument("--max-new-tokens", type=int, required=True, help="tokens to generate")
    gen.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    gen.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (1.0)")
    gen.add_argument("--top-k", type=int, default=0, help="keep the k most likely tokens (0 = all)")
    gen.add_argument("--seed", type=int, default=0, help="seed for init and sampling (0)")
    gen.add_argument("--mla-impl", choices=["auto", "naive", "absorb"], default=None,
                     help="MLA inference form (default: the config's)")
    gen.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    gen.set_defaults(func=cmd_generate)

    from latentattn.train.cli import register as register_train

    register_train(sub)

    from latentattn.compare.cli import register as register_compare

    register_compare(sub)

    bench = sub.add_parser("bench", help="benchmarks", description="Benchmarks.")
    bsub = bench.add_subparsers(dest="bench_command", required=True, metavar="BENCHMARK")

    def bench_parser(name: str, help: str, description: str) -> argparse.ArgumentParser:
        """A benchmark subcommand: every one writes JSON and a plot, with a progress bar."""
        b = bsub.add_parser(name, help=help, description=description)
        b.add_argument("--json", required=True, metavar="OUT.json", help="results file")
        b.add_argument("--plot", required=True, metavar="OUT.png", help="plot file")
        b.add_argument("--quiet", action="store_true", help="no progress bar")
        return b

    dec = bench_parser(
        "decode", help="time one decode step of one attention layer per variant",
        description="Time one decode step (one new token per row) of one attention layer at "
        "DeepSeek-V2-Lite dims: MHA, GQA-8, MLA naive, MLA absorbed and transformers' "
        "DeepseekV3Attention with the same weights and cache.")
    dec.add_argument("--contexts", type=_int_list, default=[1024, 2048, 4096, 8192, 16384],
                     help="comma-separated cached context lengths (1024,2048,4096,8192,16384)")
    dec.add_argument("--batches", type=_int_list, default=[1, 8],
                     help="comma-separated batch sizes (1,8)")
    dec.add_argument("--repeats", type=int, default=5,
                     help="timed calls per point, median reported (5; calls over 2 s get 2)")
    dec.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    dec.add_argument("--no-hf", action="store_true",
                     help="skip the transformers DeepseekV3Attention peer")
    dec.add_argument("--tiny", action="store_true", help=argparse.SUPPRESS)  # small dims, tests
    dec.set_defaults(func=cmd_bench_decode)

    dsa = bench_parser(
        "dsa", help="DeepSeek Sparse Attention vs dense absorbed MLA: decode and prefill",
        description="One layer at DeepSeek-V3.2 dims, batch 1. Decode: the attention part of one "
        "step for dense absorbed MLA and for DSA (indexer + top-k + gathered attention) at each "
        "--topks, with the indexer's share. Prefill: DSA's masked MHA mode vs gathered form (and "
        "dense MLA), the faster form per length and the crossover.")
    dsa.add_argument("--decode-contexts", type=_int_list,
                     default=[1024, 2048, 4096, 8192, 16384, 32768, 65536],
                     help="cached contexts for decode (1024,...,65536)")
    dsa.add_argument("--prefill-contexts", type=_int_list, default=[1024, 2048, 4096, 8192, 16384],
                     help="prompt lengths for prefill (1024,...,16384); the largest take minutes")
    dsa.add_argument("--topks", type=_int_list, default=[512, 2048], help="index_topk values (512,2048)")
    dsa.add_argument("--repeats", type=int, default=5, help="timed decode calls per point (5)")
    dsa.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    dsa.add_argument("--tiny", action="store_true", help=argparse.SUPPRESS)  # small dims, tests
    dsa.set_defaults(func=cmd_bench_dsa)

    idx = bench_parser(
        "indexer", help="does the DSA indexer learn? attention-mass recall before/after warm-up",
        description="Pretrain a small MLA+DSA model densely on real text, then run the DeepSeek-V3.2 "
        "indexer warm-up (everything frozen but the indexer, KL to the main attention). Reports, "
        "per layer, the dense attention mass inside the indexer's top-k before and after, beside "
        "the k most recent keys and k random keys, and the validation loss dense vs top-k.")
    idx.add_argument("--data", default=None, metavar="PATH",
                     help="UTF-8 text file (default: CPython's pydoc_data.topics prose)")
    idx.add_argument("--pretrain-steps", type=int, default=300, help="dense LM steps (300)")
    idx.add_argument("--warmup-steps", type=int, default=200, help="indexer warm-up steps (200)")
    idx.add_argument("--topk", type=int, default=32, help="index_topk (32)")
    idx.add_argument("--seq-len", type=int, default=256, help="tokens (bytes) per sequence (256)")
    idx.add_argument("--batch", type=int, default=8, help="sequences per step (8)")
    idx.add_argument("--seed", type=int, default=0)
    idx.set_defaults(func=cmd_bench_indexer)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)  # exits 2 on its own errors
    try:
        return int(args.func(args))
    except (LatentAttnError, FileNotFoundError, NotADirectoryError, PermissionError) as e:
        msg = str(e) if not isinstance(e, OSError) or not e.filename else (
            f"{e.strerror}: {e.filename}")
        print(f"{PROG}: error: {' '.join(msg.split())}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130


__all__ = ["build_parser", "main"]
